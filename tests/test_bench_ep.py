"""The EP benchmark runs its three exchanges on 2 gloo processes, checks they agree (the workers assert equal
rows and combines) and writes one row per op."""

import json

from dsv3.bench import ep


def test_ep_bench_writes_rows(tmp_path):
    path = tmp_path / "ep.json"
    argv = [
        "--ranks",
        "2",
        "--tokens",
        "24",
        "--hidden",
        "256",
        "--experts",
        "16",
        "--rounds",
        "1",
        "--no-kernels",
    ]
    assert ep.main([*argv, "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["ranks"], r["op"]) for r in rows] == [(2, "dispatch"), (2, "combine")]
    assert all(r["dsv3_ms"] > 0 and r["x_per_token"] > 0 and r["bytes_per_rank"] > 0 for r in rows)


def test_kernel_rows_compare_like_with_like():
    rows = ep.kernel_rows(tokens=40, experts=32, hidden=256)
    assert [r["op"] for r in rows] == ["ep_dispatch_layout", "ep_combine_reduce"] * 2
    assert all(r["dsv3_ms"] > 0 and r["speedup"] > 0 for r in rows)
