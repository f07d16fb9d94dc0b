// The Python module `dsv3._C`: importing it loads this library, whose static initializers register the ops
// (csrc/ops.cpp). It also reports the build configuration for `dsv3 info`.
#include <Python.h>

#include <string>

#include "dsv3/cpu_features.h"
#include "dsv3/ops.h"

#ifndef DSV3_CUDA_ARCHS
#define DSV3_CUDA_ARCHS ""
#endif

namespace dsv3 {

std::string build_info() {
  std::string archs = DSV3_CUDA_ARCHS, archs_json = "[";
  for (size_t start = 0; start < archs.size();) {
    size_t end = archs.find(',', start);
    if (end == std::string::npos) end = archs.size();
    archs_json += (archs_json.size() > 1 ? ",\"" : "\"") + archs.substr(start, end - start) + "\"";
    start = end + 1;
  }
  archs_json += "]";
  return std::string("{\"version\":\"") + DSV3_VERSION + "\",\"torch\":\"" + DSV3_TORCH_VERSION +
         "\",\"cuda_archs\":" + archs_json + ",\"cpu_path\":\"" + cpu::cpu_path_name(cpu::active_cpu_path()) +
         "\",\"cpu_avx512\":" + (cpu::cpu_supports_avx512() ? "true" : "false") + "}";
}

}  // namespace dsv3

static PyModuleDef dsv3_module = {PyModuleDef_HEAD_INIT, "_C", "dsv3 operator library (torch.ops.dsv3)", -1,
                                  nullptr};

extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C() {
  return PyModule_Create(&dsv3_module);
}
