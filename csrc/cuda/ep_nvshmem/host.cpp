// dsv3._C_nvshmem: torch.ops.dsv3_nvshmem.* — the NVSHMEM runtime (unique id, init, symmetric buffer,
// barrier, finalize), the low-latency EP launches of ll_kernels.cu and the internode (normal-mode) launches
// of internode.cu. Python (dsv3.ep.backends.nvshmem) exchanges the unique id, allocates the outputs and
// validates the user-facing arguments; these entries re-check what the kernels rely on (dtypes, devices,
// contiguity, buffer size) so a bad call cannot fault.
#include <ATen/ATen.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "dsv3/checks.h"
#include "dsv3/ep/internode_layout.h"
#include "dsv3/ep/ll_layout.h"
#include "internode.h"
#include "ll_kernels.h"

namespace dsv3::ep::nvshmem {
namespace {

// One NVSHMEM runtime per process (NVSHMEM's own rule); the error flag is host-mapped so the host can read
// which wait timed out after the trap has poisoned the CUDA context.
struct Runtime {
  std::mutex mutex;
  bool initialized = false;
  int rank = -1, num_ranks = 0;
  int* error_flag_host = nullptr;
  int* error_flag_device = nullptr;
  int* counters_host = nullptr;  // the internode notify's counts (internode_layout.h: kInternodeHost*)
  int* counters_device = nullptr;
};
Runtime& runtime() {
  static Runtime r;
  return r;
}

const Runtime& initialized_runtime(const char* op) {
  const Runtime& r = runtime();
  DSV3_CHECK(r.initialized, op, "NVSHMEM is not initialized (call init first)");
  return r;
}

at::Tensor unique_id() {
  at::Tensor out = at::empty({kUniqueIdBytes}, at::TensorOptions().dtype(at::kByte));
  const int status = get_unique_id(out.data_ptr<uint8_t>());
  TORCH_CHECK(status == 0, "dsv3_nvshmem.unique_id: nvshmemx_get_uniqueid failed (", status, ")");
  return out;
}

void init_runtime(const at::Tensor& id, int64_t rank, int64_t num_ranks) {
  constexpr const char* op = "dsv3_nvshmem.init";
  DSV3_CHECK_TYPE(id.device().is_cpu() && id.scalar_type() == at::kByte, op,
                  "unique_id must be a CPU uint8 tensor");
  DSV3_CHECK(id.numel() == kUniqueIdBytes && id.is_contiguous(), op, "unique_id must hold ", kUniqueIdBytes,
             " contiguous bytes, got ", id.numel());
  DSV3_CHECK(num_ranks > 0 && rank >= 0 && rank < num_ranks, op, "rank must be in [0, num_ranks), got rank ",
             rank, " of ", num_ranks);
  Runtime& r = runtime();
  const std::lock_guard<std::mutex> lock(r.mutex);
  DSV3_CHECK(!r.initialized, op, "NVSHMEM is already initialized in this process (finalize first)");
  const int status = init(id.data_ptr<uint8_t>(), int(rank), int(num_ranks));
  TORCH_CHECK(status == 0, op, ": nvshmemx_init_attr failed (", status, ")");
  if (r.error_flag_host == nullptr) {
    TORCH_CHECK(cudaHostAlloc(&r.error_flag_host, sizeof(int), cudaHostAllocMapped) == cudaSuccess, op,
                ": cudaHostAlloc of the error flag failed");
    TORCH_CHECK(cudaHostGetDevicePointer(&r.error_flag_device, r.error_flag_host, 0) == cudaSuccess, op,
                ": cudaHostGetDevicePointer failed");
  }
  if (r.counters_host == nullptr) {
    TORCH_CHECK(
        cudaHostAlloc(&r.counters_host, kInternodeHostInts * sizeof(int), cudaHostAllocMapped) == cudaSuccess,
        op, ": cudaHostAlloc of the internode counters failed");
    TORCH_CHECK(cudaHostGetDevicePointer(&r.counters_device, r.counters_host, 0) == cudaSuccess, op,
                ": cudaHostGetDevicePointer failed");
  }
  *r.error_flag_host = 0;
  std::memset(r.counters_host, 0, kInternodeHostInts * sizeof(int));
  r.rank = int(rank);
  r.num_ranks = int(num_ranks);
  r.initialized = true;
}

// A zeroed symmetric allocation as a uint8 tensor view (freed by free_buffer, never by the tensor).
at::Tensor alloc_buffer(int64_t num_bytes) {
  constexpr const char* op = "dsv3_nvshmem.alloc";
  initialized_runtime(op);
  DSV3_CHECK(num_bytes > 0, op, "num_bytes must be positive, got ", num_bytes);
  void* ptr = symmetric_alloc(num_bytes);
  TORCH_CHECK(ptr != nullptr, op, ": nvshmem_align of ", num_bytes, " bytes failed");
  TORCH_CHECK(cudaMemset(ptr, 0, size_t(num_bytes)) == cudaSuccess && cudaDeviceSynchronize() == cudaSuccess,
              op, ": clearing the symmetric buffer failed");
  int device = 0;
  TORCH_CHECK(cudaGetDevice(&device) == cudaSuccess, op, ": cudaGetDevice failed");
  return at::from_blob(ptr, {num_bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
}

void free_buffer(const at::Tensor& buffer) {
  initialized_runtime("dsv3_nvshmem.free");
  symmetric_free(buffer.data_ptr());
}

void barrier() {
  initialized_runtime("dsv3_nvshmem.barrier");
  barrier_on_stream(c10::cuda::getCurrentCUDAStream());
}

void finalize_runtime() {
  Runtime& r = runtime();
  const std::lock_guard<std::mutex> lock(r.mutex);
  if (!r.initialized) return;
  finalize();
  r.initialized = false;
}

// (what << 24) | peer of the last timed-out wait, 0 if none (see ll_kernels.cu).
int64_t error_code() {
  const Runtime& r = runtime();
  return r.error_flag_host ? int64_t(*reinterpret_cast<volatile int*>(r.error_flag_host)) : 0;
}

void check_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                  const at::Tensor& buffer) {
  DSV3_CHECK_TYPE(t.scalar_type() == dtype, op, name, " must be ", dtype, ", got ", t.scalar_type());
  DSV3_CHECK(t.device() == buffer.device(), op, name, " must be on ", buffer.device(), ", got ", t.device());
  DSV3_CHECK(t.is_contiguous(), op, name, " must be contiguous");
}

// The kernels move rows with 16-byte accesses.
void check_aligned(const char* op, const char* name, const at::Tensor& t) {
  DSV3_CHECK(reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0, op, name,
             " must start on a 16-byte boundary");
}

void check_numel(const char* op, const char* name, const at::Tensor& t, int64_t numel) {
  DSV3_CHECK(t.numel() == numel, op, name, " must have ", numel, " elements, got ", t.numel());
}

// The kernels' view of one half of the buffer for a call with this geometry.
LLArgs make_args(const char* op, const at::Tensor& buffer, int64_t half, int64_t T, int64_t hidden,
                 int64_t num_experts, int64_t timeout_cycles) {
  const Runtime& r = initialized_runtime(op);
  DSV3_CHECK(buffer.is_cuda() && buffer.scalar_type() == at::kByte && buffer.dim() == 1, op,
             "buffer must be the uint8 CUDA tensor returned by alloc");
  DSV3_CHECK(half == 0 || half == 1, op, "half must be 0 or 1, got ", half);
  DSV3_CHECK(T > 0 && T < (1 << 30), op, "num_max_dispatch_tokens_per_rank must be in [1, 2^30), got ", T);
  DSV3_CHECK(hidden > 0 && hidden % kLLGroupSize == 0, op, "hidden must be a positive multiple of ",
             kLLGroupSize, ", got ", hidden);
  DSV3_CHECK(num_experts > 0 && num_experts % r.num_ranks == 0, op,
             "num_experts must be a positive multiple of ", r.num_ranks, " ranks, got ", num_experts);
  DSV3_CHECK(timeout_cycles > 0, op, "timeout_cycles must be positive, got ", timeout_cycles);
  const LLLayout l = make_ll_layout(T, hidden, r.num_ranks, num_experts);
  DSV3_CHECK(buffer.numel() >= l.total_bytes, op, "buffer holds ", buffer.numel(), " bytes; this call needs ",
             l.total_bytes, " (low_latency_size_hint)");
  uint8_t* base = buffer.data_ptr<uint8_t>();
  const LLHalf& h = l.half[half];
  LLArgs a{};
  a.send = base + h.send;
  a.recv = base + h.recv;
  a.dispatch_count = reinterpret_cast<int*>(base + h.dispatch_count);
  a.dispatch_arrival = reinterpret_cast<uint64_t*>(base + h.dispatch_arrival);
  a.combine_arrival = reinterpret_cast<uint64_t*>(base + h.combine_arrival);
  a.done = reinterpret_cast<int*>(base + h.done);
  a.error_flag = r.error_flag_device;
  a.rank = r.rank;
  a.num_ranks = r.num_ranks;
  a.num_experts = int(num_experts);
  a.num_local_experts = int(l.num_local_experts);
  a.num_max_tokens = int(T);
  a.hidden = int(hidden);
  a.dispatch_msg_bytes = l.dispatch_msg_bytes;
  a.combine_msg_bytes = l.combine_msg_bytes;
  a.timeout_cycles = timeout_cycles;
  return a;
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_topk(const char* op, const at::Tensor& topk_idx, const at::Tensor& buffer, int64_t num_tokens,
                int64_t T) {
  check_tensor(op, "topk_idx", topk_idx, at::kLong, buffer);
  DSV3_CHECK(topk_idx.dim() == 2 && topk_idx.size(0) == num_tokens, op, "topk_idx must be [", num_tokens,
             ", k], got ", topk_idx.sizes());
  DSV3_CHECK(topk_idx.size(1) >= 1 && topk_idx.size(1) <= kLLMaxTopk, op, "topk_idx must have 1..",
             kLLMaxTopk, " columns, got ", topk_idx.size(1));
  DSV3_CHECK(num_tokens <= T, op, "at most num_max_dispatch_tokens_per_rank = ", T, " tokens, got ",
             num_tokens);
}

void dispatch_send(const at::Tensor& buffer, int64_t half, const at::Tensor& x, const at::Tensor& topk_idx,
                   int64_t T, int64_t num_experts, bool use_fp8, bool round_scale, bool use_ue8m0,
                   int64_t timeout_cycles) {
  constexpr const char* op = "dsv3_nvshmem.ll_dispatch_send";
  const c10::cuda::CUDAGuard guard(buffer.device());
  check_tensor(op, "x", x, at::kBFloat16, buffer);
  DSV3_CHECK(x.dim() == 2, op, "x must be [num_tokens, hidden], got ", x.sizes());
  check_aligned(op, "x", x);
  const LLArgs a = make_args(op, buffer, half, T, x.size(1), num_experts, timeout_cycles);
  check_topk(op, topk_idx, buffer, x.size(0), T);
  check_launch(op, ll_dispatch_send(a, x.const_data_ptr(), topk_idx.const_data_ptr<int64_t>(), int(x.size(0)),
                                    int(topk_idx.size(1)), use_fp8, round_scale || use_ue8m0,
                                    c10::cuda::getCurrentCUDAStream()));
}

void dispatch_recv(const at::Tensor& buffer, int64_t half, int64_t T, int64_t num_experts, int64_t hidden,
                   bool use_fp8, bool use_ue8m0, int64_t timeout_cycles, const at::Tensor& recv_x,
                   const std::optional<at::Tensor>& recv_scales, const at::Tensor& recv_count,
                   const at::Tensor& src_info, const at::Tensor& layout_range) {
  constexpr const char* op = "dsv3_nvshmem.ll_dispatch_recv";
  const c10::cuda::CUDAGuard guard(buffer.device());
  const LLArgs a = make_args(op, buffer, half, T, hidden, num_experts, timeout_cycles);
  const int64_t L = a.num_local_experts, rows = int64_t(a.num_ranks) * T;
  check_tensor(op, "recv_x", recv_x, use_fp8 ? at::kFloat8_e4m3fn : at::kBFloat16, buffer);
  check_numel(op, "recv_x", recv_x, L * rows * hidden);
  check_aligned(op, "recv_x", recv_x);
  check_tensor(op, "recv_count", recv_count, at::kInt, buffer);
  check_numel(op, "recv_count", recv_count, L);
  check_tensor(op, "src_info", src_info, at::kInt, buffer);
  check_numel(op, "src_info", src_info, L * rows);
  check_tensor(op, "layout_range", layout_range, at::kLong, buffer);
  check_numel(op, "layout_range", layout_range, L * a.num_ranks);
  void* scales = nullptr;
  if (use_fp8) {
    DSV3_CHECK(recv_scales.has_value() && recv_scales->defined(), op, "recv_scales is required with use_fp8");
    DSV3_CHECK(!use_ue8m0 || hidden % kLLHiddenAlign == 0, op, "hidden must be a multiple of ",
               kLLHiddenAlign, " with use_ue8m0, got ", hidden);
    const at::Tensor& s = *recv_scales;
    // The scales storage is column-major: a contiguous [L, G, R*T] tensor viewed as [L, R*T, G] by Python.
    check_tensor(op, "recv_scales", s, use_ue8m0 ? at::kInt : at::kFloat, buffer);
    check_numel(op, "recv_scales", s, L * rows * hidden / (use_ue8m0 ? kLLHiddenAlign : kLLGroupSize));
    scales = s.data_ptr();
  }
  check_launch(op, ll_dispatch_recv(a, use_fp8, use_ue8m0, recv_x.data_ptr(), scales,
                                    recv_count.data_ptr<int>(), src_info.data_ptr<int>(),
                                    layout_range.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
}

void combine_send(const at::Tensor& buffer, int64_t half, const at::Tensor& x, const at::Tensor& src_info,
                  const at::Tensor& layout_range, int64_t T, int64_t num_experts, bool zero_copy,
                  int64_t timeout_cycles) {
  constexpr const char* op = "dsv3_nvshmem.ll_combine_send";
  const c10::cuda::CUDAGuard guard(buffer.device());
  check_tensor(op, "x", x, at::kBFloat16, buffer);
  DSV3_CHECK(x.dim() == 3, op, "x must be [num_local_experts, num_ranks * T, hidden], got ", x.sizes());
  check_aligned(op, "x", x);
  const LLArgs a = make_args(op, buffer, half, T, x.size(2), num_experts, timeout_cycles);
  const int64_t L = a.num_local_experts, rows = int64_t(a.num_ranks) * T;
  DSV3_CHECK(x.size(0) == L && x.size(1) == rows, op, "x must be [", L, ", ", rows, ", ", x.size(2),
             "], got ", x.sizes());
  DSV3_CHECK(!zero_copy || x.const_data_ptr() == static_cast<const void*>(a.send), op,
             "zero_copy needs x to be the buffer of get_next_low_latency_combine_buffer");
  check_tensor(op, "src_info", src_info, at::kInt, buffer);
  check_numel(op, "src_info", src_info, L * rows);
  check_tensor(op, "layout_range", layout_range, at::kLong, buffer);
  check_numel(op, "layout_range", layout_range, L * a.num_ranks);
  check_launch(op, ll_combine_send(a, x.const_data_ptr(), src_info.const_data_ptr<int>(),
                                   layout_range.const_data_ptr<int64_t>(), zero_copy,
                                   c10::cuda::getCurrentCUDAStream()));
}

void combine_recv(const at::Tensor& buffer, int64_t half, const at::Tensor& topk_idx,
                  const at::Tensor& topk_weights, int64_t T, int64_t num_experts, int64_t timeout_cycles,
                  const at::Tensor& out) {
  constexpr const char* op = "dsv3_nvshmem.ll_combine_recv";
  const c10::cuda::CUDAGuard guard(buffer.device());
  check_tensor(op, "out", out, at::kBFloat16, buffer);
  DSV3_CHECK(out.dim() == 2, op, "out must be [num_tokens, hidden], got ", out.sizes());
  check_aligned(op, "out", out);
  const LLArgs a = make_args(op, buffer, half, T, out.size(1), num_experts, timeout_cycles);
  check_topk(op, topk_idx, buffer, out.size(0), T);
  check_tensor(op, "topk_weights", topk_weights, at::kFloat, buffer);
  DSV3_CHECK(topk_weights.sizes() == topk_idx.sizes(), op, "topk_weights must be ", topk_idx.sizes(),
             ", got ", topk_weights.sizes());
  check_launch(op, ll_combine_recv(a, topk_idx.const_data_ptr<int64_t>(),
                                   topk_weights.const_data_ptr<float>(), int(out.size(0)),
                                   int(topk_idx.size(1)), out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
}

// ---- internode (normal mode) ----------------------------------------------------------------------------

void check_optional(const char* op, const char* name, const std::optional<at::Tensor>& t,
                    at::ScalarType dtype, const at::Tensor& buffer, int64_t numel) {
  if (!t.has_value() || !t->defined()) return;
  check_tensor(op, name, *t, dtype, buffer);
  check_numel(op, name, *t, numel);
}

template <typename T>
T* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

// The context and layout of one internode call; slot_bytes is the call's record size (16 for calls that
// use only the control and notify regions, whose offsets do not depend on it).
std::pair<InternodeContext, InternodeLayout> make_internode(const char* op, const at::Tensor& buffer,
                                                            int64_t num_channels, int64_t rdma_slots,
                                                            int64_t nvl_slots, int64_t slot_bytes,
                                                            int64_t timeout_cycles) {
  const Runtime& r = initialized_runtime(op);
  DSV3_CHECK(buffer.is_cuda() && buffer.scalar_type() == at::kByte && buffer.dim() == 1, op,
             "buffer must be the uint8 CUDA tensor returned by alloc");
  DSV3_CHECK(r.num_ranks > kInternodeNodeRanks && r.num_ranks % kInternodeNodeRanks == 0 &&
                 r.num_ranks / kInternodeNodeRanks <= kInternodeMaxNodes,
             op, "internode kernels need 8 * nodes ranks with 2..", kInternodeMaxNodes, " nodes, got ",
             r.num_ranks, " ranks");
  int sms = 0;
  TORCH_CHECK(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, buffer.get_device()) == cudaSuccess, op,
      ": cudaDeviceGetAttribute failed");
  // Every block spins on the others: all 2C of them must be resident at once.
  DSV3_CHECK(num_channels >= 1 && 2 * num_channels <= sms, op, "num_channels must be in [1, ", sms / 2,
             "] (config.num_sms <= ", sms, " SMs), got ", num_channels);
  DSV3_CHECK(rdma_slots >= 1 && rdma_slots < (1 << 24) && nvl_slots >= 1 && nvl_slots < (1 << 24), op,
             "queue slot counts must be in [1, 2^24), got rdma ", rdma_slots, ", nvl ", nvl_slots);
  DSV3_CHECK(timeout_cycles > 0, op, "timeout_cycles must be positive, got ", timeout_cycles);
  const InternodeLayout l =
      make_internode_layout(r.num_ranks, int(num_channels), int(rdma_slots), int(nvl_slots), slot_bytes);
  DSV3_CHECK(buffer.numel() >= l.total_bytes, op, "buffer holds ", buffer.numel(), " bytes; this call needs ",
             l.total_bytes, " (Config.get_rdma_buffer_size_hint)");
  TORCH_CHECK(
      internode_node_mapped(buffer.data_ptr(), r.rank), op,
      ": the buffers of this node's 8 ranks are not mapped into each other (NVSHMEM P2P over NVLink is "
      "required: keep allow_nvlink_for_low_latency_mode=True and NVSHMEM_DISABLE_P2P unset)");
  InternodeContext ctx{};
  ctx.buffer = buffer.data_ptr<uint8_t>();
  ctx.error_flag = r.error_flag_device;
  ctx.host_counters = r.counters_device;
  ctx.rank = r.rank;
  ctx.num_ranks = r.num_ranks;
  ctx.timeout_cycles = timeout_cycles;
  return {ctx, l};
}

void check_matrix(const char* op, const char* name, const at::Tensor& t, const at::Tensor& buffer,
                  int64_t rows, int64_t cols) {
  check_tensor(op, name, t, at::kInt, buffer);
  DSV3_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, name, " must be [", rows, ", ", cols,
             "], got ", t.sizes());
}

void check_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& buffer,
                  int64_t n) {
  check_tensor(op, name, t, at::kInt, buffer);
  DSV3_CHECK(t.dim() == 1 && t.size(0) == n, op, name, " must be [", n, "], got ", t.sizes());
}

void internode_notify_op(const at::Tensor& buffer, const at::Tensor& num_tokens_per_expert,
                         const at::Tensor& is_token_in_rank, int64_t num_channels, int64_t rdma_slots,
                         int64_t nvl_slots, int64_t expert_alignment, int64_t sequence,
                         int64_t barrier_rounds, int64_t timeout_cycles,
                         const at::Tensor& rdma_channel_prefix_matrix,
                         const at::Tensor& gbl_channel_prefix_matrix,
                         const at::Tensor& recv_rdma_rank_prefix_sum,
                         const at::Tensor& recv_gbl_rank_prefix_sum) {
  constexpr const char* op = "dsv3_nvshmem.internode_notify";
  const c10::cuda::CUDAGuard guard(buffer.device());
  const auto [ctx, l] = make_internode(op, buffer, num_channels, rdma_slots, nvl_slots, 16, timeout_cycles);
  const int64_t R = ctx.num_ranks, N = l.num_nodes, C = num_channels;
  check_tensor(op, "is_token_in_rank", is_token_in_rank, at::kBool, buffer);
  DSV3_CHECK(
      is_token_in_rank.dim() == 2 && is_token_in_rank.size(1) == R && is_token_in_rank.size(0) < (1 << 30),
      op, "is_token_in_rank must be [n, ", R, "], got ", is_token_in_rank.sizes());
  check_tensor(op, "num_tokens_per_expert", num_tokens_per_expert, at::kInt, buffer);
  const int64_t E = num_tokens_per_expert.numel();
  DSV3_CHECK(num_tokens_per_expert.dim() == 1 && E > 0 && E % R == 0 && E / R <= kInternodeMaxLocalExperts,
             op, "num_tokens_per_expert must be [E] with E a multiple of ", R, " and at most ",
             kInternodeMaxLocalExperts, " experts per rank, got ", num_tokens_per_expert.sizes());
  DSV3_CHECK(expert_alignment >= 1 && expert_alignment < (1 << 20), op,
             "expert_alignment must be in [1, 2^20), got ", expert_alignment);
  DSV3_CHECK(sequence > 0 && sequence < (int64_t(1) << 31), op, "sequence must be in [1, 2^31), got ",
             sequence);
  DSV3_CHECK(barrier_rounds >= 0, op, "barrier_rounds must be non-negative, got ", barrier_rounds);
  check_matrix(op, "rdma_channel_prefix_matrix", rdma_channel_prefix_matrix, buffer, N, C);
  check_matrix(op, "gbl_channel_prefix_matrix", gbl_channel_prefix_matrix, buffer, R, C);
  check_vector(op, "recv_rdma_rank_prefix_sum", recv_rdma_rank_prefix_sum, buffer, N);
  check_vector(op, "recv_gbl_rank_prefix_sum", recv_gbl_rank_prefix_sum, buffer, R);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(
      op, internode_channel_prefix(is_token_in_rank.const_data_ptr<bool>(), int(is_token_in_rank.size(0)),
                                   int(R), int(C), rdma_channel_prefix_matrix.data_ptr<int>(),
                                   gbl_channel_prefix_matrix.data_ptr<int>(), stream));
  check_launch(op, internode_sync(ctx, l, barrier_rounds, stream));
  check_launch(op, internode_notify(ctx, l, num_tokens_per_expert.const_data_ptr<int>(), int(E / R),
                                    rdma_channel_prefix_matrix.const_data_ptr<int>(),
                                    gbl_channel_prefix_matrix.const_data_ptr<int>(), int(expert_alignment),
                                    int(sequence), recv_rdma_rank_prefix_sum.data_ptr<int>(),
                                    recv_gbl_rank_prefix_sum.data_ptr<int>(), stream));
}

// What a cached dispatch or a combine runs first: the sync of every rank (barrier, clean control words).
void internode_cached_notify_op(const at::Tensor& buffer, int64_t num_channels, int64_t rdma_slots,
                                int64_t nvl_slots, int64_t barrier_rounds, int64_t timeout_cycles) {
  constexpr const char* op = "dsv3_nvshmem.internode_cached_notify";
  const c10::cuda::CUDAGuard guard(buffer.device());
  const auto [ctx, l] = make_internode(op, buffer, num_channels, rdma_slots, nvl_slots, 16, timeout_cycles);
  DSV3_CHECK(barrier_rounds >= 0, op, "barrier_rounds must be non-negative, got ", barrier_rounds);
  check_launch(op, internode_sync(ctx, l, barrier_rounds, c10::cuda::getCurrentCUDAStream()));
}

// The notify's counts, read from host-mapped memory once it published `sequence`: [received rows, rows
// received by RDMA, per-local-expert counts]. Polls with a deadline; a kernel error word or a timeout raises.
std::vector<int64_t> internode_wait_op(int64_t sequence, int64_t num_local_experts, double timeout_s) {
  constexpr const char* op = "dsv3_nvshmem.internode_wait";
  const Runtime& r = initialized_runtime(op);
  DSV3_CHECK(num_local_experts >= 1 && num_local_experts <= kInternodeMaxLocalExperts, op,
             "num_local_experts must be in [1, ", kInternodeMaxLocalExperts, "], got ", num_local_experts);
  DSV3_CHECK(timeout_s > 0, op, "timeout_s must be positive, got ", timeout_s);
  const volatile int* counters = r.counters_host;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (counters[kInternodeHostSeq] != int(sequence)) {
    TORCH_CHECK(*reinterpret_cast<volatile int*>(r.error_flag_host) == 0, op,
                ": an internode kernel failed (error code ",
                *reinterpret_cast<volatile int*>(r.error_flag_host), ")");
    TORCH_CHECK(std::chrono::steady_clock::now() < deadline, op, ": timed out after ", timeout_s,
                " s waiting for the dispatch counts (a peer did not arrive)");
    std::this_thread::yield();
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  std::vector<int64_t> out = {counters[kInternodeHostRecv], counters[kInternodeHostRdmaRecv]};
  for (int64_t e = 0; e < num_local_experts; ++e) out.push_back(counters[kInternodeHostExperts + e]);
  return out;
}

void internode_dispatch_op(
    const at::Tensor& buffer, const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
    const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_weights,
    const at::Tensor& is_token_in_rank, const at::Tensor& rdma_channel_prefix_matrix,
    const at::Tensor& gbl_channel_prefix_matrix, const at::Tensor& recv_rdma_rank_prefix_sum,
    const at::Tensor& recv_gbl_rank_prefix_sum, int64_t num_experts, int64_t num_channels, int64_t rdma_slots,
    int64_t nvl_slots, int64_t rdma_chunk, int64_t nvl_chunk, int64_t timeout_cycles,
    const at::Tensor& recv_x, const std::optional<at::Tensor>& recv_x_scales,
    const std::optional<at::Tensor>& recv_topk_idx, const std::optional<at::Tensor>& recv_topk_weights,
    const std::optional<at::Tensor>& recv_src_meta,
    const std::optional<at::Tensor>& recv_rdma_channel_prefix_matrix,
    const std::optional<at::Tensor>& recv_gbl_channel_prefix_matrix,
    const std::optional<at::Tensor>& send_rdma_head, const std::optional<at::Tensor>& send_nvl_head) {
  constexpr const char* op = "dsv3_nvshmem.internode_dispatch";
  const c10::cuda::CUDAGuard guard(buffer.device());
  DSV3_CHECK(x.dim() == 2 && x.is_contiguous() && x.device() == buffer.device(), op,
             "x must be a contiguous [n, hidden] tensor on ", buffer.device(), ", got ", x.sizes());
  check_aligned(op, "x", x);
  const int64_t n = x.size(0), row_bytes = x.size(1) * x.element_size();
  DSV3_CHECK(row_bytes > 0 && row_bytes % 16 == 0 && n < (1 << 30), op,
             "x's rows must be a positive multiple of 16 bytes, got ", row_bytes);
  const bool with_topk = topk_idx.has_value() && topk_idx->defined();
  const int64_t k = with_topk ? topk_idx->size(1) : 0;
  const int64_t s = x_scales.has_value() && x_scales->defined() ? x_scales->size(1) : 0;
  const auto [ctx, l] = make_internode(op, buffer, num_channels, rdma_slots, nvl_slots,
                                       internode_dispatch_record_bytes(row_bytes, k, s), timeout_cycles);
  const int64_t R = ctx.num_ranks, N = l.num_nodes, C = num_channels;
  DSV3_CHECK(num_experts > 0 && num_experts % R == 0, op, "num_experts must be a positive multiple of ", R,
             ", got ", num_experts);
  DSV3_CHECK(rdma_chunk >= 1 && nvl_chunk >= 1, op, "chunk sizes must be positive");
  check_tensor(op, "is_token_in_rank", is_token_in_rank, at::kBool, buffer);
  DSV3_CHECK(is_token_in_rank.dim() == 2 && is_token_in_rank.size(0) == n && is_token_in_rank.size(1) == R,
             op, "is_token_in_rank must be [", n, ", ", R, "], got ", is_token_in_rank.sizes());
  if (s > 0) {
    DSV3_CHECK(x_scales->scalar_type() == at::kFloat || x_scales->scalar_type() == at::kInt, op,
               "x_scales must be float32 or int32");
    DSV3_CHECK(x_scales->device() == buffer.device() && x_scales->is_contiguous() && x_scales->dim() == 2 &&
                   x_scales->size(0) == n,
               op, "x_scales must be a contiguous [", n, ", s] tensor on ", buffer.device());
  }
  if (with_topk) {
    check_tensor(op, "topk_idx", *topk_idx, at::kLong, buffer);
    DSV3_CHECK(topk_idx->dim() == 2 && topk_idx->size(0) == n && k >= 1, op, "topk_idx must be [", n,
               ", k], got ", topk_idx->sizes());
    DSV3_CHECK(topk_weights.has_value() && topk_weights->defined(), op,
               "topk_weights is required with topk_idx");
    check_tensor(op, "topk_weights", *topk_weights, at::kFloat, buffer);
    DSV3_CHECK(topk_weights->sizes() == topk_idx->sizes(), op, "topk_weights must be ", topk_idx->sizes());
  }
  check_matrix(op, "rdma_channel_prefix_matrix", rdma_channel_prefix_matrix, buffer, N, C);
  check_matrix(op, "gbl_channel_prefix_matrix", gbl_channel_prefix_matrix, buffer, R, C);
  check_vector(op, "recv_rdma_rank_prefix_sum", recv_rdma_rank_prefix_sum, buffer, N);
  check_vector(op, "recv_gbl_rank_prefix_sum", recv_gbl_rank_prefix_sum, buffer, R);
  DSV3_CHECK(recv_x.device() == buffer.device() && recv_x.is_contiguous() &&
                 recv_x.scalar_type() == x.scalar_type() && recv_x.dim() == 2 && recv_x.size(1) == x.size(1),
             op, "recv_x must be a contiguous [rows, ", x.size(1), "] ", x.scalar_type(), " tensor");
  check_aligned(op, "recv_x", recv_x);
  const int64_t capacity = recv_x.size(0);
  DSV3_CHECK(s == 0 || (recv_x_scales.has_value() && recv_x_scales->defined()), op,
             "recv_x_scales is required with x_scales");
  if (s > 0) {
    DSV3_CHECK(recv_x_scales->scalar_type() == x_scales->scalar_type(), op, "recv_x_scales must be ",
               x_scales->scalar_type());
    check_tensor(op, "recv_x_scales", *recv_x_scales, x_scales->scalar_type(), buffer);
    check_numel(op, "recv_x_scales", *recv_x_scales, capacity * s);
  }
  DSV3_CHECK(!with_topk || (recv_topk_idx.has_value() && recv_topk_weights.has_value()), op,
             "recv_topk_idx and recv_topk_weights are required with topk_idx");
  if (with_topk) {
    check_optional(op, "recv_topk_idx", recv_topk_idx, at::kLong, buffer, capacity * k);
    check_optional(op, "recv_topk_weights", recv_topk_weights, at::kFloat, buffer, capacity * k);
  }
  check_optional(op, "recv_src_meta", recv_src_meta, at::kInt, buffer, capacity * 2);
  check_optional(op, "recv_rdma_channel_prefix_matrix", recv_rdma_channel_prefix_matrix, at::kInt, buffer,
                 N * C);
  check_optional(op, "recv_gbl_channel_prefix_matrix", recv_gbl_channel_prefix_matrix, at::kInt, buffer,
                 R * C);
  check_optional(op, "send_rdma_head", send_rdma_head, at::kInt, buffer, n * N);
  int64_t rdma_capacity = 0;
  if (send_nvl_head.has_value() && send_nvl_head->defined()) {
    check_tensor(op, "send_nvl_head", *send_nvl_head, at::kInt, buffer);
    DSV3_CHECK(send_nvl_head->dim() == 2 && send_nvl_head->size(1) == kInternodeNodeRanks, op,
               "send_nvl_head must be [rows, 8], got ", send_nvl_head->sizes());
    rdma_capacity = send_nvl_head->size(0);
  } else {
    rdma_capacity = int64_t(1) << 30;  // a cached dispatch records nothing per RDMA row
  }

  InternodeDispatchArgs a{};
  a.x = x.const_data_ptr();
  a.row_bytes = row_bytes;
  a.x_scales = s > 0 ? static_cast<const int*>(x_scales->const_data_ptr()) : nullptr;
  a.num_scales = int(s);
  a.topk_idx = with_topk ? topk_idx->const_data_ptr<int64_t>() : nullptr;
  a.topk_weights = with_topk ? topk_weights->const_data_ptr<float>() : nullptr;
  a.num_topk = int(k);
  a.is_token_in_rank = is_token_in_rank.const_data_ptr<bool>();
  a.rdma_channel_prefix_matrix = rdma_channel_prefix_matrix.const_data_ptr<int>();
  a.gbl_channel_prefix_matrix = gbl_channel_prefix_matrix.const_data_ptr<int>();
  a.recv_rdma_rank_prefix_sum = recv_rdma_rank_prefix_sum.const_data_ptr<int>();
  a.recv_gbl_rank_prefix_sum = recv_gbl_rank_prefix_sum.const_data_ptr<int>();
  a.num_tokens = int(n);
  a.num_local_experts = int(num_experts / R);
  a.num_recv_capacity = int(std::min<int64_t>(capacity, int64_t(1) << 30));
  a.num_rdma_recv_capacity = int(rdma_capacity);
  a.rdma_chunk = int(std::min<int64_t>(rdma_chunk, rdma_slots));
  a.nvl_chunk = int(std::min<int64_t>(nvl_chunk, nvl_slots));
  a.recv_x = recv_x.data_ptr();
  a.recv_x_scales = s > 0 ? static_cast<int*>(recv_x_scales->data_ptr()) : nullptr;
  a.recv_topk_idx = with_topk ? optional_ptr<int64_t>(recv_topk_idx) : nullptr;
  a.recv_topk_weights = with_topk ? optional_ptr<float>(recv_topk_weights) : nullptr;
  a.recv_src_meta = optional_ptr<int>(recv_src_meta);
  a.recv_rdma_channel_prefix_matrix = optional_ptr<int>(recv_rdma_channel_prefix_matrix);
  a.recv_gbl_channel_prefix_matrix = optional_ptr<int>(recv_gbl_channel_prefix_matrix);
  a.send_rdma_head = optional_ptr<int>(send_rdma_head);
  a.send_nvl_head = optional_ptr<int>(send_nvl_head);
  check_launch(op, internode_dispatch(ctx, l, a, c10::cuda::getCurrentCUDAStream()));
}

void internode_combine_op(const at::Tensor& buffer, const at::Tensor& x,
                          const std::optional<at::Tensor>& topk_weights,
                          const std::optional<at::Tensor>& bias_0, const std::optional<at::Tensor>& bias_1,
                          const at::Tensor& recv_rdma_channel_prefix_matrix,
                          const at::Tensor& recv_rdma_rank_prefix_sum,
                          const at::Tensor& recv_gbl_channel_prefix_matrix, const at::Tensor& send_rdma_head,
                          const at::Tensor& send_nvl_head, int64_t num_channels, int64_t rdma_slots,
                          int64_t nvl_slots, int64_t rdma_chunk, int64_t nvl_chunk, int64_t timeout_cycles,
                          const at::Tensor& combined_x,
                          const std::optional<at::Tensor>& combined_topk_weights) {
  constexpr const char* op = "dsv3_nvshmem.internode_combine";
  const c10::cuda::CUDAGuard guard(buffer.device());
  check_tensor(op, "x", x, at::kBFloat16, buffer);
  DSV3_CHECK(x.dim() == 2 && x.size(1) % 8 == 0 && x.size(1) > 0, op,
             "x must be [num_recv, hidden] with hidden a positive multiple of 8, got ", x.sizes());
  check_aligned(op, "x", x);
  const int64_t H = x.size(1);
  const bool with_weights = topk_weights.has_value() && topk_weights->defined();
  const int64_t k = with_weights ? topk_weights->size(1) : 0;
  const auto [ctx, l] = make_internode(op, buffer, num_channels, rdma_slots, nvl_slots,
                                       internode_combine_record_bytes(H, k), timeout_cycles);
  const int64_t R = ctx.num_ranks, N = l.num_nodes, C = num_channels;
  DSV3_CHECK(rdma_chunk >= 1 && nvl_chunk >= 1, op, "chunk sizes must be positive");
  if (with_weights) {
    check_tensor(op, "topk_weights", *topk_weights, at::kFloat, buffer);
    DSV3_CHECK(topk_weights->dim() == 2 && topk_weights->size(0) == x.size(0), op, "topk_weights must be [",
               x.size(0), ", k], got ", topk_weights->sizes());
  }
  check_matrix(op, "recv_rdma_channel_prefix_matrix", recv_rdma_channel_prefix_matrix, buffer, N, C);
  check_vector(op, "recv_rdma_rank_prefix_sum", recv_rdma_rank_prefix_sum, buffer, N);
  check_matrix(op, "recv_gbl_channel_prefix_matrix", recv_gbl_channel_prefix_matrix, buffer, R, C);
  check_tensor(op, "send_rdma_head", send_rdma_head, at::kInt, buffer);
  DSV3_CHECK(send_rdma_head.dim() == 2 && send_rdma_head.size(1) == N, op, "send_rdma_head must be [n, ", N,
             "], got ", send_rdma_head.sizes());
  const int64_t n = send_rdma_head.size(0);
  check_tensor(op, "send_nvl_head", send_nvl_head, at::kInt, buffer);
  DSV3_CHECK(send_nvl_head.dim() == 2 && send_nvl_head.size(1) == kInternodeNodeRanks, op,
             "send_nvl_head must be [rows, 8], got ", send_nvl_head.sizes());
  for (const auto& [name, b] : {std::pair{"bias_0", &bias_0}, std::pair{"bias_1", &bias_1}}) {
    if (!b->has_value() || !(*b)->defined()) continue;
    check_tensor(op, name, **b, at::kBFloat16, buffer);
    DSV3_CHECK((*b)->dim() == 2 && (*b)->size(0) == n && (*b)->size(1) == H, op, name, " must be [", n, ", ",
               H, "], got ", (*b)->sizes());
    check_aligned(op, name, **b);
  }
  check_tensor(op, "combined_x", combined_x, at::kBFloat16, buffer);
  check_numel(op, "combined_x", combined_x, n * H);
  check_aligned(op, "combined_x", combined_x);
  DSV3_CHECK(!with_weights || (combined_topk_weights.has_value() && combined_topk_weights->defined()), op,
             "combined_topk_weights is required with topk_weights");
  if (with_weights)
    check_optional(op, "combined_topk_weights", combined_topk_weights, at::kFloat, buffer, n * k);

  InternodeCombineArgs a{};
  a.x = x.const_data_ptr();
  a.hidden = int(H);
  a.topk_weights = with_weights ? topk_weights->const_data_ptr<float>() : nullptr;
  a.num_topk = int(k);
  a.bias_0 = bias_0.has_value() && bias_0->defined() ? bias_0->const_data_ptr() : nullptr;
  a.bias_1 = bias_1.has_value() && bias_1->defined() ? bias_1->const_data_ptr() : nullptr;
  a.recv_rdma_channel_prefix_matrix = recv_rdma_channel_prefix_matrix.const_data_ptr<int>();
  a.recv_rdma_rank_prefix_sum = recv_rdma_rank_prefix_sum.const_data_ptr<int>();
  a.recv_gbl_channel_prefix_matrix = recv_gbl_channel_prefix_matrix.const_data_ptr<int>();
  a.send_rdma_head = send_rdma_head.const_data_ptr<int>();
  a.send_nvl_head = send_nvl_head.const_data_ptr<int>();
  a.num_tokens = int(n);
  a.num_rdma_recv = int(send_nvl_head.size(0));
  a.rdma_chunk = int(std::min<int64_t>(rdma_chunk, rdma_slots));
  a.nvl_chunk = int(std::min<int64_t>(nvl_chunk, nvl_slots));
  a.combined_x = combined_x.data_ptr();
  a.combined_topk_weights = with_weights ? combined_topk_weights->data_ptr<float>() : nullptr;
  check_launch(op, internode_combine(ctx, l, a, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace dsv3::ep::nvshmem

TORCH_LIBRARY(dsv3_nvshmem, m) {
  using namespace dsv3::ep::nvshmem;
  m.def("unique_id() -> Tensor", &unique_id);
  m.def("init(Tensor unique_id, int rank, int num_ranks) -> ()", &init_runtime);
  m.def("alloc(int num_bytes) -> Tensor", &alloc_buffer);
  m.def("free(Tensor buffer) -> ()", &free_buffer);
  m.def("barrier() -> ()", &barrier);
  m.def("finalize() -> ()", &finalize_runtime);
  m.def("error_code() -> int", &error_code);
  m.def(
      "ll_dispatch_send(Tensor buffer, int half, Tensor x, Tensor topk_idx, int T, int num_experts, "
      "bool use_fp8, bool round_scale, bool use_ue8m0, int timeout_cycles) -> ()",
      &dispatch_send);
  m.def(
      "ll_dispatch_recv(Tensor buffer, int half, int T, int num_experts, int hidden, bool use_fp8, "
      "bool use_ue8m0, int timeout_cycles, Tensor(a!) recv_x, Tensor(b!)? recv_scales, Tensor(c!) "
      "recv_count, "
      "Tensor(d!) src_info, Tensor(e!) layout_range) -> ()",
      &dispatch_recv);
  m.def(
      "ll_combine_send(Tensor buffer, int half, Tensor x, Tensor src_info, Tensor layout_range, int T, "
      "int num_experts, bool zero_copy, int timeout_cycles) -> ()",
      &combine_send);
  m.def(
      "ll_combine_recv(Tensor buffer, int half, Tensor topk_idx, Tensor topk_weights, int T, int "
      "num_experts, "
      "int timeout_cycles, Tensor(a!) out) -> ()",
      &combine_recv);
  m.def(
      "internode_notify(Tensor buffer, Tensor num_tokens_per_expert, Tensor is_token_in_rank, int "
      "num_channels, "
      "int rdma_slots, int nvl_slots, int expert_alignment, int sequence, int barrier_rounds, int "
      "timeout_cycles, "
      "Tensor(a!) rdma_channel_prefix_matrix, Tensor(b!) gbl_channel_prefix_matrix, "
      "Tensor(c!) recv_rdma_rank_prefix_sum, Tensor(d!) recv_gbl_rank_prefix_sum) -> ()",
      &internode_notify_op);
  m.def(
      "internode_cached_notify(Tensor buffer, int num_channels, int rdma_slots, int nvl_slots, int "
      "barrier_rounds, "
      "int timeout_cycles) -> ()",
      &internode_cached_notify_op);
  m.def("internode_wait(int sequence, int num_local_experts, float timeout_s) -> int[]", &internode_wait_op);
  m.def(
      "internode_dispatch(Tensor buffer, Tensor x, Tensor? x_scales, Tensor? topk_idx, Tensor? topk_weights, "
      "Tensor is_token_in_rank, Tensor rdma_channel_prefix_matrix, Tensor gbl_channel_prefix_matrix, "
      "Tensor recv_rdma_rank_prefix_sum, Tensor recv_gbl_rank_prefix_sum, int num_experts, int num_channels, "
      "int rdma_slots, int nvl_slots, int rdma_chunk, int nvl_chunk, int timeout_cycles, Tensor(a!) recv_x, "
      "Tensor(b!)? recv_x_scales, Tensor(c!)? recv_topk_idx, Tensor(d!)? recv_topk_weights, "
      "Tensor(e!)? recv_src_meta, Tensor(f!)? recv_rdma_channel_prefix_matrix, "
      "Tensor(g!)? recv_gbl_channel_prefix_matrix, Tensor(h!)? send_rdma_head, Tensor(i!)? send_nvl_head) -> "
      "()",
      &internode_dispatch_op);
  m.def(
      "internode_combine(Tensor buffer, Tensor x, Tensor? topk_weights, Tensor? bias_0, Tensor? bias_1, "
      "Tensor recv_rdma_channel_prefix_matrix, Tensor recv_rdma_rank_prefix_sum, "
      "Tensor recv_gbl_channel_prefix_matrix, Tensor send_rdma_head, Tensor send_nvl_head, int num_channels, "
      "int rdma_slots, int nvl_slots, int rdma_chunk, int nvl_chunk, int timeout_cycles, Tensor(a!) "
      "combined_x, "
      "Tensor(b!)? combined_topk_weights) -> ()",
      &internode_combine_op);
}

// Importing dsv3._C_nvshmem loads this library; its static initializers register the ops above.
static PyModuleDef dsv3_nvshmem_module = {PyModuleDef_HEAD_INIT,
                                          "_C_nvshmem",
                                          "dsv3 NVSHMEM EP kernels (torch.ops.dsv3_nvshmem)",
                                          -1,
                                          nullptr,
                                          nullptr,
                                          nullptr,
                                          nullptr,
                                          nullptr};

extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C_nvshmem() {
  return PyModule_Create(&dsv3_nvshmem_module);
}
