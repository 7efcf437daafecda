"""Rules of the embeddings ``F.embedding`` and ``torch.embedding``: the rows of the table
picked by the index, as a Rows term (the one-hot left factor is never formed)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from sgn_lab.grads.common import max_norm_error
from sgn_lab.grads.rules.registry import Op, Plan, register
from sgn_lab.grads.terms import Rows, Term


@register(F.embedding, slots=("input", "weight", "padding_idx", "max_norm", "norm_type",
                              "scale_grad_by_freq", "sparse"),
          padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False)
def embedding(op: Op) -> Plan:
    """Rows of the table picked by the index: g_i(E) = Σ_t e_{x_it} ⊗ δ_it."""
    if "weight" not in op.params:
        return Plan((), {}, (), "input")
    if op.operands["max_norm"] is not None:
        name = op.params["weight"]
        raise max_norm_error(name.rpartition(".")[0] or name, op.operands["max_norm"])
    rows = op.operands["weight"].shape[0]
    padding = op.operands["padding_idx"]
    if padding is not None and padding < 0:
        padding += rows
    return _rows_plan(rows, padding, bool(op.operands["scale_grad_by_freq"]))


@register(torch.embedding, slots=("weight", "input", "padding_idx", "scale_grad_by_freq",
                                  "sparse"),
          padding_idx=-1, scale_grad_by_freq=False, sparse=False)
def embedding_op(op: Op) -> Plan:
    """``torch.embedding`` (what F.embedding calls): padding_idx −1 means none."""
    if "weight" not in op.params:
        return Plan((), {}, (), "input")
    padding = op.operands["padding_idx"]
    return _rows_plan(op.operands["weight"].shape[0], None if padding < 0 else padding,
                      bool(op.operands["scale_grad_by_freq"]))


def _rows_plan(rows: int, padding: int | None, scale_by_frequency: bool) -> Plan:
    def terms(saved: dict[str, Any], signal: Tensor) -> dict[str, Term]:
        n = signal.shape[0]
        index = saved["input"].reshape(n, -1).long()
        values = signal.reshape(n, index.shape[1], -1)
        if padding is not None:  # that row gets no gradient
            values = values * (index != padding).unsqueeze(-1)
        if scale_by_frequency:  # divided by the row's count in this sample's index
            keys = torch.arange(n, device=index.device).unsqueeze(1) * rows + index
            _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
            values = values / counts[inverse].unsqueeze(-1).to(values.dtype)
        return {"weight": Rows(index, values, rows, "embedding")}

    return Plan(("weight",), {}, ("input",), "input", terms)


