"""Backends of `dsv3.ep.Buffer`: one Python object per buffer that moves the rows. `Buffer` validates the
arguments, computes the layout (`get_dispatch_layout`) and builds the handles' tuples; a backend implements
the runtime calls below, with DeepEP's runtime semantics, and must give the same results as `torch`:

- `torch`   (backends/torch.py)   torch.distributed all_to_all_single; gloo (CPU) or NCCL (GPU); any R.
- `nvlink`  (backends/nvlink.py)  intranode CUDA kernels over CUDA-IPC-shared per-rank buffers; R in {2,4,8}.
- `nvshmem` (backends/nvshmem.py) internode (RDMA then NVLink forwarding) and low-latency (pure RDMA) kernels
                                  built against NVSHMEM; present only when dsv3._C_nvshmem was built.

Shapes: n tokens on this rank, H hidden, k top-k, R ranks, E experts, L = E // R local experts,
C = config.num_sms // 2 channels. Every int tensor is int32 unless said otherwise; topk_idx is int64.

Normal (intranode handle) mode
------------------------------
    intranode_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                       num_tokens_per_expert, cached_num_recv_tokens, cached_rank_prefix_matrix,
                       cached_channel_prefix_matrix, expert_alignment, num_worst_tokens, config)
      -> (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
          rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, send_head)

  x [n, H] bf16 (or float8_e4m3fn with x_scales [n, H/128] float32 / int32); topk_* None in cached mode
  (then num_tokens_per_rank / num_tokens_per_expert are None and the cached_* tensors are given).
  rank_prefix_matrix [R, R]: [i, j] = rows sent by sources 0..i to rank j (inclusive prefix over sources),
      identical on every rank.
  channel_prefix_matrix [R, C] (sender side): [r, c] = rows of this rank's channels 0..c sent to rank r
      (inclusive), channel c = tokens [min(c*ceil(n/C), n), min((c+1)*ceil(n/C), n)).
  recv_channel_prefix_matrix [R, C] (receiver side): [s, c] = first recv row of source s's channel c
      (rows of sources < s, then rows of s's channels < c).
  recv_src_idx [num_recv]: source token index of each received row.
  send_head [n, R]: backend-specific bookkeeping for combine (torch: the row's index within this rank's
      block at the destination, -1 where not sent).
  Received rows are ordered by source rank, then source token index. recv_topk_idx [num_recv, k] int64 holds
  local expert ids (e - rank*L) or -1; recv_topk_weights float32, 0 where recv_topk_idx is -1.
  num_recv_tokens_per_expert_list: python list of L ints, each rounded up to expert_alignment; empty when
  num_worst_tokens > 0, in which case every recv tensor has num_worst_tokens rows, tail idx -1 / weight 0 /
  x and src_idx unspecified.

    intranode_combine(x, topk_weights, bias_0, bias_1, src_idx, rank_prefix_matrix, channel_prefix_matrix,
                      send_head, config) -> (combined_x [n, H] bf16, combined_topk_weights [n, k] | None)

  As in DeepEP, combine reads the receive side of the handle: channel_prefix_matrix here is the handle's
  recv_channel_prefix_matrix (slot 2), src_idx its recv_src_idx (slot 3), send_head slot 5.
  x [num_recv, H] bf16 in dispatch order. combined[t] = bf16(float(bias_0[t]) + float(bias_1[t]) +
  sum over destination ranks r ascending with is_token_in_rank[t, r] of float(x row of t at r)); no top-k
  weighting. combined_topk_weights: the same fp32 sum of topk_weights rows.

Internode (nvshmem only; R = 8 * nodes, N = R / 8 nodes, rank = node * 8 + local) — DeepEP's 10-tuple handle
---------------------------------------------------------------------------------------------------------------
    internode_dispatch(x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, num_tokens_per_rdma_rank,
                       is_token_in_rank, num_tokens_per_expert, cached_num_recv_tokens,
                       cached_num_rdma_recv_tokens, cached_rdma_channel_prefix_matrix,
                       cached_recv_rdma_rank_prefix_sum, cached_gbl_channel_prefix_matrix,
                       cached_recv_gbl_rank_prefix_sum, expert_alignment, num_worst_tokens, config)
      -> (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
          rdma_channel_prefix_matrix, gbl_channel_prefix_matrix, recv_rdma_channel_prefix_matrix,
          recv_rdma_rank_prefix_sum, recv_gbl_channel_prefix_matrix, recv_gbl_rank_prefix_sum, recv_src_meta,
          send_rdma_head, send_nvl_head)

  A token crosses RDMA once per destination node, to the rank with the sender's local index there, which
  forwards it over NVLink. x, x_scales, topk_*, recv_* rows, num_worst_tokens as in intranode mode; every rank
  passes the same hidden size, dtype, k and scale count. Cached mode: topk_* and the counts are None and the
  cached_* values come from a previous dispatch's handle (its slots 1, 4, 2, 6 and the received row counts);
  only recv_x and recv_x_scales are returned, the rest None / [].
  rdma_channel_prefix_matrix [N, C] / gbl_channel_prefix_matrix [R, C] (sender side): tokens of this rank's
      channels 0..c going to node m (any of its ranks) / to rank r, inclusive.
  recv_rdma_rank_prefix_sum [N]: tokens received by RDMA from (node m, this local index), inclusive over m.
  recv_rdma_channel_prefix_matrix [N, C]: of those from node m, the ones of channels 0..c (inclusive).
  recv_gbl_rank_prefix_sum [R]: rows this rank receives from ranks 0..s (inclusive).
  recv_gbl_channel_prefix_matrix [R, C]: the END row (exclusive) of source s's channel-c block here (blocks
      ordered by source, then channel; a block starts where the previous one ends).
  recv_src_meta [num_recv, 8] uint8: int32 source rank, int32 is-in-rank bits of this rank's node.
  send_rdma_head [n, N]: position of token t in its channel's RDMA stream to node m, -1 if not sent there.
  send_nvl_head [num_rdma_recv, 8]: position of RDMA-received token i in the forwarder's NVLink stream to
      local rank j, -1 if j does not get it. Rows: num_rdma_recv = recv_rdma_rank_prefix_sum[-1]
      (num_worst_tokens with num_worst_tokens > 0).

    internode_combine(x, topk_weights, bias_0, bias_1, src_meta, is_combined_token_in_rank,
                      rdma_channel_prefix_matrix, rdma_rank_prefix_sum, gbl_channel_prefix_matrix,
                      combined_rdma_head, combined_nvl_head, config)
      -> (combined_x [n, H] bf16, combined_topk_weights [n, k] | None)

  Reads the receive side of the handle: rdma_channel_prefix_matrix = slot 3
  (recv_rdma_channel_prefix_matrix), rdma_rank_prefix_sum = slot 4, gbl_channel_prefix_matrix = slot 5
  (recv_gbl_channel_prefix_matrix), src_meta slot 7, combined_rdma_head slot 8 (send_rdma_head),
  combined_nvl_head slot 9, is_combined_token_in_rank slot 0. DeepEP's two roundings: each node sums its
  ranks' copies in fp32 (ranks ascending) and rounds to bf16 once; combined[t] = bf16(float(bias_0[t]) +
  float(bias_1[t]) + the node partials in node order, in fp32).
  combined_topk_weights: the fp32 sums of topk_weights the same way (no rounding between the levels).

Low-latency mode
----------------
    low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale,
                         use_ue8m0, return_recv_hook)
      -> (packed_recv_x, packed_recv_x_scales | None, packed_recv_count [L], packed_recv_src_info [L, R*T],
          packed_recv_layout_range [L, R] int64, hook | None)

  T = num_max_dispatch_tokens_per_rank. One row per (token, k) whose expert e >= 0 lives here, written to
  packed_recv_x[e - rank*L]; per expert the rows come in blocks per source rank (ascending), tokens
  ascending inside a block; layout_range[e, s] = (begin << 32) | count; src_info = source token index.
  use_fp8: x quantized per 1x128 group on the sender (dsv3.ops.quantize_per_token_group semantics; round_scale
  -> power-of-two scales, use_ue8m0 -> scales as UE8M0 bytes packed 4 per int32); scales returned as a
  column-major view [L, R*T, H/128] (float32) or [L, R*T, H/512] (int32). Rows past the counts are
  unspecified.

    low_latency_combine(x [L, R*T, H] bf16, topk_idx, topk_weights, src_info, layout_range,
                        num_max_dispatch_tokens_per_rank, num_experts, zero_copy, return_recv_hook, out)
      -> (combined_x [n, H] bf16, hook | None)

  combined[t] = bf16(sum over k = 0..K-1 in order, topk_idx[t, k] >= 0, of float(x row) * topk_weights[t, k]).

Errors: a peer that does not arrive within the buffer's timeout raises `dsv3.ep.EPTimeoutError` (a
RuntimeError) on the waiting ranks; bad arguments raise ValueError/TypeError naming the argument.
"""
