"""nn.RNN, nn.LSTM and nn.GRU written out step by step, so that vmap can batch them.

torch runs recurrent layers through fused kernels (``torch._VF.lstm``, ``_VF.gru``,
``_VF.rnn_tanh``, ``_VF.rnn_relu``) that vmap cannot transform. For per-sample computations
only, :class:`Recurrence` (a ``TorchFunctionMode``) replaces those calls by the same equations
on the same weights — the module's ``_flat_weights``, in torch's order — as plain tensor
operations: one ``F.linear`` of the input over all time steps, one of the hidden state per
step. vmap batches them like any other code: the reference route enters :class:`Recurrence`,
and the recording pass, which reads them from ``EXPANDED``, sees linear layers that the rules
of :mod:`sgn_lab.grads.rules.linear` take. The model's own forward is never changed; the
tests hold this formulation equal to torch's kernels for every option (layers, directions,
bias, batch_first, proj_size, dropout off).

Equations (torch's documentation), gates in the weights' row order:

    RNN   h' = act(W_ih x + b_ih + W_hh h + b_hh)                       act = tanh or relu
    LSTM  i, f, g, o = σ, σ, tanh, σ of (W_ih x + b_ih + W_hh h + b_hh)
          c' = f ⊙ c + i ⊙ g,   h' = o ⊙ tanh(c'),   h' = W_hr h' with proj_size > 0
    GRU   r, z = σ(W_i{r,z} x + b_i{r,z} + W_h{r,z} h + b_h{r,z})
          n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)),   h' = (1 − z) ⊙ n + z ⊙ h

Packed sequences (``nn.utils.rnn.PackedSequence``) give each sample its own length; they are
refused with a message (pad them instead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from sgn_lab.grads.rules.registry import EXPANDED

Cell = Callable[[Tensor, Tensor, Tensor | None, Sequence[Tensor]], tuple[Tensor, Tensor | None]]


def _lstm_cell(x_proj: Tensor, h: Tensor, c: Tensor | None, w: Sequence[Tensor]
               ) -> tuple[Tensor, Tensor | None]:
    w_hh, b_hh, w_hr = w
    gates = x_proj + F.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h if w_hr is None else F.linear(h, w_hr)), c


def _gru_cell(x_proj: Tensor, h: Tensor, c: Tensor | None, w: Sequence[Tensor]
              ) -> tuple[Tensor, Tensor | None]:
    w_hh, b_hh, _ = w
    x_r, x_z, x_n = x_proj.chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h, None


def _rnn_cell(activation: Callable[[Tensor], Tensor]) -> Cell:
    def cell(x_proj: Tensor, h: Tensor, c: Tensor | None, w: Sequence[Tensor]
             ) -> tuple[Tensor, Tensor | None]:
        w_hh, b_hh, _ = w
        return activation(x_proj + F.linear(h, w_hh, b_hh)), None

    return cell


def _run(cell: Cell, lstm: bool, input: Tensor, hx: Tensor | Sequence[Tensor],
         weights: Sequence[Tensor], has_biases: bool, num_layers: int, dropout: float,
         train: bool, bidirectional: bool, batch_first: bool) -> tuple[Tensor, ...]:
    """The recurrent layer's (output, h_n[, c_n]) from the flat weights, as torch returns them."""
    directions = 2 if bidirectional else 1
    per = len(weights) // (num_layers * directions)
    projected = lstm and per == (5 if has_biases else 3)
    h0, c0 = (hx[0], hx[1]) if lstm else (hx, None)
    x = input.transpose(0, 1) if batch_first else input  # (T, B, features)
    finals_h, finals_c = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w = list(weights[k * per:(k + 1) * per])
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            w_hr = w[-1] if projected else None
            steps = F.linear(x, w_ih, b_ih)  # the input's share of every step at once
            h, c = h0[k], (c0[k] if c0 is not None else None)
            order = range(x.shape[0] - 1, -1, -1) if direction else range(x.shape[0])
            seq: list[Tensor] = [x.new_empty(0)] * x.shape[0]
            for t in order:
                h, c = cell(steps[t], h, c, (w_hh, b_hh, w_hr))
                seq[t] = h
            outputs.append(torch.stack(seq))
            finals_h.append(h)
            if c is not None:
                finals_c.append(c)
        x = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        if dropout and train and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    output = x.transpose(0, 1) if batch_first else x
    result = (output, torch.stack(finals_h))
    return (*result, torch.stack(finals_c)) if lstm else result


def _functional(cell: Cell, lstm: bool, name: str) -> Callable[..., tuple[Tensor, ...]]:
    def call(input: Tensor, *args: object) -> tuple[Tensor, ...]:
        if len(args) == 8 and isinstance(args[1], list | tuple):  # the unpacked signature
            return _run(cell, lstm, input, *args)  # type: ignore[arg-type]
        raise ValueError(
            f"{name} on a packed sequence: each sample would have its own length, which the "
            "per-sample computation does not support; pad the batch "
            "(torch.nn.utils.rnn.pad_packed_sequence) and mask the padded steps in the loss")

    return call


# torch's fused recurrent kernels and their step-by-step replacements.
RECURRENT: dict[Callable, Callable[..., tuple[Tensor, ...]]] = {
    torch._VF.lstm: _functional(_lstm_cell, True, "LSTM"),
    torch._VF.gru: _functional(_gru_cell, False, "GRU"),
    torch._VF.rnn_tanh: _functional(_rnn_cell(torch.tanh), False, "RNN"),
    torch._VF.rnn_relu: _functional(_rnn_cell(torch.relu), False, "RNN"),
}
EXPANDED.update(RECURRENT)  # the recording pass records each step's operations


class Recurrence(TorchFunctionMode):
    """Inside this mode, recurrent layers run step by step (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        replacement = RECURRENT.get(func)
        if replacement is None:
            return func(*args, **(kwargs or {}))
        with self:
            return replacement(*args, **(kwargs or {}))
