"""The nvshmem backend's low-latency kernels on several GPUs of one node (processes spawned like DeepEP's
tests, NCCL for the bootstrap): every result must equal the torch backend's, bit for bit: the packing order
is deterministic on both, the FP8 cast is the same formula, and both combines sum w * row in fp32 in k order.
Runs several rounds so both buffer halves, the signal resets and the hook / zero-copy paths are used."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from dsv3.ep.backends.nvshmem import NvshmemBackend

NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.skipif(NUM_GPUS < 2, reason="needs at least 2 GPUs"),
    pytest.mark.skipif(not NvshmemBackend.available()[0], reason=NvshmemBackend.available()[1]),
]

T, HIDDEN, TOPK, EXPERTS_PER_RANK = 64, 1024, 4, 3


def _valid_rows(recv_count: torch.Tensor, R: int) -> torch.Tensor:
    """[L, R*T] bool: rows below each expert's count."""
    return torch.arange(R * T, device=recv_count.device).unsqueeze(0) < recv_count.unsqueeze(1)


def _check_dispatch(got, ref, R: int, use_fp8: bool) -> None:
    (gx, gcount, ghandle), (rx, rcount, rhandle) = got, ref
    assert torch.equal(gcount, rcount)
    assert torch.equal(ghandle[1], rhandle[1])  # layout_range
    rows = _valid_rows(rcount, R)
    assert torch.equal(ghandle[0][rows], rhandle[0][rows])  # src_info
    if use_fp8:
        assert torch.equal(gx[0][rows].view(torch.uint8), rx[0][rows].view(torch.uint8))
        assert torch.equal(gx[1][rows], rx[1][rows])
    else:
        assert torch.equal(gx[rows], rx[rows])


def _worker(rank: int, world: int, port: int) -> None:
    from dsv3.ep import Buffer

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank)
    E = EXPERTS_PER_RANK * world
    L = E // world
    hint = Buffer.get_low_latency_rdma_size_hint(T, HIDDEN, world, E)
    nv = Buffer(num_rdma_bytes=hint, low_latency_mode=True, num_qps_per_rank=L, backend="nvshmem", timeout=60)
    ref = Buffer(low_latency_mode=True, backend="torch")
    assert nv.backend_names["low_latency"] == "nvshmem"
    nv.clean_low_latency_buffer(T, HIDDEN, E)
    gen = torch.Generator(device="cuda").manual_seed(1234 + rank)
    try:
        for step, (use_fp8, round_scale, use_ue8m0, hook) in enumerate(
            [(False, False, False, False), (True, False, False, False), (True, True, False, True),
             (True, True, True, False), (False, False, False, True), (True, False, False, False)]
        ):  # fmt: skip
            n = T - (rank + step) % 5  # different token counts per rank
            x = (torch.randn(n, HIDDEN, device="cuda", generator=gen) * (step + 1)).to(torch.bfloat16)
            scores = torch.rand(n, E, device="cuda", generator=gen)
            topk_idx = scores.topk(TOPK, dim=1).indices
            topk_idx[torch.rand(n, TOPK, device="cuda", generator=gen) < 0.1] = -1
            topk_weights = torch.rand(n, TOPK, device="cuda", generator=gen)
            kwargs = dict(use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0)
            gx, gcount, ghandle, _, ghook = nv.low_latency_dispatch(
                x, topk_idx, T, E, return_recv_hook=hook, **kwargs
            )
            if hook:
                ghook()
            rx, rcount, rhandle, _, _ = ref.low_latency_dispatch(x, topk_idx, T, E, **kwargs)
            _check_dispatch((gx, gcount, ghandle), (rx, rcount, rhandle), world, use_fp8)

            expert_out = torch.randn(L, world * T, HIDDEN, device="cuda", generator=gen).to(torch.bfloat16)
            want, _, _ = ref.low_latency_combine(expert_out, topk_idx, topk_weights, rhandle)
            got, _, chook = nv.low_latency_combine(
                expert_out, topk_idx, topk_weights, ghandle, return_recv_hook=hook
            )
            if hook:
                chook()
            assert torch.equal(got, want), f"combine differs at step {step}"
            staged = nv.get_next_low_latency_combine_buffer(ghandle)
            staged.copy_(expert_out)
            got, _, _ = nv.low_latency_combine(staged, topk_idx, topk_weights, ghandle, zero_copy=True)
            assert torch.equal(got, want), f"zero-copy combine differs at step {step}"
        torch.cuda.synchronize()
    finally:
        nv.destroy()
        dist.destroy_process_group()


def test_low_latency_matches_the_torch_backend():
    world = min(NUM_GPUS, 8)
    mp.spawn(_worker, args=(world, free_port()), nprocs=world, join=True)
