"""The same job as a hand-written PyTorch loop."""

import math
import os
import sys

import torch
from common import data_and_model
from torch.utils.data import DataLoader

steps, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
train, test, model = data_and_model()
accumulate, warmup = 2, 20
loader = DataLoader(train, batch_size=16 // accumulate, shuffle=True)
optimizer = torch.optim.AdamW(model.parameters(), lr=0.003)


def lr_factor(step):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
step, path = 0, os.path.join(out, "last.pt")
if os.path.exists(path):
    state = torch.load(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = state["step"]


def evaluate():
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in DataLoader(test, batch_size=64):
            total += model(**batch).loss.item() * len(batch["input_ids"])
            n += len(batch["input_ids"])
    model.train()
    return total / n


model.train()
batches = iter(loader)
while step < steps:
    optimizer.zero_grad(set_to_none=True)
    for _ in range(accumulate):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss / accumulate
        loss.backward()
    optimizer.step()
    scheduler.step()
    step += 1
    if step % 100 == 0 or step == steps:
        print(f"step {step}: test loss {evaluate():.4f}")
        os.makedirs(out, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step}, path)
