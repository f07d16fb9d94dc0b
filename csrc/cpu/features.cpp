// Run-time choice of the CPU code path: AVX-512 (with BF16 and FP16 extensions) when the CPU has it,
// else portable C++. DSV3_CPU_PATH=portable|avx512 and torch.ops.dsv3.set_cpu_path override it.
#include "dsv3/cpu_features.h"

#include <atomic>
#include <cstdlib>

#include "dsv3/checks.h"

namespace dsv3::cpu {
namespace {

CpuPath default_path() {
  const char* env = std::getenv("DSV3_CPU_PATH");
  if (env != nullptr && std::string(env) == "portable") return CpuPath::kPortable;
  return cpu_supports_avx512() ? CpuPath::kAvx512 : CpuPath::kPortable;
}

std::atomic<int>& path_slot() {
  static std::atomic<int> slot{static_cast<int>(default_path())};
  return slot;
}

}  // namespace

bool cpu_supports_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512fp16");
  }();
  return ok;
#else
  return false;
#endif
}

CpuPath active_cpu_path() { return static_cast<CpuPath>(path_slot().load(std::memory_order_relaxed)); }

std::string cpu_path_name(CpuPath path) { return path == CpuPath::kAvx512 ? "avx512" : "portable"; }

void set_cpu_path(const std::string& name) {
  CpuPath path;
  if (name == "auto") {
    path = cpu_supports_avx512() ? CpuPath::kAvx512 : CpuPath::kPortable;
  } else if (name == "portable") {
    path = CpuPath::kPortable;
  } else if (name == "avx512") {
    DSV3_CHECK(cpu_supports_avx512(), "set_cpu_path",
               "path 'avx512' needs AVX-512 F/BW/VL/DQ/BF16/FP16, which this CPU lacks");
    path = CpuPath::kAvx512;
  } else {
    DSV3_CHECK(false, "set_cpu_path", "path must be 'auto', 'avx512' or 'portable', got '", name, "'");
  }
  path_slot().store(static_cast<int>(path), std::memory_order_relaxed);
}

}  // namespace dsv3::cpu
