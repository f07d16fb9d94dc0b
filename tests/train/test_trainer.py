"""The trainer end to end on tiny runs: losses and metrics, bit-exact resume, a crash during a checkpoint
write, the HF export (dsv3 and transformers load it and agree), 2-rank data parallelism against one process,
and (slow, DSV3_RUN_SLOW=1) FP8 against BF16 over the demo's steps."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port, quiet, tiny_train_config
from safetensors.torch import load_file, save_file

from dsv3.model import from_pretrained
from dsv3.train import trainer as trainer_mod
from dsv3.train.trainer import TrainConfig, Trainer


def small(**changes) -> TrainConfig:
    return tiny_train_config(**changes)


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_run_writes_metrics_checkpoints_export(tmp_path, precision):
    result = Trainer(small(precision=precision), tmp_path, log=quiet).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss", "lr", "tokens_per_s", "max_imbalance", "mtp_loss"} <= set(r) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] and result["final_loss"] == rows[-1]["loss"]
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_0000002", "step_0000004"]  # keep_last = 2
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "model" / "tokenizer.json").exists()
    assert len(result["samples"]) == 1


def test_mtp_loss_offsets(tmp_path, monkeypatch):
    """MTP depth 1 (eqs. 21-25): position i gets h_i and the embedding of token i + 1 and is scored against
    token i + 2; the total is main + λ·MTP + balance."""
    t = Trainer(small(), tmp_path, log=quiet)
    x, y = t.loader.next_step()[0]
    seen = {}
    real = t.model.mtp_logits

    def spy(h, next_ids, *args, **kwargs):
        seen["h"], seen["next"] = h.detach(), next_ids
        seen["out"] = real(h, next_ids, *args, **kwargs)
        return seen["out"]

    monkeypatch.setattr(t.model, "mtp_logits", spy)
    parts = t.losses(x, y)
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    assert torch.equal(seen["next"], x[:, 1:])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = t.model.hidden(x)
    assert torch.allclose(seen["h"].float(), h[:, :-1].float(), atol=1e-2)
    logits = seen["out"][1].float()
    expect = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, 1:].flatten())
    assert float(parts["mtp"]) == pytest.approx(float(expect), rel=1e-6)
    total = parts["main"] + t.cfg.mtp_lambda * parts["mtp"] + parts["balance"]
    assert float(parts["total"]) == pytest.approx(float(total), rel=1e-6)
    assert float(parts["balance"]) > 0


def test_resume_is_bit_exact(tmp_path):
    straight = Trainer(small(steps=4), tmp_path / "a", log=quiet)
    straight.run()
    Trainer(small(steps=2), tmp_path / "b", log=quiet).run()
    resumed = Trainer(small(steps=4), tmp_path / "b", resume=True, log=quiet)
    assert resumed.step == 2
    resumed.run()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_crash_during_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    t = Trainer(small(steps=2, checkpoint_every=1), tmp_path, log=quiet)
    t.train_step()
    first = t.save_checkpoint()
    t.train_step()
    real = trainer_mod.save_file
    calls = []

    def dying(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # the optimizer file of the second checkpoint
            raise OSError("disk full")
        real(tensors, path)

    monkeypatch.setattr(trainer_mod, "save_file", dying)
    with pytest.raises(OSError, match="disk full"):
        t.save_checkpoint()
    assert t.latest_checkpoint() == first
    monkeypatch.setattr(trainer_mod, "save_file", real)
    again = Trainer(small(steps=2, checkpoint_every=1), tmp_path, resume=True, log=quiet)
    assert again.step == 1


def test_export_loads_in_dsv3_and_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    t = Trainer(small(steps=2, precision="bf16"), tmp_path, log=quiet)
    t.run()
    ours = from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    assert tok.decode(tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"


def _dp_worker(rank: int, world: int, port: int, out: str, cache: str, q) -> None:
    import datetime

    import torch.distributed as dist

    os.environ.update(DSV3_CACHE_DIR=cache, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.makedirs(out, exist_ok=True)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        t = Trainer(small(steps=2, precision="bf16"), out, log=quiet)
        losses = [t.train_step()["loss"] for _ in range(2)]
        if rank == 0:  # tensors through a Queue die with the sender: pass a file
            state = {k: v.contiguous() for k, v in t.model.state_dict().items()}
            save_file(state, f"{out}/rank0.safetensors")
        q.put((rank, losses))
    finally:
        dist.destroy_process_group()


def test_two_rank_data_parallel_matches_one_process(tmp_path):
    cache = os.environ["DSV3_CACHE_DIR"]
    torch.set_num_threads(1)
    single = Trainer(small(steps=2, precision="bf16"), tmp_path / "one", log=quiet)
    losses = [single.train_step()["loss"] for _ in range(2)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    out = str(tmp_path / "dp")
    procs = [ctx.Process(target=_dp_worker, args=(r, 2, port, out, cache, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    for rank in (0, 1):
        assert results[rank] == pytest.approx(losses, rel=1e-5)
    sd = single.model.state_dict()
    for k, v in load_file(f"{out}/rank0.safetensors").items():
        assert torch.allclose(v.float(), sd[k].float(), rtol=1e-4, atol=1e-6), k


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DSV3_RUN_SLOW") != "1", reason="DSV3_RUN_SLOW=1: six demo-length runs")
def test_fp8_final_loss_within_one_percent_of_bf16(tmp_path):
    """The demo's run (default config) in FP8 and in BF16 for three seeds: the mean validation losses within
    1%. One seed is not enough: at this size a run's final loss moves by ~1-2% with the seed (or with the
    thread count, which changes fp32 summation orders), more than FP8 moves it (docs/TRAINING.md)."""
    cfg = TrainConfig(device="cpu")
    val = {"fp8": [], "bf16": []}
    for seed in (0, 1, 2):
        for precision in val:
            run = dataclasses.replace(cfg, precision=precision, seed=seed)
            val[precision].append(Trainer(run, tmp_path / f"{precision}{seed}", log=quiet).run()["val_loss"])
    fp8, bf16 = (sum(v) / len(v) for v in (val["fp8"], val["bf16"]))
    assert abs(fp8 - bf16) <= 0.01 * bf16, val


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:-1", "mps", ""])
def test_bad_device_names_the_argument(device):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        small(device=device)


def test_device_resolution(monkeypatch):
    """ "auto" is the CPU here; CUDA is refused with the reason (no GPU visible, a CPU-only dsv3 build,
    DualPipe) and "auto" falls back to the CPU in each of those cases."""
    import dsv3

    resolve = trainer_mod.resolve_device
    assert resolve(small(device="cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve(small(device="auto")) == torch.device("cpu")
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        resolve(small(device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    info = dict(dsv3.build_info(), cuda_archs=[])
    monkeypatch.setattr(dsv3, "build_info", lambda: info)
    assert resolve(small(device="auto")) == torch.device("cpu")
    with pytest.raises(ValueError, match="built without its CUDA kernels"):
        resolve(small(device="cuda:0"))
    info["cuda_archs"] = ["sm_90a"]
    dualpipe = small(pipeline="dualpipe", global_batch=8, micro_batch=2)
    assert resolve(dataclasses.replace(dualpipe, device="auto")) == torch.device("cpu")
    with pytest.raises(ValueError, match="dualpipe' runs on CPU ranks only"):
        resolve(dataclasses.replace(dualpipe, device="cuda"))
