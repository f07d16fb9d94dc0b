# Decides whether the CUDA kernels are built (DSV3_CUDA = auto | on | off) and sets them up for the
# requested archs with explicit -gencode flags (sm_90a needs the "a" variant for wgmma/setmaxnreg).
set(DSV3_WITH_CUDA OFF)
set(DSV3_CUDA_SOURCES "")
set(DSV3_CUDA_ARCHS_STR "")

function(dsv3_cuda_skip reason)
  if(DSV3_CUDA STREQUAL "on")
    message(FATAL_ERROR "dsv3: DSV3_CUDA=on but ${reason}")
  endif()
  message(STATUS "dsv3: CUDA kernels skipped: ${reason} (DSV3_CUDA=${DSV3_CUDA})")
endfunction()

if(DSV3_CUDA STREQUAL "off")
  message(STATUS "dsv3: CUDA kernels skipped: DSV3_CUDA=off")
  return()
endif()
if(TORCH_CUDA_VERSION STREQUAL "")
  dsv3_cuda_skip("the installed torch ${TORCH_VERSION} is a CPU-only build")
  return()
endif()

if(NOT CMAKE_CUDA_COMPILER)
  find_program(_nvcc nvcc HINTS "$ENV{CUDA_HOME}/bin" "$ENV{CUDA_PATH}/bin" /usr/local/cuda/bin)
  if(NOT _nvcc)
    dsv3_cuda_skip("nvcc was not found (set CUDA_HOME or CMAKE_CUDA_COMPILER)")
    return()
  endif()
  set(CMAKE_CUDA_COMPILER "${_nvcc}")
endif()
execute_process(COMMAND "${CMAKE_CUDA_COMPILER}" --version OUTPUT_VARIABLE _nvcc_out RESULT_VARIABLE _nvcc_rc)
string(REGEX MATCH "release ([0-9]+)\\.([0-9]+)" _m "${_nvcc_out}")
if(NOT _nvcc_rc EQUAL 0 OR NOT _m)
  dsv3_cuda_skip("${CMAKE_CUDA_COMPILER} --version failed")
  return()
endif()
set(DSV3_NVCC_VERSION "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
if(DSV3_NVCC_VERSION VERSION_LESS 12.8)
  dsv3_cuda_skip("nvcc ${DSV3_NVCC_VERSION} is older than 12.8")
  return()
endif()

get_filename_component(_cuda_bin "${CMAKE_CUDA_COMPILER}" DIRECTORY)
get_filename_component(_cuda_root "${_cuda_bin}" DIRECTORY)
set(CUDAToolkit_ROOT "${_cuda_root}")
set(CMAKE_CUDA_ARCHITECTURES OFF)
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

set(_gencode "")
foreach(_arch IN LISTS DSV3_CUDA_ARCHS)
  string(REGEX REPLACE "^sm_" "" _arch "${_arch}")
  list(APPEND _gencode "-gencode=arch=compute_${_arch},code=sm_${_arch}")
  list(APPEND _names "sm_${_arch}")
endforeach()
string(JOIN "," DSV3_CUDA_ARCHS_STR ${_names})
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
string(JOIN " " _gencode_str ${_gencode})
set(CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS} ${_gencode_str} --expt-relaxed-constexpr -lineinfo")

find_library(TORCH_C10_CUDA_LIB c10_cuda PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
find_library(TORCH_CUDA_LIB torch_cuda PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
set(TORCH_CUDA_LIBS ${TORCH_C10_CUDA_LIB} ${TORCH_CUDA_LIB})

set(DSV3_CUDA_SOURCES
    csrc/cuda/quant.cu
    csrc/cuda/quant_host.cpp
    csrc/cuda/fp8_gemm.cu
    csrc/cuda/fp8_gemm_host.cpp
    csrc/cuda/mla_decode.cu
    csrc/cuda/mla_decode_host.cpp
    csrc/cuda/moe_route.cu
    csrc/cuda/moe_route_host.cpp
    csrc/cuda/ep_intranode.cu
    csrc/cuda/ep_intranode_host.cpp
    csrc/cuda/ep_layout.cu
    csrc/cuda/ep_layout_host.cpp
    csrc/cuda/ep_combine.cu
    csrc/cuda/ep_combine_host.cpp)
set(DSV3_WITH_CUDA ON)
message(STATUS "dsv3: CUDA kernels enabled: nvcc ${DSV3_NVCC_VERSION}, archs ${DSV3_CUDA_ARCHS_STR}")
