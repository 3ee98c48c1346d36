"""A Hugging Face causal LM, built from a config (random weights, nothing downloaded), trained by gradwise.

    python examples/hf_causal_lm.py [--steps 200] [--out runs/hf-gpt2]

The data are byte sequences of the Python standard library's own sources (a
local corpus, vocabulary 256). Batches are dicts {"input_ids", "labels"}: the
model is called as model(**batch) and its own `.loss` is the loss; gradwise
counts the shifted labels, so accumulation stays exact with padding. With
--out, an interrupted run started again with the same command continues from
its last checkpoint (`fit(resume=True)`).
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from gradwise import Trainer, load_config


class ByteWindows(Dataset):
    """Consecutive `context`-byte windows of a text, as {"input_ids", "labels"} (the model shifts the labels)."""

    def __init__(self, data: torch.Tensor, context: int):
        self.data, self.context = data, context

    def __len__(self):
        return len(self.data) // self.context

    def __getitem__(self, i):
        window = self.data[i * self.context:(i + 1) * self.context]
        return {"input_ids": window, "labels": window}


def corpus(max_bytes: int = 400_000) -> torch.Tensor:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py"))[:40])[:max_bytes]
    return torch.tensor(list(text), dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    data = corpus()
    cut = int(0.9 * len(data))
    train, test = ByteWindows(data[:cut], 64), ByteWindows(data[cut:], 64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    cfg = load_config(None, [f"train.steps={args.steps}", "train.batch_size=16", "train.accumulate=2",
                             "optim.name=adamw", "optim.lr=0.003", "schedule.name=cosine", "schedule.warmup_steps=20",
                             "precision=bf16", "train.eval_every=100", "log.every=50", "log.progress=plain"])
    trainer = Trainer(model, train, test_data=test, config=cfg, out_dir=args.out)
    summary = trainer.fit(resume=args.out is not None)
    print(f"{summary['steps']} steps: test loss {summary['test_loss']:.3f}, {summary['test_bpc']:.3f} bits per byte")


if __name__ == "__main__":
    main()
