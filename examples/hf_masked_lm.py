"""A masked language model (BERT built from a config, random weights) trained by gradwise with transformers' own
`DataCollatorForLanguageModeling`: each batch padded to its longest line and 15% of its tokens masked, as in
a Hugging Face fine-tuning script. gradwise counts the masked tokens (the labels other than -100) to weight
micro-batches, seeds the masking per batch (the same masks with any number of loader workers), and resumes
exactly: started again with the same --out, the run continues from its last checkpoint.

    python examples/hf_masked_lm.py [--steps 200] [--out runs/mlm] [--workers 2]

examples/compare/mlm_hf_trainer.py is the same job with transformers' Trainer.
"""

import argparse

import torch
from hf_text import Lines, splits
from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

from gradwise import Trainer, load_config

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--out", default=None)
parser.add_argument("--workers", type=int, default=0)
args = parser.parse_args()

tok, train, _, test = splits()
torch.manual_seed(0)
model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=128, max_position_embeddings=64))
cfg = load_config(None, [f"train.steps={args.steps}", "train.batch_size=16", "optim.lr=0.001",
                         "schedule.warmup_steps=10", "train.eval_every=100", "train.checkpoint_every=10",
                         f"loader.num_workers={args.workers}", "log.progress=plain"])
collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
summary = Trainer(model, Lines(train, tok), test_data=Lines(test, tok), collate_fn=collator, config=cfg,
                  out_dir=args.out).fit(resume=True)
print(f"test loss {summary['test_loss']:.3f} (masked-token cross-entropy)")
