"""`gradwise` killed (SIGKILL, nothing cleaned up) at a named point: tests/test_faults.py runs

    python tests/fault_run.py POINT gradwise-arguments...

POINT is where the process dies:
  before-first-checkpoint   at the end of step 3, before any checkpoint was written
  mid-checkpoint-write      the second checkpoint's file half written (its temp file left behind)
  during-evaluation         inside the second evaluation
  after-final-checkpoint    after the last checkpoint, before summary.json
  mid-shard-save            under torchrun with train.strategy=fsdp: rank 1, once the second sharded
                            checkpoint's folder is written, before last.pt names it
"""

import io
import os
import signal
import sys

import torch
import torch.distributed.checkpoint as dcp

import gradwise.train.callbacks as callbacks
import gradwise.train.trainer as trainer_module
from gradwise.cli import main


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def at_step(step: int):
    class Killer(callbacks.Callback):
        def on_step_end(self, trainer, out) -> None:
            if trainer.state.step == step:
                die()

    return Killer()


def nth_call(n: int, real, act):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            act(*args, **kwargs)
        return real(*args, **kwargs)

    return wrapper


def half_save(payload, handle) -> None:
    buffer = io.BytesIO()
    real_save(payload, buffer)
    handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    handle.flush()
    die()


point, argv = sys.argv[1], sys.argv[2:]
real_save, real_builtins = torch.save, callbacks.builtin_callbacks
if point == "before-first-checkpoint":
    trainer_module.builtin_callbacks = lambda *a: [*real_builtins(*a), at_step(3)]
elif point == "mid-checkpoint-write":
    torch.save = nth_call(2, real_save, half_save)
elif point == "during-evaluation":
    trainer_module.evaluate = nth_call(2, trainer_module.evaluate, lambda *a, **k: die())
elif point == "after-final-checkpoint":
    class AfterFinal(callbacks.Callback):
        def on_fit_end(self, trainer, summary) -> None:
            die()

    trainer_module.builtin_callbacks = lambda *a: [*real_builtins(*a), AfterFinal()]
elif point == "mid-shard-save":
    if os.environ.get("RANK") == "1":
        real_dcp_save, saves = dcp.save, []

        def save_then_die_the_second_time(*args, **kwargs):
            result = real_dcp_save(*args, **kwargs)
            saves.append(1)
            if len(saves) == 2:
                die()
            return result

        dcp.save = save_then_die_the_second_time
else:
    raise SystemExit(f"unknown point {point}")
raise SystemExit(main(argv))
