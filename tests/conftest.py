"""Shared test fixtures: a fixed seed per test and the CPU code paths of this build (tolerance helpers:
tests/helpers.py)."""

from __future__ import annotations

import json
import random
import zlib

import pytest
import torch

import dsv3  # noqa: F401  (registers torch.ops.dsv3)

CPU_PATHS = ["portable"] + (["avx512"] if json.loads(torch.ops.dsv3.build_info())["cpu_avx512"] else [])


def pytest_make_parametrize_id(config, val, argname):
    """Readable test ids for dtypes: `bfloat16` rather than `dtype0`."""
    return str(val).removeprefix("torch.") if isinstance(val, torch.dtype) else None


@pytest.fixture(autouse=True)
def _seed(request):
    """Random data, but the same on every run: the seed is derived from the test's id."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.fixture(params=CPU_PATHS)
def cpu_path(request):
    """Runs the test once per CPU code path this machine has, then restores the path that was active (the
    automatic choice, or what DSV3_CPU_PATH asked for)."""
    previous = torch.ops.dsv3.cpu_path()
    torch.ops.dsv3.set_cpu_path(request.param)
    yield request.param
    torch.ops.dsv3.set_cpu_path(previous)
