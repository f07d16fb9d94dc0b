"""The `nvshmem` backend of `dsv3.ep.Buffer`: DeepEP's low-latency dispatch/combine as pure-RDMA sm_90a
kernels and its internode normal mode (RDMA once per destination node, then NVLink forwarding) on one NVSHMEM
symmetric buffer per rank (csrc/cuda/ep_nvshmem/). The kernels live in the extension `dsv3._C_nvshmem`, built
only when the CUDA build finds NVSHMEM (the `nvidia-nvshmem-cu13` wheel); it is imported lazily, so this
module imports everywhere and `NvshmemBackend.available()` says why not.

Normal mode: `internode_dispatch` / `internode_combine` (R = 8 * nodes, ranks node-major: rank = node * 8 +
local, PE = rank) return DeepEP's 10-tuple handle pieces; within one node (R <= 8) `intranode_dispatch` /
`intranode_combine` run the `torch` backend's NCCL exchange (the `nvlink` backend is the fast path there).
`internode_layout` mirrors csrc/include/dsv3/ep/internode_layout.h (checked against
`torch.ops.dsv3.ep_internode_layout`); `Config.get_rdma_buffer_size_hint` is its total.

Host logic shared with the kernels, tested on CPU (tests/ep/test_ll_layout.py):
- `ll_layout` / `low_latency_size_hint`: the buffer layout of csrc/include/dsv3/ep/ll_layout.h (two halves of
  [signals | send | recv]), checked against the C++ one through `torch.ops.dsv3.ep_ll_layout`;
- `ll_fp8_cast_reference`: the send phase's cast (1x128 groups, s = max(amax, 1e-4) / 448, power-of-two
  scales with round_scale / use_ue8m0) and `ll_pack_ue8m0`;
- `ll_send_slots` / `ll_recv_layout`: where each (token, k) lands (the slot is the number of earlier entries
  of this rank routed to the same expert; a block's begin is the prefix of the counts of lower sources),
  which gives the contract's packing order: per expert, source blocks ascending, tokens ascending.
Preconditions (DeepEP's): no expert twice in one token's top-k (both copies would come back to the same
combine slot), at most 11 top-k entries, hidden % 128 == 0 (% 512 with use_ue8m0).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..config import Config
from ..errors import EPTimeoutError
from .common import byte_buffer_view

__all__ = [
    "NvshmemBackend",
    "internode_combine_record_bytes",
    "internode_dispatch_record_bytes",
    "internode_layout",
    "ll_fp8_cast_reference",
    "ll_layout",
    "ll_pack_ue8m0",
    "ll_recv_layout",
    "ll_send_slots",
    "low_latency_size_hint",
]

LL_ALIGN = 128
LL_HEADER_BYTES = 16
LL_GROUP_SIZE = 128
LL_MAX_TOPK = 11
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4

# ---- buffer layout (mirror of csrc/include/dsv3/ep/ll_layout.h) ------------------------------------------


def _align(n: int) -> int:
    return (n + LL_ALIGN - 1) // LL_ALIGN * LL_ALIGN


def _check_geometry(T: int, hidden: int, num_ranks: int, num_experts: int) -> None:
    for name, v in (("num_max_dispatch_tokens_per_rank", T), ("hidden", hidden), ("num_ranks", num_ranks),
                    ("num_experts", num_experts)):  # fmt: skip
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if hidden % LL_GROUP_SIZE:
        raise ValueError(f"hidden must be a multiple of {LL_GROUP_SIZE}, got {hidden}")
    if num_experts % num_ranks:
        raise ValueError(f"num_experts must be a multiple of num_ranks ({num_ranks}), got {num_experts}")


def ll_layout(T: int, hidden: int, num_ranks: int, num_experts: int) -> dict:
    """Byte offsets of the low-latency buffer's regions, the same dict `torch.ops.dsv3.ep_ll_layout` returns
    as JSON. Each half: dispatch counts int32 [L][R], dispatch arrivals uint64 [L][R], combine arrivals
    uint64 [E], done counters int32 [L + 1], send (T messages or E*T combine rows), recv (E*T slots)."""
    _check_geometry(T, hidden, num_ranks, num_experts)
    L = num_experts // num_ranks
    dispatch_msg = (LL_HEADER_BYTES + max(2 * hidden, hidden + hidden // LL_GROUP_SIZE * 4) + 15) // 16 * 16
    combine_msg = 2 * hidden
    send_bytes = _align(max(T * dispatch_msg, num_experts * T * combine_msg))
    recv_bytes = _align(num_experts * T * max(dispatch_msg, combine_msg))
    halves, offset = [], 0
    for _ in range(2):
        h = {"dispatch_count": offset}
        h["dispatch_arrival"] = h["dispatch_count"] + _align(num_experts * 4)
        h["combine_arrival"] = h["dispatch_arrival"] + _align(num_experts * 8)
        h["done"] = h["combine_arrival"] + _align(num_experts * 8)
        h["send"] = h["done"] + _align((L + 1) * 4)
        h["send_bytes"] = send_bytes
        h["recv"] = h["send"] + send_bytes
        h["recv_bytes"] = recv_bytes
        h["end"] = offset = h["recv"] + recv_bytes
        halves.append(h)
    return {
        "num_max_dispatch_tokens_per_rank": T,
        "hidden": hidden,
        "num_ranks": num_ranks,
        "num_experts": num_experts,
        "num_local_experts": L,
        "dispatch_msg_bytes": dispatch_msg,
        "combine_msg_bytes": combine_msg,
        "header_bytes": LL_HEADER_BYTES,
        "fp8_scales_offset": LL_HEADER_BYTES + hidden,
        "halves": halves,
        "total_bytes": offset,
    }


def low_latency_size_hint(T: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """num_rdma_bytes a low-latency Buffer needs (DeepEP's get_low_latency_rdma_size_hint)."""
    return ll_layout(T, hidden, num_ranks, num_experts)["total_bytes"]


# ---- internode buffer layout (mirror of csrc/include/dsv3/ep/internode_layout.h) ---------------------------

NODE_RANKS = 8
INTERNODE_MAX_NODES = 32
INTERNODE_MAX_LOCAL_EXPERTS = 1024
_INTERNODE_META_WORDS = 1 + NODE_RANKS


def internode_dispatch_record_bytes(row_bytes: int, num_topk: int, num_scales: int) -> int:
    """Bytes of one dispatch queue record: the row, source rank + is-in-rank bits (8 bytes), int32 top-k ids,
    fp32 top-k weights, 4-byte scales, rounded up to 16."""
    return (row_bytes + 8 + 8 * num_topk + 4 * num_scales + 15) // 16 * 16


def internode_combine_record_bytes(hidden: int, num_topk: int) -> int:
    """Bytes of one combine queue record: a bf16 row and fp32 top-k weights, rounded up to 16."""
    return (2 * hidden + 4 * num_topk + 15) // 16 * 16


def internode_layout(
    num_ranks: int, num_channels: int, rdma_slots: int, nvl_slots: int, slot_bytes: int
) -> dict:
    """Byte offsets of the internode buffer's regions, the dict `torch.ops.dsv3.ep_internode_layout`
    returns as JSON: the barrier words, the words every call's sync zeroes [reset_begin, reset_end)
    (notify arrivals, RDMA and NVLink meta / head / flag words), the notify records, the RDMA queues (send
    staging and receive slots of slot_bytes each), then the NVLink receive slots (written through P2P)."""
    for name, v in (("num_ranks", num_ranks), ("num_channels", num_channels), ("rdma_slots", rdma_slots),
                    ("nvl_slots", nvl_slots), ("slot_bytes", slot_bytes)):  # fmt: skip
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if num_ranks <= NODE_RANKS or num_ranks % NODE_RANKS or num_ranks // NODE_RANKS > INTERNODE_MAX_NODES:
        raise ValueError(f"num_ranks must be 8 * nodes with 2..{INTERNODE_MAX_NODES} nodes, got {num_ranks}")
    if slot_bytes % 16:
        raise ValueError(f"slot_bytes must be a multiple of 16, got {slot_bytes}")
    R, C, N, P = num_ranks, num_channels, num_ranks // NODE_RANKS, NODE_RANKS
    record = (2 + INTERNODE_MAX_LOCAL_EXPERTS) * 4
    sizes = [
        ("barrier", R * 8),
        ("notify_arrival", R * 8),
        ("rdma_meta", C * N * _INTERNODE_META_WORDS * 8),
        ("rdma_head", C * N * 8),
        ("rdma_flag", C * N * rdma_slots * 8),
        ("nvl_meta", C * P * N * 8),
        ("nvl_head", C * P * 8),
        ("nvl_flag", C * P * nvl_slots * 8),
        ("notify_send", R * record),
        ("notify_recv", R * record),
        ("rdma_send", C * N * rdma_slots * slot_bytes),
        ("rdma_recv", C * N * rdma_slots * slot_bytes),
        ("nvl_recv", C * P * nvl_slots * slot_bytes),
    ]
    layout = {"num_ranks": R, "num_nodes": N, "num_channels": C, "rdma_slots": rdma_slots,
              "nvl_slots": nvl_slots, "slot_bytes": slot_bytes}  # fmt: skip
    offset = 0
    for name, size in sizes:
        layout[name] = offset
        offset += _align(size)
        if name == "barrier":
            layout["reset_begin"] = offset
        elif name == "nvl_flag":
            layout["reset_end"] = offset
    layout["notify_record_bytes"] = record
    layout["total_bytes"] = offset
    return layout


# ---- the send phase's FP8 cast and the packing order (references of the kernels) ------------------------


def _ceil_pow2(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s for positive normal s (exact: frexp, not log2); NaN/inf pass through."""
    mantissa, exponent = torch.frexp(s)
    pow2 = torch.ldexp(torch.ones_like(s), exponent)
    return torch.where((mantissa == 0.5) | ~torch.isfinite(s), s, pow2)


def ll_fp8_cast_reference(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The dispatch send phase's cast of x [n, H]: e4m3 [n, H] and fp32 scales [n, H/128] with
    s = max(amax, 1e-4) / 448 per 1x128 group (NaN kept), rounded up to a power of two with round_scale,
    q = e4m3(clamp(x / s, ±448))."""
    if x.dim() != 2 or x.shape[1] % LL_GROUP_SIZE:
        raise ValueError(f"x must be [n, H] with H a multiple of {LL_GROUP_SIZE}, got {tuple(x.shape)}")
    xg = x.float().unflatten(1, (-1, LL_GROUP_SIZE))
    amax = xg.abs().amax(dim=-1)
    s = torch.where(torch.isnan(amax), amax, amax.clamp_min(AMAX_FLOOR)) / FP8_MAX
    if round_scale:
        s = _ceil_pow2(s)
    q = (xg / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).flatten(1)
    return q, s


def ll_pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales [..., G] -> exponent bytes packed 4 per int32 [..., G/4], lowest group in the
    lowest byte (DeepEP's UE8M0 layout)."""
    if scales.dtype != torch.float32 or scales.shape[-1] % 4:
        raise ValueError(
            f"scales must be float32 with a multiple of 4 groups, got {scales.dtype} {tuple(scales.shape)}"
        )
    e = ((scales.contiguous().view(torch.int32) >> 23) & 0xFF).unflatten(-1, (-1, 4))
    return e[..., 0] | (e[..., 1] << 8) | (e[..., 2] << 16) | (e[..., 3] << 24)


def ll_send_slots(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot [n, k] int64, count [E] int64) of one rank's dispatch: the slot of entry (t, j) in its expert's
    region for this source is the number of entries before it (row-major) with the same expert; -1 for
    -1 entries. count[e] is what the rank sends to expert e as its count message."""
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be [n, k], got {tuple(topk_idx.shape)}")
    flat = topk_idx.flatten().long()
    if flat.numel() and (int(flat.max()) >= num_experts or int(flat.min()) < -1):
        raise ValueError(f"topk_idx entries must be in [-1, {num_experts}), got {flat.min()}..{flat.max()}")
    valid = flat >= 0
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    sorted_key, order = torch.sort(key, stable=True)
    first = torch.searchsorted(sorted_key, sorted_key)
    slot = torch.empty_like(flat)
    slot[order] = torch.arange(flat.numel(), device=flat.device) - first
    slot = torch.where(valid, slot, torch.full_like(slot, -1))
    count = torch.bincount(flat[valid], minlength=num_experts)
    return slot.view(topk_idx.shape), count


def ll_recv_layout(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From counts [R, L] (rows from source s to local expert l): (recv_count [L] int32, layout_range [L, R]
    int64 = begin << 32 | count, begin [L, R]) with begin = the counts of lower sources (a prefix, never an
    arrival order), as the receive kernel computes it."""
    if counts.dim() != 2:
        raise ValueError(f"counts must be [num_ranks, num_local_experts], got {tuple(counts.shape)}")
    c = counts.long().t()
    begin = c.cumsum(1) - c
    return c.sum(1).to(torch.int32), (begin << 32) | c, begin


# ---- the backend ---------------------------------------------------------------------------------------

# DeepEP's NVSHMEM settings (applied before init; a value already in the environment wins).
_NVSHMEM_ENV = {
    "NVSHMEM_IB_ENABLE_IBGDA": "1",
    "NVSHMEM_QP_DEPTH": "1024",
    "NVSHMEM_MAX_TEAMS": "7",
    "NVSHMEM_DISABLE_NVLS": "1",
    "NVSHMEM_CUMEM_GRANULARITY": str(2**29),
    "NVSHMEM_DISABLE_MNNVL": "1",
}
_ERROR_WHAT = {
    1: "low-latency dispatch count",
    2: "low-latency dispatch rows",
    3: "low-latency combine rows",
    5: "internode barrier",
    6: "internode notify",
    7: "internode dispatch (RDMA queue space at a forwarder)",
    8: "internode dispatch (forwarder: RDMA rows or NVLink queue space)",
    9: "internode dispatch (rows from a forwarder)",
    10: "internode combine (NVLink queue space at a forwarder)",
    11: "internode combine (forwarder: NVLink rows or RDMA queue space)",
    12: "internode combine (node partial sums)",
}
_ERROR_ROUTING, _ERROR_OVERFLOW = 4, 13


def _ops():
    """torch.ops.dsv3_nvshmem, loading dsv3._C_nvshmem on first use."""
    try:
        importlib.import_module("dsv3._C_nvshmem")
    except ImportError as err:
        raise RuntimeError(
            "dsv3.ep: the nvshmem backend needs dsv3._C_nvshmem, which is built only by a CUDA build that "
            f"finds NVSHMEM (pip install nvidia-nvshmem-cu13, or set NVSHMEM_DIR): {err}"
        ) from err
    return torch.ops.dsv3_nvshmem


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous and on a 16-byte boundary (the kernels move rows with 16-byte accesses)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


class NvshmemBackend:
    """Low-latency dispatch/combine over NVSHMEM for the ranks of `group` (one NVSHMEM runtime per process:
    PE = rank in the group). `timeout_s` bounds every wait of the kernels; a late peer raises
    EPTimeoutError (the kernel traps, so the CUDA context is lost as with DeepEP's timeout)."""

    name = "nvshmem"

    @staticmethod
    def available() -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        try:
            _ops()
        except RuntimeError as err:
            return False, str(err)
        return True, ""

    def __init__(
        self,
        group,
        num_rdma_bytes: int,
        rank: int,
        num_ranks: int,
        low_latency_mode: bool = True,
        num_qps_per_rank: int = 24,
        timeout_s: float = 100.0,
        allow_nvlink_for_low_latency_mode: bool = True,
    ):
        ok, why = self.available()
        if not ok:
            raise RuntimeError(f"dsv3.ep: the nvshmem backend is unavailable: {why}")
        if not isinstance(num_rdma_bytes, int) or num_rdma_bytes < 1:
            raise ValueError(f"num_rdma_bytes must be a positive int, got {num_rdma_bytes!r}")
        if not isinstance(num_qps_per_rank, int) or num_qps_per_rank < 1:
            raise ValueError(f"num_qps_per_rank must be a positive int, got {num_qps_per_rank!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        from .torch import TorchBackend

        self.group, self.rank, self.num_ranks = group, rank, num_ranks
        self.low_latency_mode = low_latency_mode
        self._normal = TorchBackend(group, rank, num_ranks)
        for key, value in {
            **_NVSHMEM_ENV,
            "NVSHMEM_DISABLE_P2P": "0" if allow_nvlink_for_low_latency_mode else "1",
            "NVSHMEM_IBGDA_NUM_RC_PER_PE": str(num_qps_per_rank),
        }.items():
            os.environ.setdefault(key, value)
        ops = _ops()
        uid = [bytes(ops.unique_id().tolist()) if rank == 0 else None]
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(uid, src=src, group=group)
        ops.init(torch.frombuffer(bytearray(uid[0]), dtype=torch.uint8), rank, num_ranks)
        self.buffer = ops.alloc(num_rdma_bytes)
        ops.barrier()
        torch.cuda.synchronize()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        self.timeout_cycles = max(1, int(timeout_s * props.clock_rate * 1000))  # clock_rate is in kHz
        self.timeout_s = float(timeout_s)
        self._half = 0  # the half the next low-latency kernel uses
        # Internode state, identical on every rank: barrier rounds done on this buffer, the last notify's
        # sequence number, and whether low-latency kernels used the buffer since (they overwrite the barrier).
        self._barrier_rounds, self._sequence, self._ll_used = 0, 0, False

    # ---- normal mode ---------------------------------------------------------------------------------------

    def _intranode_only(self) -> None:
        if self.num_ranks > NODE_RANKS:
            raise RuntimeError(
                f"dsv3.ep: the nvshmem backend serves {self.num_ranks} ranks with internode_dispatch / "
                "internode_combine (DeepEP's internode handle), not the intranode calls"
            )

    def intranode_dispatch(self, *args):
        self._intranode_only()
        return self._normal.intranode_dispatch(*args)

    def intranode_combine(self, *args):
        self._intranode_only()
        return self._normal.intranode_combine(*args)

    def _internode_geometry(self, config: Config) -> tuple[int, int]:
        """(nodes, channels) after checking that the group and the config suit the internode kernels."""
        if not isinstance(config, Config):
            raise TypeError(f"config must be a dsv3.ep.Config, got {type(config).__name__}")
        R = self.num_ranks
        if R <= NODE_RANKS or R % NODE_RANKS or R // NODE_RANKS > INTERNODE_MAX_NODES:
            raise ValueError(
                f"internode kernels need 8 * nodes ranks (2..{INTERNODE_MAX_NODES} nodes), got {R}"
            )
        if self._ll_used:  # low-latency kernels wrote over the barrier words: start them again
            _ops().barrier()
            self.buffer[: _align(8 * R)].zero_()
            _ops().barrier()
            torch.cuda.synchronize()
            self._barrier_rounds, self._ll_used = 0, False
        return R // NODE_RANKS, config.num_channels

    def _queue_args(self, config: Config) -> tuple[int, int, int, int]:
        return (
            config.num_max_rdma_chunked_recv_tokens,
            config.num_max_nvl_chunked_recv_tokens,
            config.num_max_rdma_chunked_send_tokens,
            config.num_max_nvl_chunked_send_tokens,
        )

    def _sync(self, config: Config) -> None:
        """The cached notify (before a cached dispatch or a combine): barrier, clean words, barrier."""
        rdma_slots, nvl_slots, _, _ = self._queue_args(config)
        rounds, self._barrier_rounds = self._barrier_rounds, self._barrier_rounds + 2
        _ops().internode_cached_notify(
            self.buffer, config.num_channels, rdma_slots, nvl_slots, rounds, self.timeout_cycles
        )

    def internode_dispatch(
        self,
        x,
        x_scales,
        topk_idx,
        topk_weights,
        num_tokens_per_rank,
        num_tokens_per_rdma_rank,
        is_token_in_rank,
        num_tokens_per_expert,
        cached_num_recv_tokens,
        cached_num_rdma_recv_tokens,
        cached_rdma_channel_prefix_matrix,
        cached_recv_rdma_rank_prefix_sum,
        cached_gbl_channel_prefix_matrix,
        cached_recv_gbl_rank_prefix_sum,
        expert_alignment,
        num_worst_tokens,
        config,
    ):
        N, C = self._internode_geometry(config)
        ops, R, dev = _ops(), self.num_ranks, self.buffer.device
        rdma_slots, nvl_slots, rdma_chunk, nvl_chunk = self._queue_args(config)
        if x.device != dev:
            raise ValueError(f"x must be on {dev} (the nvshmem buffer's device), got {x.device}")
        x = _aligned(x)
        n, H = x.shape
        if (H * x.element_size()) % 16:
            raise ValueError(f"x's rows must be a multiple of 16 bytes, got {H * x.element_size()}")
        if x_scales is not None:
            if x_scales.device != dev:
                raise ValueError(f"x_scales must be on {dev}, got {x_scales.device}")
            x_scales = x_scales.contiguous()
        is_token_in_rank = is_token_in_rank.to(dev, torch.bool).contiguous()
        if tuple(is_token_in_rank.shape) != (n, R):
            raise ValueError(f"is_token_in_rank must be [{n}, {R}], got {tuple(is_token_in_rank.shape)}")
        new = dict(dtype=torch.int32, device=dev)

        def new_scales(rows: int):
            return None if x_scales is None else x_scales.new_zeros((rows, x_scales.shape[1]))

        k = 0 if topk_idx is None else topk_idx.shape[1]
        num_scales = 0 if x_scales is None else x_scales.shape[1]
        slot_bytes = internode_dispatch_record_bytes(H * x.element_size(), k, num_scales)
        need = internode_layout(R, C, rdma_slots, nvl_slots, slot_bytes)["total_bytes"]
        if self.buffer.numel() < need:
            raise ValueError(
                f"num_rdma_bytes={self.buffer.numel()} is too small for this dispatch: need {need} "
                "(Config.get_rdma_buffer_size_hint)"
            )

        def dispatch(rdma_cpm, gbl_cpm, rrps, rgps, outputs):
            self._launch(
                "internode dispatch",
                lambda: ops.internode_dispatch(
                    self.buffer, x, x_scales, topk_idx, topk_weights, is_token_in_rank, rdma_cpm, gbl_cpm,
                    rrps, rgps, num_experts, C, rdma_slots, nvl_slots, rdma_chunk, nvl_chunk,
                    self.timeout_cycles, *outputs,
                ),
            )  # fmt: skip

        if cached_rdma_channel_prefix_matrix is not None:
            num_experts = R  # a cached dispatch carries no top-k: any multiple of R will do
            tensors = []
            for name, t, shape in (
                ("rdma_channel_prefix_matrix", cached_rdma_channel_prefix_matrix, (N, C)),
                ("gbl_channel_prefix_matrix", cached_gbl_channel_prefix_matrix, (R, C)),
                ("recv_rdma_rank_prefix_sum", cached_recv_rdma_rank_prefix_sum, (N,)),
                ("recv_gbl_rank_prefix_sum", cached_recv_gbl_rank_prefix_sum, (R,)),
            ):
                if t is None or tuple(t.shape) != shape:
                    got = None if t is None else tuple(t.shape)
                    raise ValueError(
                        f"the handle's {name} must be {shape} (config.num_sms must match), got {got}"
                    )
                tensors.append(t.to(dev, torch.int32).contiguous())
            rows = int(cached_num_recv_tokens)
            if rows < 0 or int(cached_num_rdma_recv_tokens) < 0:
                raise ValueError(f"the handle's row counts must be non-negative, got {rows}")
            recv_x, recv_scales = x.new_empty((rows, H)), new_scales(rows)
            self._launch("internode cached notify", lambda: self._sync(config))
            dispatch(*tensors, (recv_x, recv_scales, None, None, None, None, None, None, None))
            return (recv_x, recv_scales, None, None, [], None, None, None, None, None, None, None, None, None)

        num_experts = num_tokens_per_expert.numel()
        L = num_experts // R
        if L > INTERNODE_MAX_LOCAL_EXPERTS:
            raise ValueError(
                f"the nvshmem backend serves at most {INTERNODE_MAX_LOCAL_EXPERTS} experts per rank"
            )
        # The kernels count rows from is_token_in_rank (no CPU sync here); the per-rank / per-node counts
        # are DeepEP's arguments and only shape-checked.
        if tuple(num_tokens_per_rank.shape) != (R,):
            raise ValueError(f"num_tokens_per_rank must be [{R}], got {tuple(num_tokens_per_rank.shape)}")
        if num_tokens_per_rdma_rank is None or tuple(num_tokens_per_rdma_rank.shape) != (N,):
            raise ValueError(f"num_tokens_per_rdma_rank must be [{N}] (from get_dispatch_layout)")
        if topk_idx is not None:
            topk_idx = topk_idx.to(dev, torch.int64).contiguous()
            topk_weights = topk_weights.to(dev, torch.float32).contiguous()
        rdma_cpm, gbl_cpm = torch.empty((N, C), **new), torch.empty((R, C), **new)
        rrps, rgps = torch.empty(N, **new), torch.empty(R, **new)
        self._sequence = self._sequence % (2**31 - 2) + 1
        sequence, rounds = self._sequence, self._barrier_rounds
        self._barrier_rounds += 2
        self._launch(
            "internode notify",
            lambda: ops.internode_notify(
                self.buffer, num_tokens_per_expert.to(dev, torch.int32).contiguous(), is_token_in_rank, C,
                rdma_slots, nvl_slots, int(expert_alignment), sequence, rounds, self.timeout_cycles, rdma_cpm,
                gbl_cpm, rrps, rgps,
            ),
        )  # fmt: skip
        if num_worst_tokens > 0:  # no CPU wait: worst-case row counts, the tail has no expert
            rows = rdma_rows = num_worst_tokens
            counts = []
        else:
            try:
                got = ops.internode_wait(sequence, L, self.timeout_s)
            except RuntimeError as err:
                self._check_error()
                raise EPTimeoutError(
                    f"dsv3.ep: internode dispatch count wait on rank {self.rank}: {err}"
                ) from err
            rows, rdma_rows, counts = got[0], got[1], list(got[2:])
        fill = num_worst_tokens > 0
        recv_x, recv_scales = (x.new_zeros if fill else x.new_empty)((rows, H)), new_scales(rows)
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            recv_topk_idx = torch.full((rows, k), -1, dtype=torch.int64, device=dev)
            recv_topk_weights = torch.zeros((rows, k), dtype=torch.float32, device=dev)
        recv_src_meta = torch.full((rows, 2), -1, **new)
        rrcpm, rgcpm = torch.empty((N, C), **new), torch.empty((R, C), **new)
        send_rdma_head = torch.empty((n, N), **new)
        send_nvl_head = torch.full((rdma_rows, NODE_RANKS), -1, **new)
        outputs = (recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_meta, rrcpm, rgcpm,
                   send_rdma_head, send_nvl_head)  # fmt: skip
        dispatch(rdma_cpm, gbl_cpm, rrps, rgps, outputs)
        return (
            recv_x,
            recv_scales,
            recv_topk_idx,
            recv_topk_weights,
            counts,
            rdma_cpm,
            gbl_cpm,
            rrcpm,
            rrps,
            rgcpm,
            rgps,
            recv_src_meta.view(torch.uint8),
            send_rdma_head,
            send_nvl_head,
        )

    def internode_combine(
        self,
        x,
        topk_weights,
        bias_0,
        bias_1,
        src_meta,
        is_combined_token_in_rank,
        rdma_channel_prefix_matrix,
        rdma_rank_prefix_sum,
        gbl_channel_prefix_matrix,
        combined_rdma_head,
        combined_nvl_head,
        config,
    ):
        N, C = self._internode_geometry(config)
        ops, R, dev = _ops(), self.num_ranks, self.buffer.device
        rdma_slots, nvl_slots, rdma_chunk, nvl_chunk = self._queue_args(config)
        if x.dtype != torch.bfloat16:
            raise TypeError(f"x must be bfloat16 for the nvshmem backend's combine, got {x.dtype}")
        for name, b in (("bias_0", bias_0), ("bias_1", bias_1)):
            if b is not None and b.dtype != torch.bfloat16:
                raise TypeError(f"{name} must be bfloat16 for the nvshmem backend's combine, got {b.dtype}")
        n, H = combined_rdma_head.shape[0], x.shape[1]
        if tuple(is_combined_token_in_rank.shape) != (n, R):
            raise ValueError(
                f"is_combined_token_in_rank must be [{n}, {R}], got {tuple(is_combined_token_in_rank.shape)}"
            )
        if src_meta.dtype != torch.uint8 or src_meta.dim() != 2 or src_meta.shape[1] != 8:
            raise ValueError(
                f"src_meta must be the dispatch's uint8 [num_recv, 8], got {tuple(src_meta.shape)}"
            )
        if x.shape[0] < src_meta.shape[0]:  # the dispatch's rows (num_worst_tokens rows with padding)
            raise ValueError(f"x must have the dispatch's {src_meta.shape[0]} rows, got {x.shape[0]}")
        k = 0 if topk_weights is None else topk_weights.shape[1]
        need = internode_layout(R, C, rdma_slots, nvl_slots, internode_combine_record_bytes(H, k))[
            "total_bytes"
        ]
        if self.buffer.numel() < need:
            raise ValueError(
                f"num_rdma_bytes={self.buffer.numel()} is too small for this combine: need {need}"
            )
        handle = (rdma_channel_prefix_matrix, rdma_rank_prefix_sum, gbl_channel_prefix_matrix,
                  combined_rdma_head, combined_nvl_head)  # fmt: skip
        ints = [t.to(dev, torch.int32).contiguous() for t in handle]
        if tuple(ints[0].shape) != (N, C) or tuple(ints[2].shape) != (R, C):
            raise ValueError(
                f"config.num_sms ({config.num_sms}) must equal the dispatch's: the handle's channel matrices "
                f"are {tuple(ints[0].shape)} and {tuple(ints[2].shape)}, this config needs ({N}, {C}) and "
                f"({R}, {C})"
            )
        combined = torch.empty((n, H), dtype=torch.bfloat16, device=dev)
        combined_w = None
        if topk_weights is not None:
            topk_weights = topk_weights.to(dev, torch.float32).contiguous()
            combined_w = torch.empty((n, k), dtype=torch.float32, device=dev)
        x = _aligned(x)
        b0, b1 = (None if b is None else _aligned(b) for b in (bias_0, bias_1))

        def run():
            self._sync(config)
            ops.internode_combine(
                self.buffer, x, topk_weights, b0, b1, *ints, C, rdma_slots, nvl_slots, rdma_chunk, nvl_chunk,
                self.timeout_cycles, combined, combined_w,
            )  # fmt: skip

        self._launch("internode combine", run)
        return combined, combined_w

    # ---- low-latency mode ----------------------------------------------------------------------------------

    def _check_error(self) -> None:
        code = int(_ops().error_code())
        if code >> 24 == _ERROR_OVERFLOW:
            raise RuntimeError(
                f"dsv3.ep: internode dispatch on rank {self.rank}: more rows arrived (from rank "
                f"{code & 0xFFFFFF}) than the outputs hold; num_worst_tokens is too small"
            )
        if code >> 24 == _ERROR_ROUTING:
            raise ValueError(
                f"dsv3.ep: low-latency dispatch on rank {self.rank}: topk_idx names expert {code & 0xFFFFFF} "
                "out of range or twice in one token, or routes more than num_max_dispatch_tokens_per_rank "
                "rows to it"
            )
        if code:
            what, peer = _ERROR_WHAT.get(code >> 24, "wait"), code & 0xFFFFFF
            raise EPTimeoutError(
                f"dsv3.ep: {what} on rank {self.rank} timed out waiting for peer/expert {peer}"
            )

    def _launch(self, what: str, fn: Callable[[], None]) -> None:
        self._check_error()
        try:
            fn()
        except RuntimeError as err:
            self._check_error()  # a trap from an earlier wait surfaces here as a CUDA error
            raise RuntimeError(f"dsv3.ep: {what} failed: {err}") from err

    def _next_half(self) -> int:
        self._ll_used = True
        half, self._half = self._half, self._half ^ 1
        return half

    def _check_size(self, T: int, hidden: int, num_experts: int) -> None:
        need = low_latency_size_hint(T, hidden, self.num_ranks, num_experts)
        if self.buffer.numel() < need:
            raise ValueError(
                f"num_rdma_bytes={self.buffer.numel()} is too small for T={T}, hidden={hidden}, "
                f"num_experts={num_experts}: need {need} (Buffer.get_low_latency_rdma_size_hint)"
            )
        depth = int(os.environ.get("NVSHMEM_QP_DEPTH", "1024"))
        if depth < 2 * (T + 1):
            raise ValueError(
                f"NVSHMEM_QP_DEPTH={depth} must be >= 2 * (num_max_dispatch_tokens_per_rank + 1)"
            )

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
        ops, T, H = _ops(), num_max_dispatch_tokens_per_rank, x.shape[1]
        R, dev = self.num_ranks, x.device
        L = num_experts // R
        if topk_idx.shape[1] > LL_MAX_TOPK:
            raise ValueError(f"topk_idx may have at most {LL_MAX_TOPK} columns in low-latency mode")
        self._check_size(T, H, num_experts)
        x, topk_idx = _aligned(x), topk_idx.to(torch.int64).contiguous()
        if use_fp8:
            recv_x = torch.empty((L, R * T, H), dtype=torch.float8_e4m3fn, device=dev)
            groups, sdtype = (H // 512, torch.int32) if use_ue8m0 else (H // LL_GROUP_SIZE, torch.float32)
            scales_storage = torch.empty((L, groups, R * T), dtype=sdtype, device=dev)
            recv_scales = scales_storage.transpose(1, 2)  # column-major [L, R*T, G]: the GEMMs' TMA layout
        else:
            recv_x = torch.empty((L, R * T, H), dtype=torch.bfloat16, device=dev)
            scales_storage = recv_scales = None
        recv_count = torch.empty(L, dtype=torch.int32, device=dev)
        src_info = torch.empty((L, R * T), dtype=torch.int32, device=dev)
        layout_range = torch.empty((L, R), dtype=torch.int64, device=dev)
        half, cycles = self._next_half(), self.timeout_cycles

        def send():
            ops.ll_dispatch_send(
                self.buffer, half, x, topk_idx, T, num_experts, use_fp8, round_scale, use_ue8m0, cycles
            )

        def receive():
            self._launch(
                "low-latency dispatch (receive)",
                lambda: ops.ll_dispatch_recv(
                    self.buffer,
                    half,
                    T,
                    num_experts,
                    H,
                    use_fp8,
                    use_ue8m0,
                    cycles,
                    recv_x,
                    scales_storage,
                    recv_count,
                    src_info,
                    layout_range,
                ),  # fmt: skip
            )

        self._launch("low-latency dispatch (send)", send)
        if return_recv_hook:
            return recv_x, recv_scales, recv_count, src_info, layout_range, receive
        receive()
        return recv_x, recv_scales, recv_count, src_info, layout_range, None

    def next_combine_buffer(self, num_local_experts: int, rows: int, hidden: int) -> torch.Tensor:
        """The send region of the half the next low-latency kernel uses, as bf16 [L, R*T, H]: expert outputs
        written there are put straight from it by low_latency_combine(..., zero_copy=True)."""
        T = rows // self.num_ranks
        layout = ll_layout(T, hidden, self.num_ranks, num_local_experts * self.num_ranks)
        if self.buffer.numel() < layout["total_bytes"]:
            raise ValueError(
                f"num_rdma_bytes={self.buffer.numel()} is too small: need {layout['total_bytes']}"
            )
        start = layout["halves"][self._half]["send"]
        view = self.buffer[start : start + num_local_experts * rows * hidden * 2]
        return view.view(torch.bfloat16).view(num_local_experts, rows, hidden)

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
        ops, T, H = _ops(), num_max_dispatch_tokens_per_rank, x.shape[-1]
        self._check_size(T, H, num_experts)
        if out is not None and not out.is_contiguous():
            raise ValueError("out must be contiguous for the nvshmem backend")
        x = x if zero_copy else _aligned(x)
        topk_idx = topk_idx.to(torch.int64).contiguous()
        topk_weights = topk_weights.to(torch.float32).contiguous()
        src_info, layout_range = src_info.contiguous(), layout_range.contiguous()
        result = (
            out
            if out is not None
            else torch.empty((topk_idx.shape[0], H), dtype=torch.bfloat16, device=x.device)
        )
        half, cycles = self._next_half(), self.timeout_cycles

        def send():
            ops.ll_combine_send(
                self.buffer, half, x, src_info, layout_range, T, num_experts, zero_copy, cycles
            )

        def receive():
            self._launch(
                "low-latency combine (receive)",
                lambda: ops.ll_combine_recv(
                    self.buffer, half, topk_idx, topk_weights, T, num_experts, cycles, result
                ),
            )

        self._launch("low-latency combine (send)", send)
        if return_recv_hook:
            return result, receive
        receive()
        return result, None

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int):
        """Zero the signal regions of both halves (counts, arrivals, done counters) on every rank; Buffer
        adds the group barrier, this the NVSHMEM one so no peer writes before every rank is clean."""
        layout = ll_layout(num_max_dispatch_tokens_per_rank, hidden, self.num_ranks, num_experts)
        self._ll_used = True  # the zeroed words include the internode barrier words
        for half in layout["halves"]:
            self.buffer[half["dispatch_count"] : half["send"]].zero_()
        _ops().barrier()
        torch.cuda.synchronize()

    def local_buffer_tensor(self, dtype: torch.dtype, size=None, offset: int = 0) -> torch.Tensor:
        """The symmetric buffer (from byte `offset`) viewed as `dtype`, optionally reshaped to `size`."""
        return byte_buffer_view(self.buffer, dtype, size, offset)

    def destroy(self) -> None:
        """Free the symmetric buffer and finalize NVSHMEM (collective)."""
        if self.buffer is None:
            return
        ops = _ops()
        torch.cuda.synchronize()
        ops.barrier()
        ops.free(self.buffer)
        self.buffer = None
        ops.finalize()
