"""Times intranode EP dispatch and combine (dsv3.ep.Buffer) on every GPU of one node, `nvlink` backend beside
`torch` (NCCL all_to_all_single), at DeepEP's intranode test shape (4096 tokens, hidden 7168, top-8 of 256
experts), and reports DeepEP's bandwidth figure: bytes of the rows that cross NVLink (the received rows that
came from another rank; FP8 rows count H + H/128·4 bytes, bf16 rows 2H) over the time of a whole call (a
dispatch includes its count exchange and the CPU wait for the received row count).

    python benchmarks/ep_gpu_bench.py [--tokens 4096] [--hidden 7168] [--iters 20] [--json FILE]

Spawns one process per GPU (at least 2; R must be 2, 4 or 8 for nvlink). Each time is the median over ranks'
medians of `iters` CUDA-event measurements after warm-up, each run preceded by a group barrier.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _bench_backend(backend: str, rank: int, world: int, args, inputs) -> list[tuple[str, str, float, int]]:
    """(backend, op, ms, bytes over NVLink) for FP8 and bf16 dispatch and bf16 combine on one backend."""
    from dsv3.ep import Buffer
    from dsv3.ep.config import get_combine_config, get_dispatch_config

    H, E = args.hidden, args.experts
    dcfg, ccfg = get_dispatch_config(world), get_combine_config(world)
    size = max(c.get_nvl_buffer_size_hint(H * 2, world) for c in (dcfg, ccfg)) if backend == "nvlink" else 0
    buf = Buffer(num_nvl_bytes=size, backend=backend, timeout=60)
    ntpr, _, ntpe, in_rank, _ = buf.get_dispatch_layout(inputs["topk_idx"], E)
    kw = dict(num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe,
              topk_idx=inputs["topk_idx"], topk_weights=inputs["topk_weights"], config=dcfg)  # fmt: skip
    recv, _, _, _, handle, _ = buf.dispatch(inputs["x"], **kw)
    rpm = handle[0]
    own = int(rpm[rank, rank] - (rpm[rank - 1, rank] if rank else 0))
    remote_rows = int(rpm[-1, rank]) - own  # rows that crossed NVLink into this rank
    rows = []
    for name, payload, row_bytes in (
        ("dispatch_fp8", inputs["fp8"], H + H // 128 * 4),
        ("dispatch_bf16", inputs["x"], 2 * H),
    ):
        ms = _time_ms(lambda p=payload: buf.dispatch(p, **kw), args.iters)
        rows.append((backend, name, ms, remote_rows * row_bytes))
    ms = _time_ms(lambda: buf.combine(recv, handle, config=ccfg), args.iters)
    rows.append((backend, "combine_bf16", ms, remote_rows * 2 * H))
    buf.destroy()
    return rows


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank)
    n, H, E = args.tokens, args.hidden, args.experts
    gen = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(n, H, device="cuda", generator=gen).to(torch.bfloat16)
    scales = torch.rand(n, H // 128, device="cuda", generator=gen) + 0.5
    x_fp8 = (x.float() / scales.repeat_interleave(128, 1)).to(torch.float8_e4m3fn)
    topk_idx = (torch.rand(n, E, device="cuda", generator=gen).abs() + 1).topk(args.topk, dim=1).indices
    topk_weights = torch.rand(n, args.topk, device="cuda", generator=gen)
    inputs = dict(x=x, fp8=(x_fp8, scales), topk_idx=topk_idx, topk_weights=topk_weights)
    rows = [
        row for backend in ("nvlink", "torch") for row in _bench_backend(backend, rank, world, args, inputs)
    ]
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        queue.put(gathered)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    world = torch.cuda.device_count()
    if world not in (2, 4, 8):
        print(f"ep_gpu_bench: needs 2, 4 or 8 GPUs, found {world}")
        return 1 if world >= 2 else 0
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_worker, args=(world, _free_port(), args, queue), nprocs=world, join=True)
    per_rank = queue.get()
    results = []
    shape = f"{args.tokens} tokens x hidden {args.hidden}, top-{args.topk} of {args.experts} experts"
    print(f"EP intranode, {world} GPUs, {shape}")
    for i, (backend, name, _, _) in enumerate(per_rank[0]):
        ms = statistics.median(r[i][2] for r in per_rank)
        nbytes = statistics.median(r[i][3] for r in per_rank)
        gbps = nbytes / (ms * 1e-3) / 1e9
        results.append({"backend": backend, "op": name, "ms": ms, "nvl_bytes": nbytes, "gb_per_s": gbps})
        print(f"  {backend:7s} {name:14s} {ms * 1e3:9.1f} us  {gbps:7.1f} GB/s")
    if args.json:
        args.json.write_text(json.dumps({"world": world, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
