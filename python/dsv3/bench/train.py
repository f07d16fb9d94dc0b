"""Training benchmark: one training step of the tiny preset, dsv3 against Hugging Face transformers'
`DeepseekV3ForCausalLM` loaded from the same checkpoint (same config, same weights), side by side in one
process.

One step = forward + loss + backward, timed without and with the optimizer step (gradient clipping at 1.0,
AdamW, zero_grad), on a fixed batch of random token ids (batch x seq-len tokens per step).

Implementations:
  dsv3 fp8         the trainer's recipe: fp32 masters, `enable_fp8_training` (FP8 Fprop/Dgrad/Wgrad for the
                   attention and expert projections), bf16 autocast, dsv3's AdamW (bf16 moments)
  dsv3 bf16        the same without FP8: bf16 autocast over the fp32 masters
  transformers     fp32, and under CPU bf16 autocast; torch.optim.AdamW (fp32 moments, fused=False)
dsv3's loss is the trainer's (`Trainer.losses`): next-token CE + 0.3 x MTP CE + the sequence-wise balance
loss. transformers has no MTP layer, so dsv3 is timed with the MTP loss (what the trainer runs) and without
it (main CE + balance loss: the like-for-like rows, same function as transformers' up to the 1e-4 balance
term). Ratios dsv3 / transformers are reported for those pairs: bf16 vs transformers bf16 autocast, fp8 vs
transformers bf16 autocast (and vs fp32).

Also: optimizer-state bytes per parameter measured from the state tensors after one step (dsv3's bf16
moments vs torch's fp32 moments; the fp32 master and gradient counted separately), and the loss of the first
step on each side (dsv3's main CE against transformers' CE on the same batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from dsv3.model import ModelConfig, build_model
from dsv3.model.checkpoint import save_pretrained
from dsv3.train.fp8_linear import enable_fp8_training
from dsv3.train.optim import AdamW, param_groups
from dsv3.train.trainer import TrainConfig, Trainer

from .common import environment_line, load_transformers, write_json
from .timing import time_side_by_side

TARGET = 1.5  # SPEC §8: model train step on the tiny preset >= 1.5x transformers' fwd+bwd tokens/s
IMPLS = (
    "dsv3_fp8_mtp",
    "dsv3_fp8",
    "dsv3_bf16_mtp",
    "dsv3_bf16",
    "transformers_fp32",
    "transformers_bf16",
)
LABELS = {
    "dsv3_fp8_mtp": "dsv3 fp8 + MTP loss",
    "dsv3_fp8": "dsv3 fp8, no MTP",
    "dsv3_bf16_mtp": "dsv3 bf16 + MTP loss",
    "dsv3_bf16": "dsv3 bf16, no MTP",
    "transformers_fp32": "transformers fp32",
    "transformers_bf16": "transformers bf16 autocast",
}
# (dsv3, transformers) pairs whose loss is the same function (no MTP on either side).
PAIRS = (
    ("dsv3_bf16", "transformers_bf16"),
    ("dsv3_fp8", "transformers_bf16"),
    ("dsv3_bf16", "transformers_fp32"),
    ("dsv3_fp8", "transformers_fp32"),
)


class Dsv3Side:
    """A dsv3 model with fp32 masters, the trainer's loss and dsv3's AdamW (trainer hyper-parameters)."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, tcfg: TrainConfig, fp8: bool):
        self.model = enable_fp8_training(model) if fp8 else model
        self.model.train()
        self.tcfg = tcfg
        self.opt = AdamW(param_groups(self.model, tcfg.weight_decay), tcfg.lr, tcfg.betas, tcfg.eps)
        # Trainer.losses reads only .cfg, .model_cfg and .model: the trainer's exact loss, without its data.
        self.with_mtp = SimpleNamespace(cfg=tcfg, model_cfg=cfg, model=self.model)
        no_mtp = dataclasses.replace(cfg, num_nextn_predict_layers=0)
        self.without_mtp = SimpleNamespace(cfg=tcfg, model_cfg=no_mtp, model=self.model)

    def losses(self, x: torch.Tensor, y: torch.Tensor, mtp: bool) -> dict[str, torch.Tensor]:
        # Routing scores of a layer the step does not run (the MTP layer's, from an earlier step with MTP)
        # must not enter the balance loss.
        for m in self.model.modules():
            if hasattr(m, "last_scores"):
                m.last_scores = None
        return Trainer.losses(self.with_mtp if mtp else self.without_mtp, x, y)

    def step(self, x: torch.Tensor, y: torch.Tensor, mtp: bool, optimizer: bool) -> float:
        self.model.zero_grad(set_to_none=True)
        loss = self.losses(x, y, mtp)["total"]
        loss.backward()
        if optimizer:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


class HFSide:
    """transformers' model (fp32 parameters), next-token CE, torch.optim.AdamW with the same hyper-parameters
    and weight-decay groups."""

    def __init__(self, model: torch.nn.Module, tcfg: TrainConfig, autocast: bool):
        self.model = model.train()
        self.tcfg = tcfg
        self.autocast = autocast
        self.device_type = next(model.parameters()).device.type
        groups = param_groups(self.model, tcfg.weight_decay)
        self.opt = torch.optim.AdamW(groups, lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps, fused=False)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(input_ids=x, use_cache=False).logits
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def step(self, x: torch.Tensor, y: torch.Tensor, optimizer: bool) -> float:
        self.model.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        loss.backward()
        if optimizer:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def optimizer_state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Bytes per parameter of what an optimizer step keeps, read from the tensors themselves (after a step):
    the moments (state tensors shaped like their parameter), every state tensor (moments plus scalars such
    as torch's per-tensor `step`), the master weights and the gradients (taken before zero_grad)."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    moments = total = 0
    for p in params:
        for v in opt.state.get(p, {}).values():
            if torch.is_tensor(v):
                b = v.numel() * v.element_size()
                total += b
                if v.shape == p.shape:
                    moments += b
    masters = sum(p.numel() * p.element_size() for p in params)
    return {
        "params": n,
        "moment_bytes_per_param": moments / n,
        "state_bytes_per_param": total / n,
        "master_bytes_per_param": masters / n,
    }


def grad_bytes_per_param(model: torch.nn.Module) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None) / sum(
        p.numel() for p in params
    )


def _load_hf(auto, path: str) -> torch.nn.Module:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no MTP layer in transformers: it warns about its weights
    try:
        return auto.from_pretrained(path, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)


def build_sides(preset: str, device: str = "cpu") -> tuple[dict, ModelConfig, list[str]]:
    """dsv3 fp8, dsv3 bf16 and (when installed) transformers fp32 / bf16-autocast sides, every one holding
    its own copy of the same weights (one saved checkpoint, loaded by both libraries), on `device`."""
    cfg = dataclasses.replace(ModelConfig.preset(preset), torch_dtype="float32").validate()
    tcfg = TrainConfig(preset=preset)
    notes: list[str] = []
    auto = load_transformers()
    if auto is None:
        notes.append("transformers is not installed: dsv3 only (pip install transformers for the baseline)")
    base = build_model(cfg, dtype=torch.float32, seed=0)
    sides: dict = {}
    with tempfile.TemporaryDirectory(prefix="dsv3-bench-train-") as tmp:
        save_pretrained(base, tmp, cfg)
        if auto is not None:
            sides["transformers_fp32"] = HFSide(_load_hf(auto, tmp).to(device), tcfg, autocast=False)
            sides["transformers_bf16"] = HFSide(_load_hf(auto, tmp).to(device), tcfg, autocast=True)
    state = base.state_dict()
    copy = build_model(cfg, dtype=torch.float32, init=False)
    copy.load_state_dict(state)
    sides["dsv3_bf16"] = Dsv3Side(base.to(device), cfg, tcfg, fp8=False)
    sides["dsv3_fp8"] = Dsv3Side(copy.to(device), cfg, tcfg, fp8=True)
    return sides, cfg, notes


def make_batch(cfg: ModelConfig, batch: int, seq_len: int, seed: int = 1234, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, cfg.vocab_size, (batch, seq_len + 1), generator=g).to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def step_fns(sides: dict, x, y, optimizer: bool) -> dict[str, Callable[[], float]]:
    fns: dict[str, Callable[[], float]] = {}
    for name in IMPLS:
        if name.startswith("dsv3"):
            side = sides[name.removesuffix("_mtp")]
            mtp = name.endswith("_mtp")
            fns[name] = lambda s=side, m=mtp: s.step(x, y, m, optimizer)
        elif name in sides:
            fns[name] = lambda s=sides[name]: s.step(x, y, optimizer)
    return fns


def run_bench(
    preset: str, batch: int, seq_len: int, quick: bool, device: str = "cpu"
) -> tuple[list[dict], list[str]]:
    """Returns (rows, notes). Every row is a dict with a "case" key. Every step ends by reading its loss
    back (float), so on a GPU the timings cover the finished step."""
    sides, cfg, notes = build_sides(preset, device)
    x, y = make_batch(cfg, batch, seq_len, device=device)
    have_hf = "transformers_fp32" in sides
    rows: list[dict] = []

    # ---- the first step's losses (before any weight update), and the optimizer state after one step -----
    losses: dict[str, dict[str, float]] = {}
    for name in ("dsv3_bf16", "dsv3_fp8"):
        side = sides[name]
        parts = side.losses(x, y, mtp=True)
        parts["total"].backward()
        losses[name] = {k: float(v.detach()) for k, v in parts.items()}
        grads = grad_bytes_per_param(side.model)
        side.opt.step()
        side.opt.zero_grad(set_to_none=True)
        mem = optimizer_state_bytes(side.model, side.opt)
        if name == "dsv3_bf16":
            row = {"case": "optimizer_state", "impl": "dsv3 AdamW", **mem, "grad_bytes_per_param": grads}
            rows.append(row)
    if have_hf:
        for name in ("transformers_fp32", "transformers_bf16"):
            side = sides[name]
            loss = side.loss(x, y)
            loss.backward()
            losses[name] = {"main": float(loss.detach())}
            grads = grad_bytes_per_param(side.model)
            side.opt.step()
            side.opt.zero_grad(set_to_none=True)
            if name == "transformers_fp32":
                mem = optimizer_state_bytes(side.model, side.opt)
                rows.append(
                    {"case": "optimizer_state", "impl": "torch AdamW", **mem, "grad_bytes_per_param": grads}
                )
    row = {"case": "loss", "losses": losses}
    if have_hf:
        ref = losses["transformers_bf16"]["main"]
        row["rel_diff_bf16"] = abs(losses["dsv3_bf16"]["main"] - ref) / abs(ref)
        row["rel_diff_fp8"] = abs(losses["dsv3_fp8"]["main"] - ref) / abs(ref)
        row["rel_diff_fp32"] = abs(losses["dsv3_bf16"]["main"] - losses["transformers_fp32"]["main"]) / abs(
            losses["transformers_fp32"]["main"]
        )
    rows.append(row)

    # ---- step timing, without and with the optimizer step --------------------------------------------------
    timing = dict(min_rounds=1, max_rounds=1, target_s=0.0) if quick else dict(min_rounds=3, target_s=3.0)
    tokens = batch * seq_len
    for optimizer in (False, True):
        times = time_side_by_side(step_fns(sides, x, y, optimizer), **timing)
        row = {
            "case": "train_step" if optimizer else "fwd_bwd",
            "optimizer": optimizer,
            "batch": batch,
            "seq_len": seq_len,
            "tokens": tokens,
            "times": times,
        }
        row.update({f"{n}_tokens_per_s": tokens / t["median_s"] for n, t in times.items()})
        if have_hf:
            row["speedup"] = {
                f"{a}/{b}": times[b]["median_s"] / times[a]["median_s"] for a, b in PAIRS if b in times
            }
            # Best round against best round: less sensitive to other processes on a shared machine.
            row["speedup_min"] = {
                f"{a}/{b}": times[b]["min_s"] / times[a]["min_s"] for a, b in PAIRS if b in times
            }
            row["target_speedup"] = TARGET
        rows.append(row)
    notes.append(
        "like for like: the 'no MTP' dsv3 rows (main CE + the 1e-4 sequence-wise balance loss) against "
        "transformers (main CE); transformers has no MTP layer, the '+ MTP loss' rows are what the trainer "
        "runs"
    )
    return rows, notes


def print_table(rows: list[dict], notes: list[str], args) -> None:
    steps = {r["case"]: r for r in rows if r["case"] in ("fwd_bwd", "train_step")}
    fb, ts = steps["fwd_bwd"], steps["train_step"]
    head = (
        f"{f'tokens/s ({args.batch} x {args.seq_len})':<28} | {'fwd+bwd':>9} {'+ optimizer':>11} | "
        f"{'ms/step':>7} {'+ opt':>7}"
    )
    print(head)
    print("-" * len(head))
    for name in IMPLS:
        key = f"{name}_tokens_per_s"
        if key in fb:
            ms = [r["times"][name]["median_s"] * 1e3 for r in (fb, ts)]
            print(f"{LABELS[name]:<28} | {fb[key]:>9.0f} {ts[key]:>11.0f} | {ms[0]:>7.1f} {ms[1]:>7.1f}")
    if "speedup" in fb:
        print()
        head = (
            f"{'dsv3 / transformers (like for like)':<48} | {'fwd+bwd':>8} {'+ optimizer':>11} | "
            f"{'best-round ratios':>17} | target"
        )
        print(head)
        print("-" * len(head))
        for a, b in PAIRS:
            k = f"{a}/{b}"
            print(
                f"{f'{LABELS[a]} / {LABELS[b]}':<48} | {fb['speedup'][k]:>7.2f}x "
                f"{ts['speedup'][k]:>10.2f}x | {fb['speedup_min'][k]:>7.2f}x "
                f"{ts['speedup_min'][k]:>8.2f}x | >= {TARGET}x"
            )
    print()
    head = (
        f"{'bytes / parameter':<16} | {'moments':>7} {'all state':>9} {'master':>6} {'grad':>4} | "
        f"{'total':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["case"] == "optimizer_state":
            total = r["state_bytes_per_param"] + r["master_bytes_per_param"] + r["grad_bytes_per_param"]
            print(
                f"{r['impl']:<16} | {r['moment_bytes_per_param']:>7.2f} {r['state_bytes_per_param']:>9.4f} "
                f"{r['master_bytes_per_param']:>6.1f} {r['grad_bytes_per_param']:>4.1f} | {total:>5.2f}"
            )
    loss = next(r for r in rows if r["case"] == "loss")
    print()
    parts = []
    for name, d in loss["losses"].items():
        extra = f" (mtp {d['mtp']:.4f}, balance {d['balance']:.2e})" if "mtp" in d else ""
        parts.append(f"{LABELS.get(name, name).split(',')[0]} {d['main']:.4f}{extra}")
    print("first-step next-token loss: " + "; ".join(parts))
    if "rel_diff_bf16" in loss:
        print(
            f"relative difference to transformers bf16: dsv3 bf16 {loss['rel_diff_bf16']:.1e}, "
            f"dsv3 fp8 {loss['rel_diff_fp8']:.1e}; dsv3 bf16 vs transformers fp32 {loss['rel_diff_fp32']:.1e}"
        )
    for n in notes:
        print(f"note: {n}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv3 bench train", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="ModelConfig preset (default tiny)")
    p.add_argument("--batch", type=int, help="sequences per step (default 8, --quick 2)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 128, --quick 32)")
    p.add_argument("--json", default="bench-results/train.json", help="where to write the results")
    p.add_argument("--quick", action="store_true", help="batch 2, 32 tokens, 1 round (a smoke run)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    args = p.parse_args(argv)
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        p.error(f"--device {args.device}: use cpu, or cuda[:N] with a visible GPU")
    for name, default, quick in (("batch", 8, 2), ("seq_len", 128, 32)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    t0 = time.perf_counter()
    rows, notes = run_bench(args.preset, args.batch, args.seq_len, args.quick, args.device)
    print(environment_line(f"preset {args.preset}", device=args.device))
    print_table(rows, notes, args)
    print(f"({time.perf_counter() - t0:.0f} s)")
    write_json(args.json, args.device, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
