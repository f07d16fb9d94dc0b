"""Bad arguments to moe_route raise ValueError/TypeError whose message names the argument (SPEC §9); the
checks are structural, so the Meta kernel that torch.compile traces through makes them too."""

from __future__ import annotations

import pytest
import torch

from dsv3 import ops

VALID = dict(
    logits=torch.randn(5, 256),
    bias=torch.randn(256),
    top_k=8,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
)


def case(arg, value, exc=ValueError, match=None, name=None):
    return pytest.param(arg, value, exc, match, id=f"{arg}-{name or value}")


CASES = [
    case("logits", lambda t: t.to(torch.bfloat16), TypeError, name="bf16"),
    case("logits", lambda t: t.double(), TypeError, name="f64"),
    case("logits", lambda t: t.int(), TypeError, name="int32"),
    case("logits", lambda t: t[0], name="1d"),
    case("logits", lambda t: t.unsqueeze(0), name="3d"),
    case("logits", lambda t: torch.randn(2, 1025), match="logits must have at most 1024", name="wide"),
    case("bias", lambda t: t.half(), TypeError, name="f16"),
    case("bias", lambda t: t[:-1], name="short"),
    case("bias", lambda t: t.view(16, 16), name="2d"),
    case("bias", lambda t: t.to("meta"), name="meta_device"),
    case("top_k", 0),
    case("top_k", 257),
    case("top_k", 129, match="top_k must be at most topk_group"),  # 4 kept groups of 32
    case("n_group", 0),
    case("n_group", 3),
    case("topk_group", 0),
    case("topk_group", 9),
    case("routed_scaling_factor", float("inf")),
    case("routed_scaling_factor", float("nan")),
]


def mutated(arg, value):
    args = dict(VALID)
    args[arg] = value(args[arg]) if callable(value) else value
    return args


@pytest.mark.parametrize("arg, value, exc, match", CASES)
def test_bad_argument_names_it(arg, value, exc, match):
    with pytest.raises(exc, match=f"moe_route: {match or arg + ' must'}"):
        ops.moe_route(**mutated(arg, value))


@pytest.mark.parametrize("arg, value, exc, match", [c for c in CASES if c.id != "bias-meta_device"])
def test_meta_kernel_rejects_it_too(arg, value, exc, match):
    args = mutated(arg, value)
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(exc, match=f"moe_route: {match or arg + ' must'}"):
        ops.moe_route(**args)
