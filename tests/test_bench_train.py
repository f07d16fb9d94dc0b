"""The training benchmark: its quick run writes positive step rates for every implementation, the optimizer
state is measured at 4 bytes per parameter for dsv3's bf16 moments and 8 for torch's AdamW, and dsv3's bf16
step computes transformers' loss on the same weights and batch (MTP and balance terms left out)."""

from __future__ import annotations

import json

import pytest
import torch

from dsv3.bench import train as bench_train


def test_quick_run_writes_rows(tmp_path, capsys):
    pytest.importorskip("transformers")
    path = tmp_path / "train.json"
    assert bench_train.main(["--quick", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["meta"]["device"] == "cpu"
    rows = data["rows"]
    steps = {r["case"]: r for r in rows if r["case"] in ("fwd_bwd", "train_step")}
    assert set(steps) == {"fwd_bwd", "train_step"}
    for r in steps.values():
        assert r["tokens"] == 2 * 32
        for name in bench_train.IMPLS:
            assert r[f"{name}_tokens_per_s"] > 0, (r["case"], name)
        assert all(v > 0 for v in r["speedup"].values())
        assert "dsv3_bf16/transformers_bf16" in r["speedup"] and "dsv3_fp8/transformers_bf16" in r["speedup"]

    mem = {r["impl"]: r for r in rows if r["case"] == "optimizer_state"}
    assert mem["dsv3 AdamW"]["moment_bytes_per_param"] == 4.0
    assert mem["torch AdamW"]["moment_bytes_per_param"] == 8.0
    for r in mem.values():
        assert r["master_bytes_per_param"] == 4.0 and r["grad_bytes_per_param"] == 4.0
    assert mem["dsv3 AdamW"]["params"] > mem["torch AdamW"]["params"]  # dsv3 also holds the MTP layer

    loss = next(r for r in rows if r["case"] == "loss")
    assert loss["rel_diff_bf16"] < 1e-2 and loss["rel_diff_fp8"] < 1e-2
    out = capsys.readouterr().out
    assert "like for like" in out and ">= 1.5x" in out


def test_bf16_step_loss_equals_transformers():
    """dsv3's bf16 training loss (main CE only) is transformers' bf16-autocast CE: same weights, same
    function; the MTP term is what dsv3 adds on top."""
    pytest.importorskip("transformers")
    sides, cfg, _ = bench_train.build_sides("tiny")
    x, y = bench_train.make_batch(cfg, 2, 24, seed=7)
    parts = sides["dsv3_bf16"].losses(x, y, mtp=False)
    assert set(parts) == {"main", "balance", "total"}
    with torch.no_grad():
        ref = sides["transformers_bf16"].loss(x, y)
        ref32 = sides["transformers_fp32"].loss(x, y)
    main = float(parts["main"].detach())
    assert main == pytest.approx(float(ref), rel=1e-2)
    assert main == pytest.approx(float(ref32), rel=1e-2)
    assert 0 < float(parts["balance"].detach()) < 1e-3  # α = 1e-4: the only other term
    assert "mtp" in sides["dsv3_bf16"].losses(x, y, mtp=True)


@pytest.mark.parametrize("device", ["gpu", "mps"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"]))
def test_bad_device_is_refused(device, capsys):
    with pytest.raises(SystemExit):
        bench_train.main(["--quick", "--json", "", "--device", device])
    assert f"--device {device}" in capsys.readouterr().err
