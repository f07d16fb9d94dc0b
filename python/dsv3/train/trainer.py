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
import re
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
from .dualpipe import DualPipe, dualpipe_modules
from .optim import AdamW, lr_at, param_groups


@dataclasses.dataclass
class TrainConfig:
    preset: str = "tiny"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # ModelConfig fields over the preset
    steps: int = 300
    seq_len: int = 128
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 8  # sequences per forward/backward on one rank (gradient accumulation below that)
    lr: float = 1e-3
    min_lr: float = 1e-4
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
    # Expert parallelism (world > 1): rank r holds routed experts [r·E/R, (r+1)·E/R) and the MoE layers send
    # tokens to them; the other parameters stay data parallel. ep_backend "buffer": dsv3.ep.Buffer's
    # dispatch/combine (each token once per rank); "alltoall": the (token, expert)-pair all-to-all of
    # dsv3.model.ep.
    expert_parallel: bool = False
    ep_backend: str = "buffer"
    # Pipeline parallelism: "none" or "dualpipe" (dsv3.train.dualpipe). With "dualpipe" all ranks (an even
    # number >= 2) form one pipeline and there is no data parallelism: rank r trains stages r and P-1-r of
    # the model, ranks 0 and P-1 feed the whole global batch cut into global_batch / micro_batch micro-batches
    # (even, >= 2 x ranks). The schedule carries the main next-token loss only: the MTP loss and the
    # sequence-wise balance loss are off (mtp_lambda and seq_aux_alpha are ignored; the metrics log
    # mtp_loss = balance_loss = 0.0); the auxiliary-loss-free bias update stays on. Incompatible with
    # expert_parallel.
    pipeline: str = "none"
    # Where the model trains: "cpu", "cuda" (cuda:LOCAL_RANK under torchrun, else the current device),
    # "cuda:N", or "auto": cuda when torch sees a GPU and dsv3 holds its CUDA kernels, else cpu. Data batches
    # are moved there; checkpoints are written from and read back to it (CPU tensors on disk). DualPipe runs
    # on CPU ranks (gloo) only: "auto" picks cpu for it.
    device: str = "auto"

    def validate(self) -> TrainConfig:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        need(self.precision in ("fp8", "bf16"), f"precision must be fp8 or bf16, got {self.precision!r}")
        need(self.steps >= 1 and self.seq_len >= 8, "steps must be >= 1 and seq_len >= 8")
        need(self.global_batch >= 1 and self.micro_batch >= 1, "batch sizes must be positive")
        need(self.warmup_steps >= 1, "warmup_steps must be >= 1")
        need(0 <= self.decay_start <= 1, "decay_start must be a fraction in [0, 1]")
        # -- DualPipe: the checks that do not depend on the world (Trainer checks the ranks)
        need(
            self.ep_backend in ("buffer", "alltoall"),
            f"ep_backend must be buffer|alltoall, got {self.ep_backend!r}",
        )
        need(self.pipeline in ("none", "dualpipe"), f"pipeline must be none|dualpipe, got {self.pipeline!r}")
        need(
            self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device) is not None,
            f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        if self.pipeline == "dualpipe":
            need(not self.expert_parallel, "pipeline='dualpipe' is incompatible with expert_parallel")
            chunks = self.global_batch // self.micro_batch
            need(
                self.global_batch % self.micro_batch == 0 and chunks % 2 == 0,
                f"pipeline='dualpipe' needs global_batch / micro_batch (the number of micro-batches) to be "
                f"an even integer, got global_batch {self.global_batch} / micro_batch {self.micro_batch}",
            )
        # -- end DualPipe
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


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The device `cfg.device` names on this process (see TrainConfig.device). Raises ValueError when it
    cannot be used: no CUDA device visible, a dsv3 build without CUDA kernels, or DualPipe on a GPU."""
    import dsv3

    has_kernels = bool(dsv3.build_info()["cuda_archs"])
    name = cfg.device
    if name == "auto":
        usable = torch.cuda.is_available() and has_kernels and cfg.pipeline != "dualpipe"
        name = "cuda" if usable else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"TrainConfig: device {cfg.device!r}, but torch sees no CUDA device")
    if not has_kernels:
        raise ValueError(
            f"TrainConfig: device {cfg.device!r}, but dsv3 was built without its CUDA kernels (CPU-only "
            f"build: reinstall with DSV3_CUDA=on)"
        )
    if cfg.pipeline == "dualpipe":
        raise ValueError("TrainConfig: pipeline='dualpipe' runs on CPU ranks only (device='cpu')")
    dev = torch.device(name)
    if dev.index is None:
        local = os.environ.get("LOCAL_RANK")
        dev = torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise ValueError(f"TrainConfig: device {dev} but torch sees {torch.cuda.device_count()} CUDA devices")
    torch.cuda.set_device(dev)
    return dev


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    def __init__(self, cfg: TrainConfig, out_dir: str | Path, resume: bool = False, log=print):
        from . import data as data_mod

        self.cfg, self.out, self.log = cfg.validate(), Path(out_dir), log
        self.rank, self.world = _world()
        self.device = resolve_device(self.cfg)
        # -- DualPipe: one pipeline over all ranks, no data parallelism (see TrainConfig.pipeline)
        self.dualpipe = cfg.pipeline == "dualpipe"
        if self.dualpipe:
            _check_dualpipe_world(cfg)
        # -- end DualPipe
        if not self.dualpipe and cfg.global_batch % (cfg.micro_batch * self.world):
            raise ValueError(
                f"TrainConfig: global_batch {cfg.global_batch} must be a multiple of micro_batch "
                f"{cfg.micro_batch} x {self.world} ranks"
            )
        self.accum = cfg.global_batch // (cfg.micro_batch * (1 if self.dualpipe else self.world))
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
        # DualPipe: every rank draws the whole global batch (rank 0 of 1) so all loaders stay in step
        loader_rank, loader_world = (0, 1) if self.dualpipe else (self.rank, self.world)
        self.loader = self.data.loader(cfg.global_batch, cfg.micro_batch, loader_rank, loader_world)
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
        self.model.to(self.device)  # initialised on the CPU: the same seeded weights on every device
        if cfg.precision == "fp8":
            from .fp8_linear import enable_fp8_training

            enable_fp8_training(self.model)
        if self.expert_parallel and cfg.ep_backend == "buffer":
            from ..ep import Buffer
            from ..ep.dispatcher import enable_buffer_expert_parallel

            self.ep_buffer = Buffer()
            enable_buffer_expert_parallel(self.model, self.ep_buffer)
        elif self.expert_parallel:
            ep_mod.enable_expert_parallel(self.model)
        # -- end expert parallelism
        # -- DualPipe: rank r keeps deep copies of stages r and P-1-r of the same seeded model (the MTP layer
        # is not pipelined); self.model becomes ModuleList(chunk 0, chunk 1), what the optimizer and the
        # checkpoints see. Each chunk computes under the trainer's bf16 autocast (forward only, as losses()).
        if self.dualpipe:
            self.pipe = DualPipe(dualpipe_modules(self.model, self.rank, self.world))
            for chunk in self.pipe.module:
                chunk.forward = _bf16_autocast(chunk.forward)
            self.model = self.pipe.module
            for moe in balancing.moe_layers(self.model):
                moe.load_accumulator = torch.zeros(self.model_cfg.n_routed_experts)
        # -- end DualPipe
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

    def _optimizer_step(self) -> float:
        """Sets this step's learning rate, applies AdamW and clears the gradients; returns the rate."""
        cfg = self.cfg
        lr = lr_at(
            self.step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps, int(cfg.decay_start * cfg.steps)
        )
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return lr

    def train_step(self) -> dict[str, float]:
        if self.dualpipe:
            return self._dualpipe_train_step()
        cfg = self.cfg
        t0 = time.perf_counter()
        loads = None
        sums = {"main": 0.0, "mtp": 0.0, "balance": 0.0}
        for x, y in self.loader.next_step():
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
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
            t = torch.tensor([sums["main"], sums["mtp"], sums["balance"]], device=self.device)
            dist.all_reduce(t)
            sums = dict(zip(("main", "mtp", "balance"), (t / self.world).tolist(), strict=True))
        if self.expert_parallel:  # the norm over the whole model: expert gradients live on their ranks
            grad_norm = float(ep_mod.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        lr = self._optimizer_step()
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

    # -- DualPipe -------------------------------------------------------------------------------------------

    def _dualpipe_train_step(self) -> dict[str, float]:
        """One optimizer step under DualPipe: the schedule over global_batch / micro_batch micro-batches,
        the two copies of each stage summed (sync_stage_grads), clipping by the norm over every stage once
        (chunk 0 of every rank), AdamW on both chunks, and the bias update from each stage's loads summed over
        its two copies (the same update on both, so the copies stay identical)."""
        cfg, P = self.cfg, self.world
        t0 = time.perf_counter()
        micro = self.loader.next_step()  # every rank advances its loader; ranks 0 and P-1 feed the batch
        ends = self.rank in (0, P - 1)
        x = torch.cat([m[0] for m in micro]) if ends else None
        y = torch.cat([m[1] for m in micro]) if ends else None
        moes = [balancing.moe_layers(chunk) for chunk in self.model]
        for moe in moes[0] + moes[1]:
            moe.load_accumulator.zero_()
        losses, _ = self.pipe.step(x, y, _main_ce, num_chunks=self.accum)
        main = float(self.pipe.mean_loss(losses))
        self.pipe.sync_stage_grads()
        # the global norm counts each stage once: chunk 0 of rank r is stage r
        norms = [p.grad.detach().norm() for p in self.model[0].parameters() if p.grad is not None]
        sq = torch.stack(norms).pow(2).sum() if norms else torch.zeros(())
        dist.all_reduce(sq)
        grad_norm = float(sq.sqrt())
        coef = min(1.0, cfg.grad_clip / (grad_norm + 1e-6))
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
        lr = self._optimizer_step()
        # expert loads of each stage over the whole batch: this copy's plus the partner's copy
        mine = [torch.stack([m.load_accumulator for m in ms]) if ms else torch.zeros(0, 0) for ms in moes]
        flat = torch.cat([mine[0].flatten(), mine[1].flatten()])
        theirs = torch.empty_like(flat)
        if flat.numel():
            peer = self.pipe.partner  # its chunk 0 is our chunk 1's stage and vice versa
            reqs = [dist.isend(flat, peer, tag=_LOAD_TAG), dist.irecv(theirs, peer, tag=_LOAD_TAG)]
            for r in reqs:
                r.wait()
        n1 = mine[1].numel()
        totals = [mine[0] + theirs[n1:].view_as(mine[0]), mine[1] + theirs[:n1].view_as(mine[1])]
        with torch.no_grad():
            for k in (0, 1):
                for moe, load in zip(moes[k], totals[k], strict=True):
                    bias = moe.gate.e_score_correction_bias
                    bias += cfg.bias_update_speed * torch.sign(load.mean() - load).to(bias.device, bias.dtype)
        stage_loads = [None] * P  # every stage's loads, in layer order, for the imbalance metrics
        dist.all_gather_object(stage_loads, list(totals[0]))
        loads = [load for stage in stage_loads for load in stage]
        self.step += 1
        tokens = cfg.global_batch * cfg.seq_len
        self.tokens_seen += tokens
        dt = time.perf_counter() - t0
        imb = balancing.imbalance(loads)
        return {
            "step": self.step,
            "loss": main,
            "mtp_loss": 0.0,  # off under DualPipe (the schedule carries the main loss only)
            "balance_loss": 0.0,  # off under DualPipe
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / dt,
            "step_s": dt,
            "max_imbalance": max(imb) if imb else 1.0,
            "mean_imbalance": sum(imb) / len(imb) if imb else 1.0,
            "imbalance_per_layer": [round(x, 4) for x in imb],
        }

    def _dualpipe_full_model(self) -> torch.nn.Module | None:
        """Collective: rank 0 rebuilds the whole DeepseekV3 from chunk 0 of every rank (stage r lives there)
        and returns it (None on the other ranks). The MTP layer is not trained under DualPipe: it keeps the
        seeded initial weights."""
        stage = self.model[0]
        state = {k: v.detach().cpu() for k, v in stage.state_dict().items()}
        gathered = [None] * self.world if self.rank == 0 else None
        dist.gather_object((stage.layer_range, state), gathered, dst=0)
        if self.rank != 0:
            return None
        full = build_model(self.model_cfg, torch.float32, seed=self.cfg.seed)
        mapped = {}
        for (start, _end), sd in gathered:
            for k, v in sd.items():
                head, _, rest = k.partition(".")
                if head == "layers":
                    i, _, rest = rest.partition(".")
                    mapped[f"model.layers.{start + int(i)}.{rest}"] = v
                elif head in ("embed_tokens", "norm"):
                    mapped[f"model.{k}"] = v
                else:  # lm_head, rotary
                    mapped[k] = v
        missing, unexpected = full.load_state_dict(mapped, strict=False)
        n = self.model_cfg.num_hidden_layers
        stray = [k for k in missing if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= n)]
        if unexpected or stray:
            raise RuntimeError(f"DualPipe export: unexpected {unexpected[:5]}, missing {stray[:5]}")
        return full

    # -- end DualPipe

    @torch.no_grad()
    def validation_loss(self) -> float:
        if self.dualpipe:  # rank 0, on the full model gathered by export()
            if getattr(self, "_full_model", None) is None:
                raise RuntimeError("Trainer.validation_loss: with DualPipe call export() first (all ranks)")
            m = self._full_model.eval()
            losses = []
            for x, y in self.data.validation_batches(self.cfg.micro_batch):
                with torch.autocast(x.device.type, dtype=torch.bfloat16):
                    losses.append(float(_main_ce(m(x), y)))
            return sum(losses) / max(1, len(losses))
        self.model.eval()
        dev = self.device
        losses = [
            float(self.losses(x.to(dev), y.to(dev))["main"])
            for x, y in self.data.validation_batches(self.cfg.micro_batch)
        ]
        self.model.train()
        return sum(losses) / max(1, len(losses))

    # ---- checkpoints --------------------------------------------------------------------------------------

    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Model (fp32 masters and router biases), optimizer moments, data position, RNG: a directory written
        under a temporary name and renamed into place, so a killed save never leaves a broken checkpoint.
        With expert parallelism or DualPipe every rank writes its own state to `step_X/rank{r}/` (rank 0
        renames the directory once all ranks are done)."""
        per_rank = self.expert_parallel or self.dualpipe  # DualPipe: each rank's two chunks + their optimizer
        if self.rank != 0 and not per_rank:
            return self.checkpoint_dir()
        root = self.checkpoint_dir()
        final = root / f"step_{self.step:07d}"
        if per_rank:
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
        state = {k: v.contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, d / "model.safetensors")
        names = {id(p): n for n, p in self.model.named_parameters()}
        opt_tensors, opt_steps = {}, {}
        for group in self.opt.param_groups:
            for p in group["params"]:
                st = self.opt.state.get(p)
                if st:
                    n = names[id(p)]
                    opt_tensors[f"{n}.exp_avg"] = st["exp_avg"].cpu()
                    opt_tensors[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].cpu()
                    opt_steps[n] = st["step"]
        opt_tensors["__rng_torch__"] = torch.get_rng_state()
        if self.device.type == "cuda":
            opt_tensors["__rng_cuda__"] = torch.cuda.get_rng_state(self.device)
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
        if per_rank:  # every rank's files are on disk before rank 0 publishes the directory
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
        if per_rank:
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
        if self.expert_parallel or self.dualpipe:  # this rank's part of an EP / DualPipe checkpoint
            path = path / f"rank{self.rank}"
            if not path.is_dir():
                raise FileNotFoundError(
                    f"--resume: {path} missing (not saved with this expert-parallel / DualPipe world)"
                )
        self.model.load_state_dict(load_file(path / "model.safetensors"))
        meta = json.loads((path / "trainer_state.json").read_text())
        opt = load_file(path / "optimizer.safetensors")
        params = dict(self.model.named_parameters())
        for n, k in meta["optimizer_steps"].items():
            dev = params[n].device
            self.opt.state[params[n]] = {
                "step": k,
                "exp_avg": opt[f"{n}.exp_avg"].to(dev, copy=True),
                "exp_avg_sq": opt[f"{n}.exp_avg_sq"].to(dev, copy=True),
            }
        torch.set_rng_state(opt["__rng_torch__"])
        if self.device.type == "cuda" and "__rng_cuda__" in opt:
            torch.cuda.set_rng_state(opt["__rng_cuda__"], self.device)
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
        if self.dualpipe:  # DualPipe: the export gathers the stages (collective); rank 0 validates the result
            export = self.export()
            val_loss = self.validation_loss() if self.rank == 0 else None
        elif self.rank == 0 or self.expert_parallel:  # with EP the forward and the export are collective
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
        if self.dualpipe:  # all ranks send chunk 0 (= stage r); rank 0 writes (and samples) the full model
            self._full_model = self._dualpipe_full_model()
            if self.rank != 0:
                return path
        tok_dir = self.out / "tokenizer"
        self.data.write_tokenizer(tok_dir, model_max_length=self.model_cfg.max_position_embeddings)
        save_pretrained(getattr(self, "_full_model", self.model), path, self.model_cfg, tokenizer_dir=tok_dir)
        return path

    @torch.no_grad()
    def samples(self) -> list[str]:
        from ..infer import Generator, SamplingParams

        tok = self.data.tokenizer
        prompts = ["def ", "import ", "class "][: self.cfg.samples]
        if self.expert_parallel or self.dualpipe:  # rank 0 alone: the full model of export() (fp32 compute)
            if getattr(self, "_full_model", None) is None:
                raise RuntimeError(
                    "Trainer.samples: with expert parallelism or DualPipe call export() first (on all ranks)"
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


# -- DualPipe helpers
_LOAD_TAG = 1000  # point-to-point tag of the expert-load exchange between the two copies of a stage


def _check_dualpipe_world(cfg: TrainConfig) -> None:
    """pipeline='dualpipe' needs torch.distributed with an even world >= 2 and at least 2 x world
    micro-batches per step."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("TrainConfig: pipeline='dualpipe' needs torch.distributed initialized")
    world = dist.get_world_size()
    if world < 2 or world % 2:
        raise ValueError(f"TrainConfig: pipeline='dualpipe' needs an even world size >= 2, got {world}")
    chunks = cfg.global_batch // cfg.micro_batch
    if chunks < 2 * world:
        raise ValueError(
            f"TrainConfig: pipeline='dualpipe' needs global_batch / micro_batch (micro-batches per step, "
            f"{chunks}) >= 2 x world ({2 * world}): raise global_batch or lower micro_batch"
        )


def _main_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The main next-token loss on the last stage's logits, as in Trainer.losses."""
    with torch.autocast(logits.device.type, dtype=torch.bfloat16):
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def _bf16_autocast(forward):
    def wrapped(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return forward(x)

    return wrapped


# -- end DualPipe helpers


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
