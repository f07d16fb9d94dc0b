"""`dsv3.ep.Buffer`: DeepEP's expert-parallel communication API (SPEC §5) over one of three backends.

    buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes)            # backend="auto"
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
        topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=..., is_token_in_rank=..., num_tokens_per_expert=...,
        topk_idx=topk_idx, topk_weights=topk_weights)
    ... experts on recv_x (weighted by recv_topk_weights, summed over the local experts) ...
    combined_x, _, _ = buffer.combine(expert_out, handle)

Received rows are ordered by source rank, then source token index, on every backend. The backends:
`torch` (all_to_all_single over the group: gloo on CPU, NCCL on GPU; always available; the reference),
`nvlink` (CUDA IPC buffers inside a node, R in {2, 4, 8}) and `nvshmem` (RDMA internode and the
low-latency mode; when dsv3 was built with NVSHMEM). `backend="auto"` picks a CUDA backend when the group is
NCCL, the tensors are CUDA and the backend can serve the group, else `torch`; CPU tensors always go through
`torch`.

Beyond DeepEP: CPU tensors and gloo groups work; bf16 is not the only payload dtype (fp16/fp32 rows travel
too and fp32 combines stay fp32); any number of ranks dividing the experts works on the `torch` backend, which
returns the intranode handle layout at every R.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from . import config as _config
from .backends.torch import TorchBackend
from .config import Config
from .layout import dispatch_layout

__all__ = ["Buffer", "EventOverlap"]

_FP8 = torch.float8_e4m3fn
_ROW_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BACKENDS = ("auto", "torch", "nvlink", "nvshmem")
NUM_MAX_NVL_PEERS = 8


class EventOverlap:
    """DeepEP's `EventOverlap`: an event to wait for (None when the work already finished, as on CPU) and
    the tensors that must live until then. `with ev:` waits on exit; `current_stream_wait()` waits now."""

    def __init__(self, event: torch.cuda.Event | None = None, extra_tensors: tuple | None = None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.current_stream_wait()


def _finish(device: torch.device, async_finish: bool, tensors: tuple) -> EventOverlap:
    if device.type == "cuda" and async_finish:
        ev = torch.cuda.Event()
        ev.record()
        return EventOverlap(ev, tuple(t for t in tensors if isinstance(t, torch.Tensor)))
    return EventOverlap()


def _wait_previous(previous_event: EventOverlap | None) -> None:
    if previous_event is not None:
        previous_event.current_stream_wait()


def _check_tensor(
    name: str, t, *, dims: int | None = None, dtypes=None, rows: int | None = None, device=None
):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (x's device)")
    return t


def _same_node(group, rank: int, num_ranks: int) -> bool:
    names = [None] * num_ranks
    dist.all_gather_object(names, os.uname().nodename, group=group)
    return len(set(names)) == 1


class Buffer:
    """Expert-parallel dispatch/combine buffer for the ranks of `group` (DeepEP's constructor; `backend`
    and `timeout` are dsv3's additions: `timeout` seconds bounds every wait of the CUDA backends, the
    `torch` backend waits as long as the process group's own timeout). Experts map to ranks in contiguous
    blocks: rank = expert // (num_experts / R)."""

    num_sms: int = 20

    def __init__(
        self,
        group=None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm=None,
        *,
        backend: str = "auto",
        timeout: float | None = None,
    ):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("Buffer: torch.distributed is not initialized (call init_process_group first)")
        for name, v in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"Buffer: {name} must be a non-negative int, got {v!r}")
        if not isinstance(num_qps_per_rank, int) or num_qps_per_rank < 1:
            raise ValueError(f"Buffer: num_qps_per_rank must be a positive int, got {num_qps_per_rank!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"Buffer: backend must be one of {_BACKENDS}, got {backend!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"Buffer: timeout must be positive seconds, got {timeout!r}")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = bool(low_latency_mode)
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = allow_nvlink_for_low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.timeout = float(timeout if timeout is not None else os.environ.get("DSV3_EP_TIMEOUT_S", 100.0))
        self.requested_backend = backend
        self._torch = TorchBackend(self.group, self.rank, self.group_size)
        self._normal_gpu = None  # nvlink (intranode) or nvshmem (internode) for CUDA tensors
        self._ll_gpu = None  # nvshmem low-latency for CUDA tensors
        self._ll_combine_buffers: dict[int, torch.Tensor] = {}
        self._ll_next = 0
        self._destroyed = False
        self._setup_gpu_backends(backend)

    # ---- backend selection -------------------------------------------------------------------------------

    def _setup_gpu_backends(self, backend: str) -> None:
        if backend == "torch":
            return
        nccl = "nccl" in str(dist.get_backend(self.group)).lower()
        wants_nvlink = backend == "nvlink" or (
            backend == "auto" and nccl and self.num_nvl_bytes > 0 and self.group_size in (2, 4, 8)
        )  # the intranode kernels are instantiated for 2, 4 and 8 ranks
        wants_nvshmem = backend == "nvshmem" or (
            backend == "auto"
            and nccl
            and (self.low_latency_mode or self.group_size > NUM_MAX_NVL_PEERS)
            and self.num_rdma_bytes > 0
        )
        if wants_nvlink:
            from .backends import nvlink

            ok, why = nvlink.NvlinkBackend.available()
            if ok and not _same_node(self.group, self.rank, self.group_size):
                ok, why = False, "the ranks of the group are not all on one node"
            if ok:
                self._normal_gpu = nvlink.NvlinkBackend(
                    self.group, self.num_nvl_bytes, self.rank, self.group_size, self.timeout
                )
            elif backend == "nvlink":
                raise RuntimeError(f"Buffer: the nvlink backend is unavailable: {why}")
        if wants_nvshmem:
            from .backends import nvshmem

            ok, why = nvshmem.NvshmemBackend.available()
            if ok:
                be = nvshmem.NvshmemBackend(
                    self.group,
                    self.num_rdma_bytes,
                    self.rank,
                    self.group_size,
                    self.low_latency_mode,
                    self.num_qps_per_rank,
                    self.timeout,
                    self.allow_nvlink_for_low_latency_mode,
                )
                self._ll_gpu = be if self.low_latency_mode else None
                if self.group_size > NUM_MAX_NVL_PEERS and self._normal_gpu is None:
                    self._normal_gpu = be
            elif backend == "nvshmem":
                raise RuntimeError(f"Buffer: the nvshmem backend is unavailable: {why}")

    def backend_for(self, device: torch.device, low_latency: bool = False):
        """The backend object that serves tensors on `device` (CPU tensors: always `torch`)."""
        if self._destroyed:
            raise RuntimeError("Buffer: used after destroy()")
        if device.type == "cuda":
            be = self._ll_gpu if low_latency else self._normal_gpu
            if be is not None:
                return be
        return self._torch

    @property
    def backend_names(self) -> dict[str, str]:
        """Which backend serves CUDA tensors in normal and low-latency mode."""
        return {
            "normal": (self._normal_gpu or self._torch).name,
            "low_latency": (self._ll_gpu or self._torch).name,
        }

    # ---- static helpers (DeepEP's) -----------------------------------------------------------------------

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        _config.set_num_sms(new_num_sms)
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current CUDA stream (an empty EventOverlap without CUDA)."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            ev = torch.cuda.Event()
            ev.record()
            return EventOverlap(ev)
        return EventOverlap()

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's tuned table where it has the rank count, else the default Config."""
        try:
            return _config.get_dispatch_config(num_ranks)
        except ValueError:
            return Config(_config.get_num_sms())

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        try:
            return _config.get_combine_config(num_ranks)
        except ValueError:
            return Config(_config.get_num_sms())

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        from .backends.nvshmem import low_latency_size_hint

        return low_latency_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def is_sm90_compiled() -> bool:
        import dsv3

        return any(a.startswith("sm_90") for a in dsv3.build_info()["cuda_archs"])

    def get_comm_stream(self):
        return torch.cuda.current_stream() if torch.cuda.is_available() else None

    def get_local_buffer_tensor(self, dtype: torch.dtype, size=None, offset: int = 0, use_rdma_buffer=False):
        be = self._ll_gpu if use_rdma_buffer else self._normal_gpu
        if be is None or not hasattr(be, "local_buffer_tensor"):
            raise RuntimeError(
                "Buffer.get_local_buffer_tensor: the torch backend has no communication buffer; it needs the "
                "nvlink (use_rdma_buffer=False) or nvshmem (use_rdma_buffer=True) backend"
            )
        return be.local_buffer_tensor(dtype, size, offset)

    def destroy(self) -> None:
        """Release the CUDA backends' buffers (DeepEP's explicit destruction); unusable afterwards."""
        for be in {id(b): b for b in (self._normal_gpu, self._ll_gpu) if b is not None}.values():
            be.destroy()
        self._normal_gpu = self._ll_gpu = None
        self._destroyed = True

    # ---- layout -------------------------------------------------------------------------------------------

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [R/8] int32 or None when R <= 8,
        num_tokens_per_expert [E] int32, is_token_in_rank [n, R] bool, event). -1 entries route nowhere."""
        self._check_event_args(previous_event, async_finish, allocate_on_comm_stream)
        _check_tensor("topk_idx", topk_idx, dims=2, dtypes=(torch.int64, torch.int32))
        self._check_num_experts(num_experts)
        _wait_previous(previous_event)
        out = dispatch_layout(topk_idx, num_experts, self.group_size, NUM_MAX_NVL_PEERS)
        return (*out, _finish(topk_idx.device, async_finish, out))

    def _check_num_experts(self, num_experts) -> int:
        if not isinstance(num_experts, int) or num_experts < 1 or num_experts % self.group_size:
            raise ValueError(
                f"num_experts must be a positive multiple of the group size {self.group_size}, "
                f"got {num_experts!r}"
            )
        return num_experts // self.group_size

    @staticmethod
    def _check_event_args(previous_event, async_finish, allocate_on_comm_stream) -> None:
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise TypeError(
                f"previous_event must be an EventOverlap or None, got {type(previous_event).__name__}"
            )
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ValueError("allocate_on_comm_stream=True needs previous_event and async_finish=True")

    # ---- normal dispatch / combine ------------------------------------------------------------------------

    def dispatch(
        self,
        x,
        handle: tuple | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Send each token once to every rank holding one of its experts. Returns (recv_x — a tensor, or
        (recv_x, recv_scales) for FP8 input —, recv_topk_idx (local ids, -1 elsewhere), recv_topk_weights
        (0 where -1), num_recv_tokens_per_expert_list (aligned to expert_alignment; [] with
        num_worst_tokens), handle, event). With `handle` (a previous dispatch's), the layout is reused
        (cached dispatch: x only, topk_* must be None)."""
        self._check_event_args(previous_event, async_finish, allocate_on_comm_stream)
        x, x_scales = self._check_x(x)
        n, dev, R = x.shape[0], x.device, self.group_size
        config = config if config is not None else self.get_dispatch_config(R)
        if not isinstance(config, Config):
            raise TypeError(f"config must be a dsv3.ep.Config, got {type(config).__name__}")
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise ValueError(f"expert_alignment must be a positive int, got {expert_alignment!r}")
        if not isinstance(num_worst_tokens, int) or num_worst_tokens < 0:
            raise ValueError(f"num_worst_tokens must be a non-negative int, got {num_worst_tokens!r}")
        be = self.backend_for(dev)
        _wait_previous(previous_event)
        if handle is not None and (topk_idx is not None or topk_weights is not None):
            raise ValueError("dispatch: a cached dispatch (handle given) takes no topk_idx / topk_weights")
        if self._internode(be):
            if handle is None:
                self._check_layout_args(n, dev, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)
                if num_tokens_per_rdma_rank is None:
                    raise ValueError("dispatch: num_tokens_per_rdma_rank is required across nodes (R > 8)")
                self._check_topk_args(topk_idx, topk_weights, n, num_tokens_per_expert, num_worst_tokens, dev)
            return self._internode_dispatch(
                be, x, x_scales, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens, config,
                async_finish,
            )  # fmt: skip
        if handle is not None:
            rpm, cpm, _, _, is_in, send_head = self._check_handle(handle, n, dev)
            recv_x, recv_scales, *_ = be.intranode_dispatch(
                x, x_scales, None, None, None, is_in, None,
                int(rpm[-1, self.rank]), rpm, cpm, expert_alignment, num_worst_tokens, config,
            )  # fmt: skip
            out = recv_x if x_scales is None else (recv_x, recv_scales)
            return out, None, None, None, handle, _finish(dev, async_finish, (recv_x, recv_scales))

        self._check_layout_args(n, dev, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)
        self._check_topk_args(topk_idx, topk_weights, n, num_tokens_per_expert, num_worst_tokens, dev)
        res = be.intranode_dispatch(
            x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
            num_tokens_per_expert, None, None, None, expert_alignment, num_worst_tokens, config,
        )  # fmt: skip
        recv_x, recv_scales, recv_topk_idx, recv_topk_weights, counts, rpm, cpm, rcpm, src_idx, head = res
        handle = (rpm, cpm, rcpm, src_idx, is_token_in_rank, head)
        out = recv_x if x_scales is None else (recv_x, recv_scales)
        tensors = (recv_x, recv_scales, recv_topk_idx, recv_topk_weights, *handle)
        return out, recv_topk_idx, recv_topk_weights, counts, handle, _finish(dev, async_finish, tensors)

    def _check_layout_args(
        self, n, dev, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert
    ) -> None:
        R = self.group_size
        if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
            raise ValueError(
                "dispatch: without a handle, num_tokens_per_rank, is_token_in_rank and num_tokens_per_expert "
                "are required (from get_dispatch_layout)"
            )
        _check_tensor("num_tokens_per_rank", num_tokens_per_rank, dims=1, rows=R, device=dev)
        _check_tensor("is_token_in_rank", is_token_in_rank, dims=2, dtypes=(torch.bool,), rows=n, device=dev)
        if is_token_in_rank.shape[1] != R:
            raise ValueError(f"is_token_in_rank must be [n, {R}], got {tuple(is_token_in_rank.shape)}")
        _check_tensor("num_tokens_per_expert", num_tokens_per_expert, dims=1, device=dev)
        self._check_num_experts(num_tokens_per_expert.numel())
        if not torch.equal(is_token_in_rank.sum(0).to(torch.int64), num_tokens_per_rank.to(torch.int64)):
            raise ValueError("num_tokens_per_rank does not match is_token_in_rank's column sums")

    def _check_topk_args(
        self, topk_idx, topk_weights, n, num_tokens_per_expert, num_worst_tokens, dev
    ) -> None:
        if (topk_idx is None) != (topk_weights is None):
            raise ValueError("dispatch: topk_idx and topk_weights must be given together")
        if topk_idx is not None:
            self._check_topk(topk_idx, topk_weights, n, num_tokens_per_expert.numel(), dev)
        elif num_worst_tokens:
            raise ValueError("dispatch: num_worst_tokens needs topk_idx and topk_weights")

    def _internode(self, be) -> bool:
        """Across nodes on a CUDA backend that has internode kernels: DeepEP's 10-tuple handle."""
        return (
            be is not self._torch
            and self.group_size > NUM_MAX_NVL_PEERS
            and hasattr(be, "internode_dispatch")
        )

    def _internode_dispatch(
        self, be, x, x_scales, handle, ntr, ntrr, is_in, nte, topk_idx, topk_weights, alignment, worst,
        config, async_finish,
    ):  # fmt: skip
        dev = x.device
        if handle is not None:
            if not isinstance(handle, tuple) or len(handle) != 10:
                raise ValueError("handle must be the 10-tuple an internode dispatch returned")
            is_in, rdma_cpm, gbl_cpm, _, rdma_prefix, _, gbl_prefix, src_meta, _, nvl_head = handle
            res = be.internode_dispatch(
                x, x_scales, None, None, None, None, is_in, None, src_meta.shape[0], nvl_head.shape[0],
                rdma_cpm, rdma_prefix, gbl_cpm, gbl_prefix, alignment, worst, config,
            )  # fmt: skip
            out = res[0] if x_scales is None else (res[0], res[1])
            return out, None, None, None, handle, _finish(dev, async_finish, (res[0], res[1]))
        res = be.internode_dispatch(
            x, x_scales, topk_idx, topk_weights, ntr, ntrr, is_in, nte, None, None, None, None, None, None,
            alignment, worst, config,
        )  # fmt: skip
        recv_x, recv_scales, recv_idx, recv_w, counts, *rest = res
        handle = (is_in, *rest)
        out = recv_x if x_scales is None else (recv_x, recv_scales)
        tensors = (recv_x, recv_scales, recv_idx, recv_w, *handle)
        return out, recv_idx, recv_w, counts, handle, _finish(dev, async_finish, tensors)

    def combine(
        self,
        x: torch.Tensor,
        handle: tuple,
        topk_weights: torch.Tensor | None = None,
        bias=None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Send the rows of a dispatch back and sum each token's copies in fp32, ranks ascending, after the
        optional bias (a tensor or a pair, [n, H] each); one cast to x's dtype (bf16; fp32 stays fp32). No
        top-k weighting. Returns (combined_x, combined_topk_weights (the same sum of topk_weights), event)."""
        self._check_event_args(previous_event, async_finish, allocate_on_comm_stream)
        _check_tensor("x", x, dims=2, dtypes=_ROW_DTYPES)
        dev = x.device
        config = config if config is not None else self.get_combine_config(self.group_size)
        if not isinstance(config, Config):
            raise TypeError(f"config must be a dsv3.ep.Config, got {type(config).__name__}")
        internode = isinstance(handle, tuple) and len(handle) == 10
        if not isinstance(handle, tuple) or len(handle) not in (6, 10):
            raise ValueError(
                "combine: handle must be the tuple a dispatch returned (6 entries, 10 across nodes)"
            )
        if internode:
            n = handle[0].shape[0]
            num_recv = handle[7].shape[0]  # recv_src_meta: one row per received token
        else:
            n = handle[4].shape[0] if isinstance(handle[4], torch.Tensor) else -1
            rpm, _, rcpm, src_idx, _, send_head = self._check_handle(handle, n, dev)
            num_recv = int(rpm[-1, self.rank])
        if x.shape[0] < num_recv:
            raise ValueError(f"combine: x has {x.shape[0]} rows, the handle's dispatch received {num_recv}")
        if topk_weights is not None:
            _check_tensor("topk_weights", topk_weights, dims=2, dtypes=(torch.float32,), device=dev)
            if topk_weights.shape[0] != x.shape[0]:
                raise ValueError(
                    f"topk_weights must have x's {x.shape[0]} rows, got {tuple(topk_weights.shape)}"
                )
        biases = [] if bias is None else list(bias) if isinstance(bias, (tuple, list)) else [bias]
        if len(biases) > 2:
            raise ValueError(f"bias must be a tensor or at most two tensors, got {len(biases)}")
        for i, b in enumerate(biases):
            _check_tensor(f"bias[{i}]", b, dims=2, dtypes=_ROW_DTYPES, rows=n, device=dev)
            if b.shape[1] != x.shape[1]:
                raise ValueError(f"bias[{i}] must be [{n}, {x.shape[1]}], got {tuple(b.shape)}")
        biases += [None] * (2 - len(biases))
        _wait_previous(previous_event)
        be = self.backend_for(dev)
        if internode:
            if not self._internode(be):
                raise ValueError(
                    "combine: an internode handle needs the buffer's internode (nvshmem) backend"
                )
            is_in, _, _, rdma_cpm, rdma_prefix, gbl_cpm, _, src_meta, rdma_head, nvl_head = handle
            combined, combined_w = be.internode_combine(
                x, topk_weights, biases[0], biases[1], src_meta, is_in, rdma_cpm, rdma_prefix, gbl_cpm,
                rdma_head, nvl_head, config,
            )  # fmt: skip
        else:
            combined, combined_w = be.intranode_combine(
                x, topk_weights, biases[0], biases[1], src_idx, rpm, rcpm, send_head, config
            )
        return combined, combined_w, _finish(dev, async_finish, (combined, combined_w))

    def _check_x(self, x):
        if isinstance(x, tuple):
            if len(x) != 2:
                raise ValueError("x must be a tensor or a (float8_e4m3fn data, scales) pair")
            x, scales = x
            _check_tensor("x[0]", x, dims=2, dtypes=(_FP8,))
            _check_tensor(
                "x[1] (scales)", scales, dims=2, dtypes=(torch.float32, torch.int32), rows=x.shape[0]
            )
            if scales.device != x.device:
                raise ValueError(f"x[1] (scales) is on {scales.device}, x[0] on {x.device}")
            return x, scales
        _check_tensor("x", x, dims=2, dtypes=_ROW_DTYPES)
        return x, None

    def _check_topk(self, topk_idx, topk_weights, n: int, num_experts: int, dev) -> None:
        _check_tensor("topk_idx", topk_idx, dims=2, dtypes=(torch.int64, torch.int32), rows=n, device=dev)
        _check_tensor("topk_weights", topk_weights, dims=2, dtypes=(torch.float32,), rows=n, device=dev)
        if topk_weights.shape != topk_idx.shape:
            raise ValueError(
                f"topk_weights must have topk_idx's shape {tuple(topk_idx.shape)}, "
                f"got {tuple(topk_weights.shape)}"
            )
        if topk_idx.numel() and (int(topk_idx.min()) < -1 or int(topk_idx.max()) >= num_experts):
            raise ValueError(f"topk_idx entries must be in [-1, {num_experts})")

    def _check_handle(self, handle, n: int, dev):
        if not isinstance(handle, tuple) or len(handle) != 6:
            raise ValueError("handle must be the 6-tuple a dispatch returned")
        rpm, cpm, rcpm, src_idx, is_in, send_head = handle
        R = self.group_size
        if not isinstance(rpm, torch.Tensor) or tuple(rpm.shape) != (R, R):
            raise ValueError(f"handle[0] (rank_prefix_matrix) must be [{R}, {R}]")
        if not isinstance(is_in, torch.Tensor) or is_in.dim() != 2 or tuple(is_in.shape) != (n, R):
            raise ValueError(f"handle[4] (is_token_in_rank) must be [{n}, {R}] for this x")
        if rpm.device != dev or is_in.device != dev:
            raise ValueError(f"the handle's tensors are on {rpm.device}, x on {dev}")
        return handle

    # ---- low-latency mode ---------------------------------------------------------------------------------

    def _check_ll(self, num_max_dispatch_tokens_per_rank, hidden: int, num_experts) -> int:
        if not self.low_latency_mode:
            raise RuntimeError("low-latency dispatch/combine need Buffer(..., low_latency_mode=True)")
        if not isinstance(num_max_dispatch_tokens_per_rank, int) or num_max_dispatch_tokens_per_rank < 1:
            raise ValueError(
                "num_max_dispatch_tokens_per_rank must be a positive int, "
                f"got {num_max_dispatch_tokens_per_rank!r}"
            )
        if hidden % 128:
            raise ValueError(f"the hidden size must be a multiple of 128 in low-latency mode, got {hidden}")
        return self._check_num_experts(num_experts)

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ):
        """One row per (token, expert) into per-expert slots: recv_x [L, R·T, H] ((fp8, scales) with
        use_fp8: scales column-major [L, R·T, H/128] fp32, or [L, R·T, H/512] int32 UE8M0), recv_count [L],
        handle (src_info [L, R·T], layout_range [L, R] = begin<<32 | count, T, hidden, num_experts), event,
        hook (with return_recv_hook: call it to receive; until then recv_x is not filled)."""
        _check_tensor("x", x, dims=2, dtypes=(torch.bfloat16,))
        T = num_max_dispatch_tokens_per_rank
        L = self._check_ll(T, x.shape[1], num_experts)
        dev = x.device
        if x.shape[0] > T:
            raise ValueError(f"x has {x.shape[0]} tokens, more than num_max_dispatch_tokens_per_rank={T}")
        self._check_topk(topk_idx, torch.zeros(topk_idx.shape, device=dev), x.shape[0], num_experts, dev)
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be set")
        if use_ue8m0 and (not use_fp8 or x.shape[1] % 512):
            raise ValueError("use_ue8m0 needs use_fp8=True and a hidden size that is a multiple of 512")
        if cumulative_local_expert_recv_stats is not None:
            _check_tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, dims=1,
                          dtypes=(torch.int32,), rows=L, device=dev)  # fmt: skip
        if dispatch_wait_recv_cost_stats is not None:
            _check_tensor("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, dims=1,
                          dtypes=(torch.int64,), rows=self.group_size, device=dev)  # fmt: skip
        be = self.backend_for(dev, low_latency=True)
        t0 = time.perf_counter_ns()
        recv_x, recv_scales, recv_count, src_info, layout_range, hook = be.low_latency_dispatch(
            x, topk_idx, T, num_experts, use_fp8, round_scale, use_ue8m0, return_recv_hook
        )

        def after_receive():
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(
                    recv_count.to(cumulative_local_expert_recv_stats.device)
                )
            if dispatch_wait_recv_cost_stats is not None and be is self._torch:
                # one exchange brings every source's rows: each source is charged the whole wait
                dispatch_wait_recv_cost_stats.add_(time.perf_counter_ns() - t0)

        if hook is not None:
            inner = hook

            def hook():
                inner()
                after_receive()

        else:
            after_receive()
        handle = (src_info, layout_range, T, x.shape[1], num_experts)
        out = (recv_x, recv_scales) if use_fp8 else recv_x
        return out, recv_count, handle, _finish(dev, async_finish, (recv_x, recv_scales, recv_count)), hook

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: tuple,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ):
        """Send each expert output row back and return bf16(Σ_k topk_weights[t, k] · row) summed in fp32 in
        k order (-1 entries skipped): (combined_x [n, H], event, hook)."""
        if not isinstance(handle, tuple) or len(handle) != 5:
            raise ValueError("handle must be the 5-tuple low_latency_dispatch returned")
        src_info, layout_range, T, hidden, num_experts = handle
        L = self._check_ll(T, hidden, num_experts)
        R = self.group_size
        _check_tensor("x", x, dims=3, dtypes=(torch.bfloat16,))
        dev = x.device
        if tuple(x.shape) != (L, R * T, hidden):
            raise ValueError(
                f"x must be [{L}, {R * T}, {hidden}] (the dispatch's layout), got {tuple(x.shape)}"
            )
        n = topk_idx.shape[0] if isinstance(topk_idx, torch.Tensor) else 0
        self._check_topk(topk_idx, topk_weights, n, num_experts, dev)
        if use_logfmt:
            raise ValueError(
                "use_logfmt: the LogFMT combine encoding is not supported; pass use_logfmt=False"
            )
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be set")
        if zero_copy and not any(x.data_ptr() == b.data_ptr() for b in self._ll_combine_buffers.values()):
            raise ValueError(
                "zero_copy=True needs x to be the tensor get_next_low_latency_combine_buffer returned"
            )
        if out is not None:
            _check_tensor("out", out, dims=2, dtypes=(torch.bfloat16,), rows=n, device=dev)
            if out.shape[1] != hidden:
                raise ValueError(f"out must be [{n}, {hidden}], got {tuple(out.shape)}")
        if combine_wait_recv_cost_stats is not None:
            _check_tensor("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, dims=1,
                          dtypes=(torch.int64,), rows=R, device=dev)  # fmt: skip
        be = self.backend_for(dev, low_latency=True)
        t0 = time.perf_counter_ns()
        combined, hook = be.low_latency_combine(
            x,
            topk_idx,
            topk_weights,
            src_info,
            layout_range,
            T,
            num_experts,
            zero_copy,
            return_recv_hook,
            out,
        )
        if combine_wait_recv_cost_stats is not None and be is self._torch:

            def charge():
                combine_wait_recv_cost_stats.add_(time.perf_counter_ns() - t0)

            if hook is None:
                charge()
            else:
                inner = hook

                def hook():
                    inner()
                    charge()

        return combined, _finish(dev, async_finish, (combined,)), hook

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """The [L, R·T, H] bf16 tensor to write expert outputs into for `low_latency_combine(...,
        zero_copy=True)`; two alternate, so at most two combines' inputs are live at once (DeepEP's rule)."""
        if not isinstance(handle, tuple) or len(handle) != 5:
            raise ValueError("handle must be the 5-tuple low_latency_dispatch returned")
        src_info, _, T, hidden, num_experts = handle
        L = self._check_ll(T, hidden, num_experts)
        be = self.backend_for(src_info.device, low_latency=True)
        if be is not self._torch and hasattr(be, "next_combine_buffer"):
            buf = be.next_combine_buffer(L, self.group_size * T, hidden)
        else:
            shape = (L, self.group_size * T, hidden)
            slot = self._ll_next
            buf = self._ll_combine_buffers.get(slot)
            if buf is None or tuple(buf.shape) != shape or buf.device != src_info.device:
                buf = torch.empty(shape, dtype=torch.bfloat16, device=src_info.device)
            self._ll_next ^= 1
        self._ll_combine_buffers[self._ll_next ^ 1] = buf
        return buf

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int):
        """Reset the low-latency buffers (needed between normal-mode and low-latency use on the CUDA
        backends); collective like DeepEP's."""
        self._check_ll(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        for buf in self._ll_combine_buffers.values():
            buf.zero_()
        if self._ll_gpu is not None:
            self._ll_gpu.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        dist.barrier(group=self.group)
