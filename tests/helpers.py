"""Tolerance helpers shared by the op tests (tests/ is on sys.path through its conftest.py)."""

from __future__ import annotations

import torch


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
