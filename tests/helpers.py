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


def assert_mla_close(
    x: torch.Tensor, ref: torch.Tensor, abs_tol: float, rel_tol: float, cos_tol: float | None = None
) -> None:
    """FlashMLA's acceptance test (SPEC §4): ±inf and NaN exactly where the reference has them; every finite
    element within `abs_tol` absolute or `rel_tol` relative error; and the cosine diff
    1 - 2Σxy / Σ(x² + y²) over the finite elements (float64) at most `cos_tol`."""
    assert x.shape == ref.shape, (x.shape, ref.shape)
    x, ref = x.double(), ref.double()
    for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        mismatch = test(x) != test(ref)
        assert not mismatch.any(), f"{kind} positions differ at {mismatch.nonzero()[:8].tolist()}"
    finite = torch.isfinite(ref)
    x, ref = x[finite], ref[finite]
    err = (x - ref).abs()
    bad = (err >= abs_tol) & (err >= rel_tol * ref.abs())
    if bad.any():
        worst = int(torch.where(bad, err, 0.0).argmax())
        raise AssertionError(
            f"{int(bad.sum())} of {ref.numel()} elements off by more than abs {abs_tol:.3g} and rel "
            f"{rel_tol:.3g}; worst: {float(x[worst])} vs {float(ref[worst])}"
        )
    if cos_tol is not None and ref.numel():
        denom = (x * x + ref * ref).sum()
        cos_diff = float(1 - 2 * (x * ref).sum() / denom) if denom > 0 else 0.0
        assert cos_diff <= cos_tol, f"cosine diff {cos_diff:.3e} > {cos_tol:.3e}"


def tiny_train_config(validate: bool = True, **changes):
    """A TrainConfig for seconds-long trainer tests (tiny data, 32-token sequences, 4 per step), on the CPU
    unless `device` is given (tests/cuda trains on the GPU)."""
    import dataclasses

    from dsv3.train.trainer import TrainConfig

    base = TrainConfig(
        steps=4,
        seq_len=32,
        global_batch=4,
        micro_batch=2,
        corpus_bytes=150_000,
        vocab_size=512,
        val_sequences=4,
        checkpoint_every=2,
        samples=1,
        sample_tokens=4,
        warmup_steps=2,
        device="cpu",
    )
    cfg = dataclasses.replace(base, **changes)
    return cfg.validate() if validate else cfg


def quiet(*_args, **_kwargs) -> None:
    """A `log` for Trainer that prints nothing."""


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a process group's MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, world: int, *args, join_s: float = 120, check_exit: bool = True) -> list[int]:
    """Run target(rank, world, port, *args) in `world` spawned processes and return their exit codes; fail if
    one hangs past join_s (it is killed) or, with check_exit, exits non-zero."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + join_s
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, "a worker hung"
    codes = [p.exitcode for p in procs]
    assert not check_exit or all(c == 0 for c in codes), codes
    return codes
