// The reduction of an EP combine on the CPU (SPEC §5, DeepEP's combine): every token's copies, which came
// back from the ranks it was dispatched to, summed in fp32 in ascending rank order after the optional biases,
// and cast once to the rows' dtype. Across nodes (ranks_per_node < R) each node's copies are summed first and
// rounded to the rows' dtype once — what an internode combine sends between nodes — before the fp32 sum of
// the node partials. python/dsv3/ep/backends/torch.py holds the torch reference of the same sums.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "dsv3/checks.h"
#include "dsv3/ep/combine.h"

namespace dsv3 {
namespace {
constexpr const char* kOp = "ep_combine_reduce";
}  // namespace

void check_ep_combine_reduce(const at::Tensor& x, const at::Tensor& row_of,
                             const std::optional<at::Tensor>& bias_0, const std::optional<at::Tensor>& bias_1,
                             int64_t ranks_per_node) {
  DSV3_CHECK(x.dim() == 2, kOp, "x must be 2-D [rows, hidden], got shape ", x.sym_sizes());
  const auto dt = x.scalar_type();
  DSV3_CHECK_TYPE(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, kOp,
                  "x must be bfloat16, float16 or float32, got ", dt);
  DSV3_CHECK_TYPE(row_of.scalar_type() == at::kLong, kOp, "row_of must be int64, got ", row_of.scalar_type());
  DSV3_CHECK(row_of.dim() == 2, kOp, "row_of must be 2-D [tokens, ranks], got shape ", row_of.sym_sizes());
  DSV3_CHECK(x.device() == row_of.device(), kOp, "row_of is on ", row_of.device(), ", x on ", x.device());
  const auto ranks = row_of.sym_size(1);
  DSV3_CHECK(ranks_per_node >= 1 && (ranks <= ranks_per_node || ranks % ranks_per_node == 0), kOp,
             "ranks_per_node must be positive and divide the ", ranks, " ranks of row_of, got ",
             ranks_per_node);
  for (const auto* b : {&bias_0, &bias_1}) {
    if (!b->has_value()) continue;
    const auto& t = **b;
    DSV3_CHECK_TYPE(at::isFloatingType(t.scalar_type()), kOp, "bias must be floating point, got ",
                    t.scalar_type());
    DSV3_CHECK(t.dim() == 2 && t.sym_size(0) == row_of.sym_size(0) && t.sym_size(1) == x.sym_size(1), kOp,
               "bias must be [", row_of.sym_size(0), ", ", x.sym_size(1), "], got shape ", t.sym_sizes());
    DSV3_CHECK(t.device() == x.device(), kOp, "bias is on ", t.device(), ", x on ", x.device());
  }
}

at::Tensor alloc_ep_combine_reduce(const at::Tensor& x, const at::Tensor& row_of) {
  return at::empty_symint({row_of.sym_size(0), x.sym_size(1)}, x.options());
}

void check_ep_combine_rows(const at::Tensor& x, const at::Tensor& row_of) {
  if (row_of.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(row_of);
  const int64_t l = lo.item<int64_t>(), h = hi.item<int64_t>();
  DSV3_CHECK(l >= -1 && h < x.size(0), kOp, "row_of entries must be in [-1, ", x.size(0), "), got [", l, ", ",
             h, "]");
}

int64_t ep_combine_node_size(int64_t ranks, int64_t ranks_per_node) {
  return std::min(ranks_per_node, std::max<int64_t>(ranks, 1));
}

namespace {

// One token: acc = bias_0 + bias_1 (fp32), then the copies rank by rank (through a node partial rounded to T
// when the ranks span several nodes), then one cast.
template <typename T>
void reduce_token(const T* x, int64_t hidden, const int64_t* rows, int64_t ranks, int64_t node,
                  const float* b0, const float* b1, T* out, float* acc, float* part) {
  std::fill(acc, acc + hidden, 0.0f);
  for (const float* b : {b0, b1}) {
    if (b == nullptr) continue;
    for (int64_t h = 0; h < hidden; ++h) acc[h] += b[h];
  }
  const bool two_level = node < ranks;
  for (int64_t first = 0; first < ranks; first += node) {
    float* sum = two_level ? part : acc;
    if (two_level) std::fill(part, part + hidden, 0.0f);
    for (int64_t r = first; r < std::min(first + node, ranks); ++r) {
      if (rows[r] < 0) continue;
      const T* row = x + rows[r] * hidden;
      for (int64_t h = 0; h < hidden; ++h) sum[h] += static_cast<float>(row[h]);
    }
    if (two_level) {
      for (int64_t h = 0; h < hidden; ++h) acc[h] += static_cast<float>(static_cast<T>(part[h]));
    }
  }
  for (int64_t h = 0; h < hidden; ++h) out[h] = static_cast<T>(acc[h]);
}

}  // namespace

namespace cpu {

at::Tensor ep_combine_reduce(const at::Tensor& x_in, const at::Tensor& row_of_in,
                             const std::optional<at::Tensor>& bias_0, const std::optional<at::Tensor>& bias_1,
                             int64_t ranks_per_node) {
  check_ep_combine_reduce(x_in, row_of_in, bias_0, bias_1, ranks_per_node);
  const auto x = x_in.contiguous();
  const auto row_of = row_of_in.contiguous();
  const int64_t tokens = row_of.size(0), ranks = row_of.size(1), hidden = x.size(1);
  check_ep_combine_rows(x, row_of);
  auto out = alloc_ep_combine_reduce(x, row_of);
  std::optional<at::Tensor> b[2];
  for (int i = 0; i < 2; ++i) {
    const auto& src = i ? bias_1 : bias_0;
    if (src.has_value()) b[i] = src->to(at::kFloat).contiguous();
  }
  const int64_t node = ep_combine_node_size(ranks, ranks_per_node);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), kOp, [&] {
    const auto* xp = x.const_data_ptr<scalar_t>();
    const auto* rp = row_of.const_data_ptr<int64_t>();
    auto* op = out.mutable_data_ptr<scalar_t>();
    const float* b0 = b[0] ? b[0]->const_data_ptr<float>() : nullptr;
    const float* b1 = b[1] ? b[1]->const_data_ptr<float>() : nullptr;
    // Tokens are independent: any split over threads gives the same bits.
    at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / std::max<int64_t>(hidden, 1)),
                     [&](int64_t t0, int64_t t1) {
                       std::vector<float> scratch(2 * hidden);
                       for (int64_t t = t0; t < t1; ++t) {
                         reduce_token(xp, hidden, rp + t * ranks, ranks, node, b0 ? b0 + t * hidden : nullptr,
                                      b1 ? b1 + t * hidden : nullptr, op + t * hidden, scratch.data(),
                                      scratch.data() + hidden);
                       }
                     });
  });
  return out;
}

}  // namespace cpu

namespace meta {
at::Tensor ep_combine_reduce(const at::Tensor& x, const at::Tensor& row_of,
                             const std::optional<at::Tensor>& bias_0, const std::optional<at::Tensor>& bias_1,
                             int64_t ranks_per_node) {
  check_ep_combine_reduce(x, row_of, bias_0, bias_1, ranks_per_node);
  return alloc_ep_combine_reduce(x, row_of);
}
}  // namespace meta

}  // namespace dsv3

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def(
      "ep_combine_reduce(Tensor x, Tensor row_of, Tensor? bias_0=None, Tensor? bias_1=None, "
      "int ranks_per_node=8) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) { m.impl("ep_combine_reduce", &dsv3::cpu::ep_combine_reduce); }

TORCH_LIBRARY_IMPL(dsv3, Meta, m) { m.impl("ep_combine_reduce", &dsv3::meta::ep_combine_reduce); }
