"""examples/hf_masked_lm.py's job with transformers' Trainer: BERT from a config, DataCollatorForLanguageModeling,
batch 16, AdamW at 1e-3 with 10 warmup steps and cosine decay, checkpoints every 10 steps, resume, the test
loss at the end.

    python examples/compare/mlm_hf_trainer.py STEPS OUT
"""

import os
import sys
from pathlib import Path

import torch
from transformers import (BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling, Trainer,
                          TrainingArguments)
from transformers.trainer_utils import get_last_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_text import Lines, splits  # noqa: E402

steps, out = int(sys.argv[1]), sys.argv[2]
tok, train, _, test = splits()
torch.manual_seed(0)
model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=128, max_position_embeddings=64))
training = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=16, per_device_eval_batch_size=1000,
                             learning_rate=0.001, warmup_steps=10, lr_scheduler_type="cosine", save_steps=10,
                             logging_steps=10, use_cpu=True, report_to=[], seed=0)
collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
trainer = Trainer(model=model, args=training, train_dataset=Lines(train, tok), eval_dataset=Lines(test, tok),
                  data_collator=collator)
trainer.train(resume_from_checkpoint=get_last_checkpoint(out) if os.path.isdir(out) else None)
print(f"test loss {trainer.evaluate()['eval_loss']:.3f} (masked-token cross-entropy)")
