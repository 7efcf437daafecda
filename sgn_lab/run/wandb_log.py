"""Weights & Biases runs: each measurement's scalars and spectra, as it is taken.

Scalars carry the metrics columns' own names (``trace``, ``noise_scale``, ``noise_scale_se``,
``effective_rank``, ...), logged at the measurement's training step, so a chart in W&B is a
column of ``metrics.csv``. Each spectrum kind (``sgn``, ``isotropic``, ``update``) is a
histogram of log10 of its positive eigenvalues (key ``spectrum/<kind>``), as in TensorBoard.
The W&B run is named after the sgn-lab run, carries its config, and lives in ``RUN/wandb``;
its id is kept in ``RUN/wandb/sgn-lab-run-id``, so a resumed run continues the same W&B run
(steps it logged after the checkpoint stay as they were: W&B does not rewrite history).

Where it goes is W&B's own business, read from its environment: ``WANDB_PROJECT`` (default
``sgn-lab``), ``WANDB_ENTITY``, ``WANDB_MODE=offline`` (no network: ``wandb sync RUN/wandb``
uploads later). Needs the ``wandb`` package (extra ``wandb``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sgn_lab.run.tensorboard import positive_spectra, scalars

if TYPE_CHECKING:
    from sgn_lab.run.probe import ProbeResult

WANDB_DIR = "wandb"
RUN_ID_FILE = "sgn-lab-run-id"


class WandbLog:
    """Write :class:`~sgn_lab.run.probe.ProbeResult` s to a W&B run kept in ``out/wandb``."""

    def __init__(self, out: str | Path, *, name: str, config: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ValueError("--log wandb needs the wandb package: pip install "
                             "'sgn-lab[wandb]'") from None
        self._wandb = wandb
        folder = Path(out) / WANDB_DIR
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "sgn-lab", name=name,
                              id=run_id, resume="allow", dir=str(Path(out)),
                              config=dict(config), reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off"))

    def write(self, result: ProbeResult) -> None:
        data: dict[str, Any] = scalars(result)
        for kind, positive in positive_spectra(result).items():
            data[f"spectrum/{kind}"] = self._wandb.Histogram(np.log10(positive))
        self.run.log(data, step=int(result.step))

    def close(self) -> None:
        self.run.finish()
