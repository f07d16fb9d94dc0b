"""Expert parallelism over torch.distributed (gloo, CPU processes): AllToAllDispatcher against LocalDispatcher
on the full expert set (forward bit for bit, backward to 1e-6) with a rank that receives nothing, a rank with
no tokens and tokens whose experts are all remote; the tiny model loaded per rank from one HF checkpoint
against one process; a peer that never joins raises the group's timeout instead of hanging."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
from helpers import spawn_ranks

from dsv3.model import ModelConfig, build_model
from dsv3.model.checkpoint import save_pretrained
from dsv3.model.ep import (
    AllToAllDispatcher,
    enable_expert_parallel,
    gather_expert_state_dict,
    is_expert_parallel,
    load_expert_shard,
    local_expert_ids,
)
from dsv3.model.moe import Experts, LocalDispatcher, MoE

CFG = ModelConfig.preset("tiny")
E, K = CFG.n_routed_experts, CFG.num_experts_per_tok


# ---- the one-layer problem, built identically in the workers and the reference ------------------------


def _tokens(world: int) -> list[int]:
    return [5, 0, 7, 3][:world] if world == 4 else [6, 5]


def _experts(dtype: torch.dtype, expert_ids: torch.Tensor | None = None) -> Experts:
    g = torch.Generator().manual_seed(1)
    ex = Experts(CFG, expert_ids)
    with torch.no_grad():
        for name in Experts.PROJECTIONS:
            full = torch.randn((E, *getattr(ex, name).shape[1:]), generator=g) * 0.05
            rows = full if expert_ids is None else full[expert_ids]
            getattr(ex, name).data = rows.to(dtype)
    return ex


def _problem(rank: int, world: int, dtype: torch.dtype):
    """Per-rank tokens, routing (never to the last rank's experts: that rank receives nothing; rank 0's
    first tokens only to other ranks' experts), weights and the output gradient."""
    g = torch.Generator().manual_seed(100 + rank)
    t = _tokens(world)[rank]
    x = torch.randn(t, CFG.hidden_size, generator=g).to(dtype)
    allowed = E - E // world  # the last rank's block is never chosen
    idx = (
        torch.stack([torch.randperm(allowed, generator=g)[:K] for _ in range(t)]) if t else torch.zeros(0, K)
    )
    idx = idx.long()
    if rank == 0 and t:
        idx[:2] = torch.tensor([E // world, E // world + 1])  # both experts remote
    w = torch.rand(t, K, generator=g)
    dy = torch.randn(t, CFG.hidden_size, generator=g)
    return x, idx, w, dy


def _layer_case(rank: int, world: int, dtype: torch.dtype, backward: bool, dispatcher) -> dict:
    experts = _experts(dtype, local_expert_ids(E, rank, world) if dispatcher is not None else None)
    x, idx, w, dy = _problem(rank, world, dtype)
    x.requires_grad_(backward)
    w.requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        y = dispatcher(x, idx, w, experts)
    out = {"y": y.detach()}
    if backward:
        (y.float() * dy).sum().backward()
        out["dx"], out["dw"] = x.grad, w.grad
        for name in Experts.PROJECTIONS:
            out[f"d{name}"] = getattr(experts, name).grad
    return out


def _reference(world: int, dtype: torch.dtype, backward: bool) -> list[dict]:
    """One process, every expert, all ranks' tokens concatenated; results split back per rank."""
    experts = _experts(dtype)
    parts = [_problem(r, world, dtype) for r in range(world)]
    x = torch.cat([p[0] for p in parts]).requires_grad_(backward)
    w = torch.cat([p[2] for p in parts]).requires_grad_(backward)
    idx, dy = torch.cat([p[1] for p in parts]), torch.cat([p[3] for p in parts])
    with torch.set_grad_enabled(backward):
        y = LocalDispatcher()(x, idx, w, experts)
    if backward:
        (y.float() * dy).sum().backward()
    per = E // world
    res, start = [], 0
    for r, t in enumerate(_tokens(world)):
        d = {"y": y.detach()[start : start + t]}
        if backward:
            d["dx"], d["dw"] = x.grad[start : start + t], w.grad[start : start + t]
            for name in Experts.PROJECTIONS:
                d[f"d{name}"] = getattr(experts, name).grad[r * per : (r + 1) * per]
        res.append(d)
        start += t
    return res


def _tiny_ids(rank: int) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7 + rank))


# ---- workers ------------------------------------------------------------------------------------------


def _init(rank: int, world: int, port: int, timeout_s: float) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )


def _worker(rank: int, world: int, port: int, out: str, ckpt: str | None) -> None:
    import torch.distributed as dist

    _init(rank, world, port, 30)
    try:
        results = {}
        dispatcher = AllToAllDispatcher(num_experts=E)
        for dtype in (torch.float32, torch.bfloat16):
            for key, v in _layer_case(rank, world, dtype, dtype == torch.float32, dispatcher).items():
                results[f"{dtype}.{key}"] = v
        with torch.no_grad():  # -1 entries: those pairs contribute nothing
            x, idx, w, _ = _problem(rank, world, torch.float32)
            experts = _experts(torch.float32, local_expert_ids(E, rank, world))
            masked = idx.clone()
            masked[::2, 1] = -1
            results["masked.y"] = dispatcher(x, masked, w, experts)
        if ckpt is not None:  # the tiny model, experts loaded per rank from one HF checkpoint
            from dsv3.model import from_pretrained

            model = from_pretrained(ckpt, dtype=torch.float32, expert_ids=local_expert_ids(E, rank, world))
            enable_expert_parallel(model.eval())
            moes = [m for m in model.modules() if isinstance(m, MoE)]
            results["n_ep_layers"] = torch.tensor(
                [sum(isinstance(m.dispatcher, AllToAllDispatcher) for m in moes), len(moes)]
            )
            results["n_marked"] = torch.tensor(sum(is_expert_parallel(p) for p in model.parameters()))
            ids = _tiny_ids(rank)
            with torch.no_grad():
                h = model.hidden(ids)
                results["logits"] = model.logits(h)
                results["mtp_logits"] = model.mtp_logits(h[:, :-1], ids[:, 1:])[1]
            full = gather_expert_state_dict(model)
            if rank == 0:
                torch.save(full, f"{out}/gathered.pt")
        torch.save(results, f"{out}/rank{rank}.pt")
        if ckpt is not None:
            _absent_peer(rank, out)
    finally:
        dist.destroy_process_group()


def _absent_peer(rank: int, out: str) -> None:
    """On a fresh group with a 2 s timeout, rank 1 never joins the exchange: rank 0 must raise."""
    import torch.distributed as dist

    group = dist.new_group(timeout=datetime.timedelta(seconds=2))
    done = f"{out}/absent_peer.txt"
    if rank == 0:
        x, idx, w, _ = _problem(0, 2, torch.float32)
        experts = _experts(torch.float32, local_expert_ids(E, 0, 2))
        t0 = time.monotonic()
        try:
            AllToAllDispatcher(group, num_experts=E)(x, idx, w, experts)
            msg = "no error"
        except (RuntimeError, dist.DistError) as e:  # DistBackendError is a RuntimeError
            msg = f"raised {type(e).__name__}"
        with open(done + ".tmp", "w") as f:
            f.write(f"{msg} after {time.monotonic() - t0:.1f}s")
        os.replace(done + ".tmp", done)
    else:  # stays alive without joining until rank 0 has its answer
        deadline = time.monotonic() + 30
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.05)
    os._exit(0)  # skip tearing down groups that saw a timeout


def _check_layer(world: int, res: list[dict]) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        ref = _reference(world, dtype, dtype == torch.float32)
        for r in range(world):
            got, want = res[r], ref[r]
            y = got[f"{dtype}.y"]
            assert y.dtype == dtype and y.shape == want["y"].shape
            assert torch.equal(y, want["y"]), (dtype, r)  # bit for bit: row-independent expert math
            if dtype == torch.float32:
                for key in ("dx", "dw", "dgate_proj", "dup_proj", "ddown_proj"):
                    g = got[f"{dtype}.{key}"]
                    if want[key] is None or not want[key].abs().any():  # the rank that receives nothing
                        assert g is None or not g.abs().any(), (key, r)
                    else:
                        assert torch.allclose(g, want[key], rtol=1e-6, atol=1e-6), (key, r)
    experts = _experts(torch.float32)
    for r in range(world):
        x, idx, w, _ = _problem(r, world, torch.float32)
        keep = torch.ones_like(idx, dtype=torch.bool)
        keep[::2, 1] = False
        want = torch.zeros(x.shape)
        for t in range(len(x)):  # one token at a time, only the kept pairs, in expert order
            sel = idx[t][keep[t]]
            o = torch.argsort(sel, stable=True)
            want[t] = LocalDispatcher()(x[t : t + 1], sel[o][None], w[t][keep[t]][o][None], experts)[0]
        assert torch.allclose(res[r]["masked.y"], want, rtol=1e-6, atol=1e-7), r


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank run: the layer cases, the tiny model from one HF checkpoint, the absent peer."""
    tmp = tmp_path_factory.mktemp("ep2")
    full = build_model(CFG, dtype=torch.float32, seed=3).eval()
    save_pretrained(full, tmp / "hf", CFG)
    exitcodes = spawn_ranks(_worker, 2, str(tmp), str(tmp / "hf"), join_s=90, check_exit=False)
    return tmp, full, exitcodes


def test_two_ranks_layer_matches_one_process(two_ranks):
    tmp, _, exitcodes = two_ranks
    assert exitcodes == [0, 0]
    _check_layer(2, [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)])


def test_two_ranks_tiny_model_matches_one_process(two_ranks):
    tmp, full, exitcodes = two_ranks
    assert exitcodes == [0, 0]
    res = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]

    n_moe = CFG.num_hidden_layers - CFG.first_k_dense_replace + CFG.num_nextn_predict_layers
    ids = torch.cat([_tiny_ids(r) for r in range(2)])
    with torch.no_grad():
        h = full.hidden(ids)
        logits, mtp = full.logits(h), full.mtp_logits(h[:, :-1], ids[:, 1:])[1]
    for r in range(2):
        assert res[r]["n_ep_layers"].tolist() == [n_moe, n_moe]
        assert int(res[r]["n_marked"]) == 3 * n_moe
        torch.testing.assert_close(res[r]["logits"], logits[2 * r : 2 * r + 2], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res[r]["mtp_logits"], mtp[2 * r : 2 * r + 2], rtol=1e-6, atol=1e-6)
    gathered = torch.load(tmp / "gathered.pt", weights_only=True)
    sd = full.state_dict()
    assert gathered.keys() == sd.keys() and all(torch.equal(gathered[k], sd[k]) for k in sd)


def test_four_ranks_layer_matches_one_process(tmp_path):
    assert spawn_ranks(_worker, 4, str(tmp_path), None, join_s=90, check_exit=False) == [0, 0, 0, 0]
    _check_layer(4, [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(4)])


def test_absent_peer_raises_timeout_instead_of_hanging(two_ranks):
    tmp, _, exitcodes = two_ranks
    assert exitcodes == [0, 0]  # neither process hung (the run is joined with a deadline)
    msg = (tmp / "absent_peer.txt").read_text()
    assert msg.startswith("raised"), msg
    assert float(msg.split()[-1].removesuffix("s")) < 20, msg


def test_local_expert_ids_and_validation():
    assert local_expert_ids(8, 1, 4).tolist() == [2, 3]
    assert local_expert_ids(8, 0, 1).tolist() == list(range(8))
    with pytest.raises(ValueError, match="multiple of"):
        local_expert_ids(8, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        local_expert_ids(8, 2, 2)
    with pytest.raises(RuntimeError, match="not initialized"):
        AllToAllDispatcher(num_experts=8)
    model = build_model(CFG, dtype=torch.float32, expert_ids=local_expert_ids(E, 1, 2), init=False)
    full = build_model(CFG, dtype=torch.float32, seed=5)
    load_expert_shard(model, full.state_dict())
    name = "model.layers.1.mlp.experts.up_proj"
    assert torch.equal(model.state_dict()[name], full.state_dict()[name][4:])
