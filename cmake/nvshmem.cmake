# dsv3._C_nvshmem: the low-latency and internode EP kernels (csrc/cuda/ep_nvshmem/) on NVSHMEM, a module of its own so
# dsv3._C never depends on libnvshmem_host. Built only with the CUDA kernels and when NVSHMEM is found:
# NVSHMEM_DIR / NVSHMEM_HOME (cache or environment), else the `nvidia-nvshmem-cu13` wheel of the build's Python.
# NVSHMEM device code needs relocatable device code and a device link against libnvshmem_device.a.
if(NOT DSV3_WITH_CUDA)
  return()
endif()

set(NVSHMEM_DIR "" CACHE PATH "NVSHMEM install prefix (include/, lib/); empty: NVSHMEM_HOME or the wheel")
set(_nvshmem_candidates "${NVSHMEM_DIR}" "$ENV{NVSHMEM_DIR}" "$ENV{NVSHMEM_HOME}")
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import nvidia.nvshmem as m; print(list(m.__path__)[0])"
  OUTPUT_VARIABLE _nvshmem_wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _nvshmem_rc)
if(_nvshmem_rc EQUAL 0)
  list(APPEND _nvshmem_candidates "${_nvshmem_wheel}")
endif()

set(DSV3_NVSHMEM_ROOT "")
foreach(_dir IN LISTS _nvshmem_candidates)
  if(_dir AND EXISTS "${_dir}/include/nvshmem.h" AND EXISTS "${_dir}/lib/libnvshmem_device.a")
    file(GLOB _host_libs "${_dir}/lib/libnvshmem_host.so*")
    if(_host_libs)
      set(DSV3_NVSHMEM_ROOT "${_dir}")
      break()
    endif()
  endif()
endforeach()
if(NOT DSV3_NVSHMEM_ROOT)
  message(STATUS "dsv3: NVSHMEM not found: internode and low-latency EP kernels disabled")
  return()
endif()
# Wheels ship only the SONAME (libnvshmem_host.so.3); prefer the unversioned link name when present.
list(SORT _host_libs)
list(GET _host_libs 0 DSV3_NVSHMEM_HOST_LIB)
set(DSV3_NVSHMEM_LIB_DIR "${DSV3_NVSHMEM_ROOT}/lib")
message(STATUS "dsv3: NVSHMEM at ${DSV3_NVSHMEM_ROOT}: building dsv3._C_nvshmem")

add_library(dsv3_nvshmem_kernels STATIC csrc/cuda/ep_nvshmem/ll_kernels.cu csrc/cuda/ep_nvshmem/internode.cu)
target_include_directories(dsv3_nvshmem_kernels PRIVATE csrc/include "${DSV3_NVSHMEM_ROOT}/include")
target_link_libraries(dsv3_nvshmem_kernels PRIVATE "${DSV3_NVSHMEM_LIB_DIR}/libnvshmem_device.a")
set_target_properties(dsv3_nvshmem_kernels PROPERTIES
  CUDA_ARCHITECTURES OFF CUDA_SEPARABLE_COMPILATION ON CUDA_RESOLVE_DEVICE_SYMBOLS ON
  POSITION_INDEPENDENT_CODE ON)

Python_add_library(_C_nvshmem MODULE WITH_SOABI csrc/cuda/ep_nvshmem/host.cpp)
target_include_directories(_C_nvshmem PRIVATE csrc/include ${TORCH_INCLUDE_DIRS} ${CUDAToolkit_INCLUDE_DIRS}
                                              "${DSV3_NVSHMEM_ROOT}/include")
target_compile_definitions(_C_nvshmem PRIVATE _GLIBCXX_USE_CXX11_ABI=${_torch_cxx11_abi}
                                              TORCH_EXTENSION_NAME=_C_nvshmem)
target_compile_options(_C_nvshmem PRIVATE -Wall -Wextra -Wno-unused-parameter -fvisibility=hidden)
target_link_libraries(_C_nvshmem PRIVATE dsv3_nvshmem_kernels ${TORCH_LIBS} ${TORCH_CUDA_LIBS} CUDA::cudart
                                         "${DSV3_NVSHMEM_HOST_LIB}")
# The module finds libnvshmem_host at run time in the NVSHMEM it was built against, or, installed next to
# the wheel, in site-packages/nvidia/nvshmem/lib.
set_target_properties(_C_nvshmem PROPERTIES
  BUILD_RPATH_USE_ORIGIN ON
  BUILD_RPATH "${DSV3_NVSHMEM_LIB_DIR};\$ORIGIN/../nvidia/nvshmem/lib"
  INSTALL_RPATH "${DSV3_NVSHMEM_LIB_DIR};\$ORIGIN/../nvidia/nvshmem/lib")

install(TARGETS _C_nvshmem LIBRARY DESTINATION .)
