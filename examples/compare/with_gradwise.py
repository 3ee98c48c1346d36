"""The job with gradwise: accumulation 2, bf16, warmup + cosine, evaluation, checkpoints, resume."""

import sys

import torch
from common import data_and_model

from gradwise import Trainer, load_config

steps, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
train, test, model = data_and_model()
cfg = load_config(None, [f"train.steps={steps}", "train.batch_size=16", "train.accumulate=2", "optim.lr=0.003",
                         "schedule.warmup_steps=20", "precision=bf16", "train.eval_every=100",
                         "train.checkpoint_every=100"])
summary = Trainer(model, train, test_data=test, config=cfg, out_dir=out).fit(resume=True)
print("test loss", summary["test_loss"])
