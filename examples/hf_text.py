"""Text data for the Hugging Face examples, built offline: lines of the Python standard library's sources and a
word-level tokenizer fitted to them (Hugging Face `tokenizers`, wrapped as a transformers tokenizer, so
transformers' data collators work with it as they do with a downloaded one).

`LabelledLines` items are what a tokenized `datasets` row looks like: {"input_ids": [...], "labels": int}.
The label is the module the line comes from, one of `MODULES` (of unequal lengths: unbalanced classes).
"""

from __future__ import annotations

import collections
import random
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerFast

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MODULES = ("argparse", "inspect", "typing", "shutil")


def source_lines() -> list[tuple[str, int]]:
    """(line, module) for every non-blank line (stripped) of the standard library's `MODULES`, in order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(line.strip(), label) for label, name in enumerate(MODULES)
            for line in (stdlib / f"{name}.py").read_text(errors="replace").splitlines() if line.strip()]


def tokenizer(lines: list[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the `vocab_size` most frequent words and symbols of `lines`."""
    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    counts = collections.Counter(word for line in lines for word, _ in split.pre_tokenize_str(line))
    vocab = {token: i for i, token in enumerate(SPECIAL + [w for w, _ in counts.most_common(vocab_size)])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


class LabelledLines(Dataset):
    """Tokenized lines (at most `max_length` tokens, unpadded: a collator pads each batch) with their module."""

    def __init__(self, lines: list[tuple[str, int]], tok: PreTrainedTokenizerFast, max_length: int = 32):
        self.ids = tok([line for line, _ in lines], truncation=True, max_length=max_length)["input_ids"]
        self.labels = [label for _, label in lines]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Lines(LabelledLines):
    """The same lines without labels, for a masked language model (its collator makes the labels)."""

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def splits(n_val: int = 1000, n_test: int = 1000):
    """(tokenizer, train, validation and test lines): disjoint, in a fixed shuffled order."""
    lines = source_lines()
    random.Random(0).shuffle(lines)
    val, test, train = lines[:n_val], lines[n_val:n_val + n_test], lines[n_val + n_test:]
    return tokenizer([line for line, _ in train]), train, val, test
