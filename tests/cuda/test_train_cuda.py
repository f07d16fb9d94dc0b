"""The trainer on a GPU: FP8 training on the CUDA kernels learns, starts where the CPU run starts, writes
CPU checkpoints it resumes from, and exports a model the CPU loads. (Skipped without an sm_90 GPU.)"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import quiet, tiny_train_config
from safetensors.torch import load_file

from dsv3 import ops
from dsv3.model import from_pretrained
from dsv3.train.fp8_linear import block_aligned_experts, fp8_grouped_experts, fp8_linear
from dsv3.train.trainer import Trainer


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_trainer_learns_on_the_gpu(tmp_path, precision):
    cfg = tiny_train_config(device="cuda", precision=precision, steps=12, checkpoint_every=6, warmup_steps=3)
    trainer = Trainer(cfg, tmp_path, log=quiet)
    assert trainer.device.type == "cuda"
    assert all(p.is_cuda for p in trainer.model.parameters())
    result = trainer.run()
    rows = _rows(tmp_path)
    losses = [r["loss"] for r in rows]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.2, losses  # the CPU run: 6.23 -> 5.88
    assert result["val_loss"] < losses[0]
    state = load_file(tmp_path / "checkpoints" / "step_0000012" / "model.safetensors")
    assert all(t.device.type == "cpu" for t in state.values())
    cpu_model = from_pretrained(tmp_path / "model")  # the export loads on the CPU
    assert next(cpu_model.parameters()).device.type == "cpu"


def test_first_step_matches_the_cpu(tmp_path):
    """Same seed, same weights, same batch: the first step's loss (before any update) on the GPU kernels and
    on the CPU kernels agree to FP8 GEMM accumulation differences."""
    first = {}
    for device in ("cpu", "cuda"):
        cfg = tiny_train_config(device=device, steps=1)
        trainer = Trainer(cfg, tmp_path / device, log=quiet)
        first[device] = trainer.train_step()["loss"]
    assert abs(first["cuda"] - first["cpu"]) <= 2e-3 * abs(first["cpu"]), first


def test_resume_on_the_gpu(tmp_path):
    """6 steps straight against 3 steps, a checkpoint and 3 resumed steps: same step count and losses (to
    the run-to-run differences of GPU attention backward)."""
    cfg = tiny_train_config(device="cuda", steps=6, checkpoint_every=3)
    Trainer(cfg, tmp_path / "straight", log=quiet).run()
    Trainer(dataclasses.replace(cfg, steps=3), tmp_path / "resumed", log=quiet).run()
    Trainer(cfg, tmp_path / "resumed", resume=True, log=quiet).run()
    a = [r["loss"] for r in _rows(tmp_path / "straight")]
    b = [r["loss"] for r in _rows(tmp_path / "resumed")]
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3 * abs(a[0]), (a, b)


def test_fp8_linear_gradients_match_the_cpu():
    """FP8 Fprop/Dgrad/Wgrad on the GPU kernels against the CPU kernels on the same operands."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 256, generator=g)
    w = torch.randn(384, 256, generator=g) * 0.05
    dy = torch.randn(300, 384, generator=g)
    out = {}
    for device in ("cpu", "cuda"):
        xd = x.to(device).requires_grad_()
        wd = w.to(device).requires_grad_()
        y = fp8_linear(xd, wd)
        y.backward(dy.to(device))
        out[device] = [t.detach().float().cpu() for t in (y, xd.grad, wd.grad)]
    for name, c, r in zip(("y", "dx", "dw"), out["cuda"], out["cpu"], strict=True):
        diff = 1 - 2 * (c.double() * r.double()).sum() / (c.double().square() + r.double().square()).sum()
        assert diff < 1e-5, (name, float(diff))


def test_bench_train_quick_on_the_gpu(tmp_path):
    from dsv3.bench import train as bench_train

    path = tmp_path / "train.json"
    assert bench_train.main(["--quick", "--device", "cuda", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["meta"]["device"] == "cuda"
    steps = [r for r in data["rows"] if r["case"] in ("fwd_bwd", "train_step")]
    assert len(steps) == 2 and all(r["dsv3_fp8_tokens_per_s"] > 0 for r in steps)


def test_routed_experts_on_the_gpu_match_the_cpu():
    """FP8TrainExperts on a GPU runs the block-aligned layout (the sm_90 grouped kernel's); outputs and
    gradients against the CPU kernels on the unpadded rows."""
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([130, 0, 7, 256, 1])
    m_indices = torch.repeat_interleave(torch.arange(len(counts)), counts).int()
    x = torch.randn(len(m_indices), 256, generator=g)
    ws = [torch.randn(len(counts), *s, generator=g) * 0.05 for s in ((384, 256), (384, 256), (256, 384))]
    dy = torch.randn(x.shape, generator=g)
    out = {}
    for device, fn in (("cpu", fp8_grouped_experts), ("cuda", block_aligned_experts)):
        xd = x.to(device).requires_grad_()
        wd = [w.to(device).requires_grad_() for w in ws]
        y = fn(xd, m_indices.to(device), *wd)
        y.backward(dy.to(device))
        out[device] = [t.detach().float().cpu() for t in (y, xd.grad, *(w.grad for w in wd))]
    for c, r in zip(out["cuda"], out["cpu"], strict=True):
        assert ops.calc_diff(c, r) < 1e-5
