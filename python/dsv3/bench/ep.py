"""Expert-parallel dispatch/combine benchmark: `dsv3.ep.Buffer` (torch backend) on 2 and 4 gloo CPU processes
against two hand-written exchanges with the same results, side by side in the same processes:

- `per-token`: a naive send loop — every (token, destination rank) row is its own isend/irecv, with its
  metadata row (SPEC §8's baseline), and combine sends every row back the same way;
- `per-destination`: one isend/irecv of the rows (and one of their metadata) per destination rank (what a
  careful hand-written loop does).
Each starts from (x, topk_idx, topk_weights) and ends with what Buffer.dispatch returns (rows, local top-k
ids, weights), or from the received rows to the combined tokens.

Bandwidth counts DeepEP's way: the bf16 bytes of the rows a rank receives (dispatch) or sends back
(combine), per second, averaged over ranks. Times are the slowest rank's, median over interleaved rounds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

import dsv3

from .common import write_json

RANKS = [2, 4]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(rank: int, tokens: int, hidden: int, topk: int, experts: int):
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn((tokens, hidden), generator=g).to(torch.bfloat16)
    idx = torch.rand((tokens, experts), generator=g).topk(topk, dim=1).indices
    w = torch.rand((tokens, topk), generator=g)
    return x, idx, w


class _Naive:
    """The two hand-written exchanges; rows packed like dsv3's so the three move the same bytes."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def _layout(self, in_rank: torch.Tensor, counts: torch.Tensor):
        import torch.distributed as dist

        parts = [torch.empty_like(counts) for _ in range(self.world)]
        dist.all_gather(parts, counts.int())
        return torch.stack(parts)[:, self.rank].tolist()  # rows from each source

    def dispatch(
        self, x, idx, w, in_rank: torch.Tensor, counts: torch.Tensor, per_token: bool, num_experts: int
    ):
        """From (x, topk_idx, topk_weights) to (recv_x, recv_topk_idx (local ids), recv_topk_weights), like
        Buffer.dispatch: rows as bytes, each with a metadata row (source index, top-k ids and weights)."""
        import torch.distributed as dist

        from dsv3.ep.backends.torch import pack_rows, unpack_rows

        n, H, k = x.shape[0], x.shape[1], idx.shape[1]
        recv_from = self._layout(in_rank, counts)
        meta = pack_rows([torch.arange(n, dtype=torch.int32).unsqueeze(1), idx, w], n, x.device)
        xb = x.view(torch.uint8)
        total = sum(recv_from)
        out_x = xb.new_empty((total, xb.shape[1]))
        out_m = meta.new_empty((total, meta.shape[1]))
        works, offsets = [], [sum(recv_from[:s]) for s in range(self.world)]
        if per_token:
            for s in range(self.world):
                if s != self.rank:
                    for j in range(recv_from[s]):
                        works += [dist.irecv(out_x[offsets[s] + j], s), dist.irecv(out_m[offsets[s] + j], s)]
            mine = offsets[self.rank]
            for t in range(n):
                for r in in_rank[t].nonzero().flatten().tolist():
                    if r == self.rank:
                        out_x[mine], out_m[mine] = xb[t], meta[t]
                        mine += 1
                    else:
                        works += [dist.isend(xb[t], r), dist.isend(meta[t], r)]
        else:
            for s in range(self.world):
                if s != self.rank and recv_from[s]:
                    blk = slice(offsets[s], offsets[s] + recv_from[s])
                    works += [dist.irecv(out_x[blk], s), dist.irecv(out_m[blk], s)]
            for r in range(self.world):
                sel = in_rank[:, r].nonzero().flatten()
                if r == self.rank:
                    blk = slice(offsets[r], offsets[r] + len(sel))
                    out_x[blk], out_m[blk] = xb[sel], meta[sel]
                elif len(sel):
                    works += [dist.isend(xb[sel], r), dist.isend(meta[sel], r)]
        for wk in works:
            wk.wait()
        _, gidx, gw = unpack_rows(out_m, [(torch.int32, (1,)), (torch.int64, (k,)), (torch.float32, (k,))])
        L = num_experts // self.world
        mine_mask = (gidx >= self.rank * L) & (gidx < (self.rank + 1) * L)
        recv_idx = torch.where(mine_mask, gidx - self.rank * L, torch.full_like(gidx, -1))
        recv_w = torch.where(mine_mask, gw, torch.zeros_like(gw))
        return out_x.view(x.dtype).view(total, H), recv_idx, recv_w, recv_from

    def combine(self, rows: torch.Tensor, recv_from: list[int], in_rank: torch.Tensor, per_token: bool):
        """rows [Σ recv_from, H] bf16 back to their sources; fp32 sum over ranks ascending, bf16 out."""
        import torch.distributed as dist

        n, H = in_rank.shape[0], rows.shape[1]
        wire = rows.view(torch.uint8)
        sent_to = in_rank.sum(0).tolist()
        back = [wire.new_empty((sent_to[r], wire.shape[1])) for r in range(self.world)]
        offsets = [sum(recv_from[:s]) for s in range(self.world)]
        works = []
        for r in range(self.world):
            if r == self.rank:
                back[r].copy_(wire[offsets[r] : offsets[r] + recv_from[r]])
            elif per_token:
                works += [dist.irecv(back[r][j], r) for j in range(sent_to[r])]
            elif sent_to[r]:
                works.append(dist.irecv(back[r], r))
        for s in range(self.world):
            if s == self.rank or not recv_from[s]:
                continue
            block = wire[offsets[s] : offsets[s] + recv_from[s]]
            if per_token:
                works += [dist.isend(block[j], s) for j in range(recv_from[s])]
            else:
                works.append(dist.isend(block, s))
        for w in works:
            w.wait()
        acc = torch.zeros((n, H), dtype=torch.float32)
        for r in range(self.world):
            tok = in_rank[:, r].nonzero().flatten()
            acc.index_add_(0, tok, back[r].view(torch.bfloat16).float())
        return acc.to(torch.bfloat16)


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch.distributed as dist

    from dsv3.ep import Buffer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        x, idx, w = _problem(rank, args["tokens"], args["hidden"], args["topk"], args["experts"])
        buf = Buffer()
        naive = _Naive(rank, world)
        ntr, _, nte, in_rank, _ = buf.get_dispatch_layout(idx, args["experts"])
        layout = dict(num_tokens_per_rank=ntr, is_token_in_rank=in_rank, num_tokens_per_expert=nte)
        state = {}

        def dsv3_dispatch():
            state["d"] = buf.dispatch(x, topk_idx=idx, topk_weights=w, **layout)

        def dsv3_combine():
            state["c"] = buf.combine(state["d"][0], state["d"][4])[0]

        def naive_dispatch(per_token):
            state[per_token] = naive.dispatch(x, idx, w, in_rank, ntr, per_token, args["experts"])

        def naive_combine(per_token):
            rows, _, _, recv_from = state[per_token]
            state[("c", per_token)] = naive.combine(rows, recv_from, in_rank, per_token)

        fns = {
            ("dispatch", "dsv3"): dsv3_dispatch,
            ("dispatch", "per-token"): lambda: naive_dispatch(True),
            ("dispatch", "per-destination"): lambda: naive_dispatch(False),
            ("combine", "dsv3"): dsv3_combine,
            ("combine", "per-token"): lambda: naive_combine(True),
            ("combine", "per-destination"): lambda: naive_combine(False),
        }
        times = {k: [] for k in fns}
        for r in range(args["rounds"] + 1):  # round 0 warms up
            for key, fn in fns.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                if r:
                    times[key].append(float(dt))
        # the three exchanges must agree before their times mean anything
        recv_x = state["d"][0]
        for per_token in (True, False):
            got = state[per_token]
            same = all(torch.equal(a, b) for a, b in zip(got[:3], state["d"][:3], strict=True))
            assert same, "a baseline dispatch differs from dsv3's"
            assert torch.equal(state[("c", per_token)], state["c"]), "a baseline combine differs from dsv3's"
        nbytes = torch.tensor([recv_x.numel() * 2], dtype=torch.float64)
        dist.all_reduce(nbytes)
        if rank == 0:
            torch.save({"times": times, "bytes_per_rank": float(nbytes) / world}, f"{out}/bench.pt")
    finally:
        dist.destroy_process_group()


def kernel_rows(tokens: int = 4096, topk: int = 8, experts: int = 256, hidden: int = 7168) -> list[dict]:
    """The two C++ kernels of the torch backend against their plain-torch references, in this process:
    `ep_dispatch_layout` at V3's routing (top-8 of 256) over 8 and 16 ranks, and `ep_combine_reduce` of bf16
    V3-hidden rows coming back from 8 ranks (one node) and 16 (two nodes: per-node rounding)."""
    from dsv3.ops import reference

    from .timing import time_side_by_side

    g = torch.Generator().manual_seed(7)
    idx = torch.rand((tokens, experts), generator=g).topk(topk, dim=1).indices
    rows = []
    for ranks in (8, 16):
        t = time_side_by_side(
            {
                "dsv3": lambda r=ranks: torch.ops.dsv3.ep_dispatch_layout(idx, experts, r, 8),
                "torch": lambda r=ranks: reference.ep_dispatch_layout(idx, experts, r, 8),
            }
        )
        shape = f"{tokens}x{topk} of {experts}, R={ranks}"
        rows.append({"op": "ep_dispatch_layout", "shape": shape, "times": t})
        in_rank = reference.ep_dispatch_layout(idx, experts, ranks, 8)[3]
        row_of = torch.full((tokens, ranks), -1, dtype=torch.long)
        row_of[in_rank] = torch.arange(int(in_rank.sum()))
        x = torch.randn((int(in_rank.sum()), hidden), generator=g).to(torch.bfloat16)
        t = time_side_by_side(
            {
                "dsv3": lambda x=x, row_of=row_of: torch.ops.dsv3.ep_combine_reduce(x, row_of, None, None, 8),
                "torch": lambda x=x, row_of=row_of: reference.ep_combine_reduce(x, row_of, None, None, 8),
            }
        )
        shape = f"{x.shape[0]} rows of {hidden} bf16, R={ranks}"
        rows.append({"op": "ep_combine_reduce", "shape": shape, "times": t})
    for r in rows:
        r["dsv3_ms"] = r["times"]["dsv3"]["median_s"] * 1e3
        r["torch_ms"] = r["times"]["torch"]["median_s"] * 1e3
        r["speedup"] = r["torch_ms"] / r["dsv3_ms"]
    return rows


def run_case(world: int, args: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, args, out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=900)
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        for p in procs:
            if p.is_alive():
                p.kill()
        if bad:
            raise RuntimeError(f"dsv3 bench ep: a worker failed ({bad}); see its output above")
        res = torch.load(f"{out}/bench.pt")
    rows = []
    for op in ("dispatch", "combine"):
        med = {
            impl: statistics.median(res["times"][(op, impl)])
            for impl in ("dsv3", "per-token", "per-destination")
        }
        rows.append(
            {
                "ranks": world,
                "op": op,
                **{k: args[k] for k in ("tokens", "hidden", "topk", "experts")},
                "bytes_per_rank": res["bytes_per_rank"],
                "dsv3_ms": med["dsv3"] * 1e3,
                "dsv3_gbps": res["bytes_per_rank"] / med["dsv3"] / 1e9,
                "per_token_ms": med["per-token"] * 1e3,
                "per_destination_ms": med["per-destination"] * 1e3,
                "x_per_token": med["per-token"] / med["dsv3"],
                "x_per_destination": med["per-destination"] / med["dsv3"],
                "rounds": len(res["times"][(op, "dsv3")]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv3 bench ep", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=RANKS, help="process counts to run (gloo, CPU)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default="bench-results/ep.json", help="where to write the results")
    p.add_argument("--no-kernels", action="store_true", help="skip the single-process kernel rows")
    a = p.parse_args(argv)
    args = dict(tokens=a.tokens, hidden=a.hidden, topk=a.topk, experts=a.experts, rounds=a.rounds)
    rows = []
    for world in a.ranks:
        rows += run_case(world, args)
    print(
        f"dsv3 {dsv3.__version__}, torch {torch.__version__}, gloo on CPU, 1 thread per rank; "
        f"{a.tokens} tokens/rank, "
        f"hidden {a.hidden} bf16, top-{a.topk} of {a.experts} experts"
    )
    print(
        f"{'R':>2} {'op':>8} | {'dsv3 ms':>8} {'GB/s':>6} | {'per-token ms':>12} {'x':>6} | "
        f"{'per-dest ms':>11} {'x':>5}"
    )
    for r in rows:
        print(
            f"{r['ranks']:>2} {r['op']:>8} | {r['dsv3_ms']:>8.2f} {r['dsv3_gbps']:>6.2f} | "
            f"{r['per_token_ms']:>12.2f} {r['x_per_token']:>6.1f} | {r['per_destination_ms']:>11.2f} "
            f"{r['x_per_destination']:>5.2f}"
        )
    print(
        "x = baseline time / dsv3 time (same rows, same results); GB/s = bf16 bytes received per rank / time"
    )
    if not a.no_kernels:
        krows = kernel_rows()
        print(f"\n{'kernel':>18} {'shape':>34} | {'dsv3 ms':>8} {'torch ms':>9} {'x':>6}")
        for r in krows:
            times = f"{r['dsv3_ms']:>8.3f} {r['torch_ms']:>9.3f} {r['speedup']:>6.1f}"
            print(f"{r['op']:>18} {r['shape']:>34} | {times}")
        print(f"torch = the reference in dsv3.ops.reference, same results; {torch.get_num_threads()} threads")
        rows += krows
    write_json(a.json, "cpu", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
