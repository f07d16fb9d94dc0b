"""Plain-PyTorch definitions of every dsv3 op: the readable semantics the kernels are tested against.

Nothing here is fast. GEMM references evaluate the block-scaled formula in float64 (SPEC §3); quantization
references use the same fp32 operations as the kernels, so CPU/CUDA quantization matches them bit for bit.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
BLOCK = 128

# (N, K) of DeepSeek-V3's FP8 GEMMs (SPEC §3): fused q_a + kv_a, kv_a, q_b, kv_b, o_proj, expert up, down.
V3_GEMM_SHAPES = [
    (2112, 7168),
    (576, 7168),
    (24576, 1536),
    (32768, 512),
    (7168, 16384),
    (4096, 7168),
    (7168, 2048),
]


def ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def ceil_to_ue8m0(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s (exact, via frexp: s = m * 2^e with m in [0.5, 1)); NaN/inf kept."""
    m, e = torch.frexp(s)
    e = e - (m == 0.5).to(e.dtype)
    return torch.where(torch.isfinite(s), torch.ldexp(torch.ones_like(s), e), s)


def _scale(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    s = amax.float().clamp(min=AMAX_FLOOR) / FP8_MAX
    return ceil_to_ue8m0(s) if ue8m0 else s


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = ceil_div(x.shape[-1], multiple) * multiple - x.shape[-1]
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def col_major_tma_aligned(scales: torch.Tensor) -> torch.Tensor:
    """Same values, MN-major storage with the M dimension padded to a multiple of 4 (the TMA layout)."""
    *batch, m, kb = scales.shape
    m_pad = ceil_div(m, 4) * 4
    storage = torch.zeros(*batch, kb, m_pad, dtype=scales.dtype, device=scales.device)
    storage[..., :m] = scales.transpose(-1, -2)
    return storage.transpose(-1, -2)[..., :m, :]


def quantize_per_token_group(
    x: torch.Tensor, group_size: int = 128, ue8m0: bool = False, col_major_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x group_size groups along the last dim: q = fp8(x / s), s = max(amax, 1e-4) / 448."""
    k = x.shape[-1]
    xg = _pad_last(x.float(), group_size).unflatten(-1, (-1, group_size))
    s = _scale(xg.abs().amax(dim=-1), ue8m0)
    q = _to_fp8(xg / s.unsqueeze(-1)).flatten(-2)[..., :k]
    return q.contiguous(), (col_major_tma_aligned(s) if col_major_scales else s)


def dequantize_per_token_group(
    q: torch.Tensor, scales: torch.Tensor, group_size: int = 128, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    k = q.shape[-1]
    s = scales.float().repeat_interleave(group_size, dim=-1)[..., :k]
    return (q.float() * s).to(out_dtype)


def quantize_per_block(
    w: torch.Tensor, block_size: int = 128, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """block_size x block_size blocks over the last two dims; scale_inv follows HF (W ~= q * scale_inv)."""
    n, k = w.shape[-2:]
    wp = _pad_last(_pad_last(w.float(), block_size).transpose(-1, -2), block_size).transpose(-1, -2)
    nb, kb = wp.shape[-2] // block_size, wp.shape[-1] // block_size
    blocks = wp.unflatten(-1, (kb, block_size)).unflatten(-3, (nb, block_size))  # [..., nb, bs, kb, bs]
    s = _scale(blocks.abs().amax(dim=(-3, -1)), ue8m0)  # [..., nb, kb]
    q = _to_fp8(blocks / s[..., :, None, :, None]).flatten(-4, -3).flatten(-2)[..., :n, :k]
    return q.contiguous(), s


def dequantize_per_block(
    q: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    n, k = q.shape[-2:]
    s = scale_inv.float().repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return (q.float() * s[..., :n, :k]).to(out_dtype)


def _expand_k(scales: torch.Tensor, k: int) -> torch.Tensor:
    return scales.double().repeat_interleave(BLOCK, dim=-1)[..., :k]


def fp8_gemm_nt(a, sa, b, sb, out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """D[m, n] = sum_kb (sum_{k in kb} A[m,k] B[n,k]) * sa[m,kb] * sb[n//128, kb], evaluated in float64."""
    k = a.shape[-1]
    sb_rows = sb.double().repeat_interleave(BLOCK, dim=-2)[..., : b.shape[-2], :]
    a64 = a.double() * _expand_k(sa, k)
    b64 = b.double() * _expand_k(sb_rows, k)
    return (a64 @ b64.transpose(-1, -2)).to(out_dtype)


def m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices, out_dtype: torch.dtype = torch.float64):
    """Row r uses group m_indices[r]; rows with -1 are skipped and come out zero."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64, device=a.device)
    for g in torch.unique(m_indices).tolist():
        if g < 0:
            continue
        rows = (m_indices == g).nonzero().squeeze(1)
        out[rows] = fp8_gemm_nt(a[rows], sa[rows], b[g], sb[g])
    return out.to(out_dtype)


def m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, out: torch.Tensor) -> torch.Tensor:
    """Rows [0, masked_m[g]) of group g are computed into a copy of `out`; the other rows keep its values."""
    out = out.clone()
    for g, m in enumerate(masked_m.tolist()):
        out[g, :m] = fp8_gemm_nt(a[g, :m], sa[g, :m], b[g], sb[g]).to(out.dtype)
    return out


def fp8_gemm_wgrad_nt(a, sa, b, sb, out: torch.Tensor) -> torch.Tensor:
    """out + A Bᵀ with 1x128 scales on both operands (per row of A and per row of B), in float64."""
    k = a.shape[-1]
    prod = (a.double() * _expand_k(sa, k)) @ (b.double() * _expand_k(sb, k)).t()
    return (out.double() + prod).to(out.dtype)


def k_grouped_fp8_gemm_wgrad_nt(a, sa, b, sb, ks, out: torch.Tensor) -> torch.Tensor:
    """Group g reduces over its own K segment a[:, off_g : off_g + ks[g]] (scales restart per segment)."""
    out = out.clone()
    k_off = s_off = 0
    for g, k in enumerate(int(k) for k in ks):
        kb = ceil_div(k, BLOCK)
        out[g] = fp8_gemm_wgrad_nt(
            a[:, k_off : k_off + k],
            sa[:, s_off : s_off + kb],
            b[:, k_off : k_off + k],
            sb[:, s_off : s_off + kb],
            out[g],
        )
        k_off, s_off = k_off + k, s_off + kb
    return out


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity metric: 1 - 2 sum(xy) / sum(x^2 + y^2), in float64 (0 = identical)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0
