"""The trainer with expert parallelism: 2 and 4 gloo ranks, each holding its block of the tiny preset's
routed experts, through dsv3.ep.Buffer (and the pair all-to-all of dsv3.model.ep), against one process on the
same global batch (bf16): the same loss per step, the same weights after the steps (experts gathered),
per-rank checkpoints that resume, and an HF export of the whole model."""

from __future__ import annotations

import datetime
import json
import os

import pytest
import torch
from helpers import quiet, spawn_ranks, tiny_train_config
from safetensors.torch import load_file, save_file

from dsv3.ep.dispatcher import BufferDispatcher
from dsv3.model import from_pretrained
from dsv3.model.ep import AllToAllDispatcher, gather_expert_state_dict
from dsv3.train.trainer import TrainConfig, Trainer


def small(**changes) -> TrainConfig:
    return tiny_train_config(**{"steps": 2, "precision": "bf16", "expert_parallel": True, **changes})


def _ep_worker(rank: int, world: int, port: int, out: str, cache: str, backend: str) -> None:
    import torch.distributed as dist

    os.environ.update(DSV3_CACHE_DIR=cache, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        t = Trainer(small(ep_backend=backend, micro_batch=4 // (2 * world) or 1), out, log=quiet)
        per = 8 // world
        assert t.expert_parallel and t.model.model.layers[1].mlp.experts.expert_ids.tolist() == list(
            range(rank * per, (rank + 1) * per)
        )
        kind = BufferDispatcher if backend == "buffer" else AllToAllDispatcher
        assert isinstance(t.model.model.layers[1].mlp.dispatcher, kind)
        steps = [t.train_step() for _ in range(2)]
        t.save_checkpoint()
        full = gather_expert_state_dict(t.model)
        resumed = Trainer(
            small(ep_backend=backend, micro_batch=4 // (2 * world) or 1), out, resume=True, log=quiet
        )
        a, b = t.model.state_dict(), resumed.model.state_dict()
        same = resumed.step == 2 and all(torch.equal(a[k], b[k]) for k in a)
        t.export()
        if rank == 0:  # tensors through a Queue die with the sender: pass files
            save_file({k: v.contiguous() for k, v in full.items()}, f"{out}/full.safetensors")
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"steps": steps, "resumed_equal": same}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "world,backend",
    [(2, "buffer"), (2, "alltoall"), (4, "buffer")],
    ids=["2-buffer", "2-alltoall", "4-buffer"],
)
def test_expert_parallel_matches_one_process(tmp_path, world, backend):
    cache = os.environ["DSV3_CACHE_DIR"]
    torch.set_num_threads(1)
    single = Trainer(small(micro_batch=4 // (2 * world) or 1), tmp_path / "one", log=quiet)
    assert not single.expert_parallel  # one process: EP is a no-op
    steps = [single.train_step() for _ in range(2)]

    out = tmp_path / "ep"
    spawn_ranks(_ep_worker, world, str(out), cache, backend, join_s=240)

    for rank in range(world):
        res = json.loads((out / f"rank{rank}.json").read_text())
        assert [m["loss"] for m in res["steps"]] == pytest.approx([m["loss"] for m in steps], rel=1e-5)
        # the clipping norm over the whole model (expert gradients summed over ranks); bf16 noise aside
        assert [m["grad_norm"] for m in res["steps"]] == pytest.approx(
            [m["grad_norm"] for m in steps], rel=1e-3
        )
        assert res["resumed_equal"]
        ckpt = out / "checkpoints" / "step_0000002" / f"rank{rank}"
        assert {p.name for p in ckpt.iterdir()} == {
            "model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
        }
    # Weights after the steps. Under bf16 autocast an expert's weight gradient is one GEMM over the rows of
    # both ranks instead of one per micro-batch, so it differs from one process by bf16 rounding; Adam's first
    # updates are about lr·sign(g), so an element whose gradient is within that noise of zero may move the
    # other way: at most 2·lr per step. Any misplaced expert or unscaled gradient is far beyond that bound.
    bound = 2 * sum(m["lr"] for m in steps) + 1e-6
    sd = single.model.state_dict()
    full = load_file(out / "full.safetensors")
    exported = from_pretrained(out / "model", dtype=torch.float32).state_dict()
    assert full.keys() == sd.keys() and exported.keys() <= sd.keys()
    for k, v in full.items():
        assert (v.float() - sd[k].float()).abs().max() <= bound, k
        assert (v.float() - sd[k].float()).norm() <= 0.1 * sd[k].float().norm() + 1e-6, k
    for k, v in exported.items():
        assert torch.equal(v, full[k].float()), k
