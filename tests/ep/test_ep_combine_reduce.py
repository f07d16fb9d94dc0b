"""The combine's reduction kernel (torch.ops.dsv3.ep_combine_reduce, CPU) against its reference
(dsv3.ops.reference.ep_combine_reduce): bit for bit, for bf16/fp16/fp32 rows, with and without
biases, -1 entries, tokens that went nowhere, one node and several nodes (node partials rounded once); bad
inputs; Meta."""

from __future__ import annotations

import pytest
import torch

from dsv3.ops import reference


def _case(n: int, R: int, H: int, dtype: torch.dtype, biases: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    in_rank = torch.rand((n, R), generator=g) < 0.4
    in_rank[: max(n // 5, 0)] = False  # some tokens went nowhere
    send_head = torch.where(in_rank, in_rank.int().cumsum(0) - 1, torch.full((n, R), -1, dtype=torch.int32))
    rows_from = in_rank.sum(0)
    offsets = rows_from.cumsum(0) - rows_from
    x = (torch.randn((int(rows_from.sum()), H), generator=g) * 3).to(dtype)
    w = torch.rand((x.shape[0], 4), generator=g)
    bias = [torch.randn((n, H), generator=g).to(dtype) for _ in range(biases)] + [None] * (2 - biases)
    row_of = torch.where(send_head >= 0, offsets.view(1, -1) + send_head.long(), -1)
    return x, w, send_head, offsets, row_of, bias


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("R", [1, 2, 4, 8, 16, 24])
@pytest.mark.parametrize("biases", [0, 1, 2])
def test_matches_torch_sums(dtype, R, biases):
    node = 8 if R > 8 else R
    for n, H in ((0, 64), (1, 7), (37, 256)):
        x, w, send_head, offsets, row_of, bias = _case(n, R, H, dtype, biases, seed=R * 31 + n + biases)
        got = torch.ops.dsv3.ep_combine_reduce(x, row_of, bias[0], bias[1], node)
        want = reference.ep_combine_reduce(x, row_of, bias[0], bias[1], node)
        wsum = reference.ep_combine_reduce(w, row_of, None, None, R)
        assert got.dtype == dtype and got.shape == (n, H)
        assert torch.equal(got, want)
        assert torch.equal(torch.ops.dsv3.ep_combine_reduce(w, row_of, None, None, R), wsum)


def test_several_nodes_round_each_node_partial():
    # two nodes of 8: node 0 holds 1 and 2^-8, node 1 holds 2^-8. Flat fp32: 1 + 2^-7, representable in bf16.
    # Per node: node 0's 1 + 2^-8 is a bf16 tie and rounds to even (1), then 1 + 2^-8 rounds to 1 again.
    row_of = torch.full((1, 16), -1, dtype=torch.long)
    row_of[0, 0], row_of[0, 1], row_of[0, 8] = 0, 1, 2
    x = torch.tensor([[1.0], [2.0**-8], [2.0**-8]]).to(torch.bfloat16)
    two_level = torch.ops.dsv3.ep_combine_reduce(x, row_of, None, None, 8)
    flat = torch.ops.dsv3.ep_combine_reduce(x, row_of, None, None, 16)
    assert float(flat) == 1.0078125
    assert float(two_level) == 1.0


def test_bad_inputs():
    x = torch.zeros((3, 4), dtype=torch.bfloat16)
    row_of = torch.zeros((2, 2), dtype=torch.long)
    op = torch.ops.dsv3.ep_combine_reduce
    with pytest.raises(ValueError, match="row_of entries"):
        op(x, row_of + 3)
    with pytest.raises(ValueError, match="row_of entries"):
        op(x, row_of - 2)
    with pytest.raises(TypeError, match="row_of must be int64"):
        op(x, row_of.int())
    with pytest.raises(TypeError, match="x must be"):
        op(x.int(), row_of)
    with pytest.raises(ValueError, match="x must be 2-D"):
        op(x[0], row_of)
    with pytest.raises(ValueError, match="bias must be"):
        op(x, row_of, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="ranks_per_node"):
        op(x, torch.zeros((2, 12), dtype=torch.long), None, None, 8)


def test_meta_shapes():
    x = torch.empty((5, 64), dtype=torch.bfloat16, device="meta")
    out = torch.ops.dsv3.ep_combine_reduce(x, torch.empty((3, 4), dtype=torch.long, device="meta"))
    assert out.shape == (3, 64) and out.dtype == torch.bfloat16 and out.device.type == "meta"
