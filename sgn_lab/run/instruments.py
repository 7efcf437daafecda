"""Instruments: each family of measured quantities, one class that owns its options.

An instrument is a small frozen dataclass whose fields are its options (``Updates(repeats)``,
``MinibatchTails(batch_sizes, draws)``, ``Curvature(n_probes, max_iter)``,
``Layers(groups)``), with a ``name``, a flag ``needs_grads`` (whether it needs the (n, d)
per-sample gradients, else the Gram path serves) and a call ``instrument(measurement) -> dict``
of table columns; it may add spectra with ``measurement.add_spectrum(kind, eigenvalues)``. The
:class:`Measurement` it receives computes what instruments share — the probe batch, its
per-sample gradients or Gram, the noise statistics — once, on first use.

:data:`INSTRUMENTS` holds the built-ins at their default options, by name;
:func:`configured` builds one with the options a run's settings give it (:data:`OPTIONS`: the
config's ``update_repeats`` is ``Updates.repeats``, ...), which is how
:class:`~sgn_lab.NoiseProbe` builds the instruments it is given by name.

=========== ===================================================================== =========
name        columns                                                               needs G
=========== ===================================================================== =========
eval        train_loss, train_accuracy; val_loss, val_accuracy (with a            no
            validation set); test_loss, test_accuracy (with a test set)
sgn         every :class:`~sgn_lab.NoiseStats` scalar (trace, noise_scale with     no
            its error, effective_rank, ...); spectra ``sgn`` and ``isotropic``
tails       tail_index, normality_pvalue, normality_reject_fraction, kurtosis     no [1]
            of the per-sample noise (batch 1)
minibatch-  the same four at each minibatch size B of ``batch_sizes``, of the      no [1]
tails       noise g_B − ḡ (``tail_index_b16``, ...)
curvature   hessian_top_eigenvalue, hessian_trace, trace_hs, curvature_alignment  yes
updates     update_trace, update_effective_rank, update_mean_sq_norm; spectrum    no
            ``update`` (per-step update noise over R minibatch draws)
layers      noise_scale_layernorm (with _se), trace_layernorm,                    no
            grad_sq_norm_layernorm, trace_fraction_layernorm; the table ``layers``
            (B_simple per parameter, module, group, total) [2]
=========== ===================================================================== =========

[1] With the Gram path, from the per-sample gradients of the first ``shape_samples`` probe
samples (computed once for both).
[2] :func:`sgn_lab.layer_noise_scale` of the probe batch, written to ``layers.csv``; with the
Gram path from the per-parameter Grams of the pass the ``sgn`` instrument shares
(``Measurement.gram``), with vmap, and over several processes, from the shared per-sample
gradients (gathered from the ranks).

A user's instrument is written the same way (any object with ``name``, ``needs_grads`` and
that call; its options its own), passed to :class:`~sgn_lab.NoiseProbe` in ``instruments``.

Over several processes (the probe's ``ranks``), the shared results are assembled across them
and are the same on every rank, so every instrument runs unchanged on each: the noise
statistics from the Gram of rank blocks (:func:`sgn_lab.distributed.split_gram`), the
per-sample gradients (vmap) gathered from the ranks' blocks, the evaluation passes split.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from sgn_lab import checks
from sgn_lab.distributed.gram_over_ranks import split_gram
from sgn_lab.grads import GramCoverage, GramResult, gram_result
from sgn_lab.grads.common import flatten_grads, seeded
from sgn_lab.grads.vmap import per_sample_grads
from sgn_lab.optim import train_step
from sgn_lab.seeds import Purpose, derive, seed_for
from sgn_lab.stats.curvature import curvature_stats
from sgn_lab.stats.layers import LAYERNORM, layer_noise_scale
from sgn_lab.stats.noise import NoiseStats, noise_stats, per_coordinate
from sgn_lab.stats.tails import minibatch_noise_shape, shape_stats

if TYPE_CHECKING:
    from sgn_lab.run.probe import NoiseProbe

SPECTRUM_KINDS = ("sgn", "isotropic", "update")
LossFn = Callable[[Tensor, Tensor], Tensor]


class Instrument(Protocol):
    name: str
    needs_grads: bool

    def __call__(self, measurement: Measurement) -> dict[str, Any]: ...


class Measurement:
    """One measurement: the probe batch, and what the instruments share, computed on demand.

    The shared things an instrument reads: ``step``, ``epoch``, :meth:`seed`; the model and
    its loss (``model``, ``loss_fn``); the probe batch ``x``, ``y``; the per-sample gradients
    (:attr:`grads`), the Gram pass (:attr:`gram`), the noise statistics (:attr:`noise`) and
    the gradients for the noise's shape (:attr:`shape_grads`), each computed once; how they
    are taken (``path``: ``"vmap"`` or ``"gram"``, ``chunk_size``, ``ranks``); and the probe
    itself (``probe``) for its data (``x_train``, ``x_val``, ``x_test``, :meth:`evaluate
    <sgn_lab.run.probe.NoiseProbe.evaluate>`) and the training's ``optimizer``, ``method`` and
    ``batch_size``. An instrument's own options are its own attributes.
    """

    def __init__(self, probe: NoiseProbe, step: int, epoch: float, model: nn.Module) -> None:
        self.probe, self.step, self.epoch = probe, step, epoch
        self.model, self.loss_fn = model, probe.loss_fn  # model: the module to measure
        self.path, self.chunk_size, self.ranks = probe.grads, probe.chunk_size, probe.ranks
        self.device = next(model.parameters()).device
        idx = probe.probe_indices(step)
        self.x = probe.x_train[idx].to(self.device)
        self.y = probe.y_train[idx].to(self.device)
        self.spectra: list[pd.DataFrame] = []
        self.coverage: GramCoverage | None = None
        self.layers: pd.DataFrame | None = None  # the layers instrument's table

    def seed(self, purpose: Purpose) -> int:
        return seed_for(self.probe.seed, self.step, purpose)

    def _per_sample(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return per_sample_grads(self.model, self.loss_fn, x, y, chunk_size=self.chunk_size,
                                batchnorm=self.probe.batchnorm, seed=self.seed(Purpose.GRADS),
                                verify=self.probe.grads_verify)

    @cached_property
    def local_grads(self) -> dict[str, Tensor]:
        """Per-sample gradients (vmap) of this rank's block of the probe batch (all of it in
        one process)."""
        block = self.ranks.shard(len(self.y))
        return self._per_sample(self.x[block], self.y[block])

    @cached_property
    def grads(self) -> dict[str, Tensor] | None:
        """Per-sample gradients (vmap) of the whole probe batch. Over several processes they
        are gathered on rank 0 alone (None on the others, which send their blocks): what
        needs them runs there (:meth:`Ranks.once`) and its result reaches every rank."""
        if not self.ranks.distributed:
            return self.local_grads
        gathered = {name: self.ranks.gather_rows_to_root(g, kind="gradients")
                    for name, g in self.local_grads.items()}
        return gathered if self.ranks.is_root else None

    @cached_property
    def noise(self) -> NoiseStats:
        """SGN statistics of the probe batch, by the probe's path (vmap or Gram)."""
        p = self.probe
        minibatch = {"batch_size": p.batch_size, "dataset_size": len(p.x_train),
                     "seed": self.seed(Purpose.STATS)}
        if self.path == "vmap" and not self.ranks.distributed:
            return noise_stats(self.grads, shape=False, **minibatch)
        if self.ranks.distributed:
            block_grads = self.local_grads if self.path == "vmap" else None
            with seeded(self.seed(Purpose.GRADS), self.device):
                split = split_gram(self.model, self.loss_fn, self.x, self.y, self.ranks,
                                   grads=self.path, batchnorm=p.batchnorm,
                                   chunk_size=self.chunk_size, verify=p.take_verify(),
                                   block_grads=block_grads)
            self.coverage = split.coverage

            def spectrum() -> NoiseStats:  # the n × n eigendecompositions, on rank 0 alone
                stats = noise_stats(gram=split.gram, dim=split.mean.numel(), mean=split.mean,
                                    diag_variance=split.diag_variance, **minibatch)
                # d numbers each, which every rank holds already (all-reduced): not sent.
                return dataclasses.replace(stats, mean=None, diag_variance=None)

            return dataclasses.replace(self.ranks.once(spectrum),
                                       mean=per_coordinate(split.mean),
                                       diag_variance=per_coordinate(split.diag_variance))
        mean = self.gram.mean
        assert mean is not None
        return noise_stats(gram=self.gram.gram, dim=mean.numel(), mean=mean, **minibatch)

    @cached_property
    def gram(self) -> GramResult:
        """The Gram path's one pass over the probe batch in this process: the Gram, the mean
        gradient and, with the layers instrument on, every parameter's own Gram."""
        p = self.probe
        per_parameter = any(i.name == "layers" for i in p.instruments)
        with seeded(self.seed(Purpose.GRADS), self.device):
            result = gram_result(self.model, self.loss_fn, self.x, self.y, with_mean=True,
                                 per_parameter=per_parameter, batchnorm=p.batchnorm,
                                 chunk_size=self.chunk_size, verify=p.take_verify())
        self.coverage = result.coverage
        return result

    @cached_property
    def shape_grads(self) -> Tensor | None:
        """(n', d) float64 per-sample gradients for the shape of the noise: all n with vmap,
        the first ``shape_samples`` probe samples' on the Gram path; None below 8 samples.
        Over several processes: on rank 0 alone (None on the others; see :attr:`grads`)."""
        if self.path == "vmap":
            grads = self.grads  # collective over several processes
            if grads is None:
                return None
            G = flatten_grads(grads)
            return G.to(torch.float64) if len(G) >= 8 else None
        count = min(len(self.x), self.probe.shape_samples)
        if count < 8 or not self.ranks.is_root:
            return None
        return flatten_grads(self._per_sample(self.x[:count], self.y[:count])).to(torch.float64)

    def add_spectrum(self, kind: str, eigenvalues: Tensor) -> None:
        self.spectra.append(pd.DataFrame({
            "step": self.step, "kind": kind, "k": np.arange(1, eigenvalues.numel() + 1),
            "eigenvalue": eigenvalues.detach().double().cpu().numpy()}))


@dataclass(frozen=True)
class Eval:
    """Mean loss and accuracy (NaN for regression, per token for token sequences;
    :meth:`~sgn_lab.run.probe.NoiseProbe.evaluate`) on the training set and, when the probe
    has them, the validation set (``val_*``) and the test set (``test_*``)."""

    name = "eval"
    needs_grads = False

    def __call__(self, m: Measurement) -> dict[str, Any]:
        p = m.probe
        row = {}
        row["train_loss"], row["train_accuracy"] = p.evaluate(p.x_train, p.y_train)
        if p.x_val is not None and p.y_val is not None:
            row["val_loss"], row["val_accuracy"] = p.evaluate(p.x_val, p.y_val)
        if p.x_test is not None and p.y_test is not None:
            row["test_loss"], row["test_accuracy"] = p.evaluate(p.x_test, p.y_test)
        return row


@dataclass(frozen=True)
class SGN:
    """The noise statistics of :func:`sgn_lab.noise_stats` and the two spectra."""

    name = "sgn"
    needs_grads = False

    def __call__(self, m: Measurement) -> dict[str, Any]:
        stats = m.noise
        m.add_spectrum("sgn", stats.eigenvalues)
        m.add_spectrum("isotropic", stats.isotropic_eigenvalues)
        row = stats.to_dict()
        for key in TAIL_COLUMNS:  # the tails instrument's
            row.pop(key, None)
        return row


TAIL_COLUMNS = ("tail_index", "normality_pvalue", "normality_reject_fraction", "kurtosis")
"""The tails instrument's columns (:func:`sgn_lab.shape_stats`)."""


@dataclass(frozen=True)
class Tails:
    """Tail index and Gaussianity of the per-sample noise (:func:`sgn_lab.shape_stats`)."""

    name = "tails"
    needs_grads = False

    def __call__(self, m: Measurement) -> dict[str, Any]:
        noiseless = m.path == "vmap" and not m.noise.trace > 0
        G = m.shape_grads  # the collectives first: the rest runs on rank 0 alone
        seed = m.seed(Purpose.STATS if m.path == "vmap" else Purpose.GRADS)

        def row() -> dict[str, Any]:
            if G is None or noiseless:
                return dict.fromkeys(TAIL_COLUMNS, math.nan)
            centred = G - G.mean(dim=0)  # centred as noise_stats centres them
            if not bool(centred.abs().max() > 0):
                return dict.fromkeys(TAIL_COLUMNS, math.nan)
            return shape_stats(centred, seed=seed).to_dict()

        return m.ranks.once(row)


@dataclass(frozen=True)
class MinibatchTails:
    """Tail index and Gaussianity of the minibatch noise g_B − ḡ at each minibatch size of
    ``batch_sizes``, over ``draws`` minibatches of each (:func:`sgn_lab.minibatch_noise_shape`):
    columns ``tail_index_b16`` and so on; a B not below the per-sample gradients available is
    NaN."""

    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    draws: int = 256
    name = "minibatch-tails"
    needs_grads = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_sizes", tuple(
            checks.integer("batch_sizes", b, 1) for b in self.batch_sizes))
        checks.integer("draws", self.draws, 8)

    def __call__(self, m: Measurement) -> dict[str, Any]:
        G = m.shape_grads  # collective over several processes; the rest on rank 0 alone
        seed = m.seed(Purpose.STATS)

        def computed() -> dict[str, Any]:
            sizes = [b for b in self.batch_sizes if G is not None and b < len(G)]
            row = {f"{column}_b{b}": math.nan for b in self.batch_sizes
                   for column in TAIL_COLUMNS}
            if not sizes or not bool((G != G[:1]).any()):  # all rows equal: no noise
                return row
            table = minibatch_noise_shape(G, sizes, draws=self.draws, seed=seed)
            for record in table.to_dict("records"):
                for column in TAIL_COLUMNS:
                    row[f"{column}_b{record['batch_size']}"] = record[column]
            return row

        return m.ranks.once(computed)


@dataclass(frozen=True)
class Curvature:
    """λ_max(H), tr H, tr(HS) and the alignment ratio (:func:`sgn_lab.curvature_stats`, with
    ``n_probes`` Hutchinson probes and ``max_iter`` power iterations)."""

    n_probes: int = 64
    max_iter: int = 100
    name = "curvature"
    needs_grads = True

    def __post_init__(self) -> None:
        checks.integer("n_probes", self.n_probes, 1)
        checks.integer("max_iter", self.max_iter, 1)

    def __call__(self, m: Measurement) -> dict[str, Any]:
        grads = m.grads  # collective over several processes; the rest on rank 0 alone
        return m.ranks.once(lambda: curvature_stats(
            m.model, m.loss_fn, m.x, m.y, flatten_grads(grads), n_probes=self.n_probes,
            max_iter=self.max_iter, seed=m.seed(Purpose.CURVATURE), chunk_size=m.chunk_size
        ).to_dict())


@dataclass(frozen=True)
class Updates:
    """The per-step update noise: ``repeats`` R >= 2 one-step copies of the probe's (model,
    optimizer), each on its own minibatch of the probe's ``batch_size`` (:func:`update_noise`)."""

    repeats: int = 32
    name = "updates"
    needs_grads = False

    def __post_init__(self) -> None:
        checks.integer("repeats", self.repeats, 2)

    def __call__(self, m: Measurement) -> dict[str, Any]:
        p = m.probe
        updates = update_noise(m.model, p.optimizer, p.method, m.loss_fn, p.x_train,
                               p.y_train, batch_size=p.batch_size, repeats=self.repeats,
                               seed=m.seed(Purpose.UPDATES))
        stats = noise_stats(updates, shape=False)
        m.add_spectrum("update", stats.eigenvalues)
        return {"update_trace": stats.trace, "update_effective_rank": stats.effective_rank,
                "update_mean_sq_norm": stats.mean_sq_norm}


@dataclass(frozen=True)
class Layers:
    """B_simple, tr S and |G|² with their errors per parameter tensor, module, the
    ``layernorm`` group, the ``groups`` of one's own (group name -> parameter names) and in
    total (:func:`sgn_lab.layer_noise_scale`).

    The table (with a ``step`` column) is ``measurement.layers``, which the probe returns as
    :attr:`~sgn_lab.run.probe.ProbeResult.layers` and a run writes to ``layers.csv``; the row
    gets the ``layernorm`` group's columns (NaN for a model without norm layers).
    """

    groups: Mapping[str, Sequence[str]] | None = None
    name = "layers"
    needs_grads = False

    def __call__(self, m: Measurement) -> dict[str, Any]:
        if m.path == "vmap" or m.ranks.distributed:
            # Over several processes: the per-sample gradients gathered on rank 0, the table
            # computed there and sent to every rank.
            grads = m.grads
            table = m.ranks.once(lambda: layer_noise_scale(grads, model=m.model,
                                                           groups=self.groups))
        else:  # the pass the sgn instrument shares
            assert m.gram.parameter_grams is not None
            table = layer_noise_scale(grams=m.gram.parameter_grams, model=m.model,
                                      groups=self.groups)
        table.insert(0, "step", m.step)
        m.layers = table
        group = table[(table["kind"] == "group") & (table["name"] == LAYERNORM)]
        return {name: float(group[column].iloc[0]) if len(group) else math.nan
                for column, name in LAYER_ROW_COLUMNS.items()}


LAYER_ROW_COLUMNS = {"noise_scale": "noise_scale_layernorm",
                     "noise_scale_se": "noise_scale_layernorm_se",
                     "trace": "trace_layernorm", "grad_sq_norm": "grad_sq_norm_layernorm",
                     "trace_fraction": "trace_fraction_layernorm"}
"""The layers instrument's columns: the layernorm group's figures under these names."""


# The built-in instruments by name, with their default options, in the order their columns
# appear in a row (:data:`sgn_lab.run.choices.INSTRUMENT_NAMES`).
INSTRUMENTS: dict[str, Instrument] = {i.name: i for i in (Eval(), SGN(), Tails(), MinibatchTails(),
                                                          Curvature(), Updates(), Layers())}

OPTIONS: dict[str, dict[str, str]] = {
    "minibatch-tails": {"shape_batch_sizes": "batch_sizes", "shape_draws": "draws"},
    "updates": {"update_repeats": "repeats"},
}
"""The settings of a run (its config's probe keys, :class:`~sgn_lab.run.probe.NoiseProbe`'s
keyword arguments) that are a built-in instrument's options: setting -> option."""


def configured(name: str, settings: Mapping[str, Any]) -> Instrument:
    """The built-in instrument ``name`` with the options that ``settings`` (flat names, as
    :data:`OPTIONS` maps them) give it; the others at their defaults."""
    if name not in INSTRUMENTS:
        raise ValueError(f"unknown instrument {name!r}; choose from {', '.join(INSTRUMENTS)}")
    options = {option: settings[key] for key, option in OPTIONS.get(name, {}).items()
               if key in settings}
    return dataclasses.replace(INSTRUMENTS[name], **options)


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
    device = next(model.parameters()).device
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    rows = []
    for r in range(repeats):
        replica_seed = derive(seed, r)
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
