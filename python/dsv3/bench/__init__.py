"""dsv3's microbenchmark suite: `dsv3 bench <family>` or `python -m dsv3.bench <family>`."""

from __future__ import annotations

import importlib

FAMILIES = {
    "gemm": "dsv3.bench.gemm",
    "grouped": "dsv3.bench.grouped",
    "quant": "dsv3.bench.quant",
    "mla": "dsv3.bench.mla",
    "route": "dsv3.bench.route",
    "model": "dsv3.bench.model",
    "train": "dsv3.bench.train",
    "ep": "dsv3.bench.ep",
}


def run(argv: list[str]) -> int:
    if not argv or argv[0] not in FAMILIES:
        families = ",".join(FAMILIES)
        print(f"usage: dsv3 bench {{{families}}} [options]   (--help after the family for its options)")
        return 2
    return importlib.import_module(FAMILIES[argv[0]]).main(argv[1:])
