"""The benchmark families compare like with like: every baseline computes what dsv3 computes (checked here on
small shapes), and each family's command writes its results."""

import json

import pytest
import torch

from dsv3 import ops
from dsv3.bench import grouped, mla, quant
from dsv3.ops import reference


def _close(x: torch.Tensor, y: torch.Tensor) -> None:
    assert ops.calc_diff(x.float(), y.float()) < 1e-5


def test_grouped_contiguous_baseline_matches():
    _, flops, fns = grouped.contiguous_case(3, 5, 256, 384, "cpu")
    _close(fns["dsv3"](), torch.cat(fns["torch"]()))
    assert flops == 2.0 * 15 * 256 * 384


def test_grouped_masked_baseline_matches():
    _, _, fns = grouped.masked_case(3, 8, 256, 384, "cpu")
    out, ref = fns["dsv3"](), fns["torch"]()
    for g, r in enumerate(ref):
        _close(out[g, : r.shape[0]], r)


@pytest.mark.parametrize("ks", [[256], [128, 0, 256]])
def test_wgrad_baselines_match(ks):
    _, _, fns = grouped.wgrad_case(64, 96, ks, "cpu")
    out, ref = fns["dsv3"](), fns["torch"]()
    out = out.unsqueeze(0) if len(ks) == 1 else out
    for g, r in enumerate(ref):
        _close(out[g], r)


def test_quant_bench_writes_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(quant, "ACTIVATIONS", [(3, 300)])
    monkeypatch.setattr(quant, "WEIGHTS", [(130, 200)])
    monkeypatch.setattr(quant, "TOKEN_MAJOR", [(150, 70)])
    path = tmp_path / "quant.json"
    assert quant.main(["--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["op"], r["shape"]) for r in rows] == [
        ("quantize_per_token_group", [3, 300]),
        ("dequantize_per_token_group", [3, 300]),
        ("quantize_per_block", [130, 200]),
        ("dequantize_per_block", [130, 200]),
        ("quantize_per_token_group t.t()", [70, 150]),
    ]
    assert all(r["dsv3_gbps"] > 0 and r["speedup"] > 0 for r in rows)


@pytest.mark.parametrize("causal, fp8", [(False, False), (True, False), (False, True)])
def test_mla_baselines_match(causal, fp8):
    """torch (the reference) and torch_bf16 compute dsv3's attention: the reference within SPEC §4's
    tolerances; torch_bf16 rounds its scores to bf16 (torch has no bf16 x bf16 -> fp32 matmul on CPU), so by
    calc_diff."""
    fns, nbytes, flops = mla.make_case(3, 2, 150, 8, 2, 64, 48, causal, fp8, "cpu", torch.bfloat16)
    out, lse = fns["dsv3"]()
    for name in ("torch", "torch_bf16"):
        ref_out, ref_lse = fns[name]()
        assert ref_out.dtype == out.dtype and ref_lse.shape == lse.shape
        _close(out, ref_out)
        _close(lse, ref_lse)
    torch.testing.assert_close(lse, fns["torch"]()[1], rtol=8.01 / 65536, atol=1e-6)
    total_keys = 150 + 152 + 154
    token_bytes = ops.mla_fp8_token_bytes(64, 48) if fp8 else 2 * 64
    assert nbytes == total_keys * 2 * token_bytes + 2 * (3 * 2 * 8 * 64 + 3 * 2 * 8 * 48)
    assert flops == 2.0 * 2 * total_keys * 8 * (64 + 48)


def test_mla_torch_bf16_handles_empty_and_causal_rows():
    """Rows that see no key (an empty request; causal tokens before the first key): out 0, lse +inf."""
    lens = torch.tensor([0, 1, 70], dtype=torch.int32)
    block_table = torch.tensor([[5, 9], [3, 9], [0, 1]], dtype=torch.int32)  # 9: past the cache, unused
    kv = torch.randn(6, 64, 1, 64, dtype=torch.bfloat16)
    q = torch.randn(3, 2, 4, 64, dtype=torch.bfloat16)
    out, lse = mla.torch_bf16(q, kv, block_table, lens, 48, 2, causal=True)
    ref_out, ref_lse = reference.mla_decode(q, kv, block_table, lens, 48, causal=True)
    assert torch.equal(lse.isinf(), ref_lse.isinf()) and lse.isinf().sum() == 4 * 3
    _close(out, ref_out)


def test_mla_bench_quick_writes_rows(tmp_path, monkeypatch):
    fp8_case = next(c for c in mla.CASES if c[0] == "v3 fp8 kv")
    monkeypatch.setattr(mla, "CASES", [("tiny", 2, 2, 256, 8, 1, 64, 48, True, False), fp8_case])
    path = tmp_path / "mla.json"
    assert mla.main(["--quick", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["case"], r["s_k"], r["fp8_kv"]) for r in rows] == [
        ("tiny", 64, False),
        ("v3 fp8 kv", 512, True),
    ]
    for r in rows:
        assert r["dsv3_gbps"] > 0 and r["dsv3_gflops"] > 0 and r["memory_bandwidth_gbps"] > 0
        assert set(r["speedup"]) == {"torch", "torch_bf16"} and all(v > 0 for v in r["speedup"].values())
