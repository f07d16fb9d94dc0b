"""Shared test fixtures: a fixed seed per test, the CPU code paths of this build, and tolerance helpers."""

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


def assert_same_nan(x: torch.Tensor, ref: torch.Tensor) -> None:
    """NaN exactly where the reference has NaN."""
    assert x.shape == ref.shape, (x.shape, ref.shape)
    mismatch = torch.isnan(x) != torch.isnan(ref)
    assert not mismatch.any(), f"NaN positions differ at {mismatch.nonzero()[:8].tolist()}"


def assert_close_rel(x: torch.Tensor, ref: torch.Tensor, rtol: float, elem_rtol: float = 0.0) -> None:
    """Elementwise `|x - ref| <= rtol * max|ref| + elem_rtol * |ref|` over the non-NaN elements (compared
    in float64), with NaN at the same positions. `rtol` bounds an error relative to the scale of the whole
    output; `elem_rtol` adds one relative to each element (e.g. the rounding of a low-precision dtype)."""
    assert_same_nan(x, ref)
    x, ref = x.double(), ref.double()
    ok = ~torch.isnan(ref)
    x, ref = x[ok], ref[ok]
    if ref.numel() == 0:
        return
    scale = ref.abs().max()
    err = (x - ref).abs()
    bound = rtol * scale + elem_rtol * ref.abs()
    worst = int((err - bound).argmax())
    relative = float(err.max() / scale) if scale else 0.0
    assert err[worst] <= bound[worst], (
        f"max error {float(err.max()):.3e} ({relative:.3e} of max|ref|); worst element: "
        f"{float(x[worst])} vs {float(ref[worst])}, allowed {float(bound[worst]):.3e}"
    )
