// Which CPU code path the kernels take: chosen once from the CPU's features, overridable for tests
// (torch.ops.dsv3.set_cpu_path) and by the DSV3_CPU_PATH environment variable (avx512 | portable).
#pragma once
#include <string>

namespace dsv3::cpu {

enum class CpuPath : int { kPortable = 0, kAvx512 = 1 };

bool cpu_supports_avx512();  // AVX-512 F/BW/VL/DQ + BF16 + FP16, checked with cpuid
CpuPath active_cpu_path();
std::string cpu_path_name(CpuPath path);
void set_cpu_path(const std::string& name);  // "avx512" | "portable" | "auto"; throws on unknown/unsupported

}  // namespace dsv3::cpu
