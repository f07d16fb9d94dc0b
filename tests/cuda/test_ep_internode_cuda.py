"""The nvshmem backend's internode normal-mode kernels on >= 16 GPUs across nodes, against the torch backend
(NCCL all_to_all with the same two-level combine rounding): received rows, top-k, counts, the source ranks of
the rows and the combine must be equal bit for bit; also FP8 rows with scales, num_worst_tokens padding and a
cached dispatch. Run on every node under torchrun (ranks node-major, 8 per node), e.g.

    torchrun --nnodes N --nproc-per-node 8 --rdzv-endpoint HOST:PORT -m pytest THIS_FILE
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from dsv3.ep.backends.nvshmem import NvshmemBackend
from dsv3.ep.backends.torch import TorchBackend
from dsv3.ep.config import Config
from dsv3.ep.layout import dispatch_layout

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
pytestmark = [
    pytest.mark.skipif(
        WORLD < 16 or WORLD % 8, reason="needs >= 16 GPUs across nodes (torchrun, 8 per node)"
    ),
    pytest.mark.skipif(not NvshmemBackend.available()[0], reason=NvshmemBackend.available()[1]),
]

HIDDEN, TOPK, EXPERTS_PER_RANK = 1024, 8, 4


def _fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = x.float().unflatten(1, (-1, 128))
    s = g.abs().amax(-1).clamp_min(1e-4) / 448.0
    return (g / s.unsqueeze(-1)).to(torch.float8_e4m3fn).flatten(1), s


def test_internode_matches_the_torch_backend():
    if not dist.is_initialized():
        dist.init_process_group("nccl")
    rank, R = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % 8)))
    E, N = EXPERTS_PER_RANK * R, R // 8
    config = Config(20, 8, 256, 8, 128)
    nv = NvshmemBackend(
        None, config.get_rdma_buffer_size_hint(HIDDEN * 2, R), rank, R, low_latency_mode=False, timeout_s=60.0
    )
    ref = TorchBackend(None, rank, R)
    gen = torch.Generator(device="cuda").manual_seed(4321 + rank)
    try:
        for step, (use_fp8, worst) in enumerate([(False, 0), (True, 0), (False, 4096), (True, 0)]):
            n = 300 - 7 * (rank % 5) - step  # different token counts per rank
            x = (torch.randn(n, HIDDEN, device="cuda", generator=gen) * (step + 1)).to(torch.bfloat16)
            x_in, scales = _fp8(x) if use_fp8 else (x, None)
            # Node-limited routing (at most 4 nodes per token, as V3's gate) with some -1 entries.
            scores = torch.rand(n, E, device="cuda", generator=gen)
            node_of_expert = torch.arange(E, device="cuda") // (E // N)
            allowed = torch.rand(n, N, device="cuda", generator=gen).topk(min(N, 4), dim=1).indices
            keep = (node_of_expert.view(1, 1, E) == allowed.unsqueeze(-1)).any(1)
            topk_idx = scores.masked_fill(~keep, -1).topk(TOPK, dim=1).indices
            topk_idx[torch.rand(n, TOPK, device="cuda", generator=gen) < 0.1] = -1
            topk_weights = torch.rand(n, TOPK, device="cuda", generator=gen)
            per_rank, per_node, per_expert, in_rank = dispatch_layout(topk_idx, E, R)
            got = nv.internode_dispatch(
                x_in,
                scales,
                topk_idx,
                topk_weights,
                per_rank,
                per_node,
                in_rank,
                per_expert,
                None,
                None,
                None,
                None,
                None,
                None,
                2,
                worst,
                config,
            )
            want = ref.intranode_dispatch(
                x_in,
                scales,
                topk_idx,
                topk_weights,
                per_rank,
                in_rank,
                per_expert,
                None,
                None,
                None,
                2,
                worst,
                config,
            )
            rows = int(want[5][-1, rank])  # the torch handle's rank_prefix_matrix: rows received here
            for g, w in zip(got[:4], want[:4], strict=True):
                if g is not None:
                    assert torch.equal(g[:rows].view(torch.uint8), w[:rows].view(torch.uint8)), f"step {step}"
            if worst:
                assert got[0].shape[0] == worst and bool((got[2][rows:] == -1).all())
            assert got[4] == want[4]
            assert torch.equal(got[10], want[5][:, rank])  # recv_gbl_rank_prefix_sum
            col = want[5][:, rank].long()
            from_source = torch.diff(col, prepend=col.new_zeros(1))
            expect_src = torch.repeat_interleave(torch.arange(R, device="cuda"), from_source)
            assert torch.equal(got[11][:rows].view(torch.int32)[:, 0].long(), expect_src)  # source ranks

            expert_out = torch.randn(got[0].shape[0], HIDDEN, device="cuda", generator=gen).to(torch.bfloat16)
            bias_0 = torch.ones(n, HIDDEN, device="cuda", dtype=torch.bfloat16)
            bias_1 = torch.randn(n, HIDDEN, device="cuda", generator=gen).to(torch.bfloat16)
            combined, combined_w = nv.internode_combine(
                expert_out,
                got[3],
                bias_0,
                bias_1,
                got[11],
                in_rank,
                got[7],
                got[8],
                got[9],
                got[12],
                got[13],
                config,
            )
            want_x, want_w = ref.intranode_combine(
                expert_out, want[3], bias_0, bias_1, want[8], want[5], want[7], want[9], config
            )
            assert torch.equal(combined, want_x), f"combine differs at step {step}"
            assert torch.equal(combined_w, want_w)

            if step == 3:  # cached dispatch with the handle of this step
                cached = nv.internode_dispatch(
                    x_in,
                    scales,
                    None,
                    None,
                    None,
                    None,
                    in_rank,
                    None,
                    rows,
                    int(got[8][-1]),
                    got[5],
                    got[8],
                    got[6],
                    got[10],
                    1,
                    0,
                    config,
                )
                assert torch.equal(cached[0].view(torch.uint8), got[0].view(torch.uint8))
                assert torch.equal(cached[1], got[1])
        torch.cuda.synchronize()
    finally:
        nv.destroy()
        dist.destroy_process_group()
