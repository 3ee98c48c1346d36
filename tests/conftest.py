"""Shared fixtures: a per-session data cache and small configs that train in a second."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from gradwise import load_config


@pytest.fixture(autouse=True, scope="session")
def _share_the_cores():
    """Under pytest-xdist each worker computes with its share of the cores: OpenMP threads that outnumber the
    cores spin against each other and slow both workers several times over."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    yield


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    os.environ["GRADWISE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["MPLBACKEND"] = "Agg"
    yield


# 400 train / 100 test MNIST-1D samples, a small CNN: a step takes about a millisecond.
SMALL = [
    "data.num_samples=500",
    "model.channels=[8,8]",
    "model.kernel_sizes=[5,3]",
    "train.batch_size=64",
    "log.progress=off",
    "log.plots=false",
]


@pytest.fixture
def small_overrides():
    return list(SMALL)


def small_config(*extra: str):
    return load_config(None, [*SMALL, *extra])


def relative_gap(a: nn.Module, b: nn.Module) -> float:
    num = sum(float((p - q).detach().norm() ** 2) for p, q in zip(a.parameters(), b.parameters())) ** 0.5
    den = sum(float(p.detach().norm() ** 2) for p in a.parameters()) ** 0.5
    return num / den
