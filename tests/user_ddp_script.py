"""A user's own training script, with nothing distributed in it: tests/test_distributed.py runs it with plain
python and under `torchrun --nproc-per-node 2` and compares the weights. With a second argument
`die-after-final`, rank 1 of the first attempt is killed after the final checkpoint (torchrun restarts the group)."""

import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

from gradwise import Trainer, load_config
from gradwise.train.callbacks import Callback


class DieAfterFinal(Callback):
    def on_fit_end(self, trainer, summary) -> None:
        if trainer.sync.rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os.kill(os.getpid(), signal.SIGKILL)


g = torch.Generator().manual_seed(0)
x = torch.randn(300, 10, generator=g)
y = (x[:, :3].sum(1) > 0).long()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
cfg = load_config(None, ["train.steps=20", "train.batch_size=64", "optim.name=sgd", "optim.lr=0.1",
                         "log.progress=off", "log.plots=false", "diagnostics.every=0"])
callbacks = [DieAfterFinal()] if sys.argv[2:] == ["die-after-final"] else []
trainer = Trainer(model, TensorDataset(x, y), test_data=TensorDataset(x[:50], y[:50]), config=cfg, out_dir=sys.argv[1],
                  callbacks=callbacks)
trainer.fit(resume=True)
