// CPU entries of MLA decode (SPEC §4): the split-KV schedule (dsv3/mla_sched.h, the same code the CUDA
// metadata kernel runs) and the decode op: validate, then one work item per (part, KV head, 64-row query
// tile) threaded with at::parallel_for, each attending its schedule's page ranges with the tile kernel of
// the active CPU path, then a combine over the requests that were split.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "dsv3/cpu_features.h"
#include "dsv3/mla_sched.h"
#include "dsv3/ops.h"
#include "dsv3/validate.h"
#include "mla_decode_kernel.h"

namespace dsv3::cpu {
namespace {

MlaType mla_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return MlaType::kF32;
    case at::kBFloat16:
      return MlaType::kBF16;
    case at::kHalf:
      return MlaType::kF16;
    default:
      return MlaType::kFp8Packed;
  }
}

template <class T>
void store_row(const float* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

void store_out_row(const at::Tensor& out, int64_t offset, const float* src, int64_t n) {
  switch (out.scalar_type()) {
    case at::kFloat:
      store_row(src, n, out.data_ptr<float>() + offset);
      break;
    case at::kBFloat16:
      store_row(src, n, out.data_ptr<at::BFloat16>() + offset);
      break;
    default:
      store_row(src, n, out.data_ptr<at::Half>() + offset);
      break;
  }
}

// 64-byte aligned per-thread scratch.
struct Scratch {
  std::vector<char> bytes;
  void* get(int64_t size) {
    if (static_cast<int64_t>(bytes.size()) < size + 64) bytes.resize(size + 64);
    const auto addr = reinterpret_cast<uintptr_t>(bytes.data());
    return bytes.data() + ((64 - addr % 64) % 64);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> get_mla_decode_metadata(const at::Tensor& cache_seqlens,
                                                           int64_t num_q_tokens_per_head_k,
                                                           int64_t num_heads_k,
                                                           std::optional<int64_t> num_sm_parts) {
  check_mla_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts);
  const int64_t parts = mla_cpu_parts(num_q_tokens_per_head_k, num_heads_k, num_sm_parts);
  auto [meta, num_splits] = alloc_mla_metadata(cache_seqlens, parts);
  const at::Tensor lens = cache_seqlens.contiguous();
  mla::build_schedule(lens.const_data_ptr<int32_t>(), static_cast<int32_t>(lens.size(0)),
                      static_cast<int32_t>(parts), meta.data_ptr<int32_t>(), num_splits.data_ptr<int32_t>());
  return {meta, num_splits};
}

std::tuple<at::Tensor, at::Tensor> mla_decode(const at::Tensor& q, const at::Tensor& kv_cache,
                                              const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                                              int64_t head_dim_v, std::optional<double> softmax_scale,
                                              bool causal,
                                              const std::optional<at::Tensor>& tile_scheduler_metadata,
                                              const std::optional<at::Tensor>& num_splits_in) {
  MlaDecodeDims d = check_mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                                     tile_scheduler_metadata, num_splits_in);
  check_mla_decode_contents(block_table, cache_seqlens, d);
  at::Tensor meta, num_splits;
  if (tile_scheduler_metadata) {
    meta = *tile_scheduler_metadata;
    num_splits = *num_splits_in;
    check_mla_schedule_contents(meta, num_splits, cache_seqlens, d);
  }
  auto [out, lse] = alloc_mla_decode(q, d);
  if (d.b == 0 || d.q_rows == 0) return {out, lse};
  if (!tile_scheduler_metadata) {
    std::tie(meta, num_splits) = get_mla_decode_metadata(cache_seqlens, d.q_rows, d.h_kv, std::nullopt);
    d.num_parts = meta.size(0);
  }

  const at::Tensor lens = cache_seqlens.contiguous();
  MlaProblem p;
  p.s_q = d.s_q;
  p.h_q = d.h_q;
  p.h_kv = d.h_kv;
  p.d_qk = d.d_qk;
  p.d_v = d.d_v;
  p.group = d.h_q / d.h_kv;
  p.q = q.const_data_ptr();
  p.q_sb = q.stride(0);
  p.q_ss = q.stride(1);
  p.q_sh = q.stride(2);
  p.q_type = mla_type(q.scalar_type());
  p.kv = kv_cache.const_data_ptr();
  p.kv_sp = kv_cache.stride(0);
  p.kv_st = kv_cache.stride(1);
  p.kv_sh = kv_cache.stride(2);
  p.kv_type = d.fp8_kv ? MlaType::kFp8Packed : mla_type(kv_cache.scalar_type());
  p.block_table = block_table.const_data_ptr<int32_t>();
  p.bt_stride = block_table.stride(0);
  p.seqlens = lens.const_data_ptr<int32_t>();
  p.scale_log2 = static_cast<float>(d.softmax_scale * 1.4426950408889634);
  p.causal = causal;

  const int32_t* ns = num_splits.const_data_ptr<int32_t>();
  const int32_t* mp = meta.const_data_ptr<int32_t>();
  const int64_t slots = ns[d.b], rows = d.q_rows, d_v = d.d_v;
  // Partials of split requests: O [slot, h_kv, rows, d_v] and lse [slot, h_kv, rows], fp32.
  at::Tensor o_acc = at::empty({slots, d.h_kv, rows, d_v}, q.options().dtype(at::kFloat));
  at::Tensor lse_acc = at::empty({slots, d.h_kv, rows}, q.options().dtype(at::kFloat));
  float* o_acc_p = o_acc.data_ptr<float>();
  float* lse_acc_p = lse_acc.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();

  const auto attend = active_cpu_path() == CpuPath::kAvx512 ? &mla_attend_avx512 : &mla_attend_portable;
  const int64_t tiles = ceil_div(rows, kMlaTileRows), per_part = d.h_kv * tiles;
  const int64_t scratch_bytes = mla_scratch_bytes(d.d_qk, d.d_v);
  const int64_t token_stride = d.h_q * d_v;  // out [b, s_q, h_q, d_v]

  at::parallel_for(0, d.num_parts * per_part, 1, [&](int64_t begin, int64_t end) {
    // Per-thread buffers kept across calls (ATen's threads persist): no allocation or page faults per call.
    thread_local Scratch scratch, final_rows;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t part = item / per_part, hk = (item % per_part) / tiles, tile = item % tiles;
      const int64_t r0 = tile * kMlaTileRows, r1 = std::min(rows, r0 + kMlaTileRows);
      const mla::PartMeta pm = mla::load_part(mp, part);
      for (int32_t req = pm.begin_req; req <= pm.end_req; ++req) {
        int32_t first = 0, last = 0;
        mla::part_block_range(pm, req, mla::num_blocks_of(p.seqlens[req]), &first, &last);
        const int64_t split = req == pm.begin_req ? pm.begin_split : 0;
        const bool whole = ns[req + 1] - ns[req] == 1;
        if (!whole) {  // a partial: straight into its slot
          const int64_t slot = ns[req] + split;
          attend(p, req, hk, r0, r1, first, last, o_acc_p + ((slot * d.h_kv + hk) * rows + r0) * d_v, d_v,
                 lse_acc_p + (slot * d.h_kv + hk) * rows + r0, scratch.get(scratch_bytes));
          continue;
        }
        float* o = static_cast<float*>(final_rows.get(4 * kMlaTileRows * (d_v + 1)));
        float* l = o + kMlaTileRows * d_v;
        attend(p, req, hk, r0, r1, first, last, o, d_v, l, scratch.get(scratch_bytes));
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t token = r / p.group, head = hk * p.group + r % p.group;
          store_out_row(out, (req * d.s_q + token) * token_stride + head * d_v, o + (r - r0) * d_v, d_v);
          const float v = l[r - r0];
          lse_p[(req * d.h_q + head) * d.s_q + token] = v == -INFINITY ? INFINITY : v;
        }
      }
    }
  });

  // Combine the split requests: weights exp(lse_i - max lse), out = sum_i w_i O_i / sum_i w_i.
  if (slots > d.b) {
    at::parallel_for(0, d.b * d.h_kv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(d_v), w;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t req = item / d.h_kv, hk = item % d.h_kv, n = ns[req + 1] - ns[req];
        if (n == 1) continue;
        w.resize(n);
        for (int64_t r = 0; r < rows; ++r) {
          float mx = -INFINITY;
          for (int64_t i = 0; i < n; ++i) {
            const float li = lse_acc_p[((ns[req] + i) * d.h_kv + hk) * rows + r];
            mx = (li > mx || li != li) ? li : mx;  // a NaN partial makes the row NaN
          }
          const int64_t token = r / p.group, head = hk * p.group + r % p.group;
          float* lse_out = lse_p + (req * d.h_q + head) * d.s_q + token;
          std::fill(acc.begin(), acc.end(), 0.f);
          if (mx == -INFINITY) {  // no split saw a key
            *lse_out = INFINITY;
          } else {
            float sum = 0.f;
            for (int64_t i = 0; i < n; ++i) {
              w[i] = std::exp(lse_acc_p[((ns[req] + i) * d.h_kv + hk) * rows + r] - mx);
              sum += w[i];
            }
            for (int64_t i = 0; i < n; ++i) {
              const float wi = w[i] / sum;
              if (wi == 0.f) continue;  // a split without keys holds O = 0
              const float* oi = o_acc_p + (((ns[req] + i) * d.h_kv + hk) * rows + r) * d_v;
              for (int64_t c = 0; c < d_v; ++c) acc[c] += wi * oi[c];
            }
            *lse_out = mx + std::log(sum);
          }
          store_out_row(out, (req * d.s_q + token) * token_stride + head * d_v, acc.data(), d_v);
        }
      }
    });
  }
  return {out, lse};
}

}  // namespace dsv3::cpu
