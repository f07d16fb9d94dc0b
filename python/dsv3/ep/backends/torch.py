"""The `torch` backend of `dsv3.ep.Buffer`: every exchange is one `all_to_all_single` of packed rows over
torch.distributed (gloo on CPU, NCCL on GPU), after one small collective for the counts. It is the portable
path and the reference the CUDA backends are tested against.

Each row travels once per destination rank (not once per (token, expert) pair) with everything the receiver
needs packed behind its payload (FP8 scales, top-k ids and weights, source token index) as raw bytes: one
collective per dispatch or combine whatever the dtypes, and gloo never sees a dtype it lacks (bf16, fp8).
The semantics are those of python/dsv3/ep/backends/__init__.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .. import errors

__all__ = ["TorchBackend"]

NUM_MAX_NVL_PEERS = 8  # ranks per node in DeepEP's geometry
SPLIT_ROW_BYTES = 1024  # rows at least this wide travel apart from their metadata (exchange_parts)


# ---- packing rows of several tensors into one byte matrix ----------------------------------------------


def _as_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    width = 1
    for d in t.shape[1:]:
        width *= d
    return t.reshape(rows, width).contiguous().view(torch.uint8)


def pack_rows(parts: Sequence[torch.Tensor], rows: int, device: torch.device) -> torch.Tensor:
    """[rows, Σ bytes] uint8: the rows of every part (any dtype, leading dim `rows`) side by side."""
    mats = [_as_rows(p, rows) for p in parts]
    if not mats:
        return torch.empty((rows, 0), dtype=torch.uint8, device=device)
    return torch.cat(mats, dim=1) if len(mats) > 1 else mats[0]


def unpack_rows(
    packed: torch.Tensor, spec: Sequence[tuple[torch.dtype, tuple[int, ...]]]
) -> list[torch.Tensor]:
    """Inverse of `pack_rows` given each part's (dtype, trailing shape)."""
    rows, out, col = packed.shape[0], [], 0
    for dtype, tail in spec:
        width = dtype.itemsize
        for d in tail:
            width *= d
        part = packed[:, col : col + width]
        if not part.is_contiguous() or part.storage_offset() % dtype.itemsize:
            part = part.clone(memory_format=torch.contiguous_format)
        part = part.view(dtype).view(rows, *tail)
        out.append(part)
        col += width
    return out


def _spec(t: torch.Tensor | None) -> tuple[torch.dtype, tuple[int, ...]] | None:
    return None if t is None else (t.dtype, tuple(t.shape[1:]))


def channel_prefix_matrix(is_token_in_rank: torch.Tensor, num_channels: int) -> torch.Tensor:
    """[R, C] int32: rows this rank sends to rank r from channels 0..c (inclusive); channel c covers tokens
    [min(c·⌈n/C⌉, n), min((c+1)·⌈n/C⌉, n))."""
    n, num_ranks = is_token_in_rank.shape
    dev = is_token_in_rank.device
    if n == 0:
        return torch.zeros((num_ranks, num_channels), dtype=torch.int32, device=dev)
    per = -(-n // num_channels)
    padded = torch.zeros((num_channels * per, num_ranks), dtype=torch.int32, device=dev)
    padded[:n] = is_token_in_rank
    return padded.view(num_channels, per, num_ranks).sum(1).t().cumsum(1).to(torch.int32)


class TorchBackend:
    """Dispatch/combine over `group` with `all_to_all_single`. Count tensors live on `comm_device` (CPU for
    gloo, the current CUDA device for NCCL); payload tensors stay where the caller's tensors are."""

    name = "torch"

    def __init__(self, group, rank: int, num_ranks: int):
        self.group, self.rank, self.num_ranks = group, rank, num_ranks
        backend = str(dist.get_backend(group)).lower()
        self.gloo = "gloo" in backend
        self.comm_device = (
            torch.device("cuda", torch.cuda.current_device())
            if not self.gloo and torch.cuda.is_available()
            else torch.device("cpu")
        )

    # ---- collectives with timeouts turned into EPTimeoutError -------------------------------------------

    def _run(self, what: str, fn: Callable[[], object]):
        try:
            return fn()
        except RuntimeError as err:  # DistBackendError and gloo's timeouts are RuntimeErrors
            new = errors.translate(err, what, self.rank)
            if new is err:
                raise
            raise new from err

    def all_gather_counts(self, vec: torch.Tensor) -> torch.Tensor:
        """[R, m] int32: every rank's int32 vector [m], in rank order."""
        vec = vec.to(self.comm_device, torch.int32).contiguous()
        parts = [torch.empty_like(vec) for _ in range(self.num_ranks)]
        self._run("count exchange", lambda: dist.all_gather(parts, vec, group=self.group))
        return torch.stack(parts)

    def exchange_rows(
        self, packed: torch.Tensor, send_splits: list[int], recv_splits: list[int], async_op: bool = False
    ):
        """all_to_all_single of a [rows, B] uint8 matrix; returns (received, work or None)."""
        out = packed.new_empty((sum(recv_splits), packed.shape[1]))
        if packed.shape[1] == 0:  # nothing but row counts to move: keep every rank in the collective anyway
            packed = packed.new_empty((packed.shape[0], 1))
            out = out.new_empty((out.shape[0], 1))
        work = self._run(
            "row exchange",
            lambda: dist.all_to_all_single(
                out, packed, recv_splits, send_splits, group=self.group, async_op=async_op
            ),
        )
        return out, work

    def _wait(self, work, what: str) -> None:
        if work is not None:
            self._run(what, work.wait)

    def exchange_parts(self, parts, send_splits: list[int], recv_splits: list[int], what: str) -> list:
        """Exchange the rows of several tensors (leading dim = rows, ordered by destination). Small rows
        travel packed in one collective; a payload of >= SPLIT_ROW_BYTES per row (the first part) travels
        alone, viewed as bytes, and the rest packed in a second one: two collectives cost less than copying
        the payload into and out of a packed matrix."""
        rows, dev = parts[0].shape[0], parts[0].device
        specs = [_spec(p) for p in parts]
        head = _as_rows(parts[0], rows)
        if len(parts) > 1 and head.shape[1] >= SPLIT_ROW_BYTES:
            got_head, w1 = self.exchange_rows(head, send_splits, recv_splits, async_op=True)
            got_rest, w2 = self.exchange_rows(pack_rows(parts[1:], rows, dev), send_splits, recv_splits)
            self._wait(w1, what)
            self._wait(w2, what)
            first = got_head.view(specs[0][0]).view(-1, *specs[0][1])
            return [first, *unpack_rows(got_rest, specs[1:])]
        got, work = self.exchange_rows(pack_rows(parts, rows, dev), send_splits, recv_splits)
        self._wait(work, what)
        if len(parts) == 1:
            return [got.view(specs[0][0]).view(-1, *specs[0][1])]
        return unpack_rows(got, specs)

    # ---- normal mode ------------------------------------------------------------------------------------

    def intranode_dispatch(
        self,
        x,
        x_scales,
        topk_idx,
        topk_weights,
        num_tokens_per_rank,
        is_token_in_rank,
        num_tokens_per_expert,
        cached_num_recv_tokens,
        cached_rank_prefix_matrix,
        cached_channel_prefix_matrix,
        expert_alignment,
        num_worst_tokens,
        config,
    ):
        R, rank, dev = self.num_ranks, self.rank, x.device
        cached = cached_rank_prefix_matrix is not None
        if cached:
            rank_prefix_matrix = cached_rank_prefix_matrix
            cpm = cached_channel_prefix_matrix
            col = rank_prefix_matrix[:, rank].to(torch.int64)
            recv_from = torch.diff(col, prepend=col.new_zeros(1))
        else:
            cpm = channel_prefix_matrix(is_token_in_rank, config.num_channels)
            E = num_tokens_per_expert.numel()
            L = E // R
            mine = torch.cat(
                [num_tokens_per_rank.flatten(), num_tokens_per_expert.flatten(), cpm.flatten()]
            ).to(torch.int32)
            table = self.all_gather_counts(mine).to(dev).long()  # [src, R + E + R·C]
            sent = table[:, :R]  # [src, dst]
            rank_prefix_matrix = sent.cumsum(0).to(torch.int32)
            recv_from = sent[:, rank]
            per_expert = table[:, R + rank * L : R + (rank + 1) * L].sum(0)
            a = max(int(expert_alignment), 1)
            num_recv_per_expert = (((per_expert + a - 1) // a) * a).tolist()
            src_cpm = table[:, R + E :].view(R, R, -1)[:, rank, :]  # source s's prefix toward this rank
            start = recv_from.cumsum(0) - recv_from
            recv_channel_prefix_matrix = (
                start[:, None] + torch.cat([src_cpm.new_zeros(R, 1), src_cpm[:, :-1]], 1)
            ).to(torch.int32)

        send_to = cpm[:, -1].long() if cpm.shape[1] else torch.zeros(R, dtype=torch.long, device=dev)
        dst, tok = is_token_in_rank.t().nonzero(as_tuple=True)  # by destination, then token
        parts = [x.index_select(0, tok)]  # index_select: several times faster than x[tok] for wide rows
        if x_scales is not None:
            parts.append(x_scales.index_select(0, tok))
        if not cached:
            parts.append(tok.to(torch.int32).unsqueeze(1))
            if topk_idx is not None:
                parts += [topk_idx.index_select(0, tok).long(), topk_weights.index_select(0, tok).float()]
        got = self.exchange_parts(parts, send_to.tolist(), recv_from.tolist(), "dispatch")
        recv_x = got.pop(0)
        recv_x_scales = got.pop(0) if x_scales is not None else None
        if cached:
            return recv_x, recv_x_scales, None, None, [], None, None, None, None, None

        recv_src_idx = got.pop(0).flatten()
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            gidx, w = got
            lo = rank * L
            mine_mask = (gidx >= lo) & (gidx < lo + L)
            recv_topk_idx = torch.where(mine_mask, gidx - lo, torch.full_like(gidx, -1))
            recv_topk_weights = torch.where(mine_mask, w, torch.zeros_like(w))
        counts = is_token_in_rank.to(torch.int32)
        send_head = torch.where(is_token_in_rank, counts.cumsum(0) - 1, torch.full_like(counts, -1)).to(
            torch.int32
        )
        num_recv = recv_x.shape[0]
        if num_worst_tokens > 0:
            if num_recv > num_worst_tokens:
                raise RuntimeError(
                    f"dispatch: rank {rank} received {num_recv} tokens, more than num_worst_tokens="
                    f"{num_worst_tokens}"
                )
            pad = num_worst_tokens - num_recv

            def grow(t, fill):
                if t is None:
                    return None
                tail = torch.full((pad, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
                return torch.cat([t, tail]) if pad else t

            recv_x = grow(recv_x, 0)
            recv_x_scales = grow(recv_x_scales, 0)
            recv_topk_idx = grow(recv_topk_idx, -1)
            recv_topk_weights = grow(recv_topk_weights, 0)
            recv_src_idx = grow(recv_src_idx, -1)
            num_recv_per_expert = []
        return (
            recv_x,
            recv_x_scales,
            recv_topk_idx,
            recv_topk_weights,
            num_recv_per_expert,
            rank_prefix_matrix,
            cpm.to(torch.int32),
            recv_channel_prefix_matrix,
            recv_src_idx.to(torch.int32),
            send_head,
        )

    def intranode_combine(
        self,
        x,
        topk_weights,
        bias_0,
        bias_1,
        src_idx,
        rank_prefix_matrix,
        channel_prefix_matrix,
        send_head,
        config,
    ):
        R, rank, dev = self.num_ranks, self.rank, x.device
        col = rank_prefix_matrix[:, rank].to(torch.int64)
        back_to = torch.diff(col, prepend=col.new_zeros(1))  # rows of each source, in x's order
        num_recv = int(col[-1]) if R else 0
        rows_from = (send_head >= 0).sum(0).long()  # rows this rank sent to each destination
        xr = x[:num_recv]  # num_worst_tokens padding never travels
        parts = [xr] if topk_weights is None else [xr, topk_weights[:num_recv].to(torch.float32)]
        got = self.exchange_parts(parts, back_to.tolist(), rows_from.tolist(), "combine")

        offsets = rows_from.cumsum(0) - rows_from
        # More than one node (R > 8, DeepEP's internode geometry): each node's copies are summed first and
        # rounded to the row dtype once (what travels between nodes), then node partials add up in fp32.
        node = NUM_MAX_NVL_PEERS if R > NUM_MAX_NVL_PEERS and R % NUM_MAX_NVL_PEERS == 0 else R
        row_of = torch.where(send_head >= 0, offsets.view(1, -1) + send_head.long(), -1)
        reduce = _combine_reduce(dev)
        combined = reduce(got[0], row_of, bias_0, bias_1, node)
        wsum = None if topk_weights is None else reduce(got[1], row_of, None, None, R)
        return combined, wsum

    # ---- low-latency mode -------------------------------------------------------------------------------

    def _ll_pairs(self, topk_idx: torch.Tensor, num_experts: int):
        """The (token, slot) pairs with an expert, ordered by destination rank, local expert, then token,
        and the per-expert counts [E] this rank sends."""
        n, k = topk_idx.shape
        flat = topk_idx.flatten().long()
        pair = (flat >= 0).nonzero().flatten()
        key = flat[pair] * max(n, 1) + pair // k  # expert-major, token-minor
        pair = pair[torch.argsort(key, stable=True)]
        counts = torch.bincount(flat[pair], minlength=num_experts)
        return pair, counts

    def low_latency_dispatch(
        self,
        x,
        topk_idx,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        use_fp8,
        round_scale,
        use_ue8m0,
        return_recv_hook,
    ):
        from ... import ops  # the FP8 cast is dsv3's 1x128 quantization

        R, rank, dev = self.num_ranks, self.rank, x.device
        T, H, k = num_max_dispatch_tokens_per_rank, x.shape[1], topk_idx.shape[1]
        L = num_experts // R
        pair, counts = self._ll_pairs(topk_idx, num_experts)
        tok = pair // k
        table = self.all_gather_counts(counts.to(torch.int32)).to(dev).long()  # [src, E]
        recv_cnt = table[:, rank * L : (rank + 1) * L]  # [src, L]
        if use_fp8:
            q, s = ops.quantize_per_token_group(x, 128, ue8m0=round_scale or use_ue8m0)
            if use_ue8m0:
                s = _pack_ue8m0(s)
            parts = [q[tok], s[tok]]
        else:
            parts = [x[tok]]
        parts.append(tok.to(torch.int32).unsqueeze(1))
        packed = pack_rows(parts, len(tok), dev)
        send_splits = counts.view(R, L).sum(1).tolist()
        recv_splits = recv_cnt.sum(1).tolist()
        recv, work = self.exchange_rows(packed, send_splits, recv_splits, async_op=return_recv_hook)

        # where every received row lands: expert e's rows in per-source blocks, sources ascending
        begin = recv_cnt.cumsum(0) - recv_cnt  # [src, L]
        blocks = recv_cnt.flatten()  # (src, e) order: the order rows arrive in
        block_start = blocks.cumsum(0) - blocks
        e_of = torch.arange(L, device=dev).repeat(R)
        row_block = torch.repeat_interleave(torch.arange(R * L, device=dev), blocks)
        within = torch.arange(int(blocks.sum()), device=dev) - block_start[row_block]
        dest = e_of[row_block] * (R * T) + begin.flatten()[row_block] + within

        if use_fp8:
            sdim = H // 512 if use_ue8m0 else H // 128
            sdtype = torch.int32 if use_ue8m0 else torch.float32
            recv_x = torch.empty((L, R * T, H), dtype=torch.float8_e4m3fn, device=dev)
            recv_scales = torch.empty((L, sdim, R * T), dtype=sdtype, device=dev).transpose(1, 2)
            spec = [(torch.float8_e4m3fn, (H,)), (sdtype, (sdim,)), (torch.int32, (1,))]
        else:
            recv_x = torch.empty((L, R * T, H), dtype=x.dtype, device=dev)
            recv_scales = None
            spec = [(x.dtype, (H,)), (torch.int32, (1,))]
        src_info = torch.full((L, R * T), -1, dtype=torch.int32, device=dev)
        recv_count = recv_cnt.sum(0).to(torch.int32)
        layout_range = ((begin.t() << 32) | recv_cnt.t()).contiguous()  # [L, src] int64

        def receive():
            self._wait(work, "low-latency dispatch")
            got = unpack_rows(recv, spec)
            recv_x.view(L * R * T, H)[dest] = got[0]
            if recv_scales is not None:  # a column-major view: index it by (expert, slot)
                recv_scales[dest // (R * T), dest % (R * T)] = got[1]
            src_info.view(-1)[dest] = got[-1].flatten()

        if return_recv_hook:
            return recv_x, recv_scales, recv_count, src_info, layout_range, receive
        receive()
        return recv_x, recv_scales, recv_count, src_info, layout_range, None

    def low_latency_combine(
        self,
        x,
        topk_idx,
        topk_weights,
        src_info,
        layout_range,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        zero_copy,
        return_recv_hook,
        out,
    ):
        R, dev = self.num_ranks, x.device
        T, H = num_max_dispatch_tokens_per_rank, x.shape[-1]
        L = num_experts // R
        n, k = topk_idx.shape
        cnt = (layout_range & 0xFFFFFFFF).t().contiguous()  # [src, L]
        begin = (layout_range >> 32).t().contiguous()
        blocks = cnt.flatten()  # (src, e): the order the rows came in, and go back in
        block_start = blocks.cumsum(0) - blocks
        row_block = torch.repeat_interleave(torch.arange(R * L, device=dev), blocks)
        within = torch.arange(int(blocks.sum()), device=dev) - block_start[row_block]
        e_of = torch.arange(L, device=dev).repeat(R)
        src_rows = e_of[row_block] * (R * T) + begin.flatten()[row_block] + within
        packed = pack_rows([x.reshape(L * R * T, H)[src_rows]], len(src_rows), dev)
        pair, counts = self._ll_pairs(topk_idx, num_experts)
        recv, work = self.exchange_rows(
            packed, cnt.sum(1).tolist(), counts.view(R, L).sum(1).tolist(), async_op=return_recv_hook
        )
        result = out if out is not None else torch.empty((n, H), dtype=torch.bfloat16, device=dev)

        def receive():
            self._wait(work, "low-latency combine")
            rows = unpack_rows(recv, [(x.dtype, (H,))])[0]
            tok, slot = pair // k, pair % k
            acc = torch.zeros((n, H), dtype=torch.float32, device=dev)
            w = topk_weights.float()
            for j in range(k):  # k order, as the GPU kernels sum
                sel = (slot == j).nonzero().flatten()
                if sel.numel():
                    t = tok[sel]
                    acc.index_add_(0, t, rows[sel].float() * w[t, j].unsqueeze(1))
            result.copy_(acc.to(result.dtype))

        if return_recv_hook:
            return result, receive
        receive()
        return result, None


def _combine_reduce(device: torch.device):
    """The combine's sums: dsv3's kernel (CPU, or CUDA when dsv3 has its CUDA kernels), else the reference."""
    import dsv3

    if device.type == "cpu" or (device.type == "cuda" and dsv3.build_info()["cuda_archs"]):
        return torch.ops.dsv3.ep_combine_reduce
    from ...ops import reference

    return reference.ep_combine_reduce


def _pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales [n, G] -> their exponent bytes packed 4 per int32 [n, G/4] (little end
    first), DeepEP's UE8M0 layout."""
    e = (scales.contiguous().view(torch.int32) >> 23) & 0xFF
    e = e.view(e.shape[0], e.shape[1] // 4, 4).to(torch.int32)
    return e[..., 0] | (e[..., 1] << 8) | (e[..., 2] << 16) | (e[..., 3] << 24)
