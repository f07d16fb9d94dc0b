"""Training: FP8 linear autograd, load balancing, MTP loss, optimizer, data, trainer, checkpoints."""

from .fp8_linear import (
    FP8GroupedLinearFunction,
    FP8LinearFunction,
    FP8TrainExperts,
    FP8TrainLinear,
    FP8TrainMLA,
    FP8TrainMLP,
    disable_fp8_training,
    enable_fp8_training,
    fp8_grouped_experts,
    fp8_grouped_linear,
    fp8_grouped_linears,
    fp8_linear,
    fp8_linears,
)

__all__ = [
    "FP8LinearFunction",
    "FP8GroupedLinearFunction",
    "FP8TrainLinear",
    "FP8TrainMLP",
    "FP8TrainMLA",
    "FP8TrainExperts",
    "fp8_linear",
    "fp8_linears",
    "fp8_grouped_linear",
    "fp8_grouped_linears",
    "fp8_grouped_experts",
    "enable_fp8_training",
    "disable_fp8_training",
]
