"""The training loop of the DeepSeek-V3 recipe (report §3.3, §4.2) on dsv3's model and ops: FP8 (or BF16)
GEMMs with fp32 master weights, AdamW with bf16 moments, warmup → constant → cosine LR, gradient
accumulation and clipping, auxiliary-loss-free balancing plus the sequence-wise balance loss, the MTP loss,
data parallelism over torch.distributed, atomic checkpoints with bit-exact resume, and an HF-layout export.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..model import ModelConfig, build_model
from ..model import ep as ep_mod
from ..model.checkpoint import save_pretrained
from . import balancing
from .optim import AdamW, lr_at, param_groups


@dataclasses.dataclass
class TrainConfig:
    preset: str = "tiny"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # ModelConfig fields over the preset
    steps: int = 300
    seq_len: int = 128
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 8  # sequences per forward/backward on one rank (gradient accumulation below that)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    decay_start: float = 0.6  # fraction of the steps after which the cosine decay starts
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    bias_update_speed: float = 1e-3  # γ of the auxiliary-loss-free bias update
    seq_aux_alpha: float = 1e-4  # α of the sequence-wise balance loss
    mtp_lambda: float = 0.3  # λ of the MTP loss
    precision: str = "fp8"  # fp8 | bf16
    seed: int = 0
    init_std: float = 0.006
    vocab_size: int = 2048
    data: list[str] = dataclasses.field(default_factory=list)  # text/jsonl files or dirs; empty = default
    corpus_bytes: int = 4_000_000  # size of the default corpus (Python's standard library sources)
    val_sequences: int = 32
    checkpoint_every: int = 100
    keep_last: int = 2
    samples: int = 3  # continuations printed at the end
    sample_tokens: int = 48
    # Expert parallelism (world > 1): rank r holds routed experts [r·E/R, (r+1)·E/R) and MoE layers exchange
    # tokens all-to-all (dsv3.model.ep); the other parameters stay data parallel.
    expert_parallel: bool = False

    def validate(self) -> TrainConfig:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        need(self.precision in ("fp8", "bf16"), f"precision must be fp8 or bf16, got {self.precision!r}")
        need(self.steps >= 1 and self.seq_len >= 8, "steps must be >= 1 and seq_len >= 8")
        need(self.global_batch >= 1 and self.micro_batch >= 1, "batch sizes must be positive")
        need(self.warmup_steps >= 1, "warmup_steps must be >= 1")
        need(0 <= self.decay_start <= 1, "decay_start must be a fraction in [0, 1]")
        return self

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> TrainConfig:
        d = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig.from_file: unknown keys {unknown} in {path}")
        d.update({k: v for k, v in overrides.items() if v is not None})
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d).validate()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    def __init__(self, cfg: TrainConfig, out_dir: str | Path, resume: bool = False, log=print):
        from . import data as data_mod

        self.cfg, self.out, self.log = cfg.validate(), Path(out_dir), log
        self.rank, self.world = _world()
        if cfg.global_batch % (cfg.micro_batch * self.world):
            raise ValueError(
                f"TrainConfig: global_batch {cfg.global_batch} must be a multiple of micro_batch "
                f"{cfg.micro_batch} x {self.world} ranks"
            )
        self.accum = cfg.global_batch // (cfg.micro_batch * self.world)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

        t0 = time.perf_counter()
        self.data = data_mod.TrainingData.prepare(
            cfg.data,
            vocab_size=cfg.vocab_size,
            seq_len=cfg.seq_len,
            corpus_bytes=cfg.corpus_bytes,
            val_sequences=cfg.val_sequences,
            seed=cfg.seed,
        )
        self.loader = self.data.loader(cfg.global_batch, cfg.micro_batch, self.rank, self.world)
        tok = self.data.tokenizer
        model_fields = dict(
            vocab_size=tok.get_vocab_size(),
            initializer_range=cfg.init_std,
            bos_token_id=0,
            eos_token_id=1,
            max_position_embeddings=max(1024, cfg.seq_len),
        )
        model_fields.update(cfg.model)
        self.model_cfg = dataclasses.replace(ModelConfig.preset(cfg.preset), **model_fields).validate()
        self.model = build_model(self.model_cfg, dtype=torch.float32, seed=cfg.seed)  # fp32 master weights
        # -- expert parallelism (dsv3.model.ep): keep this rank's expert block of the same initial weights
        self.expert_parallel = cfg.expert_parallel and self.world > 1
        if self.expert_parallel:
            ids = ep_mod.local_expert_ids(self.model_cfg.n_routed_experts, self.rank, self.world)
            full = self.model.state_dict()
            self.model = build_model(self.model_cfg, torch.float32, expert_ids=ids, init=False)
            ep_mod.load_expert_shard(self.model, full)
            del full
        if cfg.precision == "fp8":
            from .fp8_linear import enable_fp8_training

            enable_fp8_training(self.model)
        if self.expert_parallel:
            ep_mod.enable_expert_parallel(self.model)
        # -- end expert parallelism
        self.model.train()
        self.opt = AdamW(param_groups(self.model, cfg.weight_decay), cfg.lr, cfg.betas, cfg.eps)
        self.step = 0
        self.tokens_seen = 0
        self.prep_s = time.perf_counter() - t0
        if resume:
            self.load_latest()

    # ---- one optimizer step -------------------------------------------------------------------------------

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Main next-token CE, the MTP loss (depth 1: position i predicts token i + 2 from h_i and the
        embedding of token i + 1, eq. 24-25) and the sequence-wise balance loss over every MoE layer."""
        cfg, mc = self.cfg, self.model_cfg
        with torch.autocast("cpu" if x.device.type == "cpu" else x.device.type, dtype=torch.bfloat16):
            h = self.model.hidden(x)
            logits = self.model.logits(h)
            main = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            out = {"main": main}
            if mc.num_nextn_predict_layers:
                _, mtp_logits = self.model.mtp_logits(h[:, :-1], x[:, 1:])
                out["mtp"] = F.cross_entropy(mtp_logits.float().flatten(0, 1), y[:, 1:].flatten())
        aux = torch.zeros((), device=x.device)
        for moe in balancing.moe_layers(self.model):
            if moe.gate.last_scores is not None:
                aux = aux + balancing.sequence_balance_loss(
                    moe.gate.last_scores,
                    moe.last_topk_idx,
                    x.shape[0],
                    mc.num_experts_per_tok,
                    cfg.seq_aux_alpha,
                )
        out["balance"] = aux
        out["total"] = main + cfg.mtp_lambda * out.get("mtp", 0.0) + aux
        return out

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        loads = None
        sums = {"main": 0.0, "mtp": 0.0, "balance": 0.0}
        for x, y in self.loader.next_step():
            parts = self.losses(x, y)
            (parts["total"] / self.accum).backward()
            for k in sums:
                if k in parts:
                    sums[k] += float(parts[k].detach()) / self.accum
            step_loads = balancing.expert_loads(self.model)
            loads = step_loads if loads is None else [a + b for a, b in zip(loads, step_loads, strict=True)]
        if self.world > 1:  # data parallel: average gradients (and losses for the log) over ranks
            for p in self.model.parameters():
                if p.grad is not None:
                    if not ep_mod.is_expert_parallel(p):  # rank-owned experts: summed by the all-to-all
                        dist.all_reduce(p.grad)
                    p.grad /= self.world
            t = torch.tensor([sums["main"], sums["mtp"], sums["balance"]])
            dist.all_reduce(t)
            sums = dict(zip(("main", "mtp", "balance"), (t / self.world).tolist(), strict=True))
        if self.expert_parallel:  # the norm over the whole model: expert gradients live on their ranks
            grad_norm = float(ep_mod.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        lr = lr_at(
            self.step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps, int(cfg.decay_start * cfg.steps)
        )
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        balancing.update_router_bias(self.model, loads or [], cfg.bias_update_speed)
        self.step += 1
        tokens = cfg.global_batch * cfg.seq_len
        self.tokens_seen += tokens
        dt = time.perf_counter() - t0
        imb = balancing.imbalance(loads or [])
        return {
            "step": self.step,
            "loss": sums["main"],
            "mtp_loss": sums["mtp"],
            "balance_loss": sums["balance"],
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / dt,
            "step_s": dt,
            "max_imbalance": max(imb) if imb else 1.0,
            "mean_imbalance": sum(imb) / len(imb) if imb else 1.0,
            "imbalance_per_layer": [round(x, 4) for x in imb],  # max/mean expert load, MoE layers in order
        }

    @torch.no_grad()
    def validation_loss(self) -> float:
        self.model.eval()
        losses = [
            float(self.losses(x, y)["main"]) for x, y in self.data.validation_batches(self.cfg.micro_batch)
        ]
        self.model.train()
        return sum(losses) / max(1, len(losses))

    # ---- checkpoints --------------------------------------------------------------------------------------

    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Model (fp32 masters and router biases), optimizer moments, data position, RNG: a directory written
        under a temporary name and renamed into place, so a killed save never leaves a broken checkpoint.
        With expert parallelism every rank writes its own state to `step_X/rank{r}/` (rank 0 renames the
        directory once all ranks are done)."""
        if self.rank != 0 and not self.expert_parallel:
            return self.checkpoint_dir()
        root = self.checkpoint_dir()
        final = root / f"step_{self.step:07d}"
        if self.expert_parallel:
            tmp = root / f".tmp-step_{self.step:07d}-ep"
            if self.rank == 0:
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            dist.barrier()
            d = tmp / f"rank{self.rank}"
            d.mkdir()
        else:
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".tmp-step_{self.step:07d}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            d = tmp
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, d / "model.safetensors")
        names = {id(p): n for n, p in self.model.named_parameters()}
        opt_tensors, opt_steps = {}, {}
        for group in self.opt.param_groups:
            for p in group["params"]:
                st = self.opt.state.get(p)
                if st:
                    n = names[id(p)]
                    opt_tensors[f"{n}.exp_avg"] = st["exp_avg"]
                    opt_tensors[f"{n}.exp_avg_sq"] = st["exp_avg_sq"]
                    opt_steps[n] = st["step"]
        opt_tensors["__rng_torch__"] = torch.get_rng_state()
        save_file(opt_tensors, d / "optimizer.safetensors")
        meta = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "optimizer_steps": opt_steps,
            "loader": self.loader.state_dict(),
            "python_rng": _jsonable(random.getstate()),
            "train_config": dataclasses.asdict(self.cfg),
        }
        (d / "trainer_state.json").write_text(json.dumps(meta))
        for f in d.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if self.expert_parallel:  # every rank's files are on disk before rank 0 publishes the directory
            dist.barrier()
            if self.rank != 0:
                dist.barrier()
                return final
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted(p for p in root.iterdir() if p.name.startswith("step_"))
        for old in done[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        if self.expert_parallel:
            dist.barrier()
        return final

    def latest_checkpoint(self) -> Path | None:
        root = self.checkpoint_dir()
        done = sorted(p for p in root.iterdir() if p.name.startswith("step_")) if root.exists() else []
        return done[-1] if done else None

    def load_latest(self) -> None:
        path = self.latest_checkpoint()
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.checkpoint_dir()}")
        if self.expert_parallel:  # this rank's part of an expert-parallel checkpoint
            path = path / f"rank{self.rank}"
            if not path.is_dir():
                raise FileNotFoundError(
                    f"--resume: {path} missing (not saved with this expert-parallel world)"
                )
        self.model.load_state_dict(load_file(path / "model.safetensors"))
        meta = json.loads((path / "trainer_state.json").read_text())
        opt = load_file(path / "optimizer.safetensors")
        params = dict(self.model.named_parameters())
        for n, k in meta["optimizer_steps"].items():
            self.opt.state[params[n]] = {
                "step": k,
                "exp_avg": opt[f"{n}.exp_avg"].clone(),
                "exp_avg_sq": opt[f"{n}.exp_avg_sq"].clone(),
            }
        torch.set_rng_state(opt["__rng_torch__"])
        random.setstate(_tuple(meta["python_rng"]))
        self.loader.load_state_dict(meta["loader"])
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.log(f"resumed from {path} (step {self.step})")

    # ---- the run ------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        history = _read_jsonl(metrics_path) if self.step else []
        history = [h for h in history if h.get("step", 0) <= self.step]
        if self.rank == 0:
            metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
        bar = _progress(cfg.steps, self.step, disable=self.rank != 0)
        while self.step < cfg.steps:
            m = self.train_step()
            history.append(m)
            if self.rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                bar.update(m)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        result = {"steps": self.step, "final_loss": history[-1]["loss"] if history else math.nan}
        if self.rank == 0 or self.expert_parallel:  # with EP the forward and the export are collective
            val_loss, export = self.validation_loss(), self.export()
        if self.rank == 0:
            result["val_loss"] = val_loss
            result["export"] = str(export)
            result["plot"] = _plot(history, self.out / "loss.png")
            result["samples"] = self.samples()
        return result

    def export(self) -> Path:
        """The HF-layout directory (fp32 weights, tokenizer files) that dsv3.model.from_pretrained, `dsv3
        generate` and transformers' AutoModelForCausalLM load."""
        path = self.out / "model"
        if self.expert_parallel:  # all ranks gather the experts; rank 0 writes (and samples) the full model
            state = ep_mod.gather_expert_state_dict(self.model)
            if self.rank != 0:
                return path
            self._full_model = build_model(self.model_cfg, torch.float32, init=False)
            self._full_model.load_state_dict(state)
        tok_dir = self.out / "tokenizer"
        self.data.write_tokenizer(tok_dir, model_max_length=self.model_cfg.max_position_embeddings)
        save_pretrained(getattr(self, "_full_model", self.model), path, self.model_cfg, tokenizer_dir=tok_dir)
        return path

    @torch.no_grad()
    def samples(self) -> list[str]:
        from ..infer import Generator, SamplingParams

        tok = self.data.tokenizer
        prompts = ["def ", "import ", "class "][: self.cfg.samples]
        if self.expert_parallel:  # rank 0 alone: the gathered full model of export() (fp32 compute)
            if getattr(self, "_full_model", None) is None:
                raise RuntimeError(
                    "Trainer.samples: with expert parallelism call export() first (on all ranks)"
                )
            gen = Generator(self._full_model.eval(), num_pages=64)
            outs = gen.generate(
                [tok.encode(p).ids for p in prompts],
                SamplingParams(max_new_tokens=self.cfg.sample_tokens, stop_token_ids=[1]),
            )
            return [p + tok.decode(o.tokens) for p, o in zip(prompts, outs, strict=True)]
        gen = Generator(self.model.eval(), num_pages=64)
        outs = gen.generate(
            [tok.encode(p).ids for p in prompts],
            SamplingParams(max_new_tokens=self.cfg.sample_tokens, stop_token_ids=[1]),
        )
        self.model.train()
        return [p + tok.decode(o.tokens) for p, o in zip(prompts, outs, strict=True)]


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, tuple | list) else x


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _progress:
    """A tqdm bar (tokens/s, loss, lr, expert imbalance) when tqdm is installed, else a line per 10 steps."""

    def __init__(self, total: int, initial: int, disable: bool):
        self.disable = disable
        try:
            from tqdm import tqdm

            self.bar = (
                None if disable else tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            )
        except ImportError:
            self.bar = None

    def update(self, m: dict) -> None:
        if self.disable:
            return
        text = (
            f"loss {m['loss']:.3f} mtp {m['mtp_loss']:.3f} lr {m['lr']:.2e} "
            f"{m['tokens_per_s']:.0f} tok/s imb {m['max_imbalance']:.2f}"
        )
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif m["step"] % 10 == 0 or m["step"] == 1:
            print(f"step {m['step']}: {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _plot(history: list[dict], path: Path) -> str | None:
    """loss.png (main and MTP loss against step) when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["loss"] for h in history], label="loss (next token)")
    ax.plot(steps, [h["mtp_loss"] for h in history], label="MTP loss (token after next)", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
