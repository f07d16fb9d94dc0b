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


# ---- MLA decode (SPEC §4) -------------------------------------------------------------------------------

PAGE_SIZE = 64
MLA_FIXED_COST_BLOCKS = 5
MLA_META_INTS = 8


def get_mla_decode_metadata(
    cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int, num_sm_parts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-KV schedule (csrc/include/dsv3/mla_sched.h, mirrored line for line): `num_sm_parts` workers
    each take a contiguous run of 64-token blocks, in request order, of about equal cost (blocks + 5 per
    request). Returns `(metadata int32 [parts, 8], num_splits int32 [b + 1])`; metadata row p is
    `[begin_req, begin_block, end_req (inclusive), end_block (exclusive), begin_split, 0, 0, 0]` and request i
    owns split slots `num_splits[i] .. num_splits[i + 1] - 1`."""
    lens = [max(int(x), 0) for x in cache_seqlens.tolist()]
    blocks = [ceil_div(x, PAGE_SIZE) for x in lens]
    batch, parts = len(lens), int(num_sm_parts)
    total = sum(blocks) + MLA_FIXED_COST_BLOCKS * batch
    payload = ceil_div(total, parts) + MLA_FIXED_COST_BLOCKS
    meta = [[0] * MLA_META_INTS for _ in range(parts)]
    num_splits = [0] * (batch + 1)
    req = block = split = cum = 0
    for p in range(parts):
        meta[p][0], meta[p][1], meta[p][4] = req, block, split
        remain = payload
        while req < batch:
            left = blocks[req] - block
            if remain >= left + MLA_FIXED_COST_BLOCKS or p == parts - 1:
                cum += split + 1
                num_splits[req + 1] = cum
                remain -= left + MLA_FIXED_COST_BLOCKS
                req, block, split = req + 1, 0, 0
            else:
                if remain - MLA_FIXED_COST_BLOCKS > 0:
                    block += remain - MLA_FIXED_COST_BLOCKS
                    split += 1
                break
        if block > 0:
            meta[p][2], meta[p][3] = req, block
        else:
            meta[p][2], meta[p][3] = req - 1, (blocks[req - 1] if req > 0 else 0)
    dev = cache_seqlens.device
    return (
        torch.tensor(meta, dtype=torch.int32, device=dev),
        torch.tensor(num_splits, dtype=torch.int32, device=dev),
    )


def mla_fp8_token_bytes(d_qk: int, d_v: int) -> int:
    """Bytes per token and KV head of the packed FP8 cache: d_v e4m3, ceil(d_v/128) fp32 scales, the
    d_qk - d_v rope values in bf16 (656 for V3's 576/512)."""
    return d_v + 4 * ceil_div(d_v, BLOCK) + 2 * (d_qk - d_v)


def quantize_mla_kv_fp8(kv: torch.Tensor, head_dim_v: int) -> torch.Tensor:
    """Pack `kv [..., d_qk]` into the FP8 cache layout `uint8 [..., mla_fp8_token_bytes(d_qk, d_v)]`: the
    first `head_dim_v` values per token quantized in 1 x 128 groups (SPEC §2 scales), the rest kept as
    bf16."""
    d_v = head_dim_v
    q, s = quantize_per_token_group(kv[..., :d_v], BLOCK)
    rope = kv[..., d_v:].to(torch.bfloat16).contiguous()
    parts = [q.view(torch.uint8), s.contiguous().view(torch.uint8), rope.view(torch.uint8)]
    return torch.cat(parts, dim=-1)


def dequantize_mla_kv_fp8(packed: torch.Tensor, d_qk: int, head_dim_v: int) -> torch.Tensor:
    """Unpack the FP8 cache layout to fp32 `[..., d_qk]`: e4m3 · scale for the first d_v values (exact in
    fp32), then the bf16 rope values."""
    d_v, groups = head_dim_v, ceil_div(head_dim_v, BLOCK)
    packed = packed.view(torch.uint8)
    q = packed[..., :d_v].contiguous().view(FP8)
    s = packed[..., d_v : d_v + 4 * groups].contiguous().view(torch.float32)
    rope = packed[..., d_v + 4 * groups :].contiguous().view(torch.bfloat16)
    nope = q.float() * s.repeat_interleave(BLOCK, dim=-1)[..., :d_v]
    return torch.cat([nope, rope.float()], dim=-1)


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `q [b, s_q, h_q, d_qk]` over the paged cache `kv_cache [pages, 64, h_kv, d_qk]` (or the
    packed FP8 layout), V = the first `head_dim_v` columns of K, in fp32. Returns `out [b, s_q, h_q, d_v]` in
    q's dtype and `lse fp32 [b, h_q, s_q]` (natural log). With `causal` and s_q > 1, query token i sees keys
    `0 .. s_k - s_q + i`; a query that sees no key gets out = 0 and lse = +inf."""
    b, s_q, h_q, d_qk = q.shape
    h_kv = kv_cache.shape[2]
    if kv_cache.dtype in (torch.uint8, FP8):
        kv_cache = dequantize_mla_kv_fp8(kv_cache, d_qk, head_dim_v)
    scale = d_qk**-0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h_q, s_q), float("inf"), dtype=torch.float32, device=q.device)
    for i in range(b):
        s_k = int(cache_seqlens[i])
        pages = block_table[i, : ceil_div(s_k, PAGE_SIZE)].long()
        k = kv_cache[pages].flatten(0, 1)[:s_k].float()  # [s_k, h_kv, d_qk]
        k = k.repeat_interleave(h_q // h_kv, dim=1).transpose(0, 1)  # [h_q, s_k, d_qk]
        scores = q[i].float().transpose(0, 1) @ k.transpose(1, 2) * scale  # [h_q, s_q, s_k]
        if causal and s_q > 1:
            visible = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(diagonal=s_k - s_q)
            scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # -inf for a query with no key, NaN for a NaN query
        seen = ~torch.isneginf(row_lse)
        p = torch.exp(scores - torch.where(seen, row_lse, 0.0).unsqueeze(-1))  # rows without keys: all 0
        o = p @ k[..., :head_dim_v]  # [h_q, s_q, d_v]
        out[i] = o.transpose(0, 1)
        lse[i] = torch.where(seen, row_lse, float("inf"))
    return out.to(q.dtype), lse


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity metric: 1 - 2 sum(xy) / sum(x^2 + y^2), in float64 (0 = identical)."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0


def moe_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None = None,
    top_k: int = 8,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    norm_topk_prob: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's sigmoid router (SPEC §5) on router logits `[T, E]` fp32 -> `(topk_idx int64 [T, top_k],
    topk_weights fp32 [T, top_k])`.

    scores = sigmoid(logits); choice = scores + bias (eq. 16: the bias only steers selection). The E experts
    form `n_group` contiguous groups; a group's score is the sum of its two best choice values (its only one
    when a group holds one expert); the `topk_group` best groups are kept and the experts of the others are
    excluded. The `top_k` best experts of the kept groups are selected, and their weights are the unbiased
    scores, divided by their sum (+1e-20) when `norm_topk_prob`, times `routed_scaling_factor`.

    Order: "best" everywhere means choice value descending, ties to the lower index (groups and experts);
    the k outputs of a token are in that order. The weight sum adds the k scores left to right in that
    order. A token whose choice values are not all finite (a NaN logit, or a non-finite bias entry) gets
    indices 0..top_k-1 and NaN weights; other tokens are unaffected.

    Differences from transformers' DeepseekV3TopkRouter: excluded experts are never selected (the DeepSeek
    reference's -inf mask; transformers fills them with 0.0, which beats a kept expert whose biased score
    is negative); its `topk(sorted=False)` leaves the k outputs unordered and sums them in that order (the
    same sets; weights within an ulp or two when normalized); groups of one expert are allowed.
    """
    scores = logits.sigmoid()
    choice = scores if bias is None else scores + bias
    num_tokens, num_experts = choice.shape
    bad = ~torch.isfinite(choice).all(dim=-1, keepdim=True)
    choice = torch.where(bad, 0.0, choice)
    if n_group > 1:
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        best = torch.sort(grouped, dim=-1, descending=True, stable=True).values
        group_scores = best[..., 0] + best[..., 1] if best.shape[-1] > 1 else best[..., 0]
        kept = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = choice.masked_fill(~keep.repeat_interleave(num_experts // n_group, dim=1), float("-inf"))
    idx = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :top_k]
    idx = torch.where(bad, torch.arange(top_k, device=idx.device), idx)
    weights = scores.gather(1, idx)
    if norm_topk_prob:
        denominator = weights[:, :1].clone()
        for j in range(1, top_k):
            denominator = denominator + weights[:, j : j + 1]
        weights = weights / (denominator + 1e-20)
    weights = weights * routed_scaling_factor
    return idx, torch.where(bad, float("nan"), weights)


# ---- expert parallelism (SPEC §5; dsv3.ep) ----------------------------------------------------------------


def ep_dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layout of `topk_idx [n, k]` (expert ids in [-1, num_experts), -1 = no expert) over `num_ranks`
    ranks holding contiguous blocks of num_experts / num_ranks experts (rank = e // (E / R)), with
    `num_ranks_per_node` ranks per node (node = rank // num_ranks_per_node). Returns int32
    `num_tokens_per_rank [R]` (tokens with at least one expert on the rank), `num_tokens_per_rdma_rank
    [R / num_ranks_per_node]` (the same per node; empty [0] when R <= num_ranks_per_node), int32
    `num_tokens_per_expert [E]` ((token, k) entries per expert: a repeated expert counts twice) and bool
    `is_token_in_rank [n, R]`."""
    if num_experts % num_ranks:
        raise ValueError(f"num_ranks ({num_ranks}) must divide num_experts ({num_experts})")
    idx = topk_idx.long()
    tokens, device = idx.size(0), idx.device
    valid = idx >= 0
    num_tokens_per_expert = torch.bincount(idx[valid], minlength=num_experts).int()
    # -1 entries go to an extra column that is dropped: scatter de-duplicates the ranks of a token.
    rank = torch.where(valid, idx // (num_experts // num_ranks), num_ranks)
    is_token_in_rank = torch.zeros(tokens, num_ranks + 1, dtype=torch.bool, device=device)
    is_token_in_rank = is_token_in_rank.scatter_(1, rank, True)[:, :num_ranks].contiguous()
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    if num_ranks > num_ranks_per_node:
        in_node = is_token_in_rank.view(tokens, num_ranks // num_ranks_per_node, num_ranks_per_node).any(-1)
        num_tokens_per_rdma_rank = in_node.sum(0, dtype=torch.int32)
    else:
        num_tokens_per_rdma_rank = torch.zeros(0, dtype=torch.int32, device=device)
    return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank


def ep_combine_reduce(
    x: torch.Tensor,
    row_of: torch.Tensor,
    bias_0: torch.Tensor | None = None,
    bias_1: torch.Tensor | None = None,
    ranks_per_node: int = 8,
) -> torch.Tensor:
    """A combine's sums: out[t] = x.dtype(fp32(bias_0[t]) + fp32(bias_1[t]) + Σ_r fp32(x[row_of[t, r]]))
    over the ranks r with row_of[t, r] >= 0, ascending. When the R = row_of.shape[1] ranks span several
    nodes of `ranks_per_node` (R > ranks_per_node), each node's copies are summed into an fp32 partial that is
    rounded to x.dtype once before it joins the sum (an internode combine's per-node rounding)."""
    n, R = row_of.shape
    acc = torch.zeros((n, x.shape[1]), dtype=torch.float32, device=x.device)
    for b in (bias_0, bias_1):
        if b is not None:
            acc += b.float()
    node = ranks_per_node if ranks_per_node < R else max(R, 1)
    for first in range(0, R, node):
        part = acc if node >= R else torch.zeros_like(acc)
        for r in range(first, min(first + node, R)):
            tok = (row_of[:, r] >= 0).nonzero().flatten()
            part.index_add_(0, tok, x.index_select(0, row_of[tok, r]).float())
        if node < R:
            acc += part.to(x.dtype).float()
    return acc.to(x.dtype)
