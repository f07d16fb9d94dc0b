"""dsv3: DeepSeek-V3 kernels (FP8 block-scaled GEMM, quantization, ...) as one PyTorch extension.

Importing dsv3 registers the `torch.ops.dsv3.*` operators (CPU kernels always; CUDA kernels when the
package was built for a GPU). The functional API lives in `dsv3.ops`, DeepGEMM-compatible entry points
in `dsv3.compat.deep_gemm`.
"""

from __future__ import annotations

import json

import torch

try:
    from . import _C  # noqa: F401  (loads the library that registers torch.ops.dsv3)
except ImportError as e:  # most often: built against another torch
    raise ImportError(
        f"dsv3's compiled extension failed to load with torch {torch.__version__}: {e}. "
        "Rebuild it against the installed torch: pip install --no-build-isolation --force-reinstall ."
    ) from e

from . import ops  # noqa: E402

__version__: str = json.loads(torch.ops.dsv3.build_info())["version"]


def build_info() -> dict:
    """What this build holds: versions, the CUDA archs compiled (empty: CPU only) and the active CPU path."""
    return json.loads(torch.ops.dsv3.build_info())


def _check_torch_version() -> None:
    built = build_info()["torch"]
    running = torch.__version__.split("+")[0]
    if built != running:
        raise ImportError(
            f"dsv3 was built against torch {built} but torch {running} is installed; the C++ ABI differs. "
            "Rebuild: pip install --no-build-isolation --force-reinstall ."
        )


_check_torch_version()

__all__ = ["__version__", "build_info", "ops"]
