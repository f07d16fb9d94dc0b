"""The DeepSeek-V3 transformer: embedding, `num_hidden_layers` blocks (MLA + dense MLP for the first
`first_k_dense_replace`, MLA + MoE after), final norm and head, plus the MTP layer. Parameter names are
Hugging Face's except the stacked routed experts (see checkpoint.py for the mapping)."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .config import ModelConfig
from .layers import MLP, RMSNorm, Rotary
from .mla import MLA, DecodeState
from .moe import MoE
from .mtp import make_mtp_layer


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, expert_ids: torch.Tensor | None = None):
        super().__init__()
        self.self_attn = MLA(cfg, layer_idx)
        if layer_idx < cfg.first_k_dense_replace:
            self.mlp = MLP(cfg, cfg.hidden_size, cfg.intermediate_size)
        else:
            self.mlp = MoE(cfg, expert_ids)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache: DecodeState | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, expert_ids: torch.Tensor | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layers = [Block(cfg, i, expert_ids) for i in range(cfg.num_hidden_layers)]
        if cfg.num_nextn_predict_layers:
            layers.append(make_mtp_layer(cfg, Block, expert_ids))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3(nn.Module):
    """`model(input_ids [b, s])` -> logits [b, s, vocab] (causal, positions 0..s-1). With `cache` (a
    DecodeState from dsv3.infer) and `positions`, runs the decode path over the paged latent cache."""

    def __init__(self, cfg: ModelConfig, expert_ids: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, expert_ids)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def mtp(self) -> nn.Module | None:
        return self.model.layers[self.num_layers] if self.config.num_nextn_predict_layers else None

    def hidden(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: DecodeState | None = None,
    ) -> torch.Tensor:
        """Last-layer output before the final norm, [b, s, hidden] (what the MTP layer consumes)."""
        b, s = input_ids.shape
        if positions is None:
            positions = torch.arange(s, device=input_ids.device).expand(b, s)
        cos, sin = self.rotary(positions)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers[: self.num_layers]:
            x = layer(x, cos, sin, cache)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: DecodeState | None = None,
    ) -> torch.Tensor:
        return self.logits(self.hidden(input_ids, positions, cache))

    def mtp_logits(
        self,
        h: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: DecodeState | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP at the positions of h: (its hidden, logits for the token after each of `next_ids`)."""
        if self.mtp is None:
            raise ValueError("mtp_logits: this model has no MTP layer (num_nextn_predict_layers = 0)")
        b, s = next_ids.shape
        if positions is None:
            positions = torch.arange(s, device=next_ids.device).expand(b, s)
        cos, sin = self.rotary(positions)
        return self.mtp.predict(h, next_ids, cos, sin, cache)

    @torch.no_grad()
    def init_weights(self, std: float | None = None, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) for every matrix (std = initializer_range; FP8 ones drawn in fp32 and
        block-quantized), ones for norms, zeros for the router bias."""
        std = self.config.initializer_range if std is None else std
        params = dict(self.named_parameters())
        for name, p in params.items():
            if name.endswith("_scale_inv"):
                continue
            if p.dtype == torch.float8_e4m3fn:
                q, s = ops.quantize_per_block(torch.randn(p.shape, generator=generator) * std)
                p.copy_(q)
                params[name + "_scale_inv"].copy_(s)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            else:
                p.fill_(1.0)  # RMSNorm weights: the only vectors among the parameters
        for name, buf in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.zero_()


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    expert_ids: torch.Tensor | None = None,
    init: bool = True,
    seed: int = 0,
) -> DeepseekV3:
    """A model for `cfg` with its non-FP8 floating parameters in `dtype` (default: cfg.torch_dtype)."""
    dtype = dtype or getattr(torch, cfg.torch_dtype)
    model = DeepseekV3(cfg, expert_ids)
    if init:
        model.init_weights(generator=torch.Generator().manual_seed(seed))
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != torch.float8_e4m3fn and not name.endswith("_scale_inv"):
            p.data = p.data.to(dtype)  # FP8 weights and their fp32 scales keep their dtypes; buffers too
    return model.to(device) if device is not None else model
