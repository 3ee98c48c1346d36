"""`gradwise bench`: benchmarks whose every figure is a ratio measured side by side in one run.

Each benchmark is a function `run(steps, repeats) -> dict` with a `rows` list
for the markdown table; `run_benchmarks` adds the machine description and the
date, prints one markdown table per benchmark, and writes everything to
`bench-results.json` (or `--json FILE`).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Callable

import torch

from gradwise.errors import UserInputError
from gradwise.io import write_json, write_text


def _benchmarks() -> dict[str, Callable[..., dict[str, Any]]]:
    from gradwise.bench import compilation, data, distributed, matmul, memory, optimizers, overhead

    return {"overhead": overhead.run, "optimizers": optimizers.run, "matmul-limit": matmul.run,
            "compile": compilation.run, "memory": memory.run, "distributed": distributed.run, "data": data.run}


def describe_machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(results: dict[str, Any]) -> str:
    """All benchmarks of a `run_benchmarks` result as markdown: date, machine, one table per benchmark."""
    m = results["machine"]
    lines = [f"Measured {results['date']} on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), "
             f"torch {m['torch']}, Python {m['python']}" + (f", {m['cuda']}" if m.get("cuda") else ", no GPU")
             + f"; `--steps {results['steps']} --repeats {results['repeats']}`.", ""]
    for name, result in results["benchmarks"].items():
        lines += [f"### {name}", "", markdown_table(result["rows"]), ""]
        for title, rows in result.get("tables", {}).items():
            lines += [f"#### {title}", "", markdown_table(rows), ""]
        lines += [f"{note}" for note in result.get("notes", [])]
        lines.append("")
    return "\n".join(lines)


def run_benchmarks(names: list[str], json_out: str | None = "bench-results.json", steps: int = 300,
                   repeats: int = 5, markdown_out: str | None = None) -> int:
    available = _benchmarks()
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UserInputError(f"usage error: unknown benchmark {unknown} (available: {', '.join(available)})")
    if steps < 1 or repeats < 1:
        raise UserInputError(f"usage error: --steps={steps} and --repeats={repeats} must be positive")
    machine = describe_machine()
    date = time.strftime("%Y-%m-%d %H:%M %Z")
    print(f"machine: {machine}\ndate: {date}", flush=True)
    results: dict[str, Any] = {"machine": machine, "date": date, "steps": steps, "repeats": repeats,
                               "benchmarks": {}}
    for name in names or list(available):
        print(f"\n## {name}", flush=True)
        result = available[name](steps=steps, repeats=repeats)
        results["benchmarks"][name] = result
        print(markdown_table(result["rows"]))
        for line in result.get("notes", []):
            print(line)
        if json_out:  # after each benchmark, so a long suite keeps what it measured
            write_json(json_out, results)
    if json_out:
        print(f"\nwrote {json_out}", file=sys.stderr)
    if markdown_out:
        write_text(markdown_out, markdown_report(results))
        print(f"wrote {markdown_out}", file=sys.stderr)
    return 0


__all__ = ["run_benchmarks", "describe_machine", "markdown_table", "markdown_report"]
