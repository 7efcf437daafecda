"""Recurrent layers (``sgn_lab.grads.rules.recurrent``): RNN, LSTM and GRU written out step
by step equal torch's kernels, and both paths equal the float64 loop.
"""

import warnings

import pytest
import torch
from grads.oracle import D, check_each_parameter, labels
from helpers import seeded
from torch import nn

from sgn_lab.grads.rules.recurrent import Recurrence
from sgn_lab.grads.vmap import LastResortWarning

pytestmark = pytest.mark.usefixtures("one_thread")


class Recurrent(nn.Module):
    def __init__(self, kind, **options):
        super().__init__()
        self.batch_first = options.get("batch_first", False)
        self.rnn = kind(4, 5, **options)
        width = options.get("proj_size") or 5
        self.head = nn.Linear(width * (2 if options.get("bidirectional") else 1), 3)

    def forward(self, x):  # x (n, T, 4)
        out = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        return self.head((out if self.batch_first else out.transpose(0, 1)).mean(dim=1))


RECURRENT = [
    (nn.LSTM, dict()),
    (nn.LSTM, dict(num_layers=2, bidirectional=True, batch_first=True)),
    (nn.LSTM, dict(num_layers=2, bias=False, proj_size=3)),
    (nn.GRU, dict(batch_first=True)),
    (nn.GRU, dict(num_layers=2, bidirectional=True, bias=False)),
    (nn.RNN, dict(nonlinearity="relu", num_layers=2, batch_first=True)),
    (nn.RNN, dict(bidirectional=True)),
]


NAMES = [f"{k.__name__}-" + "-".join(f"{a}={b}" for a, b in o.items()) for k, o in RECURRENT]


@pytest.mark.parametrize(("kind", "options"), RECURRENT, ids=NAMES)
def test_recurrent_layers_on_both_paths(kind, options):
    with seeded(3):
        model = Recurrent(kind, **options).double()
        x = torch.randn(5, 6, 4, dtype=D)
    coverage = check_each_parameter(model, x, labels(5, seed=1))
    assert coverage.names("vmap") == coverage.names("loop") == []  # the rules see linears


@pytest.mark.parametrize(("kind", "options"), RECURRENT, ids=NAMES)
def test_the_step_by_step_recurrence_is_torchs(kind, options):
    with seeded(4):
        layer = kind(4, 5, **options).double()
        x = torch.randn((3, 7, 4) if layer.batch_first else (7, 3, 4), dtype=D)
        h0 = torch.randn(layer.num_layers * (2 if layer.bidirectional else 1), 3,
                         layer.proj_size or 5, dtype=D)
    hx = (h0, torch.randn(h0.shape[0], 3, 5, dtype=D)) if kind is nn.LSTM else h0
    want = layer(x, hx)
    with Recurrence():
        got = layer(x, hx)
    flat = [want[0], *(want[1] if kind is nn.LSTM else (want[1],))]
    for a, b in zip(flat, [got[0], *(got[1] if kind is nn.LSTM else (got[1],))], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_packed_sequences_are_exact_or_refused_with_a_message():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(4, 5, batch_first=True), nn.Linear(5, 3)

        def forward(self, x):
            lengths = (x.abs().sum(-1) > 0).sum(-1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                       enforce_sorted=False)
            return self.head(self.rnn(packed)[1][-1])

    with seeded(5):
        model = Packed().double()
        x = torch.randn(4, 6, 4, dtype=D)
        x[1, 4:] = 0  # a shorter sequence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LastResortWarning)
        try:
            check_each_parameter(model, x, labels(4, seed=1))
        except ValueError as refused:
            assert "packed sequence" in str(refused) and "pad" in str(refused)
