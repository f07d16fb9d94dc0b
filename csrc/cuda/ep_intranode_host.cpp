// Host side of the intranode (NVLink) EP backend: the torch ops python/dsv3/ep/backends/nvlink.py drives.
// Buffer allocation and CUDA IPC (export a handle, open the peers' buffers into a device array of pointers,
// close them), the pinned host-mapped counters with a CPU-side timed wait (the notify kernel publishes the
// received row count there), and the launches of csrc/cuda/ep_intranode.cu on the current stream.
// Registered here (not in csrc/ops.cpp) because they exist only in CUDA builds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "dsv3/checks.h"
#include "dsv3/ep/nvl_layout.h"
#include "ep_intranode_kernels.h"

namespace dsv3::cuda {
namespace {

using ep::NvlLayout;

void check_cuda(cudaError_t err, const char* op, const char* what) {
  TORCH_CHECK(err == cudaSuccess, op, ": ", what, " failed: ", cudaGetErrorString(err));
}

const char* error_name(int code) {
  switch (code) {
    case ep::kNvlErrorBarrier:
      return "a barrier";
    case ep::kNvlErrorDispatchSend:
      return "dispatch (waiting for free queue slots at a peer)";
    case ep::kNvlErrorDispatchRecv:
      return "dispatch (waiting for rows from a peer)";
    case ep::kNvlErrorCombineSend:
      return "combine (waiting for free queue slots at a peer)";
    case ep::kNvlErrorCombineRecv:
      return "combine (waiting for rows from a peer)";
    case ep::kNvlErrorRecvOverflow:
      return "dispatch (more rows arrived than num_worst_tokens)";
    default:
      return "an unknown step";
  }
}

// ---- buffers and IPC -----------------------------------------------------------------------------------

at::Tensor alloc_buffer(int64_t num_bytes, int64_t device) {
  constexpr const char* op = "ep_nvl_alloc_buffer";
  DSV3_CHECK(num_bytes > 0, op, "num_bytes must be positive, got ", num_bytes);
  DSV3_CHECK(device >= 0 && device < c10::cuda::device_count(), op,
             "device must be a CUDA device index, got ", device);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  // A cudaMalloc of its own (not the caching allocator): an IPC handle maps the start of the allocation, so
  // the buffer must be one.
  void* ptr = nullptr;
  check_cuda(cudaMalloc(&ptr, static_cast<size_t>(num_bytes)), op, "cudaMalloc");
  const cudaError_t err = cudaMemset(ptr, 0, static_cast<size_t>(num_bytes));
  if (err != cudaSuccess) cudaFree(ptr);
  check_cuda(err, op, "cudaMemset");
  check_cuda(cudaDeviceSynchronize(), op, "cudaDeviceSynchronize");
  return at::from_blob(
      ptr, {num_bytes}, [](void* p) { cudaFree(p); },
      at::TensorOptions().dtype(at::kByte).device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
}

at::Tensor ipc_handle(const at::Tensor& buffer) {
  constexpr const char* op = "ep_nvl_ipc_handle";
  DSV3_CHECK(buffer.is_cuda() && buffer.scalar_type() == at::kByte && buffer.dim() == 1, op,
             "buffer must be a 1-D CUDA uint8 tensor from ep_nvl_alloc_buffer");
  const c10::cuda::CUDAGuard guard(buffer.device());
  cudaIpcMemHandle_t handle;
  check_cuda(cudaIpcGetMemHandle(&handle, buffer.data_ptr()), op, "cudaIpcGetMemHandle");
  at::Tensor out = at::empty({static_cast<int64_t>(sizeof(handle))}, at::kByte);
  std::memcpy(out.data_ptr(), &handle, sizeof(handle));
  return out;
}

// handles: CPU uint8 [R, 64], row r = rank r's ep_nvl_ipc_handle. Returns the CUDA int64 [R] array of every
// rank's buffer address in this process (this rank's own buffer at `rank`).
at::Tensor open_peers(const at::Tensor& buffer, const at::Tensor& handles, int64_t rank) {
  constexpr const char* op = "ep_nvl_open_peers";
  DSV3_CHECK(buffer.is_cuda() && buffer.scalar_type() == at::kByte && buffer.dim() == 1, op,
             "buffer must be a 1-D CUDA uint8 tensor");
  DSV3_CHECK(handles.device().is_cpu() && handles.scalar_type() == at::kByte && handles.dim() == 2 &&
                 handles.size(1) == static_cast<int64_t>(sizeof(cudaIpcMemHandle_t)),
             op, "handles must be a CPU uint8 tensor [num_ranks, ", sizeof(cudaIpcMemHandle_t), "]");
  const int64_t num_ranks = handles.size(0);
  DSV3_CHECK(num_ranks == 2 || num_ranks == 4 || num_ranks == 8, op, "handles must have 2, 4 or 8 rows, got ",
             num_ranks);
  DSV3_CHECK(rank >= 0 && rank < num_ranks, op, "rank must be in [0, ", num_ranks, "), got ", rank);
  const c10::cuda::CUDAGuard guard(buffer.device());
  const at::Tensor h = handles.contiguous();
  std::vector<int64_t> ptrs(num_ranks, 0);
  for (int64_t r = 0; r < num_ranks; ++r) {
    if (r == rank) {
      ptrs[r] = reinterpret_cast<int64_t>(buffer.data_ptr());
      continue;
    }
    cudaIpcMemHandle_t handle;
    std::memcpy(&handle, h.data_ptr<uint8_t>() + r * sizeof(handle), sizeof(handle));
    void* peer = nullptr;
    const cudaError_t err = cudaIpcOpenMemHandle(&peer, handle, cudaIpcMemLazyEnablePeerAccess);
    if (err != cudaSuccess) {
      for (int64_t o = 0; o < r; ++o) {
        if (o != rank) cudaIpcCloseMemHandle(reinterpret_cast<void*>(ptrs[o]));
      }
      TORCH_CHECK(false, op, ": cudaIpcOpenMemHandle of rank ", r, "'s buffer failed (",
                  cudaGetErrorString(err), "); the ranks must share one node and see each other's GPUs");
    }
    ptrs[r] = reinterpret_cast<int64_t>(peer);
  }
  return at::tensor(ptrs, at::kLong).to(buffer.device());
}

void close_peers(const at::Tensor& peers, int64_t rank) {
  constexpr const char* op = "ep_nvl_close_peers";
  DSV3_CHECK(peers.is_cuda() && peers.scalar_type() == at::kLong && peers.dim() == 1, op,
             "peers must be the CUDA int64 tensor of ep_nvl_open_peers");
  DSV3_CHECK(rank >= 0 && rank < peers.size(0), op, "rank must be in [0, ", peers.size(0), "), got ", rank);
  const c10::cuda::CUDAGuard guard(peers.device());
  const at::Tensor host = peers.cpu();
  for (int64_t r = 0; r < host.size(0); ++r) {
    if (r != rank) {
      check_cuda(cudaIpcCloseMemHandle(reinterpret_cast<void*>(host.data_ptr<int64_t>()[r])), op,
                 "cudaIpcCloseMemHandle");
    }
  }
}

// ---- host-mapped counters ------------------------------------------------------------------------------

at::Tensor host_counters() {
  constexpr const char* op = "ep_nvl_host_counters";
  void* ptr = nullptr;
  const size_t bytes = ep::kNvlHostCounterInts * sizeof(int);
  check_cuda(cudaHostAlloc(&ptr, bytes, cudaHostAllocMapped | cudaHostAllocPortable), op, "cudaHostAlloc");
  std::memset(ptr, 0, bytes);
  return at::from_blob(
      ptr, {ep::kNvlHostCounterInts}, [](void* p) { cudaFreeHost(p); }, at::TensorOptions().dtype(at::kInt));
}

int* device_counters(const at::Tensor& counters, const char* op) {
  DSV3_CHECK(counters.device().is_cpu() && counters.scalar_type() == at::kInt &&
                 counters.numel() == ep::kNvlHostCounterInts && counters.is_contiguous(),
             op, "host_counters must be the tensor of ep_nvl_host_counters");
  void* dev = nullptr;
  check_cuda(cudaHostGetDevicePointer(&dev, counters.data_ptr(), 0), op, "cudaHostGetDevicePointer");
  return static_cast<int*>(dev);
}

// Busy-waits (CPU) until the notify kernel of call `sequence` published its counts; returns
// [received rows, per-local-expert counts...]. A peer that never arrives ends in a RuntimeError after
// timeout_s seconds (or as soon as a kernel reports its own timeout).
std::vector<int64_t> wait_recv(const at::Tensor& counters, int64_t sequence, int64_t num_local_experts,
                               double timeout_s) {
  constexpr const char* op = "ep_nvl_wait_recv";
  device_counters(counters, op);
  DSV3_CHECK(num_local_experts >= 0 && num_local_experts <= ep::kNvlMaxLocalExperts, op,
             "num_local_experts must be in [0, ", ep::kNvlMaxLocalExperts, "], got ", num_local_experts);
  DSV3_CHECK(timeout_s > 0, op, "timeout_s must be positive, got ", timeout_s);
  const volatile int* words = counters.data_ptr<int>();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (words[ep::kNvlHostSeq] != static_cast<int>(sequence)) {
    const int error = words[ep::kNvlHostError];  // an overflow is reported by the next call, not here
    TORCH_CHECK(error == ep::kNvlErrorNone || error == ep::kNvlErrorRecvOverflow, op, ": timeout in ",
                error_name(error), " on the GPU: a peer did not arrive within the timeout");
    TORCH_CHECK(std::chrono::steady_clock::now() < deadline, op,
                ": CPU recv timeout: the dispatch counts did not arrive within ", timeout_s,
                " s (a peer did not join the dispatch)");
  }
  std::vector<int64_t> out(1 + num_local_experts);
  out[0] = words[ep::kNvlHostRecvTokens];
  for (int64_t e = 0; e < num_local_experts; ++e) out[1 + e] = words[ep::kNvlHostExpertCounts + e];
  return out;
}

// ---- launches ------------------------------------------------------------------------------------------

NvlContext make_context(const at::Tensor& buffer, const at::Tensor& peers, const at::Tensor& counters,
                        int64_t rank, double timeout_s, const char* op) {
  DSV3_CHECK(buffer.is_cuda() && buffer.scalar_type() == at::kByte && buffer.dim() == 1, op,
             "buffer must be a 1-D CUDA uint8 tensor");
  DSV3_CHECK(peers.is_cuda() && peers.scalar_type() == at::kLong && peers.dim() == 1 &&
                 peers.is_contiguous() && peers.device() == buffer.device(),
             op, "peers must be the CUDA int64 tensor of ep_nvl_open_peers on the buffer's device");
  const int64_t num_ranks = peers.size(0);
  DSV3_CHECK(num_ranks == 2 || num_ranks == 4 || num_ranks == 8, op,
             "the group must have 2, 4 or 8 ranks, got ", num_ranks);
  DSV3_CHECK(rank >= 0 && rank < num_ranks, op, "rank must be in [0, ", num_ranks, "), got ", rank);
  DSV3_CHECK(timeout_s > 0, op, "timeout_s must be positive, got ", timeout_s);
  int clock_khz = 0;
  check_cuda(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, buffer.device().index()), op,
             "cudaDeviceGetAttribute(clock rate)");
  NvlContext ctx{};
  ctx.buffers = reinterpret_cast<void* const*>(peers.data_ptr<int64_t>());
  ctx.host_counters = device_counters(counters, op);
  ctx.rank = static_cast<int>(rank);
  ctx.timeout_cycles = static_cast<long long>(timeout_s * clock_khz * 1e3);
  return ctx;
}

NvlLayout checked_layout(const at::Tensor& buffer, int num_ranks, int64_t num_local_experts,
                         int64_t hidden_bytes, int64_t num_scales, int64_t num_topk, int64_t num_channels,
                         int64_t num_slots, const char* op) {
  DSV3_CHECK(num_local_experts >= 0 && num_local_experts <= ep::kNvlMaxLocalExperts, op,
             "the local expert count must be in [0, ", ep::kNvlMaxLocalExperts, "], got ", num_local_experts);
  DSV3_CHECK(hidden_bytes >= 0 && hidden_bytes % 16 == 0, op,
             "the row size in bytes must be a multiple of 16, got ", hidden_bytes);
  DSV3_CHECK(num_scales >= 0 && num_scales <= ep::kNvlMaxScales, op, "the scale count must be in [0, ",
             ep::kNvlMaxScales, "], got ", num_scales);
  DSV3_CHECK(num_topk >= 0 && num_topk <= ep::kNvlMaxTopk, op, "top-k must be in [0, ", ep::kNvlMaxTopk,
             "], got ", num_topk);
  DSV3_CHECK(num_channels >= 1 && num_channels <= 1024, op, "num_channels must be in [1, 1024], got ",
             num_channels);
  DSV3_CHECK(num_slots >= 2, op, "num_max_recv_tokens must be >= 2, got ", num_slots);
  const NvlLayout layout = ep::make_nvl_layout(num_ranks, static_cast<int>(num_local_experts), hidden_bytes,
                                               static_cast<int>(num_scales), static_cast<int>(num_topk),
                                               static_cast<int>(num_channels), static_cast<int>(num_slots));
  DSV3_CHECK(layout.total_bytes <= buffer.numel(), op, "the NVLink buffer has ", buffer.numel(),
             " bytes, this call needs ", layout.total_bytes,
             " (Config.get_nvl_buffer_size_hint gives the size for a hidden size and rank count)");
  return layout;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_int_tensor(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                      at::IntArrayRef shape, const at::Device& device) {
  DSV3_CHECK(t.device() == device, op, name, " must be on ", device, ", got ", t.device());
  DSV3_CHECK_TYPE(t.scalar_type() == dtype, op, name, " must be ", dtype, ", got ", t.scalar_type());
  DSV3_CHECK(t.sizes() == shape && t.is_contiguous(), op, name, " must be a contiguous ", shape,
             " tensor, got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> notify_dispatch(const at::Tensor& num_tokens_per_rank,
                                                   const at::Tensor& num_tokens_per_expert,
                                                   const at::Tensor& is_token_in_rank,
                                                   const at::Tensor& buffer, const at::Tensor& peers,
                                                   const at::Tensor& counters, int64_t rank, int64_t sequence,
                                                   int64_t expert_alignment, int64_t num_channels,
                                                   int64_t num_slots, int64_t hidden_bytes,
                                                   int64_t num_scales, int64_t num_topk, double timeout_s) {
  constexpr const char* op = "ep_nvl_notify_dispatch";
  const NvlContext ctx = make_context(buffer, peers, counters, rank, timeout_s, op);
  const int R = static_cast<int>(peers.size(0));
  const at::Device dev = buffer.device();
  DSV3_CHECK(is_token_in_rank.dim() == 2, op, "is_token_in_rank must be [n, ", R, "]");
  const int64_t n = is_token_in_rank.size(0);
  check_int_tensor(is_token_in_rank, op, "is_token_in_rank", at::kBool, {n, R}, dev);
  check_int_tensor(num_tokens_per_rank, op, "num_tokens_per_rank", at::kInt, {R}, dev);
  const int64_t E = num_tokens_per_expert.numel();
  DSV3_CHECK(E > 0 && E % R == 0, op, "num_tokens_per_expert must have a positive multiple of ", R,
             " entries, got ", E);
  check_int_tensor(num_tokens_per_expert, op, "num_tokens_per_expert", at::kInt, {E}, dev);
  DSV3_CHECK(expert_alignment >= 1, op, "expert_alignment must be >= 1, got ", expert_alignment);
  DSV3_CHECK(n < (int64_t{1} << 30), op, "too many tokens: ", n);
  const NvlLayout layout =
      checked_layout(buffer, R, E / R, hidden_bytes, num_scales, num_topk, num_channels, num_slots, op);
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor rank_prefix_matrix = at::empty({R, R}, buffer.options().dtype(at::kInt));
  at::Tensor channel_prefix_matrix = at::empty({R, num_channels}, buffer.options().dtype(at::kInt));
  check_launch(nvl_notify_dispatch(ctx, layout, num_tokens_per_rank.data_ptr<int>(),
                                   num_tokens_per_expert.data_ptr<int>(), is_token_in_rank.data_ptr<bool>(),
                                   static_cast<int>(n), static_cast<int>(expert_alignment),
                                   static_cast<int>(sequence), rank_prefix_matrix.data_ptr<int>(),
                                   channel_prefix_matrix.data_ptr<int>(), c10::cuda::getCurrentCUDAStream()),
               op);
  return {rank_prefix_matrix, channel_prefix_matrix};
}

template <typename T>
T* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

void dispatch(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
              const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_weights,
              const at::Tensor& is_token_in_rank, const at::Tensor& rank_prefix_matrix,
              const at::Tensor& channel_prefix_matrix, const at::Tensor& recv_x,
              const std::optional<at::Tensor>& recv_x_scales, const std::optional<at::Tensor>& recv_topk_idx,
              const std::optional<at::Tensor>& recv_topk_weights,
              const std::optional<at::Tensor>& recv_src_idx,
              const std::optional<at::Tensor>& recv_channel_prefix_matrix,
              const std::optional<at::Tensor>& send_head, const at::Tensor& buffer, const at::Tensor& peers,
              const at::Tensor& counters, int64_t rank, int64_t num_experts, int64_t num_max_send_tokens,
              int64_t num_max_recv_tokens, double timeout_s) {
  constexpr const char* op = "ep_nvl_dispatch";
  const NvlContext ctx = make_context(buffer, peers, counters, rank, timeout_s, op);
  const int R = static_cast<int>(peers.size(0));
  const at::Device dev = buffer.device();
  DSV3_CHECK(x.dim() == 2 && x.is_contiguous() && x.device() == dev, op,
             "x must be a contiguous 2-D tensor on ", dev);
  const int64_t n = x.size(0), hidden_bytes = x.size(1) * x.element_size();
  DSV3_CHECK(n < (int64_t{1} << 30), op, "too many tokens: ", n);
  DSV3_CHECK(channel_prefix_matrix.dim() == 2, op, "channel_prefix_matrix must be [", R, ", C]");
  const int64_t C = channel_prefix_matrix.size(1);
  check_int_tensor(is_token_in_rank, op, "is_token_in_rank", at::kBool, {n, R}, dev);
  check_int_tensor(rank_prefix_matrix, op, "rank_prefix_matrix", at::kInt, {R, R}, dev);
  check_int_tensor(channel_prefix_matrix, op, "channel_prefix_matrix", at::kInt, {R, C}, dev);
  DSV3_CHECK(recv_x.dim() == 2 && recv_x.is_contiguous() && recv_x.device() == dev &&
                 recv_x.scalar_type() == x.scalar_type() && recv_x.size(1) == x.size(1),
             op, "recv_x must be a contiguous [rows, ", x.size(1), "] ", x.scalar_type(), " tensor");
  const int64_t capacity = recv_x.size(0);
  int64_t num_scales = 0, scale_token_stride = 0, scale_hidden_stride = 0;
  const bool has_scales = x_scales.has_value() && x_scales->defined();
  DSV3_CHECK(has_scales == (recv_x_scales.has_value() && recv_x_scales->defined()), op,
             "x_scales and recv_x_scales must be given together");
  if (has_scales) {
    DSV3_CHECK(x_scales->dim() == 2 && x_scales->size(0) == n && x_scales->element_size() == 4 &&
                   x_scales->device() == dev,
               op, "x_scales must be a 4-byte [", n, ", S] tensor on ", dev);
    num_scales = x_scales->size(1);
    scale_token_stride = x_scales->stride(0);
    scale_hidden_stride = x_scales->stride(1);
    check_int_tensor(*recv_x_scales, op, "recv_x_scales", x_scales->scalar_type(), {capacity, num_scales},
                     dev);
  }
  const bool has_topk = topk_idx.has_value() && topk_idx->defined();
  int64_t k = 0;
  if (has_topk) {
    DSV3_CHECK(topk_idx->dim() == 2, op, "topk_idx must be [n, k]");
    k = topk_idx->size(1);
    check_int_tensor(*topk_idx, op, "topk_idx", at::kLong, {n, k}, dev);
    DSV3_CHECK(topk_weights.has_value() && topk_weights->defined(), op,
               "topk_weights must come with topk_idx");
    check_int_tensor(*topk_weights, op, "topk_weights", at::kFloat, {n, k}, dev);
    DSV3_CHECK(recv_topk_idx.has_value() && recv_topk_weights.has_value(), op,
               "recv_topk_idx and recv_topk_weights are needed with topk_idx");
    check_int_tensor(*recv_topk_idx, op, "recv_topk_idx", at::kLong, {capacity, k}, dev);
    check_int_tensor(*recv_topk_weights, op, "recv_topk_weights", at::kFloat, {capacity, k}, dev);
    DSV3_CHECK(num_experts > 0 && num_experts % R == 0, op, "num_experts must be a positive multiple of ", R,
               ", got ", num_experts);
  }
  if (recv_src_idx.has_value() && recv_src_idx->defined()) {
    check_int_tensor(*recv_src_idx, op, "recv_src_idx", at::kInt, {capacity}, dev);
  }
  if (recv_channel_prefix_matrix.has_value() && recv_channel_prefix_matrix->defined()) {
    check_int_tensor(*recv_channel_prefix_matrix, op, "recv_channel_prefix_matrix", at::kInt, {R, C}, dev);
  }
  if (send_head.has_value() && send_head->defined()) {
    check_int_tensor(*send_head, op, "send_head", at::kInt, {n, R}, dev);
  }
  DSV3_CHECK(num_max_send_tokens >= 1, op, "num_max_send_tokens must be >= 1, got ", num_max_send_tokens);
  // The layout of the notify that preceded this dispatch: local experts count only in a non-cached one.
  const int64_t num_local = num_experts > 0 ? num_experts / R : 0;
  const NvlLayout layout =
      checked_layout(buffer, R, num_local, hidden_bytes, num_scales, k, C, num_max_recv_tokens, op);
  NvlDispatchArgs a{};
  a.x = x.data_ptr();
  a.x_scales = has_scales ? static_cast<const int*>(x_scales->data_ptr()) : nullptr;
  a.scale_token_stride = scale_token_stride;
  a.scale_hidden_stride = scale_hidden_stride;
  a.topk_idx = has_topk ? topk_idx->data_ptr<int64_t>() : nullptr;
  a.topk_weights = has_topk ? topk_weights->data_ptr<float>() : nullptr;
  a.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
  a.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
  a.channel_prefix_matrix = channel_prefix_matrix.data_ptr<int>();
  a.num_tokens = static_cast<int>(n);
  a.num_recv_capacity = static_cast<int>(capacity);
  a.num_local_experts = has_topk ? static_cast<int>(num_experts / R) : 0;
  a.num_max_send_tokens = static_cast<int>(num_max_send_tokens);
  a.recv_x = recv_x.data_ptr();
  a.recv_x_scales = has_scales ? static_cast<int*>(recv_x_scales->data_ptr()) : nullptr;
  a.recv_topk_idx = has_topk ? optional_ptr<int64_t>(recv_topk_idx) : nullptr;
  a.recv_topk_weights = has_topk ? optional_ptr<float>(recv_topk_weights) : nullptr;
  a.recv_src_idx = optional_ptr<int>(recv_src_idx);
  a.recv_channel_prefix_matrix = optional_ptr<int>(recv_channel_prefix_matrix);
  a.send_head = optional_ptr<int>(send_head);
  const c10::cuda::CUDAGuard guard(dev);
  check_launch(nvl_dispatch(ctx, layout, a, c10::cuda::getCurrentCUDAStream()), op);
}

void reset_queues(const at::Tensor& buffer, const at::Tensor& peers, const at::Tensor& counters, int64_t rank,
                  int64_t num_channels, double timeout_s) {
  constexpr const char* op = "ep_nvl_reset_queues";
  const NvlContext ctx = make_context(buffer, peers, counters, rank, timeout_s, op);
  // Only the queue control words are touched: their offset depends on R and C alone.
  const NvlLayout layout =
      checked_layout(buffer, static_cast<int>(peers.size(0)), 0, 0, 0, 0, num_channels, 2, op);
  const c10::cuda::CUDAGuard guard(buffer.device());
  check_launch(nvl_reset_queues(ctx, layout, c10::cuda::getCurrentCUDAStream()), op);
}

void barrier(const at::Tensor& buffer, const at::Tensor& peers, const at::Tensor& counters, int64_t rank,
             double timeout_s) {
  constexpr const char* op = "ep_nvl_barrier";
  const NvlContext ctx = make_context(buffer, peers, counters, rank, timeout_s, op);
  const NvlLayout layout = checked_layout(buffer, static_cast<int>(peers.size(0)), 0, 0, 0, 0, 1, 2, op);
  const c10::cuda::CUDAGuard guard(buffer.device());
  check_launch(nvl_barrier(ctx, layout, c10::cuda::getCurrentCUDAStream()), op);
}

void combine(const at::Tensor& x, const std::optional<at::Tensor>& topk_weights,
             const std::optional<at::Tensor>& bias_0, const std::optional<at::Tensor>& bias_1,
             const at::Tensor& rank_prefix_matrix, const at::Tensor& recv_channel_prefix_matrix,
             const at::Tensor& send_head, const at::Tensor& combined_x,
             const std::optional<at::Tensor>& combined_topk_weights, const at::Tensor& buffer,
             const at::Tensor& peers, const at::Tensor& counters, int64_t rank, int64_t num_max_send_tokens,
             int64_t num_max_recv_tokens, double timeout_s) {
  constexpr const char* op = "ep_nvl_combine";
  const NvlContext ctx = make_context(buffer, peers, counters, rank, timeout_s, op);
  const int R = static_cast<int>(peers.size(0));
  const at::Device dev = buffer.device();
  DSV3_CHECK(x.dim() == 2 && x.device() == dev, op, "x must be a 2-D tensor on ", dev);
  DSV3_CHECK_TYPE(x.scalar_type() == at::kBFloat16, op, "x must be bfloat16, got ", x.scalar_type());
  DSV3_CHECK(x.is_contiguous(), op, "x must be contiguous");
  const int64_t H = x.size(1), num_rows = x.size(0);
  DSV3_CHECK(H % 8 == 0, op, "x's hidden size must be a multiple of 8, got ", H);
  DSV3_CHECK(send_head.dim() == 2, op, "send_head must be [n, ", R, "]");
  const int64_t n = send_head.size(0);
  DSV3_CHECK(recv_channel_prefix_matrix.dim() == 2, op, "recv_channel_prefix_matrix must be [", R, ", C]");
  const int64_t C = recv_channel_prefix_matrix.size(1);
  check_int_tensor(send_head, op, "send_head", at::kInt, {n, R}, dev);
  check_int_tensor(rank_prefix_matrix, op, "rank_prefix_matrix", at::kInt, {R, R}, dev);
  check_int_tensor(recv_channel_prefix_matrix, op, "recv_channel_prefix_matrix", at::kInt, {R, C}, dev);
  check_int_tensor(combined_x, op, "combined_x", at::kBFloat16, {n, H}, dev);
  for (const auto* b : {&bias_0, &bias_1}) {
    if (b->has_value() && (*b)->defined()) check_int_tensor(**b, op, "bias", at::kBFloat16, {n, H}, dev);
  }
  const bool has_weights = topk_weights.has_value() && topk_weights->defined();
  int64_t k = 0;
  if (has_weights) {
    DSV3_CHECK(topk_weights->dim() == 2, op, "topk_weights must be [rows, k]");
    k = topk_weights->size(1);
    check_int_tensor(*topk_weights, op, "topk_weights", at::kFloat, {num_rows, k}, dev);
    DSV3_CHECK(combined_topk_weights.has_value() && combined_topk_weights->defined(), op,
               "combined_topk_weights is needed with topk_weights");
    check_int_tensor(*combined_topk_weights, op, "combined_topk_weights", at::kFloat, {n, k}, dev);
  }
  DSV3_CHECK(num_max_send_tokens >= 1, op, "num_max_send_tokens must be >= 1, got ", num_max_send_tokens);
  const NvlLayout layout = checked_layout(buffer, R, 0, H * 2, 0, k, C, num_max_recv_tokens, op);
  NvlCombineArgs a{};
  a.x = x.data_ptr();
  a.topk_weights = has_weights ? topk_weights->data_ptr<float>() : nullptr;
  a.bias_0 = optional_ptr<const void>(bias_0);
  a.bias_1 = optional_ptr<const void>(bias_1);
  a.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
  a.recv_channel_prefix_matrix = recv_channel_prefix_matrix.data_ptr<int>();
  a.send_head = send_head.data_ptr<int>();
  a.num_tokens = static_cast<int>(n);
  a.hidden = static_cast<int>(H);
  a.num_max_send_tokens = static_cast<int>(num_max_send_tokens);
  a.combined_x = combined_x.data_ptr();
  a.combined_topk_weights = has_weights ? combined_topk_weights->data_ptr<float>() : nullptr;
  const c10::cuda::CUDAGuard guard(dev);
  check_launch(nvl_combine(ctx, layout, a, c10::cuda::getCurrentCUDAStream()), op);
}

}  // namespace
}  // namespace dsv3::cuda

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("ep_nvl_alloc_buffer(int num_bytes, int device) -> Tensor", &dsv3::cuda::alloc_buffer);
  m.def("ep_nvl_ipc_handle(Tensor buffer) -> Tensor");
  m.def("ep_nvl_open_peers(Tensor buffer, Tensor handles, int rank) -> Tensor");
  m.def("ep_nvl_close_peers(Tensor peers, int rank) -> ()");
  m.def("ep_nvl_host_counters() -> Tensor", &dsv3::cuda::host_counters);
  m.def(
      "ep_nvl_wait_recv(Tensor host_counters, int sequence, int num_local_experts, float timeout_s) -> int[]",
      &dsv3::cuda::wait_recv);
  m.def(
      "ep_nvl_notify_dispatch(Tensor num_tokens_per_rank, Tensor num_tokens_per_expert, Tensor "
      "is_token_in_rank, "
      "Tensor buffer, Tensor peers, Tensor host_counters, int rank, int sequence, int expert_alignment, "
      "int num_channels, int num_max_recv_tokens, int hidden_bytes, int num_scales, int num_topk, "
      "float timeout_s) -> (Tensor, Tensor)");
  m.def(
      "ep_nvl_dispatch(Tensor x, Tensor? x_scales, Tensor? topk_idx, Tensor? topk_weights, "
      "Tensor is_token_in_rank, Tensor rank_prefix_matrix, Tensor channel_prefix_matrix, Tensor(a!) recv_x, "
      "Tensor(b!)? recv_x_scales, Tensor(c!)? recv_topk_idx, Tensor(d!)? recv_topk_weights, "
      "Tensor(e!)? recv_src_idx, Tensor(f!)? recv_channel_prefix_matrix, Tensor(g!)? send_head, Tensor "
      "buffer, "
      "Tensor peers, Tensor host_counters, int rank, int num_experts, int num_max_send_tokens, "
      "int num_max_recv_tokens, float timeout_s) -> ()");
  m.def(
      "ep_nvl_reset_queues(Tensor buffer, Tensor peers, Tensor host_counters, int rank, int num_channels, "
      "float timeout_s) -> ()");
  m.def("ep_nvl_barrier(Tensor buffer, Tensor peers, Tensor host_counters, int rank, float timeout_s) -> ()");
  m.def(
      "ep_nvl_combine(Tensor x, Tensor? topk_weights, Tensor? bias_0, Tensor? bias_1, Tensor "
      "rank_prefix_matrix, "
      "Tensor recv_channel_prefix_matrix, Tensor send_head, Tensor(a!) combined_x, "
      "Tensor(b!)? combined_topk_weights, Tensor buffer, Tensor peers, Tensor host_counters, int rank, "
      "int num_max_send_tokens, int num_max_recv_tokens, float timeout_s) -> ()");
}

TORCH_LIBRARY_IMPL(dsv3, CUDA, m) {
  m.impl("ep_nvl_ipc_handle", &dsv3::cuda::ipc_handle);
  m.impl("ep_nvl_open_peers", &dsv3::cuda::open_peers);
  m.impl("ep_nvl_close_peers", &dsv3::cuda::close_peers);
  m.impl("ep_nvl_notify_dispatch", &dsv3::cuda::notify_dispatch);
  m.impl("ep_nvl_dispatch", &dsv3::cuda::dispatch);
  m.impl("ep_nvl_reset_queues", &dsv3::cuda::reset_queues);
  m.impl("ep_nvl_barrier", &dsv3::cuda::barrier);
  m.impl("ep_nvl_combine", &dsv3::cuda::combine);
}
