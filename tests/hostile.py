"""Shared by the hostile-input tests: a finished run to damage, and the contract every refusal must keep."""

from __future__ import annotations

import shutil
from pathlib import Path

from gradwise.cli import main

from conftest import SMALL


def make_run(folder: Path) -> Path:
    """A finished small run (checkpoint, summary, metrics, config) in `folder`."""
    code = main(["train", *SMALL, "train.steps=4", "train.eval_every=2", "--out", str(folder)])
    assert code == 0
    return folder


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`gradwise ARGV` in this process: (exit status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def check_refusal(code: int, err: str, expected: int = 2) -> str:
    """The contract: the documented status, one line on stderr, no traceback; returns the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def copy_run(run: Path, where: Path) -> Path:
    shutil.copytree(run, where)
    return where
