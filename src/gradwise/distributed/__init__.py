"""Scaling out: synchronous data parallel on torch.distributed (`ddp`, `launch`)."""
