"""Random kill-and-resume trials (not collected by pytest; minutes): each trial starts a small run, kills it
with SIGKILL at a random moment, then runs `gradwise train --resume` (the original command when the kill
came before config.yaml was written), itself killed at random at most twice more, until the run finishes,
and compares its `params_sha256` with an uninterrupted run's.

    python tests/kill_trials.py [--trials 30] [--seed 0] [--out /tmp/kill-trials]

Prints one line per trial (where each kill landed, by the checkpoint step found afterwards) and a tally;
a run that finishes before its first kill time is not a trial (it is redrawn).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUN = ["data.num_samples=500", "model.channels=[8,8]", "model.kernel_sizes=[5,3]", "train.batch_size=64",
       "log.progress=off", "log.plots=false", "train.steps=1500", "train.checkpoint_every=100", "train.eval_every=500",
       "diagnostics.every=0"]


def gradwise(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gradwise", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def checkpoint_step(out: Path) -> str:
    """Where the run stands: the step of its checkpoint, 'none' before the first, 'done' once summary.json exists."""
    if (out / "summary.json").exists():
        return "done"
    ckpt = out / "checkpoints" / "last.pt"
    if not ckpt.exists():
        return "none"
    import torch

    return str(torch.load(ckpt, weights_only=True)["step"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/kill-trials")
    args = parser.parse_args()
    root, rng = Path(args.out), random.Random(args.seed)
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    ref = gradwise("--out", str(root / "reference"), *RUN)
    assert ref.wait() == 0, ref.stderr.read()
    duration = time.perf_counter() - t0  # kill times are drawn from (0.3 s, 0.95 x this)
    reference = json.loads((root / "reference" / "summary.json").read_text())["params_sha256"]
    matches, kills_at, trial, unkilled = 0, [], 0, 0
    while trial < args.trials:
        out = root / f"trial{trial}-{unkilled}"
        proc, landed, attempts = gradwise("--out", str(out), *RUN), [], 0
        while True:
            kill = attempts < 3 and (attempts == 0 or rng.random() < 0.5)
            if kill:
                try:
                    proc.wait(timeout=rng.uniform(0.3, duration * 0.95))
                except subprocess.TimeoutExpired:
                    proc.kill()
            code = proc.wait()
            if code == 0 or (out / "summary.json").exists():  # finished (perhaps killed while exiting)
                break
            if code != -9:
                print(f"trial {trial}: exit {code}: {proc.stderr.read().strip()[:300]}")
                break
            landed.append(checkpoint_step(out))
            attempts += 1
            # the same command again, or --resume once it wrote its config.yaml (a kill during start-up may not)
            started = (out / "config.yaml").exists()
            proc = gradwise("--resume", str(out)) if started else gradwise("--out", str(out), *RUN)
        if not landed:  # it finished before the kill time: not a trial
            unkilled += 1
            shutil.rmtree(out, ignore_errors=True)
            continue
        trial += 1
        summary = out / "summary.json"
        sha = json.loads(summary.read_text())["params_sha256"] if summary.exists() else None
        matches += sha == reference
        kills_at += landed
        print(f"trial {trial - 1}: killed {len(landed)}x at checkpoint step {','.join(landed) or '-'}: "
              f"{'reference sha' if sha == reference else 'MISMATCH' if sha else 'NOT FINISHED'}", flush=True)
    tally = {k: kills_at.count(k) for k in sorted(set(kills_at))}
    print(f"{matches}/{args.trials} trials ended with the reference params_sha256; {len(kills_at)} kills, "
          f"landing (last checkpoint at the moment) {tally}; {unkilled} runs finished before their kill time "
          "and were not counted")


if __name__ == "__main__":
    main()
