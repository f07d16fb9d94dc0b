// dsv3._C_nvshmem: torch.ops.dsv3_nvshmem.* — the NVSHMEM runtime (unique id, init, symmetric buffer,
// barrier, finalize) and the low-latency EP launches of ll_kernels.cu. Python (dsv3.ep.backends.nvshmem)
// exchanges the unique id, allocates the outputs and validates the user-facing arguments; these entries
// re-check what the kernels rely on (dtypes, devices, contiguity, buffer size) so a bad call cannot fault.
#include <ATen/ATen.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>

#include "dsv3/checks.h"
#include "dsv3/ep/ll_layout.h"
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
  *r.error_flag_host = 0;
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
