// The EP combine reduction's argument checks and output allocation (csrc/cpu/ep_combine.cpp), shared by its
// CPU, CUDA and Meta entries so every device accepts and rejects the same inputs.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace dsv3 {

void check_ep_combine_reduce(const at::Tensor& x, const at::Tensor& row_of,
                             const std::optional<at::Tensor>& bias_0, const std::optional<at::Tensor>& bias_1,
                             int64_t ranks_per_node);
// Raises ValueError unless every row_of entry is in [-1, x.size(0)) (reads the values: a device sync on
// CUDA).
void check_ep_combine_rows(const at::Tensor& x, const at::Tensor& row_of);
at::Tensor alloc_ep_combine_reduce(const at::Tensor& x, const at::Tensor& row_of);
// The ranks summed before each rounding: ranks_per_node when the ranks span several nodes, else all of them.
int64_t ep_combine_node_size(int64_t ranks, int64_t ranks_per_node);

}  // namespace dsv3
