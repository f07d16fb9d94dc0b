"""Plain-PyTorch, single-process definitions of what `dsv3.ep.Buffer` computes: given every rank's inputs
(lists indexed by rank), what one rank receives and what each rank gets back. The readable semantics the
backends are tested against (SPEC §5, DeepEP's)."""

from __future__ import annotations

import torch

__all__ = [
    "combine_reference",
    "dispatch_reference",
    "low_latency_combine_reference",
    "low_latency_dispatch_reference",
]


def _owner(e: int, num_experts: int, num_ranks: int) -> int:
    return e // (num_experts // num_ranks)


def dispatch_reference(xs, topk_idxs, topk_weights, num_experts: int, rank: int, expert_alignment: int = 1):
    """What `rank` receives: (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
    recv_src_idx, rank_prefix_matrix). Sources in rank order, each source's tokens in index order; a token
    travels once to every rank holding one of its experts."""
    R = len(xs)
    L = num_experts // R
    rows, idx_rows, w_rows, src = [], [], [], []
    sent = torch.zeros((R, R), dtype=torch.int64)
    per_expert = torch.zeros(L, dtype=torch.int64)
    for s in range(R):
        for t in range(xs[s].shape[0]):
            experts = [int(e) for e in topk_idxs[s][t] if e >= 0]
            for r in sorted({_owner(e, num_experts, R) for e in experts}):
                sent[s, r] += 1
            if rank not in {_owner(e, num_experts, R) for e in experts}:
                continue
            rows.append(xs[s][t])
            src.append(t)
            local = [
                int(e) - rank * L if e >= 0 and _owner(int(e), num_experts, R) == rank else -1
                for e in topk_idxs[s][t]
            ]
            idx_rows.append(torch.tensor(local, dtype=torch.int64))
            w_rows.append(torch.where(torch.tensor(local) >= 0, topk_weights[s][t], torch.zeros(())))
            for e in local:
                if e >= 0:
                    per_expert[e] += 1
    k = topk_idxs[0].shape[1]
    H = xs[0].shape[1]
    recv_x = torch.stack(rows) if rows else xs[0].new_empty((0, H))
    recv_idx = torch.stack(idx_rows) if idx_rows else torch.empty((0, k), dtype=torch.int64)
    recv_w = torch.stack(w_rows).float() if w_rows else torch.empty((0, k))
    a = expert_alignment
    counts = [int((c + a - 1) // a * a) for c in per_expert]
    return (
        recv_x,
        recv_idx,
        recv_w,
        counts,
        torch.tensor(src, dtype=torch.int32),
        sent.cumsum(0).to(torch.int32),
    )


def combine_reference(outs, topk_idxs, num_experts: int, rank: int, bias=()):
    """What `rank` gets back from combine when every rank r returns `outs[r]` (its received rows in dispatch
    order): bf16/fp32 of bias + Σ over destination ranks ascending of the token's row there, in fp32. With
    more than one node (R > 8, a multiple of 8) each node's sum is rounded to the row dtype before the fp32
    sum of the node partials (DeepEP's internode combine)."""
    R = len(outs)
    n = topk_idxs[rank].shape[0]
    H = outs[0].shape[1]
    acc = torch.zeros((n, H), dtype=torch.float32)
    for b in bias:
        acc += b.float()
    # position of each (source token) row at each destination
    pos = [dict() for _ in range(R)]
    for r in range(R):
        i = 0
        for s in range(R):
            for t in range(topk_idxs[s].shape[0]):
                if r in {_owner(int(e), num_experts, R) for e in topk_idxs[s][t] if e >= 0}:
                    pos[r][(s, t)] = i
                    i += 1
    out_dtype = torch.float32 if outs[0].dtype == torch.float32 else torch.bfloat16
    node = 8 if R > 8 and R % 8 == 0 else R  # more than one node: node partials rounded once, then summed
    for first in range(0, R, node):
        part = acc if node == R else torch.zeros((n, H), dtype=torch.float32)
        for r in range(first, first + node):
            for t in range(n):
                if (rank, t) in pos[r]:
                    part[t] += outs[r][pos[r][(rank, t)]].float()
        if node != R:
            acc += part.to(out_dtype).float()
    return acc.to(out_dtype)


def low_latency_dispatch_reference(xs, topk_idxs, num_experts: int, rank: int, T: int):
    """Per local expert e of `rank`: the list of (source rank, source token) rows it receives, in the order
    dsv3 packs them (sources ascending, tokens ascending), and recv_count [L]."""
    R = len(xs)
    L = num_experts // R
    rows = [[] for _ in range(L)]
    for s in range(R):
        for e in range(L):
            g = rank * L + e
            for t in range(xs[s].shape[0]):
                for j in range(topk_idxs[s].shape[1]):
                    if int(topk_idxs[s][t, j]) == g:
                        rows[e].append((s, t))
    return rows, torch.tensor([len(r) for r in rows], dtype=torch.int32)


def low_latency_combine_reference(expert_rows, topk_idx, topk_weights, hidden: int):
    """bf16(Σ_k in order of topk_weights[t, k] · expert_rows(t, e_k)) in fp32, skipping -1 entries;
    expert_rows(token, global expert) is the row that expert computed for the token."""
    n, k = topk_idx.shape
    out = torch.zeros((n, hidden), dtype=torch.float32)
    for t in range(n):
        for j in range(k):
            e = int(topk_idx[t, j])
            if e >= 0:
                out[t] += expert_rows(t, e).float() * topk_weights[t, j].float()
    return out.to(torch.bfloat16)
