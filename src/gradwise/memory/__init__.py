"""Memory and speed: accumulation weights, mixed precision with loss scaling,
activation checkpointing, memory measurement and the memory planner."""
