// Launcher of the sm_90a EP combine reduction (semantics: csrc/cpu/ep_combine.cpp and
// dsv3.ops.reference.ep_combine_reduce). Torch-free: csrc/cuda/ep_combine_host.cpp validates the tensors and
// calls it with raw pointers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsv3::cuda {

enum class CombineRowType { kFloat, kBFloat16, kHalf };

// x: contiguous [rows, hidden] of `type`; row_of: contiguous int64 [tokens, ranks], entries in [-1, rows);
// bias_0 / bias_1: contiguous fp32 [tokens, hidden] or nullptr; out: contiguous [tokens, hidden] of `type`.
// `node` ranks are summed before each rounding to `type` (node >= ranks: one fp32 sum, no inner rounding).
// Returns cudaErrorInvalidValue for negative sizes or node < 1, else the launch error; nothing is launched
// for tokens == 0 or hidden == 0.
[[nodiscard]] cudaError_t ep_combine_reduce(CombineRowType type, const void* x, const int64_t* row_of,
                                            const float* bias_0, const float* bias_1, void* out,
                                            int64_t tokens, int64_t hidden, int64_t ranks, int64_t node,
                                            cudaStream_t stream);

}  // namespace dsv3::cuda
