// CPU kernel of the MoE router (SPEC §5, dsv3.ops.reference.moe_route): one token per work item, group
// scores from a single top-2 pass per group, then best-first lists filled in one pass over the candidates
// (a partial selection: O(E + k * insertions), no sort). Bit-identical to the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dsv3/ops.h"
#include "dsv3/validate.h"

namespace dsv3::cpu {
namespace {

// The best `cap` (value, index) pairs offered so far, best first. Candidates are offered in ascending index
// order and an entry only moves down for a strictly greater value, so the order is value descending, then
// index ascending: the reference's stable descending sort.
struct BestFirst {
  float* values;
  int64_t* indices;
  int64_t cap, size = 0;

  void offer(float v, int64_t i) {
    if (size == cap && !(v > values[size - 1])) return;
    int64_t pos = size < cap ? size++ : cap - 1;
    for (; pos > 0 && v > values[pos - 1]; --pos) {
      values[pos] = values[pos - 1];
      indices[pos] = indices[pos - 1];
    }
    values[pos] = v;
    indices[pos] = i;
  }
};

struct RouteArgs {
  const float* scores;  // [T, E] sigmoid(logits)
  const float* bias;    // [E] or nullptr
  int64_t experts, top_k, n_group, topk_group;
  float scale;
  bool norm;
  int64_t* topk_idx;    // [T, top_k]
  float* topk_weights;  // [T, top_k]
};

// Scratch of one worker: the token's choice values, the group scores and the two best-first lists.
struct Scratch {
  std::vector<float> choice, group_score, group_best, expert_best;
  std::vector<int64_t> group_idx;
  std::vector<char> kept;
  explicit Scratch(const RouteArgs& a)
      : choice(a.experts),
        group_score(a.n_group),
        group_best(a.topk_group),
        expert_best(a.top_k),
        group_idx(a.topk_group),
        kept(a.n_group) {}
};

void route_token(const RouteArgs& a, int64_t t, Scratch& s) {
  const float* score = a.scores + t * a.experts;
  int64_t* idx = a.topk_idx + t * a.top_k;
  float* weights = a.topk_weights + t * a.top_k;
  float* choice = s.choice.data();
  bool finite = true;
  for (int64_t e = 0; e < a.experts; ++e) {
    choice[e] = a.bias ? score[e] + a.bias[e] : score[e];  // eq. 16: the bias only steers selection
    finite &= std::isfinite(choice[e]);
  }
  if (!finite) {  // no order exists: fixed in-range ids, NaN weights (the reference's convention)
    for (int64_t j = 0; j < a.top_k; ++j) {
      idx[j] = j;
      weights[j] = std::numeric_limits<float>::quiet_NaN();
    }
    return;
  }

  const int64_t group_size = a.experts / a.n_group;
  std::fill(s.kept.begin(), s.kept.end(), a.n_group == 1);
  if (a.n_group > 1) {
    BestFirst groups{s.group_best.data(), s.group_idx.data(), a.topk_group};
    for (int64_t g = 0; g < a.n_group; ++g) {
      const float* v = choice + g * group_size;
      float first = v[0], second = -std::numeric_limits<float>::infinity();
      for (int64_t i = 1; i < group_size; ++i) {
        if (v[i] > first) {
          second = first;
          first = v[i];
        } else if (v[i] > second) {
          second = v[i];
        }
      }
      groups.offer(group_size > 1 ? first + second : first, g);
    }
    for (int64_t j = 0; j < a.topk_group; ++j) s.kept[s.group_idx[j]] = 1;
  }

  BestFirst experts{s.expert_best.data(), idx, a.top_k};
  for (int64_t g = 0; g < a.n_group; ++g) {
    if (!s.kept[g]) continue;  // excluded groups' experts are never candidates
    for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) experts.offer(choice[e], e);
  }

  for (int64_t j = 0; j < a.top_k; ++j) weights[j] = score[idx[j]];
  if (a.norm) {
    float sum = weights[0];  // left to right, best first: the reference's order
    for (int64_t j = 1; j < a.top_k; ++j) sum += weights[j];
    const float denominator = sum + static_cast<float>(1e-20);
    for (int64_t j = 0; j < a.top_k; ++j) weights[j] = weights[j] / denominator;
  }
  for (int64_t j = 0; j < a.top_k; ++j) weights[j] = weights[j] * a.scale;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits,
                                             const std::optional<at::Tensor>& bias_in, int64_t top_k,
                                             int64_t n_group, int64_t topk_group,
                                             double routed_scaling_factor, bool norm_topk_prob) {
  check_moe_route(logits, bias_in, top_k, n_group, topk_group, routed_scaling_factor);
  auto [topk_idx, topk_weights] = alloc_moe_route(logits, top_k);
  const int64_t tokens = logits.size(0);
  if (tokens == 0) return {topk_idx, topk_weights};
  // ATen's own sigmoid (vectorized exp), on logits' layout as torch.sigmoid would see them: the scores are
  // torch's bit for bit, which a hand-written exp could not promise.
  const at::Tensor scores = at::sigmoid(logits).contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const RouteArgs args{scores.const_data_ptr<float>(),
                       has_bias ? bias.const_data_ptr<float>() : nullptr,
                       logits.size(1),
                       top_k,
                       n_group,
                       topk_group,
                       static_cast<float>(routed_scaling_factor),
                       norm_topk_prob,
                       topk_idx.data_ptr<int64_t>(),
                       topk_weights.data_ptr<float>()};
  // About 16K expert values per task: enough to amortize the hand-off to a thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / args.experts);
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch(args);
    for (int64_t t = begin; t < end; ++t) route_token(args, t, scratch);
  });
  return {topk_idx, topk_weights};
}

}  // namespace dsv3::cpu
