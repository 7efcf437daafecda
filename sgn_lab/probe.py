"""NoiseProbe: SGN measurements inside any training loop, every k steps."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from sgn_lab.curvature import curvature_stats
from sgn_lab.grads import GramCoverage, gram_result
from sgn_lab.grads.vmap import _seeded, flatten_grads, per_sample_grads
from sgn_lab.noise import NoiseStats, noise_stats
from sgn_lab.tails import shape_stats

LossFn = Callable[[Tensor, Tensor], Tensor]


def derived_seed(seed: int, *keys: int) -> int:
    """A seed for one purpose at one step, independent of everything that ran before.

    Measurements draw from seeds derived from (run seed, step, purpose) rather than from a
    shared stream, so a resumed run measures exactly what an uninterrupted one does.
    """
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 2)


_PROBE, _GRADS, _STATS, _CURVATURE, _UPDATES = range(5)
GRADS_PATHS = ("auto", "vmap", "gram")


@dataclass(frozen=True)
class ProbeResult:
    """One measurement: a flat row of scalars, the spectra in tidy form, and the full stats."""

    step: int
    row: dict[str, float]
    spectra: pd.DataFrame
    noise: NoiseStats


class NoiseProbe:
    """Measure the SGN of a model every ``every`` steps of a training loop.

    Parameters
    ----------
    model, loss_fn
        The model being trained and its mean-reduced loss.
    x_train, y_train
        Training data; the probe draws its n samples from here, and the train loss and accuracy
        are measured on all of it.
    x_test, y_test
        Optional test data for test loss and accuracy.
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
    curvature
        Also measure the top Hessian eigenvalue, tr H, tr(HS) and the alignment ratio on the
        probe set (about n + 200 Hessian-vector products).
    update_repeats, optimizer, method
        With R = ``update_repeats`` >= 2, also measure the per-step update noise: from the
        current state, R copies of (model, optimizer) each take one step of ``method`` (a
        registry name of :mod:`sgn_lab.optim`) on an independent minibatch, and the covariance
        of the updates Δθ over the R copies is summarised as ``update_trace``,
        ``update_effective_rank`` and ``update_mean_sq_norm`` (|mean Δθ|²). Each copy draws
        its own injected noise, so this covers methods whose noise is not in the gradient
        (PNM, S-SGD, noise injection).
    grads
        How per-sample gradients enter: ``"vmap"`` materialises them (n × d) with
        :func:`sgn_lab.per_sample_grads`; ``"gram"`` gets the n×n Gram from activations and
        backpropagated signals with :func:`sgn_lab.per_sample_gram` (about the cost of one
        backward pass, no n × d matrix) and the exact mean gradient from the same pass, while
        the shape figures (tail index, normality, kurtosis) come from the per-sample gradients
        of the first ``shape_samples`` probe samples and ``diag_variance`` is not measured;
        ``"auto"`` takes ``"gram"`` unless curvature is asked for (it needs G), and at its
        first measurement checks the Gram against vmap per-sample gradients of ``verify``
        probe samples (:class:`sgn_lab.GramMismatchError` naming the parameters if they
        disagree). After a Gram measurement, ``coverage`` holds each parameter's route.
    verify
        Samples of that first check with ``grads="auto"`` (0: no check).
    shape_samples
        Samples for the shape figures in Gram mode (0: skip them).
    chunk_size, batchnorm
        Passed to :func:`sgn_lab.per_sample_grads`.
    eval_batch
        Chunk size for the loss and accuracy passes.
    seed
        Every random choice of the probe derives from (seed, step): the training loop's own
        random state is never touched.
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
        every: int = 100,
        samples: int = 512,
        fresh: bool = False,
        batch_size: int | None = None,
        curvature: bool = False,
        update_repeats: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
        method: str = "sgd",
        grads: str = "auto",
        shape_samples: int = 256,
        verify: int = 32,
        chunk_size: int | None = None,
        batchnorm: str = "error",
        eval_batch: int = 1024,
        seed: int = 0,
    ) -> None:
        n_train = len(x_train)
        if every < 1:
            raise ValueError(f"every must be a positive integer, got {every}")
        if samples < 2:
            raise ValueError(f"samples must be at least 2, got {samples}")
        if len(y_train) != n_train:
            raise ValueError(f"x_train has {n_train} samples but y_train has {len(y_train)}")
        if batch_size is not None and not 1 <= batch_size <= n_train:
            raise ValueError(f"batch_size must lie in [1, {n_train}], got {batch_size}")
        if update_repeats == 1 or update_repeats < 0:
            raise ValueError(f"update_repeats must be 0 (off) or >= 2, got {update_repeats}")
        if update_repeats and (optimizer is None or batch_size is None):
            raise ValueError("update_repeats needs the optimizer and the batch_size")
        if grads not in GRADS_PATHS:
            raise ValueError(f"unknown grads {grads!r}; choose one of {', '.join(GRADS_PATHS)}")
        if grads == "gram" and curvature:
            raise ValueError("curvature needs per-sample gradients: use grads='vmap' or 'auto'")
        # The spot check runs once, at the first measurement, when the path was chosen for us.
        self._verify = verify if grads == "auto" and not curvature else 0
        if grads == "auto":
            grads = "vmap" if curvature else "gram"
        self.grads, self.shape_samples = grads, shape_samples
        self.coverage: GramCoverage | None = None
        self.model, self.loss_fn = model, loss_fn
        self.x_train, self.y_train = x_train, y_train
        self.x_test, self.y_test = x_test, y_test
        self.every, self.samples, self.fresh = every, min(samples, n_train), fresh
        self.batch_size, self.curvature = batch_size, curvature
        self.update_repeats, self.optimizer, self.method = update_repeats, optimizer, method
        self.chunk_size, self.batchnorm, self.eval_batch = chunk_size, batchnorm, eval_batch
        self.seed = seed
        self._fixed = self._draw_probe(0)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, step: int, *, epoch: float = math.nan) -> ProbeResult | None:
        """Measure if ``step`` is due, else return None: the one line a training loop needs."""
        return self.measure(step, epoch=epoch) if self.due(step) else None

    def measure(self, step: int, *, epoch: float = math.nan) -> ProbeResult:
        """Measure now, whatever the step."""
        started = time.perf_counter()
        device = next(self.model.parameters()).device
        idx = self._draw_probe(step) if self.fresh else self._fixed
        x, y = self.x_train[idx].to(device), self.y_train[idx].to(device)
        grads_seed = derived_seed(self.seed, step, _GRADS)
        minibatch = {"batch_size": self.batch_size, "dataset_size": len(self.x_train),
                     "seed": derived_seed(self.seed, step, _STATS)}
        if self.grads == "gram":
            with _seeded(grads_seed, device):
                result = gram_result(
                    self.model, self.loss_fn, x, y, with_mean=True, batchnorm=self.batchnorm,
                    chunk_size=self.chunk_size, verify=self._verify,
                )
            self._verify, self.coverage = 0, result.coverage
            mean = result.mean
            assert mean is not None
            stats = noise_stats(gram=result.gram, dim=mean.numel(), mean=mean, **minibatch)
            tails = self._shape_from_subset(x, y, grads_seed)
        else:
            grads = per_sample_grads(
                self.model, self.loss_fn, x, y, chunk_size=self.chunk_size,
                batchnorm=self.batchnorm, seed=grads_seed,
            )
            stats = noise_stats(grads, **minibatch)
            tails = {}
        row: dict[str, float] = {"step": step, "epoch": epoch, "grads": self.grads}
        row["train_loss"], row["train_accuracy"] = self.evaluate(self.x_train, self.y_train)
        if self.x_test is not None and self.y_test is not None:
            row["test_loss"], row["test_accuracy"] = self.evaluate(self.x_test, self.y_test)
        row.update(stats.to_dict())
        row.update(tails)
        if self.curvature:
            curvature = curvature_stats(
                self.model, self.loss_fn, x, y, flatten_grads(grads),
                seed=derived_seed(self.seed, step, _CURVATURE), chunk_size=self.chunk_size,
            )
            row.update(curvature.to_dict())
        if self.update_repeats:
            updates = update_noise(
                self.model, self.optimizer, self.method, self.loss_fn, self.x_train,
                self.y_train, batch_size=self.batch_size, repeats=self.update_repeats,
                seed=derived_seed(self.seed, step, _UPDATES),
            )
            update_stats = noise_stats(updates, shape=False)
            update_spectrum = update_stats.eigenvalues
            row["update_trace"] = update_stats.trace
            row["update_effective_rank"] = update_stats.effective_rank
            row["update_mean_sq_norm"] = update_stats.mean_sq_norm
        row["measure_seconds"] = time.perf_counter() - started
        spectra = spectra_table(stats, step)
        if self.update_repeats:
            spectra = pd.concat([spectra, _tidy(step, "update", update_spectrum)],
                                ignore_index=True)
        return ProbeResult(step, row, spectra, stats)

    def _shape_from_subset(self, x: Tensor, y: Tensor, seed: int) -> dict[str, float]:
        m = min(len(x), self.shape_samples)
        if m < 8:
            return {}
        grads = per_sample_grads(
            self.model, self.loss_fn, x[:m], y[:m], chunk_size=self.chunk_size,
            batchnorm=self.batchnorm, seed=seed,
        )
        G = flatten_grads(grads).to(torch.float64)
        centred = G - G.mean(dim=0)
        if not bool(centred.abs().max() > 0):
            return {}
        return shape_stats(centred, seed=seed).to_dict()

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        """Mean loss and accuracy (NaN for regression) in eval mode, in chunks."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            total_loss, correct = 0.0, 0
            for start in range(0, len(x), self.eval_batch):
                xb = x[start : start + self.eval_batch].to(device)
                yb = y[start : start + self.eval_batch].to(device)
                out = self.model(xb)
                total_loss += float(self.loss_fn(out, yb)) * len(xb)
                if not yb.is_floating_point():
                    correct += int((out.argmax(dim=-1) == yb).sum())
        finally:
            self.model.train(was_training)
        accuracy = correct / len(x) if not y.is_floating_point() else math.nan
        return total_loss / len(x), accuracy

    def _draw_probe(self, step: int) -> Tensor:
        gen = torch.Generator().manual_seed(derived_seed(self.seed, step, _PROBE))
        return torch.randperm(len(self.x_train), generator=gen)[: self.samples]


def spectra_table(stats: NoiseStats, step: int) -> pd.DataFrame:
    """Tidy spectra of one measurement: step, kind ("sgn" / "isotropic"), k, eigenvalue.

    The probe adds kind "update" (the spectrum of Cov[Δθ] over the update draws) when it
    measures the update noise.
    """
    return pd.concat(
        [_tidy(step, "sgn", stats.eigenvalues),
         _tidy(step, "isotropic", stats.isotropic_eigenvalues)],
        ignore_index=True,
    )


def _tidy(step: int, kind: str, eigenvalues: Tensor) -> pd.DataFrame:
    return pd.DataFrame({"step": step, "kind": kind, "k": np.arange(1, eigenvalues.numel() + 1),
                         "eigenvalue": eigenvalues.numpy()})


def update_noise(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: str,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    repeats: int,
    seed: int,
) -> Tensor:
    """Updates Δθ of R one-step copies of (model, optimizer) on independent minibatches.

    Returns an (R, d) float64 matrix; row r is θ_after − θ_before for copy r, whose minibatch
    (B samples without replacement) and whose own random draws (the optimizer's generator and
    torch's global one, e.g. for dropout) come from (seed, r). The model and optimizer passed
    in are not modified.
    """
    from sgn_lab.optim import train_step

    device = next(model.parameters()).device
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    rows = []
    for r in range(repeats):
        replica_seed = derived_seed(seed, r)
        replica, replica_opt = copy.deepcopy((model, optimizer))
        generator = getattr(replica_opt, "generator", None)
        if generator is not None:
            generator.manual_seed(replica_seed)
        gen = torch.Generator().manual_seed(replica_seed)
        idx = torch.randperm(len(x), generator=gen)[:batch_size]
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(replica_seed)
            train_step(method, replica_opt, replica, loss_fn, x[idx].to(device), y[idx].to(device))
        after = torch.cat([p.detach().reshape(-1) for p in replica.parameters()]).double()
        rows.append(after - before)
    return torch.stack(rows)
