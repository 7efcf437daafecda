"""The simple noise scale B_simple per parameter tensor, per module and per group of parameters.

For a set P of parameters, the per-sample gradients restricted to P, g_i^P (i = 1..n), have the
uncentred Gram K^P_ij = g_i^P·g_j^P (n × n), and K^P is the sum of the per-parameter Grams
K^p of P's parameters: every figure below comes from those Grams (:func:`parameter_grams` from
per-sample gradients, or the Gram path's ``gram_result(..., per_parameter=True)``), so a
module's, a group's and the total's are exact sums and no n × d matrix is needed. With the
centring matrix C = I − 11ᵀ/n (as in :mod:`sgn_lab.stats.noise`)

    tr S_P  = tr(C K^P C)/(n−1) = (tr K^P − 1ᵀK^P1/n)/(n−1)   (unbiased trace of the covariance)
    |ḡ_P|²  = 1ᵀK^P1/n²
    |G_P|²  = |ḡ_P|² − tr S_P/n                              (unbiased |full-data gradient|²)
    B_P     = tr S_P/|G_P|²                                   (McCandlish et al. 2018)

B_P is NaN, with the flag ``nonpositive``, when the estimate |G_P|² ≤ 0, as in
:func:`sgn_lab.noise_stats`; the standard errors of |G_P|² and B_P are the same jackknife over
the n samples (:func:`sgn_lab.stats.noise.jackknife_from_gram`). The ``total`` row is what
``noise_stats`` reports for all the parameters together.

Because tr S and |G|² add up over disjoint sets, tr S_total = Σ_P tr S_P and
|G_total|² = Σ_P |G_P|², so B_total = Σ_P w_P B_P with weights w_P = |G_P|²/|G_total|²: the
mean of the parts' noise scales weighted by their share of the signal. A set whose B_P tracks
B_total over training is a cheap proxy for it (Gray et al., NeurIPS 2024, observe this for the
LayerNorm parameters of transformers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from sgn_lab import checks
from sgn_lab.stats.noise import jackknife_from_gram, magnitudes
from sgn_lab.stats.streaming import cross_gram

LAYER_COLUMNS = ("name", "kind", "dim", "trace", "trace_fraction", "mean_sq_norm",
                 "grad_sq_norm", "grad_sq_norm_se", "noise_scale", "noise_scale_se",
                 "nonpositive")
"""The columns of :func:`layer_noise_scale`'s table, in order."""
KINDS = ("parameter", "module", "group", "total")
NORM_CLASSES = ("LayerNorm", "RMSNorm", "GroupNorm")
"""Norm modules whose parameters form the ``layernorm`` group: torch's, and any class whose
name ends so (Hugging Face's ``T5LayerNorm``, ``LlamaRMSNorm``, ...)."""
LAYERNORM = "layernorm"
ROOT = "<root>"  # the module of a parameter registered on the model itself


def norm_parameters(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the trainable parameters of the model's
    LayerNorm, RMSNorm and GroupNorm modules (:data:`NORM_CLASSES`)."""
    from sgn_lab.models.wrapped import unwrapped

    model = unwrapped(model)
    ids = {id(p) for module in model.modules()
           if type(module).__name__.endswith(NORM_CLASSES)
           or isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.RMSNorm)
           for p in module.parameters(recurse=False)}
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) in ids]


def parameter_grams(grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """name -> the (n, n) float64 Gram G_p G_pᵀ of each parameter's per-sample gradients.

    ``grads`` maps a name to the (n, *shape) per-sample gradients of that parameter (the dict
    of :func:`sgn_lab.per_sample_grads`); columns are streamed in float64 blocks.
    """
    return {name: cross_gram({name: g}, {name: g}) for name, g in grads.items()}


def layer_noise_scale(
    grads: Mapping[str, Tensor] | None = None,
    *,
    grams: Mapping[str, Tensor] | None = None,
    dims: Mapping[str, int] | None = None,
    model: nn.Module | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """B_simple, tr S and |G|² with their jackknife errors per parameter, module, group, total.

    Parameters
    ----------
    grads
        name -> (n, *shape) per-sample gradients of each parameter (the dict of
        :func:`sgn_lab.per_sample_grads`); their Grams G_p G_pᵀ are formed here.
    grams, dims
        Instead of ``grads``: name -> the (n, n) uncentred Gram K^p_ij = g_i^p·g_j^p of each
        parameter (``sgn_lab.grads.gram_result(..., per_parameter=True).parameter_grams``) and
        name -> its number of entries d_p (taken from ``model`` when not given).
    model
        The model the gradients are of: its LayerNorm/RMSNorm/GroupNorm parameters (those
        measured) form the group ``layernorm`` (:func:`norm_parameters`), and it gives
        ``dims``.
    groups
        group name -> parameter names: groups of one's own, over the ``layernorm`` group found
        from ``model`` (``groups={"layernorm": [...]}`` names it without a model). A group
        without parameters has no row; an unknown name is a ValueError.

    Returns
    -------
    pandas.DataFrame
        One row per parameter tensor (kind ``parameter``, in the given order), per module
        (``module``: the parameters sharing a name prefix ``a.b`` of ``a.b.weight``, ``<root>``
        for the model's own), per group (``group``) and one for all of them (``total``), with
        the columns :data:`LAYER_COLUMNS`: ``dim`` (d_P), ``trace`` (tr S_P, unbiased),
        ``trace_fraction`` (tr S_P / tr S_total), ``mean_sq_norm`` (|ḡ_P|²),
        ``grad_sq_norm`` (|G_P|², unbiased) and ``grad_sq_norm_se``, ``noise_scale`` (B_P) and
        ``noise_scale_se``, ``nonpositive`` (|G_P|² ≤ 0: B_P is NaN). See the module docstring
        for the formulas; the errors are the jackknife of :func:`sgn_lab.noise_stats`
        (NaN below 3 samples, ``noise_scale_se`` infinite when a leave-one-out |G_P|² is not
        positive).
    """
    if (grads is None) == (grams is None):
        raise ValueError("give either per-sample gradients or grams= (per-parameter Grams), "
                         "not both")
    if model is not None:
        from sgn_lab.models.wrapped import unwrapped

        model = unwrapped(model)
    if grads is not None:
        grams, dims = _grams_of(grads)
    else:
        dims = _dims_of(grams, dims, model)
    n = _check(grams, dims)
    rows = [_row(label, kind, members, grams, dims, n)
            for label, kind, members in _parameter_sets(list(grams), _groups(grams, model, groups))]
    table = pd.DataFrame(rows)
    total_trace = float(table["trace"].iloc[-1])
    table["trace_fraction"] = table["trace"] / total_trace if total_trace > 0 else math.nan
    return table[list(LAYER_COLUMNS)]


def _grams_of(grads: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Each parameter's Gram and number of entries, from its per-sample gradients."""
    if not isinstance(grads, Mapping) or not grads:
        raise ValueError("grads must be a non-empty dict name -> (n, *shape) per-sample "
                         "gradients")
    for name, g in grads.items():  # each Gram needs its samples first
        checks.samples(f"n[{name}]", g.shape[0] if g.dim() else 0)
    return parameter_grams(grads), {name: int(g[0].numel()) for name, g in grads.items()}


def _dims_of(grams: Mapping[str, Tensor] | None, dims: Mapping[str, int] | None,
             model: nn.Module | None) -> Mapping[str, int]:
    """The parameters' numbers of entries: as given, else from the model."""
    if not isinstance(grams, Mapping) or not grams:
        raise ValueError("grams must be a non-empty dict name -> (n, n) Gram")
    if dims is not None:
        return dims
    if model is None:
        raise ValueError("grams= needs dims (name -> number of entries) or the model")
    sizes = dict(model.named_parameters())
    return {name: sizes[name].numel() for name in grams if name in sizes}


def _groups(grams: Mapping[str, Tensor], model: nn.Module | None,
            groups: Mapping[str, Sequence[str]] | None) -> dict[str, Sequence[str]]:
    """The model's norm parameters among those measured, then the groups given (whose
    members must all be measured)."""
    found = ({LAYERNORM: [k for k in norm_parameters(model) if k in grams]}
             if model is not None else {})
    chosen = {**found, **(dict(groups) if groups is not None else {})}
    for group, members in chosen.items():
        unknown = [m for m in members if m not in grams]
        if unknown:
            raise ValueError(f"group {group!r} names {unknown[0]!r}, which is not among the "
                             f"{len(grams)} parameters measured")
    return chosen


def _parameter_sets(names: list[str], groups: Mapping[str, Sequence[str]]
                    ) -> list[tuple[str, str, list[str]]]:
    """(label, kind, members) of every row: parameters, modules, groups, the total."""
    modules: dict[str, list[str]] = {}
    for name in names:
        modules.setdefault(name.rpartition(".")[0] or ROOT, []).append(name)
    sets = [(name, "parameter", [name]) for name in names]
    sets += [(module, "module", members) for module, members in modules.items()]
    sets += [(group, "group", list(dict.fromkeys(members)))
             for group, members in groups.items() if members]
    sets.append(("total", "total", names))
    return sets


def _row(label: str, kind: str, members: list[str], grams: Mapping[str, Tensor],
         dims: Mapping[str, int], n: int) -> dict:
    """One row of :func:`layer_noise_scale`: the statistics of the members' summed Gram."""
    K = grams[members[0]].to(torch.float64)
    for other in members[1:]:
        K = K + grams[other].to(torch.float64)
    # tr(C K C) = tr K − 1ᵀK1/n: the trace of the centred Gram without forming it.
    total_sum = float(K.sum())
    trace = (float(torch.diagonal(K).sum()) - total_sum / n) / (n - 1)
    values = magnitudes(trace, total_sum / n**2, n, jackknife_from_gram(K),
                        batch_size=None, dataset_size=None, replacement=False)
    return {"name": label, "kind": kind, "dim": sum(dims[m] for m in members),
            **{key: values[key] for key in LAYER_COLUMNS if key in values},
            "nonpositive": not values["grad_sq_norm"] > 0}


def _check(grams: Mapping[str, Tensor], dims: Mapping[str, int]) -> int:
    """The number of samples n, after checking every Gram and dimension."""
    n = None
    for name, K in grams.items():
        if not isinstance(K, Tensor) or K.dim() != 2 or K.shape[0] != K.shape[1]:
            got = tuple(K.shape) if isinstance(K, Tensor) else type(K).__name__
            raise ValueError(f"the Gram of {name!r} must be a square (n, n) tensor, got {got}")
        if n is None:
            n = K.shape[0]
            checks.samples("n", n)
        elif K.shape[0] != n:
            raise ValueError(f"the Gram of {name!r} is over {K.shape[0]} samples, the others "
                             f"over {n}")
        if not bool(torch.isfinite(K).all()):
            raise checks.NonFiniteError(f"non-finite value in the Gram of {name!r}")
        d = dims.get(name)
        if d is None or isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"dims must give the number of entries d >= 1 of {name!r}, got "
                             f"{d!r}")
    assert n is not None
    return n
