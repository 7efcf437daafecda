"""Real architectures: Hugging Face GPT-2, BERT and ViT, torch's encoder layer, RMSNorm.

Models are built from configs with random weights (nothing is downloaded). For each:
per-sample gradients equal the loop of single-sample backward passes (float64, rtol 1e-10),
the Gram equals the loop's G Gᵀ (relative 1e-10 in float64, float32 within its precision),
and no parameter takes the slow vmap route except where the coverage says why.
"""

import pytest
import torch
from grads.oracle import labels
from helpers import loop_grads, loop_matrix, relative_error, seeded
from torch import nn
from torch.nn import functional as F

from sgn_lab.grads import flatten_grads, gram_result, per_sample_grads

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")
D = torch.float64


class LanguageModel(nn.Module):
    """A Hugging Face causal LM as a function of token ids to logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def next_token_loss(logits, ids):
    """Mean next-token cross-entropy of one window (a sample is one window)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class Classifier(nn.Module):
    """A Hugging Face sequence or image classifier as a function of its input to logits."""

    def __init__(self, model, key):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return self.model(**{self.key: x}).logits


def gpt2(**config):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40,
                                  n_positions=16, **config)
    return LanguageModel(transformers.GPT2LMHeadModel(cfg))


def bert():
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                  intermediate_size=32, vocab_size=40,
                                  max_position_embeddings=16, num_labels=3)
    return Classifier(transformers.BertForSequenceClassification(cfg), "input_ids")


def vit():
    cfg = transformers.ViTConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                 intermediate_size=32, image_size=8, patch_size=4,
                                 num_channels=3, num_labels=3)
    return Classifier(transformers.ViTForImageClassification(cfg), "pixel_values")


class Encoder(nn.Module):
    """torch's TransformerEncoderLayer (its own multi-head attention), pooled, a head."""

    def __init__(self, batch_first, norm_first=False):
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=batch_first,
                                                norm_first=norm_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x (n, T, 8), fed sequence-first when batch_first is False
        h = self.layer(x if self.batch_first else x.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(dim=1))


class RMSBlock(nn.Module):
    """A Llama-style block: RMSNorm, gated MLP, residual."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(8)
        self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.norm(x)
        h = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(h.mean(dim=1))


def tokens(n, T, vocab=40, seed=0):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


def problems():
    """(id, make model, inputs, targets, loss): every architecture of the issue."""
    images = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    seq = torch.randn(5, 6, 8, generator=torch.Generator().manual_seed(3))
    return [
        ("gpt2-5x7", gpt2, tokens(5, 7), tokens(5, 7), next_token_loss),
        ("gpt2-3x11", gpt2, tokens(3, 11, seed=4), tokens(3, 11, seed=4), next_token_loss),
        ("bert", bert, tokens(5, 7), labels(5, seed=1), F.cross_entropy),
        ("vit", vit, images, labels(5, seed=1), F.cross_entropy),
        ("encoder-seq-first", lambda: Encoder(False), seq, labels(5, seed=1), F.cross_entropy),
        ("encoder-batch-first", lambda: Encoder(True, True), seq, labels(5, seed=1),
         F.cross_entropy),
        ("rmsnorm-block", RMSBlock, seq, labels(5, seed=1), F.cross_entropy),
    ]


PROBLEMS = problems()


@pytest.mark.parametrize(("make", "x", "y", "loss"), [p[1:] for p in PROBLEMS],
                         ids=[p[0] for p in PROBLEMS])
def test_float64_per_sample_grads_and_gram_equal_the_loop(make, x, y, loss):
    with seeded(0):
        model = make().double().eval()
    x = x.double() if x.is_floating_point() else x
    reference = loop_grads(model, loss, x, y)
    grads = per_sample_grads(model, loss, x, y)
    G = torch.cat([g.reshape(g.shape[0], -1) for g in reference.values()], dim=1).double()
    scale = float(torch.linalg.norm(G))
    for name, want in reference.items():  # a key bias before a softmax has zero gradient
        error = float(torch.linalg.norm(grads[name] - want))
        assert error <= 1e-10 * max(float(torch.linalg.norm(want)), 1e-6 * scale), name
    result = gram_result(model, loss, x, y, with_mean=True, verify=3)
    assert relative_error(result.gram, G @ G.T) <= 1e-10
    assert relative_error(result.mean, G.mean(dim=0)) <= 1e-10
    slow = {p.name: p.reason for p in result.coverage.parameters if p.route == "vmap"}
    assert set(slow) <= {"model.vit.embeddings.cls_token"}, slow  # .expand: no rule


@pytest.mark.parametrize(("make", "x", "y", "loss"), [p[1:] for p in PROBLEMS],
                         ids=[p[0] for p in PROBLEMS])
def test_float32_gram_within_float32_precision(make, x, y, loss):
    with seeded(0):
        model = make().eval()
    G = loop_matrix(model.double(), loss, x.double() if x.is_floating_point() else x, y)
    model = model.float()
    K = gram_result(model, loss, x, y, verify=3).gram
    assert relative_error(K, G @ G.T) <= 1e-5


def test_gpt2_tied_head_and_position_embedding_routes():
    with seeded(1):
        model = gpt2().double().eval()
    result = gram_result(model, next_token_loss, tokens(4, 9), tokens(4, 9))
    frame = result.coverage.to_frame().set_index("name")
    wte = "model.transformer.wte.weight"
    assert model.model.lm_head.weight is model.model.transformer.wte.weight  # tied
    assert frame.loc[wte, "operations"] == "linear + embedding"
    assert "cross terms" in frame.loc[wte, "reason"]
    assert frame.loc["model.transformer.wpe.weight", "operations"] == "embedding"
    # HF's Conv1D calls torch.addmm: a rule of its own, not the vmap route.
    assert frame.loc["model.transformer.h.0.attn.c_attn.weight", "operations"] == "addmm"


def test_gpt2_with_dropout_matches_vmap_under_the_same_seed():
    with seeded(2):
        model = gpt2(resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.0).double().train()
    ids = tokens(4, 6)
    with seeded(5):
        K = gram_result(model, next_token_loss, ids, ids).gram
    with seeded(5):
        G = flatten_grads(per_sample_grads(model, next_token_loss, ids, ids, chunk_size=4))
    assert relative_error(K, G @ G.T) <= 1e-10
