"""GPT-2, BERT and ViT built from configs for a task, and models loaded from a local folder.

Tiny models (width 16, one or two layers) on tiny tasks (n <= 5, T <= 7, 8x8 images): the
logits' shapes, the task's loss, causality of the language heads, per-sample gradients and
Grams against the loop of single-sample backward passes, seeding, dropout, save/load, and one
ValueError (or FileNotFoundError) per bad input. Nothing is downloaded.
"""

import json
import subprocess
import sys

import pytest
import torch
from helpers import loop_grads, relative_error, seeded

import sgn_lab
from sgn_lab.data import Task
from sgn_lab.models import TRANSFORMERS, Logits, build_transformer, load_pretrained

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"width": 16, "depth": 2, "heads": 2}


def language_task(n=5, T=7, vocab=11, seed=0):
    """Windows of random tokens x (n, T) and their next tokens y (n, T)."""
    seq = torch.randint(0, vocab, (2 * n, T + 1), generator=torch.Generator().manual_seed(seed))
    x, y = seq[:, :-1], seq[:, 1:]
    return Task("language", x[:n], y[:n], x[n:], y[n:], num_classes=vocab)


def token_task(n=5, T=6, vocab=13, classes=3, seed=1):
    """Token ids x (n, T) with one label each, y (n,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (2 * n, T), generator=g)
    y = torch.randint(0, classes, (2 * n,), generator=g)
    return Task("tokens", x[:n], y[:n], x[n:], y[n:], num_classes=classes)


def image_task(n=5, channels=1, size=(8, 8), classes=3, seed=2):
    """Images x (n, C, H, W) float32 with one label each, y (n,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, channels, *size, generator=g)
    y = torch.randint(0, classes, (2 * n,), generator=g)
    return Task("images", x[:n], y[:n], x[n:], y[n:], num_classes=classes)


CASES = [  # (model, make task, logits shape of one training batch)
    ("gpt2", language_task, (5, 7, 11)),
    ("bert", language_task, (5, 7, 11)),
    ("bert", token_task, (5, 3)),
    ("vit", image_task, (5, 3)),
]
IDS = ["gpt2-language", "bert-language", "bert-tokens", "vit-images"]


def build(name, task, seed=0, **options):
    with seeded(seed):
        return build_transformer(name, task, **{**TINY, **options})


@pytest.mark.parametrize(("name", "make", "shape"), CASES, ids=IDS)
def test_logits_have_the_task_shape_and_its_loss_is_finite(name, make, shape):
    task = make()
    model = build(name, task)
    assert isinstance(model, Logits) and model.training
    assert model.input_name == ("pixel_values" if name == "vit" else "input_ids")
    assert model.model.config._attn_implementation == "eager"
    logits = model(task.x_train)
    assert logits.shape == shape
    loss = task.loss_fn(logits, task.y_train)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_gpt2_is_gpt2lmheadmodel_of_the_same_config_and_seed():
    task = language_task()
    model = build("gpt2", task, seed=3)
    config = transformers.GPT2Config(vocab_size=11, n_positions=7, n_embd=16, n_layer=2,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with seeded(3):
        direct = transformers.GPT2LMHeadModel(config)
    assert model.state_dict().keys() == {f"model.{k}" for k in direct.state_dict()}
    for key, value in direct.state_dict().items():
        assert torch.equal(model.state_dict()[f"model.{key}"], value), key
    x = task.x_train
    want = direct(input_ids=x).logits  # the default (sdpa) attention: same numbers
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(model(x), model.model(input_ids=x).logits)


def changes_before(model, x, t):
    """Largest change of the logits at positions < t, and at t, when token t changes."""
    changed = x.clone()
    changed[:, t] = (x[:, t] + 1) % 11
    with torch.no_grad():
        a, b = model(x), model(changed)
    before = (a[:, :t] - b[:, :t]).abs()
    return float(before.max()) if t else 0.0, float((a[:, t] - b[:, t]).abs().max())


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_language_heads_are_causal(name):
    task = language_task()
    model = build(name, task).double()
    for t in range(task.x_train.shape[1]):
        before, at = changes_before(model, task.x_train, t)
        assert before == 0.0, t  # masked scores get an exactly zero softmax weight
        assert at > 1e-6, t


def test_bert_without_is_decoder_would_see_the_future():
    """The control: the same LM head with bidirectional attention fails the causality test."""
    task = language_task()
    model = build("bert", task).double()
    model.model.config.is_decoder = False  # the mask is built from the config at each call
    for layer in model.model.bert.encoder.layer:
        layer.attention.self.is_causal = False
    before, _ = changes_before(model, task.x_train, 3)
    assert before > 1e-6


@pytest.mark.parametrize(("name", "make", "shape"), CASES, ids=IDS)
def test_float64_per_sample_grads_and_gram_equal_the_loop(name, make, shape):
    task = make()
    model = build(name, task).double()
    x = task.x_train.double() if task.x_train.is_floating_point() else task.x_train
    y, loss = task.y_train, task.loss_fn
    reference = loop_grads(model, loss, x, y)
    grads = sgn_lab.per_sample_grads(model, loss, x, y)
    assert list(grads) == list(reference)
    G = torch.cat([g.reshape(len(y), -1) for g in reference.values()], dim=1)
    scale = float(torch.linalg.norm(G))
    for key, want in reference.items():  # a key bias before a softmax has zero gradient
        error = float(torch.linalg.norm(grads[key] - want))
        assert error <= 1e-10 * max(float(torch.linalg.norm(want)), 1e-6 * scale), key
    K = sgn_lab.per_sample_gram(model, loss, x, y)
    assert relative_error(K, G @ G.T) <= 1e-10


@pytest.mark.parametrize(("name", "make", "shape"), CASES, ids=IDS)
def test_float32_per_sample_grads_and_gram_within_float32_precision(name, make, shape):
    # Float32 rounds each operation at 6e-8 relative; the backward pass through two layers
    # and a softmax leaves the per-sample gradients (d ~ 7 000) and the Gram within about
    # 2e-7 of the float64 loop (measured: 4e-8 to 2.1e-7 over the four models). 1e-5 leaves
    # a factor 50 for other BLAS builds and thread counts, and still fails on any wrong or
    # missing term, whose error is of order 1.
    task = make()
    model = build(name, task)
    x, y, loss = task.x_train, task.y_train, task.loss_fn
    G = sgn_lab.flatten_grads(loop_grads(model.double(), loss,
                                         x.double() if x.is_floating_point() else x, y)).double()
    model.float()
    got = sgn_lab.flatten_grads(sgn_lab.per_sample_grads(model, loss, x, y))
    assert got.dtype == torch.float32
    assert relative_error(got, G) <= 1e-5
    assert relative_error(sgn_lab.per_sample_gram(model, loss, x, y), G @ G.T) <= 1e-5


@pytest.mark.parametrize(("name", "make"), [("gpt2", language_task), ("bert", token_task),
                                            ("vit", image_task)])
def test_the_same_seed_builds_the_same_model(name, make):
    task = make()
    a, b, c = build(name, task, seed=5), build(name, task, seed=5), build(name, task, seed=6)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize(("name", "make"), [("gpt2", language_task), ("bert", language_task),
                                            ("bert", token_task), ("vit", image_task)])
def test_zero_dropout_makes_train_equal_eval_and_dropout_reaches_every_probability(name, make):
    task = make()
    model = build(name, task)
    train = model.train()(task.x_train)
    assert torch.equal(train, model.eval()(task.x_train))
    noisy = build(name, task, dropout=0.25)
    probabilities = {k: v for k, v in noisy.model.config.to_dict().items()
                     if ("drop" in k) and isinstance(v, float)}
    assert probabilities and set(probabilities.values()) == {0.25}, probabilities
    with torch.no_grad():
        assert not torch.equal(noisy.train()(task.x_train), noisy.eval()(task.x_train))


def test_options_reach_the_configs():
    lm = build("gpt2", language_task(), context=12, width=24, heads=3).model.config
    assert (lm.n_positions, lm.n_embd, lm.n_head, lm.n_layer, lm.vocab_size) == (12, 24, 3, 2, 11)
    bert = build("bert", token_task(vocab=13), context=9).model.config
    assert (bert.max_position_embeddings, bert.intermediate_size, bert.vocab_size,
            bert.num_labels, bert.is_decoder) == (9, 64, 13, 3, False)
    assert build("bert", language_task()).model.config.is_decoder
    vit = build("vit", image_task(channels=3)).model.config
    assert (vit.image_size, vit.patch_size, vit.num_channels, vit.intermediate_size,
            vit.num_labels) == (8, 4, 3, 64, 3)
    assert build("vit", image_task(), patch_size=2).model.config.patch_size == 2


@pytest.mark.parametrize(("size", "patch"), [(32, 16), (16, 8), (28, 4), (8, 4), (6, 2),
                                             (3, 1), (2, 1)])
def test_default_patch_is_the_largest_that_divides_and_leaves_four(size, patch):
    model = build("vit", image_task(n=2, size=(size, size)), depth=1)
    assert model.model.config.patch_size == patch
    assert model(torch.zeros(1, 1, size, size)).shape == (1, 3)


def out_of_vocabulary():
    """A language task that claims a vocabulary of 4 but has token ids up to 10."""
    t = language_task()
    return Task("language", t.x_train, t.y_train % 4, t.x_test, t.y_test % 4, num_classes=4)


BAD_BUILDS = [  # (name, make task, options, a piece of the message)
    ("llama", language_task, {}, "'llama'"),
    ("gpt2", token_task, {}, "'tokens'"),
    ("gpt2", image_task, {}, "(n, 1, 8, 8) float32"),
    ("bert", image_task, {}, "(n, 1, 8, 8) float32"),
    ("vit", language_task, {}, "(n, 7) int64"),
    ("vit", token_task, {}, "(n, 6) int64"),
    ("gpt2", language_task, {"width": 30, "heads": 4}, "heads=4, got 30"),
    ("gpt2", language_task, {"heads": 0}, "heads must be an integer >= 1, got 0"),
    ("bert", language_task, {"depth": 0}, "depth must be an integer >= 1, got 0"),
    ("gpt2", language_task, {"context": 5}, "context must be an integer >= 7, got 5"),
    ("bert", token_task, {"context": 2}, "context must be an integer >= 6, got 2"),
    ("gpt2", language_task, {"dropout": 1.0}, "dropout must lie in [0, 1), got 1.0"),
    ("gpt2", language_task, {"patch_size": 4}, "got 4"),
    ("vit", image_task, {"context": 8}, "got 8"),
    ("vit", image_task, {"patch_size": 3}, "the image size 8, got 3"),
    ("vit", image_task, {"patch_size": 0}, "patch_size must be an integer >= 1, got 0"),
    ("gpt2", out_of_vocabulary, {}, "ids up to 10, outside its vocabulary of "
     "num_classes=4"),
]



@pytest.mark.parametrize(("name", "make", "options", "shown"), BAD_BUILDS)
def test_bad_builds_are_value_errors_naming_the_value(name, make, options, shown):
    with pytest.raises(ValueError) as error:
        build_transformer(name, make(), **{**TINY, **options})
    assert shown in str(error.value) and "\n" not in str(error.value)


def test_images_must_be_square_and_regression_is_refused():
    with pytest.raises(ValueError, match="square images; task 'images' has images of 8x6"):
        build_transformer("vit", image_task(size=(8, 6)), **TINY)
    with pytest.raises(ValueError, match="at least 2x2 pixels"):
        build_transformer("vit", image_task(size=(1, 1)), **TINY)
    x = torch.randint(0, 5, (4, 3))
    regression = Task("reg", x, torch.randn(4), x, torch.randn(4), num_classes=0)
    for name in TRANSFORMERS:
        with pytest.raises(ValueError, match=rf"model '{name}' needs .* float32"):
            build_transformer(name, regression, **TINY)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny GPT-2 LM (vocabulary 11, 8 positions, dropout 0.1) and ViT classifier (3
    classes) written by save_pretrained, with their eval-mode logits on the training data."""
    root = tmp_path_factory.mktemp("saved")
    language, images = language_task(), image_task()
    gpt2 = build("gpt2", language, context=8, dropout=0.1).model.eval()
    vit = build("vit", images, seed=1).model.eval()
    out = {}
    for name, model, task in (("gpt2", gpt2, language), ("vit", vit, images)):
        model.save_pretrained(root / name)
        with torch.no_grad():
            out[name] = (root / name, model(**{model.main_input_name: task.x_train}).logits)
    return out


@pytest.mark.parametrize(("name", "make", "dropout"), [
    ("gpt2", language_task, {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}),
    ("vit", image_task, {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}),
])
def test_load_pretrained_gives_the_saved_model_with_its_dropout(saved, name, make, dropout):
    folder, want = saved[name]
    task = make()
    model = load_pretrained(folder, task)
    assert isinstance(model, Logits) and model.training  # so the saved dropouts apply
    assert model.input_name == ("pixel_values" if name == "vit" else "input_ids")
    assert model.model.config._attn_implementation == "eager"
    assert {k: getattr(model.model.config, k) for k in dropout} == dropout  # as saved, not 0
    with torch.no_grad():
        train = model(task.x_train)
        assert torch.equal(model.eval()(task.x_train), want)
    assert torch.equal(train, want) == (name == "vit")
    assert torch.equal(load_pretrained(str(folder), task).eval()(task.x_train), want)


def test_load_pretrained_refuses_what_is_not_a_saved_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a belt: the check comes before transformers

    def never(*args, **kwargs):
        raise AssertionError("transformers was asked to load")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", never)
    monkeypatch.chdir(tmp_path)
    task = language_task()
    with pytest.raises(FileNotFoundError, match="no model folder 'gpt2'"):
        load_pretrained("gpt2", task)
    with pytest.raises(FileNotFoundError, match="no model folder .*missing"):
        load_pretrained(tmp_path / "missing", task)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty' holds no config.json"):
        load_pretrained(tmp_path / "empty", task)


def test_load_pretrained_checks_the_model_fits_the_task(saved):
    gpt2, vit = saved["gpt2"][0], saved["vit"][0]
    with pytest.raises(ValueError, match="vocabulary of 11 tokens, fewer than the 20"):
        load_pretrained(gpt2, language_task(vocab=20))
    with pytest.raises(ValueError, match="8 positions, fewer than the T=9"):
        load_pretrained(gpt2, language_task(T=9))
    with pytest.raises(ValueError, match="num_labels=3; task 'images' has 4 classes"):
        load_pretrained(vit, image_task(classes=4))
    with pytest.raises(ValueError, match="takes pixel_values, and task 'tokens'"):
        load_pretrained(vit, token_task())
    with pytest.raises(ValueError, match="takes input_ids, and task 'images'"):
        load_pretrained(gpt2, image_task())
    with pytest.raises(ValueError, match=r"logits of shape \(2, 6, 11\) .* not \(2, 2\)"):
        load_pretrained(gpt2, token_task(vocab=11, classes=2))  # an LM as a classifier


def test_load_pretrained_refuses_unknown_and_non_causal_models(tmp_path):
    task = language_task()
    bidirectional = build("bert", task).model
    bidirectional.config.is_decoder = False
    bidirectional.save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="'.*bert' is not causal"):
        load_pretrained(tmp_path / "bert", task)
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    config["architectures"] = ["NoSuchModel"]
    (tmp_path / "bert" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown architecture 'NoSuchModel'"):
        load_pretrained(tmp_path / "bert", task)


def test_import_sgn_lab_does_not_import_transformers():
    code = "import sys, sgn_lab.models; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
