"""Models that several grads test files use: each exercises one kind of use of a parameter."""

import torch
from torch import nn
from torch.nn import functional as F


class Embedded(nn.Module):
    def __init__(self, vocab=200, **options):
        super().__init__()
        self.tokens = nn.Embedding(vocab, 4, **options)
        self.positions = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # position ids (1, T), broadcast over the batch as in GPT-2
        h = self.tokens(x) + self.positions(torch.arange(x.shape[1]).unsqueeze(0))
        return self.head(torch.tanh(h).mean(dim=1))


class Combined(nn.Module):
    """A position embedding added, a learned scale, a class token, subtraction with alpha."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 5, 4))
        self.shift = nn.Parameter(torch.randn(4))
        self.gamma = nn.Parameter(torch.randn(4))
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x (n, 5, 4)
        h = x + self.pos
        h = torch.sub(h, self.shift, alpha=0.5)
        h = torch.tanh(h) * self.gamma
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1)
        return self.head(torch.tanh(h).mean(dim=1))


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, 2.0 * self.weight, self.bias)


class ShiftedLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x + 1.0, self.weight, self.bias)


class SkipLinear(nn.Linear):
    def forward(self, x):
        return x


class DoubleLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(x, self.weight, self.bias)


class Stray(nn.Module):
    """Linear layers used in every way a module-level path cannot see."""

    def __init__(self):
        super().__init__()
        self.scaled, self.shifted = ScaledLinear(4, 4), ShiftedLinear(4, 4)
        self.skip, self.double_ = SkipLinear(4, 4), DoubleLinear(4, 4)
        self.keyword, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)  # spare: never called
        self.reused = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.double_(self.skip(self.shifted(self.scaled(x)))))
        h = torch.tanh(self.keyword(input=h)) + h @ self.reused.weight.T
        return self.head(torch.tanh(self.reused(h)))
