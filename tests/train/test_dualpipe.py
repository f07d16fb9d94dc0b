"""DualPipe on 2 and 4 gloo CPU ranks against the non-pipelined model on the same micro-batches: the mean loss
and, after sync_stage_grads, every stage's gradients (both copies) equal plain gradient accumulation. First a
small stack of Linear+Tanh stages (also with deferred weight gradients), then the tiny dsv3 model."""

from __future__ import annotations

import dataclasses
import datetime
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import free_port
from torch import nn

from dsv3.model import ModelConfig, build_model
from dsv3.train.dualpipe import DualPipe, dualpipe_modules, split_stages

LINEAR_BATCH, LINEAR_DIM = 20, 8
DSV3_SEQ = 8


def linear_stages(num_stages: int) -> list[nn.Module]:
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(LINEAR_DIM, LINEAR_DIM), nn.Tanh()) for _ in range(num_stages - 1)]
    return [*stages, nn.Linear(LINEAR_DIM, 3)]


def linear_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(LINEAR_BATCH, LINEAR_DIM, generator=g), torch.randn(LINEAR_BATCH, 3, generator=g)


def tiny_model():
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), num_nextn_predict_layers=0, num_hidden_layers=4)
    return build_model(cfg.validate(), dtype=torch.float32, seed=3)


def tiny_data(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 2048, (batch, DSV3_SEQ + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


# (name, stages builder, data, loss, num_chunks, zero_bubble); any even num_chunks >= 2P is allowed
def cases(P: int) -> list[tuple]:
    return [
        ("linear", lambda: linear_stages(P), linear_data(), F.mse_loss, 10, False),
        ("linear_zb", lambda: linear_stages(P), linear_data(), F.mse_loss, 4 if P == 2 else 20, True),
        ("dsv3", lambda: split_stages(tiny_model(), P), tiny_data(2 * P), ce, 2 * P, False),
    ] + ([("dsv3_zb", lambda: split_stages(tiny_model(), P), tiny_data(6), ce, 6, True)] if P == 2 else [])


def reference(stages: list[nn.Module], data, loss_fn, num_chunks: int) -> tuple[float, list[dict]]:
    """Plain gradient accumulation over the micro-batches: (mean loss, per-stage {name: grad})."""
    x, y = data
    total = 0.0
    for xj, yj in zip(x.chunk(num_chunks), y.chunk(num_chunks), strict=True):
        out = xj
        for s in stages:
            out = s(out)
        loss = loss_fn(out, yj)
        (loss / num_chunks).backward()
        total += float(loss.detach()) / num_chunks
    return total, [{n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None} for s in stages]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)
    result = {}
    try:
        for name, build, (x, y), loss_fn, num_chunks, zb in cases(world):
            if name.startswith("dsv3"):
                modules = dualpipe_modules(tiny_model(), rank, world)
            else:
                stages = build()
                modules = (stages[rank], stages[world - 1 - rank])
            pipe = DualPipe(modules, zero_bubble=zb)
            ends = rank in (0, world - 1)
            loss, _ = pipe.step(x if ends else None, y if ends else None, loss_fn, num_chunks=num_chunks)
            assert (loss is not None) == ends and (loss is None or loss.shape == (num_chunks // 2,))
            mean = pipe.mean_loss(loss)
            pipe.sync_stage_grads()
            result[name] = {
                "loss": float(mean),
                "grads": [
                    {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
                    for m in modules
                ],
            }
        with torch.no_grad():  # forward only: the last stage's outputs of each direction come back
            loss, outs = pipe.step(x if ends else None, y if ends else None, loss_fn, num_chunks, True)
        if ends:
            result["eval"] = {"loss": loss, "outputs": torch.cat(outs)}
        errors = []
        for bad in (world, 2 * world + 1, 2 * world - 2):  # < 2P, odd, < 2P
            try:
                pipe.step(x if ends else None, y if ends else None, loss_fn, num_chunks=bad)
            except ValueError:
                errors.append(bad)
        result["errors"] = errors
        if world == 4:  # an odd number of ranks is refused
            g = dist.new_group([0, 1, 2])
            if rank < 3:
                try:
                    DualPipe(modules, group=g)
                except ValueError:
                    result["odd_refused"] = True
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(world: int, tmp_path) -> list[dict]:
    mp.start_processes(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_dualpipe_matches_gradient_accumulation(world, tmp_path):
    results = _run(world, tmp_path)
    for name, build, data, loss_fn, num_chunks, _zb in cases(world):
        ref_loss, ref_grads = reference(build(), data, loss_fn, num_chunks)
        for rank, res in enumerate(results):
            assert res[name]["loss"] == pytest.approx(ref_loss, rel=1e-5), (name, rank)
            for chunk, stage in ((0, rank), (1, world - 1 - rank)):  # both copies of each stage
                got, want = res[name]["grads"][chunk], ref_grads[stage]
                assert got.keys() == want.keys(), (name, rank, stage)
                for n in want:
                    torch.testing.assert_close(
                        got[n], want[n], rtol=1e-5, atol=1e-6, msg=f"{name} {stage} {n}"
                    )
    name, build, (x, y), loss_fn, num_chunks, _zb = cases(world)[-1]  # the worker's last case, evaluated
    with torch.no_grad():
        stages = build()
        outs = [torch.nn.Sequential(*stages)(xj) for xj in x.chunk(num_chunks)]
    losses = torch.stack([loss_fn(o, yj) for o, yj in zip(outs, y.chunk(num_chunks), strict=True)])
    half = num_chunks // 2
    for rank, lo in ((world - 1, 0), (0, half)):  # rank P-1 ends direction 0, rank 0 direction 1
        got = results[rank]["eval"]
        torch.testing.assert_close(got["loss"], losses[lo : lo + half], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["outputs"], torch.cat(outs[lo : lo + half]), rtol=1e-5, atol=1e-5)
    for res in results:
        assert len(res["errors"]) == 3
    if world == 4:
        assert all(results[r].get("odd_refused") for r in range(3))


def test_bad_configurations():
    model = tiny_model()
    with pytest.raises(ValueError):
        dualpipe_modules(model, 0, 3)
    with pytest.raises(ValueError):
        split_stages(model, 5)
    a, b = dualpipe_modules(model, 0, 4)
    assert a.embed_tokens is not None and a.lm_head is None and b.lm_head is not None
    assert [s.layer_range for s in split_stages(model, 4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert a.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
