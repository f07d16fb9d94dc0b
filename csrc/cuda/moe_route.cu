// sm_90a MoE router kernel (SPEC §5) behind the launcher of moe_route_kernels.h: one warp per token. Lane l
// holds experts l, l + 32, l + 64, ... in registers (VALUES per lane, a compile-time count, so nothing spills
// to local memory); group scores are top-2 warp reductions (shuffles), and groups and experts are picked by
// rounds of a warp arg-max over (value, index) with ties to the lower index, the reference's order.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "moe_route_kernels.h"

namespace dsv3::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerCta = 4;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kNone = INT_MAX;  // the index of "no candidate": loses every comparison

struct Candidate {
  float value;
  int index;
};

// The router's total order: value descending, then index ascending (values are never NaN here).
__device__ __forceinline__ bool better(float v, int i, const Candidate& c) {
  return v > c.value || (v == c.value && i < c.index);
}

// The best candidate of the warp, on every lane.
__device__ __forceinline__ Candidate warp_best(Candidate c) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const float v = __shfl_xor_sync(kFullMask, c.value, offset);
    const int i = __shfl_xor_sync(kFullMask, c.index, offset);
    if (better(v, i, c)) c = {v, i};
  }
  return c;
}

// The lane's best value among the slots set in `avail`; slots are in ascending index order, so a strict
// comparison keeps the lower index on ties.
template <int VALUES>
__device__ __forceinline__ Candidate lane_best(const float (&v)[VALUES], uint32_t avail, int lane) {
  Candidate c{-INFINITY, kNone};
#pragma unroll
  for (int j = 0; j < VALUES; ++j)
    if ((avail >> j & 1) && (c.index == kNone || v[j] > c.value)) c = {v[j], j * kWarpSize + lane};
  return c;
}

// Top-2 of the warp's (first, second) pairs, on every lane: max and min are exact, so the result does not
// depend on the reduction order.
__device__ __forceinline__ void warp_top2(float& first, float& second) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const float other_first = __shfl_xor_sync(kFullMask, first, offset);
    const float other_second = __shfl_xor_sync(kFullMask, second, offset);
    second = fmaxf(fminf(first, other_first), fmaxf(second, other_second));
    first = fmaxf(first, other_first);
  }
}

template <int VALUES>
__device__ __forceinline__ float pick(const float (&v)[VALUES], int slot) {
  float out = 0.0f;
#pragma unroll
  for (int j = 0; j < VALUES; ++j)
    if (j == slot) out = v[j];
  return out;
}

template <int VALUES>
__global__ void __launch_bounds__(kWarpsPerCta* kWarpSize)
    moe_route_kernel(const float* __restrict__ logits, const float* __restrict__ bias, int64_t tokens,
                     int experts, int top_k, int n_group, int topk_group, float scale, bool norm,
                     int64_t* __restrict__ topk_idx, float* __restrict__ topk_weights) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarpSize;
  if (token >= tokens) return;  // whole warps leave together
  const float* row = logits + token * experts;
  int64_t* idx = topk_idx + token * top_k;
  float* weights = topk_weights + token * top_k;
  const int group_size = experts / n_group;

  float score[VALUES], choice[VALUES];
  int group_of[VALUES];
  uint32_t valid = 0;
  bool finite = true;
#pragma unroll
  for (int j = 0; j < VALUES; ++j) {
    const int e = j * kWarpSize + lane;
    score[j] = choice[j] = 0.0f;
    group_of[j] = n_group;  // past the last group: matches none
    if (e < experts) {
      score[j] = 1.0f / (1.0f + expf(-row[e]));          // torch's sigmoid formula
      choice[j] = bias ? score[j] + bias[e] : score[j];  // eq. 16: the bias only steers selection
      group_of[j] = e / group_size;
      valid |= 1u << j;
      finite &= isfinite(choice[j]);
    }
  }
  if (__any_sync(kFullMask, !finite)) {  // no order exists: ids 0..top_k-1, NaN weights
    for (int r = lane; r < top_k; r += kWarpSize) {
      idx[r] = r;
      weights[r] = NAN;
    }
    return;
  }

  uint32_t avail = valid;  // this lane's experts still selectable: in a kept group and not yet taken
  if (n_group > 1) {
    // Group g's score lands in lane g % 32, slot g / 32 (the experts' layout), for the same arg-max rounds.
    float group_score[VALUES];
    uint32_t groups_avail = 0;
#pragma unroll
    for (int j = 0; j < VALUES; ++j) {
      group_score[j] = -INFINITY;
      if (j * kWarpSize + lane < n_group) groups_avail |= 1u << j;
    }
    for (int g = 0; g < n_group; ++g) {
      float first = -INFINITY, second = -INFINITY;
#pragma unroll
      for (int j = 0; j < VALUES; ++j) {
        if (group_of[j] != g) continue;
        if (choice[j] > first) {
          second = first;
          first = choice[j];
        } else if (choice[j] > second) {
          second = choice[j];
        }
      }
      warp_top2(first, second);
      const float sum = group_size > 1 ? first + second : first;
#pragma unroll
      for (int j = 0; j < VALUES; ++j)
        if (g == j * kWarpSize + lane) group_score[j] = sum;
    }
    uint32_t kept = 0;
    Candidate mine = lane_best(group_score, groups_avail, lane);
    for (int r = 0; r < topk_group; ++r) {
      const Candidate best = warp_best(mine);
      if (lane == best.index % kWarpSize) {
        groups_avail &= ~(1u << (best.index / kWarpSize));
        mine = lane_best(group_score, groups_avail, lane);
      }
#pragma unroll
      for (int j = 0; j < VALUES; ++j)
        if (group_of[j] == best.index) kept |= 1u << j;
    }
    avail &= kept;  // the other groups' experts are never candidates
  }

  Candidate mine = lane_best(choice, avail, lane);
  float mine_score = pick(score, mine.index / kWarpSize);
  float sum = 0.0f;
  for (int r = 0; r < top_k; ++r) {
    const Candidate best = warp_best(mine);
    const int owner = best.index % kWarpSize;
    const float s = __shfl_sync(kFullMask, mine_score, owner);
    if (lane == owner) {
      avail &= ~(1u << (best.index / kWarpSize));
      mine = lane_best(choice, avail, lane);
      mine_score = pick(score, mine.index / kWarpSize);
    }
    sum = r == 0 ? s : sum + s;  // left to right, best first: the reference's order
    if (lane == r % kWarpSize) {
      idx[r] = best.index;
      weights[r] = s;
    }
  }
  // Each lane rescales the weights it wrote itself, so no synchronization is needed.
  const float denominator = sum + static_cast<float>(1e-20);
  for (int r = lane; r < top_k; r += kWarpSize) {
    const float w = norm ? weights[r] / denominator : weights[r];
    weights[r] = w * scale;
  }
}

template <int VALUES>
cudaError_t launch(const float* logits, const float* bias, int64_t tokens, int experts, int top_k,
                   int n_group, int topk_group, float scale, bool norm, int64_t* topk_idx,
                   float* topk_weights, cudaStream_t stream) {
  const int64_t ctas = (tokens + kWarpsPerCta - 1) / kWarpsPerCta;
  if (ctas > INT_MAX) return cudaErrorInvalidValue;
  moe_route_kernel<VALUES><<<static_cast<unsigned>(ctas), kWarpsPerCta * kWarpSize, 0, stream>>>(
      logits, bias, tokens, experts, top_k, n_group, topk_group, scale, norm, topk_idx, topk_weights);
  return cudaGetLastError();
}

}  // namespace

cudaError_t moe_route(const float* logits, const float* bias, int64_t tokens, int64_t experts, int64_t top_k,
                      int64_t n_group, int64_t topk_group, float routed_scaling_factor, bool norm_topk_prob,
                      int64_t* topk_idx, float* topk_weights, cudaStream_t stream) {
  if (tokens < 0 || experts < 1 || experts > kRouteMaxExperts || top_k < 1 || top_k > experts ||
      n_group < 1 || experts % n_group != 0 || topk_group < 1 || topk_group > n_group ||
      top_k > topk_group * (experts / n_group))
    return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  const auto run = [&](auto values) {
    return launch<decltype(values)::value>(
        logits, bias, tokens, static_cast<int>(experts), static_cast<int>(top_k), static_cast<int>(n_group),
        static_cast<int>(topk_group), routed_scaling_factor, norm_topk_prob, topk_idx, topk_weights, stream);
  };
  // The smallest power-of-two register count per lane that holds the row.
  if (experts <= 32) return run(std::integral_constant<int, 1>{});
  if (experts <= 64) return run(std::integral_constant<int, 2>{});
  if (experts <= 128) return run(std::integral_constant<int, 4>{});
  if (experts <= 256) return run(std::integral_constant<int, 8>{});
  if (experts <= 512) return run(std::integral_constant<int, 16>{});
  return run(std::integral_constant<int, 32>{});
}

}  // namespace dsv3::cuda
