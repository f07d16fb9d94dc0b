"""MoE router benchmark: dsv3's `moe_route` against the same semantics in plain torch ops
(`dsv3.ops.reference.moe_route`, identical results), side by side in one process, at DeepSeek-V3's router
shape (E = 256 experts in 8 groups, 4 kept, top-8, scale 2.5) for decode to prefill token counts.
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

TOKENS = [1, 128, 4096]
# (experts, top_k, n_group, topk_group, routed_scaling_factor) of DeepSeek-V3's router.
V3_ROUTER = (256, 8, 8, 4, 2.5)


def make_case(tokens: int, device: str) -> dict:
    """The two implementations on one random [tokens, E] logits matrix and bias."""
    experts, top_k, n_group, topk_group, scale = V3_ROUTER
    logits = torch.randn(tokens, experts, device=device)
    bias = 0.1 * torch.randn(experts, device=device)
    args = (logits, bias, top_k, n_group, topk_group, scale, True)
    return {
        "dsv3": functools.partial(ops.moe_route, *args),
        "torch": functools.partial(reference.moe_route, *args),
    }


def run_cases(device: str) -> list[dict]:
    rows = []
    for tokens in TOKENS:
        times = time_side_by_side(make_case(tokens, device), device=device)
        t = times["dsv3"]["median_s"]
        rows.append(
            {
                "tokens": tokens,
                "experts": V3_ROUTER[0],
                "times": times,
                "dsv3_us": t * 1e6,
                "dsv3_mtokens_per_s": tokens / t / 1e6,
                "speedup": times["torch"]["median_s"] / t,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv3 bench route", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="bench-results/route.json", help="where to write the results")
    args = p.parse_args(argv)
    rows = run_cases(args.device)
    threads = torch.get_num_threads()
    print(f"dsv3 {dsv3.__version__}, torch {torch.__version__}, {args.device}, {threads} threads")
    print(f"{'tokens':>6} {'E':>4} | {'dsv3 us':>9} {'Mtok/s':>7} {'x torch':>8}")
    for r in rows:
        print(
            f"{r['tokens']:>6} {r['experts']:>4} | {r['dsv3_us']:>9.1f} {r['dsv3_mtokens_per_s']:>7.3f} "
            f"{r['speedup']:>8.2f}"
        )
    print("x torch = dsv3 speed / the same routing in torch ops (dsv3.ops.reference.moe_route)")
    write_json(args.json, args.device, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
