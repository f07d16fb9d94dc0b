"""MLA decode benchmark: dsv3's `mla_decode` (schedule computed once, as in a decode step) against plain
torch, side by side in one process, with the machine's memory bandwidth measured in the same run.

Implementations:
  dsv3        dsv3.ops.mla_decode with precomputed tile_scheduler_metadata / num_splits
  torch       dsv3.ops.reference.mla_decode: per request, gather its pages and attend in fp32 (the definition)
  torch_bf16  the fast pure-torch way: index_select every request's pages into one padded batch, one batched
              matmul in the input dtype for the scores, masked fp32 softmax, one matmul for P·V
GB/s counts the bytes of the KV pages actually attended (sum(cache_seqlens) · h_kv · token bytes) plus q and
out; GFLOP/s is FlashMLA's `s_q · Σ s_k · h_q · (d_qk + d_v) · 2`.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import dsv3
from dsv3 import ops
from dsv3.ops import reference
from dsv3.ops.reference import ceil_div

from .common import write_json
from .timing import time_side_by_side

PAGE = 64
# (name, b, s_q, s_k, h_q, h_kv, d_qk, d_v, causal, fp8): the first is SPEC §8's target case.
CASES = [
    ("v3 decode", 8, 1, 2048, 16, 1, 576, 512, False, False),
    ("v3 mtp", 8, 2, 2048, 16, 1, 576, 512, True, False),
    ("v3 h128", 2, 1, 2048, 128, 1, 576, 512, False, False),
    # Few query rows per KV byte: the memory-bound end (at h_q = 16 a 2-core CPU is compute-bound: ~30
    # FLOP/B).
    ("v3 h2", 8, 1, 2048, 2, 1, 576, 512, False, False),
    ("v3 fp8 kv", 8, 1, 2048, 16, 1, 576, 512, False, True),
    ("tiny dims", 8, 1, 2048, 16, 1, 64, 48, False, False),
]


def torch_bf16(q, kv_cache, block_table, cache_seqlens, head_dim_v, max_pages, causal=False):
    """Paged MLA decode in a few batched torch ops (scores and P·V in q's dtype, softmax in fp32)."""
    b, s_q, h_q, d_qk = q.shape
    h_kv = kv_cache.shape[2]
    group, keys = h_q // h_kv, max_pages * PAGE
    pages = block_table[:, :max_pages].clamp(0, kv_cache.shape[0] - 1).flatten()
    k = kv_cache.index_select(0, pages).view(b, keys, h_kv, d_qk).transpose(1, 2)  # [b, h_kv, keys, d_qk]
    rows = q.view(b, s_q, h_kv, group, d_qk).transpose(1, 2).reshape(b, h_kv, s_q * group, d_qk)
    scores = torch.matmul(rows, k.transpose(-1, -2)).float() * d_qk**-0.5  # [b, h_kv, s_q * group, keys]
    limit = cache_seqlens.view(b, 1, 1).long().expand(b, s_q, 1)  # keys [0, limit) seen by each query token
    if causal and s_q > 1:
        limit = limit - s_q + 1 + torch.arange(s_q, device=q.device).view(1, s_q, 1)
    visible = (torch.arange(keys, device=q.device).view(1, 1, keys) < limit).repeat_interleave(
        group, dim=1
    )  # [b, rows, keys]
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    lse = scores.logsumexp(-1)
    p = torch.exp(scores - lse.nan_to_num(neginf=0.0).unsqueeze(-1)).to(q.dtype)
    out = torch.matmul(p, k[..., :head_dim_v])  # [b, h_kv, s_q * group, d_v]
    out = out.view(b, h_kv, s_q, group, head_dim_v).transpose(1, 2).reshape(b, s_q, h_q, head_dim_v)
    lse = lse.view(b, h_kv, s_q, group).permute(0, 1, 3, 2).reshape(b, h_q, s_q)
    return out, lse.masked_fill(lse.isneginf(), float("inf"))


def make_case(b, s_q, s_k, h_q, h_kv, d_qk, d_v, causal, fp8, device, dtype):
    """Inputs, the byte and FLOP counts, and the three implementations of one case. Lengths vary around
    s_k (FlashMLA's benchmark: s_k + 2i) and pages are shuffled."""
    gen = torch.Generator().manual_seed(b * 1009 + s_k * 7 + h_q + d_qk)
    lens = torch.tensor([s_k + 2 * i for i in range(b)], dtype=torch.int32)
    max_pages = ceil_div(int(lens.max()), PAGE)
    block_table = torch.randperm(b * max_pages, generator=gen, dtype=torch.int32).view(b, max_pages)
    kv = torch.randn(b * max_pages, PAGE, h_kv, d_qk, generator=gen).to(dtype)
    q = torch.randn(b, s_q, h_q, d_qk, generator=gen).to(dtype)
    cache = ops.quantize_mla_kv_fp8(kv, d_v) if fp8 else kv
    if fp8:  # the dense baselines attend over what the FP8 cache holds
        kv = ops.dequantize_mla_kv_fp8(cache, d_qk, d_v).to(dtype)
    q, kv, cache, block_table, lens = (t.to(device) for t in (q, kv, cache, block_table, lens))
    meta, num_splits = ops.get_mla_decode_metadata(lens, s_q * h_q // h_kv, h_kv)
    fns = {
        "dsv3": lambda: ops.mla_decode(
            q,
            cache,
            block_table,
            lens,
            d_v,
            causal=causal,
            tile_scheduler_metadata=meta,
            num_splits=num_splits,
        ),
        "torch": lambda: reference.mla_decode(q, cache, block_table, lens, d_v, causal=causal),
        "torch_bf16": lambda: torch_bf16(q, kv, block_table, lens, d_v, max_pages, causal),
    }
    total_keys = int(lens.sum())
    nbytes = total_keys * h_kv * cache.shape[-1] * cache.element_size()
    nbytes += q.numel() * q.element_size() + b * s_q * h_q * d_v * q.element_size()
    flops = 2.0 * s_q * total_keys * h_q * (d_qk + d_v)
    return fns, nbytes, flops


def memory_bandwidth_gbps(device: str, nbytes: int = 1 << 29) -> float:
    """Read + write GB/s of a large tensor copy (the machine's practical memory bandwidth)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = time_side_by_side({"copy": lambda: dst.copy_(src)}, device=device, min_rounds=5, target_s=0.3)
    return 2 * nbytes / times["copy"]["median_s"] / 1e9


def run_cases(device: str, dtype: torch.dtype, quick: bool = False) -> tuple[list[dict], float]:
    bandwidth = memory_bandwidth_gbps(device, 1 << 27 if quick else 1 << 29)
    timing = dict(min_rounds=2, target_s=0.1) if quick else {}
    rows = []
    for name, b, s_q, s_k, h_q, h_kv, d_qk, d_v, causal, fp8 in CASES:
        if quick:
            s_k //= 4
        fns, nbytes, flops = make_case(b, s_q, s_k, h_q, h_kv, d_qk, d_v, causal, fp8, device, dtype)
        times = time_side_by_side(fns, device=device, **timing)
        t = times["dsv3"]["median_s"]
        rows.append(
            {
                "case": name,
                "b": b,
                "s_q": s_q,
                "s_k": s_k,
                "h_q": h_q,
                "h_kv": h_kv,
                "d_qk": d_qk,
                "d_v": d_v,
                "causal": causal,
                "fp8_kv": fp8,
                "times": times,
                "dsv3_ms": t * 1e3,
                "dsv3_gbps": nbytes / t / 1e9,
                "dsv3_gflops": flops / t / 1e9,
                "memory_bandwidth_gbps": bandwidth,
                "bandwidth_fraction": nbytes / t / 1e9 / bandwidth,
                "speedup": {n: times[n]["median_s"] / t for n in fns if n != "dsv3"},
            }
        )
    return rows, bandwidth


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv3 bench mla", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", default="bench-results/mla.json", help="where to write the results")
    p.add_argument("--quick", action="store_true", help="s_k / 4 and fewer rounds (a smoke run)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows, bandwidth = run_cases(args.device, getattr(torch, args.dtype), args.quick)
    threads = torch.get_num_threads()
    print(
        f"dsv3 {dsv3.__version__}, torch {torch.__version__}, {args.device}, {threads} threads, "
        f"{args.dtype}; memory bandwidth (copy, read + write) {bandwidth:.1f} GB/s"
    )
    head = (
        f"{'case':<10} {'b':>3} {'s_q':>3} {'s_k':>5} {'h_q':>4} {'h_kv':>4} {'d':>7} | "
        f"{'ms':>7} {'GB/s':>6} {'of bw':>6} {'GFLOP/s':>8} | {'x torch':>8} {'x torch_bf16':>12}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        dims = f"{r['d_qk']}/{r['d_v']}"
        print(
            f"{r['case']:<10} {r['b']:>3} {r['s_q']:>3} {r['s_k']:>5} {r['h_q']:>4} {r['h_kv']:>4} "
            f"{dims:>7} | {r['dsv3_ms']:>7.3f} {r['dsv3_gbps']:>6.1f} {r['bandwidth_fraction']:>6.0%} "
            f"{r['dsv3_gflops']:>8.1f} | "
            f"{r['speedup']['torch']:>8.2f} {r['speedup']['torch_bf16']:>12.2f}"
        )
    print(
        "x <impl> = dsv3 speed / that implementation's; of bw = dsv3 GB/s / the copy bandwidth "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    write_json(args.json, args.device, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
