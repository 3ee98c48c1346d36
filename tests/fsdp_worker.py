"""Trains the same small runs with `train.strategy=fsdp` (under torchrun) or in one process, and writes the final
parameters: tests/test_fsdp.py compares them.

    python tests/fsdp_worker.py OUT                                   one process
    torchrun --nproc-per-node 2 tests/fsdp_worker.py OUT [LOCAL_OUT]  FSDP over 2 processes (and again
                                                                      with each shard's own norms)

Runs: {mlp, transformer} x {sgd (momentum), adamw, lamb, lars}, 20 steps each, fp32, and three composed runs
(accumulation 4 with clipping; activation checkpointing with clipping; L1/L2 penalties with early stopping).
LOCAL_OUT gets the LAMB/LARS runs again with each shard's own norms (what a naive sharded implementation
does): the test expects those to miss. Under FSDP one more run trains in fp16 with a loss scale that
overflows again and again; each rank's skipped steps and final scale go to OUT (they must agree: an overflow
in any rank's shard skips the step on every rank).
"""

import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

import gradwise.data
import gradwise.optim.layerwise as layerwise
import gradwise.train.trainer
from gradwise import Trainer, load_config
from gradwise.train.randomness import seed_everything

COMMON = ["train.steps=20", "train.batch_size=32", "log.progress=off", "log.plots=false", "diagnostics.every=0",
          "train.eval_every=null", "train.checkpoint_every=null", "train.strategy=fsdp", "schedule.name=constant"]
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
                                                   "memory.checkpoint=all", "train.clip_norm=0.5"],
            # L1/L2 penalties on the shards; early stopping that stops at step 8 and restores step 4's weights
            "mlp-sgd-l1-l2-early-stopping": ["model.name=mlp", "data.num_samples=400", "data.val_fraction=0.2",
                                             *OPTIMIZERS["sgd"], "regularize.l1=0.001", "regularize.l2=0.01",
                                             "train.eval_every=4", "early_stopping.patience=1",
                                             "early_stopping.min_delta=1e9"]}

built = {}
real_build = gradwise.data.build_data


def build_once(cfg, context):  # the text corpus takes ~1.5 s to build: once per process, not once per run
    key = (repr(cfg), context)
    if key not in built:
        built[key] = real_build(cfg, context=context)
    return built[key]


def whole(model) -> dict:
    """The model's parameters and buffers, each gathered whole (a collective under FSDP)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def train(args: list[str], local_norms: bool = False) -> tuple[dict, dict]:
    # local_norms: no reduction over the shards, each shard's own norms
    layerwise.shard_reduction = local_reduction if local_norms else real_reduction
    trainer = Trainer.from_config(load_config(None, [*COMMON, *args]))
    done = trainer.fit()
    seed_everything(0)
    return whole(trainer.model), done


real_reduction = layerwise.shard_reduction


def local_reduction(params):
    return (lambda squares: squares) if real_reduction(params) is not None else None


FP16_OVERFLOWS = ["model.name=mlp", "data.num_samples=400", *OPTIMIZERS["adamw"], "precision=fp16",
                  "scaler.init_scale=16777216", "scaler.growth_interval=3"]


gradwise.train.trainer.build_data = build_once  # what Trainer.from_config calls
outputs = {"sharded": Path(sys.argv[1])}
if sys.argv[2:]:
    outputs["local-norms"] = Path(sys.argv[2])
for kind, out in outputs.items():
    local_norms = kind == "local-norms"
    results = {}
    for model_name, model_args in MODELS.items():
        for opt_name, opt_args in OPTIMIZERS.items():
            if not local_norms or opt_name in ("lamb", "lars"):
                results[f"{model_name}-{opt_name}"] = train([*model_args, *opt_args], local_norms)[0]
    for name, args in ({} if local_norms else COMPOSED).items():
        results[name], done = train(args)
        if "early_stopping" in done:
            assert done["early_stopping"]["stopped_at"] == 8 and done["early_stopping"]["best_step"] == 4, done
    if not local_norms and "RANK" in os.environ:
        done = train(FP16_OVERFLOWS)[1]  # each rank's own figures
        results["fp16-ranks"] = [None] * int(os.environ["WORLD_SIZE"])
        torch.distributed.all_gather_object(results["fp16-ranks"], (done["skipped_steps"], done["loss_scale"]))
    if int(os.environ.get("RANK", "0")) == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(results, out)
