"""The gradient noise scale for free during DDP training (McCandlish et al. 2018, Appendix A).

The mean gradient g_B of B samples satisfies E|g_B|² = |G|² + tr Cov[g_B] with
Cov[g_B] = c_B·S, S the per-sample gradient covariance and c_B = 1/B for independent samples
(:func:`sgn_lab.minibatch_factor`). Two batch sizes B_small < B_big give the unbiased estimates
(McCandlish et al., "An Empirical Model of Large-Batch Training", arXiv 1812.06162, App. A)

    |G|²_est = (B_big·|g_big|² − B_small·|g_small|²) / (B_big − B_small)
    trΣ_est  = (|g_small|² − |g_big|²) / (1/B_small − 1/B_big)

and B_simple = tr S / |G|² is estimated by the ratio of their smoothed averages: the ratio of a
single step's estimates is both noisy and biased.

Under DDP with N ranks of b samples each, a rank's local gradient (the bucket before the
all-reduce) is a g_small with B_small = b and the all-reduced mean is g_big with B_big = N·b.
Each rank's |g_r|² is unbiased for E|g_small|², so their average over ranks is used (lower
variance); with it the formulas read

    |G|²_est = (N·|g_big|² − mean_r |g_r|²) / (N − 1)
    trΣ_est  = N·b·(mean_r |g_r|² − |g_big|²) / (N − 1).

Finite data set of n samples, each step's N·b samples drawn without replacement: then
c_B = 1/B − 1/n (the finite-population correction), the 1/n terms cancel in trΣ_est, whose mean
is exactly ``trace`` = tr S (S with 1/(n−1), as in :mod:`sgn_lab.stats.noise`), and |G|²_est
has mean |ḡ|² − tr S/n, which is :func:`sgn_lab.noise_stats`'s ``grad_sq_norm`` (the unbiased
|G|² of the population the n samples come from).

Gradient accumulation: under ``no_sync`` no hook runs; the synchronised backward then
all-reduces the accumulated gradient, so pass ``batch_size`` = samples per rank per optimizer
step (K micro-batches of b: K·b). With the loss divided by K (the usual practice) the local
gradient is the mean over those K·b samples and all figures are exact; without, both |G|² and
tr S come out K² times too large, while B_simple is unaffected.

Mixed precision with ``torch.amp.GradScaler``: the buckets hold the gradients times the
scale s. Pass the scaler (``GradientNoiseScale(b, scaler=scaler)``): the scale is read when a
synchronised backward pass begins, before ``scaler.update()`` can change it, and every
squared norm is divided by s², so all columns are those of the unscaled gradients. A step
whose gradients overflowed (the scaler skips it) gives non-finite estimates, recorded but not
averaged.

Unequal batches per rank (a last batch that does not split evenly, a sampler without padding):
DDP still averages the ranks' mean gradients with equal weights, g_big = (1/N) Σ_r g_r, so
with b_r samples on rank r and h = (1/N) Σ_r 1/b_r,

    E mean_r |g_r|² = |G|² + h·tr S,    E |g_big|² = |G|² + (h/N)·tr S,

which are the two-batch equations with B_small = 1/h (the harmonic mean of the b_r) and
B_big = N/h. Each rank passes its own b_r to :meth:`GradientNoiseScale.step`; with equal
b_r this is B_small = b, B_big = N·b as above, exactly.

Uneven inputs with ``DDP.join()``: put the noise scale after the model,
``with Join([ddp_model, gns]):``. A rank out of data then shadows each step of the others
(DDP's join hook runs the comm hook on zero buckets, which is dropped); a step of n < N ranks
uses those n: the buckets then hold (n/N) times their mean gradient (the hook divides by N, as
DDP's own does), which is undone, and N becomes n in the formulas. With one rank left there is
one batch size and no estimate: no row.

Usage (every rank)::

    gns = GradientNoiseScale(batch_size=b)
    ddp_model.register_comm_hook(gns, gns_hook)
    for x, y in loader:
        loss_fn(ddp_model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        row = gns.step()  # one all-reduce of 3 floats; row["noise_scale"], row["noise_scale_se"]
"""

# No `from __future__ import annotations` here: DDP's register_comm_hook compares the hook's
# annotations with dist.GradBucket and Future[Tensor] as objects and rejects strings.

import math
import warnings
from collections import deque
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from sgn_lab import checks

HISTORY_COLUMNS = (
    "step",
    "local_sq_norm",
    "global_sq_norm",
    "sq_norm_estimate",
    "trace_estimate",
    "sq_norm_smoothed",
    "trace_smoothed",
    "noise_scale",
    "noise_scale_se",
    "sq_norm_nonpositive",
)
"""Columns of :attr:`GradientNoiseScale.history` rows, in order. ``step`` counts the recorded
steps from 0 (a :meth:`GradientNoiseScale.step` call without a synchronised backward records
none); ``local_sq_norm`` is the mean over ranks of |g_r|², ``global_sq_norm`` = |g_big|²."""


def two_batch_estimates(
    small_sq_norm: float, big_sq_norm: float, small_batch: float, big_batch: float
) -> tuple[float, float]:
    """Unbiased (|G|², tr S) from the squared norms |g_small|², |g_big|² of mean gradients over
    ``small_batch`` < ``big_batch`` samples (McCandlish et al. 2018, Appendix A)."""
    if not 0 < small_batch < big_batch:
        raise ValueError(
            f"need 0 < small_batch < big_batch, got small_batch={small_batch}, "
            f"big_batch={big_batch}"
        )
    sq_norm = (big_batch * big_sq_norm - small_batch * small_sq_norm) / (big_batch - small_batch)
    trace = (small_sq_norm - big_sq_norm) / (1.0 / small_batch - 1.0 / big_batch)
    return sq_norm, trace


def ema_effective_samples(smoothing: float, updates: int) -> float:
    """n_eff = 1/Σ w_i² of the bias-corrected EMA's weights after ``updates`` values.

    The weights are w_i = (1−β) β^(t−i) / (1−β^t), i = 1..t; summing the geometric series,
    n_eff = (1+β)(1−β^t) / ((1−β)(1+β^t)): 1 at t = 1, (1+β)/(1−β) as t → ∞. For independent
    values of variance σ², the smoothed value has variance σ²/n_eff.
    """
    beta, t = smoothing, updates
    return (1 + beta) * (1 - beta**t) / ((1 - beta) * (1 + beta**t))


class NoiseScaleTracker:
    """Per-step estimates → smoothed |G|², tr S, B_simple and its error bar (no communication).

    Smoothing: bias-corrected exponential moving averages (Kingma & Ba 2015, §3) of the finite
    per-step estimates, m_t = β m_{t−1} + (1−β) x_t, smoothed = m_t/(1−β^t), β = ``smoothing``
    (0: no smoothing). B_simple = trace_smoothed / sq_norm_smoothed; when sq_norm_smoothed ≤ 0
    the ratio means nothing: ``noise_scale`` is NaN and ``sq_norm_nonpositive`` True.
    Non-finite estimates (an overflowing step) are recorded but not averaged.

    Error bar (delta method): with R = B_simple and x_t, y_t the |G|² and tr S estimates of
    the last ``window`` finite steps, Var(ỹ/x̃) ≈ Var(ỹ − R x̃)/x̃² to first order, and the
    smoothed values have the per-step variance over n_eff (:func:`ema_effective_samples`) if
    the steps are independent. So

        noise_scale_se = sqrt(s²(y_t − R·x_t) / n_eff) / sq_norm_smoothed,

    s² the sample variance (1/(W−1)) over the window; NaN until two steps are in the window.
    During training the window's spread also holds the drift of |G|² and tr S over the window,
    which widens the error bar; the EMA's lag behind a drifting value is not part of it.
    """

    def __init__(self, *, smoothing: float = 0.95, window: int = 100) -> None:
        self.smoothing = checks.coefficient("smoothing", smoothing)
        self.window = checks.integer("window", window, 2)
        self.history: list[dict[str, Any]] = []
        self._sums = [0.0, 0.0]  # uncorrected EMAs of the |G|² and tr S estimates
        self._updates = 0
        self._recent: deque[tuple[float, float]] = deque(maxlen=self.window)

    def update(
        self, local_sq_norm: float, global_sq_norm: float, small_batch: float, big_batch: float
    ) -> dict[str, Any]:
        """Add one step: mean local |g_small|², global |g_big|² and their batch sizes. Returns
        the step's history row (also appended to :attr:`history`)."""
        sq_norm, trace = two_batch_estimates(local_sq_norm, global_sq_norm, small_batch, big_batch)
        if math.isfinite(sq_norm) and math.isfinite(trace):
            beta = self.smoothing
            self._sums = [beta * s + (1 - beta) * x
                          for s, x in zip(self._sums, (sq_norm, trace), strict=True)]
            self._updates += 1
            self._recent.append((sq_norm, trace))
        row = {
            "step": len(self.history),
            "local_sq_norm": local_sq_norm,
            "global_sq_norm": global_sq_norm,
            "sq_norm_estimate": sq_norm,
            "trace_estimate": trace,
            **self._smoothed(),
        }
        self.history.append(row)
        return row

    def _smoothed(self) -> dict[str, Any]:
        """The smoothed columns of a history row from the current averages and window."""
        if self._updates == 0:
            nan = math.nan
            return {"sq_norm_smoothed": nan, "trace_smoothed": nan, "noise_scale": nan,
                    "noise_scale_se": nan, "sq_norm_nonpositive": False}
        correction = 1 - self.smoothing**self._updates
        sq_norm, trace = (s / correction for s in self._sums)
        nonpositive = not sq_norm > 0
        ratio = math.nan if nonpositive else trace / sq_norm
        return {
            "sq_norm_smoothed": sq_norm,
            "trace_smoothed": trace,
            "noise_scale": ratio,
            "noise_scale_se": math.nan if nonpositive else self._ratio_se(ratio, sq_norm),
            "sq_norm_nonpositive": nonpositive,
        }

    def _ratio_se(self, ratio: float, sq_norm: float) -> float:
        """Delta-method standard error of B_simple (see the class docstring)."""
        if len(self._recent) < 2:
            return math.nan
        residuals = torch.tensor([y - ratio * x for x, y in self._recent], dtype=torch.float64)
        variance = float(residuals.var(correction=1))
        n_eff = ema_effective_samples(self.smoothing, self._updates)
        return math.sqrt(variance / n_eff) / sq_norm

    def frame(self) -> pd.DataFrame:
        """:attr:`history` as a table, one row per step."""
        return pd.DataFrame(self.history, columns=list(HISTORY_COLUMNS))

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue with the same numbers."""
        return {"history": [dict(row) for row in self.history], "sums": list(self._sums),
                "updates": self._updates, "recent": list(self._recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state["history"]]
        self._sums = list(state["sums"])
        self._updates = int(state["updates"])
        self._recent = deque((tuple(pair) for pair in state["recent"]), maxlen=self.window)


class GradientNoiseScale(Joinable):
    """State of :func:`gns_hook`: gradient norms around DDP's all-reduce, one row per step.

    Parameters
    ----------
    batch_size
        b, the samples each rank contributes to one optimizer step (with ``no_sync``
        accumulation over K micro-batches: K·b; see the module docstring). Ranks may use
        different b (each its own; module docstring).
    smoothing, window
        EMA coefficient β in [0, 1) and the number of recent steps behind the error bar
        (:class:`NoiseScaleTracker`).
    process_group
        The group DDP reduces over (None: the default group); it needs at least two ranks.
    scaler
        The ``torch.amp.GradScaler`` that scales the loss, if any: its scale s at each
        synchronised backward pass divides the squared norms by s² (module docstring).

    Step ends: the hook only records each bucket's local and global squared norms, keyed by the
    bucket's index; :meth:`step`, called on every rank once per optimizer step (after
    ``optimizer.step()``), closes the step. An explicit call is the robust choice: DDP's
    bucket count and order change (bucket rebuild after the first iteration, unused
    parameters), ``no_sync`` backward passes run no hook at all, and the extra all-reduce is a
    collective every rank must issue equally often, which a hook (whose callbacks run on the
    communication threads) cannot guarantee. Before :meth:`step` returns, DDP has waited for
    every bucket's future, so all norms are in. A bucket index seen twice means a second
    synchronised backward since the last step: only the latest pass is kept (with a warning,
    since a backward on top of an already reduced ``.grad`` is no minibatch gradient).
    """

    # Whether the global norms were recorded while the gradients carried the scaler's scale.
    _global_scaled = True

    def __init__(
        self,
        batch_size: int,
        *,
        smoothing: float = 0.95,
        window: int = 100,
        process_group: dist.ProcessGroup | None = None,
        scaler: Any = None,
    ) -> None:
        super().__init__()
        self.batch_size = checks.integer("batch_size", batch_size, 1)
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got "
                            f"{type(scaler).__name__}")
        self.scaler = scaler
        self._scale = 1.0  # the scaler's scale during this step's synchronised backward
        self.tracker = NoiseScaleTracker(smoothing=smoothing, window=window)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call init_process_group before "
                "creating GradientNoiseScale"
            )
        self.process_group = process_group
        self.world_size = checks.integer("world size", dist.get_world_size(process_group), 2)
        self._local: dict[int, Tensor] = {}  # bucket index -> local |bucket|² (this pass)
        self._global: dict[int, Tensor] = {}  # bucket index -> |all-reduced bucket|²
        self._passes = 0  # synchronised backward passes since the last step()
        self._device: torch.device | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per recorded step, with the keys :data:`HISTORY_COLUMNS`."""
        return self.tracker.history

    def frame(self) -> pd.DataFrame:
        """:attr:`history` as a pandas DataFrame."""
        return self.tracker.frame()

    @property
    def noise_scale(self) -> float:
        """The latest smoothed B_simple (NaN before the first step)."""
        return self.history[-1]["noise_scale"] if self.history else math.nan

    @property
    def noise_scale_se(self) -> float:
        """The latest standard error of :attr:`noise_scale`."""
        return self.history[-1]["noise_scale_se"] if self.history else math.nan

    def record_local(self, index: int, buffer: Tensor,
                     lengths: list[int] | None = None) -> None:
        """Called by the hook before the all-reduce: the squared norms of the bucket's
        gradients (``lengths``: their sizes in the buffer, in order; None: one piece)."""
        if index in self._local:  # every bucket is reduced once per pass: a new pass began
            self._local.clear()
            self._global.clear()
        if not self._local:
            self._passes += 1
            if self.scaler is not None and self.scaler.is_enabled():
                self._scale = float(self.scaler.get_scale())  # before update() changes it
        self._device = buffer.device
        self._local[index] = _sq_norms(buffer, lengths)

    def record_global(self, index: int, buffer: Tensor,
                      lengths: list[int] | None = None) -> None:
        """Called by the hook once the bucket's mean over ranks has arrived."""
        # One dict entry per bucket: callbacks may run concurrently on the backend's threads,
        # and an item assignment is atomic where `total += x` is not.
        self._global[index] = _sq_norms(buffer, lengths)

    def step(self, batch_size: int | None = None) -> dict[str, Any] | None:
        """Close the step on every rank: one all-reduce of 7 floats, then the estimates.

        ``batch_size`` overrides the constructor's b for this step: this rank's samples (a
        short last batch; ranks may differ, see the module docstring). Returns the new history
        row, identical on all ranks, or None when no rank ran a synchronised backward since the
        last call, or (under ``Join``) fewer than two ranks did (nothing is recorded).
        """
        b = self.batch_size if batch_size is None else checks.integer("batch_size", batch_size, 1)
        if self._join_config.enable and self._join_config.is_first_joinable:
            raise ValueError("GradientNoiseScale must come after the DDP model in Join: "
                             "Join([ddp_model, gns]), so that its step follows the backward "
                             "pass on the ranks that have joined too")
        Join.notify_join_context(self)
        if self._passes > 1:
            warnings.warn(
                f"{self._passes} synchronised backward passes since the last step(); the noise "
                "scale uses the last one and assumes it started from zeroed gradients",
                RuntimeWarning,
                stacklevel=2,
            )
        payload = torch.zeros(7, dtype=torch.float64, device=self._collective_device())
        if self._local:
            unscale = 1.0 / (self._scale * self._scale)
            payload[0] = _total(self._local.values()) * unscale
            payload[1] = _total(self._global.values()) * (unscale if self._global_scaled
                                                           else 1.0)
            payload[2:6] = torch.tensor([1.0, b, b * b, 1.0 / b], dtype=torch.float64)
        return self._close(payload)

    def _close(self, payload: Tensor) -> dict[str, Any] | None:
        """The step's all-reduce and its row, on a rank that stepped or (``payload[6]`` = 1)
        one that has joined and shadows the step."""
        self._local.clear()
        self._global.clear()
        self._passes = 0
        # Summing the global norms too (identical on every rank) makes every rank's history
        # bitwise the same, so decisions taken from it agree across ranks.
        dist.all_reduce(payload, group=self.process_group)
        local_sum, global_sum, synced, batches, squares, inverses, joined = payload.tolist()
        if synced == 0:
            return None
        if synced + joined != self.world_size:
            raise RuntimeError(
                f"only {synced:.0f} of {self.world_size} ranks ran a synchronised backward "
                "since the last step()"
            )
        if synced < 2:  # the other ranks have joined: one batch size, no estimate
            return None
        n = synced
        # The hook divides by all N ranks, and a joined rank adds zeros: the bucket holds
        # (n/N)·(the mean of the n ranks' gradients).
        rescale = (self.world_size / n) ** 2
        # Equal batches (n·Σb² = (Σb)², exact in float64 for integers): B_small = b exactly;
        # else the harmonic mean of the ranks' batches.
        small = batches / n if n * squares == batches * batches else n / inverses
        return self.tracker.update(local_sum / n, self._global_norm(global_sum, n) * rescale,
                                   small, n * small)

    def _global_norm(self, summed: float, ranks: float) -> float:
        """|ḡ|² from the all-reduced sum of the ranks' global norms: each rank recorded the
        whole averaged gradient's."""
        return summed / ranks

    def join_hook(self, **kwargs: Any) -> JoinHook:
        """Under ``Join([ddp_model, gns])``: a rank out of data shadows :meth:`step`."""
        return _ShadowStep(self)

    @property
    def join_device(self) -> torch.device:
        return self._collective_device()

    @property
    def join_process_group(self) -> Any:
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _collective_device(self) -> torch.device:
        """Where the step's all-reduce runs: the buckets' device (NCCL needs CUDA tensors)."""
        if self._device is not None:
            return self._device
        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


class _ShadowStep(JoinHook):
    """A joined rank's part of each step of the others: DDP's join hook has run the comm hook
    on zero buckets (their records are dropped); this rank adds nothing but its joined flag,
    and gets the same row."""

    def __init__(self, gns: GradientNoiseScale) -> None:
        self.gns = gns

    def main_hook(self) -> None:
        payload = torch.zeros(7, dtype=torch.float64, device=self.gns._collective_device())
        payload[6] = 1.0
        self.gns._close(payload)


def gns_hook(state: GradientNoiseScale, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: the mean all-reduce of ``allreduce_hook``, plus the bucket's
    squared norm before (local gradient) and after (global mean gradient) it.

    Register with ``ddp_model.register_comm_hook(state, gns_hook)``; the gradients DDP leaves
    in ``.grad`` are the same as without the hook.
    """
    index, buffer = bucket.index(), bucket.buffer()
    lengths = [g.numel() for g in bucket.gradients()]
    # Before anything touches the buffer: with gradient_as_bucket_view it is the .grad storage.
    state.record_local(index, buffer, lengths)
    buffer.div_(state.world_size)  # divide first, as allreduce_hook does (no fp16 overflow)
    future = dist.all_reduce(buffer, group=state.process_group, async_op=True).get_future()

    def record_global(done: torch.futures.Future[list[Tensor]]) -> Tensor:
        mean = done.value()[0]
        state.record_global(index, mean, lengths)
        return mean

    return future.then(record_global)


def _sq_norms(buffer: Tensor, lengths: list[int] | None) -> Tensor:
    """|piece|² of each gradient in the buffer, float64, on its device, without a host sync.

    Per gradient rather than per bucket: DDP lays its buckets out anew after the first step
    and in a resumed run, and a norm of the whole bucket would round differently with the
    layout. Half-precision gradients are reduced in float32; float32 and float64 in their
    own dtype (no float64 copy of a whole bucket).
    """
    if lengths is None or sum(lengths) != buffer.numel():
        lengths = [buffer.numel()]
    low = buffer.dtype in (torch.float16, torch.bfloat16)
    norms = [torch.linalg.vector_norm(piece, dtype=torch.float32 if low else None)
             for piece in buffer.reshape(-1).split(lengths)]
    return torch.stack(norms).to(torch.float64).square()


def _total(parts) -> Tensor:
    """Σ of the per-gradient squared norms in an order of their values, not of the buckets,
    so that the same gradients give the same bits whatever the bucket layout."""
    values = torch.cat(list(parts))
    return torch.sort(values).values.sum()
