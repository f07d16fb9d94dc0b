"""Checkpoint I/O in the Hugging Face DeepSeek-V3 format: the name adapter, a streaming loader into a built
model, an atomic sharded writer and a BF16 <-> FP8 converter that never builds a model.

Format decisions:
- On disk exactly what transformers and DeepSeek publish: HF names, one tensor per routed expert
  (`mlp.experts.{e}.gate_proj.weight`), `model.safetensors` or `model-XXXXX-of-YYYYY.safetensors` + index.
  In memory the experts are stacked (`mlp.experts.gate_proj [E_local, I, H]`); only the adapter below
  (`hf_to_internal` / `internal_to_hf`) knows both, as in torchtitan's state-dict adapter.
- FP8 is the HF convention (e4m3 `weight` + fp32 `weight_scale_inv` per 128 x 128 block, announced by
  `quantization_config`); precision is converted per tensor while loading, so any checkpoint loads into a
  BF16, FP32 or FP8 model. Scales and the fp32 router bias `e_score_correction_bias` are never cast.
- Reads stream one tensor at a time through memory-mapped `safe_open` (no pickles); experts a model does not
  hold (`experts.expert_ids`) are never read, so a subset model is the rank-aware loader.
- Writes go to a temporary sibling directory, are fsync'ed, then renamed over the destination.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import ops
from .config import ModelConfig

FP8 = torch.float8_e4m3fn
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_HF_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$"
)
_STACKED_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)(_scale_inv)?$"
)
# The projections FP8 checkpoints quantize: attention, dense MLP, shared and routed experts (not the router
# `mlp.gate`, embeddings, norms, lm_head, `eh_proj` or `shared_head.head`).
_QUANTIZABLE = re.compile(
    r"^model\.layers\.\d+\."
    r"(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$"
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_KEEP_DTYPE = re.compile(r"(_scale_inv|e_score_correction_bias)$")


# ---- name adapter ------------------------------------------------------------------------------------


def hf_to_internal(hf_name: str) -> tuple[str, int | None]:
    """HF tensor name -> (model state-dict key, global expert id or None). Routed experts map onto the
    stacked parameter (`...experts.7.up_proj.weight` -> `...experts.up_proj`, 7) and their scales onto
    `..._scale_inv`; every other name is the same in both."""
    m = _HF_EXPERT.match(hf_name)
    if m is None:
        return hf_name, None
    prefix, expert, proj, kind = m.groups()
    return f"{prefix}.{proj}{'_scale_inv' if kind == 'weight_scale_inv' else ''}", int(expert)


def internal_to_hf(name: str, tensor: torch.Tensor, expert_ids: Iterable[int] | None = None):
    """Model state-dict entry -> [(HF name, tensor)]: a stacked expert tensor `[E_local, ...]` splits into
    one view per local expert, named by its global id from `expert_ids` (default: 0..E_local-1)."""
    m = _STACKED_EXPERT.match(name)
    if m is None:
        return [(name, tensor)]
    prefix, proj, scale = m.groups()
    ids = range(tensor.shape[0]) if expert_ids is None else [int(e) for e in expert_ids]
    if len(ids) != tensor.shape[0]:
        raise ValueError(f"internal_to_hf: {name} holds {tensor.shape[0]} experts, expert_ids has {len(ids)}")
    kind = "weight_scale_inv" if scale else "weight"
    return [(f"{prefix}.{e}.{proj}.{kind}", tensor[i]) for i, e in enumerate(ids)]


def scale_name(weight_name: str) -> str:
    """The scale that goes with an FP8 weight, in either naming (`X.weight` / stacked `experts.gate_proj`)."""
    return weight_name + "_scale_inv"


def _expert_ids(model: nn.Module, stacked_name: str, num_local: int) -> list[int]:
    module = model.get_submodule(stacked_name.rsplit(".", 1)[0])
    ids = getattr(module, "expert_ids", None)
    return list(range(num_local)) if ids is None else [int(e) for e in ids.tolist()]


# ---- reading -----------------------------------------------------------------------------------------


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """HF tensor name -> the shard holding it, from the index, a single `model.safetensors`, or (no index)
    every `*.safetensors` in the directory, whose headers are read (not their data)."""
    root = Path(path)
    if (root / INDEX_FILE).is_file():
        weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        return {name: root / file for name, file in weight_map.items()}
    files = [root / SINGLE_FILE] if (root / SINGLE_FILE).is_file() else sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no safetensors checkpoint in {root} (expected {SINGLE_FILE} or {INDEX_FILE})"
        )
    out: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out


class _Reader:
    """Lazily opened shards (memory-mapped) and the bytes actually read, for one load or conversion."""

    def __init__(self, files: dict[str, Path], stack: ExitStack):
        self.files, self._stack, self._open = files, stack, {}
        self.read: list[str] = []
        self.bytes_read = 0
        self.max_tensor_bytes = 0

    def handle(self, name: str):
        file = self.files[name]
        if file not in self._open:
            self._open[file] = self._stack.enter_context(safe_open(file, framework="pt", device="cpu"))
        return self._open[file]

    def get(self, name: str) -> torch.Tensor:
        t = self.handle(name).get_tensor(name)
        nbytes = t.numel() * t.element_size()
        self.read.append(name)
        self.bytes_read += nbytes
        self.max_tensor_bytes = max(self.max_tensor_bytes, nbytes)
        return t

    def dtype_and_shape(self, name: str) -> tuple[torch.dtype, list[int]]:
        s = self.handle(name).get_slice(name)
        return _SAFETENSORS_DTYPES[s.get_dtype()], s.get_shape()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": FP8,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclasses.dataclass
class LoadReport:
    """What `load_weights` did: HF names read, routed experts skipped unread (held by other ranks), MTP-layer
    names ignored (model without MTP), missing model keys and unexpected checkpoint names (raised when
    strict), and the bytes read (`max_tensor_bytes`: the largest single read, the loader's peak beyond
    the model itself)."""

    read: list[str]
    skipped_experts: list[str]
    ignored_mtp: list[str]
    missing: list[str]
    unexpected: list[str]
    bytes_read: int
    max_tensor_bytes: int


def _num_hidden_layers(model: nn.Module, keys: Iterable[str]) -> int:
    cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    if isinstance(cfg, ModelConfig):
        return cfg.num_hidden_layers
    layers = [int(m.group(1)) for k in keys if (m := _LAYER.match(k))]
    return max(layers, default=-1) + 1


@torch.no_grad()
def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> LoadReport:
    """Copy an HF-format checkpoint directory into `model`'s parameters and buffers, tensor by tensor,
    converting precision per tensor: FP8 (+ `weight_scale_inv`) into a float parameter is dequantized,
    a float tensor into an FP8 parameter is quantized into its weight and scale, same kinds are copied.
    Routed experts go to the slot of the local expert with that global id; others are not read.
    With `strict`, missing model keys and unexpected checkpoint names raise KeyError naming them."""
    files = checkpoint_files(path)
    targets = model.state_dict(keep_vars=True)
    slots = {
        k: {e: i for i, e in enumerate(_expert_ids(model, k, v.shape[0]))}
        for k, v in targets.items()
        if _STACKED_EXPERT.match(k) and not k.endswith("_scale_inv")
    }
    mtp_prefix = f"model.layers.{_num_hidden_layers(model, targets)}."
    model_has_mtp = any(k.startswith(mtp_prefix) for k in targets)
    filled: set[tuple[str, int | None]] = set()
    report = LoadReport([], [], [], [], [], 0, 0)
    with ExitStack() as stack:
        reader = _Reader(files, stack)
        # Shard by shard, in file order, so the page cache sees one shard at a time.
        for hf_name in sorted(files, key=lambda n: (str(files[n]), n)):
            if hf_name.endswith("weight_scale_inv") and hf_name.removesuffix("_scale_inv") in files:
                continue  # read with its weight
            key, expert = hf_to_internal(hf_name)
            if key not in targets:
                if hf_name.startswith(mtp_prefix) and not model_has_mtp:
                    report.ignored_mtp.append(hf_name)
                else:
                    report.unexpected.append(hf_name)
                continue
            slot = None
            if expert is not None:
                slot = slots[key].get(expert)
                if slot is None:
                    report.skipped_experts.append(hf_name)
                    continue
            _load_one(reader, hf_name, targets, key, slot)
            filled.add((key, slot))
            if targets[key].dtype == FP8 and scale_name(key) in targets:
                filled.add((scale_name(key), slot))
        report.read, report.bytes_read = reader.read, reader.bytes_read
        report.max_tensor_bytes = reader.max_tensor_bytes
    loaded_ids = {id(targets[k]) for k, slot in filled if slot is None}
    for key, t in targets.items():
        base = key.removesuffix("_scale_inv")
        if base in slots:  # stacked experts: every local expert must be filled
            report.missing += [
                internal_to_hf(key, t[i : i + 1], [e])[0][0]
                for e, i in slots[base].items()
                if (key, i) not in filled
            ]
        elif id(t) not in loaded_ids:  # (a tied tensor counts as loaded through its twin)
            report.missing.append(key)
    if strict and (report.missing or report.unexpected):
        raise KeyError(
            f"load_weights({path}): missing {len(report.missing)} keys {report.missing[:20]}, "
            f"unexpected {len(report.unexpected)} {report.unexpected[:20]}"
        )
    return report


def _load_one(reader: _Reader, hf_name: str, targets: dict, key: str, slot: int | None) -> None:
    dest = targets[key] if slot is None else targets[key][slot]
    dest_scale = targets.get(scale_name(key)) if dest.dtype == FP8 else None
    if dest_scale is not None and slot is not None:
        dest_scale = dest_scale[slot]
    src = reader.get(hf_name)
    if tuple(src.shape) != tuple(dest.shape):
        raise ValueError(
            f"load_weights: {hf_name} has shape {tuple(src.shape)}, the model {tuple(dest.shape)}"
        )
    src_scale_name = hf_name + "_scale_inv"
    src_scale = reader.get(src_scale_name) if src.dtype == FP8 and src_scale_name in reader.files else None
    if src.dtype == FP8 and src_scale is None:
        raise ValueError(f"load_weights: FP8 tensor {hf_name} has no {src_scale_name} in the checkpoint")
    if dest.dtype == FP8:
        if dest_scale is None:
            raise ValueError(f"load_weights: FP8 parameter {key} has no {scale_name(key)} in the model")
        if src.dtype != FP8:
            src, src_scale = ops.quantize_per_block(src.to(dest.device))
        if tuple(src_scale.shape) != tuple(dest_scale.shape):
            raise ValueError(
                f"load_weights: {src_scale_name} has shape {tuple(src_scale.shape)}, "
                f"the model {tuple(dest_scale.shape)}"
            )
        dest.copy_(src)
        dest_scale.copy_(src_scale)
    elif src.dtype == FP8:
        dest.copy_(
            ops.dequantize_per_block(src.to(dest.device), src_scale.to(dest.device), out_dtype=dest.dtype)
        )
    else:
        dest.copy_(src)


# ---- writing -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Entry:
    """One tensor to write: its HF name, size on disk and how to produce it (called when its shard is
    written, so only one shard is materialized at a time)."""

    name: str
    nbytes: int
    produce: Callable[[], torch.Tensor]


def _plan_shards(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    """transformers' greedy split: a new shard whenever the next tensor would overflow the current one."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _shard_name(i: int, n: int) -> str:
    return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_checkpoint(
    path: str | Path,
    config: dict[str, Any],
    entries: list[_Entry],
    max_shard_bytes: int,
    extra_files: Iterable[Path] = (),
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Writes config.json, the shards (+ index when more than one) and `extra_files` into a temporary
    sibling of `path`, fsyncs them, then swaps it in. Returns the shard file names."""
    dst = Path(path).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shards = _plan_shards(entries, max_shard_bytes)
        names = [_shard_name(i, len(shards)) for i in range(len(shards))]
        weight_map = {}
        for shard, file in zip(shards, names, strict=True):
            tensors = {e.name: _standalone(e.produce()) for e in shard}
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            _fsync(tmp / file)
            weight_map.update(dict.fromkeys(tensors, file))
            if progress is not None:
                nbytes = sum(e.nbytes for e in shard)
                progress(f"{file}: {len(shard)} tensors, {nbytes / 2**20:.1f} MiB")
            del tensors
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(e.nbytes for e in entries)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            _fsync(tmp / INDEX_FILE)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _fsync(tmp / "config.json")
        for f in extra_files:
            shutil.copyfile(f, tmp / f.name)
            _fsync(tmp / f.name)
        _fsync(tmp)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning its storage (safetensors refuses views sharing memory, e.g. one
    expert of a stacked parameter)."""
    t = t.detach().to("cpu")
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _replace_dir(new: Path, dst: Path) -> None:
    """Moves the complete `new` directory to `dst`; an existing `dst` is moved aside first and deleted only
    once the new one is in place."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        dst.rename(old)
    new.rename(dst)
    _fsync(dst.parent)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()


def _hf_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's persistent state in HF names (experts split, tied duplicates written once)."""
    seen: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        ids = _expert_ids(model, key, t.shape[0]) if _STACKED_EXPERT.match(key) else None
        yield from internal_to_hf(key, t.detach(), ids)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    cfg: ModelConfig,
    *,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
) -> list[str]:
    """Writes `model` as an HF DeepSeek-V3 directory (atomically, see the module docstring). `dtype` casts
    the floating tensors other than FP8 weights, their scales and the router bias. Returns the shard names."""
    entries, has_fp8, float_dtype = [], False, None
    for name, t in _hf_tensors(model):
        out_dtype = t.dtype
        if dtype is not None and t.is_floating_point() and t.dtype != FP8 and not _KEEP_DTYPE.search(name):
            out_dtype = dtype
        has_fp8 |= t.dtype == FP8
        if name.endswith("embed_tokens.weight") and float_dtype is None:
            float_dtype = out_dtype
        entries.append(_Entry(name, t.numel() * out_dtype.itemsize, lambda t=t, d=out_dtype: t.to(d)))
    config = cfg.to_dict()
    config["torch_dtype"] = _dtype_name(float_dtype or dtype or torch.bfloat16)
    if has_fp8:
        config["quantization_config"] = dict(cfg.quantization_config or FP8_QUANTIZATION_CONFIG)
    else:
        config.pop("quantization_config", None)
    extra = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES] if tokenizer_dir is not None else []
    return _write_checkpoint(path, config, entries, max_shard_bytes, [f for f in extra if f.is_file()])


# ---- conversion --------------------------------------------------------------------------------------


class _QuantizedPair:
    """Quantizes a weight once for its two entries (`weight`, then `weight_scale_inv`, which may land in the
    next shard) and drops the result after the second."""

    def __init__(self, quantize: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        self._quantize, self._scale = quantize, None

    def weight(self) -> torch.Tensor:
        q, self._scale = self._quantize()
        return q

    def scale(self) -> torch.Tensor:
        s, self._scale = self._scale, None
        return s


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: str,
    *,
    max_shard_bytes: int = 5 * 2**30,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Converts an HF DeepSeek-V3 checkpoint between BF16 and block-FP8 without building a model, one
    output shard in memory at a time. `to="fp8"` quantizes every attention / MLP / expert projection weight
    (`weight` e4m3 + `weight_scale_inv`); `to="bf16"` dequantizes every weight that has a scale and drops
    the scales. Other tensors are copied unchanged; other files (tokenizer, generation config) are copied.
    `progress` receives one line per written shard. Returns the shard names."""
    if to not in ("bf16", "fp8"):
        raise ValueError(f"convert_checkpoint: to must be 'bf16' or 'fp8', got {to!r}")
    src = Path(src)
    files = checkpoint_files(src)
    config = json.loads((src / "config.json").read_text())
    with ExitStack() as stack:
        reader = _Reader(files, stack)

        def read(name: str) -> torch.Tensor:
            return reader.get(name).to(device)

        entries: list[_Entry] = []
        for name in sorted(files, key=lambda n: (str(files[n]), n)):
            dtype, shape = reader.dtype_and_shape(name)
            numel = int(torch.Size(shape).numel())
            has_scale = name + "_scale_inv" in files
            if name.endswith("weight_scale_inv") and name.removesuffix("_scale_inv") in files:
                if to == "fp8":  # an already-FP8 checkpoint keeps its scales
                    entries.append(_Entry(name, numel * 4, lambda n=name: reader.get(n)))
            elif to == "bf16" and dtype == FP8 and has_scale:
                entries.append(
                    _Entry(
                        name,
                        numel * 2,
                        lambda n=name: ops.dequantize_per_block(read(n), read(n + "_scale_inv")),
                    )
                )
            elif to == "fp8" and dtype != FP8 and _QUANTIZABLE.match(name):
                rows, cols = shape
                pair = _QuantizedPair(lambda n=name: ops.quantize_per_block(read(n)))
                entries.append(_Entry(name, numel, pair.weight))
                scale_numel = ops.ceil_div(rows, 128) * ops.ceil_div(cols, 128)
                entries.append(_Entry(name + "_scale_inv", scale_numel * 4, pair.scale))
            else:
                entries.append(_Entry(name, numel * dtype.itemsize, lambda n=name: reader.get(n)))
        if to == "fp8":
            config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        else:
            config.pop("quantization_config", None)
            config["torch_dtype"] = "bfloat16"
        skip = {"config.json", INDEX_FILE}
        extra = [
            f
            for f in sorted(src.iterdir())
            if f.is_file() and f.suffix != ".safetensors" and f.name not in skip
        ]
        return _write_checkpoint(dst, config, entries, max_shard_bytes, extra, progress)
