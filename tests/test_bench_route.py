"""The router benchmark compares like with like (dsv3 and its torch baseline route identically) and writes
its rows."""

import json

import torch

from dsv3.bench import route


def test_route_baseline_matches():
    fns = route.make_case(37, "cpu")
    (idx, weights), (ref_idx, ref_weights) = fns["dsv3"](), fns["torch"]()
    assert torch.equal(idx, ref_idx) and torch.equal(weights, ref_weights)


def test_route_bench_writes_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(route, "TOKENS", [1, 5])
    path = tmp_path / "route.json"
    assert route.main(["--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["tokens"], r["experts"]) for r in rows] == [(1, 256), (5, 256)]
    assert all(r["dsv3_us"] > 0 and r["speedup"] > 0 for r in rows)
