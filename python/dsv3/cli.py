"""The `dsv3` command line: `dsv3 info`, `dsv3 bench <family>`, `dsv3 convert --to bf16|fp8 SRC DST`."""

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
        ("EP backends", _ep_backends(bool(info["cuda_archs"]))),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")
    return 0


def _ep_backends(cuda_built: bool) -> str:
    """Which dsv3.ep.Buffer backends this build holds (without loading NVSHMEM)."""
    import importlib.util

    nvshmem = importlib.util.find_spec("dsv3._C_nvshmem") is not None
    built = {"torch": True, "nvlink": cuda_built, "nvshmem": nvshmem}
    text = ", ".join(k for k, v in built.items() if v)
    missing = [k for k, v in built.items() if not v]
    return text + (f" (not built: {', '.join(missing)})" if missing else "")


def _bench(args) -> int:
    from .bench import run

    return run(args.rest)


def _convert(args) -> int:
    from .model.checkpoint import convert_checkpoint

    shards = convert_checkpoint(
        args.src, args.dst, args.to, max_shard_bytes=int(args.max_shard_gib * 2**30), progress=print
    )
    print(f"wrote {len(shards)} shard(s) to {args.dst}")
    return 0


def _train(args) -> int:
    import os

    import torch.distributed as dist

    from .train.trainer import TrainConfig, Trainer, resolve_device

    overrides = dict(
        preset=args.preset, steps=args.steps, precision=args.precision, seed=args.seed, device=args.device
    )
    if args.data:
        overrides["data"] = args.data
    if args.config:
        cfg = TrainConfig.from_file(args.config, **overrides)
    else:
        cfg = TrainConfig(**{k: v for k, v in overrides.items() if v is not None}).validate()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():  # launched by torchrun
        dist.init_process_group("nccl" if resolve_device(cfg).type == "cuda" else "gloo")
    trainer = Trainer(cfg, args.out, resume=args.resume)
    if trainer.rank == 0:
        params_m = sum(p.numel() for p in trainer.model.parameters()) / 1e6
        print(
            f"dsv3 train: {cfg.preset} model ({params_m:.2f}M "
            f"params, {cfg.precision}, {trainer.device}), {cfg.steps} steps of {cfg.global_batch} x "
            f"{cfg.seq_len} tokens, "
            f"{trainer.world} rank(s); data ready in {trainer.prep_s:.1f} s; writing {args.out}"
        )
    result = trainer.run()
    if trainer.rank == 0:
        print(f"final loss {result['final_loss']:.3f}, validation loss {result['val_loss']:.3f}")
        print(f"model: {result['export']}  metrics: {args.out}/metrics.jsonl  plot: {result['plot']}")
        for text in result["samples"]:
            print("---\n" + text)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _generate(args) -> int:
    from .infer.cli import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 kernels and model for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, compiled CUDA archs, visible GPUs, active CPU path").set_defaults(
        fn=_info
    )
    bench = sub.add_parser(
        "bench",
        help="microbenchmarks: dsv3 bench {gemm,grouped,quant,mla,route,model,train,ep} [--help]",
        add_help=False,
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(fn=_bench)
    convert = sub.add_parser("convert", help="convert an HF checkpoint between BF16 and block FP8")
    convert.add_argument("--to", choices=["bf16", "fp8"], required=True)
    convert.add_argument("--max-shard-gib", type=float, default=5.0, help="shard size limit (default 5)")
    convert.add_argument("src", help="HF checkpoint directory")
    convert.add_argument("dst", help="output directory (replaced atomically)")
    convert.set_defaults(fn=_convert)
    train = sub.add_parser("train", help="train a DeepSeek-V3 (FP8 recipe) on bundled data or your files")
    train.add_argument("--preset", default=None, help="model preset (default tiny)")
    train.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300)")
    train.add_argument("--out", default="runs/tiny", help="output directory (default runs/tiny)")
    train.add_argument("--config", default=None, help="JSON file of TrainConfig fields")
    train.add_argument("--precision", choices=["fp8", "bf16"], default=None, help="GEMM precision (fp8)")
    train.add_argument("--data", nargs="*", default=None, help="text/jsonl files or dirs (default: bundled)")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument(
        "--device",
        default=None,
        help="auto (default: cuda when dsv3 has its CUDA kernels and a GPU is visible), cpu, cuda, cuda:N",
    )
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    train.set_defaults(fn=_train)

    from .infer.cli import add_arguments

    generate = sub.add_parser("generate", help="generate text with a model directory (streamed)")
    add_arguments(generate)
    generate.set_defaults(fn=_generate)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
