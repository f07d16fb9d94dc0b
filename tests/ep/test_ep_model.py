"""The tiny model's MoE layers expert-parallel through dsv3.ep.Buffer on 2 and 4 gloo CPU ranks, against one
process holding every expert on all ranks' tokens (fp32): logits (main and MTP), and gradients after a
backward — with contiguous expert blocks and with an EPLB placement holding redundant experts (replica
gradients summed by sync_replica_grads)."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
from helpers import spawn_ranks

from dsv3.ep.dispatcher import ExpertPlacement
from dsv3.model import ModelConfig, build_model
from dsv3.model.moe import MoE

CFG = ModelConfig.preset("tiny")
SEQ = 12


def _ids(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(40 + rank)
    return torch.randint(0, CFG.vocab_size, (1 + rank % 2, SEQ), generator=g)


def _coef(rank: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(90 + rank))


def _placement(world: int) -> ExpertPlacement:
    """EPLB on a skewed load: experts 0 and 5 are hot, so they get the extra replicas."""
    E = CFG.n_routed_experts
    load = torch.ones((3, E))
    load[:, 0], load[:, 5] = 20.0, 9.0
    return ExpertPlacement.from_load(load, E + world, CFG.n_group, 1, world)


def _loss(model, rank: int):
    ids = _ids(rank)
    h = model.hidden(ids)
    logits = model.logits(h)
    mtp = model.mtp_logits(h[:, :-1], ids[:, 1:])[1]
    return logits, mtp, (logits * _coef(rank, logits.shape)).sum() + (mtp * _coef(rank + 7, mtp.shape)).sum()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from dsv3.ep import Buffer
    from dsv3.ep.dispatcher import BufferDispatcher, enable_buffer_expert_parallel, sync_replica_grads

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        res = {}
        for name, placement in (("blocks", None), ("eplb", _placement(world))):
            model = build_model(CFG, dtype=torch.float32, seed=3)
            enable_buffer_expert_parallel(model, Buffer(), placement=placement)
            moes = [m for m in model.modules() if isinstance(m, MoE)]
            assert all(isinstance(m.dispatcher, BufferDispatcher) for m in moes)
            logits, mtp, loss = _loss(model, rank)
            loss.backward()
            if placement is not None:
                sync_replica_grads(model, placement)
            grads = {}
            for key, p in model.named_parameters():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                if "mlp.experts." not in key:  # replicated parameters: data-parallel sum
                    dist.all_reduce(g)
                grads[key] = g.clone()
            res[name] = {
                "logits": logits.detach(),
                "mtp": mtp.detach(),
                "grads": grads,
                "slots": [m.experts.expert_ids.clone() for m in moes],
            }
        torch.save(res, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_model_expert_parallel_matches_one_process(tmp_path, world):
    spawn_ranks(_worker, world, str(tmp_path), join_s=150)

    torch.set_num_threads(1)
    ref = build_model(CFG, dtype=torch.float32, seed=3)
    total = 0
    outs = []
    for r in range(world):
        logits, mtp, loss = _loss(ref, r)
        total = total + loss
        outs.append((logits.detach(), mtp.detach()))
    total.backward()
    full = dict(ref.named_parameters())
    placement = _placement(world)
    assert (placement.logcnt >= 1).all()  # every logical expert keeps a replica
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        for name in ("blocks", "eplb"):
            got = res[name]
            torch.testing.assert_close(got["logits"], outs[r][0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["mtp"], outs[r][1], rtol=1e-5, atol=1e-5)
            for key, g in got["grads"].items():
                want = full[key].grad
                if "mlp.experts." in key:  # this rank's slots: rows of the full gradient
                    layer = _moe_index(key)
                    want = want[got["slots"][layer]]
                # fp32 sums in another order: within 1e-5 of the gradient's scale (observed <= 1e-6)
                err = float((g - want).abs().max())
                assert err <= 1e-5 * float(want.abs().max()) + 1e-12, (name, key, err)
        slots = [s.tolist() for s in res["eplb"]["slots"]]
        per = (CFG.n_routed_experts + world) // world
        assert all(len(s) == per for s in slots)


def _moe_index(key: str) -> int:
    """Which MoE layer (module order: layers 1, 2, then the MTP block's) a parameter name belongs to."""
    layer = int(key.split("layers.")[1].split(".")[0])
    return layer - 1
