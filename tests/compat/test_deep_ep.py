"""dsv3.compat.deep_ep driven the way DeepEP's own tests drive deep_ep, on 2 gloo CPU processes: layout
against a torch reference, `x = rank` rows landing in the rank-prefix blocks of their source, local top-k ids
and weights, async/previous_event plumbing, FP8 rows, cached dispatch, combine ≈ x·(ranks reached), and the
low-latency path with the token index written into the rows (src_info, per-source blocks, weighted
combine)."""

from __future__ import annotations

import datetime
import os

import torch
from helpers import spawn_ranks

from dsv3 import ops

N, H, K, E = 40, 512, 4, 8


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from dsv3.compat import deep_ep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    group = dist.new_group(list(range(world)))
    try:
        torch.manual_seed(rank)
        L = E // world
        x = torch.ones((N, H), dtype=torch.bfloat16) * rank
        scores = torch.randn((N, E)).abs() + 1
        topk_idx = torch.topk(scores, K, dim=-1, sorted=False).indices.to(deep_ep.topk_idx_t)
        topk_idx[3, :] = -1  # a token routed nowhere
        topk_weights = torch.ones((N, K), dtype=torch.float32) * rank
        rank_idx = torch.where(topk_idx >= 0, topk_idx // L, torch.full_like(topk_idx, -1))
        ref_in_rank = torch.zeros((N, world), dtype=torch.bool)
        for r in range(world):
            ref_in_rank[:, r] = (rank_idx == r).any(1)
        ref_per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=E).int()

        buffer = deep_ep.Buffer(group, int(1e9), 0)
        ntr, ntrr, nte, in_rank, ev = buffer.get_dispatch_layout(topk_idx, E, async_finish=True)
        ev.current_stream_wait()
        assert ntrr is None and torch.equal(in_rank, ref_in_rank)
        assert torch.equal(ntr, ref_in_rank.sum(0).int()) and torch.equal(nte, ref_per_expert)

        all_ntr = ntr.clone()
        dist.all_reduce(all_ntr, group=group)
        all_nte = nte.clone()
        dist.all_reduce(all_nte, group=group)

        def check_data(t: torch.Tensor, rank_prefix_matrix: torch.Tensor) -> None:
            assert torch.equal(t.amin(1), t.amax(1))  # rows are constant
            prefix = rank_prefix_matrix[:, rank].tolist()
            begin = 0
            for i, end in enumerate(prefix):
                assert (t[begin:end, 0] == i).all()
                begin = end

        for current_x in (x, ops.quantize_per_token_group(x)):
            recv_x, recv_idx, recv_w, counts, handle, ev = buffer.dispatch(
                current_x, num_tokens_per_rank=ntr, is_token_in_rank=in_rank, num_tokens_per_expert=nte,
                topk_idx=topk_idx, topk_weights=topk_weights, previous_event=buffer.capture(),
                async_finish=True, config=deep_ep.Config(24, 8, 256),
            )  # fmt: skip
            ev.current_stream_wait()
            if isinstance(recv_x, tuple):
                recv_x = ops.dequantize_per_token_group(*recv_x)
            assert recv_x.shape[0] == int(all_ntr[rank])
            assert counts == all_nte[rank * L : (rank + 1) * L].tolist()
            check_data(recv_x.float(), handle[0])
            assert ((recv_idx >= -1) & (recv_idx < L)).all()
            for i in range(L):
                assert int((recv_idx == i).sum()) == counts[i]
            src_of_row = recv_x[:, 0].float()
            assert torch.equal(
                recv_w[recv_idx >= 0], src_of_row.unsqueeze(1).expand_as(recv_w)[recv_idx >= 0]
            )
            assert (recv_w[recv_idx < 0] == 0).all()
            cached = buffer.dispatch(current_x, handle=handle)[0]
            if isinstance(cached, tuple):
                cached = ops.dequantize_per_token_group(*cached)
            assert torch.equal(cached, recv_x)

        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=ntr, is_token_in_rank=in_rank, num_tokens_per_expert=nte,
            topk_idx=topk_idx, topk_weights=topk_weights,
        )  # fmt: skip
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
        reached = in_rank.sum(1, keepdim=True).float()
        check = combined.float() / reached.clamp(min=1)
        assert ops.calc_diff(check[reached[:, 0] > 0], x.float()[reached[:, 0] > 0]) < 5e-6
        assert (combined[3] == 0).all()  # routed nowhere: nothing comes back
        assert torch.equal(combined_w, torch.where(topk_idx >= 0, topk_weights, torch.zeros(())))

        # low-latency: rows = rank - 128, the last 128 columns carry the token index
        T = N
        hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(T, H, world, E)
        ll = deep_ep.Buffer(group, num_rdma_bytes=hint, low_latency_mode=True, num_qps_per_rank=E // world)
        lx = torch.ones((N, H), dtype=torch.bfloat16) * (rank - 128)
        lx[:, -128:] = torch.arange(N, dtype=torch.bfloat16).view(-1, 1)
        lw = torch.randn((N, K)).abs()
        all_idx = [torch.empty_like(topk_idx) for _ in range(world)]
        dist.all_gather(all_idx, topk_idx, group=group)
        for use_fp8 in (False, True):
            packed, count, lh, _, hook = ll.low_latency_dispatch(lx, topk_idx, T, E, use_fp8=use_fp8)
            if use_fp8:
                flat_scales = packed[1].reshape(-1, H // 128)
                rows = ops.dequantize_per_token_group(packed[0].view(-1, H), flat_scales).view(
                    L, world * T, H
                )
            else:
                rows = packed.float()
            src_info, layout_range = lh[0], lh[1]
            for e in range(L):
                g = rank * L + e
                want = sum(int((idx == g).sum()) for idx in all_idx)
                assert int(count[e]) == want == int((layout_range[e] & 0xFFFFFFFF).sum())
                for j in range(world):
                    begin, c = int(layout_range[e, j] >> 32), int(layout_range[e, j] & 0xFFFFFFFF)
                    block = rows[e, begin : begin + c]
                    assert (block[:, :-128] == j - 128).all()
                    assert torch.equal(block[:, -1].long(), src_info[e, begin : begin + c].long())
            expert_out = (rows.to(torch.bfloat16) if use_fp8 else packed).contiguous()
            combined_ll, _, _ = ll.low_latency_combine(expert_out, topk_idx, lw, lh)
            # identity experts: Σ_k w·x(row of token t) = x_t·Σ_valid w
            ref_x = (
                ops.dequantize_per_token_group(*ops.quantize_per_token_group(lx)) if use_fp8 else lx.float()
            )
            want = ref_x * torch.where(topk_idx >= 0, lw, torch.zeros(())).sum(1, keepdim=True)
            tol = 9e-4 if use_fp8 else 1e-5
            assert ops.calc_diff(combined_ll.float(), want) < tol
            assert not combined_ll.isnan().any()
        with open(f"{out}/ok{rank}", "w") as f:
            f.write("ok")
    finally:
        dist.destroy_process_group()


def test_deep_ep_style_two_ranks(tmp_path):
    spawn_ranks(_worker, 2, str(tmp_path))
    assert all((tmp_path / f"ok{r}").exists() for r in range(2))
