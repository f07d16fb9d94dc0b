"""DualPipe: the bidirectional pipeline-parallel schedule of the DeepSeek-V3 report (§3.2.1).

Arrangement. P ranks (P even) run two pipelines over the same P stages at once:

* direction 0 ("forward direction") feeds micro-batches in at rank 0; rank r runs stage r;
* direction 1 ("reverse direction") feeds micro-batches in at rank P-1; rank r runs stage P-1-r.

So rank r holds two chunks, `modules = (stage r, stage P-1-r)`, and every stage exists twice (on rank r in
direction 0 and on rank P-1-r in direction 1): the "2x parameters" of the report. The two copies start equal
(`dualpipe_modules` deep-copies one model) and stay equal as long as their gradients are summed before each
optimizer step (`DualPipe.sync_stage_grads`): each copy only sees the micro-batches of its own direction.

Batch and loss. On ranks 0 and P-1, `step` takes the whole batch (inputs and labels, the same on both ranks)
and cuts it into `num_chunks` micro-batches along dim 0. Micro-batches [0, C/2) go through direction 0 (fed
by rank 0, loss on rank P-1), micro-batches [C/2, C) through direction 1 (fed by rank P-1, loss on rank 0).
Each micro-batch loss is back-propagated scaled by 1/C, so after `sync_stage_grads` the gradients equal those
of `mean_j loss_fn(model(x_j), y_j)` over the C micro-batches, i.e. plain gradient accumulation with
`(loss_j / C).backward()`. `step` returns the unscaled per-micro-batch losses of the direction that ends on
this rank (rank P-1: micro-batches 0..C/2-1; rank 0: C/2..C-1; None elsewhere); `mean_loss` turns that into
the mean over all C micro-batches on every rank.

Schedule. Per rank, with H = P/2, h = min(r, P-1-r) and "phase 0" the direction whose pipeline this rank is
early in (direction 0 on the first half of the ranks, direction 1 on the second half), the eight steps of
the reference implementation (deepseek-ai/DualPipe):

    1. nF0          2(H-h-1) forwards of phase 0 (warm-up, only the phase-0 pipeline is moving)
    2. nF0F1        h+1 pairs of forwards, one per phase
    3. nB1W1F1      H-h-1 x (input-grad backward of phase 1, its weight grads, forward of phase 1)
    4. nF0B1F1B0    C/2-P+h+1 x (forward 0 + backward 1, forward 1 + backward 0): the steady state, where a
                    forward of one direction is paired with a backward of the other
    5. nB1F1B0      H-h-1 x (backward 1, forward 1 + backward 0)
    6. nB1B0        h+1 pairs of backwards (the second half of them defer their weight grads)
    7. nWB0         H-h-1 x (deferred weight grads, backward 0 with deferred weight grads)
    8. nW           the remaining h+1 deferred weight grads

Communication is point-to-point (`dist.isend`/`irecv`, so gloo works on CPU): a send is posted as soon as
its tensor exists and every request is waited for at the next synchronization point, before the next
compute, as in the reference. Each message has a unique tag (micro-batch, direction, kind), and a small
header carrying shape and dtype precedes each tensor, so stage boundary shapes need not be declared.

Weight-gradient deferral ("W", ZeroBubble). With `zero_bubble=True`, a deferred backward computes only the
input gradient (`torch.autograd.grad`, which skips the weight-gradient GEMMs) so it can be sent at once, and
the W step later runs the backward again for the parameters. That is generic but recomputes the activation
gradients once more; with `zero_bubble=False` (default) B computes everything and W is a no-op, which keeps
the schedule's order and its communication pattern at the cost of a slightly larger bubble.

The per-chunk compute is sequential here: overlapping the forward of one chunk with the backward of the other
(the report's attention/dispatch/MLP/combine interleaving) needs the expert all-to-all on separate streams,
which this CPU/gloo implementation does not model; the point-to-point transfers do overlap with compute.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.bool,
    torch.float8_e4m3fn,
]
_HEADER = 10  # dtype code, ndim, up to 8 dims


# ----------------------------------------------------------------------------------------------- stages


class PipelineStage(nn.Module):
    """A contiguous slice of a DeepseekV3: optionally the embedding (first stage), blocks, and optionally the
    final norm and head (last stage). `forward` maps ids -> hidden -> ... -> logits, positions 0..s-1."""

    def __init__(self, model: nn.Module, start: int, end: int, first: bool, last: bool):
        super().__init__()
        self.embed_tokens = model.model.embed_tokens if first else None
        self.layers = nn.ModuleList(model.model.layers[start:end])
        self.norm = model.model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.rotary = model.rotary
        self.layer_range = (start, end)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        b, s = x.shape[:2]
        cos, sin = self.rotary(torch.arange(s, device=x.device).expand(b, s))
        for layer in self.layers:
            x = layer(x, cos, sin)
        if self.lm_head is not None:
            x = self.lm_head(self.norm(x))
        return x


def split_stages(model: nn.Module, num_stages: int) -> list[PipelineStage]:
    """Cuts a dsv3 DeepseekV3 into `num_stages` PipelineStages that share its modules (no copies): stage 0
    has the embedding, the last stage the final norm and lm_head, and the `num_hidden_layers` main blocks are
    spread as evenly as possible (earlier stages get the extra block). The MTP layer is not pipelined: it is
    left out of every stage (train it, if at all, outside the pipeline)."""
    n = model.config.num_hidden_layers
    if num_stages < 1 or num_stages > n:
        raise ValueError(f"split_stages: need 1 <= num_stages <= num_hidden_layers ({n}), got {num_stages}")
    if model.config.tie_word_embeddings and num_stages > 1:
        raise ValueError("split_stages: tied embeddings would span the first and last stage")
    base, extra = divmod(n, num_stages)
    stages, start = [], 0
    for s in range(num_stages):
        end = start + base + (s < extra)
        stages.append(PipelineStage(model, start, end, s == 0, s == num_stages - 1))
        start = end
    return stages


def dualpipe_modules(model: nn.Module, rank: int, num_ranks: int) -> tuple[nn.Module, nn.Module]:
    """(stage rank, stage num_ranks-1-rank) of `model`, each a deep copy (so the two chunks on a rank, and
    the two copies of one stage on ranks r and P-1-r, start from the same weights but own their parameters).
    Every rank must build `model` identically (same config and seed)."""
    if num_ranks < 2 or num_ranks % 2:
        raise ValueError(f"dualpipe_modules: the number of ranks must be even and >= 2, got {num_ranks}")
    if not 0 <= rank < num_ranks:
        raise ValueError(f"dualpipe_modules: rank {rank} outside [0, {num_ranks})")
    stages = split_stages(model, num_ranks)
    return copy.deepcopy(stages[rank]), copy.deepcopy(stages[num_ranks - 1 - rank])


# ------------------------------------------------------------------------------------------- schedule


class DualPipe(nn.Module):
    """Runs `modules = (stage r, stage P-1-r)` on rank r of `group` (default: the world) under the DualPipe
    schedule; see the module docstring for the arrangement, the batch/loss convention and the steps."""

    def __init__(
        self,
        modules: tuple[nn.Module, nn.Module],
        group: dist.ProcessGroup | None = None,
        zero_bubble: bool = False,
    ):
        super().__init__()
        if len(modules) != 2:
            raise ValueError("DualPipe: expects exactly two modules (stage r, stage P-1-r)")
        self.module = nn.ModuleList(modules)
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        if self.num_ranks < 2 or self.num_ranks % 2:
            raise ValueError(f"DualPipe: the number of ranks must be even and >= 2, got {self.num_ranks}")
        self.zero_bubble = zero_bubble
        self.partner = self.num_ranks - 1 - self.rank  # holds the other copy of both our stages
        self.is_second_half = self.rank >= self.num_ranks // 2
        self.num_chunks = 0

    # -- topology ---------------------------------------------------------------------------------------

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _first(self, d: int) -> bool:  # first stage of direction d lives here
        return self.rank == (0 if d == 0 else self.num_ranks - 1)

    def _last(self, d: int) -> bool:
        return self.rank == (self.num_ranks - 1 if d == 0 else 0)

    def _next(self, d: int) -> int:
        return self.rank + 1 if d == 0 else self.rank - 1

    def _prev(self, d: int) -> int:
        return self.rank - 1 if d == 0 else self.rank + 1

    def _dir(self, phase: int) -> int:
        return phase ^ int(self.is_second_half)

    # -- communication ----------------------------------------------------------------------------------

    def _tag(self, chunk: int, d: int, kind: int, header: bool) -> int:
        return ((chunk * 2 + d) * 2 + kind) * 2 + (0 if header else 1)

    def _isend(self, t: torch.Tensor, peer: int, chunk: int, d: int, kind: int) -> None:
        t = t.detach().contiguous()
        head = torch.zeros(_HEADER, dtype=torch.int64)
        head[0], head[1] = _DTYPES.index(t.dtype), t.dim()
        head[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        dst = self._global(peer)
        for x, h in ((head, True), (t, False)):
            self._pending.append(dist.isend(x, dst, self.group, tag=self._tag(chunk, d, kind, h)))
            self._keep.append(x)  # a send buffer must outlive its request

    def _irecv(self, peer: int, chunk: int, d: int, kind: int, slot: list, index: int) -> None:
        """Posts the receive of the header now; the tensor itself is received (into slot[index]) at the next
        wait, once its shape is known."""
        head = torch.empty(_HEADER, dtype=torch.int64)
        req = dist.irecv(head, self._global(peer), self.group, tag=self._tag(chunk, d, kind, True))
        self._recvs.append((req, head, peer, chunk, d, kind, slot, index))

    def _wait(self) -> None:
        """Completes every posted transfer (the reference's commit-and-wait before each compute)."""
        body = []
        for req, head, peer, chunk, d, kind, slot, index in self._recvs:
            req.wait()
            shape = head[2 : 2 + int(head[1])].tolist()
            t = torch.empty(shape, dtype=_DTYPES[int(head[0])])
            r = dist.irecv(t, self._global(peer), self.group, tag=self._tag(chunk, d, kind, False))
            body.append((r, t, slot, index))
        for r, t, slot, index in body:
            r.wait()
            slot[index] = t
        for req in self._pending:
            req.wait()
        self._recvs, self._pending, self._keep = [], [], []

    def _recv_forward(self, phase: int) -> None:
        d = self._dir(phase)
        if self._first(d):
            return
        i = self._recv_f[d]
        self._recv_f[d] += 1
        self._inputs[d].append(None)
        self._irecv(self._prev(d), i, d, 0, self._inputs[d], i)

    def _send_forward(self, phase: int) -> None:
        d = self._dir(phase)
        if self._last(d):
            return
        i = self._send_f[d]
        self._send_f[d] += 1
        self._isend(self._outputs[d][i], self._next(d), i, d, 0)
        if not self._training:
            self._outputs[d][i] = None

    def _recv_backward(self, phase: int) -> None:
        d = self._dir(phase)
        if self._last(d) or not self._training:
            return
        i = self._recv_b[d]
        self._recv_b[d] += 1
        self._irecv(self._next(d), i, d, 1, self._out_grads[d], i)

    def _send_backward(self, phase: int) -> None:
        d = self._dir(phase)
        if self._first(d) or not self._training:
            return
        i = self._send_b[d]
        self._send_b[d] += 1
        g = self._in_grads[d][i]
        self._in_grads[d][i] = None
        self._isend(g, self._prev(d), i, d, 1)

    # -- compute ----------------------------------------------------------------------------------------

    def _forward_compute(self, phase: int) -> None:
        d = self._dir(phase)
        i = self._fwd[d]
        self._fwd[d] += 1
        x = self._inputs[d][i]
        if self._training and not self._first(d) and x.is_floating_point():
            x.requires_grad_(True)
        out = self.module[d](x)
        if self._last(d):
            if self._loss_fn is not None:
                self._losses[d].append(self._loss_fn(out, self._labels[d][i]))
            if self._return_outputs:
                self._final[d].append(out.detach())
            out = None
        if not self._training:
            self._inputs[d][i] = None
        self._outputs[d].append(out)
        self._out_grads[d].append(None)
        self._in_grads[d].append(None)

    def _backward_compute(self, phase: int, enable_zb: bool = False) -> None:
        if not self._training:
            return
        d = self._dir(phase)
        i = self._bwd[d]
        self._bwd[d] += 1
        if self._last(d):
            outs, grads = self._losses[d][i] / self.num_chunks, None
        else:
            outs, grads = self._outputs[d][i], self._out_grads[d][i]
            # its forward send was posted already (the gradient came back), and holds its own reference
            self._outputs[d][i] = self._out_grads[d][i] = None
        x = self._inputs[d][i]
        self._inputs[d][i] = None
        needs_x = isinstance(x, torch.Tensor) and x.requires_grad
        if enable_zb and self.zero_bubble:
            if needs_x:
                (gx,) = torch.autograd.grad(outs, x, grads, retain_graph=True)
                self._in_grads[d][i] = gx
            params = [p for p in self.module[d].parameters() if p.requires_grad]

            def weight_grads(outs=outs, grads=grads, params=params) -> None:
                torch.autograd.backward(outs, grads, inputs=params)

            self._weight_queue.append(weight_grads)
        else:
            torch.autograd.backward(outs, grads)
            if needs_x:
                self._in_grads[d][i] = x.grad
        if enable_zb and not self.zero_bubble:
            self._weight_queue.append(None)
        if self._last(d):
            self._losses[d][i] = self._losses[d][i].detach()

    def _weight_compute(self) -> None:
        if not self._training:
            return
        fn = self._weight_queue.popleft()
        if fn is not None:
            fn()

    # -- schedule building blocks (the reference's) -----------------------------------------------------

    def _forward_chunk(self, phase: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self._recv_forward(phase)
        self._wait()
        self._forward_compute(phase)
        if send:
            self._send_forward(phase)

    def _backward_chunk(self, phase: int, enable_zb: bool = False, recv: bool = True, send: bool = True):
        if recv:
            self._recv_backward(phase)
        self._wait()
        self._backward_compute(phase, enable_zb)
        if send:
            self._send_backward(phase)

    def _forward_backward_chunk(self, phase0: int, phase1: int, recv0: bool = True) -> None:
        """Forward of phase0 paired with backward of phase1 (the other direction): their transfers are
        posted together and travel while the two computations run."""
        if recv0:
            self._recv_forward(phase0)
        self._recv_backward(phase1)
        self._wait()
        self._forward_compute(phase0)
        self._backward_compute(phase1)
        self._send_forward(phase0)
        self._send_backward(phase1)

    def _weight_chunk(self) -> None:
        self._wait()
        self._weight_compute()

    # -- public -----------------------------------------------------------------------------------------

    def step(
        self,
        inputs: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        num_chunks: int = 0,
        return_outputs: bool = False,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
        """One DualPipe pass over `num_chunks` micro-batches (even, >= 2P). Ranks 0 and P-1 pass the whole
        batch `inputs` (and `labels` plus `loss_fn(outputs, labels) -> scalar` when training); the other ranks
        pass nothing. Under torch.no_grad() it only runs the forwards. Parameter gradients accumulate into
        both chunks (scaled by 1/num_chunks, see the module docstring); call `sync_stage_grads` before the
        optimizer step. Returns (losses, outputs): on rank P-1 the losses [C/2] of micro-batches 0..C/2-1 and
        on rank 0 those of C/2..C-1 (None elsewhere or without loss_fn); with return_outputs, the last
        stage's outputs of those micro-batches on the same ranks."""
        P = self.num_ranks
        if num_chunks < 2 * P or num_chunks % 2:
            raise ValueError(
                f"DualPipe.step: num_chunks must be even and >= 2 * ranks ({2 * P}): {num_chunks}"
            )
        self._training = torch.is_grad_enabled()
        ends = self.rank in (0, P - 1)
        if ends and inputs is None:
            raise ValueError("DualPipe.step: ranks 0 and P-1 need the inputs")
        if ends and self._training and (loss_fn is None or labels is None):
            raise ValueError("DualPipe.step: training needs labels and loss_fn on ranks 0 and P-1")
        if ends and inputs.shape[0] % num_chunks:
            raise ValueError(
                f"DualPipe.step: batch {inputs.shape[0]} not divisible by num_chunks {num_chunks}"
            )
        self.num_chunks = num_chunks
        half = num_chunks // 2
        self._loss_fn, self._return_outputs = loss_fn, return_outputs
        self._inputs, self._outputs, self._out_grads, self._in_grads = ([], []), ([], []), ([], []), ([], [])
        self._labels, self._losses, self._final = ([], []), ([], []), ([], [])
        self._fwd, self._bwd, self._recv_f, self._send_f, self._recv_b, self._send_b = (
            [0, 0] for _ in range(6)
        )
        self._pending, self._recvs, self._keep = [], [], []
        self._weight_queue: deque = deque()
        if ends:
            xs = list(inputs.chunk(num_chunks))
            ys = list(labels.chunk(num_chunks)) if labels is not None else [None] * num_chunks
            d_in = 0 if self.rank == 0 else 1  # the direction this rank feeds
            self._inputs[d_in].extend(xs[:half] if d_in == 0 else xs[half:])
            self._labels[1 - d_in].extend(ys[half:] if d_in == 0 else ys[:half])

        H = P // 2
        h = min(self.rank, P - 1 - self.rank)
        middle = h == H - 1

        for _ in range(2 * (H - h - 1)):  # 1. nF0
            self._forward_chunk(0)

        self._recv_forward(0)  # 2. nF0F1
        for i in range(h + 1):
            self._forward_chunk(0, recv=False, send=middle)
            self._recv_forward(0)
            self._forward_chunk(1, send=not middle or i < h)
            if not middle:
                self._send_forward(0)

        for _ in range(H - h - 1):  # 3. nB1W1F1
            self._backward_chunk(1, enable_zb=True)
            self._recv_forward(1)
            self._weight_chunk()
            self._forward_chunk(1, recv=False)

        for i in range(half - P + h + 1):  # 4. nF0B1F1B0 (main)
            if i == 0 and middle:
                # the middle ranks run this first pair unpaired: both directions' tails meet here
                self._forward_chunk(0, recv=False, send=False)
                self._send_forward(1)
                self._backward_chunk(1, send=False)
                self._send_forward(0)
                self._send_backward(1)
            else:
                self._forward_backward_chunk(0, 1, recv0=i > 0)
            self._forward_backward_chunk(1, 0)

        for _ in range(H - h - 1):  # 5. nB1F1B0
            self._backward_chunk(1)
            self._forward_backward_chunk(1, 0)

        zb = False  # 6. nB1B0, deferring weight grads from the middle on
        for i in range(h + 1):
            if i == (h + 1) // 2 and h % 2 == 1:
                zb = True
            self._backward_chunk(1, enable_zb=zb)
            if i == (h + 1) // 2 and h % 2 == 0:
                zb = True
            self._backward_chunk(0, enable_zb=zb)

        for _ in range(H - h - 1):  # 7. nWB0
            self._weight_chunk()
            self._backward_chunk(0, enable_zb=True)

        for _ in range(h + 1):  # 8. nW
            self._weight_chunk()
        self._wait()
        if self._training and self._weight_queue:
            raise RuntimeError("DualPipe: deferred weight gradients left over (schedule bug)")

        d_out = 0 if self.rank == P - 1 else 1 if self.rank == 0 else None
        loss = outputs = None
        if d_out is not None:
            if loss_fn is not None:
                loss = torch.stack([x.detach() for x in self._losses[d_out]])
            if return_outputs:
                outputs = self._final[d_out]
        self._inputs = self._outputs = self._out_grads = self._in_grads = self._losses = None
        return loss, outputs

    def mean_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The mean loss over all micro-batches of the last `step`, on every rank (a collective: every rank of
        the group must call it)."""
        total = torch.zeros((), dtype=torch.float64)
        if loss is not None:
            total += loss.double().sum()
        dist.all_reduce(total, group=self.group)
        return (total / self.num_chunks).float()

    def sync_stage_grads(self) -> None:
        """Sums the gradients of the two copies of each stage (stage r on rank r in direction 0 and on rank
        P-1-r in direction 1), so both copies hold the gradient of the whole batch and identical optimizer
        steps keep them identical. A collective over each pair (r, P-1-r). A missing gradient counts as 0."""
        mine = [self._flat_grads(self.module[0]), self._flat_grads(self.module[1])]
        theirs = [torch.empty_like(mine[1]), torch.empty_like(mine[0])]  # the partner's chunk 0, chunk 1
        peer = self._global(self.partner)
        # rank r's chunk 0 is the same stage as the partner's chunk 1 and vice versa
        reqs = [dist.isend(mine[k], peer, self.group, tag=k) for k in (0, 1)]
        reqs += [dist.irecv(theirs[k], peer, self.group, tag=k) for k in (0, 1)]
        for r in reqs:
            r.wait()
        for k in (0, 1):
            total = mine[k] + theirs[1 - k]
            offset = 0
            for p in self.module[k].parameters():
                if not p.requires_grad:
                    continue
                n = p.numel()
                g = total[offset : offset + n].view_as(p).to(p.dtype)
                offset += n
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)

    @staticmethod
    def _flat_grads(module: nn.Module) -> torch.Tensor:
        parts = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
            for p in module.parameters()
            if p.requires_grad
        ]
        return torch.cat(parts) if parts else torch.zeros(0)
