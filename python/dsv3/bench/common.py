"""What every benchmark family shares: the results file with the run's metadata."""

from __future__ import annotations

import json
import os
import platform

import torch

import dsv3


def write_json(path: str | None, device: str, rows: list[dict]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {
        "dsv3": dsv3.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "build": dsv3.build_info(),
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"results: {path}")


def load_transformers():
    """transformers' AutoModelForCausalLM, or None when transformers is not installed."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    return AutoModelForCausalLM


def transformers_version() -> str:
    """'transformers X.Y.Z', or a note that it is not installed (the model benches then run dsv3 only)."""
    try:
        import transformers
    except ImportError:
        return "transformers not installed"
    return f"transformers {transformers.__version__}"


def environment_line(*extra: str, device: str = "cpu") -> str:
    """The first line of the model benches' output: versions, device, threads, then `extra`."""
    where = "cpu" if device == "cpu" else torch.cuda.get_device_name(torch.device(device))
    parts = [f"dsv3 {dsv3.__version__}", f"torch {torch.__version__}", transformers_version(), where]
    return ", ".join([*parts, f"{torch.get_num_threads()} threads", *extra])
