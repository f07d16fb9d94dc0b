"""Grouped and weight-gradient FP8 GEMMs (MoE shapes of V3) against plain torch doing the same job: a loop of
fp32 matmuls over weights dequantized ahead of time (the forward ops) or over operands dequantized on every
call (the wgrad ops, whose operands are fresh activations and gradients). Side by side in one process."""

from __future__ import annotations

import argparse
import sys

import torch

import dsv3
from dsv3 import ops
from dsv3.ops import reference

from .common import write_json
from .timing import time_side_by_side

HIDDEN, MOE_INTER = 7168, 2048  # V3 expert: gate+up [2*2048, 7168], down [7168, 2048]


def contiguous_case(groups: int, rows_per_group: int, n: int, k: int, device: str):
    b, sb = ops.quantize_per_block(torch.randn(groups, n, k, device=device) * 0.02)
    a, sa = ops.quantize_per_token_group(torch.randn(groups * rows_per_group, k, device=device))
    m_indices = torch.arange(groups, dtype=torch.int32, device=device).repeat_interleave(rows_per_group)
    a32, b32 = (
        ops.dequantize_per_token_group(a, sa, out_dtype=torch.float32),
        ops.dequantize_per_block(b, sb, out_dtype=torch.float32),
    )
    out = torch.empty(a.shape[0], n, dtype=torch.bfloat16, device=device)
    fns = {
        "dsv3": lambda: ops.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices, out=out),
        "torch": lambda: [
            a32[g * rows_per_group : (g + 1) * rows_per_group] @ b32[g].t() for g in range(groups)
        ],
    }
    return f"contiguous G={groups} M={rows_per_group}/group {n}x{k}", 2.0 * a.shape[0] * n * k, fns


def masked_case(groups: int, m_max: int, n: int, k: int, device: str):
    b, sb = ops.quantize_per_block(torch.randn(groups, n, k, device=device) * 0.02)
    a, sa = ops.quantize_per_token_group(torch.randn(groups, m_max, k, device=device))
    masked_m = torch.randint(m_max // 2, m_max + 1, (groups,), dtype=torch.int32, device=device)
    counts = masked_m.tolist()
    a32, b32 = (
        ops.dequantize_per_token_group(a, sa, out_dtype=torch.float32),
        ops.dequantize_per_block(b, sb, out_dtype=torch.float32),
    )
    out = torch.zeros(groups, m_max, n, dtype=torch.bfloat16, device=device)
    fns = {
        "dsv3": lambda: ops.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, m_max, out=out),
        "torch": lambda: [a32[g, : counts[g]] @ b32[g].t() for g in range(groups)],
    }
    return f"masked G={groups} M_max={m_max} {n}x{k}", 2.0 * sum(counts) * n * k, fns


def wgrad_case(m: int, n: int, ks: list[int], device: str):
    """out[g] += dY_g^T X_g over each group's tokens (ks: multiples of 128, so one quantization of the
    concatenated tokens restarts its scales at every group boundary, as the op requires)."""
    dy, sdy = ops.quantize_per_token_group(torch.randn(m, sum(ks), device=device))
    x, sx = ops.quantize_per_token_group(torch.randn(n, sum(ks), device=device))
    bounds = [0]
    for k in ks:
        bounds.append(bounds[-1] + k)
    if len(ks) == 1:
        out = torch.zeros(m, n, device=device)
        name, dsv3_fn = (
            f"wgrad {m}x{n} tokens={ks[0]}",
            lambda: ops.fp8_gemm_wgrad_nt(dy, sdy, x, sx, out=out),
        )
    else:
        out = torch.zeros(len(ks), m, n, device=device)
        name = f"k-grouped wgrad {m}x{n} tokens={'+'.join(map(str, ks))}"
        dsv3_fn = lambda: ops.k_grouped_fp8_gemm_wgrad_nt(dy, sdy, x, sx, ks, out=out)  # noqa: E731

    def torch_fn():  # dequantize the fresh operands, one fp32 matmul per group
        a32 = reference.dequantize_per_token_group(dy, sdy, out_dtype=torch.float32)
        b32 = reference.dequantize_per_token_group(x, sx, out_dtype=torch.float32)
        return [a32[:, lo:hi] @ b32[:, lo:hi].t() for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    return name, 2.0 * m * n * sum(ks), {"dsv3": dsv3_fn, "torch": torch_fn}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv3 bench grouped", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="bench-results/grouped.json", help="where to write the results")
    args = p.parse_args(argv)
    d = args.device
    cases = [
        contiguous_case(4, 128, 2 * MOE_INTER, HIDDEN, d),  # prefill: gate+up of 4 local experts
        contiguous_case(4, 128, HIDDEN, MOE_INTER, d),  # prefill: down
        masked_case(4, 16, 2 * MOE_INTER, HIDDEN, d),  # decode: a few tokens per expert
        wgrad_case(2 * MOE_INTER, HIDDEN, [512], d),  # dW of gate+up over 512 tokens
        wgrad_case(HIDDEN, MOE_INTER, [128, 256, 128], d),  # dW of down, 3 experts' tokens
    ]
    print(f"dsv3 {dsv3.__version__}, torch {torch.__version__}, {d}, {torch.get_num_threads()} threads")
    print(f"{'case':<48} | {'dsv3 GFLOP/s':>12} {'x torch':>8}")
    rows = []
    for name, flops, fns in cases:
        times = time_side_by_side(fns, device=d)
        t = times["dsv3"]["median_s"]
        rows.append(
            {
                "case": name,
                "times": times,
                "dsv3_gflops": flops / t / 1e9,
                "speedup": times["torch"]["median_s"] / t,
            }
        )
        print(f"{name:<48} | {rows[-1]['dsv3_gflops']:>12.1f} {rows[-1]['speedup']:>8.2f}", flush=True)
    print("x torch = dsv3 speed / plain torch (fp32 matmul per group on dequantized operands)")
    write_json(args.json, d, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
