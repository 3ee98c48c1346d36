"""How the experiments choose a hyperparameter on validation: a grid, extended past an edge while the best
sits there, so a choice is never an artefact of where the grid happened to stop."""

from __future__ import annotations

from typing import Any, Callable


def extend_grid(run_at: Callable[[float], dict[str, Any]], grid, extensions: int, factor: float,
                score: Callable[[dict[str, Any]], Any]) -> dict[float, dict[str, Any]]:
    """`run_at` over `grid`, then one step of `factor` past the edge while the best (by `score`) sits at that
    edge, at most `extensions` times; the runs by grid value, in order."""
    done = {v: run_at(v) for v in grid}
    for _ in range(extensions):
        best = max(done, key=lambda v: score(done[v]))
        if best == min(done):
            done[best / factor] = run_at(best / factor)
        elif best == max(done):
            done[best * factor] = run_at(best * factor)
        else:
            break
    return {v: done[v] for v in sorted(done)}


def at_edge(value: float, tried) -> bool:
    """Whether `value` is the smallest or largest of `tried`."""
    return value in (min(tried), max(tried))
