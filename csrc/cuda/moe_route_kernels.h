// Launcher of the sm_90a MoE router kernel of SPEC §5 (dsv3.ops.reference.moe_route). Torch-free:
// csrc/cuda/moe_route_host.cpp validates the tensors, calls it with raw pointers and turns a returned error
// into an exception.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsv3::cuda {

// The most experts one warp holds in registers (32 lanes x 32 values).
constexpr int64_t kRouteMaxExperts = 1024;

// logits: contiguous fp32 [tokens, experts]; bias: fp32 [experts] or nullptr (zeros). Writes topk_idx
// int64 [tokens, top_k] and topk_weights fp32 [tokens, top_k], each token's experts best first (biased score
// descending, ties to the lower index); a token with a non-finite biased score gets ids 0..top_k-1 and NaN
// weights. Returns cudaSuccess, cudaErrorInvalidValue for arguments it cannot serve (experts outside
// [1, kRouteMaxExperts], top_k outside [1, experts], n_group not dividing experts, topk_group outside
// [1, n_group], top_k above the kept groups' experts, negative tokens), or the launch error. Nothing is
// launched for tokens == 0.
[[nodiscard]] cudaError_t moe_route(const float* logits, const float* bias, int64_t tokens, int64_t experts,
                                    int64_t top_k, int64_t n_group, int64_t topk_group,
                                    float routed_scaling_factor, bool norm_topk_prob, int64_t* topk_idx,
                                    float* topk_weights, cudaStream_t stream);

}  // namespace dsv3::cuda
