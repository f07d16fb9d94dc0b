"""The DeepSeek-V3 model on dsv3's ops: `ModelConfig`, the module, and Hugging Face checkpoint loading.

model = dsv3.model.from_pretrained("path/to/hf-dir")       # BF16 or FP8 (weight_scale_inv) checkpoints
logits = model(input_ids)                                   # [b, s, vocab]
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import PRESETS, ModelConfig
from .model import DeepseekV3, build_model

__all__ = ["ModelConfig", "PRESETS", "DeepseekV3", "build_model", "from_pretrained"]


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    expert_ids: torch.Tensor | None = None,
) -> DeepseekV3:
    """Builds the model of an HF DeepSeek-V3 directory and streams its safetensors into it. `dtype` is the
    dtype of the non-FP8 weights (default: the config's torch_dtype); `expert_ids` keeps only those routed
    experts (expert parallelism: the loader then reads only their tensors)."""
    from .checkpoint import load_weights

    cfg = ModelConfig.from_pretrained(path)
    model = build_model(cfg, dtype=dtype, expert_ids=expert_ids, init=False)
    load_weights(model, path)
    return model.to(device) if device is not None else model
