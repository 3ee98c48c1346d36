"""Dataset-level metrics with no library behind them, shared by the tests and tests/user_ddp_script.py."""

import torch
from sklearn.metrics import f1_score


class MacroF1:
    """Keeps every prediction and scores them once with scikit-learn; `merge_state` lets the ranks' shares
    of an evaluation be combined."""

    higher_is_better = True

    def __init__(self):
        self.reset()

    def reset(self):
        self.preds, self.targets = [], []

    def update(self, preds, target):
        self.preds.append(preds.argmax(-1).cpu())
        self.targets.append(target.cpu())

    def compute(self):
        return f1_score(torch.cat(self.targets), torch.cat(self.preds), average="macro")

    def merge_state(self, other):
        self.preds += other.preds
        self.targets += other.targets


class RowsSeen:
    """How many rows an evaluation scored (each row must count once, whatever the ranks or workers)."""

    def reset(self):
        self.n = 0

    def update(self, preds, target):
        self.n += len(target)

    def compute(self):
        return self.n
