"""The nvlink backend's intranode kernels on 2 (and 4, when present) GPUs of one node, processes spawned
like DeepEP's tests with NCCL: every dispatch / combine result must equal the torch backend's bit for bit
(rows arrive in (source rank, token) order on both, and both combines sum the copies in fp32, ranks
ascending, after the biases). Covers bf16 and FP8 rows (column-major scales), top-k remapping, expert
alignment, num_worst_tokens, cached dispatch, biases, small queues (several ring laps, partial chunks) and a
rank that sends nothing."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from dsv3.ep.backends.nvlink import NvlinkBackend

NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.skipif(NUM_GPUS < 2, reason="needs at least 2 GPUs"),
    pytest.mark.skipif(not NvlinkBackend.available()[0], reason=NvlinkBackend.available()[1]),
]

HIDDEN, TOPK, EXPERTS_PER_RANK = 2048, 6, 8


def _equal(a, b, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, what
        return
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    assert a.shape == b.shape, f"{what}: {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.equal(a, b), f"{what} differs"


def _inputs(n: int, E: int, rank: int, step: int, gen: torch.Generator):
    x = (torch.randn(n, HIDDEN, device="cuda", generator=gen) * (rank + 1)).to(torch.bfloat16)
    scores = torch.rand(n, E, device="cuda", generator=gen)
    topk_idx = scores.topk(TOPK, dim=1).indices
    topk_idx[torch.rand(n, TOPK, device="cuda", generator=gen) < 0.15] = -1
    topk_weights = torch.rand(n, TOPK, device="cuda", generator=gen)
    if step % 3 == 2 and rank == 0:  # a rank whose tokens go nowhere
        topk_idx.fill_(-1)
    return x, topk_idx, topk_weights


def _fp8(x: torch.Tensor):
    groups = x.float().view(x.shape[0], -1, 128)
    scale = groups.abs().amax(-1).clamp(min=1e-4) / 448.0
    data = (groups / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(x.shape)
    return data, scale.T.contiguous().T  # column-major scales, as DeepEP's tests pass them


def _worker(rank: int, world: int, port: int) -> None:
    from dsv3.ep import Buffer, Config

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank)
    E = EXPERTS_PER_RANK * world
    configs = [Config(24, 8, 256), Config(4, 3, 5), Config(2, 1, 2)]  # the last two lap their queues often
    size = max(c.get_nvl_buffer_size_hint(HIDDEN * 2, world) for c in configs)
    nv = Buffer(num_nvl_bytes=size, backend="nvlink", timeout=60)
    ref = Buffer(backend="torch")
    assert nv.backend_names["normal"] == "nvlink"
    gen = torch.Generator(device="cuda").manual_seed(4321 + rank)
    try:
        for step, config in enumerate(configs * 2):
            n = 300 - 37 * ((rank + step) % 4)
            x, topk_idx, topk_weights = _inputs(n, E, rank, step, gen)
            layout = nv.get_dispatch_layout(topk_idx, E)
            ntpr, _, ntpe, in_rank, _ = layout
            use_fp8, alignment = step % 2 == 1, [1, 4, 128][step % 3]
            payload = _fp8(x) if use_fp8 else x
            kwargs = dict(
                num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe,
                topk_idx=topk_idx, topk_weights=topk_weights, expert_alignment=alignment, config=config,
            )  # fmt: skip
            got = nv.dispatch(payload, **kwargs)
            want = ref.dispatch(payload, **kwargs)
            (gx, gidx, gw, gcounts, ghandle, _), (wx, widx, ww, wcounts, whandle, _) = got, want
            if use_fp8:
                _equal(gx[0], wx[0], "recv_x (fp8)")
                _equal(gx[1], wx[1], "recv_x scales")
            else:
                _equal(gx, wx, "recv_x")
            _equal(gidx, widx, "recv_topk_idx")
            _equal(gw, ww, "recv_topk_weights")
            assert gcounts == wcounts, f"num_recv_tokens_per_expert_list {gcounts} != {wcounts}"
            names = [
                "rank_prefix_matrix",
                "channel_prefix_matrix",
                "recv_channel_prefix_matrix",
                "recv_src_idx",
            ]
            for i, what in enumerate([*names, "is_token_in_rank"]):
                _equal(ghandle[i], whandle[i], what)
            assert torch.equal(ghandle[5] >= 0, in_rank), "send_head marks exactly the rows sent"

            # combine the received rows (dequantized to bf16 for FP8), with 0, 1 or 2 biases
            y = (gx[0].float() * gx[1].repeat_interleave(128, 1)).to(torch.bfloat16) if use_fp8 else gx
            bias = (torch.randn(n, HIDDEN, device="cuda", generator=gen).to(torch.bfloat16),) * (step % 3)
            cg, cwg, _ = nv.combine(y, ghandle, topk_weights=gw, bias=bias or None, config=config)
            cr, cwr, _ = ref.combine(y, whandle, topk_weights=ww, bias=bias or None, config=config)
            _equal(cg, cr, "combined_x")
            _equal(cwg, cwr, "combined_topk_weights")

            # cached dispatch with the same layout
            cached = payload if not use_fp8 else (payload[0], payload[1])
            (hx, *_), (hr, *_) = (
                nv.dispatch(cached, handle=ghandle, config=config),
                ref.dispatch(cached, handle=whandle, config=config),
            )
            if use_fp8:
                _equal(hx[0], hr[0], "cached recv_x (fp8)")
                _equal(hx[1], hr[1], "cached scales")
            else:
                _equal(hx, hr, "cached recv_x")

            # num_worst_tokens: same rows, padded, no CPU wait
            worst = n * world
            (wgx, wgidx, wgw, wgc, wgh, _) = nv.dispatch(
                x, **{**kwargs, "expert_alignment": 1}, num_worst_tokens=worst
            )
            (wrx, wridx, wrw, wrc, wrh, _) = ref.dispatch(
                x, **{**kwargs, "expert_alignment": 1}, num_worst_tokens=worst
            )
            assert wgc == wrc == []
            num_recv = int(whandle[0][-1, rank])
            _equal(wgx[:num_recv], wrx[:num_recv], "worst recv_x")
            _equal(wgidx, wridx, "worst recv_topk_idx")
            _equal(wgw, wrw, "worst recv_topk_weights")
            _equal(wgh[3][:num_recv], wrh[3][:num_recv], "worst recv_src_idx")
        torch.cuda.synchronize()
    finally:
        nv.destroy()
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [w for w in (2, 4) if w <= NUM_GPUS])
def test_nvlink_matches_torch_backend(world):
    mp.spawn(_worker, args=(world, free_port()), nprocs=world, join=True)


def _timeout_worker(rank: int, world: int, port: int) -> None:
    from dsv3.ep import Buffer, Config, EPTimeoutError

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank)
    config = Config(4, 3, 8)
    nv = Buffer(num_nvl_bytes=config.get_nvl_buffer_size_hint(512, world), backend="nvlink", timeout=3)
    dist.barrier()
    if rank == 1:  # rank 1 never joins: rank 0's notify must give up, not hang
        return
    x = torch.zeros(16, 256, dtype=torch.bfloat16, device="cuda")
    topk_idx = torch.zeros(16, 1, dtype=torch.int64, device="cuda")
    ntpr, _, ntpe, in_rank, _ = nv.get_dispatch_layout(topk_idx, 2 * world)
    with pytest.raises(EPTimeoutError, match="timed out|timeout"):
        nv.dispatch(
            x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe, config=config
        )


def test_missing_peer_raises_timeout():
    mp.spawn(_timeout_worker, args=(2, free_port()), nprocs=2, join=True)
