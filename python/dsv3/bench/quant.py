"""FP8 quantization benchmark: dsv3's quantize/dequantize kernels against the same math in plain torch ops
(`dsv3.ops.reference`, bit-identical results), side by side in one process, at V3 activation/weight shapes.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

import dsv3
from dsv3 import ops
from dsv3.ops import reference

from .common import write_json
from .timing import time_side_by_side

# Activations [tokens, hidden] and weights [N, K] of V3: hidden 7168, expert and o_proj weights.
ACTIVATIONS = [(1, 7168), (128, 7168), (2048, 7168)]
WEIGHTS = [(2048, 7168), (7168, 2048), (7168, 16384)]
# Wgrad's token-major operands: t [tokens, features] quantized as t.t() (1 x 128 tiles along tokens), the
# input x of a hidden-7168 projection and the output gradient of an expert's 2048-wide down projection.
TOKEN_MAJOR = [(2048, 7168), (4096, 2048)]


def _row(op: str, x: torch.Tensor, args: tuple, kwargs: dict, device: str, label: str | None = None) -> dict:
    """dsv3.ops.<op>(*args, **kwargs) timed beside dsv3.ops.reference.<op>; x: the high-precision side."""
    fns = {
        "dsv3": functools.partial(getattr(ops, op), *args, **kwargs),
        "torch": functools.partial(getattr(reference, op), *args, **kwargs),
    }
    times = time_side_by_side(fns, device=device)
    t = times["dsv3"]["median_s"]
    # Bytes an implementation must move: the high-precision side, the fp8 side and the scales.
    nbytes = x.numel() * (x.element_size() + 1) + 4 * x.numel() // 128
    return {
        "op": label or op,
        "shape": list(x.shape),
        "times": times,
        "dsv3_gbps": nbytes / t / 1e9,
        "speedup": times["torch"]["median_s"] / t,
    }


def run_cases(device: str, dtype: torch.dtype) -> list[dict]:
    rows = []
    for shapes, kind in ((ACTIVATIONS, "per_token_group"), (WEIGHTS, "per_block")):
        for shape in shapes:
            x = torch.randn(*shape, dtype=dtype, device=device)
            kwargs = {"col_major_scales": True} if kind == "per_token_group" else {}
            rows.append(_row(f"quantize_{kind}", x, (x,), kwargs, device))
            q, s = getattr(ops, f"quantize_{kind}")(x)
            rows.append(_row(f"dequantize_{kind}", x, (q, s), {"out_dtype": dtype}, device))
    for shape in TOKEN_MAJOR:
        x = torch.randn(*shape, dtype=dtype, device=device).t()
        rows.append(_row("quantize_per_token_group", x, (x,), {}, device, "quantize_per_token_group t.t()"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv3 bench quant", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", default="bench-results/quant.json", help="where to write the results")
    args = p.parse_args(argv)
    rows = run_cases(args.device, getattr(torch, args.dtype))
    threads = torch.get_num_threads()
    print(
        f"dsv3 {dsv3.__version__}, torch {torch.__version__}, {args.device}, {threads} threads, {args.dtype}"
    )
    print(f"{'op':<32} {'shape':>14} | {'dsv3 GB/s':>9} {'x torch':>8}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['op']:<32} {shape:>14} | {r['dsv3_gbps']:>9.2f} {r['speedup']:>8.2f}")
    print("x torch = dsv3 speed / the same math in torch ops (dsv3.ops.reference)")
    write_json(args.json, args.device, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
