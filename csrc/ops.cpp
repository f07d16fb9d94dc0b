// The dsv3 operator library: TORCH_LIBRARY schemas and the CPU / CUDA / Meta registrations, nothing else.
// GEMMs write into a caller-provided `out` (DeepGEMM's convention); torch.compile functionalizes them.
#include <torch/library.h>

#include "dsv3/cpu_features.h"
#include "dsv3/ops.h"
#include "dsv3/sm90/fp8_gemm_plan.h"

TORCH_LIBRARY(dsv3, m) {
  m.def(
      "quantize_per_token_group(Tensor x, int group_size=128, bool ue8m0=False, bool col_major_scales=False)"
      " -> (Tensor, Tensor)");
  m.def(
      "dequantize_per_token_group(Tensor q, Tensor scales, int group_size=128, ScalarType? out_dtype=None)"
      " -> Tensor");
  m.def("quantize_per_block(Tensor w, int block_size=128, bool ue8m0=False) -> (Tensor, Tensor)");
  m.def(
      "dequantize_per_block(Tensor q, Tensor scale_inv, int block_size=128, ScalarType? out_dtype=None)"
      " -> Tensor");
  m.def("fp8_gemm_nt(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor(a!) out) -> ()");
  m.def(
      "m_grouped_fp8_gemm_nt_contiguous(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor m_indices, "
      "Tensor(a!) out) -> ()");
  m.def(
      "m_grouped_fp8_gemm_nt_masked(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor masked_m, "
      "int expected_m, Tensor(a!) out) -> ()");
  m.def("fp8_gemm_wgrad_nt(Tensor a, Tensor sa, Tensor b, Tensor sb, Tensor(a!) out) -> ()");
  m.def(
      "k_grouped_fp8_gemm_wgrad_nt(Tensor a, Tensor sa, Tensor b, Tensor sb, int[] ks, Tensor(a!) out) -> "
      "()");

  // MLA decode (SPEC §4): the split-KV schedule, then attention over the paged latent cache.
  m.def(
      "get_mla_decode_metadata(Tensor cache_seqlens, int num_q_tokens_per_head_k, int num_heads_k, "
      "int? num_sm_parts=None) -> (Tensor, Tensor)");
  m.def(
      "mla_decode(Tensor q, Tensor kv_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, "
      "float? softmax_scale=None, bool causal=False, Tensor? tile_scheduler_metadata=None, "
      "Tensor? num_splits=None) -> (Tensor, Tensor)");

  // MoE router (SPEC §5): sigmoid scores, group-limited top-k selection, normalized weights.
  m.def(
      "moe_route(Tensor logits, Tensor? bias, int top_k, int n_group=1, int topk_group=1, "
      "float routed_scaling_factor=1.0, bool norm_topk_prob=True) -> (Tensor, Tensor)");

  m.def("build_info() -> str", &dsv3::build_info);
  // The sm_90a FP8 GEMM plan (config, TMA parameters, tile order) as JSON: host logic, testable without a
  // GPU.
  m.def("sm90_gemm_plan(str kind, int m, int n, int k, int num_groups=1, int num_sms=132) -> str",
        &dsv3::sm90::gemm_plan_json);
  m.def("cpu_path() -> str", [] { return dsv3::cpu::cpu_path_name(dsv3::cpu::active_cpu_path()); });
  m.def("set_cpu_path(str path) -> ()", [](const std::string& path) { dsv3::cpu::set_cpu_path(path); });
}

#define DSV3_REGISTER_OPS(ns)                                                              \
  m.impl("quantize_per_token_group", &dsv3::ns::quantize_per_token_group);                 \
  m.impl("dequantize_per_token_group", &dsv3::ns::dequantize_per_token_group);             \
  m.impl("quantize_per_block", &dsv3::ns::quantize_per_block);                             \
  m.impl("dequantize_per_block", &dsv3::ns::dequantize_per_block);                         \
  m.impl("fp8_gemm_nt", &dsv3::ns::fp8_gemm_nt);                                           \
  m.impl("m_grouped_fp8_gemm_nt_contiguous", &dsv3::ns::m_grouped_fp8_gemm_nt_contiguous); \
  m.impl("m_grouped_fp8_gemm_nt_masked", &dsv3::ns::m_grouped_fp8_gemm_nt_masked);         \
  m.impl("fp8_gemm_wgrad_nt", &dsv3::ns::fp8_gemm_wgrad_nt);                               \
  m.impl("k_grouped_fp8_gemm_wgrad_nt", &dsv3::ns::k_grouped_fp8_gemm_wgrad_nt);           \
  m.impl("get_mla_decode_metadata", &dsv3::ns::get_mla_decode_metadata);                   \
  m.impl("mla_decode", &dsv3::ns::mla_decode);                                             \
  m.impl("moe_route", &dsv3::ns::moe_route);

TORCH_LIBRARY_IMPL(dsv3, CPU, m){DSV3_REGISTER_OPS(cpu)} TORCH_LIBRARY_IMPL(dsv3, Meta,
                                                                            m){DSV3_REGISTER_OPS(meta)}
#ifdef DSV3_WITH_CUDA
TORCH_LIBRARY_IMPL(dsv3, CUDA, m) {
  DSV3_REGISTER_OPS(cuda)
}
#endif
