"""Building blocks of the V3 model: RMSNorm, YaRN rotary embedding on interleaved pairs, the FP8 linear
layer (e4m3 weights + 128 x 128 `weight_scale_inv`, run by `fp8_gemm_nt`) and the SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .config import ModelConfig, yarn_mscale


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in fp32 and cast back before the weight (transformers' order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rope dims and the cos/sin scale: plain RoPE, or YaRN (ramp between
    interpolated and extrapolated frequencies over the correction range, attention factor from mscale /
    mscale_all_dim), as transformers computes them (applied whenever rope_scaling is set)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    factor = float(rs["factor"])
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attention = float(rs["attention_factor"])
    elif mscale and mscale_all:
        attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
        attention = yarn_mscale(factor)
    original = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, attention


class Rotary(nn.Module):
    """cos/sin tables for positions, applied to adjacent pairs (2i, 2i + 1) of the rope dims: the layout of
    DeepSeek's checkpoints (transformers' `rope_interleave=True`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (long, any shape) -> cos, sin of shape [*positions.shape, rope_dim / 2], fp32."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.to(positions.device)
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (x[2i], x[2i+1]) of x [..., rope_dim] by the angles of cos/sin [..., rope_dim / 2]
    (broadcast over the dims in between), in fp32; the result is in x's dtype and pair order."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class FP8Linear(nn.Module):
    """y = x · Wᵀ with W stored as e4m3 `weight [out, in]` and fp32 `weight_scale_inv [ceil(out/128),
    ceil(in/128)]` (W ≈ weight · scale_inv per 128 x 128 block, the HF checkpoint convention). The input is
    quantized per 1 x 128 group and multiplied by `fp8_gemm_nt` (fp32 accumulation); the output is in x's
    dtype (bf16 or fp32)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn), requires_grad=False
        )
        self.weight_scale_inv = nn.Parameter(
            torch.ones(ops.ceil_div(out_features, 128), ops.ceil_div(in_features, 128)), requires_grad=False
        )

    @classmethod
    def from_float(cls, w: torch.Tensor) -> FP8Linear:
        layer = cls(w.shape[1], w.shape[0])
        q, s = ops.quantize_per_block(w.detach())
        layer.weight.data, layer.weight_scale_inv.data = q, s
        return layer

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ops.dequantize_per_block(self.weight, self.weight_scale_inv, out_dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        a, sa = ops.quantize_per_token_group(x.reshape(-1, shape[-1]))
        out_dtype = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
        y = ops.fp8_gemm_nt(a, sa, self.weight, self.weight_scale_inv, out_dtype=out_dtype)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 128x128 blocks"


def make_linear(cfg: ModelConfig, in_features: int, out_features: int) -> nn.Module:
    """The projection layers FP8 checkpoints quantize (attention and expert/MLP projections): FP8Linear when
    the config says FP8, else a plain bias-free nn.Linear."""
    if cfg.fp8:
        return FP8Linear(in_features, out_features)
    return nn.Linear(in_features, out_features, bias=False)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)); dense layers, shared experts and routed experts alike."""

    def __init__(self, cfg: ModelConfig, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = make_linear(cfg, hidden, inter)
        self.up_proj = make_linear(cfg, hidden, inter)
        self.down_proj = make_linear(cfg, inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
