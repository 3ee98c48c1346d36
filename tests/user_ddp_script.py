"""A user's own training script, with nothing distributed in it: tests/test_distributed.py and test_fsdp.py run
it with plain python and under `torchrun --nproc-per-node 2` and compare the weights and the dataset-level metrics (each
evaluation row counted once); batches go through a collate function of its own. Options after the run folder:

    die-after-final   rank 1 of the first attempt is killed after the final checkpoint (torchrun restarts the group)
    fsdp              train.strategy=fsdp, each Linear sharded as a unit (train.shard_modules), and a spare
                      layer the forward never uses (no gradient, so no optimizer state, in any checkpoint)
    nan-on-rank-1     rank 1 alone computes a non-finite output once, at step 5 (the others stay finite), with
                      diagnostics.on_nonfinite=rollback: every rank must take the same collective path
    stop-at-10        this session ends after step 10 (run the script again to resume: `fit(resume=True)`)
"""

import os
import signal
import sys

import torch
import torchmetrics
from torch import nn
from torch.utils.data import TensorDataset

from gradwise import Trainer, load_config
from gradwise.train.callbacks import Callback
from metric_objects import MacroF1


class DieAfterFinal(Callback):
    def on_fit_end(self, trainer, summary) -> None:
        if trainer.sync.rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os.kill(os.getpid(), signal.SIGKILL)


class WithSpare(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.spare = net, nn.Linear(4, 4)

    def forward(self, x):
        return self.net(x)


class PoisonOnRank1(Callback):
    """Arms a forward hook on the first layer that makes rank 1's output NaN in step 5's forward, once."""

    def __init__(self, layer: nn.Module):
        self.armed = False
        layer.register_forward_hook(self.poison)

    def poison(self, module, args, output):
        if self.armed:
            self.armed = False
            return output * float("nan")
        return None

    def on_step_start(self, trainer) -> None:
        self.armed = trainer.sync.rank == 1 and trainer.state.step == 4 and trainer.state.rollbacks == 0


class RowsSeen(torchmetrics.Metric):
    """How many evaluation rows it saw: a torchmetrics Metric, which gathers the ranks' states itself when the
    ranks share the evaluation (and must not when each scored every row: one process, FSDP)."""

    def __init__(self):
        super().__init__()
        self.add_state("n", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds, target):
        self.n += len(target)

    def compute(self):
        return self.n


def stack_pairs(items):
    """A collate function of one's own (each rank collates its own rows)."""
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


options = sys.argv[2:]
g = torch.Generator().manual_seed(0)
x = torch.randn(300, 10, generator=g)
y = (x[:, :3].sum(1) > 0).long()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
overrides = ["train.steps=20", "train.batch_size=64", "optim.name=sgd", "optim.lr=0.1",
             "log.progress=off", "log.plots=false", "diagnostics.every=0"]
if "fsdp" in options:
    overrides += ["train.strategy=fsdp", "train.shard_modules=[Linear]", "diagnostics.every=5"]
    model = WithSpare(model)
if "nan-on-rank-1" in options:
    overrides += ["train.checkpoint_every=3", "diagnostics.on_nonfinite=rollback"]
callbacks = [DieAfterFinal()] if "die-after-final" in options else []
callbacks += [PoisonOnRank1(model.net[0])] if "nan-on-rank-1" in options else []
trainer = Trainer(model, TensorDataset(x, y), test_data=TensorDataset(x[:50], y[:50]),
                  config=load_config(None, overrides), out_dir=sys.argv[1], callbacks=callbacks,
                  collate_fn=stack_pairs, metrics={"f1": MacroF1(), "rows": RowsSeen()})
trainer.fit(max_steps=10 if "stop-at-10" in options else None, resume=True)
