"""What the CUDA backends share: a typed view of their byte buffer (`Buffer.get_local_buffer_tensor`)."""

from __future__ import annotations

import torch

__all__ = ["byte_buffer_view"]


def byte_buffer_view(buffer: torch.Tensor, dtype: torch.dtype, size=None, offset: int = 0) -> torch.Tensor:
    """The uint8 `buffer` from byte `offset` viewed as `dtype`, optionally reshaped to `size`."""
    if offset < 0 or offset % dtype.itemsize or offset > buffer.numel():
        raise ValueError(f"offset must be in [0, {buffer.numel()}] and aligned to {dtype.itemsize}")
    view = buffer[offset:]
    view = view[: view.numel() // dtype.itemsize * dtype.itemsize].view(dtype)
    if size is None:
        return view
    numel = 1
    for d in size:
        numel *= d
    if numel > view.numel():
        raise ValueError(f"size {tuple(size)} needs {numel} elements; the buffer holds {view.numel()}")
    return view[:numel].view(*size)
