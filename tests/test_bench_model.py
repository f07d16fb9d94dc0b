"""The model benchmark: its quick run writes positive rates, dsv3's float32 greedy tokens equal transformers'
and MTP speculative decoding's; the cache-size arithmetic; and without transformers it reports dsv3 alone."""

from __future__ import annotations

import json

import pytest

from dsv3.bench import model as bench_model
from dsv3.model import ModelConfig


def test_cache_bytes_arithmetic():
    v3 = bench_model.cache_bytes(ModelConfig.preset("v3-671b"))
    assert v3["latent_bf16"] == (512 + 64) * 2 == 1152
    assert v3["latent_fp8"] == 512 + 4 * 4 + 64 * 2 == 656
    assert v3["per_head_bf16"] == 128 * (192 + 128) * 2 == 81920
    assert v3["ratio_bf16"] == pytest.approx(81920 / 1152)
    tiny = bench_model.cache_bytes(ModelConfig.preset("tiny"))
    assert tiny["latent_bf16"] == (64 + 16) * 2 and tiny["per_head_bf16"] == 4 * (48 + 32) * 2


def test_agreement():
    assert bench_model.agreement([[1, 2], [3, 4]], [[1, 2], [3, 4]]) == 1.0
    assert bench_model.agreement([[1, 2], [3, 4]], [[1, 0], [3, 4]]) == 0.75


def _rows(path):
    data = json.loads(path.read_text())
    assert data["meta"]["device"] == "cpu"
    return {(r["case"], r.get("preset")): r for r in data["rows"]}


def test_quick_run_writes_rows(tmp_path, capsys):
    pytest.importorskip("transformers")
    path = tmp_path / "model.json"
    assert bench_model.main(["--quick", "--json", str(path)]) == 0
    rows = _rows(path)
    assert set(rows) == {
        ("prefill", None),
        ("generate", None),
        ("speculative", None),
        ("cache_bytes", "tiny"),
        ("cache_bytes", "v3-671b"),
    }
    pre, gen, spec = rows["prefill", None], rows["generate", None], rows["speculative", None]
    assert pre["tokens"] == 2 * 16 and gen["generated_tokens"] == 2 * 8
    for r, keys in (
        (pre, ["dsv3_tokens_per_s", "transformers_tokens_per_s", "speedup"]),
        (gen, ["dsv3_tokens_per_s", "dsv3_decode_tokens_per_s", "transformers_tokens_per_s", "speedup"]),
        (spec, ["dsv3_tokens_per_s", "dsv3_decode_tokens_per_s", "speedup_vs_plain"]),
    ):
        assert all(r[k] > 0 for k in keys), (r["case"], {k: r[k] for k in keys})
    assert gen["greedy_agreement"] == 1.0 and gen["greedy_equal"]
    assert spec["equal_to_plain"] and 0.0 <= spec["acceptance_rate"] <= 1.0
    assert rows["cache_bytes", "v3-671b"]["per_head_bf16"] == 81920
    out = capsys.readouterr().out
    assert "target >= 3x" in out and "greedy agreement 1.000" in out and "randomly initialized" in out


def test_without_transformers_reports_dsv3_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_model, "load_transformers", lambda: None)
    path = tmp_path / "model.json"
    argv = ["--quick", "--batch", "1", "--json", str(path)]
    assert bench_model.main(argv) == 0
    rows = _rows(path)
    assert not any(k.startswith("transformers") for r in rows.values() for k in r)
    gen = rows["generate", None]
    assert gen["generated_tokens"] == 1 * 8 and gen["dsv3_tokens_per_s"] > 0 and "speedup" not in gen
    assert "transformers is not installed: dsv3 only" in capsys.readouterr().out
