"""The `gradwise` command line: `train`, `plan`, `inspect`, `repro` and `bench`.

Exit status: 0 ok; 2 bad input (config, CLI, data, checkpoint, a path that cannot
be used) with a one-line message and no traceback; 1 a non-finite run, or the
machine failing a write (a full disk: one line too); 1 any other failure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gradwise.checkpoint.sharded import export_model, exported_before
from gradwise.config import load_config, parse_bytes
from gradwise.diagnostics.numerics import format_report as format_ranges
from gradwise.errors import NonFiniteError, UserInputError, describe_os_error, one_line, os_error_status
from gradwise.io import read_json, write_json, write_text
from gradwise.outputs import check_output, head, html_page, json_with
from gradwise.launch import LaunchOptions, check_group_fits, launch, run_rank
from gradwise.parallel.ddp import launched_by_torchrun
from gradwise.parallel.environment import group_sync
from gradwise.report import render_compare, render_report
from gradwise.tools.inspect import format_report, inspect_run, to_json
from gradwise.tools.planner import format_table, no_fit_error, plan, setting_keys
from gradwise.tools.precision import inspect_precision
from gradwise.train import Trainer
from gradwise.train.factories import checked_build, describe_source, train_samples
from gradwise.train.run_dir import RunLock, refuse_existing_run, resume_config


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"gradwise: error: {one_line(message)} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _default_out_dir() -> Path:
    base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    candidate, n = base, 1
    while candidate.exists():
        candidate, n = Path(f"{base}-{n}"), n + 1
    return candidate


def cmd_train(args: argparse.Namespace) -> int:
    if args.strategy in ("ddp", "fsdp"):  # the synchronous strategies are a config key: --strategy X is
        args.overrides = [*args.overrides, f"train.strategy={args.strategy}"]  # train.strategy=X
    if args.resume and (args.config or args.out):
        raise UserInputError("usage error: --resume DIR continues that run with its own config; drop --config/--out")
    if launched_by_torchrun():
        return _train_worker(args)
    if args.strategy == "async":
        return _train_async(args)
    if args.ray_address is not None or (args.workers is not None and args.strategy != "simulate"):
        raise UserInputError("usage error: --workers needs --strategy async or simulate; --ray-address async")
    if args.nproc is not None:
        if args.strategy == "simulate":
            raise UserInputError("usage error: --strategy simulate runs in one process; drop --nproc")
        return _launch(args)
    source = None
    if args.strategy == "simulate":  # asynchronous staleness in one process (gradwise.asynchronous.delay)
        from gradwise.asynchronous.delay import DelayedGradients

        source = DelayedGradients(args.workers if args.workers is not None else 4)
    if args.print_config:  # prints, never trains
        cfg = resume_config(args.resume, args.overrides) if args.resume else load_config(args.config, args.overrides)
        print(cfg.to_yaml(), end="")
        return 0
    if args.resume:
        trainer = Trainer.resume(args.resume, args.overrides, source=source)
    else:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer.from_config(cfg, out_dir=args.out or _default_out_dir(), source=source)
    _report(trainer.out_dir, trainer.fit())
    return 0


def _report(run_dir, summary: dict) -> None:
    metric = next(
        (f"{k} {summary[k]:.4f}" for k in ("test_accuracy", "test_bpc") if k in summary), "no test set"
    )
    print(
        f"done: {metric} | test_loss {summary.get('test_loss', float('nan')):.4f} | "
        f"{summary['steps']} steps in {summary['wall_seconds']:.1f}s | run: {run_dir}"
    )


def _launch_target(args: argparse.Namespace):
    """(config, run directory) that a launcher hands to its workers, checked before anything starts."""
    if args.resume:
        cfg = resume_config(args.resume, args.overrides)
        RunLock(Path(args.resume)).check_free()
        return cfg, Path(args.resume)
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else _default_out_dir()
    refuse_existing_run(out)
    if out.exists():
        RunLock(out).check_free()
    return cfg, out


def _train_async(args: argparse.Namespace) -> int:
    """The Ray parameter server: `--workers M` worker actors, a server actor, this process as the driver."""
    from gradwise.asynchronous.ps import train_async

    if args.nproc is not None:
        raise UserInputError("usage error: --nproc (synchronous data parallel) and --strategy async are exclusive")
    if args.print_config:
        raise UserInputError("usage error: --print-config does not train; drop --strategy async")
    workers = args.workers if args.workers is not None else 4
    cfg, out = _launch_target(args)
    summary = train_async(cfg, workers, out, ray_address=args.ray_address, resume=bool(args.resume),
                          progress=cfg.log.progress)
    print(f"async ({cfg.ps.rule}, {workers} workers): {summary['gradients']} gradients, {summary['updates']} "
          f"updates, staleness mean {summary['staleness_mean']:.2f} max {summary['staleness_max']}")
    _report(Path(out), summary)
    return 0


def _launch(args: argparse.Namespace) -> int:
    """Check everything checkable, then start --nproc workers under torchrun's elastic agent."""
    for flag in ("nproc", "nnodes"):
        if getattr(args, flag) < 1:
            raise UserInputError(f"usage error: --{flag}={getattr(args, flag)} must be at least 1")
    if args.max_restarts < 0:
        raise UserInputError(f"usage error: --max-restarts={args.max_restarts} must be 0 or more")
    if not args.rdzv_timeout > 0 or args.rdzv_timeout == float("inf"):
        raise UserInputError(f"usage error: --rdzv-timeout={args.rdzv_timeout} must be a positive, finite number "
                             "of seconds")
    if args.print_config:
        raise UserInputError("usage error: --print-config does not launch processes; drop --nproc")
    cfg, out = _launch_target(args)
    if args.resume:
        worker_args = ["train", "--resume", args.resume, *args.overrides]
    else:
        worker_args = ["train", *(["--config", args.config] if args.config else []), "--out", str(out),
                       *args.overrides]
    check_group_fits(args.nproc * args.nnodes, cfg.train, train_samples(checked_build(cfg)))
    opts = LaunchOptions(nproc=args.nproc, nnodes=args.nnodes, max_restarts=args.max_restarts,
                         rdzv_endpoint=args.rdzv_endpoint, port=args.port, rdzv_timeout=args.rdzv_timeout,
                         rdzv_id=args.rdzv_id)
    return launch(opts, worker_args)


def _train_worker(args: argparse.Namespace) -> int:
    """One rank of a torchrun group: join, build or resume the run (after a restart: from its last checkpoint)."""
    def work(ctx) -> None:
        cfg = resume_config(args.resume, args.overrides) if args.resume else load_config(args.config, args.overrides)
        sync = group_sync(ctx, cfg.train.strategy)
        restarts = sync.restarts
        out = Path(args.resume) if args.resume else Path(sync.broadcast(str(args.out or _default_out_dir())))
        if args.resume or (restarts and (out / "checkpoints" / "last.pt").is_file()):
            trainer = Trainer.from_config(cfg if args.resume else resume_config(out), out_dir=out, sync=sync)
            # a restarted group whose run had finished (a rank died after it): done; `--resume` of a finished
            # run stays an error on every attempt
            complete = trainer.restore(out, finished_ok=restarts > 0 and not args.resume)
        else:  # a fresh run, or a restart before the first checkpoint: the fit replaces that attempt's files
            trainer, complete = Trainer.from_config(cfg, out_dir=out, sync=sync), False
        if restarts and ctx.is_main:
            print(f"gradwise: restart {restarts}: continuing from step {trainer.state.step}", flush=True)
        summary = read_json(out / "summary.json") if complete else trainer.fit()
        if ctx.is_main:
            _report(trainer.out_dir, summary)

    return run_rank(work)


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        budget = parse_bytes(args.budget, "--budget")
    except ValueError as err:
        raise UserInputError(f"usage error: {err}") from None
    if args.trial_steps < 1:
        raise UserInputError(f"usage error: --trial-steps={args.trial_steps} must be at least 1")
    if args.json:
        check_output(args.json, "--json", json_with("budget_bytes", "rows"))
    cfg = load_config(args.config, args.overrides)
    dots = lambda row: print(".", end="", file=sys.stderr, flush=True)  # noqa: E731  (progress, a dot a trial)
    if launched_by_torchrun():  # a rank of `plan --nproc N`: every trial runs on the group, DDP and FSDP
        def work(ctx) -> None:
            syncs = {"ddp": group_sync(ctx, "ddp"), "fsdp": group_sync(ctx, "fsdp")}
            rows, best = plan(cfg, budget, args.trial_steps, syncs=syncs, progress=dots)
            _report_plan(args, budget, rows, best, ctx.world_size, shown=ctx.is_main)

        return run_rank(work)
    if args.nproc is not None:
        if args.nproc < 2:
            raise UserInputError(f"usage error: --nproc={args.nproc} must be at least 2 (without it: one process)")
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise UserInputError(f"usage error: --json={args.json}: its folder does not exist")
        check_group_fits(args.nproc, cfg.train, train_samples(checked_build(cfg)))
        return launch(LaunchOptions(nproc=args.nproc), ["plan", "--budget", args.budget, "--trial-steps",
                                                        str(args.trial_steps), *args.overrides,
                                                        *(["--config", args.config] if args.config else []),
                                                        *(["--json", args.json] if args.json else [])])
    print(f"planning global batch {cfg.train.batch_size} for {describe_source(cfg)} "
          f"within {args.budget} ({budget} bytes)", file=sys.stderr, flush=True)
    _report_plan(args, budget, *plan(cfg, budget, args.trial_steps, progress=dots))
    return 0


def _report_plan(args: argparse.Namespace, budget: int, rows: list, best: dict | None, processes: int = 1,
                 shown: bool = True) -> None:
    """The table (and --json) where `shown`; nothing fits: a one-line error (on every rank of a group)."""
    if shown:
        print(file=sys.stderr)
        print(format_table(rows, best))
        if args.json:
            write_json(args.json, {"budget_bytes": budget, "processes": processes, "rows": rows, "best": best})
    if best is None:
        raise no_fit_error(rows, args.budget)
    if shown:
        how = f"train with them and --nproc {processes}" if processes > 1 else \
            f"or train with memory.auto=true memory.budget={args.budget}"
        print(f"\nfastest that fits: {setting_keys(best)}  ({how})")


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.probes < 1:
        raise UserInputError(f"usage error: --steps={args.steps} and --probes={args.probes} must be at least 1")
    if args.overrides and args.overrides[0] == "precision":  # gradwise inspect precision [overrides]
        cfg = load_config(args.config, args.overrides[1:])
        report = inspect_precision(cfg, steps=args.steps)
        print(to_json(report) if args.json else format_ranges(report))
        return 0
    cfg = load_config(args.config, args.overrides)
    report = inspect_run(cfg, steps=args.steps, probes=args.probes)
    print(to_json(report) if args.json else format_report(report))
    return 0


def cmd_repro(args: argparse.Namespace) -> int:
    from gradwise.experiments import run_experiment

    return run_experiment(args.name, args.out or f"results/{args.name}", quick=args.quick)


def cmd_bench(args: argparse.Namespace) -> int:
    from gradwise.bench import run_benchmarks

    if args.json:
        check_output(args.json, "--json", json_with("machine", "benchmarks"))
    if args.markdown:
        check_output(args.markdown, "--markdown", lambda path: head(path, 9) == "Measured ")
    return run_benchmarks(args.names, json_out=args.json, steps=args.steps, repeats=args.repeats,
                          markdown_out=args.markdown)


def cmd_report(args: argparse.Namespace) -> int:
    out = check_output(args.out or Path(args.run_dir) / "report.html", "--out", html_page)
    write_text(out, render_report(args.run_dir))
    print(f"wrote {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    if len(args.run_dirs) < 2:
        raise UserInputError("usage error: compare needs at least two run directories")
    out = check_output(args.out or "compare.html", "--out", html_page)
    write_text(out, render_compare(args.run_dirs))
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    out = check_output(args.out or run_dir / "model.pt", "--out", exported_before)
    count = export_model(run_dir, out)
    print(f"wrote {out} ({count} tensors: model.load_state_dict(torch.load('{out}', weights_only=True)))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradwise", description="Train PyTorch models fast, lean, stable and at scale.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model (default: a CNN on MNIST-1D)")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.lr=0.003")
    train.add_argument("--config", help="YAML config file (defaults apply to keys it leaves out)")
    train.add_argument("--out", help="run directory to create (default: runs/DATE-TIME)")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR exactly; train.steps=M extends it")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ps = train.add_argument_group("asynchronous parameter server on Ray (see docs/async.md)")
    ps.add_argument("--strategy", choices=["ddp", "fsdp", "async", "simulate"],
                    help="ddp (default, train.strategy=ddp): one process, or --nproc data parallel; fsdp "
                         "(train.strategy=fsdp): --nproc sharded data parallel; async: a Ray parameter server; "
                         "simulate: async staleness in one process (ps.delay; docs/async.md)")
    ps.add_argument("--workers", type=int, help="async: worker actors; simulate: workers simulated (default 4)")
    ps.add_argument("--ray-address", help="async: a running Ray cluster (default: start a local Ray)")
    dp = train.add_argument_group("data parallel (see docs/distributed.md)")
    dp.add_argument("--nproc", type=int,
                    help="processes on this machine (torchrun); train.batch_size is the global batch")
    dp.add_argument("--max-restarts", type=int, default=0,
                    help="restart the group from the last checkpoint this many times when a worker dies (default 0)")
    dp.add_argument("--port", type=int, help="rendezvous port on this machine (default: a free one)")
    dp.add_argument("--nnodes", type=int, default=1, help="machines taking part (default 1)")
    dp.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                    help="rendezvous of a multi-machine run (same on every node)")
    dp.add_argument("--rdzv-id", default="gradwise", help="names the run at the rendezvous; the same on every node")
    dp.add_argument("--rdzv-timeout", type=float, default=60.0,
                    help="seconds to wait for every node to join before giving up (default 60)")
    train.set_defaults(func=cmd_train)

    planner = sub.add_parser("plan", help="find the fastest micro-batch/checkpoint/precision setting within a "
                                          "memory budget")
    planner.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    planner.add_argument("--budget", required=True, help="memory budget, e.g. 2GiB, 512MiB, 500MB")
    planner.add_argument("--config", help="YAML config file")
    planner.add_argument("--trial-steps", type=int, default=3, help="timed steps per candidate (default 3)")
    planner.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    planner.add_argument("--nproc", type=int, help="plan for data parallel over this many processes on this machine: "
                                                   "every trial runs on the group, under DDP and under FSDP "
                                                   "(memory: per process)")
    planner.set_defaults(func=cmd_plan)

    inspect = sub.add_parser(
        "inspect", help="per-layer gradient health, Jacobian at init, spectral norms; "
                        "'inspect precision': fp16/bf16 range analysis and loss-scale advice")
    inspect.add_argument("overrides", nargs="*", metavar="[precision] key.sub=value",
                         help="config overrides; a leading 'precision' runs the numerics analysis")
    inspect.add_argument("--config", help="YAML config file")
    inspect.add_argument("--steps", type=int, default=5, help="training steps before the table (default 5)")
    inspect.add_argument("--probes", type=int, default=8, help="random probes for the Jacobian measure (default 8)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of the table")
    inspect.set_defaults(func=cmd_inspect)

    repro = sub.add_parser("repro", help="reproduce a claim of the seeds; writes results.json, results.md, plots")
    repro.add_argument("name", help="experiment: memory, large-batch, depth")
    repro.add_argument("--out", help="output folder (default results/NAME)")
    repro.add_argument("--quick", action="store_true", help="smaller models and fewer steps (a smoke run)")
    repro.set_defaults(func=cmd_repro)

    bench = sub.add_parser("bench", help="benchmarks, as ratios measured side by side in one run")
    bench.add_argument("names", nargs="*", metavar="NAME",
                       help="benchmarks to run (default: all): overhead, optimizers, matmul-limit, compile, memory, "
                            "distributed, data")
    bench.add_argument("--json", metavar="FILE", default="bench-results.json",
                       help="where to write the results as JSON (default bench-results.json)")
    bench.add_argument("--markdown", metavar="FILE", help="also write the tables, date and machine as markdown")
    bench.add_argument("--steps", type=int, default=300, help="timed steps per measurement (default 300)")
    bench.add_argument("--repeats", type=int, default=5, help="alternating repeats per measurement (default 5)")
    bench.set_defaults(func=cmd_bench)

    report = sub.add_parser("report", help="a self-contained HTML page for a run (plots, summary, diagnostics)")
    report.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    report.add_argument("--out", help="HTML file to write (default RUN_DIR/report.html)")
    report.set_defaults(func=cmd_report)

    compare = sub.add_parser("compare", help="one HTML page overlaying several runs")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--out", help="HTML file to write (default compare.html)")
    compare.set_defaults(func=cmd_compare)

    export = sub.add_parser("export", help="the model state_dict of a run's last checkpoint as one file "
                                           "(a sharded checkpoint consolidated)")
    export.add_argument("run_dir", help="a run directory (holds checkpoints/last.pt)")
    export.add_argument("--out", help="file to write (default RUN_DIR/model.pt)")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`train --out x a=1`): argparse leaves those over
    stray = [t for t in extra if t.startswith("-") or "=" not in t]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except UserInputError as err:
        print(f"gradwise: {one_line(err)}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"gradwise: {one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"gradwise: {one_line(describe_os_error(err))}", file=sys.stderr)
        return os_error_status(err)
    except KeyboardInterrupt:
        print("gradwise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
