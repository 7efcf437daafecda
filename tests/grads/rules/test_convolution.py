"""Rule of the convolutions (``sgn_lab.grads.rules.convolution``): conv1d/2d/3d with every
option, both weight routes (im2col, grouped weight gradient), against the float64 loop.
"""


import pytest
import torch
from grads.oracle import D, check, labels
from helpers import seeded
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("conv", [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, dilation=2, padding="same"),
    dict(kernel_size=2, padding="same"),  # even span: torch pads asymmetrically
    dict(kernel_size=2, bias=False),
    dict(kernel_size=3, groups=2),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
])
@pytest.mark.parametrize("channels", [2, 8])  # im2col + bmm, and the grouped weight gradient
def test_conv2d(conv, channels):
    with seeded(5):
        model = nn.Sequential(nn.Conv2d(channels, 4, **conv), nn.GroupNorm(2, 4), nn.ReLU(),
                              nn.Flatten(), nn.LazyLinear(3))
        x = torch.randn(6, channels, 9, 9)
        model(x)
    coverage = check(model.double(), x.double(), labels(6))
    assert coverage.routes["0.weight"] in ("ghost", "per-sample")


def test_conv1d_conv3d_and_a_regression_loss():
    with seeded(6):
        model = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.Tanh(),
                              nn.Conv1d(8, 2, 3, stride=2), nn.Flatten(), nn.LazyLinear(1))
        x = torch.randn(7, 1, 20)
        model(x)
        volume = nn.Sequential(nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), nn.Flatten(), nn.LazyLinear(1))
        v = torch.randn(5, 2, 4, 4, 4)
        volume(v)

    def half_mse(out, t):
        return 0.5 * (out.squeeze(-1) - t).pow(2).mean()

    check(model.double(), x.double(), torch.randn(7, dtype=D), loss_fn=half_mse)
    check(volume.double(), v.double(), torch.randn(5, dtype=D), loss_fn=half_mse)


class TwiceConv(nn.Module):
    """One convolution applied twice: its Gram sums over both calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.small = nn.Conv2d(8, 16, 3, stride=2)  # 5x5 -> 2x2 outputs: the ghost route
        self.head = nn.LazyLinear(2)

    def forward(self, x):
        h = torch.tanh(self.conv(torch.tanh(self.conv(x))))
        return self.head(torch.tanh(self.small(h)).flatten(1))


def test_a_convolution_called_twice():
    with seeded(7):
        model = TwiceConv()
        x = torch.randn(5, 8, 5, 5)
        model(x)
    coverage = check(model.double(), x.double(), labels(5, 2))
    assert coverage.to_frame().set_index("name").loc["conv.weight", "operations"] == "conv + conv"
