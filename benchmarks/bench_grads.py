"""Benchmark per-sample gradients and the per-sample Gram matrix against the usual tools.

One run times, on the same model weights and the same batch, every way this machine has of
getting the (n, n) Gram matrix K_ij = g_i·g_j of the per-sample gradients:

    floor        a plain forward + backward of the mean loss (no per-sample information at all)
    vmap         sgn_lab.per_sample_grads -> flatten_grads -> G Gᵀ
    gram         sgn_lab.per_sample_gram (one recording pass, rules per operation, never forms G)
    loop         a Python loop of n single-sample backward passes -> G Gᵀ
    backpack     BackPACK BatchGrad (p.grad_batch) -> G Gᵀ
    opacus       Opacus GradSampleModule (p.grad_sample) -> G Gᵀ
    nngeometry   nngeometry GramMatrix of the per-sample loss (FMatDense, one output) -> K
    asdl         ASDL (asdfghjkl) batch_gradient of the summed per-sample losses -> G Gᵀ
    asdl-kernel  ASDL's Hadamard Gram (OP_GRAM_HADAMARD: Σ_layers (a aᵀ + 1) ⊙ (δ δᵀ)) -> K

Every method's Gram is checked, before it is timed, against a Python loop of single-sample
backward passes run in float64 (float32, assembled from blocks of samples, where the n × d
float64 matrix would be too large): relative Frobenius error ≤ 1e-4. A method that fails the
check keeps its time, marked ✗; one that cannot run, or cannot compute this K (an unsupported
layer, a sequence it would treat as a batch of positions), is "n/a" with the reason, never a
number. Peak memory is measured for each method in a fresh subprocess: the RSS high-water mark
of one run above the RSS after set-up (see memory_child for why VmHWM rather than ru_maxrss).

Models: an MLP, a CNN, a one-block transformer with nn.MultiheadAttention or with the attention
written as four nn.Linear, two GPT-2 blocks with a tied LM head built from a Hugging Face
GPT2Config (width 256 and 768, T = 128, next-token loss), a ViT built from a ViTConfig
(patch projection, class token, learned positions), and padded token batches with an
attention mask: GPT-2 (SDPA attention, causal LM, labels -100 at padding) and a 2-layer BERT
sequence classifier (SDPA), each also unpadded (no mask), for the padded/unpadded ratio. Each
model has its own default batches.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_grads.py                  # full run
    .venv/bin/python benchmarks/bench_grads.py --quick          # smoke test, < 1 minute
    .venv/bin/python benchmarks/bench_grads.py --scale          # SGN of a 14M-parameter MLP
    .venv/bin/python benchmarks/bench_grads.py --models mlp,cnn --batches 256 --out r.csv

BackPACK, Opacus, nngeometry and ASDL are optional (see benchmarks/README.md: install them
with --no-deps); a missing or incompatible one is reported as "n/a" with the reason, never
with a number.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from harness import (
    cpu_name,
    last_line,
    max_rss_kib,
    print_json,
    proc_status_kib,
    ram_text,
    reset_peak_rss,
    spread,
    target_line,
)
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

import sgn_lab
from sgn_lab.grads import (
    flatten_grads,
    per_sample_grads,
    per_sample_gram,
    per_sample_gram_coverage,
    trainable_dim,
)

METHODS = ("floor", "vmap", "gram", "loop", "backpack", "opacus", "nngeometry", "asdl",
           "asdl-kernel")
# Methods that return per-sample gradients G (n × d); the others return K or nothing.
PER_SAMPLE = ("vmap", "loop", "backpack", "opacus", "asdl")
# Other people's tools: the Gram path is compared with the fastest of them that gave the right K.
PEERS = ("backpack", "opacus", "nngeometry", "asdl", "asdl-kernel")
# The per-sample-gradient tools that the vmap route is compared with.
GRAD_TOOLS = ("backpack", "opacus", "asdl")
# Each model with its default batch sizes.
MODELS = {"mlp": (64, 256), "cnn": (64, 256), "transformer-mha": (64, 256),
          "transformer-lin": (64, 256), "gpt2-256": (32, 128), "gpt2-768": (32, 128),
          "vit": (32, 128), "gpt2-256-padded": (32,), "gpt2-256-unpadded": (32,),
          "bert-padded": (32,), "bert-unpadded": (32,)}
# Positions per sample that the layers see (tokens, patches + class token); None: no sequence.
SEQ_LEN = {"mlp": None, "cnn": None, "transformer-mha": 32, "transformer-lin": 32,
           "gpt2-256": 128, "gpt2-768": 128, "vit": 65, "gpt2-256-padded": 128,
           "gpt2-256-unpadded": 128, "bert-padded": 64, "bert-unpadded": 64}
# A padded row and its unpadded twin: same weights, same token ids where not padding.
PADDED_TWIN = {"gpt2-256-padded": "gpt2-256-unpadded", "bert-padded": "bert-unpadded"}
# --quick runs these (one of each kind, a padded batch included) to stay under a minute.
QUICK_MODELS = ("mlp", "cnn", "transformer-lin", "bert-padded")
GRAM_RTOL = 1e-4
# Targets (reported as PASS/FAIL, never asserted): the Gram path within 1.5x of a plain
# backward on every model without a sequence and wherever n ≤ T, no slower than any peer that
# gives the right K, a padded batch within 1.1x of the same batch unpadded; per-sample
# gradients (vmap) no slower than the fastest tool and than a Python loop of backward passes.
GRAM_TARGET = 1.5
PADDED_TARGET = 1.1
# The loop reference runs in float64 while its n × d matrix stays under this, else in float32,
# assembled from blocks of samples of at most this size (each pair of blocks recomputed).
REF_BYTES = 2 * 2**30
SCALE_RSS_LIMIT_MB = 4096.0
# Per-sample methods whose n × d matrix G would exceed this are not run (n/a, with the size).
G_LIMIT_BYTES = 6 * 2**30

# Wide enough for the tables when the output is a file or a pipe (rich assumes 80 columns).
console = Console(highlight=False, width=None if sys.stdout.isatty() else 180)


class Unavailable(Exception):
    """A method that cannot run on this model or machine; the message says why."""


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


class ProjectionAttention(nn.Module):
    """Multi-head self-attention written with four nn.Linear layers.

    Same function as nn.MultiheadAttention, but every parameter sits in a Linear layer that is
    called as a module, so hook-based tools (the Gram path, BackPACK, Opacus) see all of them.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        n, t, dim = x.shape
        dh = dim // self.heads

        def split(z: Tensor) -> Tensor:
            return z.reshape(n, t, self.heads, dh).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax(q @ k.transpose(-2, -1) * dh**-0.5, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, t, dim))


class TorchAttention(nn.Module):
    """nn.MultiheadAttention as a self-attention layer (batch first)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class TinyTransformer(nn.Module):
    """Token + learned position embeddings, one pre-LN encoder block, mean pool, linear head.

    Positions are an nn.Embedding indexed with a (n, T) tensor rather than a bare parameter or
    buffer, so that every tool sees a batch-first input (Opacus also refuses buffers).
    """

    def __init__(self, attention: str, vocab: int = 1000, seq_len: int = 32, dim: int = 128,
                 heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(seq_len, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = TorchAttention(dim, heads) if attention == "mha" else ProjectionAttention(
            dim, heads
        )
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        n, t = tokens.shape
        pos = torch.arange(t, device=tokens.device).expand(n, t)
        h = self.tokens(tokens) + self.positions(pos)
        h = h + self.attn(self.ln1(h))
        h = h + self.fc2(self.act(self.fc1(self.ln2(h))))
        return self.head(h.mean(dim=1))


def mlp(widths: tuple[int, ...] = (784, 512, 512, 10)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 32x32 -> 16x16
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16x16 -> 8x8
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )


class NextToken(nn.Module):
    """A Hugging Face GPT-2 LM as logits (n, V, T−1) for the next token of each position, so
    that nn.CrossEntropyLoss against ids[:, 1:] is the mean next-token loss of each window."""

    def __init__(self, width: int, heads: int, layers: int = 2, vocab: int = 1024,
                 context: int = 128) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab,
                            n_positions=context, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)
        self.lm = GPT2LMHeadModel(config)  # the head is tied to the token embedding

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids).logits[:, :-1].transpose(1, 2)


class MaskedLM(nn.Module):
    """GPT-2 (SDPA attention, HF's default) on padded batches: ``forward(ids, mask)`` returns
    the next-token logits (n, V, T−1), as NextToken does.

    ``use_mask=False`` is the unpadded twin: HF gets no mask at all, the call every unpadded
    batch makes (the mask argument is still taken, so both rows run the same code).
    """

    def __init__(self, width: int = 256, heads: int = 4, layers: int = 2, vocab: int = 1024,
                 context: int = 128, use_mask: bool = True) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab,
                            n_positions=context, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, attn_implementation="sdpa")
        self.lm = GPT2LMHeadModel(config)
        self.use_mask = use_mask

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        mask = mask if self.use_mask else None
        return self.lm(input_ids=ids, attention_mask=mask).logits[:, :-1].transpose(1, 2)


class SequenceClassifier(nn.Module):
    """A 2-layer BERT sequence classifier (width 256, SDPA attention) on padded batches:
    ``forward(ids, mask)`` returns the class logits (n, classes); ``use_mask`` as MaskedLM."""

    def __init__(self, width: int = 256, heads: int = 4, layers: int = 2, vocab: int = 1024,
                 context: int = 64, classes: int = 10, use_mask: bool = True) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=4 * width,
                            max_position_embeddings=context, num_labels=classes,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            attn_implementation="sdpa")
        self.bert = BertForSequenceClassification(config)
        self.use_mask = use_mask

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        mask = mask if self.use_mask else None
        return self.bert(input_ids=ids, attention_mask=mask).logits


def padded_tokens(n: int, seq_len: int, vocab: int, padded: bool,
                  seed: int) -> tuple[Tensor, Tensor]:
    """(ids, mask) of n right-padded sequences: lengths uniform in [T/4, T] from their own
    seeded generator, mask 1 on the real tokens, id 0 at padding. Unpadded: all T tokens."""
    ids = torch.randint(0, vocab, (n, seq_len))
    lengths = torch.full((n,), seq_len)
    if padded:
        lengths = torch.randint(seq_len // 4, seq_len + 1, (n,),
                                generator=torch.Generator().manual_seed(seed + 1))
    mask = (torch.arange(seq_len) < lengths[:, None]).long()
    return ids * mask, mask


class ImageClassifier(nn.Module):
    """A Hugging Face ViT (patch projection, class token, learned positions) from a config."""

    def __init__(self, width: int = 192, heads: int = 3, layers: int = 2) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(hidden_size=width, num_attention_heads=heads,
                           num_hidden_layers=layers, intermediate_size=4 * width,
                           image_size=32, patch_size=4, num_channels=3, num_labels=10,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.vit = ViTForImageClassification(config)

    def forward(self, images: Tensor) -> Tensor:
        return self.vit(pixel_values=images).logits


Inputs = Tensor | tuple[Tensor, ...]


def make_problem(name: str, n: int, seed: int = 0,
                 device: str = "cpu") -> tuple[nn.Module, Inputs, Tensor]:
    """Model (train mode, float32), its input(s) and targets for one batch, identical in every
    process for a seed. The input is a tuple (ids, mask) for the padded-token models.

    Made on the CPU and then moved, so that the numbers do not depend on the device.
    """
    torch.manual_seed(seed)
    y = None
    x: Inputs
    if name == "mlp":
        model, x = mlp(), torch.randn(n, 784)
    elif name == "cnn":
        model, x = cnn(), torch.randn(n, 3, 32, 32)
    elif name in ("transformer-mha", "transformer-lin"):
        model = TinyTransformer("mha" if name.endswith("mha") else "lin")
        x = torch.randint(0, 1000, (n, 32))
    elif name in ("gpt2-256", "gpt2-768"):
        width = int(name.rpartition("-")[2])
        model = NextToken(width, heads=width // 64)
        x = torch.randint(0, 1024, (n, 128))
        y = x[:, 1:].clone()
    elif name == "vit":
        model, x = ImageClassifier(), torch.randn(n, 3, 32, 32)
    elif name in ("gpt2-256-padded", "gpt2-256-unpadded"):
        padded = name.endswith("-padded")
        model = MaskedLM(use_mask=padded)
        ids, mask = padded_tokens(n, SEQ_LEN[name], 1024, padded, seed)
        # Padding is never a target: -100 is CrossEntropyLoss's ignore_index, so a sample's
        # loss (a batch of one) is the mean over its real next tokens.
        y = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        x = (ids, mask)
    elif name in ("bert-padded", "bert-unpadded"):
        padded = name.endswith("-padded")
        model = SequenceClassifier(use_mask=padded)
        x = padded_tokens(n, SEQ_LEN[name], 1024, padded, seed)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {tuple(MODELS)}")
    if y is None:
        y = torch.randint(0, 10, (n,))
    x = tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)
    return model.train().to(device), x, y.to(device)


def as_args(x: Inputs) -> tuple[Tensor, ...]:
    """The model's positional inputs."""
    return x if isinstance(x, tuple) else (x,)


def rows(x: Inputs, i: int, j: int | None = None) -> tuple[Tensor, ...]:
    """Samples i..j−1 (default: sample i) of every input, as positional arguments."""
    return tuple(t[i : (i + 1 if j is None else j)] for t in as_args(x))


def per_sample_losses(out: Tensor, y: Tensor) -> Tensor:
    """(n,) loss of each sample, equal to nn.CrossEntropyLoss() on a batch of one: for token
    targets the mean over the sample's positions whose label is not -100 (its real tokens).

    The tools that want a batch loss get its mean (Opacus, loss_reduction="mean") or its sum
    (ASDL): nn.CrossEntropyLoss() on a padded batch averages over all real tokens of the
    batch instead, which weights long samples more and is not the mean of these losses.
    """
    losses = F.cross_entropy(out, y, reduction="none")  # 0 where y == -100
    if losses.ndim == 1:
        return losses
    tokens = (y != -100).flatten(1).sum(dim=1)
    return losses.flatten(1).sum(dim=1) / tokens


# --------------------------------------------------------------------------------------------
# Methods: prepare(model, x, y) returns a callable doing one full computation. Per-sample
# methods return G (n, d); the Gram is built by the caller so that its cost is timed apart.
# --------------------------------------------------------------------------------------------

Runner = Callable[[], Tensor | None]


@dataclass
class Prepared:
    run: Runner
    returns: str  # "none" (floor), "grads" (G, n x d) or "gram" (K, n x n)
    note: str = ""
    # Extra check run once, untimed, after the warm-up: returns an error message or "".
    verify: Callable[[], str] = field(default=lambda: "")
    # Drops what a run leaves on the parameters (grad_batch, grad_sample: n × d each), so the
    # methods timed in turn do not each keep hundreds of MB alive for the others.
    cleanup: Callable[[], None] = field(default=lambda: None)


GRAM_COLUMNS = 1 << 16  # columns of G per float32 product in gram_of


def gram_of(G: Tensor) -> Tensor:
    """G Gᵀ in float32 products over blocks of columns, summed in float64: the cost of one
    float32 product (half a float64 one's), with its rounding bounded by the block's length
    rather than by d and by how the BLAS splits a long product (MKL on an AMD EPYC left
    BERT's 1.9M-long sums 2.9e-4 off where blocks of 65536 give 1e-6)."""
    out = torch.zeros(G.shape[0], G.shape[0], dtype=torch.float64, device=G.device)
    for c in range(0, G.shape[1], GRAM_COLUMNS):
        block = G[:, c : c + GRAM_COLUMNS]
        out += (block @ block.T).double()
    return out


def prepare(method: str, model: nn.Module, x: Inputs, y: Tensor) -> Prepared:
    """Set up ``method`` on its own copy of the model (hooks of one tool must not leak)."""
    model = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()  # mean-reduced; BackPACK needs a loss module
    args = as_args(x)
    n = y.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]

    if method == "floor":
        def run_floor() -> None:
            model.zero_grad(set_to_none=True)
            loss_fn(model(*args), y).backward()

        return Prepared(run_floor, "none", cleanup=lambda: model.zero_grad(set_to_none=True))

    if method == "gram":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the warm-up run reports them (bench_one)
            coverage = per_sample_gram_coverage(model, loss_fn, x, y)
        routes = {r: len(coverage.names(r)) for r in ("ghost", "per-sample", "vmap", "loop")}
        note = "routes " + ", ".join(f"{r} {c}" for r, c in routes.items() if c)
        if coverage.names("vmap"):
            note += f"; vmap route for {', '.join(coverage.names('vmap'))}"
        return Prepared(lambda: per_sample_gram(model, loss_fn, x, y), "gram", note)

    d = sum(p.numel() for p in params)
    if method in PER_SAMPLE and n * d * 4 > G_LIMIT_BYTES:
        raise Unavailable(f"G (n × d = {n} × {d:,}) would need {n * d * 4 / 2**30:.1f} GiB "
                          f"(limit {G_LIMIT_BYTES / 2**30:.0f} GiB)")
    if method == "loop":
        return Prepared(lambda: loop_grads(model, loss_fn, x, y, params, 0, n), "grads")
    if method == "vmap":
        return Prepared(lambda: flatten_grads(per_sample_grads(model, loss_fn, x, y)), "grads")
    if method == "backpack":
        return _prepare_backpack(model, loss_fn, x, y, params)
    if method == "opacus":
        return _prepare_opacus(model, x, y)
    if method == "nngeometry":
        return _prepare_nngeometry(model, x, y, d)
    if method in ("asdl", "asdl-kernel"):
        return _prepare_asdl(model, x, y, d, kernel=method == "asdl-kernel")
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def loop_grads(model: nn.Module, loss_fn: nn.Module, x: Inputs, y: Tensor,
               params: list[nn.Parameter], start: int, stop: int) -> Tensor:
    """Rows start..stop−1 of G from single-sample backward passes (in the model's dtype)."""
    d = sum(p.numel() for p in params)
    G = torch.empty(stop - start, d, dtype=params[0].dtype, device=y.device)
    for i in range(start, stop):
        grads = torch.autograd.grad(loss_fn(model(*rows(x, i)), y[i : i + 1]), params)
        G[i - start] = torch.cat([g.reshape(-1) for g in grads])
    return G


def reference_gram(model: nn.Module, x: Inputs, y: Tensor, float64: bool = True,
                   limit: int = REF_BYTES) -> tuple[Tensor, str]:
    """(K from a Python loop of single-sample backward passes, how it was computed).

    float64 (a float64 copy of the model, float inputs converted) while the n × d matrix fits
    in ``limit`` bytes, so that every float32 method is compared with something more exact
    than itself; otherwise, or without ``float64`` (--quick), float32 with float64 products,
    from blocks of c samples (2·c·d·4 bytes ≤ limit), each later block recomputed for every
    earlier one.
    """
    params0 = [p for p in model.parameters() if p.requires_grad]
    n, d = y.shape[0], sum(p.numel() for p in params0)
    dtype = torch.float64 if float64 and n * d * 8 <= limit else torch.float32
    ref = copy.deepcopy(model).to(dtype)
    xs = tuple(t.to(dtype) if t.is_floating_point() else t for t in as_args(x))
    xs_in: Inputs = xs if isinstance(x, tuple) else xs[0]
    params = [p for p in ref.parameters() if p.requires_grad]
    loss_fn = nn.CrossEntropyLoss()
    size = params[0].element_size()
    # One block when G fits; else two blocks (an earlier and a later one) at a time.
    chunk = n if n * d * size <= limit else max(1, min(n, limit // (2 * d * size)))
    K = torch.zeros(n, n, dtype=torch.float64, device=y.device)
    for a0 in range(0, n, chunk):
        a1 = min(a0 + chunk, n)
        Ga = loop_grads(ref, loss_fn, xs_in, y, params, a0, a1)
        K[a0:a1, a0:a1] = _product64(Ga, Ga)
        for b0 in range(a1, n, chunk):
            b1 = min(b0 + chunk, n)
            Gb = loop_grads(ref, loss_fn, xs_in, y, params, b0, b1)
            K[a0:a1, b0:b1] = _product64(Ga, Gb)
            K[b0:b1, a0:a1] = K[a0:a1, b0:b1].T
            del Gb
    how = "float64" if dtype == torch.float64 else "float32"
    if chunk < n:
        how += f" in blocks of {chunk} samples"
    return K, how


def _product64(A: Tensor, B: Tensor, columns: int = 1 << 20) -> Tensor:
    """A Bᵀ in float64, converting a slice of columns at a time: a float32 block of G is not
    copied whole into float64 (twice its size)."""
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=A.device)
    for c in range(0, A.shape[1], columns):
        out += A[:, c : c + columns].double() @ B[:, c : c + columns].double().T
    return out


def _prepare_backpack(model: nn.Module, loss_fn: nn.Module, x: Inputs, y: Tensor,
                      params: list[nn.Parameter]) -> Prepared:
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
    except Exception as exc:  # ImportError, or an incompatibility raised at import time
        raise Unavailable(f"BackPACK does not import: {type(exc).__name__}: {exc}") from exc
    # BatchGrad only knows a fixed list of layer types; any other module holding parameters
    # (LayerNorm, MultiheadAttention) would silently get no grad_batch.
    supported = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                 nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding, nn.RNN, nn.LSTM)
    unsupported = sorted({
        type(m).__name__ for m in model.modules()
        if any(True for _ in m.parameters(recurse=False)) and type(m) not in supported
    })
    if unsupported:
        raise Unavailable(f"BackPACK BatchGrad has no extension for {', '.join(unsupported)}")
    if bool((y == -100).any()):
        # Its extended CrossEntropyLoss averages over every label of the batch.
        raise Unavailable("BackPACK's extended CrossEntropyLoss has no ignore_index (padding)")
    model = extend(model)
    loss_fn = extend(loss_fn)
    args = as_args(x)
    n = y.shape[0]

    def run_backpack() -> Tensor:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(*args), y)
        with backpack(BatchGrad()):
            loss.backward()
        # A mean-reduced loss makes grad_batch the per-sample gradients divided by n.
        return torch.cat([p.grad_batch.reshape(n, -1) for p in params], dim=1) * n

    def verify() -> str:
        run_backpack()
        return _sum_check(params, "grad_batch", n)

    def cleanup() -> None:
        model.zero_grad(set_to_none=True)
        for p in params:
            if hasattr(p, "grad_batch"):
                del p.grad_batch

    return Prepared(run_backpack, "grads", "grad_batch × n", verify, cleanup)


def _prepare_opacus(model: nn.Module, x: Inputs, y: Tensor) -> Prepared:
    try:
        from opacus import GradSampleModule
        from opacus.validators import ModuleValidator
    except Exception as exc:
        raise Unavailable(f"Opacus does not import: {type(exc).__name__}: {exc}") from exc
    args = as_args(x)
    note = ""
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        # Opacus's documented route: swap in DPMultiheadAttention (separate q/k/v Linear
        # layers, weights copied), meant to compute the same function with the same parameters.
        fixed = ModuleValidator.fix(model)
        note = "nn.MultiheadAttention → DPMultiheadAttention"
        with torch.no_grad():
            ref = model(*args)
            gap = float((fixed(*args) - ref).abs().max() / ref.abs().max())
        if gap > GRAM_RTOL:
            # Opacus 1.6.0 reshapes the batch_first output without moving the head axis
            # (fixed upstream in meta-pytorch/opacus PR #825): a different function.
            note += f", which computes a different function here (rel. output gap {gap:.1e})"
        model = fixed
    unbatched = [name for name, _ in _unbatched(model, x, y.shape[0])]
    if unbatched:
        # Opacus's hooks take the first axis of every layer input as the samples: an input
        # broadcast over the batch gives other per-sample gradients (the check says how far).
        note = "; ".join(filter(None, [note, f"{', '.join(unbatched)}: input not batched by "
                                              "sample, Opacus takes its first axis as samples"]))
    try:
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    except Exception as exc:
        raise Unavailable(f"GradSampleModule refused the model: {exc}") from exc
    params = [p for p in gsm.parameters() if p.requires_grad]
    n = y.shape[0]

    def run_opacus() -> Tensor:
        gsm.zero_grad(set_to_none=True)  # also drops grad_sample, which would accumulate
        # The mean of the per-sample losses (not nn.CrossEntropyLoss's mean over every real
        # token of a padded batch): loss_reduction="mean" multiplies by n, giving each g_i.
        per_sample_losses(gsm(*args), y).mean().backward()
        return torch.cat([p.grad_sample.reshape(n, -1) for p in params], dim=1)

    def verify() -> str:
        run_opacus()
        missing = [i for i, p in enumerate(params) if getattr(p, "grad_sample", None) is None]
        if missing:
            return f"{len(missing)} parameters got no grad_sample"
        return _sum_check(params, "grad_sample", 1.0)

    return Prepared(run_opacus, "grads", note, verify,
                    lambda: gsm.zero_grad(set_to_none=True))


def _layer_inputs(model: nn.Module, x: Inputs,
                  kinds: tuple[type, ...]) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Each module of ``kinds`` with the shape of its first input in one forward pass."""
    seen: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}

    def hook(name: str) -> Callable:
        def record(m: nn.Module, inp: tuple, out: Tensor) -> None:  # None: output unchanged
            seen.setdefault(name, (m, tuple(inp[0].shape)))
        return record

    hooks = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
             if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(*as_args(x))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _unbatched(model: nn.Module, x: Inputs, n: int) -> list[tuple[str, tuple[int, ...]]]:
    """Layers whose input is not batched by sample, such as HF's position embeddings called
    with ids of shape (1, T) broadcast over the batch: hook tools find no row per sample."""
    seen = _layer_inputs(model, x, (nn.Linear, nn.LayerNorm, nn.Embedding))
    return [(name, shape) for name, (_, shape) in seen.items() if shape[0] != n]


def _not_per_sample(model: nn.Module, x: Inputs, n: int) -> str:
    """Why a hook tool that takes each row of a layer's input as one sample (nngeometry,
    ASDL) cannot give per-sample gradients here, or "": a Linear or LayerNorm seeing (n, T, ·)
    or an Embedding seeing (n, T) takes the n·T positions for samples, and an input not
    batched by sample has no row per sample at all."""
    seen = _layer_inputs(model, x, (nn.Linear, nn.LayerNorm, nn.Embedding))
    seq = [(name, shape) for name, (m, shape) in seen.items()
           if shape[0] == n and len(shape) > (1 if isinstance(m, nn.Embedding) else 2)]
    unbatched = _unbatched(model, x, n)
    why = []
    if seq:
        why.append(f"{len(seq)} layers see a sequence and take its positions for samples "
                   f"(e.g. {seq[0][0]}: input {seq[0][1]})")
    if unbatched:
        why.append(f"{unbatched[0][0]} sees an input not batched by sample "
                   f"{unbatched[0][1]}")
    return "; ".join(why)


def _prepare_nngeometry(model: nn.Module, x: Inputs, y: Tensor, d: int) -> Prepared:
    """nngeometry's GramMatrix with ``function`` = the per-sample losses: one output, so its
    FMatDense (n_output, n, n_output, n) is exactly K. Its default function is the model's
    output, whose Gram is the NTK per output, not K."""
    try:
        from nngeometry import GramMatrix
        from nngeometry.layercollection import LayerCollection
        from torch.utils.data import DataLoader, TensorDataset
    except Exception as exc:
        raise Unavailable(f"nngeometry does not import: {type(exc).__name__}: {exc}") from exc
    args = as_args(x)
    n = y.shape[0]
    why = []
    if not args[0].is_floating_point():
        # get_gram_matrix sets requires_grad on the first input and differentiates to it.
        why.append("it backpropagates to the first input (requires_grad = True), which "
                   "integer token ids cannot have")
    try:
        layers = LayerCollection.from_model(model)
        if layers.numel() != d:
            why.append(f"its LayerCollection holds {layers.numel():,} of the {d:,} parameters "
                       "(parameters outside a supported leaf module are left out)")
    except Exception as exc:  # an unsupported leaf module with parameters
        why.append(f"LayerCollection: {exc}")
    if not why:
        why = [w for w in [_not_per_sample(model, x, n)] if w]
    if why:
        raise Unavailable("nngeometry: " + "; ".join(why))
    # One batch of all n samples, so that the Gram is one (outer, inner) pair of passes.
    loader = DataLoader(TensorDataset(*args, y), batch_size=n)

    def losses(*batch: Tensor) -> Tensor:
        return per_sample_losses(model(*batch[:-1]), batch[-1])

    def run_nngeometry() -> Tensor:
        K = GramMatrix(model, loader, function=losses).to_torch()
        return K.reshape(n, n).double()

    return Prepared(run_nngeometry, "gram", "GramMatrix(function=per-sample loss)")


def _prepare_asdl(model: nn.Module, x: Inputs, y: Tensor, d: int, kernel: bool) -> Prepared:
    """ASDL on the summed per-sample losses (each output signal is then ∂L_i/∂out_i):
    ``batch_gradient`` → G, or the Hadamard Gram Σ_layers (a aᵀ + 1) ⊙ (δ δᵀ) → K, which is
    exact for layers seeing one row per sample (Linear; ASDL divides conv Grams by the number
    of positions, and has none for LayerNorm)."""
    try:
        from asdl import OP_GRAM_HADAMARD, batch_gradient, extend
        from asdl.operations import get_op_class
    except Exception as exc:
        raise Unavailable(f"ASDL does not import: {type(exc).__name__}: {exc}") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_op_class warns for every module it lacks
        unsupported = sorted({
            type(m).__name__ for m in model.modules()
            if any(True for _ in m.parameters(recurse=False)) and get_op_class(m) is None})
    if unsupported:
        raise Unavailable(f"ASDL has no operation for {', '.join(unsupported)}")
    n = y.shape[0]
    why = _not_per_sample(model, x, n)
    if why:
        raise Unavailable(f"ASDL: {why}")
    if kernel:
        inexact = sorted({type(m).__name__ for m in model.modules()
                          if isinstance(m, (nn.Conv2d, nn.LayerNorm, nn.BatchNorm1d,
                                            nn.BatchNorm2d, nn.Embedding))})
        if inexact:
            raise Unavailable("ASDL's Hadamard Gram is not g_i·g_j for "
                              f"{', '.join(inexact)} (position-averaged, or none)")
    args = as_args(x)
    dtype = next(model.parameters()).dtype

    def closure() -> Tensor:
        loss = per_sample_losses(model(*args), y).sum()
        loss.backward()
        return loss

    def run_asdl() -> Tensor:
        model.zero_grad(set_to_none=True)
        G = batch_gradient(model, closure)
        if G.shape != (n, d):
            raise RuntimeError(f"batch_gradient gave {tuple(G.shape)}, not (n, d) = ({n}, {d})")
        return G

    def run_kernel() -> Tensor:
        model.zero_grad(set_to_none=True)
        with extend(model, OP_GRAM_HADAMARD):
            # Where OP_GRAM_HADAMARD accumulates (asdl.kernel does the same, privately).
            model.kernel = torch.zeros(n, n, dtype=dtype, device=y.device)
            closure()
            K = model.kernel
        del model.kernel
        return K.double()

    return Prepared(run_kernel if kernel else run_asdl, "gram" if kernel else "grads",
                    "OP_GRAM_HADAMARD" if kernel else "batch_gradient",
                    cleanup=lambda: model.zero_grad(set_to_none=True))


def _sum_check(params: list[nn.Parameter], attr: str, factor: float) -> str:
    """Check the rescaling: the mean of factor × (the tool's per-sample gradients) is p.grad.

    Measured over all parameters together: some gradients are exactly zero in theory (the key
    bias of attention: softmax ignores a shift shared by all keys), so a per-parameter relative
    error would compare rounding noise with rounding noise.
    """
    diff, norm = 0.0, 0.0
    for p in params:
        per_sample = getattr(p, attr, None)
        if per_sample is None:
            return f"a parameter of shape {tuple(p.shape)} got no {attr}"
        expected = p.grad.double()
        diff += float((per_sample.double().mean(dim=0) * factor - expected).square().sum())
        norm += float(expected.square().sum())
    rel = math.sqrt(diff / max(norm, 1e-300))
    return "" if rel <= GRAM_RTOL else f"mean_i g_i ≠ p.grad (rel {rel:.1e}): wrong scaling"


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    batch: int
    method: str
    median_s: float = math.nan
    grads_s: float = math.nan  # per-sample gradients only (G formed), before G Gᵀ
    spread_s: tuple[float, float] = (math.nan, math.nan)
    ratio: float = math.nan
    peak_mb: float = math.nan  # RSS high-water mark during one run minus the baseline
    baseline_mb: float = math.nan  # RSS of the subprocess after model and data creation
    gram_check: str = ""  # "ok", "FAIL" or "n/a"
    gram_rel_err: float = math.nan
    note: str = ""
    reference: str = ""  # how the loop reference was computed ("loop float64", ...)


def synchronize() -> None:
    """Wait for queued CUDA kernels, so that a timer reading covers them (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_once(prep: Prepared) -> tuple[Tensor | None, float, float]:
    """One computation: (Gram or None, seconds to G or K, total seconds incl. G Gᵀ)."""
    synchronize()
    start = time.perf_counter()
    out = prep.run()
    synchronize()
    mid = time.perf_counter()
    if prep.returns == "grads":
        assert out is not None
        out = gram_of(out)
    synchronize()
    return out, mid - start, time.perf_counter() - start


def rel_error(K: Tensor, ref: Tensor) -> float:
    return float((K - ref).norm() / ref.norm())


def proc_status_mb(key: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MB."""
    return proc_status_kib(key) / 1024.0


def max_rss_mb() -> float:
    return max_rss_kib() / 1024.0


def current_and_peak_rss_mb() -> tuple[float, float]:
    """(RSS now, RSS high-water mark) of this process; ru_maxrss for both off Linux."""
    try:
        return proc_status_mb("VmRSS"), proc_status_mb("VmHWM")
    except (OSError, KeyError):
        return max_rss_mb(), max_rss_mb()


def memory_child(model_name: str, batch: int, method: str, device: str) -> None:
    """Entry point of the subprocess: one cold run, prints {baseline_mb, peak_mb} as JSON.

    On CUDA the figures are GPU memory instead: ``torch.cuda.memory_allocated`` after set-up
    and ``torch.cuda.max_memory_allocated`` during the run.

    Why not ru_maxrss: on Linux a child started by fork + exec inherits its parent's RSS
    high-water mark in ru_maxrss (exec folds the old address space's peak into it), so in a
    child of this (large) benchmark process it reads the parent's peak, not its own. VmHWM
    belongs to the new address space, and writing 5 to /proc/self/clear_refs resets it after
    the set-up, so the peak is exactly the method's own. ru_maxrss is the fallback off Linux.
    """
    model, x, y = make_problem(model_name, batch, device=device)
    prep = prepare(method, model, x, y)
    gc.collect()
    if device == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
        run_once(prep)
        peak = torch.cuda.max_memory_allocated() / 2**20
        print_json({"baseline_mb": baseline, "peak_mb": peak})
        return
    try:
        baseline = proc_status_mb("VmRSS")
        exact = reset_peak_rss()
        if not exact:
            baseline = proc_status_mb("VmHWM")
        run_once(prep)
        peak = proc_status_mb("VmHWM")
    except (OSError, KeyError):
        baseline = max_rss_mb()
        run_once(prep)
        peak = max_rss_mb()
    print_json({"baseline_mb": baseline, "peak_mb": peak})


def measure_memory(model_name: str, batch: int, method: str, threads: int | None,
                   device: str) -> tuple[float, float, str]:
    """(peak − baseline, baseline) in MB from a fresh interpreter; NaNs and a reason on error."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child",
           f"{model_name}:{batch}:{method}", "--device", device]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return math.nan, math.nan, f"memory child failed: {last_line(proc.stderr, '?')}"
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return data["peak_mb"] - data["baseline_mb"], data["baseline_mb"], ""


# --------------------------------------------------------------------------------------------
# Benchmark driver
# --------------------------------------------------------------------------------------------


def machine_description() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu_name()}, {os.cpu_count()} cores ({usable} usable){ram_text()}{gpu}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}")


def tool_versions() -> str:
    versions = []
    for dist in ("backpack-for-pytorch", "opacus", "nngeometry", "asdfghjkl", "transformers"):
        try:
            from importlib.metadata import version

            versions.append(f"{dist} {version(dist)}")
        except Exception:
            versions.append(f"{dist} not installed")
    return ", ".join(versions)


def fallback_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    """What the warnings of a run say about slow paths: ops vmap has no batching rule for (it
    loops over the samples), modules sgn_lab could not vmap (LastResortWarning: a loop of
    single-sample backward passes)."""
    notes = []
    looped = sorted({m.group(1).removeprefix("aten::") for w in caught
                     if (m := re.search(r"batching rule for (\S+?)\.", str(w.message)))})
    if looped:
        notes.append(f"vmap loops over samples for {', '.join(looped)}")
    modules = sorted({f"{m.group(1)} ({m.group(2)})" for w in caught
                      if w.category.__name__ == "LastResortWarning"
                      and (m := re.search(r"cannot transform module '([^']+)' \((\w+)\)",
                                          str(w.message)))})
    if modules:
        notes.append(f"LastResortWarning: one backward pass per sample, vmap cannot transform "
                     f"{', '.join(modules)}")
    return notes


def bench_one(model_name: str, batch: int, methods: tuple[str, ...], repeats: int, warmup: int,
              memory: bool, threads: int | None, device: str,
              ref_float64: bool = True) -> list[Result]:
    model, x, y = make_problem(model_name, batch, device=device)
    d = trainable_dim(model)
    console.print(f"\n[bold]{model_name}[/bold], batch {batch}, d = {d:,} parameters")
    start = time.perf_counter()
    reference, how = reference_gram(model, x, y, float64=ref_float64)
    console.print(f"reference: loop of {batch} single-sample backward passes in {how}, "
                  f"{time.perf_counter() - start:.1f} s")
    results = {m: Result(model_name, batch, m, reference=f"loop {how}") for m in methods}
    preps: dict[str, Prepared] = {}
    for method, res in results.items():
        try:
            prep = prepare(method, model, x, y)
        except Unavailable as exc:
            res.gram_check, res.note = "n/a", str(exc)
            continue
        # The first, untimed run is the warm-up and gives the Gram that is checked. vmap's
        # warnings about ops it has no batching rule for (it then loops over the samples) and
        # sgn_lab's LastResortWarning (a loop of backward passes) go into the note: they
        # explain slow rows.
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                K, _, _ = run_once(prep)
        except Exception as exc:  # a tool that breaks on this model: no number, the reason
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            res.gram_check, res.note = "n/a", f"raised {type(exc).__name__}: {first}"
            prep.cleanup()
            continue
        preps[method] = prep
        prep.note = "; ".join(filter(None, [prep.note, *fallback_notes(caught)]))
        for _ in range(warmup - 1):
            run_once(prep)
        problem = prep.verify()
        prep.cleanup()
        res.note = prep.note
        if K is not None:
            res.gram_rel_err = rel_error(K, reference)
            res.gram_check = "ok" if res.gram_rel_err <= GRAM_RTOL and not problem else "FAIL"
        if problem:
            res.note = f"{res.note}; {problem}" if res.note else problem
        del K

    # Repeats are interleaved across methods, so that a burst of load from other processes
    # on this shared machine spreads over all methods instead of landing on one of them.
    totals: dict[str, list[float]] = {m: [] for m in preps}
    grads: dict[str, list[float]] = {m: [] for m in preps}
    for _ in range(repeats):
        for method, prep in preps.items():
            gc.collect()  # a collection inside a timed region would land on a random method
            _, t_grads, t_total = run_once(prep)
            prep.cleanup()
            totals[method].append(t_total)
            grads[method].append(t_grads)
    for method, prep in preps.items():
        res = results[method]
        res.median_s, fastest, slowest = spread(totals[method])
        res.spread_s = (fastest, slowest)
        if prep.returns == "grads":
            res.grads_s = statistics.median(grads[method])
    preps.clear()
    gc.collect()

    if memory:
        for method, res in results.items():
            if res.gram_check == "n/a":
                continue
            res.peak_mb, res.baseline_mb, why = measure_memory(model_name, batch, method,
                                                                threads, device)
            if why:
                res.note = f"{res.note}; {why}" if res.note else why
    floor = results["floor"].median_s if "floor" in results else math.nan
    for res in results.values():
        res.ratio = res.median_s / floor
    return list(results.values())


def fmt_ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:,.1f}"


def fmt_mb(mb: float) -> str:
    return "—" if math.isnan(mb) else f"{mb:,.0f}"


def print_table(results: list[Result]) -> None:
    r0 = results[0]
    table = Table(title=f"{r0.model}, batch {r0.batch}", title_justify="left")
    for col in ("method", "median ms", "min–max ms", "grads ms", "× floor", "peak MB",
                "base MB", "Gram vs loop", "note"):
        table.add_column(col, justify="left" if col in ("method", "note") else "right",
                         overflow="fold")
    for r in results:
        if r.gram_check == "ok":
            check = f"[green]✓[/green] {r.gram_rel_err:.1e}"
        elif r.gram_check == "FAIL":
            check = f"[red]✗ {r.gram_rel_err:.1e}[/red]"
        else:
            check = r.gram_check or "—"
        span = ("n/a" if math.isnan(r.spread_s[0])
                else f"{r.spread_s[0] * 1e3:,.1f}–{r.spread_s[1] * 1e3:,.1f}")
        table.add_row(r.method, fmt_ms(r.median_s), span,
                      "" if math.isnan(r.grads_s) else fmt_ms(r.grads_s),
                      "n/a" if math.isnan(r.ratio) else f"{r.ratio:.2f}",
                      fmt_mb(r.peak_mb), fmt_mb(r.baseline_mb), check, r.note)
    console.print(table)


def targets(results: list[Result]) -> list[str]:
    """PASS/FAIL lines of the targets for one (model, batch). Only checked numbers count: a
    method whose Gram disagrees with the loop computed something else."""
    by = {r.method: r for r in results}
    ok = {m: r for m, r in by.items() if r.gram_check == "ok" and not math.isnan(r.median_s)}
    model, batch = results[0].model, results[0].batch
    seq = SEQ_LEN.get(model)
    lines = []
    gram = ok.get("gram")
    if gram is not None and not math.isnan(gram.ratio):
        # Meant for every model without a sequence and wherever n ≤ T; for n > T no exact
        # method can meet it (the bound in benchmarks/README.md): still judged, and marked.
        if seq is None:
            scope = "no sequence"
        elif batch <= seq:
            scope = f"n = {batch} ≤ T = {seq}"
        else:
            scope = f"n = {batch} > T = {seq}: beyond the n ≤ T target"
        lines.append(target_line(gram.ratio <= GRAM_TARGET, f"{model} b{batch}",
                                 f"Gram path {gram.ratio:.2f}× the floor (target ≤ "
                                 f"{GRAM_TARGET}×; {scope})"))
    if gram is not None:
        peers = [ok[m] for m in PEERS if m in ok]
        if peers:
            best = min(peers, key=lambda r: r.median_s)
            ratio = gram.median_s / best.median_s
            lines.append(target_line(ratio <= 1.0, f"{model} b{batch}",
                                     f"Gram path {ratio:.2f}× {best.method} (the fastest peer "
                                     "with the right K; target ≤ 1.00×)"))
        elif any(m in by for m in PEERS):
            lines.append(target_line(None, f"{model} b{batch}",
                                     "Gram path vs peers: no peer gave the right K here"))
    vmap = ok.get("vmap")
    if vmap is None or math.isnan(vmap.grads_s):
        return lines
    tools = [ok[m] for m in GRAD_TOOLS if m in ok]
    if tools:
        best = min(tools, key=lambda r: r.grads_s)
        ratio = vmap.grads_s / best.grads_s
        lines.append(target_line(ratio <= 1.0, f"{model} b{batch}",
                                 f"per-sample grads {ratio:.2f}× {best.method} (fastest tool); "
                                 f"with G Gᵀ {vmap.median_s / best.median_s:.2f}× "
                                 "(target ≤ 1.00×)"))
    elif any(m in by for m in GRAD_TOOLS):
        lines.append(target_line(None, f"{model} b{batch}",
                                 "per-sample grads vs BackPACK/Opacus/ASDL: none ran and gave "
                                 "a correct Gram here"))
    loop = ok.get("loop")
    if loop is not None and not math.isnan(loop.grads_s):
        ratio = vmap.grads_s / loop.grads_s
        lines.append(target_line(ratio <= 1.0, f"{model} b{batch}",
                                 f"per-sample grads {ratio:.2f}× the Python loop "
                                 "(target ≤ 1.00×)"))
    return lines


def padded_targets(results: list[Result]) -> list[str]:
    """The padded batch's Gram path against its unpadded twin's (same weights, same batch)."""
    gram = {(r.model, r.batch): r for r in results
            if r.method == "gram" and r.gram_check == "ok" and not math.isnan(r.median_s)}
    lines = []
    for (model, batch), padded in gram.items():
        twin = gram.get((PADDED_TWIN.get(model, ""), batch))
        if twin is None:
            continue
        ratio = padded.median_s / twin.median_s
        lines.append(target_line(ratio <= PADDED_TARGET, f"{model} b{batch}",
                                 f"Gram path {ratio:.2f}× {twin.model} ({fmt_ms(padded.median_s)}"
                                 f" against {fmt_ms(twin.median_s)} ms; target ≤ "
                                 f"{PADDED_TARGET}×)"))
    return lines


def seq_summary(verdicts: list[str]) -> list[str]:
    """One line for the target "Gram path ≤ 1.5× the floor wherever n ≤ T"."""
    judged = [v for v in verdicts if "× the floor" in v and "≤ T =" in v]
    if not judged:
        return []
    passed = sum(v.startswith("PASS") for v in judged)
    verdict = "PASS" if passed == len(judged) else "FAIL"
    return [f"{verdict:<5} Gram path ≤ {GRAM_TARGET}× the floor wherever n ≤ T: "
            f"{passed} of {len(judged)} rows"]


CSV_COLUMNS = ["model", "batch", "method", "median_s", "ratio_to_floor", "peak_mb",
               "gram_check", "grads_s", "min_s", "max_s", "baseline_mb", "gram_rel_err",
               "threads", "note", "checked_against"]


def write_csv(path: str, results: list[Result], merge: bool = False) -> None:
    """The first seven columns are the documented format; the rest are extras for analysis.

    ``merge``: rows already in ``path`` for (model, batch) pairs not in ``results`` are kept
    (before the new ones); rows from before the loop reference say so in checked_against.
    """
    kept: list[dict[str, str]] = []
    if merge and os.path.exists(path):
        measured = {(r.model, str(r.batch)) for r in results}
        with open(path, newline="") as f:
            kept = [row for row in csv.DictReader(f)
                    if (row["model"], row["batch"]) not in measured]
        for row in kept:  # rows written before the loop reference had no such column
            if not row.get("checked_against") and row["gram_check"] in ("ok", "FAIL"):
                row["checked_against"] = "per_sample_gram"

    def num(v: float, digits: int = 6) -> str:
        return "" if math.isnan(v) else f"{v:.{digits}g}"

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for row in kept:
            w.writerow([row.get(c, "") for c in CSV_COLUMNS])
        for r in results:
            w.writerow([r.model, r.batch, r.method, num(r.median_s), num(r.ratio, 4),
                        num(r.peak_mb, 5), r.gram_check, num(r.grads_s), num(r.spread_s[0]),
                        num(r.spread_s[1]), num(r.baseline_mb, 5), num(r.gram_rel_err, 3),
                        torch.get_num_threads(), r.note,
                        r.reference if r.gram_check in ("ok", "FAIL") else ""])


def write_markdown(path: str, results: list[Result], header: str, verdicts: list[str]) -> None:
    """Compact tables for the README: one row per (model, batch), one column per method."""
    methods = [m for m in METHODS if any(r.method == m for r in results)]
    rows: dict[tuple[str, int], dict[str, Result]] = {}
    for r in results:
        rows.setdefault((r.model, r.batch), {})[r.method] = r
    head = "| model | batch | " + " | ".join(methods) + " |"
    rule = "|---|---:|" + "---:|" * len(methods)

    def time_cell(r: Result | None) -> str:
        if r is None or math.isnan(r.median_s):
            return "n/a"
        cell = fmt_ms(r.median_s) if r.method == "floor" else (
            f"{fmt_ms(r.median_s)} ({r.ratio:.1f}×)")
        return cell + (" ✗" if r.gram_check == "FAIL" else "")

    lines = [header, "", "Median time in ms (× the floor); ✗: its Gram disagrees with the "
             "loop's.", "", head, rule]
    for (model, batch), by in rows.items():
        lines.append(f"| {model} | {batch} | "
                     + " | ".join(time_cell(by.get(m)) for m in methods) + " |")
    per_sample = [m for m in methods if m in PER_SAMPLE]
    if per_sample:
        lines += ["", "Of which per-sample gradients (G formed, before G Gᵀ), median ms:", "",
                  "| model | batch | " + " | ".join(per_sample) + " |",
                  "|---|---:|" + "---:|" * len(per_sample)]
        for (model, batch), by in rows.items():
            cells = [fmt_ms(by[m].grads_s) if m in by else "n/a" for m in per_sample]
            lines.append(f"| {model} | {batch} | " + " | ".join(cells) + " |")
    lines += ["", "Peak memory in MB above the baseline (RSS after model and data creation):",
              "", head, rule]
    for (model, batch), by in rows.items():
        cells = [fmt_mb(by[m].peak_mb) if m in by and not math.isnan(by[m].peak_mb) else "n/a"
                 for m in methods]
        lines.append(f"| {model} | {batch} | " + " | ".join(cells) + " |")
    errors = [r.gram_rel_err for r in results if r.gram_check == "ok"]
    # One note per (method, model): the batch sizes share the reason.
    notes = sorted({(r.method, r.model): f"{r.method} on {r.model}: {r.note}" for r in results
                    if r.gram_check in ("n/a", "FAIL") and r.note}.values())
    lines += [""]
    if errors:
        lines.append(f"Gram checks against the loop passed: relative error ≤ "
                     f"{max(errors):.0e} (tolerance {GRAM_RTOL:g}).")
    lines += [f"- {note}" for note in notes]
    lines += ["", "```", *verdicts, "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Scale check
# --------------------------------------------------------------------------------------------


def scale_check(n: int, width: int, depth: int, device: str) -> None:
    """SGN of a ≥10M-parameter MLP over n samples from the Gram path, with time and peak RSS.

    On CUDA the peak RSS is the host's; the GPU's peak is printed as well.
    """
    torch.manual_seed(0)
    model = mlp((784, *([width] * depth), 10)).train()
    x, y = torch.randn(n, 784), torch.randint(0, 10, (n,))
    model, x, y = model.to(device), x.to(device), y.to(device)
    d = trainable_dim(model)
    gc.collect()
    baseline, _ = current_and_peak_rss_mb()
    console.print(f"[bold]scale check[/bold]: MLP 784-{'-'.join([str(width)] * depth)}-10, "
                  f"d = {d:,} parameters, n = {n} samples; baseline RSS {baseline:,.0f} MB")
    console.print(f"  G would be n × d × 4 B = {n * d * 4 / 2**30:,.1f} GiB in float32: "
                  "per-sample gradients are never formed")

    synchronize()
    start = time.perf_counter()
    K = per_sample_gram(model, nn.CrossEntropyLoss(), x, y)
    synchronize()
    t_gram = time.perf_counter() - start
    _, rss_gram = current_and_peak_rss_mb()
    acts = sum(n * w for w in (784, *([width] * depth))) * 4 / 2**20
    console.print(f"  per_sample_gram on all {n} samples at once (no chunking needed: the layer "
                  f"inputs and output signals are ~{2 * acts:,.0f} MB in float32): "
                  f"{t_gram:.1f} s, peak RSS {rss_gram:,.0f} MB "
                  f"(+{rss_gram - baseline:,.0f} MB over the baseline)")

    start = time.perf_counter()
    stats = sgn_lab.noise_stats(gram=K, dim=d)
    trace, eff_rank, eigenvalues = stats.trace, stats.effective_rank, stats.eigenvalues
    how = "sgn_lab.noise_stats(gram=K, dim=d)"
    t_stats = time.perf_counter() - start
    _, rss = current_and_peak_rss_mb()
    top = ", ".join(f"{v:.3g}" for v in eigenvalues[:5].tolist())
    console.print(f"  SGN via {how}: {t_stats:.1f} s")
    console.print(f"  tr(S) = {trace:.4g}, effective rank = {eff_rank:.1f} of {n - 1}, "
                  f"top eigenvalues of S: {top}")
    verdict = "PASS" if rss <= SCALE_RSS_LIMIT_MB else "FAIL"
    console.print(f"  total {t_gram + t_stats:.1f} s; peak RSS {rss:,.0f} MB "
                  f"(+{rss - baseline:,.0f} MB over the baseline) — {verdict} "
                  f"(target ≤ {SCALE_RSS_LIMIT_MB:,.0f} MB)")
    if device == "cuda":
        console.print(f"  GPU peak {torch.cuda.max_memory_allocated() / 2**20:,.0f} MB")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: batch 16, one repeat, no memory subprocesses (< 1 min)")
    p.add_argument("--models", default=None,
                   help=f"comma list from {', '.join(MODELS)} (default: all; in --quick "
                        f"{', '.join(QUICK_MODELS)})")
    p.add_argument("--batches", default=None,
                   help="comma list of batch sizes (default: each model's own, "
                        + "; ".join(f"{m} {','.join(map(str, b))}" for m, b in MODELS.items())
                        + ")")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {METHODS}")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs per method before timing (the first gives the Gram that "
                        "is checked), at least 1")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure peak RSS in a subprocess per method (default: on, off in "
                        "--quick)")
    p.add_argument("--out", help="write the results as CSV to this file")
    p.add_argument("--merge", action="store_true",
                   help="with --out: keep the rows of the existing file for the (model, batch) "
                        "pairs this run does not measure, replace the others")
    p.add_argument("--markdown", help="also write a Markdown table (for the README)")
    p.add_argument("--scale", action="store_true",
                   help="scale check: SGN of a 14M-parameter MLP over 4096 samples")
    p.add_argument("--scale-n", type=int, default=4096)
    p.add_argument("--scale-width", type=int, default=2048)
    p.add_argument("--scale-depth", type=int, default=4)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where models and batches live (cuda: GPU timings with synchronisation, "
                        "peak MB from torch.cuda.max_memory_allocated)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: leave torch's machine default)")
    p.add_argument("--reference", choices=("float64", "float32"), default=None,
                   help="dtype of the loop that every Gram is checked against (default: "
                        "float64 where its n × d matrix fits in 2 GiB; float32 in --quick)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)  # internal: MODEL:BATCH:METHOD
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 1
        if args.batches is None:
            args.batches = "16"
    if args.models is None:
        args.models = ",".join(QUICK_MODELS if args.quick else MODELS)
    if args.memory is None:
        args.memory = not args.quick
    if args.reference is None:
        args.reference = "float32" if args.quick else "float64"
    args.warmup = max(args.warmup, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # BackPACK's and Opacus's full backward hooks warn when the model's input does not require
    # a gradient (always the case here); harmless, and it would flood the tables.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    # ASDL registers the old register_backward_hook; torch warns that it is deprecated. The
    # check against the loop says whether its signals were right.
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    # Reported once per row in the note instead (see bench_one).
    warnings.filterwarnings("ignore", message="There is a performance drop")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        model_name, batch, method = args.memory_child.split(":")
        memory_child(model_name, int(batch), method, args.device)
        return 0

    header = machine_description()
    console.print(f"[bold]machine[/bold]: {header}")
    console.print(f"[bold]tools[/bold]: {tool_versions()}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device on this machine")
    if args.scale:
        scale_check(args.scale_n, args.scale_width, args.scale_depth, args.device)
        return 0

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for name in models:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for name in methods:
        if name not in METHODS:
            raise SystemExit(f"unknown method {name!r}; choose from {METHODS}")
    console.print(f"timing: median of {args.repeats} repeats after {args.warmup} warm-up; "
                  f"Gram check: relative Frobenius error ≤ {GRAM_RTOL:g} against a loop of "
                  f"single-sample backward passes ({args.reference}"
                  f"{' where it fits' if args.reference == 'float64' else ''}); peak MB: RSS "
                  "high-water mark of a fresh subprocess during one run minus its RSS after "
                  "model/data creation (base MB)")

    all_results: list[Result] = []
    verdicts: list[str] = []
    for name in models:
        batches = (MODELS[name] if args.batches is None
                   else tuple(int(b) for b in args.batches.split(",") if b.strip()))
        for batch in batches:
            results = bench_one(name, batch, methods, args.repeats, args.warmup, args.memory,
                                args.threads, args.device, args.reference == "float64")
            print_table(results)
            lines = targets(results)
            for line in lines:
                colour = "green" if line.startswith("PASS") else "red" if line.startswith(
                    "FAIL") else "yellow"
                console.print(f"[{colour}]{line}[/{colour}]")
            verdicts += lines
            all_results += results

    verdicts += padded_targets(all_results) + seq_summary(verdicts)
    console.print("\n[bold]targets[/bold]")
    for line in verdicts:
        console.print(line)
    if args.out:
        write_csv(args.out, all_results, merge=args.merge)
        console.print(f"results written to {args.out}")
    if args.markdown:
        write_markdown(args.markdown, all_results, f"Machine: {header}", verdicts)
        console.print(f"Markdown table written to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
