"""Trains the same small runs with `train.parallel=fsdp` (under torchrun) or in one process, and writes the final
parameters: tests/test_distributed.py compares them.

    python tests/fsdp_worker.py OUT [local-norms]                     one process
    torchrun --nproc-per-node 2 tests/fsdp_worker.py OUT [local-norms]   FSDP over 2 processes

Runs: {mlp, transformer} x {sgd (momentum), adamw, lamb, lars}, 20 steps each, fp32, and two composed runs
(accumulation 4 with clipping; activation checkpointing with clipping). `local-norms` makes
LAMB/LARS use each shard's own norms (what a naive sharded implementation does): the test expects that to fail.
"""

import sys
from pathlib import Path

import torch

import gradwise.data
from gradwise import Trainer, load_config
from gradwise.train.state import seed_everything

COMMON = ["train.steps=20", "train.batch_size=32", "log.progress=off", "log.plots=false", "diagnostics.every=0",
          "train.eval_every=1000", "train.checkpoint_every=1000", "train.parallel=fsdp", "schedule.name=constant"]
MODELS = {
    "mlp": ["model.name=mlp", "data.num_samples=400"],
    "transformer": ["model.name=transformer", "data.name=text", "data.test_fraction=0.01", "model.context=16",
                    "model.d_model=32", "model.n_layer=2", "model.n_head=2"],
}
OPTIMIZERS = {"sgd": ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9"],
              "adamw": ["optim.name=adamw", "optim.lr=0.003"],
              "lamb": ["optim.name=lamb", "optim.lr=0.01"],
              "lars": ["optim.name=lars", "optim.lr=0.5"]}

# accumulation (the reduce-scatter on the last micro-batch only), activation checkpointing and clipping
COMPOSED = {"mlp-adamw-accumulate4-clip": ["model.name=mlp", "data.num_samples=400", *OPTIMIZERS["adamw"],
                                           "train.accumulate=4", "train.clip_norm=0.5"],
            "transformer-lamb-checkpointed-clip": [*MODELS["transformer"], *OPTIMIZERS["lamb"],
                                                   "memory.checkpoint=all", "train.clip_norm=0.5"]}

built = {}
real_build = gradwise.data.build_data


def build_once(cfg, context):  # the text corpus takes ~1.5 s to build: once per process, not once per run
    key = (repr(cfg), context)
    if key not in built:
        built[key] = real_build(cfg, context=context)
    return built[key]


gradwise.data.build_data = build_once
out = Path(sys.argv[1])
local_norms = sys.argv[2:] == ["local-norms"]
results = {}
for model_name, model_args in MODELS.items():
    for opt_name, opt_args in OPTIMIZERS.items():
        if local_norms and opt_name not in ("lamb", "lars"):
            continue
        cfg = load_config(None, [*COMMON, *model_args, *opt_args])
        trainer = Trainer.from_config(cfg)
        if local_norms:
            trainer.engine.optimizer.shard_sum = lambda squares: squares  # no reduction: each shard's own norms
        trainer.fit()
        state = trainer.sync.state_dicts(trainer.model, trainer.engine.optimizer)[0]
        results[f"{model_name}-{opt_name}"] = {k: v.detach().clone() for k, v in state.items()}
        seed_everything(0)
for name, args in ({} if local_norms else COMPOSED).items():
    trainer = Trainer.from_config(load_config(None, [*COMMON, *args]))
    trainer.fit()
    results[name] = {k: v.detach().clone() for k, v in
                     trainer.sync.state_dicts(trainer.model, trainer.engine.optimizer)[0].items()}
if trainer.sync.is_main:
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(results, out)
