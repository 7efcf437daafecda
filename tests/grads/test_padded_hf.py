"""Hugging Face models on padded batches: (input_ids, attention_mask) through the fast routes.

transformers reads a padding mask's values to decide whether to build the 4-D attention mask
at all (``padding_mask.all()``), which vmap refuses; ``sgn_lab.grads.hf_masks`` makes the
mask always built under our passes. Models are built from configs with random weights
(nothing is downloaded; dropout 0; width 16, one layer, two heads, vocabulary 50): GPT-2
(eager, sdpa; right padding), Llama (left padding; sdpa in float64, eager in float32), BERT and
RoBERTa sequence classifiers (sdpa, eager; right padding), T5 (right padding), batches where
some samples have no padding, and unpadded batches. The loss is cross-entropy with
``ignore_index=-100`` (labels -100 at padding: the mean over each sample's real tokens).

Checked against ``helpers.loop_matrix`` (one ordinary backward pass per sample, the sample
alone with its own padding), never against sgn_lab: the Gram and mean of ``gram_result`` and
``per_sample_grads`` (float64 relative 1e-10, float32 1e-4), no parameter on the ``loop``
route and no LastResortWarning; the first-call checks accept the padded batches; transformers'
``is_tracing`` functions are its own again after a call, also one that raised inside the pass;
the model's own batched outputs are bit-identical before and after.
"""

import sys
import warnings

import pytest
import torch
from helpers import loop_matrix, relative_error, seeded
from torch import nn
from torch.nn import functional as F

from sgn_lab.grads import flatten_grads, gram_result, per_sample_grads
from sgn_lab.grads.vmap import LastResortWarning

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
transformers.logging.set_verbosity_error()
pytestmark = [pytest.mark.usefixtures("one_thread"),
              # torch's CPU flash attention has no batching rule: vmap's slow fallback warns.
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]
D, F32 = torch.float64, torch.float32
VOCAB, T, N = 50, 8, 6


class Tokens(nn.Module):
    """A Hugging Face model as ``forward(ids, mask) -> logits``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask).logits


class Seq2Seq(nn.Module):
    """An encoder-decoder as ``forward(ids, mask, decoder_ids) -> logits``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask, decoder_ids):
        return self.model(input_ids=ids, attention_mask=mask,
                          decoder_input_ids=decoder_ids).logits


def token_loss(logits, labels):
    """Mean cross-entropy over the sample's real tokens (labels -100 elsewhere)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100)


def gpt2(attention):
    return Tokens(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, attn_implementation=attention)))


def llama(attention):
    return Tokens(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
        attention_dropout=0.0, use_cache=False, attn_implementation=attention)))


def encoder(config_class, model_class):
    def make(attention):
        config = config_class(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=3, attn_implementation=attention)
        return Tokens(model_class(config))

    return make


bert = encoder(transformers.BertConfig, transformers.BertForSequenceClassification)
roberta = encoder(transformers.RobertaConfig, transformers.RobertaForSequenceClassification)


def t5(attention):
    return Seq2Seq(transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, use_cache=False, pad_token_id=0, decoder_start_token_id=0,
        attn_implementation=attention)))


def padded(lengths, side="right", pad=0, length=T, seed=0):
    """Token ids (n, length) with ``pad`` outside each sample's real tokens, and the mask."""
    ids = torch.randint(2, VOCAB, (len(lengths), length),
                        generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    for i, real in enumerate(lengths):
        if side == "right":
            mask[i, :real] = 1
        else:
            mask[i, length - real:] = 1
    return ids.masked_fill(mask == 0, pad), mask


def next_tokens(ids, mask):
    """Next-token labels, -100 where a position or its next one is padding."""
    labels = torch.full_like(ids, -100)
    real = mask[:, :-1].bool() & mask[:, 1:].bool()
    labels[:, :-1] = torch.where(real, ids[:, 1:], -100)
    return labels


def classes(n=N):
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(1))


PADDED = [3, 7, 5, 2, 6, 4]  # every sample padded
MIXED = [8, 3, 8, 5, 8, 2]  # half of them not padded at all
FULL = [T] * N


def language(lengths, side):
    ids, mask = padded(lengths, side)
    return (ids, mask), next_tokens(ids, mask)


def classification(lengths, pad):
    ids, mask = padded(lengths, "right", pad=pad)
    return (ids, mask), classes()


def translation(lengths):
    ids, mask = padded(lengths, "right")
    decoder_ids, decoder_mask = padded([2, 4, 3, 5, 2, 4], "right", length=5, seed=2)
    return (ids, mask, decoder_ids), next_tokens(decoder_ids, decoder_mask)


# (id, model, attention, dtype, (inputs, targets), loss)
CASES = [
    ("gpt2-eager", gpt2, "eager", D, language(PADDED, "right"), token_loss),
    ("gpt2-sdpa", gpt2, "sdpa", D, language(PADDED, "right"), token_loss),
    ("gpt2-sdpa-mixed", gpt2, "sdpa", D, language(MIXED, "right"), token_loss),
    ("gpt2-sdpa-unpadded", gpt2, "sdpa", D, language(FULL, "right"), token_loss),
    # HF's eager mask with left padding gives NaN in the model's own float64 forward.
    ("llama-sdpa-left", llama, "sdpa", D, language(PADDED, "left"), token_loss),
    ("llama-sdpa-left-mixed", llama, "sdpa", D, language(MIXED, "left"), token_loss),
    ("llama-eager-left-float32", llama, "eager", F32, language(PADDED, "left"), token_loss),
    ("bert-sdpa", bert, "sdpa", D, classification(PADDED, 0), F.cross_entropy),
    ("bert-eager", bert, "eager", D, classification(PADDED, 0), F.cross_entropy),
    ("bert-sdpa-mixed", bert, "sdpa", D, classification(MIXED, 0), F.cross_entropy),
    ("bert-sdpa-unpadded", bert, "sdpa", D, classification(FULL, 0), F.cross_entropy),
    ("roberta-sdpa", roberta, "sdpa", D, classification(PADDED, 1), F.cross_entropy),
    ("roberta-eager", roberta, "eager", D, classification(PADDED, 1), F.cross_entropy),
    ("t5", t5, "eager", D, translation(PADDED), token_loss),
]
PARAMS = [pytest.param(*case[1:], id=case[0]) for case in CASES]
ARGS = ("make", "attention", "dtype", "data", "loss_fn")
RTOL = {D: 1e-10, F32: 1e-4}


@pytest.fixture(scope="module")
def models():
    """Each (architecture, attention, dtype) built once for the module, in eval mode."""
    built = {}

    def get(make, attention, dtype):
        key = (make, attention, dtype)
        if key not in built:
            with seeded(0):
                built[key] = make(attention).to(dtype).eval()
        return built[key]

    return get


@pytest.mark.parametrize(ARGS, PARAMS)
def test_padded_batches_equal_the_loop_on_the_fast_routes(models, make, attention, dtype,
                                                          data, loss_fn):
    model = models(make, attention, dtype)
    assert model.model.config._attn_implementation == attention
    inputs, targets = data
    want = loop_matrix(model, loss_fn, inputs, targets)  # each sample alone, with its padding
    assert torch.isfinite(want).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LastResortWarning)
        result = gram_result(model, loss_fn, inputs, targets, with_mean=True, verify=0)
        G = flatten_grads(per_sample_grads(model, loss_fn, inputs, targets, verify=0))
    rtol = RTOL[dtype]
    assert relative_error(result.gram, want @ want.T) <= rtol
    assert relative_error(result.mean, want.mean(dim=0)) <= rtol
    assert relative_error(G, want) <= rtol
    assert result.coverage.names("loop") == [], result.coverage.summary()


@pytest.mark.parametrize(ARGS, PARAMS)
def test_the_first_call_checks_accept_padded_batches(models, make, attention, dtype, data,
                                                     loss_fn):
    # verify=None: the consistency check (batched forward against batch-of-one passes) and
    # the Gram's spot check run on a model's first call; a padded batch is no mixing.
    with seeded(0):
        model = make(attention).to(dtype).eval()  # a model of its own: never checked before
    inputs, targets = data
    want = loop_matrix(model, loss_fn, inputs, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LastResortWarning)
        K = gram_result(model, loss_fn, inputs, targets).gram
        G = flatten_grads(per_sample_grads(model, loss_fn, inputs, targets))
    assert relative_error(K, want @ want.T) <= RTOL[dtype]
    assert relative_error(G, want) <= RTOL[dtype]


def tracing_functions():
    """Every ``is_tracing`` attribute of transformers' loaded modules, by module name."""
    return {name: module.is_tracing for name, module in list(sys.modules.items())
            if name.startswith("transformers") and module is not None
            and callable(getattr(module, "is_tracing", None))}


def test_transformers_is_tracing_is_its_own_again_after_a_call(models):
    model = models(gpt2, "sdpa", D)
    (ids, mask), labels = language(PADDED, "right")
    model(ids, mask)  # transformers.masking_utils and friends are loaded
    original = transformers.utils.import_utils.is_tracing
    before = tracing_functions()
    assert "transformers.masking_utils" in before
    seen = []

    def observing_loss(logits, targets):
        seen.append(transformers.masking_utils.is_tracing is original)
        return token_loss(logits, targets)

    gram_result(model, observing_loss, (ids, mask), labels, verify=0)
    per_sample_grads(model, observing_loss, (ids, mask), labels, verify=0)
    assert False in seen  # replaced during the passes
    assert tracing_functions() == before
    assert transformers.masking_utils.is_tracing is transformers.utils.import_utils.is_tracing

    def per_token(logits, targets):  # not a scalar: refused inside the vmapped pass
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1),
                               reduction="none")

    for compute in (gram_result, per_sample_grads):
        with pytest.raises(ValueError, match="scalar"):
            compute(model, per_token, (ids, mask), labels, verify=0)
        assert tracing_functions() == before
        assert transformers.masking_utils.is_tracing is original


@pytest.mark.parametrize(("make", "attention", "dtype", "data"), [
    pytest.param(gpt2, "sdpa", D, language(MIXED, "right"), id="gpt2-sdpa"),
    pytest.param(llama, "sdpa", D, language(PADDED, "left"), id="llama-sdpa-left"),
    pytest.param(bert, "eager", D, classification(PADDED, 0), id="bert-eager"),
])
def test_the_models_own_outputs_are_unchanged(models, make, attention, dtype, data):
    model = models(make, attention, dtype)
    inputs, targets = data
    loss_fn = token_loss if targets.dim() == 2 else F.cross_entropy
    with torch.no_grad():
        before = model(*inputs)
    gram_result(model, loss_fn, inputs, targets, verify=0)
    per_sample_grads(model, loss_fn, inputs, targets, verify=0)
    with torch.no_grad():
        after = model(*inputs)
    assert torch.equal(before, after)
    assert torch.isfinite(before).all()
