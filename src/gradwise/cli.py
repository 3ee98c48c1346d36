"""The `gradwise` command line: `train` and `bench`.

Exit status: 0 ok; 2 bad input (config, CLI, data, checkpoint) with a one-line
message and no traceback; 1 any other failure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gradwise.errors import UserInputError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"gradwise: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _default_out_dir() -> Path:
    base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    candidate, n = base, 1
    while candidate.exists():
        candidate, n = Path(f"{base}-{n}"), n + 1
    return candidate


def cmd_train(args: argparse.Namespace) -> int:
    from gradwise.config import load_config
    from gradwise.train import Trainer

    if args.resume:
        if args.config or args.out:
            raise UserInputError("usage error: --resume DIR continues that run with its own config; drop --config/--out")
        trainer = Trainer.resume(args.resume, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        trainer = Trainer.from_config(cfg, out_dir=args.out or _default_out_dir())
    summary = trainer.fit()
    metric = next(
        (f"{k} {summary[k]:.4f}" for k in ("test_accuracy", "test_bpc") if k in summary), "no test set"
    )
    print(
        f"done: {metric} | test_loss {summary.get('test_loss', float('nan')):.4f} | "
        f"{summary['steps']} steps in {summary['wall_seconds']:.1f}s | run: {trainer.out_dir}"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from gradwise.bench import run_benchmarks

    return run_benchmarks(args.names, json_out=args.json, steps=args.steps, repeats=args.repeats)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradwise", description="Train PyTorch models fast, lean, stable and at scale.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model (default: a CNN on MNIST-1D)")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.lr=0.003")
    train.add_argument("--config", help="YAML config file (defaults apply to keys it leaves out)")
    train.add_argument("--out", help="run directory to create (default: runs/DATE-TIME)")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR exactly; train.steps=M extends it")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(func=cmd_train)

    bench = sub.add_parser("bench", help="benchmarks, as ratios measured side by side in one run")
    bench.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all): overhead")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    bench.add_argument("--steps", type=int, default=300, help="timed steps per measurement (default 300)")
    bench.add_argument("--repeats", type=int, default=5, help="alternating repeats per measurement (default 5)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserInputError as err:
        print(f"gradwise: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradwise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
