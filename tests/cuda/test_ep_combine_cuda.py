"""The sm_90a EP combine reduction (csrc/cuda/ep_combine.cu) against the CPU kernel and the reference, bit for
bit: bf16/fp16/fp32 rows, biases, -1 entries, one node and two nodes of 8."""

from __future__ import annotations

import pytest
import torch

from dsv3.ops import reference

OP = torch.ops.dsv3.ep_combine_reduce


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ranks", [1, 2, 8, 16])
@pytest.mark.parametrize("hidden", [7, 512, 7168])
def test_cuda_matches_cpu_and_reference(dtype, ranks, hidden):
    g = torch.Generator().manual_seed(ranks * 7 + hidden)
    n = 33
    in_rank = torch.rand((n, ranks), generator=g) < 0.5
    in_rank[:3] = False
    rows = int(in_rank.sum())
    row_of = torch.full((n, ranks), -1, dtype=torch.long)
    row_of[in_rank] = torch.randperm(rows, generator=g)
    x = (torch.randn((rows, hidden), generator=g) * 4).to(dtype)
    b0 = torch.randn((n, hidden), generator=g).to(dtype)
    node = 8 if ranks > 8 else ranks
    cpu = OP(x, row_of, b0, None, node)
    gpu = OP(x.cuda(), row_of.cuda(), b0.cuda(), None, node)
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(cpu, reference.ep_combine_reduce(x, row_of, b0, None, node))


def test_cuda_bad_rows():
    x = torch.zeros((4, 8), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="row_of entries"):
        OP(x, torch.full((2, 2), 4, dtype=torch.long, device="cuda"))
