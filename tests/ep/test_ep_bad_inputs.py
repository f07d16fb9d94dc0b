"""Bad arguments to dsv3.ep.Buffer raise ValueError/TypeError naming the argument (SPEC §9), on a one-process
gloo group; the one-rank buffer itself works (every token stays home)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dsv3.ep import Buffer, Config

E, H, K, N = 8, 256, 2, 6


@pytest.fixture(scope="module")
def buf(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "init"
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    try:
        yield Buffer(), Buffer(low_latency_mode=True)
    finally:
        dist.destroy_process_group()


def _inputs():
    x = torch.randn((N, H)).to(torch.bfloat16)
    idx = torch.randint(0, E, (N, K))
    w = torch.rand((N, K))
    return x, idx, w


def _layout(b, idx):
    ntr, _, nte, in_rank, _ = b.get_dispatch_layout(idx, E)
    return dict(num_tokens_per_rank=ntr, is_token_in_rank=in_rank, num_tokens_per_expert=nte)


def test_one_rank_round_trip(buf):
    b, ll = buf
    x, idx, w = _inputs()
    recv_x, recv_idx, recv_w, counts, handle, _ = b.dispatch(
        x, topk_idx=idx, topk_weights=w, **_layout(b, idx)
    )
    assert torch.equal(recv_x, x) and torch.equal(recv_idx, idx) and torch.equal(recv_w, w)
    assert counts == torch.bincount(idx.flatten(), minlength=E).tolist()
    assert torch.equal(b.combine(recv_x, handle)[0], x)
    rx, cnt, h, _, _ = ll.low_latency_dispatch(x, idx, N, E, use_fp8=False)
    out = ll.low_latency_combine(rx, idx, w, h)[0]
    want = (x.float() * w.sum(1, keepdim=True)).to(torch.bfloat16)
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)


CASES = {
    "layout topk_idx 1-D": (ValueError, "topk_idx", lambda b, ll, x, i, w: b.get_dispatch_layout(i[:, 0], E)),
    "layout topk_idx float": (
        TypeError,
        "topk_idx",
        lambda b, ll, x, i, w: b.get_dispatch_layout(i.float(), E),
    ),
    "layout num_experts 0": (ValueError, "num_experts", lambda b, ll, x, i, w: b.get_dispatch_layout(i, 0)),
    "layout expert out of range": (
        ValueError,
        "topk_idx",
        lambda b, ll, x, i, w: b.get_dispatch_layout(i + E, E),
    ),
    "x 3-D": (
        ValueError,
        "x",
        lambda b, ll, x, i, w: b.dispatch(x[None], topk_idx=i, topk_weights=w, **_layout(b, i)),
    ),
    "x int": (
        TypeError,
        "x",
        lambda b, ll, x, i, w: b.dispatch(x.int(), topk_idx=i, topk_weights=w, **_layout(b, i)),
    ),
    "fp8 scales rows": (
        ValueError,
        "scales",
        lambda b, ll, x, i, w: b.dispatch(
            (x.to(torch.float8_e4m3fn), torch.ones(N - 1, 2)), topk_idx=i, topk_weights=w, **_layout(b, i)
        ),
    ),
    "no layout": (
        ValueError,
        "num_tokens_per_rank",
        lambda b, ll, x, i, w: b.dispatch(x, topk_idx=i, topk_weights=w),
    ),
    "weights without ids": (
        ValueError,
        "topk_idx",
        lambda b, ll, x, i, w: b.dispatch(x, topk_weights=w, **_layout(b, i)),
    ),
    "weights shape": (
        ValueError,
        "topk_weights",
        lambda b, ll, x, i, w: b.dispatch(x, topk_idx=i, topk_weights=w[:, :1], **_layout(b, i)),
    ),
    "weights dtype": (
        TypeError,
        "topk_weights",
        lambda b, ll, x, i, w: b.dispatch(x, topk_idx=i, topk_weights=w.double(), **_layout(b, i)),
    ),
    "id out of range": (
        ValueError,
        "topk_idx",
        lambda b, ll, x, i, w: b.dispatch(x, topk_idx=i * 0 + E, topk_weights=w, **_layout(b, i)),
    ),
    "in_rank dtype": (
        TypeError,
        "is_token_in_rank",
        lambda b, ll, x, i, w: b.dispatch(
            x,
            topk_idx=i,
            topk_weights=w,
            **{**_layout(b, i), "is_token_in_rank": torch.ones(N, 1, dtype=torch.int32)},
        ),
    ),
    "counts mismatch": (
        ValueError,
        "num_tokens_per_rank",
        lambda b, ll, x, i, w: b.dispatch(
            x, topk_idx=i, topk_weights=w, **{**_layout(b, i), "num_tokens_per_rank": torch.tensor([N + 1])}
        ),
    ),
    "alignment 0": (
        ValueError,
        "expert_alignment",
        lambda b, ll, x, i, w: b.dispatch(x, topk_idx=i, topk_weights=w, expert_alignment=0, **_layout(b, i)),
    ),
    "worst negative": (
        ValueError,
        "num_worst_tokens",
        lambda b, ll, x, i, w: b.dispatch(
            x, topk_idx=i, topk_weights=w, num_worst_tokens=-1, **_layout(b, i)
        ),
    ),
    "worst too small": (
        RuntimeError,
        "num_worst_tokens",
        lambda b, ll, x, i, w: b.dispatch(x, topk_idx=i, topk_weights=w, num_worst_tokens=1, **_layout(b, i)),
    ),
    "config type": (
        TypeError,
        "config",
        lambda b, ll, x, i, w: b.dispatch(x, topk_idx=i, topk_weights=w, config=(20, 6), **_layout(b, i)),
    ),
    "allocate_on_comm_stream alone": (
        ValueError,
        "allocate_on_comm_stream",
        lambda b, ll, x, i, w: b.get_dispatch_layout(i, E, allocate_on_comm_stream=True),
    ),
    "combine bad handle": (ValueError, "handle", lambda b, ll, x, i, w: b.combine(x, (1, 2))),
    "ll without low_latency_mode": (
        RuntimeError,
        "low_latency_mode",
        lambda b, ll, x, i, w: b.low_latency_dispatch(x, i, N, E),
    ),
    "ll too many tokens": (
        ValueError,
        "num_max_dispatch_tokens_per_rank",
        lambda b, ll, x, i, w: ll.low_latency_dispatch(x, i, N - 1, E),
    ),
    "ll hidden": (ValueError, "hidden", lambda b, ll, x, i, w: ll.low_latency_dispatch(x[:, :200], i, N, E)),
    "ll ue8m0 without fp8": (
        ValueError,
        "use_ue8m0",
        lambda b, ll, x, i, w: ll.low_latency_dispatch(x, i, N, E, use_fp8=False, use_ue8m0=True),
    ),
    "ll async and hook": (
        ValueError,
        "return_recv_hook",
        lambda b, ll, x, i, w: ll.low_latency_dispatch(x, i, N, E, async_finish=True, return_recv_hook=True),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_argument(buf, case):
    err, word, fn = CASES[case]
    b, ll = buf
    x, idx, w = _inputs()
    with pytest.raises(err, match=word):
        fn(b, ll, x, idx, w)


def test_combine_and_low_latency_combine_bad_inputs(buf):
    b, ll = buf
    x, idx, w = _inputs()
    _, _, recv_w, _, handle, _ = b.dispatch(x, topk_idx=idx, topk_weights=w, **_layout(b, idx))
    with pytest.raises(ValueError, match="rows"):
        b.combine(x[:2], handle)
    with pytest.raises(ValueError, match="bias"):
        b.combine(x, handle, bias=torch.zeros(N, H + 1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bias"):
        b.combine(x, handle, bias=(x, x, x))
    with pytest.raises(TypeError, match="config"):
        b.combine(x, handle, config="fast")
    rx, _, h, _, _ = ll.low_latency_dispatch(x, idx, N, E, use_fp8=False)
    with pytest.raises(ValueError, match="use_logfmt"):
        ll.low_latency_combine(rx, idx, w, h, use_logfmt=True)
    with pytest.raises(ValueError, match="zero_copy"):
        ll.low_latency_combine(rx.clone(), idx, w, h, zero_copy=True)
    with pytest.raises(ValueError, match="x must be"):
        ll.low_latency_combine(rx[:, :1], idx, w, h)
    with pytest.raises(ValueError, match="out"):
        ll.low_latency_combine(rx, idx, w, h, out=torch.empty(N, H + 1, dtype=torch.bfloat16))
    assert isinstance(Buffer.get_dispatch_config(1), Config)


def test_constructor_bad_inputs(buf):
    with pytest.raises(ValueError, match="num_nvl_bytes"):
        Buffer(num_nvl_bytes=-1)
    with pytest.raises(ValueError, match="backend"):
        Buffer(backend="rdma")
    with pytest.raises(ValueError, match="timeout"):
        Buffer(timeout=0)
    with pytest.raises(ValueError, match="num_qps_per_rank"):
        Buffer(num_qps_per_rank=0)


def test_byte_buffer_view():
    from dsv3.ep.backends.common import byte_buffer_view

    buf = torch.arange(64, dtype=torch.uint8)
    v = byte_buffer_view(buf, torch.int32, (3, 2), offset=8)
    assert v.shape == (3, 2) and torch.equal(v.view(torch.uint8).flatten(), buf[8:32])
    assert byte_buffer_view(buf, torch.float32).numel() == 16
    with pytest.raises(ValueError, match="offset"):
        byte_buffer_view(buf, torch.int32, offset=6)
    with pytest.raises(ValueError, match="size"):
        byte_buffer_view(buf, torch.int32, (20,))
