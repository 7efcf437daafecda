"""Padded tasks of examples of different lengths: ``jsonl:PATH``, ``hfdata:DIR``, tokenizer
folders, the per-sample token loss and the padded Hugging Face wrapper.

References are independent of the loaders: expected x/y rows are written out by hand from the
texts' bytes, the loss is a Python loop over samples and tokens with its own log-softmax, and
the padded model's logits are compared with each example run alone, unpadded.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from helpers import loop_grads, relative_error
from padded_helpers import (
    BAD_LINES,
    SHORT,
    WORDS,
    mixed_records,
    tiny_gpt2,
    tokenizer_folder,
    word_ids,
    write_jsonl,
)

from sgn_lab.data import (
    IGNORE_INDEX,
    PAD_ID,
    DataWarning,
    attention_mask,
    load_hfdata,
    load_jsonl,
    load_task,
    padded_batch,
    task_help,
)
from sgn_lab.models.hf import Logits, build_transformer
from sgn_lab.models.losses import token_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")

P = PAD_ID
I = IGNORE_INDEX  # noqa: E741 - one letter keeps the hand-written rows aligned
# SHORT's texts "ab", "hello", "cat" as UTF-8 bytes, T = 5 (the longest).
RIGHT_X = [[97, 98, P, P, P], [104, 101, 108, 108, 111], [99, 97, 116, P, P]]
RIGHT_Y = [[98, I, I, I, I], [101, 108, 108, 111, I], [97, 116, I, I, I]]
LEFT_X = [[P, P, P, 97, 98], [104, 101, 108, 108, 111], [P, P, 99, 97, 116]]
LEFT_Y = [[I, I, I, 98, I], [101, 108, 108, 111, I], [I, I, 97, 116, I]]


def rows(*tensors: torch.Tensor) -> list:
    """The rows of the tensors together, sorted: the seeded split only reorders them."""
    return sorted(tuple(r) if isinstance(r, list) else r for t in tensors for r in t.tolist())


def all_rows(task, field: str) -> list:
    return rows(getattr(task, f"{field}_train"), getattr(task, f"{field}_test"))


def paired(task) -> list:
    xs = task.x_train.tolist() + task.x_test.tolist()
    ys = task.y_train.tolist() + task.y_test.tolist()
    return sorted(zip(map(tuple, xs), [tuple(y) if isinstance(y, list) else y for y in ys],
                      strict=True))


# ------------------------------------------------------------------------------------------
# jsonl: exact rows, both padding sides, classification
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding, want_x, want_y", [("right", RIGHT_X, RIGHT_Y),
                                                     ("left", LEFT_X, LEFT_Y)])
def test_jsonl_language_rows_are_the_hand_built_ones(tmp_path, padding, want_x, want_y):
    path = write_jsonl(tmp_path / "d.jsonl", SHORT)
    task = load_task(f"jsonl:{path}", padding=padding)
    assert paired(task) == sorted(zip(map(tuple, want_x), map(tuple, want_y), strict=True))
    assert task.x_train.dtype == task.y_train.dtype == torch.long
    assert task.is_sequence and task.num_classes == 256
    want_mask = [[int(v >= 0) for v in r] for r in want_x]
    assert rows(attention_mask(task.x_train), attention_mask(task.x_test)) == rows(
        torch.tensor(want_mask))
    info = task.info
    assert (info["padded"], info["padding"], info["vocab_size"], info["length"]) == (
        True, padding, 256, 5)
    assert (info["pad_id"], info["ignore_index"], info["objective"]) == (-1, -100, "language")
    assert "mean over samples" in info["loss_average"]


def test_padded_batch_is_the_hand_built_pair():
    seqs = [[97, 98], [104, 101, 108, 108, 111], [99, 97, 116]]
    for padding, want_x, want_y in (("right", RIGHT_X, RIGHT_Y), ("left", LEFT_X, LEFT_Y)):
        x, y = padded_batch(seqs, padding=padding)
        assert x.tolist() == want_x and y.tolist() == want_y
    x, y = padded_batch(seqs, labels=[2, 0, 1], length=6)
    assert x.tolist() == [r + [P] for r in RIGHT_X] and y.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="sequence 1 has 5 tokens; each needs 1 to 4"):
        padded_batch(seqs, length=4)
    with pytest.raises(ValueError, match="negative token id -1"):
        padded_batch([[1, -1]])


def test_jsonl_classification_keeps_the_labels(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", SHORT)
    task = load_jsonl(path, label_field="label", padding="left")
    want = sorted(zip(map(tuple, LEFT_X), [0, 1, 2], strict=True))
    assert paired(task) == want
    assert task.y_train.shape == (len(task.x_train),) and not task.is_sequence
    assert task.num_classes == 3 and task.info["objective"] == "classification"
    assert load_jsonl(path, label_field="label", classes=5).num_classes == 5


def test_char_tokens_share_one_vocabulary_over_the_examples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", SHORT)
    task = load_jsonl(path, tokens="char")
    vocab = sorted(set("abhellocat"))
    assert task.info["vocab"] == vocab and task.num_classes == len(vocab)
    ids = {c: i for i, c in enumerate(vocab)}
    want = [[ids[c] for c in t["text"]] for t in SHORT]
    x, _ = padded_batch(want)
    assert all_rows(task, "x") == rows(x)


def test_longer_examples_are_truncated_with_one_warning(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", SHORT + [{"text": "abcdefgh"}])
    with pytest.warns(DataWarning) as caught:
        task = load_jsonl(path, context=4)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"{str(path)!r}, line 2: 2 example(s) longer than context=4" in message
    assert "(this one has 5)" in message
    assert task.info["truncated"] == 2 and task.x_train.shape[1] == 4
    assert (97, 98, 99, 100) in all_rows(task, "x")  # the first 4 bytes of "abcdefgh"
    assert (98, 99, 100, I) in all_rows(task, "y")


def test_blank_lines_are_skipped_and_line_numbers_are_the_files(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["", SHORT[0], "   ", SHORT[1], '{"text": ""}'])
    with pytest.raises(ValueError, match="line 5: field 'text' is empty"):
        load_jsonl(path)


def test_seeded_split_and_subsampling(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", mixed_records(20))
    a = load_jsonl(path, seed=3, n_train=8)
    b = load_task(f"jsonl:{path}", seed=3, n_train=8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert len(a.x_train) == 8 and len(a.x_test) == 5
    assert not torch.equal(load_jsonl(path, seed=4).x_train[:8], a.x_train)


@pytest.mark.parametrize("case, lines, options, where, words", BAD_LINES,
                         ids=[c[0] for c in BAD_LINES])
def test_bad_lines_are_one_error_naming_file_line_and_value(tmp_path, case, lines, options,
                                                            where, words):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as info:
        load_jsonl(path, **options)
    message = str(info.value)
    assert message.startswith(f"{str(path)!r}, {where}: ") and words in message
    assert "\n" not in message


@pytest.mark.parametrize("options, message", [
    ({"padding": "middle"}, "padding must be one of right, left, got 'middle'"),
    ({"tokens": "word"}, "tokens must be one of byte, char, tokenizer:DIR, got 'word'"),
    ({"tokens": "char", "tokenizer": "x"}, "tokens='char' and tokenizer='x': choose one"),
    ({"tokens": "tokenizer:a", "tokenizer": "b"}, "give the tokenizer once"),
    ({"classes": 3}, "classes=3 applies to classification: give label_field"),
    ({"context": 1}, "context must be an integer >= 2, got 1"),
    ({"text_field": ""}, "text_field must be a field name"),
    ({"nope": 1}, r"unknown option\(s\) \['nope'\] for 'jsonl' tasks"),
])
def test_bad_options_are_named(tmp_path, options, message):
    path = write_jsonl(tmp_path / "d.jsonl", SHORT)
    with pytest.raises(ValueError, match=message):
        load_task(f"jsonl:{path}", **options)


def test_missing_file_folder_and_too_few_examples(tmp_path):
    with pytest.raises(FileNotFoundError, match="jsonl file not found: '.*nope.jsonl'"):
        load_task(f"jsonl:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(ValueError, match="is a folder, not a jsonl file"):
        load_jsonl(tmp_path)
    with pytest.raises(ValueError, match="holds 1 example"):
        load_jsonl(write_jsonl(tmp_path / "one.jsonl", SHORT[:1]))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"line 2: not UTF-8 text \(invalid byte 0xe9\)"):
        load_jsonl(tmp_path / "latin1.jsonl")


def test_task_help_lists_the_file_tasks_and_their_options():
    text = task_help()
    assert "jsonl:PATH" in text and "hfdata:DIR" in text and "text:PATH" in text
    assert "text_field, label_field, classes, context, tokens, tokenizer, padding" in text


# ------------------------------------------------------------------------------------------
# hfdata: save_to_disk round trips
# ------------------------------------------------------------------------------------------

def test_hfdata_dataset_round_trip_equals_the_jsonl_task(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = mixed_records(16)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    path = write_jsonl(tmp_path / "d.jsonl", records)
    for options in ({}, {"label_field": "label", "padding": "left"}):
        got = load_task(f"hfdata:{tmp_path / 'ds'}", seed=1, **options)
        want = load_jsonl(path, seed=1, **options)
        for field in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field
        assert got.info["format"] == "hfdata" and got.info["split"] == "seeded"


def test_hfdata_dataset_dict_keeps_its_test_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    train, test = mixed_records(12, seed=0), mixed_records(4, seed=1)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(
        str(tmp_path / "dd"))
    task = load_hfdata(tmp_path / "dd", label_field="label")
    assert task.info["split"] == "file"
    assert task.y_test.tolist() == [r["label"] for r in test]
    x, _ = padded_batch([list(r["text"].encode()) for r in train + test],
                        length=task.x_train.shape[1])
    assert task.x_test.tolist() == x[len(train):].tolist()  # in the split's own order
    assert rows(task.x_train) == rows(x[:len(train)])
    with pytest.raises(ValueError, match="has a test split; test_fraction=0.5 does not apply"):
        load_task(f"hfdata:{tmp_path / 'dd'}", test_fraction=0.5)


def test_hfdata_bad_input_names_split_row_and_value(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows_ = [{"text": "fine text", "label": 0}, {"text": "", "label": 1}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows_)}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"'.*dd', split 'train', row 1: field 'text' is empty"):
        load_hfdata(tmp_path / "dd")
    with pytest.raises(ValueError, match=r"split 'train' of dataset '.*dd' has no column 'body' "
                                         r"\(columns: 'text', 'label'\)"):
        load_hfdata(tmp_path / "dd", text_field="body")
    with pytest.raises(FileNotFoundError, match="no dataset folder"):
        load_task(f"hfdata:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither dataset_dict.json nor state.json"):
        load_hfdata(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset folder '.*broken' cannot be read: "):
        load_hfdata(tmp_path / "broken")


# ------------------------------------------------------------------------------------------
# Tokenizer folders
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
def test_a_saved_tokenizer_encodes_and_sets_the_padding_side(tmp_path, side):
    pytest.importorskip("transformers")
    folder = tokenizer_folder(tmp_path / "tok", padding_side=side)
    records = [r for r in mixed_records(16) if len(r["text"].split()) >= 2]  # >= 2 tokens
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.warns(DataWarning, match="longer than context=3"):
        task = load_jsonl(path, tokenizer=str(folder), context=3)
    with pytest.warns(DataWarning):
        same = load_task(f"jsonl:{path}", tokens=f"tokenizer:{folder}", context=3)
    assert torch.equal(task.x_train, same.x_train)
    kept = [word_ids(r["text"])[:3] for r in records]
    x, y = padded_batch(kept, padding=side)
    assert paired(task) == sorted(zip(map(tuple, x.tolist()), map(tuple, y.tolist()),
                                      strict=True))
    assert task.info["padding"] == side and task.info["tokens"] == "tokenizer"
    assert task.num_classes == 2 + len(dict.fromkeys(WORDS))
    other = "left" if side == "right" else "right"
    assert load_jsonl(path, tokenizer=str(folder), padding=other).info["padding"] == other


def test_a_one_word_text_is_too_short_for_the_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    folder = tokenizer_folder(tmp_path / "tok")
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}, {"text": "dog"}])
    with pytest.raises(ValueError, match="line 2: field 'text' is one token"):
        load_jsonl(path, tokenizer=str(folder))


def test_unreadable_tokenizer_folders_are_refused(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    path = write_jsonl(tmp_path / "d.jsonl", SHORT)
    (tmp_path / "empty").mkdir()
    corrupt = tokenizer_folder(tmp_path / "corrupt")
    (corrupt / "tokenizer.json").write_text("{not json")
    (tmp_path / "file.txt").write_text("x")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "transformers", None)  # refused before any import of it
        with pytest.raises(FileNotFoundError, match="no tokenizer folder 'gpt2'"):
            load_jsonl(path, tokenizer="gpt2")
        with pytest.raises(FileNotFoundError, match="no tokenizer folder '.*file.txt'"):
            load_jsonl(path, tokenizer=str(tmp_path / "file.txt"))
        with pytest.raises(FileNotFoundError, match="holds no tokenizer file"):
            load_jsonl(path, tokenizer=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="tokenizer folder '.*corrupt' cannot be read: ") as info:
        load_jsonl(path, tokenizer=str(corrupt))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------
# The per-sample loss
# ------------------------------------------------------------------------------------------

def loop_loss(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """(1/n) Σ_i mean over real t of −log softmax(logits_it)[y_it], by Python loops."""
    per_sample = []
    for i in range(len(targets)):
        terms = []
        for t in range(targets.shape[1]):
            label = int(targets[i, t])
            if label == IGNORE_INDEX:
                continue
            row = logits[i, t].double().tolist()
            top = max(row)
            log_z = top + math.log(sum(math.exp(v - top) for v in row))
            terms.append(log_z - row[label])
        per_sample.append(sum(terms) / len(terms))
    return sum(per_sample) / len(per_sample)


def test_token_loss_is_the_mean_over_samples_of_each_samples_real_tokens():
    gen = torch.Generator().manual_seed(0)
    x, y = padded_batch([[1, 2], [3, 4, 5, 6, 7], [2, 2, 2], [0, 1, 2, 3, 4, 5, 6, 7]],
                        padding="left")
    logits = torch.randn(*y.shape, 9, generator=gen, dtype=torch.float64)
    got = float(token_cross_entropy(logits, y))
    assert got == pytest.approx(loop_loss(logits, y), rel=1e-12)
    # not the mean over all real tokens of the batch, which weights long samples more
    flat = float(torch.nn.functional.cross_entropy(logits.reshape(-1, 9), y.reshape(-1)))
    assert abs(got - flat) > 1e-3
    # a batch of one: the mean over that sample's real tokens
    assert float(token_cross_entropy(logits[1:2], y[1:2])) == pytest.approx(
        loop_loss(logits[1:2], y[1:2]), rel=1e-12)


def test_token_loss_of_fixed_windows_is_todays_token_mean():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 7, 11, generator=gen)
    y = torch.randint(0, 11, (5, 7), generator=gen)
    flat = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), y.reshape(-1))
    assert float(token_cross_entropy(logits, y)) == pytest.approx(float(flat), rel=1e-6)


# ------------------------------------------------------------------------------------------
# The padded Hugging Face wrapper
# ------------------------------------------------------------------------------------------

def test_padded_gpt2_logits_at_real_positions_are_each_example_alone(tmp_path):
    pytest.importorskip("transformers")
    path = write_jsonl(tmp_path / "d.jsonl", mixed_records(12))
    task = load_jsonl(path, tokens="char", test_fraction=0.5)
    torch.manual_seed(0)
    model = build_transformer("gpt2", task, width=16, depth=1, heads=2)
    assert isinstance(model, Logits) and model.padded
    model.eval()
    x = task.x_train
    with torch.no_grad():
        logits = model(x)
        for row, out in zip(x, logits, strict=True):
            real = row[row >= 0]
            alone = model.model(input_ids=real[None]).logits[0]  # unpadded, no mask
            assert torch.allclose(out[: len(real)], alone, atol=1e-5), row
        # without the mask, the padding would change the logits of the real tokens at left
        left = load_jsonl(path, tokens="char", padding="left", test_fraction=0.5).x_train
        short = int((left < 0).sum(dim=1).argmax())
        real = left[short][left[short] >= 0]
        unmasked = model.model(input_ids=left[short:short + 1].clamp(min=0)).logits[0]
        assert not torch.allclose(unmasked[-len(real):], model.model(
            input_ids=real[None]).logits[0], atol=1e-3)


def test_padded_bert_classifies_each_example_as_alone(tmp_path):
    pytest.importorskip("transformers")
    path = write_jsonl(tmp_path / "d.jsonl", mixed_records(12))
    task = load_jsonl(path, label_field="label", test_fraction=0.5)
    torch.manual_seed(0)
    model = build_transformer("bert", task, width=16, depth=1, heads=2)
    assert model.padded
    model.eval()
    with torch.no_grad():
        logits = model(task.x_train)
        for row, out in zip(task.x_train, logits, strict=True):
            alone = model.model(input_ids=row[row >= 0][None]).logits[0]
            assert torch.allclose(out, alone, atol=1e-5)


def test_an_unpadded_wrapper_calls_the_model_as_before():
    pytest.importorskip("transformers")
    model = tiny_gpt2(11, 8)
    x = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(0))
    wrapped = Logits(model)
    assert not wrapped.padded
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(input_ids=x).logits)
        # all real tokens: the padded call gives the same logits
        assert torch.allclose(Logits(model, padded=True)(x), wrapped(x), atol=1e-6)
    with pytest.raises(ValueError, match="padded inputs are token ids"):
        Logits(model, "pixel_values", padded=True)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_padded_per_sample_gradients_equal_the_loop(tmp_path, padding):
    pytest.importorskip("transformers")
    import sgn_lab

    path = write_jsonl(tmp_path / "d.jsonl", mixed_records(8))
    task = load_jsonl(path, tokens="char", padding=padding, test_fraction=0.25)
    torch.manual_seed(0)
    model = build_transformer("gpt2", task, width=16, depth=1, heads=2).double()
    x, y = task.x_train, task.y_train
    got = sgn_lab.per_sample_grads(model, token_cross_entropy, x, y)
    want = loop_grads(model, token_cross_entropy, x, y)
    for name in want:
        assert torch.isfinite(got[name]).all(), name
        assert relative_error(got[name], want[name]) < 1e-10, name


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name, label_field", [("gpt2", None), ("bert", "label")])
def test_padded_gram_equals_the_per_sample_gradients(tmp_path, padding, name, label_field):
    pytest.importorskip("transformers")
    import sgn_lab

    path = write_jsonl(tmp_path / "d.jsonl", mixed_records(8))
    task = load_jsonl(path, tokens="char", padding=padding, label_field=label_field)
    torch.manual_seed(0)
    model = build_transformer(name, task, width=16, depth=1, heads=2).double()
    x, y = task.x_train, task.y_train
    gram = sgn_lab.per_sample_gram(model, task.loss_fn, x, y)
    g = sgn_lab.flatten_grads(sgn_lab.per_sample_grads(model, task.loss_fn, x, y))
    assert relative_error(gram, g @ g.T) < 1e-10


@pytest.mark.parametrize("padding", ["right", "left"])
def test_a_saved_model_on_a_padded_task_is_wrapped_with_the_mask(tmp_path, padding):
    pytest.importorskip("transformers")
    from sgn_lab.models.hf import load_pretrained

    tiny_gpt2(256, 32).save_pretrained(tmp_path / "model")
    task = load_jsonl(write_jsonl(tmp_path / "d.jsonl", mixed_records(8)), padding=padding)
    model = load_pretrained(tmp_path / "model", task)  # its causality check passes
    assert model.padded
    model.eval()
    with torch.no_grad():
        row = task.x_train[int((task.x_train < 0).sum(dim=1).argmax())]  # the most padding
        real = row[row >= 0]
        got = model(row[None])[0][row >= 0]
        # Hugging Face's default positions count the padding: with left padding the real
        # tokens sit at positions T - L .. T - 1 (documented), with right padding at 0 .. L - 1
        start = len(row) - len(real) if padding == "left" else 0
        positions = torch.arange(start, start + len(real))[None]
        alone = model.model(input_ids=real[None], position_ids=positions).logits[0]
        assert torch.allclose(got, alone, atol=1e-5)
