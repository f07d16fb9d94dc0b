"""dsv3.ep: expert-parallel communication with DeepEP's semantics (SPEC §5).

- `Buffer`: dispatch/combine (normal mode, cached dispatch, FP8 pass-through, expert alignment,
  num_worst_tokens) and low-latency dispatch/combine, over the `torch` (all_to_all_single: gloo on CPU,
  NCCL on GPU), `nvlink` (intranode CUDA IPC) or `nvshmem` (internode RDMA, low-latency) backend.
- `Config`, `EventOverlap`, `EPTimeoutError`, `get_dispatch_layout`-style `dispatch_layout`.
- `eplb`: expert-parallel load balancing (redundant experts).
- `BufferDispatcher` / `enable_buffer_expert_parallel`: the MoE layers of a dsv3 model run through a Buffer.
"""

from __future__ import annotations

from .buffer import Buffer, EventOverlap
from .config import Config
from .errors import EPTimeoutError
from .layout import dispatch_layout, dispatch_layout_reference

__all__ = [
    "Buffer",
    "Config",
    "EPTimeoutError",
    "EventOverlap",
    "dispatch_layout",
    "dispatch_layout_reference",
    "eplb",
]


def __getattr__(name: str):
    if name == "eplb":  # imported on first use: EPLB is plain torch, not needed by the buffer
        import importlib

        return importlib.import_module(".eplb", __name__)
    raise AttributeError(f"module 'dsv3.ep' has no attribute {name!r}")
