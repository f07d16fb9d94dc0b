"""FP8 block-scaled GEMM benchmark: dsv3's `fp8_gemm_nt` against what plain torch offers for the same job.

Baselines, all timed side by side in one process (medians of interleaved rounds):
  bf16    F.linear on weights dequantized to bf16 ahead of time (the usual way to serve FP8 checkpoints)
  fp32    torch.matmul on fp32 copies (the compute ceiling of this CPU)
  smm     torch._scaled_mm with row-wise scales (torch's FP8 GEMM; it cannot express 128x128 block scales)
  deq     the same block-scaled math in torch ops: dequantize A and B, then fp32 matmul, every call
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import dsv3
from dsv3 import ops
from dsv3.ops.reference import V3_GEMM_SHAPES

from .common import write_json
from .timing import time_side_by_side

DEFAULT_MS = [1, 16, 128, 512, 2048]


def _deq_matmul(a, sa, b, sb):
    k = a.shape[1]
    a32 = a.float() * sa.repeat_interleave(128, dim=1)[:, :k]
    b32 = b.float() * sb.repeat_interleave(128, dim=0)[: b.shape[0]].repeat_interleave(128, dim=1)[:, :k]
    return (a32 @ b32.t()).to(torch.bfloat16)


def bench_case(m: int, n: int, k: int, device: str, baselines: list[str]) -> dict:
    gen = torch.Generator().manual_seed(m * 131 + n * 7 + k)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=torch.bfloat16)
    a, sa = ops.quantize_per_token_group(x)
    b, sb = ops.quantize_per_block(w)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    fns = {"dsv3": lambda: ops.fp8_gemm_nt(a, sa, b, sb, out=out)}
    if "bf16" in baselines:
        w_bf16, x_bf16 = ops.dequantize_per_block(b, sb), ops.dequantize_per_token_group(a, sa)
        fns["bf16"] = lambda: F.linear(x_bf16, w_bf16)
    if "fp32" in baselines:
        w32, x32 = ops.dequantize_per_block(b, sb, out_dtype=torch.float32), x.float()
        fns["fp32"] = lambda: torch.matmul(x32, w32.t())
    if "smm" in baselines:
        s_row, s_col = sa[:, :1].contiguous(), sb.new_ones(1, n)
        fns["smm"] = lambda: torch._scaled_mm(
            a, b.t(), scale_a=s_row, scale_b=s_col, out_dtype=torch.bfloat16
        )
    if "deq" in baselines:
        fns["deq"] = lambda: _deq_matmul(a, sa, b, sb)
    times = time_side_by_side(fns, device=device)
    flops = 2.0 * m * n * k
    fp8_bytes = m * k + n * k + 4 * (sa.numel() + sb.numel()) + 2 * m * n
    row = {"m": m, "n": n, "k": k, "times": times}
    t = times["dsv3"]["median_s"]
    row["dsv3_gflops"] = flops / t / 1e9
    row["dsv3_gbps"] = fp8_bytes / t / 1e9
    row["speedup"] = {name: times[name]["median_s"] / t for name in fns if name != "dsv3"}
    row["gflops"] = {name: flops / times[name]["median_s"] / 1e9 for name in fns}
    return row


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    if text == "v3":
        return V3_GEMM_SHAPES
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",")]


def _print_table(rows: list[dict], baselines: list[str]) -> None:
    head = f"{'M':>5} {'N':>6} {'K':>6} | {'GFLOP/s':>8} {'GB/s':>7} |" + "".join(
        f" {'x ' + b:>9}" for b in baselines
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ratios = "".join(
            f" {r['speedup'][b]:>8.2f}{'*' if r['times'][b]['rounds'] == 1 else ' '}" for b in baselines
        )
        print(
            f"{r['m']:>5} {r['n']:>6} {r['k']:>6} | {r['dsv3_gflops']:>8.1f} {r['dsv3_gbps']:>7.1f} |{ratios}"
        )
    print(
        "x B = dsv3 speed / baseline B speed (> 1: dsv3 faster); * = baseline timed once (too slow to repeat)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv3 bench gemm", description=__doc__.split("\n")[0])
    p.add_argument("--m", default=",".join(map(str, DEFAULT_MS)), help="comma-separated M values")
    p.add_argument("--shapes", default="v3", help="'v3' or NxK pairs, e.g. 2112x7168,576x7168")
    p.add_argument("--baselines", default="bf16,fp32,smm,deq", help="subset of bf16,fp32,smm,deq")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default="bench-results/gemm.json", help="where to write the results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    baselines = [b for b in args.baselines.split(",") if b]
    ms = [int(v) for v in args.m.split(",")]
    print(
        f"dsv3 {dsv3.__version__}, torch {torch.__version__}, {args.device}, "
        f"{torch.get_num_threads()} threads, cpu path {dsv3.build_info()['cpu_path']}",
        flush=True,
    )
    rows = []
    for m in ms:
        for n, k in _parse_shapes(args.shapes):
            rows.append(bench_case(m, n, k, args.device, baselines))
            r = rows[-1]
            print(
                f"  M={m} N={n} K={k}: {r['dsv3_gflops']:.1f} GFLOP/s, {r['dsv3_gbps']:.1f} GB/s", flush=True
            )
    _print_table(rows, baselines)
    write_json(args.json, args.device, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
