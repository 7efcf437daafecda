"""The names a run's config chooses from, each defined once, below the code that uses them.

The schema (:mod:`sgn_lab.run.config`) validates against these and lists them in its help
texts; the modules that implement them (:mod:`~sgn_lab.run.instruments`,
:mod:`~sgn_lab.run.recorder`, :mod:`~sgn_lab.run.build`, :mod:`~sgn_lab.run.probe`) read them
from here. Nothing here imports the code it names, so the schema sits below what it configures.
"""

from __future__ import annotations

from sgn_lab.models.names import MODELS, TRANSFORMERS
from sgn_lab.user import is_reference

GRADS_PATHS = ("auto", "vmap", "gram")
"""How a measurement gets its per-sample gradients (:class:`~sgn_lab.run.probe.NoiseProbe`)."""

DEVICES = ("auto", "cpu", "cuda")

PARALLEL = ("ddp", "fsdp")
"""How a run over several processes shares the model: DDP (whole on every process) or FSDP2
(sharded; :mod:`sgn_lab.distributed.fsdp`)."""

STATUS_KEYS = ("complete", "run", "sgn_lab_version", "diverged", "probe_samples_used")
"""Keys of a run directory's ``config.json`` that describe the run's status rather than its
configuration (:mod:`sgn_lab.run.rundir`)."""

INSTRUMENT_NAMES = ("eval", "sgn", "tails", "minibatch-tails", "curvature", "updates", "layers")
"""The built-in instruments, in the order their columns appear in a row; their objects are
:data:`sgn_lab.run.instruments.INSTRUMENTS`."""

DEFAULT_INSTRUMENTS = ("sgn", "tails", "updates", "eval")
"""The instruments of a run whose config names none."""

LOGS = ("tensorboard", "wandb")
"""Live views a run can write besides its tables (:class:`~sgn_lab.run.recorder.RunRecorder`)."""

HF_PREFIX = "hf:"
"""A model saved with ``save_pretrained`` in a local folder: ``hf:PATH``."""


def model_kind(name: str) -> str:
    """``builtin``, ``transformer``, ``pretrained`` or ``user``; ValueError for anything else."""
    if name in MODELS:
        return "builtin"
    if name in TRANSFORMERS:
        return "transformer"
    if name.startswith(HF_PREFIX):
        if not name[len(HF_PREFIX):]:
            raise ValueError(f"model {name!r} needs a folder: write hf:PATH")
        return "pretrained"
    if is_reference(name):
        return "user"
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS + TRANSFORMERS)}"
                     ", hf:PATH or pkg.module:callable")
