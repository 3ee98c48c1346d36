"""The same job with Hugging Face Accelerate."""

import os
import sys

import torch
from accelerate import Accelerator
from common import data_and_model
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

steps, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
train, test, model = data_and_model()
accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=2, cpu=True)
optimizer = torch.optim.AdamW(model.parameters(), lr=0.003)
scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=20, num_training_steps=steps)
loader, test_loader = DataLoader(train, batch_size=8, shuffle=True), DataLoader(test, batch_size=64)
model, optimizer, loader, test_loader, scheduler = accelerator.prepare(model, optimizer, loader, test_loader, scheduler)
step = 0
if os.path.exists(os.path.join(out, "step.txt")):
    accelerator.load_state(out)
    step = int(open(os.path.join(out, "step.txt")).read())


def evaluate():
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in test_loader:
            total += model(**batch).loss.item() * len(batch["input_ids"])
            n += len(batch["input_ids"])
    model.train()
    return total / n


model.train()
while step < steps:
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            step += 1
            if step % 100 == 0 or step == steps:
                print(f"step {step}: test loss {evaluate():.4f}")
                accelerator.save_state(out)
                open(os.path.join(out, "step.txt"), "w").write(str(step))
            if step == steps:
                break
