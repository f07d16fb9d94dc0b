"""DeepSeek-V3 model configuration: the fields of a Hugging Face `config.json` for `DeepseekV3ForCausalLM`
(same names, same defaults as transformers' `DeepseekV3Config`), and presets."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    # FP8 checkpoints: {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], ...}
    quantization_config: dict | None = None
    torch_dtype: str = "bfloat16"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def fp8(self) -> bool:
        """True when the checkpoint's linear layers hold block-quantized e4m3 weights."""
        q = self.quantization_config or {}
        return q.get("quant_method") == "fp8"

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-1/2, times mscale² under YaRN with mscale_all_dim (as transformers and DeepSeek
        do)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling or {}
        if rs.get("mscale_all_dim"):
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    def validate(self) -> ModelConfig:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

        need(self.n_routed_experts % self.n_group == 0, "n_routed_experts must be a multiple of n_group")
        need(1 <= self.topk_group <= self.n_group, "topk_group must be in [1, n_group]")
        per_group = self.n_routed_experts // self.n_group
        need(
            1 <= self.num_experts_per_tok <= self.topk_group * per_group,
            "num_experts_per_tok must be in [1, topk_group * n_routed_experts / n_group]",
        )
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even (RoPE rotates pairs)")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace out of range")
        need(self.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers must be 0 or 1")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            need(kind == "yarn", f"rope_scaling type must be 'yarn', got {kind!r}")
            need(float(self.rope_scaling.get("factor", 0)) >= 1, "rope_scaling factor must be >= 1")
        if self.quantization_config is not None and self.fp8:
            block = self.quantization_config.get("weight_block_size", [128, 128])
            need(list(block) == [128, 128], f"weight_block_size must be [128, 128], got {block}")
        return self

    # ---- Hugging Face config.json --------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("rope_scaling") is not None:
            kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
        if "torch_dtype" not in kwargs and "dtype" in d:
            kwargs["torch_dtype"] = d["dtype"]
        return cls(**kwargs).validate()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        return cls.from_dict(json.loads((p / "config.json" if p.is_dir() else p).read_text()))

    def to_dict(self) -> dict[str, Any]:
        """A `config.json` that transformers' AutoConfig reads as a DeepseekV3Config."""
        d = dataclasses.asdict(self)
        if d["quantization_config"] is None:
            del d["quantization_config"]
        d.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_key_value_heads=self.num_attention_heads,
            hidden_act="silu",
            rope_interleave=True,
            attention_bias=False,
            attention_dropout=0.0,
        )
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    # ---- presets ---------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"ModelConfig.preset: name must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**PRESETS[name]).validate()


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(factor: float, original_max_position_embeddings: int) -> dict[str, Any]:
    """DeepSeek-V3's YaRN settings (beta 32/1, mscale = mscale_all_dim = 1) for a context-extension factor."""
    return dict(
        type="yarn",
        rope_type="yarn",
        factor=factor,
        original_max_position_embeddings=original_max_position_embeddings,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
    )


PRESETS: dict[str, dict[str, Any]] = {
    # Every V3 feature at a size that trains on 2 CPU cores in minutes: q_lora, MLA with a 64-dim latent, one
    # dense layer then MoE layers, 8 routed experts in 2 groups (1 group kept per token, 2 experts from it),
    # a shared expert, MTP, YaRN.
    "tiny": dict(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=2.5,
        kv_lora_rank=64,
        q_lora_rank=96,
        qk_rope_head_dim=16,
        v_head_dim=32,
        qk_nope_head_dim=32,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=1024,
        initializer_range=0.006,
        rope_scaling=_yarn(factor=4.0, original_max_position_embeddings=256),
    ),
    # DeepSeek-V3 / R1 (671B total, 37B active).
    "v3-671b": dict(
        vocab_size=129280,
        max_position_embeddings=163840,
        rope_scaling=_yarn(factor=40.0, original_max_position_embeddings=4096),
        quantization_config=dict(
            activation_scheme="dynamic", fmt="e4m3", quant_method="fp8", weight_block_size=[128, 128]
        ),
    ),
    # The 16B-class layout of DeepSeek's reference configs (V2-Lite shape): no q_lora, 64 experts, 1 group.
    "v3-16b": dict(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        n_shared_experts=2,
        n_routed_experts=64,
        routed_scaling_factor=1.0,
        q_lora_rank=None,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        norm_topk_prob=False,
        num_nextn_predict_layers=0,
    ),
}
