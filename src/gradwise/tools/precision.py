"""`gradwise inspect precision`: a few fp32 training steps of the configured run with hooks that histogram every
layer's outputs, the gradients flowing back into them, its parameters' gradients and its weight updates; the
range analysis of those histograms (fp16/bf16 overflow, flush to zero, lost updates, a loss scale) is
gradwise.diagnostics.numerics'.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from gradwise.arguments import check_count, config_argument
from gradwise.config import Config
from gradwise.data.sampler import EpochBatches
from gradwise.diagnostics.numerics import LayerRecord, analyse
from gradwise.train import Trainer
from gradwise.train.batch import rows, to_device
from gradwise.train.pipeline import BatchReader
from gradwise.train.randomness import TRAIN_DATA, derived_seed, isolated_rng

INSPECT_MICRO_BATCH = 8  # rows per forward while inspecting (activations kept for backward scale with it)


def training_batches(trainer: Any, steps: int) -> Iterator[Any]:
    """The run's first `steps` training batches, read as the run reads them (its order, collate function)."""
    pipe, tc = trainer.data["train"], trainer.cfg.train
    if pipe.streaming:
        stream = iter(DataLoader(pipe.dataset, batch_size=tc.batch_size, collate_fn=pipe.collate_fn))
        yield from itertools.islice(stream, steps)
        return
    order = EpochBatches(len(pipe.dataset), tc.batch_size, trainer.cfg.seed, tc.drop_last)
    reader = BatchReader(pipe.dataset, pipe.collate_fn, derived_seed(trainer.cfg.seed, TRAIN_DATA, 0))
    for i in range(steps):
        yield reader.read((0, i), order.next())


def collect(trainer: Any, steps: int) -> dict[str, LayerRecord]:
    """Run `steps` fp32 training steps of `trainer` with hooks; per-layer histograms of outputs, grads, updates."""
    model: nn.Module = trainer.model
    records: dict[str, LayerRecord] = {}
    leaves = {name: m for name, m in model.named_modules() if name and not list(m.children())}

    def forward_hook(name):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                records.setdefault(name, LayerRecord()).activations.add(output)
        return hook

    # An output shared by the whole batch (its leading dimension is not the micro-batch's rows, e.g. a position
    # embedding's (T, C)) gets one micro-batch's share of the gradient per backward: those shares are summed over
    # the step's micro-batches, giving the whole batch's gradient, as training without micro-batches sees it.
    split = trainer.cfg.train.micro_batches > 1
    shared: dict[str, torch.Tensor] = {}
    micro_rows = [0]

    def count_rows(_module, args, kwargs):
        micro_rows[0] = rows((args, kwargs))

    def backward_hook(name):
        def hook(_module, _grad_input, grad_output):
            if grad_output and isinstance(grad_output[0], torch.Tensor):
                g = grad_output[0].detach()
                if split and (g.ndim == 0 or g.shape[0] != micro_rows[0]):
                    if name in shared and shared[name].shape != g.shape:  # not batch-shared after all
                        records.setdefault(name, LayerRecord()).output_gradients.add(shared.pop(name))
                    shared[name] = shared[name] + g if name in shared else g.clone()
                else:
                    records.setdefault(name, LayerRecord()).output_gradients.add(g)
        return hook

    handles = [model.register_forward_pre_hook(count_rows, with_kwargs=True)]
    handles += [m.register_forward_hook(forward_hook(name)) for name, m in leaves.items()]
    handles += [m.register_full_backward_hook(backward_hook(name)) for name, m in leaves.items()]
    owner = {id(p): name.rsplit(".", 1)[0] for name, p in model.named_parameters()}
    try:
        for batch in training_batches(trainer, steps):
            before = {id(p): p.detach().clone() for p in trainer.engine.params}
            with warnings.catch_warnings():  # the first layer's hook fires on outputs only: expected
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                trainer.engine.train_step(to_device(batch, trainer.engine.device))
            for name, g in shared.items():
                records.setdefault(name, LayerRecord()).output_gradients.add(g)
            shared.clear()
            for p in trainer.engine.params:
                rec = records.setdefault(owner[id(p)], LayerRecord())
                if p.grad is not None:
                    rec.gradients.add(p.grad)
                w = before[id(p)]
                moved = (p.detach() - w).abs()
                nonzero = w != 0
                rec.update_ratio.add(moved[nonzero] / w[nonzero].abs())
    finally:
        for h in handles:
            h.remove()
    return records


def precision_config(cfg: Config | None) -> Config:
    """The run as inspected: fp32, no progress bar or health records, eager, and micro-batches of at most
    INSPECT_MICRO_BATCH rows (the same gradients, a fraction of the activations)."""
    cfg = config_argument("config", cfg).thawed()
    cfg.precision, cfg.log.progress, cfg.diagnostics.every, cfg.train.compile = "fp32", "off", 0, False
    cfg.memory.auto = False  # fp32 as configured, not as a plan would change it
    if cfg.train.micro_batch_size is None and cfg.train.accumulate == 1:
        cfg.train.micro_batch_size = min(cfg.train.batch_size, INSPECT_MICRO_BATCH)
    return cfg


def inspect_precision(cfg: Config, steps: int = 5) -> dict[str, Any]:
    """Build the configured built-in run in fp32, take `steps` steps with hooks, and analyse the ranges."""
    with isolated_rng(cfg.seed):
        return report_of(Trainer.from_config(precision_config(cfg)), steps)


def inspect_precision_model(model: nn.Module, train_data: Any, *, config: Config | None = None, steps: int = 5,
                            **trainer_args: Any) -> dict[str, Any]:
    """`gradwise.inspect_precision`: the range analysis for your model and data (`trainer_args` are Trainer's:
    loss_fn, collate_fn, count_fn, task, ...; the same first-batch check). The model trains `steps` steps."""
    check_count("steps", steps)
    cfg = precision_config(config)
    with isolated_rng(cfg.seed):  # seeded by the config; the caller's generators are left as they were
        return report_of(Trainer(model, train_data, config=cfg, **trainer_args), steps)


def report_of(trainer: Trainer, steps: int) -> dict[str, Any]:
    report = analyse(collect(trainer, steps))
    report["steps"] = steps
    return report
