"""The `nvlink` backend of `dsv3.ep.Buffer`: intranode dispatch/combine with the CUDA kernels of
csrc/cuda/ep_intranode.cu over buffers every rank of one node maps with CUDA IPC (R in {2, 4, 8}).

Each rank allocates one buffer (layout: csrc/include/dsv3/ep/nvl_layout.h; size:
`Config.get_nvl_buffer_size_hint`), the IPC handles travel once with `all_gather_object`, and every peer's
buffer is opened into a device array of pointers. A dispatch is a notify kernel (count exchange, prefix
matrices, queue reset) whose received row count the CPU reads from pinned host-mapped memory, then the
dispatch kernel; a cached dispatch and a combine start
with a reset kernel (barrier, zero the queues, barrier) instead. The semantics are those of
python/dsv3/ep/backends/__init__.py; `send_head[t, r]` here is the position of token t in its channel's queue
toward rank r (-1 where not sent), which is how the combine finds each copy (so `src_idx` is not needed).

A peer that does not arrive within `timeout_s` makes the waiting kernel record the step in host memory and
trap (the CUDA context is lost, as with DeepEP's timeout); the next call, or the CPU wait itself, raises
`dsv3.ep.EPTimeoutError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from .. import errors
from ..config import NUM_MAX_LOCAL_EXPERTS, NUM_MAX_SCALES, NUM_MAX_TOPK, Config
from .common import byte_buffer_view

__all__ = ["NvlinkBackend"]

SUPPORTED_RANKS = (2, 4, 8)
_OPS = (
    "ep_nvl_alloc_buffer",
    "ep_nvl_ipc_handle",
    "ep_nvl_open_peers",
    "ep_nvl_close_peers",
    "ep_nvl_host_counters",
    "ep_nvl_wait_recv",
    "ep_nvl_notify_dispatch",
    "ep_nvl_dispatch",
    "ep_nvl_reset_queues",
    "ep_nvl_barrier",
    "ep_nvl_combine",
)
# Host counter words (nvl_layout.h: kNvlHostError and the codes a kernel leaves there).
_HOST_ERROR = 0
_ERROR_STEPS = {
    1: "a barrier",
    2: "dispatch (waiting for free queue slots at a peer)",
    3: "dispatch (waiting for rows from a peer)",
    4: "combine (waiting for free queue slots at a peer)",
    5: "combine (waiting for rows from a peer)",
}
_RECV_OVERFLOW = 6


def _ops():
    import dsv3  # noqa: F401  (registers torch.ops.dsv3)

    return torch.ops.dsv3


class NvlinkBackend:
    """Intranode dispatch/combine for the `num_ranks` ranks of `group` (one process per GPU, one node), over a
    `num_nvl_bytes` buffer per rank. `timeout_s` bounds every wait, on the GPU and on the CPU."""

    name = "nvlink"

    @staticmethod
    def available() -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        ops = _ops()
        missing = [name for name in _OPS if not hasattr(ops, name)]
        if missing:
            return False, "dsv3 was built without its CUDA kernels (torch.ops.dsv3.ep_nvl_* are missing)"
        return True, ""

    def __init__(self, group, num_nvl_bytes: int, rank: int, num_ranks: int, timeout_s: float = 100.0):
        ok, why = self.available()
        if not ok:
            raise RuntimeError(f"dsv3.ep: the nvlink backend is unavailable: {why}")
        if num_ranks not in SUPPORTED_RANKS:
            raise RuntimeError(
                f"dsv3.ep: the nvlink backend serves 2, 4 or 8 ranks, the group has {num_ranks}"
            )
        if isinstance(num_nvl_bytes, bool) or not isinstance(num_nvl_bytes, int) or num_nvl_bytes < 1:
            raise ValueError(f"num_nvl_bytes must be a positive int, got {num_nvl_bytes!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.group, self.rank, self.num_ranks, self.timeout_s = group, rank, num_ranks, float(timeout_s)
        self.device = torch.device("cuda", torch.cuda.current_device())
        where = [None] * num_ranks
        dist.all_gather_object(where, (os.uname().nodename, self.device.index), group=group)
        if len({host for host, _ in where}) != 1:
            raise RuntimeError(
                "dsv3.ep: the nvlink backend needs every rank on one node; the group spans "
                f"{sorted({host for host, _ in where})}"
            )
        ops = _ops()
        self.buffer = ops.ep_nvl_alloc_buffer(num_nvl_bytes, self.device.index)
        handles = [None] * num_ranks
        dist.all_gather_object(handles, bytes(ops.ep_nvl_ipc_handle(self.buffer).tolist()), group=group)
        table = torch.tensor([list(h) for h in handles], dtype=torch.uint8)
        self.peers = ops.ep_nvl_open_peers(self.buffer, table, rank)
        self.host_counters = ops.ep_nvl_host_counters()
        self.sequence = 0
        self._run("setup barrier", lambda: ops.ep_nvl_barrier(*self._group_args(), self.timeout_s))
        torch.cuda.synchronize(self.device)

    # ---- plumbing ---------------------------------------------------------------------------------------

    def _group_args(self):
        return self.buffer, self.peers, self.host_counters, self.rank

    def _check_usable(self) -> None:
        if self.buffer is None:
            raise RuntimeError("dsv3.ep: the nvlink backend was destroyed")
        code = int(self.host_counters[_HOST_ERROR])
        if code == _RECV_OVERFLOW:
            self.host_counters[_HOST_ERROR] = 0
            raise RuntimeError(
                f"dispatch: rank {self.rank} received more tokens than num_worst_tokens in an earlier "
                "dispatch (the extra rows were dropped)"
            )
        if code:
            raise self._timeout_error(code)

    def _timeout_error(self, code: int) -> errors.EPTimeoutError:
        step = _ERROR_STEPS.get(code, f"step {code}")
        return errors.EPTimeoutError(
            f"dsv3.ep: nvlink {step} on rank {self.rank} timed out after {self.timeout_s} s waiting for a "
            "peer; the kernel trapped and this process's CUDA context is no longer usable"
        )

    def _run(self, what: str, fn: Callable[[], object]):
        try:
            return fn()
        except RuntimeError as err:
            code = int(self.host_counters[_HOST_ERROR])
            if code and code != _RECV_OVERFLOW:
                raise self._timeout_error(code) from err
            new = errors.translate(err, what, self.rank)
            if new is err:
                raise
            raise new from err

    @staticmethod
    def _check_config(config: Config) -> None:
        if not isinstance(config, Config):
            raise TypeError(f"config must be a dsv3.ep.Config, got {type(config).__name__}")

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
        self._check_usable()
        self._check_config(config)
        ops, R, C = _ops(), self.num_ranks, config.num_channels
        send, slots = config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens
        if x.device != self.device:
            raise ValueError(f"x must be on {self.device} (the nvlink buffer's device), got {x.device}")
        x = x.contiguous()
        n, H = x.shape
        hidden_bytes = H * x.element_size()
        if hidden_bytes % 16:
            raise ValueError(
                f"x's rows must be a multiple of 16 bytes for the nvlink backend, got {hidden_bytes}"
            )
        num_scales = 0 if x_scales is None else x_scales.shape[1]
        if num_scales > NUM_MAX_SCALES:
            raise ValueError(f"x_scales may have at most {NUM_MAX_SCALES} columns, got {num_scales}")
        if x_scales is not None and x_scales.device != self.device:
            raise ValueError(f"x_scales must be on {self.device}, got {x_scales.device}")
        is_token_in_rank = is_token_in_rank.to(self.device, torch.bool).contiguous()
        timeout = self.timeout_s

        def new_scales(rows: int):
            return None if x_scales is None else x_scales.new_zeros((rows, num_scales))

        if cached_rank_prefix_matrix is not None:
            rpm = cached_rank_prefix_matrix.to(self.device, torch.int32).contiguous()
            cpm = cached_channel_prefix_matrix.to(self.device, torch.int32).contiguous()
            if cpm.shape != (R, C):
                raise ValueError(
                    f"config.num_sms ({config.num_sms}) must equal the handle's: its channel_prefix_matrix "
                    f"is {tuple(cpm.shape)}, this config needs ({R}, {C})"
                )
            num_recv = int(cached_num_recv_tokens)
            recv_x, recv_scales = x.new_empty((num_recv, H)), new_scales(num_recv)

            def cached():
                ops.ep_nvl_reset_queues(*self._group_args(), C, timeout)
                ops.ep_nvl_dispatch(
                    x, x_scales, None, None, is_token_in_rank, rpm, cpm, recv_x, recv_scales,
                    None, None, None, None, None, *self._group_args(), 0, send, slots, timeout,
                )  # fmt: skip

            self._run("cached dispatch", cached)
            return recv_x, recv_scales, None, None, [], None, None, None, None, None

        E = num_tokens_per_expert.numel()
        L = E // R
        if L > NUM_MAX_LOCAL_EXPERTS:
            raise ValueError(
                f"the nvlink backend serves at most {NUM_MAX_LOCAL_EXPERTS} experts per rank, got {L}"
            )
        k = 0 if topk_idx is None else topk_idx.shape[1]
        if k > NUM_MAX_TOPK:
            raise ValueError(f"topk_idx may have at most {NUM_MAX_TOPK} columns, got {k}")
        self.sequence = self.sequence % (2**31 - 2) + 1  # never 0, the host word's initial value
        sequence = self.sequence
        rpm, cpm = self._run(
            "dispatch notify",
            lambda: ops.ep_nvl_notify_dispatch(
                num_tokens_per_rank.to(self.device, torch.int32).contiguous(),
                num_tokens_per_expert.to(self.device, torch.int32).contiguous(),
                is_token_in_rank, *self._group_args(), sequence, int(expert_alignment), C, slots,
                hidden_bytes, num_scales, k, timeout,
            ),
        )  # fmt: skip
        if num_worst_tokens > 0:  # no CPU wait: every output has the worst-case row count
            rows, num_recv_per_expert = num_worst_tokens, []
            recv_x = x.new_zeros((rows, H))
            recv_src_idx = torch.full((rows,), -1, dtype=torch.int32, device=self.device)
        else:
            got = self._run(
                "dispatch count wait", lambda: ops.ep_nvl_wait_recv(self.host_counters, sequence, L, timeout)
            )
            rows, num_recv_per_expert = got[0], list(got[1:])
            recv_x = x.new_empty((rows, H))
            recv_src_idx = torch.empty((rows,), dtype=torch.int32, device=self.device)
        recv_scales = new_scales(rows)
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            topk_idx = topk_idx.to(self.device, torch.int64).contiguous()
            topk_weights = topk_weights.to(self.device, torch.float32).contiguous()
            if num_worst_tokens > 0:  # the rows past the received ones: no expert, weight 0
                recv_topk_idx = torch.full((rows, k), -1, dtype=torch.int64, device=self.device)
                recv_topk_weights = torch.zeros((rows, k), dtype=torch.float32, device=self.device)
            else:
                recv_topk_idx = torch.empty((rows, k), dtype=torch.int64, device=self.device)
                recv_topk_weights = torch.empty((rows, k), dtype=torch.float32, device=self.device)
        rcpm = torch.empty((R, C), dtype=torch.int32, device=self.device)
        send_head = torch.empty((n, R), dtype=torch.int32, device=self.device)
        self._run(
            "dispatch",
            lambda: ops.ep_nvl_dispatch(
                x, x_scales, topk_idx, topk_weights, is_token_in_rank, rpm, cpm, recv_x, recv_scales,
                recv_topk_idx, recv_topk_weights, recv_src_idx, rcpm, send_head, *self._group_args(), E, send,
                slots, timeout,
            ),
        )  # fmt: skip
        return (
            recv_x,
            recv_scales,
            recv_topk_idx,
            recv_topk_weights,
            num_recv_per_expert,
            rpm,
            cpm,
            rcpm,
            recv_src_idx,
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
        self._check_usable()
        self._check_config(config)
        ops, R, C = _ops(), self.num_ranks, config.num_channels
        if x.dtype != torch.bfloat16:
            raise TypeError(f"x must be bfloat16 for the nvlink backend's combine, got {x.dtype}")
        for name, b in (("bias_0", bias_0), ("bias_1", bias_1)):
            if b is not None and b.dtype != torch.bfloat16:
                raise TypeError(f"{name} must be bfloat16 for the nvlink backend's combine, got {b.dtype}")
        rcpm = channel_prefix_matrix.to(self.device, torch.int32).contiguous()
        if rcpm.shape != (R, C):
            raise ValueError(
                f"config.num_sms ({config.num_sms}) must equal the dispatch's: the handle's channel matrix "
                f"is {tuple(rcpm.shape)}, this config needs ({R}, {C})"
            )
        send_head = send_head.to(self.device, torch.int32).contiguous()
        n, H = send_head.shape[0], x.shape[1]
        combined = torch.empty((n, H), dtype=torch.bfloat16, device=self.device)
        combined_w = None
        if topk_weights is not None:
            topk_weights = topk_weights.to(self.device, torch.float32).contiguous()
            combined_w = torch.empty((n, topk_weights.shape[1]), dtype=torch.float32, device=self.device)
        timeout = self.timeout_s
        send, slots = config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens
        rpm = rank_prefix_matrix.to(self.device, torch.int32).contiguous()
        b0, b1 = (None if b is None else b.contiguous() for b in (bias_0, bias_1))

        def run():
            ops.ep_nvl_reset_queues(*self._group_args(), C, timeout)
            ops.ep_nvl_combine(
                x.contiguous(), topk_weights, b0, b1, rpm, rcpm, send_head, combined, combined_w,
                *self._group_args(), send, slots, timeout,
            )  # fmt: skip

        self._run("combine", run)
        return combined, combined_w

    # ---- buffer access and teardown ---------------------------------------------------------------------

    def local_buffer_tensor(self, dtype: torch.dtype, size=None, offset: int = 0) -> torch.Tensor:
        """This rank's NVLink buffer (from byte `offset`) viewed as `dtype`, optionally reshaped to `size`."""
        if self.buffer is None:
            raise RuntimeError("dsv3.ep: the nvlink backend was destroyed")
        return byte_buffer_view(self.buffer, dtype, size, offset)

    def destroy(self) -> None:
        """Close the peers' mappings and free the buffer (collective: no peer may still read this one)."""
        if self.buffer is None:
            return
        ops = _ops()
        torch.cuda.synchronize(self.device)
        self._run("destroy barrier", lambda: ops.ep_nvl_barrier(*self._group_args(), self.timeout_s))
        torch.cuda.synchronize(self.device)
        ops.ep_nvl_close_peers(self.peers, self.rank)
        self.peers = self.buffer = None
