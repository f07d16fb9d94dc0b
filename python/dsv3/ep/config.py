"""`Config` of the normal (non low-latency) EP kernels, DeepEP-compatible: SMs used and the chunk sizes of the
NVLink / RDMA queues, plus the buffer sizes those queues need and the per-R default tables.

`get_nvl_buffer_size_hint` is the byte size of the `nvlink` backend's per-rank buffer (the layout of
csrc/include/dsv3/ep/nvl_layout.h, mirrored by `nvl_buffer_layout` here and checked against the C++ one by
tests/ep/test_nvl_layout.py) at the largest top-k, scale count and local expert count the kernels accept.
"""

from __future__ import annotations

__all__ = [
    "Config",
    "get_combine_config",
    "get_dispatch_config",
    "get_num_sms",
    "nvl_buffer_layout",
    "set_num_sms",
]

NUM_MAX_NVL_PEERS = 8
# Upper bounds the buffer hints are sized for (the nvlink kernels reject anything larger).
NUM_MAX_TOPK = 32
NUM_MAX_SCALES = 128
NUM_MAX_LOCAL_EXPERTS = 1024

NVL_BARRIER_INTS = 16  # signals [8] (one per source rank) + this rank's barrier epoch, padded to 64 B
NVL_QUEUE_CTRL_INTS = 4  # per (channel, source) queue: head, tail, encoded start and end offsets


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def nvl_buffer_layout(
    num_ranks: int,
    num_local_experts: int,
    hidden_bytes: int,
    num_scales: int,
    num_topk: int,
    num_channels: int,
    num_max_recv_tokens: int,
) -> dict[str, tuple[int, int]]:
    """Regions of one rank's NVLink buffer as {name: (offset, size)} in bytes, plus 'total': (0, bytes).

    Every region starts 16-byte aligned; the total is rounded up to 128 bytes. Queue regions are indexed
    [channel][source rank][slot]. Must stay identical to `dsv3::ep::NvlLayout` (nvl_layout.h).
    """
    queues = num_channels * num_ranks
    slots = queues * num_max_recv_tokens
    sizes = [
        ("barrier", NVL_BARRIER_INTS * 4),
        ("rank_counts", num_ranks * num_ranks * 4),
        ("queue_ctrl", queues * NVL_QUEUE_CTRL_INTS * 4),
        ("expert_counts", num_ranks * num_local_experts * 4),
        ("x", slots * hidden_bytes),
        ("src_idx", slots * 4),
        ("topk_idx", slots * num_topk * 8),
        ("topk_weights", slots * num_topk * 4),
        ("scales", slots * num_scales * 4),
    ]
    layout, offset = {}, 0
    for name, size in sizes:
        layout[name] = (offset, size)
        offset += _align(size, 16)
    layout["total"] = (0, _align(offset, 128))
    return layout


class Config:
    """Kernel configuration: `num_sms` SMs (an even number: one sender and one receiver block per channel)
    and the chunk sizes, in tokens, of the NVLink and RDMA queues (send chunk, queue capacity)."""

    __slots__ = (
        "num_sms",
        "num_max_nvl_chunked_send_tokens",
        "num_max_nvl_chunked_recv_tokens",
        "num_max_rdma_chunked_send_tokens",
        "num_max_rdma_chunked_recv_tokens",
    )

    def __init__(
        self,
        num_sms: int = 20,
        num_max_nvl_chunked_send_tokens: int = 6,
        num_max_nvl_chunked_recv_tokens: int = 256,
        num_max_rdma_chunked_send_tokens: int = 6,
        num_max_rdma_chunked_recv_tokens: int = 256,
    ):
        num_sms = _check_int("num_sms", num_sms, 2)
        if num_sms % 2:
            raise ValueError(f"num_sms must be even (a sender and a receiver SM per channel), got {num_sms}")
        nvl_send = _check_int("num_max_nvl_chunked_send_tokens", num_max_nvl_chunked_send_tokens, 1)
        nvl_recv = _check_int("num_max_nvl_chunked_recv_tokens", num_max_nvl_chunked_recv_tokens, 2)
        if nvl_send >= nvl_recv:
            raise ValueError(
                "num_max_nvl_chunked_send_tokens must be < num_max_nvl_chunked_recv_tokens, "
                f"got {nvl_send} >= {nvl_recv}"
            )
        rdma_send = _check_int("num_max_rdma_chunked_send_tokens", num_max_rdma_chunked_send_tokens, 1)
        rdma_recv = _check_int("num_max_rdma_chunked_recv_tokens", num_max_rdma_chunked_recv_tokens, 2)
        rdma_recv = _align(rdma_recv, rdma_send)  # whole send chunks fill the RDMA queue exactly
        if rdma_send > rdma_recv // 2:
            raise ValueError(
                "num_max_rdma_chunked_send_tokens must be <= num_max_rdma_chunked_recv_tokens / 2 "
                f"(double buffering), got {rdma_send} and {rdma_recv}"
            )
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = nvl_send
        self.num_max_nvl_chunked_recv_tokens = nvl_recv
        self.num_max_rdma_chunked_send_tokens = rdma_send
        self.num_max_rdma_chunked_recv_tokens = rdma_recv

    @property
    def num_channels(self) -> int:
        return self.num_sms // 2

    def __repr__(self) -> str:
        return (
            f"Config(num_sms={self.num_sms}, num_max_nvl_chunked_send_tokens="
            f"{self.num_max_nvl_chunked_send_tokens}, num_max_nvl_chunked_recv_tokens="
            f"{self.num_max_nvl_chunked_recv_tokens}, num_max_rdma_chunked_send_tokens="
            f"{self.num_max_rdma_chunked_send_tokens}, num_max_rdma_chunked_recv_tokens="
            f"{self.num_max_rdma_chunked_recv_tokens})"
        )

    def __eq__(self, other) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, s) for s in self.__slots__))

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of the per-rank NVLink buffer for rows of `hidden_bytes` among `num_ranks` ranks (the NVLink
        domain is min(num_ranks, 8) ranks), at any top-k <= 32, scales <= 128 and local experts <= 1024."""
        hidden_bytes = _check_int("hidden_bytes", hidden_bytes, 1)
        num_ranks = _check_int("num_ranks", num_ranks, 1)
        if num_ranks > NUM_MAX_NVL_PEERS and num_ranks % NUM_MAX_NVL_PEERS:
            raise ValueError(f"num_ranks must be <= 8 or a multiple of 8, got {num_ranks}")
        nvl_ranks = min(num_ranks, NUM_MAX_NVL_PEERS)
        layout = nvl_buffer_layout(
            nvl_ranks,
            NUM_MAX_LOCAL_EXPERTS,
            hidden_bytes,
            NUM_MAX_SCALES,
            NUM_MAX_TOPK,
            self.num_channels,
            self.num_max_nvl_chunked_recv_tokens,
        )
        return layout["total"][1]

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of the per-rank NVSHMEM buffer of the internode kernels (0 within one node): the layout of
        csrc/include/dsv3/ep/internode_layout.h (`dsv3.ep.backends.nvshmem.internode_layout`) for this
        config's channels and RDMA / NVLink queue capacities, with records of `hidden_bytes`-byte rows at any
        top-k <= 32 and scales <= 128 (the NVLink queues live in the same symmetric buffer)."""
        from .backends.nvshmem import internode_dispatch_record_bytes, internode_layout

        hidden_bytes = _check_int("hidden_bytes", hidden_bytes, 1)
        num_ranks = _check_int("num_ranks", num_ranks, 1)
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return 0
        if num_ranks % NUM_MAX_NVL_PEERS:
            raise ValueError(f"num_ranks must be <= 8 or a multiple of 8, got {num_ranks}")
        slot_bytes = internode_dispatch_record_bytes(_align(hidden_bytes, 16), NUM_MAX_TOPK, NUM_MAX_SCALES)
        layout = internode_layout(
            num_ranks,
            self.num_channels,
            self.num_max_rdma_chunked_recv_tokens,
            self.num_max_nvl_chunked_recv_tokens,
            slot_bytes,
        )
        return layout["total_bytes"]


# ---- defaults per number of ranks ----------------------------------------------------------------------

_num_sms = 20

# (nvl send, nvl recv, rdma send, rdma recv) chunk sizes per R; starting points from the public DeepEP tables,
# retuned with benchmarks/ep_gpu_bench.py on the hardware at hand.
_DISPATCH = {
    2: (24, 256, 6, 128),
    4: (6, 256, 6, 128),
    8: (6, 256, 6, 128),
    16: (36, 288, 20, 128),
    24: (8, 288, 32, 128),
    32: (32, 288, 32, 128),
    64: (20, 288, 28, 128),
    128: (20, 560, 12, 128),
    144: (32, 720, 12, 128),
    160: (28, 720, 12, 128),
}
_COMBINE = {
    2: (10, 256, 6, 128),
    4: (9, 256, 6, 128),
    8: (4, 256, 6, 128),
    16: (4, 288, 12, 128),
    24: (1, 288, 8, 128),
    32: (1, 288, 8, 128),
    64: (1, 288, 20, 128),
    128: (1, 560, 12, 128),
    144: (2, 720, 8, 128),
    160: (2, 720, 8, 128),
}


def get_num_sms() -> int:
    """SMs the default configs use (20 unless `set_num_sms` changed it)."""
    return _num_sms


def set_num_sms(num_sms: int) -> None:
    """Sets the SM count of `get_dispatch_config` / `get_combine_config` (even: two SMs per channel)."""
    global _num_sms
    num_sms = _check_int("num_sms", num_sms, 2)
    if num_sms % 2:
        raise ValueError(f"num_sms must be even, got {num_sms}")
    _num_sms = num_sms


def _table_config(table: dict[int, tuple[int, int, int, int]], num_ranks: int) -> Config:
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks not in table:
        raise ValueError(f"num_ranks must be one of {sorted(table)}, got {num_ranks!r}")
    return Config(_num_sms, *table[num_ranks])


def get_dispatch_config(num_ranks: int) -> Config:
    """The recommended dispatch `Config` for `num_ranks` ranks."""
    return _table_config(_DISPATCH, num_ranks)


def get_combine_config(num_ranks: int) -> Config:
    """The recommended combine `Config` for `num_ranks` ranks."""
    return _table_config(_COMBINE, num_ranks)
