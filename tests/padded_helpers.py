"""Shared by the tests of padded tasks (tests/data/test_examples.py, tests/cli/test_examples_cli.py,
tests/integrations/test_padded_callbacks.py): small files of examples of different lengths, a
tokenizer folder built on the spot, a tiny GPT-2, and the table of bad inputs.

Nothing is downloaded: the tokenizer is a ``tokenizers`` WordLevel model over the words of the
test texts, wrapped in ``transformers.PreTrainedTokenizerFast`` and saved with
``save_pretrained``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

# Three texts of 2, 5 and 3 bytes: the hand-built expectations of the tests use their bytes.
SHORT = [{"text": "ab", "label": 0}, {"text": "hello", "label": 1}, {"text": "cat", "label": 2}]

WORDS = "the cat sat on a mat and dog ran far up hill".split()


def mixed_records(n: int = 24, *, seed: int = 0, classes: int = 3) -> list[dict[str, Any]]:
    """n texts of 1 to 5 words (3 to about 25 characters), with labels in [0, classes)."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))),
             "label": i % classes} for i in range(n)]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """One line per record: a dict as JSON, a string as it is (for bad lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def tokenizer_folder(folder: Path, *, padding_side: str = "right") -> Path:
    """A WordLevel tokenizer over :data:`WORDS` (ids: [PAD] 0, [UNK] 1, then the words in
    order), saved by ``save_pretrained`` into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}}
    model = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", pad_token="[PAD]",
                                   padding_side=padding_side)
    fast.save_pretrained(folder)
    return folder


def word_ids(text: str) -> list[int]:
    """The ids :func:`tokenizer_folder`'s tokenizer gives ``text`` (by hand)."""
    ids = {w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}
    return [ids.get(w, 1) for w in text.split()]


def tiny_gpt2(vocab: int, positions: int, *, seed: int = 0):
    """A GPT-2 of width 16 and one layer, eager attention, no dropout, in train mode."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
        use_cache=False, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(config)


# Bad input: (id, lines of the file, task options, where the message points, words of it).
# Each must be one ValueError (FileNotFoundError for a missing file) naming the file and line.
GOOD = json.dumps({"text": "a fine text", "label": 1})
BAD_LINES = [
    ("empty-text", [GOOD, json.dumps({"text": ""})], {}, "line 2", "field 'text' is empty"),
    ("missing-field", [GOOD, GOOD, json.dumps({"body": "no text here"})], {}, "line 3",
     "no field 'text' (fields: 'body')"),
    ("text-not-string", [json.dumps({"text": 12}), GOOD], {}, "line 1",
     "field 'text' is 12, not a string"),
    ("invalid-json", [GOOD, '{"text": "unclosed'], {}, "line 2", "invalid JSON"),
    ("not-an-object", [GOOD, "[1, 2]"], {}, "line 2", "not a JSON object: '[1, 2]'"),
    ("one-token", [GOOD, json.dumps({"text": "x"})], {}, "line 2",
     "next-token prediction needs at least 2"),
    ("label-not-integer", [GOOD, json.dumps({"text": "ok then", "label": "pos"})],
     {"label_field": "label"}, "line 2", "label 'label' is 'pos', not an integer class id"),
    ("label-float", [GOOD, json.dumps({"text": "ok then", "label": 1.5})],
     {"label_field": "label"}, "line 2", "label 'label' is 1.5, not an integer"),
    ("label-negative", [GOOD, json.dumps({"text": "ok then", "label": -1})],
     {"label_field": "label"}, "line 2", "label 'label' is -1, outside [0, classes)"),
    ("label-out-of-range", [GOOD, GOOD, json.dumps({"text": "ok then", "label": 5})],
     {"label_field": "label", "classes": 3}, "line 3", "label 'label' is 5, outside [0, 3)"),
    ("missing-label", [GOOD, json.dumps({"text": "no label"})], {"label_field": "label"},
     "line 2", "no field 'label' (fields: 'text')"),
]
