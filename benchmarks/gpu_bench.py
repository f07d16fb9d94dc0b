"""Times dsv3's CUDA FP8 quantization kernels at DeepSeek-V3 shapes and reports the memory bandwidth they
reach, beside a device-to-device copy (the ceiling) and the plain-PyTorch reference on the same GPU; with
--gemm, times the sm_90a FP8 GEMMs at the V3 shapes (TFLOPS, GB/s), beside DeepGEMM when it is importable;
with --mla, times MLA decode (b = 128, h_q = 128, h_kv = 1, causal, bf16 and FP8 caches) beside FlashMLA when
it is importable, with FlashMLA's GB/s and TFLOPS formulas.

    python benchmarks/gpu_bench.py [--iters 30] [--gemm | --mla] [--json FILE]

Each time is the median of `iters` CUDA-event measurements after warm-up, with a 256 MB buffer written
before every run so each starts with a cold L2 (H200: 60 MB). Bytes counted: input read + fp8 output + scales
written (dequantize: fp8 + scales read, output written).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from dsv3 import ops
from dsv3.ops import reference
from dsv3.ops.reference import V3_GEMM_SHAPES

FLUSH_BYTES = 256 << 20
WARMUP = 3


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    variant: str
    kernel_us: float
    kernel_gbs: float
    copy_fraction: float  # kernel_gbs / copy_gbs
    reference_us: float
    speedup_vs_reference: float


def time_us(fn: Callable[[], object], flush: torch.Tensor, iters: int) -> float:
    """Median CUDA-event time of fn in microseconds, L2 flushed before each run."""
    for _ in range(WARMUP):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends, strict=True):
        flush.fill_(1)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def copy_bandwidth_gbs(flush: torch.Tensor, iters: int) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written: the bandwidth a streaming kernel can reach."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), flush, iters)
    return 2 * src.numel() / us / 1e3


def deep_gemm_dense() -> Callable | None:
    """DeepGEMM's dense FP8 GEMM (v1 or v2 name) when the package is importable, else None."""
    try:
        import deep_gemm
    except ImportError:
        return None
    if hasattr(deep_gemm, "fp8_gemm_nt"):
        return lambda a, sa, b, sb, out: deep_gemm.fp8_gemm_nt((a, sa), (b, sb), out)
    return lambda a, sa, b, sb, out: deep_gemm.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)


def gemm_rows(flush: torch.Tensor, iters: int) -> list[dict]:
    """fp8_gemm_nt at every V3 (N, K) and M in {64, 128, 4096}: median time, TFLOPS, GB/s (A, B, scales and
    out), calc_diff against the bf16 product, and DeepGEMM's time on the same operands when available."""
    rows, deep_gemm = [], deep_gemm_dense()
    print(
        f"{'M':>5} {'N':>6} {'K':>6} {'us':>9} {'TFLOPS':>7} {'GB/s':>6} {'diff':>8} "
        f"{'DeepGEMM us':>12} {'ratio':>6}"
    )
    for m in (64, 128, 4096):
        for n, k in V3_GEMM_SHAPES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            (qa, sa), (qb, sb) = (
                ops.quantize_per_token_group(x, col_major_scales=True),
                ops.quantize_per_block(w),
            )
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            us = time_us(partial(ops.fp8_gemm_nt, qa, sa, qb, sb, out=out), flush, iters)
            diff = float(reference.calc_diff(out, x.float() @ w.float().t()))
            row = {"m": m, "n": n, "k": k, "us": us, "tflops": 2 * m * n * k / us / 1e6,
                   "gbs": nbytes(qa, sa, qb, sb, out) / us / 1e3, "calc_diff": diff}  # fmt: skip
            if deep_gemm is not None:
                ref_out = torch.empty_like(out)
                row["deep_gemm_us"] = time_us(partial(deep_gemm, qa, sa, qb, sb, ref_out), flush, iters)
                row["ratio"] = row["deep_gemm_us"] / us  # > 1: dsv3 is faster
            rows.append(row)
            dg = f"{row['deep_gemm_us']:>12.1f} {row['ratio']:>5.2f}x" if deep_gemm else f"{'-':>12} {'-':>6}"
            print(
                f"{m:>5} {n:>6} {k:>6} {us:>9.1f} {row['tflops']:>7.0f} {row['gbs']:>6.0f} {diff:>8.1e} {dg}"
            )
    return rows


def flash_mla_decode() -> Callable | None:
    """FlashMLA's original API (get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv), flash_mla_with_kvcache)
    when importable, as fn(q, cache, block_table, seqlens, causal) -> out; else None."""
    try:
        from flash_mla import flash_mla_with_kvcache, get_mla_metadata
    except ImportError:
        return None

    def run(q, cache, block_table, seqlens, causal):
        meta, splits = get_mla_metadata(seqlens, q.shape[1] * q.shape[2] // cache.shape[2], cache.shape[2])
        return lambda: flash_mla_with_kvcache(
            q, cache, block_table, seqlens, 512, meta, splits, causal=causal
        )

    return run


def mla_rows(flush: torch.Tensor, iters: int) -> list[dict]:
    """mla_decode at FlashMLA's benchmark shapes (b = 128, h_q = 128, h_kv = 1, s_q in {1, 2}, causal, every
    request s_k long): median time with the schedule computed once (as across layers), GB/s = (cache + q +
    out bytes) / time and TFLOPS = s_q * total_seqlens * h_q * (576 + 512) * 2 / time (FlashMLA's formulas,
    656 cache bytes per token for the FP8 cache), and FlashMLA's time on the bf16 cache when available."""
    b, h_q, h_kv, d, dv = 128, 128, 1, 576, 512
    rows, flash_mla = [], flash_mla_decode()
    print(f"{'kv':>5} {'s_q':>3} {'s_k':>6} {'us':>9} {'GB/s':>6} {'TFLOPS':>7} {'FlashMLA us':>12} ratio")
    for s_k in (4096, 8192, 16384, 32768):
        pages = s_k // 64
        cache = (torch.randn(b * pages, 64, h_kv, d, device="cuda") / 10).to(torch.bfloat16)
        block_table = torch.randperm(b * pages, device="cuda", dtype=torch.int32).view(b, pages)
        seqlens = torch.full((b,), s_k, dtype=torch.int32, device="cuda")
        for kv in ("bf16", "fp8"):
            kv_cache = cache if kv == "bf16" else ops.quantize_mla_kv_fp8(cache, dv)
            for s_q in (1, 2):
                q = (torch.randn(b, s_q, h_q, d, device="cuda") / 10).to(torch.bfloat16)
                meta, splits = ops.get_mla_decode_metadata(seqlens, s_q * h_q // h_kv, h_kv)
                run = partial(ops.mla_decode, q, kv_cache, block_table, seqlens, dv, None, True, meta, splits)
                us = time_us(run, flush, iters)
                token_bytes = d * 2 if kv == "bf16" else kv_cache.shape[-1]
                moved = b * s_k * h_kv * token_bytes + (b * s_q * h_q * d + b * s_q * h_q * dv) * 2
                flops = s_q * b * s_k * h_q * (d + dv) * 2
                row = {"kv": kv, "b": b, "s_q": s_q, "s_k": s_k, "h_q": h_q, "us": us,
                       "gbs": moved / us / 1e3, "tflops": flops / us / 1e6}  # fmt: skip
                if flash_mla is not None and kv == "bf16":
                    try:
                        row["flash_mla_us"] = time_us(
                            flash_mla(q, cache, block_table, seqlens, True), flush, iters
                        )
                        row["ratio"] = row["flash_mla_us"] / us  # > 1: dsv3 is faster
                    except (TypeError, RuntimeError) as err:  # another FlashMLA API generation
                        print(f"FlashMLA skipped: {err}")
                        flash_mla = None
                rows.append(row)
                fm = (
                    f"{row['flash_mla_us']:>12.1f} {row['ratio']:>5.2f}x"
                    if "ratio" in row
                    else f"{'-':>12} {'-':>6}"
                )
                print(f"{kv:>5} {s_q:>3} {s_k:>6} {us:>9.1f} {row['gbs']:>6.0f} {row['tflops']:>7.0f} {fm}")
        del cache, kv_cache
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--json", type=Path, metavar="FILE")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gemm", action="store_true", help="time the FP8 GEMMs instead of the quantization")
    mode.add_argument("--mla", action="store_true", help="time MLA decode instead of the quantization")
    args = parser.parse_args()
    torch.manual_seed(0)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    copy_gbs = copy_bandwidth_gbs(flush, args.iters)
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbs:.0f} GB/s (read + write)")
    if args.gemm or args.mla:
        rows = gemm_rows(flush, max(20, args.iters)) if args.gemm else mla_rows(flush, args.iters)
        if args.json:
            args.json.write_text(
                json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2) + "\n"
            )
        return

    def cuda_randn(*shape, dtype=torch.bfloat16):
        return torch.randn(shape, device="cuda", dtype=torch.float32).to(dtype)

    x = cuda_randn(4096, 7168)  # activations of a 4096-token prefill, hidden 7168
    x_decode = cuda_randn(128, 7168)
    w = cuda_randn(7168, 16384)  # the largest V3 weight shape (N = 7168, K = 16384)
    w_master = w.float()  # FP32 master weights, quantized every training step
    qx, sx = ops.quantize_per_token_group(x)
    qw, sw = ops.quantize_per_block(w)

    cases = [
        ("quantize_per_token_group", x, "row-major", lambda: ops.quantize_per_token_group(x),
         lambda: reference.quantize_per_token_group(x), nbytes(x, qx, sx)),
        ("quantize_per_token_group", x, "col-major ue8m0",
         lambda: ops.quantize_per_token_group(x, 128, ue8m0=True, col_major_scales=True),
         lambda: reference.quantize_per_token_group(x, 128, True, True), nbytes(x, qx, sx)),
        ("quantize_per_token_group", x_decode, "row-major", lambda: ops.quantize_per_token_group(x_decode),
         lambda: reference.quantize_per_token_group(x_decode), nbytes(x_decode, qx[:128], sx[:128])),
        ("dequantize_per_token_group", x, "to bf16", lambda: ops.dequantize_per_token_group(qx, sx),
         lambda: reference.dequantize_per_token_group(qx, sx), nbytes(qx, sx, x)),
        ("quantize_per_block", w, "", lambda: ops.quantize_per_block(w),
         lambda: reference.quantize_per_block(w), nbytes(w, qw, sw)),
        ("quantize_per_block", w_master, "", lambda: ops.quantize_per_block(w_master),
         lambda: reference.quantize_per_block(w_master), nbytes(w_master, qw, sw)),
        ("dequantize_per_block", w, "to bf16", lambda: ops.dequantize_per_block(qw, sw),
         lambda: reference.dequantize_per_block(qw, sw), nbytes(qw, sw, w)),
    ]  # fmt: skip
    rows = []
    for op, t, variant, kernel, ref, moved in cases:
        kernel_us = time_us(kernel, flush, args.iters)
        reference_us = time_us(ref, flush, max(5, args.iters // 4))
        gbs = moved / kernel_us / 1e3
        rows.append(
            Row(op, "x".join(map(str, t.shape)), str(t.dtype).removeprefix("torch."), variant, kernel_us, gbs,
                gbs / copy_gbs, reference_us, reference_us / kernel_us)
        )  # fmt: skip

    header = f"{'op':<28} {'shape':<12} {'dtype':<9} {'variant':<16} {'us':>9} "
    header += f"{'GB/s':>7} {'of copy':>8} {'vs ref':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.op:<28} {r.shape:<12} {r.dtype:<9} {r.variant:<16} {r.kernel_us:>9.1f} {r.kernel_gbs:>7.0f} "
            f"{r.copy_fraction:>8.0%} {r.speedup_vs_reference:>6.1f}x"
        )
    if args.json:
        record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gbs": copy_gbs}
        args.json.write_text(json.dumps({**record, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
