"""Tests under tests/cuda run on an sm_90 GPU with dsv3's CUDA kernels built, and are skipped elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dsv3  # noqa: F401  (registers torch.ops.dsv3)

HERE = Path(__file__).resolve().parent


def cuda_kernels_usable() -> bool:
    built = bool(json.loads(torch.ops.dsv3.build_info())["cuda_archs"])
    return built and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def pytest_collection_modifyitems(config, items):
    usable = cuda_kernels_usable()
    skip = pytest.mark.skip(reason="needs an sm_90 GPU and dsv3 built with its CUDA kernels")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.cuda)
            if not usable:
                item.add_marker(skip)
