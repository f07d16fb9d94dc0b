// Host logic of the low-latency EP buffer (csrc/include/dsv3/ep/ll_layout.h) as a CPU op built into every
// dsv3._C: `torch.ops.dsv3.ep_ll_layout(T, hidden, num_ranks, num_experts)` returns the region offsets of
// both halves as JSON, so the Python size hint (dsv3.ep.backends.nvshmem) is tested against the kernels'
// layout without a GPU or NVSHMEM.
#include <torch/library.h>

#include <sstream>
#include <string>

#include "dsv3/checks.h"
#include "dsv3/ep/ll_layout.h"

namespace dsv3::ep {
namespace {

std::string ll_layout_json(int64_t T, int64_t hidden, int64_t num_ranks, int64_t num_experts) {
  constexpr const char* op = "ep_ll_layout";
  DSV3_CHECK(T > 0, op, "num_max_dispatch_tokens_per_rank must be positive, got ", T);
  DSV3_CHECK(hidden > 0 && hidden % kLLGroupSize == 0, op, "hidden must be a positive multiple of ",
             kLLGroupSize, ", got ", hidden);
  DSV3_CHECK(num_ranks > 0, op, "num_ranks must be positive, got ", num_ranks);
  DSV3_CHECK(num_experts > 0 && num_experts % num_ranks == 0, op,
             "num_experts must be a positive multiple of num_ranks (", num_ranks, "), got ", num_experts);
  const LLLayout l = make_ll_layout(T, hidden, num_ranks, num_experts);
  std::ostringstream os;
  os << "{\"num_max_dispatch_tokens_per_rank\": " << T << ", \"hidden\": " << hidden
     << ", \"num_ranks\": " << num_ranks << ", \"num_experts\": " << num_experts
     << ", \"num_local_experts\": " << l.num_local_experts
     << ", \"dispatch_msg_bytes\": " << l.dispatch_msg_bytes
     << ", \"combine_msg_bytes\": " << l.combine_msg_bytes << ", \"header_bytes\": " << kLLHeaderBytes
     << ", \"fp8_scales_offset\": " << ll_fp8_scales_offset(hidden) << ", \"halves\": [";
  for (int i = 0; i < 2; ++i) {
    const LLHalf& h = l.half[i];
    os << (i ? ", " : "") << "{\"dispatch_count\": " << h.dispatch_count
       << ", \"dispatch_arrival\": " << h.dispatch_arrival << ", \"combine_arrival\": " << h.combine_arrival
       << ", \"done\": " << h.done << ", \"send\": " << h.send << ", \"send_bytes\": " << h.send_bytes
       << ", \"recv\": " << h.recv << ", \"recv_bytes\": " << h.recv_bytes << ", \"end\": " << h.end << "}";
  }
  os << "], \"total_bytes\": " << l.total_bytes << "}";
  return os.str();
}

}  // namespace
}  // namespace dsv3::ep

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def(
      "ep_ll_layout(int num_max_dispatch_tokens_per_rank, int hidden, int num_ranks, int num_experts) -> str",
      &dsv3::ep::ll_layout_json);
}
