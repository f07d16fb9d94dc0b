"""The benchmark families compare like with like: every baseline computes what dsv3 computes (checked here on
small shapes), and each family's command writes its results."""

import json

import pytest
import torch

from dsv3 import ops
from dsv3.bench import grouped, quant


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
    path = tmp_path / "quant.json"
    assert quant.main(["--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["op"], r["shape"]) for r in rows] == [
        ("quantize_per_token_group", [3, 300]),
        ("dequantize_per_token_group", [3, 300]),
        ("quantize_per_block", [130, 200]),
        ("dequantize_per_block", [130, 200]),
    ]
    assert all(r["dsv3_gbps"] > 0 and r["speedup"] > 0 for r in rows)
