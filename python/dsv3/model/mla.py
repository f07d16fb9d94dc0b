"""Multi-head latent attention (DeepSeek-V3 report §2.1.1, eqs. 1-11). Two paths over the same weights:

- prefill / training (`cache=None`): per-head keys and values from `kv_b_proj`, causal attention through
  torch's scaled_dot_product_attention;
- decode (`cache` given): `kv_b_proj` absorbed into the query and the output, so the paged cache holds only
  the compressed latent c_KV (kv_lora_rank) and the rotated shared key k^R (qk_rope_head_dim) per token, and
  attention runs in latent space through `dsv3.ops.mla_decode`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .config import ModelConfig
from .layers import FP8Linear, RMSNorm, apply_rotary, make_linear


class DecodeState(Protocol):
    """What the decode path needs from a paged latent cache for one forward step (dsv3.infer implements it):
    the requests' block tables and lengths *including* this step's tokens, the flat cache slots of this step's
    tokens (page · 64 + offset, row-major over [batch, step]), the split-KV schedule for those lengths
    (computed once per step, shared by every layer) and each layer's cache tensor."""

    block_table: torch.Tensor  # int32 [b, max_pages]
    seqlens: torch.Tensor  # int32 [b]
    slots: torch.Tensor  # int64 [b * s]
    schedule: tuple[torch.Tensor, torch.Tensor]  # get_mla_decode_metadata(seqlens, s * h_q, 1)

    def layer_cache(self, layer: int) -> torch.Tensor: ...  # [pages, 64, 1, kv_lora_rank + qk_rope_head_dim]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        qk = self.nope + self.rope
        if cfg.q_lora_rank is None:
            self.q_proj = make_linear(cfg, cfg.hidden_size, self.n_heads * qk)
        else:  # eqs. 6-7: low-rank query compression
            self.q_a_proj = make_linear(cfg, cfg.hidden_size, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = make_linear(cfg, cfg.q_lora_rank, self.n_heads * qk)
        self.kv_a_proj_with_mqa = make_linear(cfg, cfg.hidden_size, cfg.kv_lora_rank + self.rope)  # eqs. 1, 3
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = make_linear(
            cfg, cfg.kv_lora_rank, self.n_heads * (self.nope + self.v_dim)
        )  # eqs. 2, 5
        self.o_proj = make_linear(cfg, self.n_heads * self.v_dim, cfg.hidden_size)  # eq. 11
        self.softmax_scale = cfg.softmax_scale
        self._absorbed_key = None
        self._absorbed = None

    def _input_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projections that read x: q_proj(x) (q_a_proj(x) with query compression) and
        kv_a_proj_with_mqa(x). One method, so FP8 training can quantize x once for both."""
        query = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        return query(x), self.kv_a_proj_with_mqa(x)

    def _query(self, q_in: torch.Tensor) -> torch.Tensor:
        """The query from the output of `_input_projections`' first projection."""
        if self.q_lora_rank is None:
            return q_in
        return self.q_b_proj(self.q_a_layernorm(q_in))

    def _kv_b_weight(self) -> torch.Tensor:
        w = self.kv_b_proj
        return w.dequantized() if isinstance(w, FP8Linear) else w.weight

    def absorbed(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK [h, nope, kv_lora] and W^UV [h, v, kv_lora] from kv_b_proj, cached until it changes."""
        w = self.kv_b_proj.weight
        key = (w.data_ptr(), w._version, dtype)
        if self._absorbed_key != key:
            wkv = self._kv_b_weight().view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank).to(dtype)
            self._absorbed = (wkv[:, : self.nope], wkv[:, self.nope :])
            self._absorbed_key = key
        return self._absorbed

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: DecodeState | None = None
    ) -> torch.Tensor:
        """x [b, s, hidden]; cos/sin [b, s, rope/2] for the tokens' positions."""
        b, s, _ = x.shape
        q_in, kv_in = self._input_projections(x)
        q = self._query(q_in).view(b, s, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rotary(q_pe, cos.unsqueeze(2), sin.unsqueeze(2))  # eq. 8
        c_kv, k_pe = kv_in.split([self.kv_lora_rank, self.rope], dim=-1)
        k_pe = apply_rotary(k_pe, cos, sin)  # eq. 3: one rotated key shared by every head
        c_kv = self.kv_a_layernorm(c_kv)
        if cache is None:
            out = self._attend_per_head(q_nope, q_pe, c_kv, k_pe)
        else:
            out = self._attend_latent(q_nope, q_pe, c_kv, k_pe, cache)
        return self.o_proj(out.reshape(b, s, self.n_heads * self.v_dim))

    def _attend_per_head(self, q_nope, q_pe, c_kv, k_pe) -> torch.Tensor:
        b, s = c_kv.shape[:2]
        kv = self.kv_b_proj(c_kv).view(b, s, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v.transpose(1, 2), is_causal=True, scale=self.softmax_scale
        )
        return out.transpose(1, 2)  # [b, s, h, v]

    def _attend_latent(self, q_nope, q_pe, c_kv, k_pe, cache: DecodeState) -> torch.Tensor:
        b, s = c_kv.shape[:2]
        kv_cache = cache.layer_cache(self.layer_idx)
        latent = torch.cat([c_kv, k_pe], dim=-1).reshape(b * s, 1, -1)
        ops.store_mla_kv(kv_cache, latent, cache.slots, head_dim_v=self.kv_lora_rank)
        w_uk, w_uv = self.absorbed(q_nope.dtype)
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # W^UK absorbed into the query
        q = torch.cat([q_latent, q_pe], dim=-1)
        meta, num_splits = cache.schedule
        out, _ = ops.mla_decode(
            q,
            kv_cache,
            cache.block_table,
            cache.seqlens,
            self.kv_lora_rank,
            softmax_scale=self.softmax_scale,
            causal=True,
            tile_scheduler_metadata=meta,
            num_splits=num_splits,
        )
        return torch.einsum("bshc,hdc->bshd", out, w_uv)  # W^UV absorbed into the output
