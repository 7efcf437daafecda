"""NoiseProbe: SGN measurements inside any training loop, every k steps."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from sgn_lab import checks
from sgn_lab.data.catalog import DataWarning
from sgn_lab.distributed.ranks import Ranks
from sgn_lab.grads import GramCoverage
from sgn_lab.models.losses import IGNORE_INDEX
from sgn_lab.models.modes import restored_modes
from sgn_lab.models.wrapped import is_sharded, measured, unwrapped
from sgn_lab.run.choices import GRADS_PATHS
from sgn_lab.run.instruments import (
    INSTRUMENTS,
    Instrument,
    LossFn,
    Measurement,
    configured,
    update_noise,
)
from sgn_lab.seeds import Purpose, seed_for
from sgn_lab.stats.noise import NoiseStats

__all__ = ["LossFn", "NoiseProbe", "ProbeResult", "update_noise"]


@dataclass(frozen=True)
class ProbeResult:
    """One measurement: a flat row of scalars, the spectra in tidy form, the noise stats
    (None when the sgn instrument is off) and the per-layer table of the layers instrument
    (:func:`sgn_lab.layer_noise_scale` with a ``step`` column; None when it is off)."""

    step: int
    row: dict[str, float]
    spectra: pd.DataFrame
    noise: NoiseStats | None
    layers: pd.DataFrame | None = None


class NoiseProbe:
    """Measure a model's SGN every ``every`` steps of a training loop: the data, the schedule
    and a list of instruments (:mod:`sgn_lab.run.instruments`), each of which owns its options.

    An instrument named by a string is built with its options from the keyword arguments
    below (``update_repeats`` is :class:`~sgn_lab.run.instruments.Updates`' ``repeats``,
    ``shape_batch_sizes`` and ``shape_draws`` are
    :class:`~sgn_lab.run.instruments.MinibatchTails`' ``batch_sizes`` and ``draws``); an
    instrument object, such as ``MinibatchTails(batch_sizes=(1, 8), draws=64)``, carries its
    own.

    Parameters
    ----------
    model, loss_fn
        The model being trained and its mean-reduced loss.
    x_train, y_train
        Training data; the probe draws its n samples from here, and the train loss and accuracy
        are measured on all of it.
    x_test, y_test
        Optional test data for test loss and accuracy.
    x_val, y_val
        Optional validation data (held out of the training set, never probed) for validation
        loss and accuracy.
    every
        Measure when ``step % every == 0``.
    samples
        n, the number of per-sample gradients per measurement.
    fresh
        False: one fixed probe set for the whole run (the spectrum at different steps is then
        measured on the same samples); True: new samples at every measurement.
    batch_size
        The training minibatch size B, for ``minibatch_trace`` and ``noise_to_signal``
        (sampling without replacement from the training set).
    instruments
        Names of built-in instruments (``eval``, ``sgn``, ``tails``, ``minibatch-tails``,
        ``curvature``, ``updates``, ``layers``) or instrument objects of one's own, run at
        each measurement in this order (built-ins in their table order first). Default: eval,
        sgn, tails, and updates when ``update_repeats`` is given; ``curvature=True`` adds
        curvature.
    update_repeats, optimizer, method
        The training's optimizer and method, and the repeats of the updates instrument
        named ``"updates"``: R >= 2 copies of (model, optimizer) each take one step of
        ``method`` (a registry name of :mod:`sgn_lab.optim`) on an independent minibatch, and
        the covariance of the updates Δθ is summarised as ``update_trace``,
        ``update_effective_rank`` and ``update_mean_sq_norm`` (|mean Δθ|²). Each copy draws
        its own injected noise, so this covers methods whose noise is not in the gradient
        (PNM, S-SGD, injection).
    grads
        How per-sample gradients enter: ``"vmap"`` materialises them (n × d) with
        :func:`sgn_lab.per_sample_grads`; ``"gram"`` gets the n×n Gram from activations and
        backpropagated signals with :func:`sgn_lab.per_sample_gram` (about the cost of one
        backward pass, no n × d matrix) and the exact mean gradient from the same pass, while
        the tails come from the per-sample gradients of the first ``shape_samples`` probe
        samples and ``diag_variance`` is not measured; ``"auto"`` takes ``"gram"`` unless an
        instrument needs G (curvature), and at its first measurement checks the Gram against
        vmap per-sample gradients of ``verify`` probe samples
        (:class:`sgn_lab.GramMismatchError` naming the parameters if they disagree). After a
        Gram measurement, ``coverage`` holds each parameter's route.
    verify
        Samples of that first check with ``grads="auto"``. 0: no checks at all, neither this
        one nor the first-call checks of the per-sample functions (the consistency check of
        :func:`sgn_lab.per_sample_grads` and :func:`sgn_lab.per_sample_gram`, which otherwise
        run on the first measurement whatever the path).
    shape_samples
        Samples for the tails (and minibatch tails) in Gram mode.
    shape_batch_sizes, shape_draws
        For the minibatch-tails instrument named ``"minibatch-tails"``: the minibatch sizes B
        and the draws R per size (:func:`sgn_lab.minibatch_noise_shape`).
    chunk_size, batchnorm
        Passed to :func:`sgn_lab.per_sample_grads`.
    eval_batch
        Chunk size for the loss and accuracy passes.
    seed
        Every random choice of the probe derives from (seed, step, purpose)
        (:mod:`sgn_lab.seeds`): the training loop's own random state is never touched.
    ranks
        A :class:`sgn_lab.distributed.Ranks` of more than one process: the probe set is split
        over them (:func:`sgn_lab.distributed.gram_over_ranks.split_gram`) and so are the evaluation
        passes, and every rank returns the same result; each rank must call
        :meth:`measure` at the same steps. Pass the unwrapped model or the DDP one (its
        ``module`` is measured), or an FSDP2 model (``fully_shard``): its parameters are
        gathered on every rank for each measurement (:mod:`sgn_lab.distributed.fsdp`).
        None: this process alone.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        x_train: Tensor,
        y_train: Tensor,
        *,
        x_test: Tensor | None = None,
        y_test: Tensor | None = None,
        x_val: Tensor | None = None,
        y_val: Tensor | None = None,
        every: int = 100,
        samples: int = 512,
        fresh: bool = False,
        batch_size: int | None = None,
        instruments: Sequence[str | Instrument] | None = None,
        curvature: bool = False,
        update_repeats: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
        method: str = "sgd",
        grads: str = "auto",
        verify: int = 32,
        shape_samples: int = 256,
        shape_batch_sizes: Sequence[int] = (1, 4, 16, 64),
        shape_draws: int = 256,
        chunk_size: int | None = None,
        batchnorm: str = "error",
        eval_batch: int = 1024,
        seed: int = 0,
        ranks: Ranks | None = None,
    ) -> None:
        model = unwrapped(model)
        n_train = len(x_train)
        checks.integer("every", every, 1)
        checks.integer("samples", samples, 2)
        if len(y_train) != n_train:
            raise ValueError(f"x_train has {n_train} samples but y_train has {len(y_train)}")
        if batch_size is not None and checks.integer("batch_size", batch_size, 1) > n_train:
            raise ValueError(f"batch_size must be at most the {n_train} training samples, got "
                             f"{batch_size}")
        if update_repeats != 0:  # 0: off
            checks.integer("update_repeats", update_repeats, 2)
        checks.choice("grads", grads, GRADS_PATHS)
        settings = {"update_repeats": update_repeats,
                    "shape_batch_sizes": tuple(checks.integer("shape_batch_sizes", b, 1)
                                               for b in shape_batch_sizes),
                    "shape_draws": checks.integer("shape_draws", shape_draws, 8)}
        self.instruments = _schedule(instruments, curvature, settings)
        names = [i.name for i in self.instruments]
        if "updates" in names and (optimizer is None or batch_size is None):
            raise ValueError(_UPDATES_NEED)
        if "updates" in names and is_sharded(model):
            raise ValueError("the updates instrument steps copies of the optimizer, whose "
                             "state FSDP shards: leave it out of an FSDP model's instruments")
        needs_grads = any(i.needs_grads for i in self.instruments)
        if grads == "gram" and needs_grads:
            raise ValueError("curvature needs per-sample gradients: use grads='vmap' or 'auto'")
        # The spot check runs once, at the first measurement, when the path was chosen for us;
        # otherwise the per-sample functions' own first-call checks (verify=None) apply.
        self._verify: int | None = verify if grads == "auto" and not needs_grads else None
        self.checks = verify != 0  # False: the per-sample functions check nothing
        if grads == "auto":
            grads = "vmap" if needs_grads else "gram"
        self.grads, self.shape_samples = grads, shape_samples
        self.ranks = ranks or Ranks()
        self.coverage: GramCoverage | None = None
        self.model, self.loss_fn = model, loss_fn
        self.x_train, self.y_train = x_train, y_train
        self.x_test, self.y_test = x_test, y_test
        self.x_val, self.y_val = x_val, y_val
        if samples > n_train:
            warnings.warn(f"samples={samples} exceeds the {n_train} training samples: each "
                          f"measurement uses n={n_train}", DataWarning, stacklevel=2)
        self.every, self.samples, self.fresh = every, min(samples, n_train), fresh
        self.batch_size = batch_size
        self.optimizer, self.method = optimizer, method
        self.chunk_size, self.batchnorm, self.eval_batch = chunk_size, batchnorm, eval_batch
        self.seed = seed
        self._fixed = self._draw_probe(0)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, step: int, *, epoch: float = math.nan) -> ProbeResult | None:
        """Measure if ``step`` is due, else return None: the one line a training loop needs."""
        return self.measure(step, epoch=epoch) if self.due(step) else None

    def measure(self, step: int, *, epoch: float = math.nan) -> ProbeResult:
        """Measure now, whatever the step: every instrument in turn."""
        started = time.perf_counter()
        row: dict[str, float] = {"step": step, "epoch": epoch, "grads": self.grads}
        with measured(self.model) as model:  # FSDP: gathered for the whole measurement
            measurement = Measurement(self, step, epoch, model)
            for instrument in self.instruments:
                row.update(instrument(measurement))
        if measurement.coverage is not None:
            self.coverage = measurement.coverage
        row["measure_seconds"] = time.perf_counter() - started
        spectra = (pd.concat(measurement.spectra, ignore_index=True) if measurement.spectra
                   else pd.DataFrame(columns=["step", "kind", "k", "eigenvalue"]))
        noise = measurement.__dict__.get("noise")  # computed only if an instrument asked
        layers = getattr(measurement, "layers", None)  # the layers instrument's table
        return ProbeResult(step, row, spectra, noise, layers)

    @property
    def grads_verify(self) -> int | None:
        """The ``verify`` of :func:`sgn_lab.per_sample_grads` calls: its first-call check,
        or 0 where the checks are off."""
        return None if self.checks else 0

    def take_verify(self) -> int | None:
        """The ``verify`` of this measurement's per-sample call: the spot check's sample
        count once, then None (the functions' own first-call checks, done by then); 0
        throughout where the checks are off."""
        if not self.checks:
            return 0
        verify, self._verify = self._verify, None
        return verify

    def probe_indices(self, step: int) -> Tensor:
        """The training samples measured at ``step``."""
        return self._draw_probe(step) if self.fresh else self._fixed

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        """Mean loss and accuracy (NaN for regression) in eval mode, in chunks.

        Accuracy is over every predicted target: per sample for classification, per token for
        token sequences (targets (n, T), logits (n, T, V)), where padding's targets
        (``IGNORE_INDEX``) are not predictions: a padded set's accuracy is over its real
        tokens."""
        with measured(self.model) as model:
            total_loss, correct, predicted = self._evaluated(model, x, y)
        if self.ranks.distributed:
            sums = self.ranks.sum(torch.tensor([total_loss, correct, predicted],
                                               dtype=torch.float64))
            total_loss, correct, predicted = sums[0].item(), int(sums[1]), int(sums[2])
        accuracy = correct / predicted if predicted else math.nan
        return total_loss / len(x), accuracy

    def _evaluated(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, int, int]:
        """This rank's summed loss, correct and predicted targets of its block of x."""
        device = next(model.parameters()).device
        block = self.ranks.shard(len(x))  # all of x in one process
        with restored_modes(model):
            model.eval()
            total_loss, correct, predicted = 0.0, 0, 0
            for start in range(block.start, block.stop, self.eval_batch):
                stop = min(start + self.eval_batch, block.stop)
                xb, yb = x[start:stop].to(device), y[start:stop].to(device)
                out = model(xb)
                total_loss += float(self.loss_fn(out, yb)) * len(xb)
                if not yb.is_floating_point():
                    real = yb != IGNORE_INDEX
                    correct += int(((out.argmax(dim=-1) == yb) & real).sum())
                    predicted += int(real.sum())
        return total_loss, correct, predicted

    def _draw_probe(self, step: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed_for(self.seed, step, Purpose.PROBE))
        return torch.randperm(len(self.x_train), generator=gen)[: self.samples]


_UPDATES_NEED = ("the updates instrument needs the optimizer, the batch_size and "
                 "update_repeats >= 2")


def _schedule(instruments: Sequence[str | Instrument] | None, curvature: bool,
              settings: dict[str, Any]) -> list[Instrument]:
    """Instruments by name (built with their options from ``settings``,
    :func:`~sgn_lab.run.instruments.configured`) or object, built-ins in their table order,
    then the user's."""
    if instruments is None:
        instruments = ["eval", "sgn", "tails"]
        instruments += ["curvature"] if curvature else []
        instruments += ["updates"] if settings["update_repeats"] else []
    elif curvature and "curvature" not in instruments:
        instruments = [*instruments, "curvature"]
    chosen: list[Instrument] = []
    for item in instruments:
        if isinstance(item, str):
            if item == "updates" and settings["update_repeats"] < 2:
                raise ValueError(_UPDATES_NEED)
            item = configured(item, settings)
        if any(i.name == item.name for i in chosen):
            raise ValueError(f"instrument {item.name!r} given twice")
        chosen.append(item)
    order = list(INSTRUMENTS)
    return sorted(chosen, key=lambda i: order.index(i.name) if i.name in INSTRUMENTS
                  else len(order))
