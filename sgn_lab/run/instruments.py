"""Instruments: each family of measured quantities, switched on by name.

An instrument is a name and a call ``instrument(measurement) -> dict`` of table columns; it
may add spectra with ``measurement.add_spectrum(kind, eigenvalues)``, and says whether it
needs the (n, d) per-sample gradients (``needs_grads``, else the Gram path serves). The
:class:`Measurement` it receives computes what instruments share — the probe batch, its
per-sample gradients or Gram, the noise statistics — once, on first use.

=========== ===================================================================== =========
name        columns                                                               needs G
=========== ===================================================================== =========
eval        train_loss, train_accuracy; val_loss, val_accuracy (with a            no
            validation set); test_loss, test_accuracy (with a test set)
sgn         every :class:`~sgn_lab.NoiseStats` scalar (trace, noise_scale with     no
            its error, effective_rank, ...); spectra ``sgn`` and ``isotropic``
tails       tail_index, normality_pvalue, normality_reject_fraction, kurtosis     no [1]
            of the per-sample noise (batch 1)
minibatch-  the same four at each minibatch size B of ``shape_batch_sizes``, of   no [1]
tails       the noise g_B − ḡ (``tail_index_b16``, ...)
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

A user's instrument is any object with ``name``, ``needs_grads`` and that call, passed to
:class:`~sgn_lab.NoiseProbe` in ``instruments``.

Over several processes (the probe's ``ranks``), the shared results are assembled across them
and are the same on every rank, so every instrument runs unchanged on each: the noise
statistics from the Gram of rank blocks (:func:`sgn_lab.distributed.split_gram`), the
per-sample gradients (vmap) gathered from the ranks' blocks, the evaluation passes split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from sgn_lab.distributed.gram_over_ranks import split_gram
from sgn_lab.grads import GramCoverage, GramResult, gram_result
from sgn_lab.grads.vmap import _seeded, flatten_grads, per_sample_grads
from sgn_lab.seeds import Purpose, seed_for
from sgn_lab.stats.curvature import curvature_stats
from sgn_lab.stats.noise import NoiseStats, noise_stats
from sgn_lab.stats.tails import minibatch_noise_shape, shape_stats

if TYPE_CHECKING:
    from sgn_lab.run.probe import NoiseProbe

SPECTRUM_KINDS = ("sgn", "isotropic", "update")


class Instrument(Protocol):
    name: str
    needs_grads: bool

    def __call__(self, measurement: Measurement) -> dict[str, Any]: ...


class Measurement:
    """One measurement: the probe batch, and what the instruments share, computed on demand."""

    def __init__(self, probe: NoiseProbe, step: int, epoch: float) -> None:
        self.probe, self.step, self.epoch = probe, step, epoch
        self.device = next(probe.model.parameters()).device
        idx = probe.probe_indices(step)
        self.x = probe.x_train[idx].to(self.device)
        self.y = probe.y_train[idx].to(self.device)
        self.spectra: list[pd.DataFrame] = []
        self.coverage: GramCoverage | None = None

    def seed(self, purpose: Purpose) -> int:
        return seed_for(self.probe.seed, self.step, purpose)

    @cached_property
    def grads(self) -> dict[str, Tensor]:
        """Per-sample gradients of the probe batch (vmap)."""
        p = self.probe
        if not p.ranks.distributed:
            return per_sample_grads(p.model, p.loss_fn, self.x, self.y,
                                    chunk_size=p.chunk_size, batchnorm=p.batchnorm,
                                    seed=self.seed(Purpose.GRADS), verify=p.grads_verify)
        # Each rank its block of the probe set; every rank then holds all of them (n × d).
        block = p.ranks.shard(len(self.y))
        local = per_sample_grads(p.model, p.loss_fn, self.x[block], self.y[block],
                                 chunk_size=p.chunk_size, batchnorm=p.batchnorm,
                                 seed=self.seed(Purpose.GRADS), verify=p.grads_verify)
        return {name: p.ranks.gather_rows(g, kind="gradients") for name, g in local.items()}

    @cached_property
    def noise(self) -> NoiseStats:
        """SGN statistics of the probe batch, by the probe's path (vmap or Gram)."""
        p = self.probe
        minibatch = {"batch_size": p.batch_size, "dataset_size": len(p.x_train),
                     "seed": self.seed(Purpose.STATS)}
        if p.grads == "vmap" and (not p.ranks.distributed or p.gathers_grads
                                  or "grads" in self.__dict__):
            return noise_stats(self.grads, shape=False, **minibatch)
        if p.ranks.distributed:
            with _seeded(self.seed(Purpose.GRADS), self.device):
                split = split_gram(p.model, p.loss_fn, self.x, self.y, p.ranks, grads=p.grads,
                                   batchnorm=p.batchnorm, chunk_size=p.chunk_size,
                                   verify=p.take_verify())
            self.coverage = split.coverage
            return noise_stats(gram=split.gram, dim=split.mean.numel(), mean=split.mean,
                               diag_variance=split.diag_variance, **minibatch)
        mean = self.gram.mean
        assert mean is not None
        return noise_stats(gram=self.gram.gram, dim=mean.numel(), mean=mean, **minibatch)

    @cached_property
    def gram(self) -> GramResult:
        """The Gram path's one pass over the probe batch in this process: the Gram, the mean
        gradient and, with the layers instrument on, every parameter's own Gram."""
        p = self.probe
        per_parameter = any(i.name == "layers" for i in p.instruments)
        with _seeded(self.seed(Purpose.GRADS), self.device):
            result = gram_result(p.model, p.loss_fn, self.x, self.y, with_mean=True,
                                 per_parameter=per_parameter, batchnorm=p.batchnorm,
                                 chunk_size=p.chunk_size, verify=p.take_verify())
        self.coverage = result.coverage
        return result

    @cached_property
    def shape_grads(self) -> Tensor | None:
        """(n', d) float64 per-sample gradients for the shape of the noise: all n with vmap,
        the first ``shape_samples`` probe samples' on the Gram path; None below 8 samples."""
        p = self.probe
        if p.grads == "vmap":
            G = flatten_grads(self.grads)
            return G.to(torch.float64) if len(G) >= 8 else None
        count = min(len(self.x), p.shape_samples)
        if count < 8:
            return None
        return flatten_grads(per_sample_grads(
            p.model, p.loss_fn, self.x[:count], self.y[:count], chunk_size=p.chunk_size,
            batchnorm=p.batchnorm, seed=self.seed(Purpose.GRADS),
            verify=p.grads_verify)).to(torch.float64)

    def add_spectrum(self, kind: str, eigenvalues: Tensor) -> None:
        self.spectra.append(pd.DataFrame({
            "step": self.step, "kind": kind, "k": np.arange(1, eigenvalues.numel() + 1),
            "eigenvalue": eigenvalues.detach().double().cpu().numpy()}))


@dataclass(frozen=True)
class Eval:
    """Mean loss and accuracy (NaN for regression, per token for token sequences;
    :meth:`~sgn_lab.run.probe.NoiseProbe.evaluate`) on the training set and, when the probe
    has them, the validation set (``val_*``) and the test set (``test_*``)."""

    name: str = "eval"
    needs_grads: bool = False

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

    name: str = "sgn"
    needs_grads: bool = False

    def __call__(self, m: Measurement) -> dict[str, Any]:
        stats = m.noise
        m.add_spectrum("sgn", stats.eigenvalues)
        m.add_spectrum("isotropic", stats.isotropic_eigenvalues)
        row = stats.to_dict()
        for key in _TAIL_COLUMNS:  # the tails instrument's
            row.pop(key, None)
        return row


_TAIL_COLUMNS = ("tail_index", "normality_pvalue", "normality_reject_fraction", "kurtosis")


@dataclass(frozen=True)
class Tails:
    """Tail index and Gaussianity of the per-sample noise (:func:`sgn_lab.shape_stats`)."""

    name: str = "tails"
    needs_grads: bool = False

    def __call__(self, m: Measurement) -> dict[str, Any]:
        G = m.shape_grads
        if G is None or (m.probe.grads == "vmap" and not m.noise.trace > 0):
            return dict.fromkeys(_TAIL_COLUMNS, math.nan)
        centred = G - G.mean(dim=0)  # centred as noise_stats centres them
        if not bool(centred.abs().max() > 0):
            return dict.fromkeys(_TAIL_COLUMNS, math.nan)
        seed = m.seed(Purpose.STATS if m.probe.grads == "vmap" else Purpose.GRADS)
        return shape_stats(centred, seed=seed).to_dict()


@dataclass(frozen=True)
class MinibatchTails:
    """Tail index and Gaussianity of the minibatch noise g_B − ḡ at each of the probe's
    ``shape_batch_sizes`` (:func:`sgn_lab.minibatch_noise_shape`): columns ``tail_index_b16``
    and so on; a B not below the per-sample gradients available is NaN."""

    name: str = "minibatch-tails"
    needs_grads: bool = False

    def __call__(self, m: Measurement) -> dict[str, Any]:
        p = m.probe
        G = m.shape_grads
        sizes = [b for b in p.shape_batch_sizes if G is not None and b < len(G)]
        row = {f"{column}_b{b}": math.nan for b in p.shape_batch_sizes
               for column in _TAIL_COLUMNS}
        if not sizes or not bool((G != G[:1]).any()):  # all rows equal: no noise
            return row
        table = minibatch_noise_shape(G, sizes, draws=p.shape_draws,
                                      seed=m.seed(Purpose.STATS))
        for record in table.to_dict("records"):
            for column in _TAIL_COLUMNS:
                row[f"{column}_b{record['batch_size']}"] = record[column]
        return row


@dataclass(frozen=True)
class Curvature:
    """λ_max(H), tr H, tr(HS) and the alignment ratio (:func:`sgn_lab.curvature_stats`)."""

    name: str = "curvature"
    needs_grads: bool = True

    def __call__(self, m: Measurement) -> dict[str, Any]:
        p = m.probe
        return curvature_stats(p.model, p.loss_fn, m.x, m.y, flatten_grads(m.grads),
                               seed=m.seed(Purpose.CURVATURE), chunk_size=p.chunk_size
                               ).to_dict()


@dataclass(frozen=True)
class Updates:
    """The per-step update noise: R one-step copies of (model, optimizer)."""

    name: str = "updates"
    needs_grads: bool = False

    def __call__(self, m: Measurement) -> dict[str, Any]:
        from sgn_lab.run.probe import update_noise

        p = m.probe
        updates = update_noise(p.model, p.optimizer, p.method, p.loss_fn, p.x_train,
                               p.y_train, batch_size=p.batch_size, repeats=p.update_repeats,
                               seed=m.seed(Purpose.UPDATES))
        stats = noise_stats(updates, shape=False)
        m.add_spectrum("update", stats.eigenvalues)
        return {"update_trace": stats.trace, "update_effective_rank": stats.effective_rank,
                "update_mean_sq_norm": stats.mean_sq_norm}


@dataclass(frozen=True)
class Layers:
    """B_simple, tr S and |G|² with their errors per parameter tensor, module, the
    ``layernorm`` group and in total (:func:`sgn_lab.layer_noise_scale`).

    The table (with a ``step`` column) is ``measurement.layers``, which the probe returns as
    :attr:`~sgn_lab.run.probe.ProbeResult.layers` and a run writes to ``layers.csv``; the row
    gets the ``layernorm`` group's columns (NaN for a model without norm layers).
    """

    name: str = "layers"
    needs_grads: bool = False

    def __call__(self, m: Measurement) -> dict[str, Any]:
        from sgn_lab.stats.layers import LAYERNORM, layer_noise_scale

        p = m.probe
        if p.grads == "vmap" or p.ranks.distributed:
            # Over several processes: the per-sample gradients gathered from the ranks.
            table = layer_noise_scale(m.grads, model=p.model)
        else:  # the pass the sgn instrument shares
            assert m.gram.parameter_grams is not None
            table = layer_noise_scale(grams=m.gram.parameter_grams, model=p.model)
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


# The built-in instruments by name, in the order their columns appear in a row.
INSTRUMENTS: dict[str, Instrument] = {i.name: i for i in (Eval(), SGN(), Tails(), MinibatchTails(),
                                                          Curvature(), Updates(), Layers())}
