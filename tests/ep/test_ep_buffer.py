"""dsv3.ep.Buffer on the `torch` backend: 2 and 4 gloo CPU processes against the single-process reference
of dsv3.ep.reference — layout, dispatch order and local ids, zeroed weights, -1 entries, a token routed
nowhere, a rank with no tokens and a rank that receives nothing, FP8 pass-through, expert alignment,
num_worst_tokens, cached dispatch, combine sums with bias and weights, fp32 rows; low-latency dispatch (bf16,
FP8, UE8M0, hook) and combine (zero copy, hook); and a peer that never arrives or dies raising
EPTimeoutError instead of hanging."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
from helpers import spawn_ranks

from dsv3 import ops
from dsv3.ep import reference as ref

H, K = 512, 4


def _tokens(world: int) -> list[int]:
    if world == 16:  # two nodes of 8; rank 5 has no tokens
        return [0 if r == 5 else 2 + (r * 5) % 7 for r in range(16)]
    return [5, 0, 9, 3] if world == 4 else [6, 4]


def _problem(world: int):
    """Every rank's (x, topk_idx, topk_weights), identical in every process. The last rank's experts are
    never chosen (it receives nothing); rank 0's token 0 has no expert at all; -1 entries are sprinkled."""
    E = 4 * world
    L = E // world
    g = torch.Generator().manual_seed(11 + world)
    xs, idxs, ws = [], [], []
    for n in _tokens(world):
        x = torch.randn((n, H), generator=g).to(torch.bfloat16)
        scores = torch.rand((n, E), generator=g)
        scores[:, (world - 1) * L :] = -1.0
        idx = scores.topk(K, dim=1).indices
        idx[::3, 1] = -1
        xs.append(x)
        idxs.append(idx)
        ws.append(torch.rand((n, K), generator=g))
    if world and _tokens(world)[0]:
        idxs[0][0] = -1
    return E, xs, idxs, ws


def _init(rank: int, world: int, port: int, timeout_s: float) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from dsv3.ep import Buffer

    _init(rank, world, port, 60)
    try:
        E, xs, idxs, ws = _problem(world)
        x, idx, w = xs[rank], idxs[rank], ws[rank]
        res = {}
        buf = Buffer(dist.group.WORLD)
        res["backends"] = buf.backend_names
        ntr, ntrr, nte, in_rank, _ = buf.get_dispatch_layout(idx, E)
        res["layout"] = (ntr, ntrr, nte, in_rank)
        layout = dict(num_tokens_per_rank=ntr, is_token_in_rank=in_rank, num_tokens_per_expert=nte)
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
        res["dispatch"] = (recv_x, recv_idx, recv_w, counts, handle[0], handle[3])
        # combine: every rank scales its rows by (rank + 1); bias pair; weights summed back
        y = (recv_x.float() * (rank + 1)).to(torch.bfloat16)
        b0 = torch.ones((x.shape[0], H), dtype=torch.bfloat16)
        b1 = (torch.arange(x.shape[0] * H).view(-1, H) % 7 - 3).to(torch.bfloat16)
        comb, comb_w, _ = buf.combine(y, handle, topk_weights=recv_w, bias=(b0, b1))
        res["combine"] = (y, comb, comb_w)
        res["combine_nobias"] = buf.combine(y, handle)[0]
        # cached dispatch: the layout of the handle, new data
        res["cached"] = buf.dispatch(x * 2, handle=handle)[0]
        # FP8 rows and scales pass through untouched
        q, s = ops.quantize_per_token_group(x)
        (rq, rs), *_ = buf.dispatch((q, s), topk_idx=idx, topk_weights=w, **layout)
        res["fp8"] = (rq.view(torch.uint8), rs)
        res["aligned"] = buf.dispatch(x, topk_idx=idx, topk_weights=w, expert_alignment=8, **layout)[3]
        worst = sum(_tokens(world))
        wx, widx, ww, wcounts, whandle, _ = buf.dispatch(
            x, topk_idx=idx, topk_weights=w, num_worst_tokens=worst, **layout
        )
        res["worst"] = (wx, widx, ww, wcounts)
        res["worst_combine"] = buf.combine(wx, whandle)[0]
        res["no_topk"] = buf.dispatch(x, **layout)[:2]
        fx = x.float() / 3
        frecv, _, _, _, fh, _ = buf.dispatch(fx, topk_idx=idx, topk_weights=w, **layout)
        res["fp32"] = (frecv, buf.combine(frecv * (rank + 1), fh)[0])

        # low-latency mode
        ll = Buffer(dist.group.WORLD, low_latency_mode=True)
        T = max(_tokens(world)) + 1
        L = E // world
        gid = (torch.arange(L) + rank * L).view(L, 1, 1)
        stats = torch.zeros(L, dtype=torch.int32)
        rx, cnt, llh, _, hook = ll.low_latency_dispatch(
            x, idx, T, E, use_fp8=False, cumulative_local_expert_recv_stats=stats
        )
        res["ll_bf16"] = (rx, cnt, llh[0], llh[1], stats)
        ey = (rx.float() * (gid + 1)).to(torch.bfloat16)  # expert e scales its rows by e + 1
        res["ll_combine"] = ll.low_latency_combine(ey, idx, w, llh)[0]
        zc = ll.get_next_low_latency_combine_buffer(llh)
        zc.copy_(ey)
        res["ll_zero_copy"] = ll.low_latency_combine(zc, idx, w, llh, zero_copy=True)[0]
        rx2, cnt2, llh2, _, hook = ll.low_latency_dispatch(x, idx, T, E, use_fp8=False, return_recv_hook=True)
        hook()
        comb2, _, hook2 = ll.low_latency_combine(
            (rx2.float() * (gid + 1)).to(torch.bfloat16), idx, w, llh2, return_recv_hook=True
        )
        hook2()
        res["ll_hook"] = (rx2, cnt2, comb2)
        (fq, fs), fcnt, fh2, _, _ = ll.low_latency_dispatch(x, idx, T, E, use_fp8=True)
        res["ll_fp8"] = (fq.view(torch.uint8), fs, fs.stride(), fh2[0])
        (pq, ps), *_ = ll.low_latency_dispatch(x, idx, T, E, use_fp8=True, round_scale=True)
        res["ll_pow2"] = (pq.view(torch.uint8), ps)
        (uq, us), *_ = ll.low_latency_dispatch(x, idx, T, E, use_fp8=True, use_ue8m0=True)
        res["ll_ue8m0"] = us
        torch.save(res, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _two_node_worker(rank: int, world: int, port: int, out: str) -> None:
    """16 ranks = two nodes of 8 in DeepEP's geometry: per-node counts and the combine's per-node rounding."""
    import torch.distributed as dist

    from dsv3.ep import Buffer

    _init(rank, world, port, 120)
    try:
        E, xs, idxs, ws = _problem(world)
        x, idx, w = xs[rank], idxs[rank], ws[rank]
        buf = Buffer()
        ntr, ntrr, nte, in_rank, _ = buf.get_dispatch_layout(idx, E)
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            x, num_tokens_per_rank=ntr, num_tokens_per_rdma_rank=ntrr, is_token_in_rank=in_rank,
            num_tokens_per_expert=nte, topk_idx=idx, topk_weights=w,
        )  # fmt: skip
        y = (recv_x.float() * (1 + rank / 3)).to(torch.bfloat16)
        combined = buf.combine(y, handle, bias=torch.ones((x.shape[0], H), dtype=torch.bfloat16))[0]
        torch.save({"ntrr": ntrr, "recv": (recv_x, recv_idx, recv_w, counts), "y": y, "combined": combined},
                   f"{out}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_two_nodes_of_eight(tmp_path):
    world = 16
    spawn_ranks(_two_node_worker, world, str(tmp_path), join_s=240)
    E, xs, idxs, ws = _problem(world)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    outs = [res[r]["y"] for r in range(world)]
    for r in range(world):
        node_of = idxs[r] // (E // world) // 8  # expert -> rank -> node
        nodes = torch.stack([(idxs[r] >= 0) & (node_of == j) for j in range(2)])  # [2, n, k]
        assert torch.equal(res[r]["ntrr"], nodes.any(2).sum(1).int())
        wx, widx, ww, wcounts, _, _ = ref.dispatch_reference(xs, idxs, ws, E, r)
        rx, ridx, rw, counts = res[r]["recv"]
        assert torch.equal(rx, wx) and torch.equal(ridx, widx) and torch.equal(rw, ww) and counts == wcounts
        bias = torch.ones((xs[r].shape[0], H), dtype=torch.bfloat16)
        assert torch.equal(res[r]["combined"], ref.combine_reference(outs, idxs, E, r, bias=(bias,)))


def _absent_peer(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 never calls dispatch (it stays alive, or it dies when out ends in "dead"): rank 0 must raise
    EPTimeoutError, after the group's 2 s timeout or on losing the connection."""
    from dsv3.ep import Buffer, EPTimeoutError

    _init(rank, world, port, 2)
    done = f"{out}/absent.txt"
    if rank == 1 and out.endswith("dead"):
        os._exit(0)  # dies without a word
    if rank == 0:
        E, xs, idxs, ws = _problem(2)
        buf = Buffer()
        t0 = time.monotonic()
        try:
            ntr, _, nte, in_rank, _ = buf.get_dispatch_layout(idxs[0], E)
            buf.dispatch(xs[0], topk_idx=idxs[0], topk_weights=ws[0], num_tokens_per_rank=ntr,
                         is_token_in_rank=in_rank, num_tokens_per_expert=nte)  # fmt: skip
            msg = "no error"
        except EPTimeoutError:
            msg = "EPTimeoutError"
        except Exception as e:  # noqa: BLE001 - reported to the test
            msg = f"{type(e).__name__}: {e}"
        with open(done + ".tmp", "w") as f:
            f.write(f"{msg}|{time.monotonic() - t0:.1f}")
        os.replace(done + ".tmp", done)
    else:
        deadline = time.monotonic() + 30
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.05)
    os._exit(0)  # groups that saw a timeout are not torn down cleanly


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def run(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"ep{world}")
    spawn_ranks(_worker, world, str(out))
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return world, _problem(world), res


def test_backend_is_torch_on_cpu(run):
    _, _, res = run
    assert all(r["backends"] == {"normal": "torch", "low_latency": "torch"} for r in res)


def test_layout(run):
    world, (E, xs, idxs, ws), res = run
    from dsv3.ep import dispatch_layout_reference

    for r in range(world):
        got = res[r]["layout"]
        want = dispatch_layout_reference(idxs[r], E, world)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
        assert got[1] is None  # R <= 8: no RDMA counts
    assert int(res[world - 1]["layout"][0][world - 1]) == 0


def test_dispatch_order_ids_weights_counts(run):
    world, (E, xs, idxs, ws), res = run
    for r in range(world):
        recv_x, recv_idx, recv_w, counts, rpm, src = res[r]["dispatch"]
        wx, widx, ww, wcounts, wsrc, wrpm = ref.dispatch_reference(xs, idxs, ws, E, r)
        assert torch.equal(recv_x, wx)
        assert torch.equal(recv_idx, widx)
        assert torch.equal(recv_w, ww)
        assert counts == wcounts
        assert torch.equal(src, wsrc)
        assert torch.equal(rpm, wrpm)
        assert ((recv_idx >= -1) & (recv_idx < E // world)).all()
        assert (recv_w[recv_idx < 0] == 0).all()
    assert res[world - 1]["dispatch"][0].shape[0] == 0  # the rank nobody routes to receives nothing


def test_combine_sums_ranks_in_order_with_bias_and_weights(run):
    world, (E, xs, idxs, ws), res = run
    outs = [res[r]["combine"][0] for r in range(world)]
    for r in range(world):
        n = xs[r].shape[0]
        b0 = torch.ones((n, H), dtype=torch.bfloat16)
        b1 = (torch.arange(n * H).view(-1, H) % 7 - 3).to(torch.bfloat16)
        _, comb, comb_w = res[r]["combine"]
        assert torch.equal(comb, ref.combine_reference(outs, idxs, E, r, bias=(b0, b1)))
        assert torch.equal(res[r]["combine_nobias"], ref.combine_reference(outs, idxs, E, r))
        want_w = torch.where(idxs[r] >= 0, ws[r], torch.zeros(()))
        assert torch.equal(comb_w, want_w)  # each weight lives at exactly one rank


def test_cached_dispatch_fp8_alignment_no_topk(run):
    world, (E, xs, idxs, ws), res = run
    for r in range(world):
        wx = ref.dispatch_reference([x * 2 for x in xs], idxs, ws, E, r)[0]
        assert torch.equal(res[r]["cached"], wx)
        rq, rs = res[r]["fp8"]
        qs = [ops.quantize_per_token_group(x) for x in xs]
        wq = ref.dispatch_reference([q.view(torch.uint8) for q, _ in qs], idxs, ws, E, r)[0]
        ws_ = ref.dispatch_reference([s for _, s in qs], idxs, ws, E, r)[0]
        assert torch.equal(rq, wq) and torch.equal(rs, ws_)
        assert res[r]["aligned"] == ref.dispatch_reference(xs, idxs, ws, E, r, expert_alignment=8)[3]
        assert all(c % 8 == 0 for c in res[r]["aligned"])
        nx, nidx = res[r]["no_topk"]
        assert torch.equal(nx, ref.dispatch_reference(xs, idxs, ws, E, r)[0]) and nidx is None


def test_num_worst_tokens_pads(run):
    world, (E, xs, idxs, ws), res = run
    worst = sum(_tokens(world))
    outs = []
    for r in range(world):
        wx, widx, ww, wcounts = res[r]["worst"]
        rx, ridx, rw, _, _, _ = ref.dispatch_reference(xs, idxs, ws, E, r)
        m = rx.shape[0]
        assert wx.shape == (worst, H) and widx.shape == (worst, K) and ww.shape == (worst, K)
        assert wcounts == []
        assert torch.equal(wx[:m], rx) and torch.equal(widx[:m], ridx) and torch.equal(ww[:m], rw)
        assert (widx[m:] == -1).all() and (ww[m:] == 0).all()
        outs.append(rx)
    for r in range(world):  # combine of a padded dispatch ignores the padding
        assert torch.equal(res[r]["worst_combine"], ref.combine_reference(outs, idxs, E, r))


def test_fp32_rows_stay_fp32(run):
    world, (E, xs, idxs, ws), res = run
    fxs = [x.float() / 3 for x in xs]
    outs = [res[r]["fp32"][0] * (r + 1) for r in range(world)]
    for r in range(world):
        frecv, fcomb = res[r]["fp32"]
        assert frecv.dtype == torch.float32 and fcomb.dtype == torch.float32
        assert torch.equal(frecv, ref.dispatch_reference(fxs, idxs, ws, E, r)[0])
        assert torch.equal(fcomb, ref.combine_reference(outs, idxs, E, r))


def _ll_rows(world, E, xs, idxs, r, T):
    """(rows per local expert, recv_count) and a checker of one dispatch's packed output."""
    return ref.low_latency_dispatch_reference(xs, idxs, E, r, T)


def test_low_latency_dispatch_bf16(run):
    world, (E, xs, idxs, ws), res = run
    T = max(_tokens(world)) + 1
    L = E // world
    for r in range(world):
        rx, cnt, src_info, layout_range, stats = res[r]["ll_bf16"]
        rows, want_cnt = _ll_rows(world, E, xs, idxs, r, T)
        assert rx.shape == (L, world * T, H)
        assert torch.equal(cnt, want_cnt) and torch.equal(stats, want_cnt)
        for e in range(L):
            begin = 0
            for s in range(world):
                block = [t for (s2, t) in rows[e] if s2 == s]
                rng = int(layout_range[e, s])
                assert (rng >> 32, rng & 0xFFFFFFFF) == (begin, len(block))
                for j, t in enumerate(block):
                    assert torch.equal(rx[e, begin + j], xs[s][t])
                    assert int(src_info[e, begin + j]) == t
                begin += len(block)
        rx2, cnt2, _ = res[r]["ll_hook"]
        for e in range(L):
            c = int(cnt[e])
            assert torch.equal(rx2[e, :c], rx[e, :c])
    assert int(res[world - 1]["ll_bf16"][1].sum()) == 0


def test_low_latency_dispatch_fp8(run):
    world, (E, xs, idxs, ws), res = run
    T = max(_tokens(world)) + 1
    L = E // world
    for r in range(world):
        fq, fs, stride, src_info = res[r]["ll_fp8"]
        assert fs.shape == (L, world * T, H // 128) and stride[1] == 1  # column-major scales
        pq, ps = res[r]["ll_pow2"]
        us = res[r]["ll_ue8m0"]
        assert us.shape == (L, world * T, H // 512) and us.dtype == torch.int32
        rows, _ = _ll_rows(world, E, xs, idxs, r, T)
        for e in range(L):
            for j, (s, t) in enumerate(rows[e]):
                q, sc = ops.quantize_per_token_group(xs[s][t : t + 1])
                assert torch.equal(fq[e, j], q[0].view(torch.uint8)) and torch.equal(fs[e, j], sc[0])
                q2, sc2 = ops.quantize_per_token_group(xs[s][t : t + 1], ue8m0=True)
                assert torch.equal(pq[e, j], q2[0].view(torch.uint8)) and torch.equal(ps[e, j], sc2[0])
                assert torch.equal(torch.log2(ps[e, j]), torch.log2(ps[e, j]).round())
                exps = (sc2[0].view(torch.int32) >> 23) & 0xFF
                packed = exps[0::4] | (exps[1::4] << 8) | (exps[2::4] << 16) | (exps[3::4] << 24)
                assert torch.equal(us[e, j], packed)


def test_low_latency_combine(run):
    world, (E, xs, idxs, ws), res = run
    for r in range(world):
        want = ref.low_latency_combine_reference(
            lambda t, e, r=r: (xs[r][t].float() * (e + 1)).to(torch.bfloat16), idxs[r], ws[r], H
        )
        assert torch.equal(res[r]["ll_combine"], want)
        assert torch.equal(res[r]["ll_zero_copy"], want)
        assert torch.equal(res[r]["ll_hook"][2], want)


@pytest.mark.parametrize("how", ["absent", "dead"])
def test_absent_or_dead_peer_raises_timeout(tmp_path, how):
    out = tmp_path / how
    out.mkdir()
    spawn_ranks(_absent_peer, 2, str(out), join_s=60)
    msg, secs = (out / "absent.txt").read_text().split("|")
    assert msg == "EPTimeoutError", msg
    assert float(secs) < 30
