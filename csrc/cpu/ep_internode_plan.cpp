// Host logic of the internode EP kernels (csrc/include/dsv3/ep/internode_layout.h) as CPU ops built into
// every dsv3._C, so the Python size hint and the handle arithmetic are tested without GPUs or NVSHMEM:
//   ep_internode_layout(...) -> JSON of the buffer regions;
//   ep_internode_plan(is_token_in_rank [R, n, R], num_channels) -> every rank's handle tensors and received
//     (source rank, source token) rows, computed with the kernels' queue order (senders in token order per
//     node, forwarders over source nodes ascending) and the header's prefix/range functions.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

#include "dsv3/checks.h"
#include "dsv3/ep/internode_layout.h"
#include "dsv3/ep/nvl_layout.h"

namespace dsv3::ep {
namespace {

constexpr int kP = kInternodeNodeRanks;

void check_geometry(const char* op, int64_t num_ranks, int64_t num_channels) {
  DSV3_CHECK(num_ranks > kP && num_ranks % kP == 0 && num_ranks / kP <= kInternodeMaxNodes, op,
             "num_ranks must be 8 * nodes with 2..", kInternodeMaxNodes, " nodes, got ", num_ranks);
  DSV3_CHECK(num_channels >= 1 && num_channels <= 1024, op, "num_channels must be in [1, 1024], got ",
             num_channels);
}

std::string internode_layout_json(int64_t num_ranks, int64_t num_channels, int64_t rdma_slots,
                                  int64_t nvl_slots, int64_t slot_bytes) {
  constexpr const char* op = "ep_internode_layout";
  check_geometry(op, num_ranks, num_channels);
  DSV3_CHECK(rdma_slots >= 1 && nvl_slots >= 1, op, "slot counts must be positive, got ", rdma_slots, ", ",
             nvl_slots);
  DSV3_CHECK(slot_bytes > 0 && slot_bytes % 16 == 0, op, "slot_bytes must be a positive multiple of 16, got ",
             slot_bytes);
  const InternodeLayout l =
      make_internode_layout(int(num_ranks), int(num_channels), int(rdma_slots), int(nvl_slots), slot_bytes);
  std::ostringstream os;
  os << "{\"num_ranks\": " << l.num_ranks << ", \"num_nodes\": " << l.num_nodes
     << ", \"num_channels\": " << l.num_channels << ", \"rdma_slots\": " << l.rdma_slots
     << ", \"nvl_slots\": " << l.nvl_slots << ", \"slot_bytes\": " << l.slot_bytes
     << ", \"barrier\": " << l.barrier << ", \"reset_begin\": " << l.reset_begin
     << ", \"notify_arrival\": " << l.notify_arrival << ", \"rdma_meta\": " << l.rdma_meta
     << ", \"rdma_head\": " << l.rdma_head << ", \"rdma_flag\": " << l.rdma_flag
     << ", \"nvl_meta\": " << l.nvl_meta << ", \"nvl_head\": " << l.nvl_head
     << ", \"nvl_flag\": " << l.nvl_flag << ", \"reset_end\": " << l.reset_end
     << ", \"notify_send\": " << l.notify_send << ", \"notify_recv\": " << l.notify_recv
     << ", \"notify_record_bytes\": " << l.notify_record_bytes << ", \"rdma_send\": " << l.rdma_send
     << ", \"rdma_recv\": " << l.rdma_recv << ", \"nvl_recv\": " << l.nvl_recv
     << ", \"total_bytes\": " << l.total_bytes << "}";
  return os.str();
}

// Returns, per rank, [rdma_channel_prefix_matrix [N, C], gbl_channel_prefix_matrix [R, C],
// recv_rdma_rank_prefix_sum [N], recv_gbl_rank_prefix_sum [R], recv_rdma_channel_prefix_matrix [N, C],
// recv_gbl_channel_prefix_matrix [R, C], send_rdma_head [n, N], send_nvl_head [num_rdma_recv, 8],
// recv_src [num_recv, 2] (source rank, source token)], flattened rank-major (9 tensors per rank).
std::vector<at::Tensor> internode_plan(const at::Tensor& is_token_in_rank_in, int64_t num_channels) {
  constexpr const char* op = "ep_internode_plan";
  DSV3_CHECK_TYPE(is_token_in_rank_in.scalar_type() == at::kBool, op, "is_token_in_rank must be bool");
  DSV3_CHECK(is_token_in_rank_in.dim() == 3 && is_token_in_rank_in.size(0) == is_token_in_rank_in.size(2), op,
             "is_token_in_rank must be [R, n, R] (every rank's), got ", is_token_in_rank_in.sizes());
  const int R = int(is_token_in_rank_in.size(0)), n = int(is_token_in_rank_in.size(1)), C = int(num_channels);
  check_geometry(op, R, C);
  const int N = R / kP;
  const at::Tensor in_rank = is_token_in_rank_in.cpu().contiguous();
  const bool* all = in_rank.data_ptr<bool>();
  auto row_of = [&](int s, int t) { return all + (int64_t(s) * n + t) * R; };
  auto ints = [](std::initializer_list<int64_t> shape) { return at::zeros(shape, at::kInt); };

  // Sender side (the channel-prefix kernel): counts per channel, inclusive over channels.
  std::vector<at::Tensor> rdma_cpm(R), gbl_cpm(R), send_rdma_head(R);
  for (int s = 0; s < R; ++s) {
    rdma_cpm[s] = ints({N, C});
    gbl_cpm[s] = ints({R, C});
    send_rdma_head[s] = at::full({n, N}, -1, at::kInt);
    int* rc = rdma_cpm[s].data_ptr<int>();
    int* gc = gbl_cpm[s].data_ptr<int>();
    int* head = send_rdma_head[s].data_ptr<int>();
    for (int c = 0; c < C; ++c) {
      const TokenRange range = channel_token_range(n, C, c);
      for (int p = 0; p < N; ++p) {
        int pos = 0;  // the RDMA queue (c, s -> node p) gets the channel's tokens in token order
        for (int t = range.begin; t < range.end; ++t)
          if (node_bits(row_of(s, t), p) != 0) head[int64_t(t) * N + p] = pos++;
        rc[p * C + c] = prefix_before(rc, C, p, c) + pos;
      }
      for (int r = 0; r < R; ++r) {
        int count = 0;
        for (int t = range.begin; t < range.end; ++t) count += row_of(s, t)[r];
        gc[r * C + c] = prefix_before(gc, C, r, c) + count;
      }
    }
  }
  // Notify: the prefix sums over sources.
  std::vector<at::Tensor> rrps(R), rgps(R);
  for (int r = 0; r < R; ++r) {
    rrps[r] = ints({N});
    rgps[r] = ints({R});
    int sum = 0;
    for (int m = 0; m < N; ++m)
      rrps[r].data_ptr<int>()[m] = sum += rdma_cpm[m * kP + r % kP].data_ptr<int>()[(r / kP) * C + C - 1];
    sum = 0;
    for (int s = 0; s < R; ++s) rgps[r].data_ptr<int>()[s] = sum += gbl_cpm[s].data_ptr<int>()[r * C + C - 1];
  }
  // Forwarders and receivers (the dispatch kernel's order).
  std::vector<at::Tensor> rrcpm(R), rgcpm(R), send_nvl_head(R), recv_src(R);
  for (int r = 0; r < R; ++r) {
    rrcpm[r] = ints({N, C});
    rgcpm[r] = ints({R, C});
    send_nvl_head[r] = at::full({rrps[r].data_ptr<int>()[N - 1], kP}, -1, at::kInt);
    recv_src[r] = at::full({rgps[r].data_ptr<int>()[R - 1], 2}, -1, at::kInt);
  }
  for (int fwd = 0; fwd < R; ++fwd) {
    const int node = fwd / kP, f = fwd % kP;
    for (int c = 0; c < C; ++c) {
      int nvl_pos[kP] = {};
      for (int m = 0; m < N; ++m) {
        const int s = m * kP + f;
        const int* rc = rdma_cpm[s].data_ptr<int>();
        const uint64_t rdma_word = pack_range(prefix_before(rc, C, node, c), rc[node * C + c]);
        rrcpm[fwd].data_ptr<int>()[m * C + c] = range_end(rdma_word);
        const int first = (m > 0 ? rrps[fwd].data_ptr<int>()[m - 1] : 0) + range_start(rdma_word);
        const TokenRange range = channel_token_range(n, C, c);
        int i = 0;
        for (int t = range.begin; t < range.end; ++t) {
          const uint32_t bits = node_bits(row_of(s, t), node);
          if (bits == 0) continue;
          for (int j = 0; j < kP; ++j)
            if (bits >> j & 1) send_nvl_head[fwd].data_ptr<int>()[int64_t(first + i) * kP + j] = nvl_pos[j]++;
          ++i;
        }
        for (int j = 0; j < kP; ++j) {  // receiver node * 8 + j: the rows of (s, c) it gets through fwd
          const int dst = node * kP + j;
          const int* gc = gbl_cpm[s].data_ptr<int>();
          const uint64_t word = pack_range(prefix_before(gc, C, dst, c), gc[dst * C + c]);
          const int base = (s > 0 ? rgps[dst].data_ptr<int>()[s - 1] : 0) + range_start(word);
          rgcpm[dst].data_ptr<int>()[s * C + c] = base + range_end(word) - range_start(word);
          int row = base;
          for (int t = range.begin; t < range.end; ++t) {
            if (!row_of(s, t)[dst]) continue;
            recv_src[dst].data_ptr<int>()[row * 2] = s;
            recv_src[dst].data_ptr<int>()[row * 2 + 1] = t;
            ++row;
          }
        }
      }
    }
  }
  std::vector<at::Tensor> out;
  for (int r = 0; r < R; ++r) {
    for (const at::Tensor& t : {rdma_cpm[r], gbl_cpm[r], rrps[r], rgps[r], rrcpm[r], rgcpm[r],
                                send_rdma_head[r], send_nvl_head[r], recv_src[r]})
      out.push_back(t);
  }
  return out;
}

// The combine's view of the same handles: for every received row of rank r, the (forwarder token index,
// position in the NVLink stream to the forwarder) the combine kernels pair it with, via gbl_row_range and
// rdma_token_range ([num_recv, 2]; -1 where the handles do not pair the row).
at::Tensor internode_combine_pairs(const at::Tensor& recv_gbl_channel_prefix_matrix,
                                   const at::Tensor& recv_rdma_channel_prefix_matrix_all,
                                   const at::Tensor& recv_rdma_rank_prefix_sum_all,
                                   const at::Tensor& send_nvl_head_all, int64_t rank) {
  constexpr const char* op = "ep_internode_combine_pairs";
  const at::Tensor rgcpm = recv_gbl_channel_prefix_matrix.cpu().to(at::kInt).contiguous();
  DSV3_CHECK(rgcpm.dim() == 2, op, "recv_gbl_channel_prefix_matrix must be [R, C]");
  const int R = int(rgcpm.size(0)), C = int(rgcpm.size(1));
  check_geometry(op, R, C);
  const int N = R / kP, node = int(rank) / kP, local = int(rank) % kP;
  DSV3_CHECK(rank >= 0 && rank < R, op, "rank must be in [0, ", R, "), got ", rank);
  const at::Tensor rrcpm = recv_rdma_channel_prefix_matrix_all.cpu().to(at::kInt).contiguous();
  const at::Tensor rrps = recv_rdma_rank_prefix_sum_all.cpu().to(at::kInt).contiguous();
  const at::Tensor nvl = send_nvl_head_all.cpu().to(at::kInt).contiguous();
  DSV3_CHECK(rrcpm.dim() == 3 && rrcpm.size(0) == R && rrcpm.size(1) == N && rrcpm.size(2) == C, op,
             "recv_rdma_channel_prefix_matrix_all must be [R, N, C]");
  DSV3_CHECK(rrps.dim() == 2 && rrps.size(0) == R && rrps.size(1) == N, op,
             "recv_rdma_rank_prefix_sum_all must be [R, N]");
  DSV3_CHECK(nvl.dim() == 3 && nvl.size(0) == R && nvl.size(2) == kP, op,
             "send_nvl_head_all must be [R, rows, 8]");
  const int* g = rgcpm.data_ptr<int>();
  const int num_recv = g[R * C - 1];
  at::Tensor out = at::full({num_recv, 2}, -1, at::kInt);
  for (int f = 0; f < kP; ++f) {
    const int fwd = node * kP + f;
    const int* fr = rrcpm.data_ptr<int>() + int64_t(fwd) * N * C;
    const int* fp = rrps.data_ptr<int>() + int64_t(fwd) * N;
    const int* head = nvl.data_ptr<int>() + int64_t(fwd) * nvl.size(1) * kP;
    for (int c = 0; c < C; ++c) {
      // The NVLink sender's stream to fwd: rows of (m*8 + f, c), m ascending (combine_nvl_send).
      std::vector<int> rows;
      for (int m = 0; m < N; ++m) {
        const RowRange rr = gbl_row_range(g, C, m * kP + f, c);
        for (int row = rr.begin; row < rr.end; ++row) rows.push_back(row);
      }
      // The forwarder's reads: token by token, position send_nvl_head[token, local] (combine_forward).
      for (int m = 0; m < N; ++m) {
        const RowRange tokens = rdma_token_range(fr, fp, C, m, c);
        for (int token = tokens.begin; token < tokens.end && token < nvl.size(1); ++token) {
          const int q = head[int64_t(token) * kP + local];
          if (q >= 0 && q < int(rows.size())) {
            out.data_ptr<int>()[int64_t(rows[q]) * 2] = token;
            out.data_ptr<int>()[int64_t(rows[q]) * 2 + 1] = q;
          }
        }
      }
    }
  }
  return out;
}

}  // namespace
}  // namespace dsv3::ep

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def(
      "ep_internode_layout(int num_ranks, int num_channels, int rdma_slots, int nvl_slots, int slot_bytes) "
      "-> str",
      &dsv3::ep::internode_layout_json);
  m.def("ep_internode_plan(Tensor is_token_in_rank, int num_channels) -> Tensor[]",
        &dsv3::ep::internode_plan);
  m.def(
      "ep_internode_combine_pairs(Tensor recv_gbl_channel_prefix_matrix, Tensor "
      "recv_rdma_channel_prefix_matrix_all, "
      "Tensor recv_rdma_rank_prefix_sum_all, Tensor send_nvl_head_all, int rank) -> Tensor",
      &dsv3::ep::internode_combine_pairs);
}
