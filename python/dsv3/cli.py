"""The `dsv3` command line: `dsv3 info`, `dsv3 bench <family>`."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(_args) -> int:
    import torch

    import dsv3

    info = dsv3.build_info()
    archs = ", ".join(info["cuda_archs"]) or "none (CPU-only build)"
    if torch.cuda.is_available():
        gpu = ", ".join(
            f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())
        )
    else:
        gpu = "none visible"
    cpu_path = info["cpu_path"]
    cpu_desc = "AVX-512 (BF16/FP16)" if cpu_path == "avx512" else "portable C++"
    if cpu_path == "portable" and info["cpu_avx512"]:
        cpu_desc += " (forced; this CPU has AVX-512)"
    lines = [
        ("dsv3", info["version"]),
        (
            "torch",
            f"{torch.__version__} (built against {info['torch']}; CUDA {torch.version.cuda or 'none'})",
        ),
        ("python", platform.python_version()),
        ("CUDA kernels", archs),
        ("GPU", gpu),
        ("CPU path", f"{cpu_desc}; {torch.get_num_threads()} threads"),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")
    return 0


def _bench(args) -> int:
    from .bench import run

    return run(args.rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 kernels and model for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, compiled CUDA archs, visible GPUs, active CPU path").set_defaults(
        fn=_info
    )
    bench = sub.add_parser(
        "bench", help="microbenchmarks: dsv3 bench {gemm,grouped,quant,mla} [--help]", add_help=False
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(fn=_bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
