# Locates the installed torch through its Python package rather than find_package(Torch): that config
# needs a full CUDA toolkit for a CUDA torch, and the extension only needs headers and a few libraries.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "
import torch, torch.utils.cpp_extension as ext, os
print(torch.__version__.split('+')[0])
print('|'.join(ext.include_paths()))
print(os.path.join(os.path.dirname(torch.__file__), 'lib'))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.version.cuda or '')
"
  OUTPUT_VARIABLE _torch_info OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _torch_rc)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "dsv3 needs torch installed in the build environment (build with "
                      "`pip install --no-build-isolation .` after installing torch)")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 TORCH_VERSION)
list(GET _torch_info 1 TORCH_INCLUDE_DIRS)
list(GET _torch_info 2 TORCH_LIB_DIR)
list(GET _torch_info 3 _torch_cxx11_abi)
list(LENGTH _torch_info _n)
set(TORCH_CUDA_VERSION "")
if(_n GREATER 4)
  list(GET _torch_info 4 TORCH_CUDA_VERSION)
endif()
string(REPLACE "|" ";" TORCH_INCLUDE_DIRS "${TORCH_INCLUDE_DIRS}")
message(STATUS "dsv3: torch ${TORCH_VERSION} (CUDA: '${TORCH_CUDA_VERSION}') at ${TORCH_LIB_DIR}")

set(TORCH_DEFINITIONS _GLIBCXX_USE_CXX11_ABI=${_torch_cxx11_abi} TORCH_EXTENSION_NAME=_C)
find_library(TORCH_C10_LIB c10 PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
find_library(TORCH_CPU_LIB torch_cpu PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
find_library(TORCH_LIB torch PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
set(TORCH_LIBS ${TORCH_C10_LIB} ${TORCH_CPU_LIB} ${TORCH_LIB})

# ATen's parallel_for is an inline OpenMP region in torch's x86 builds: compile with -fopenmp and bind to
# the libgomp that torch ships (same SONAME, so the already-loaded runtime and its thread pool are reused).
find_library(TORCH_GOMP_LIB NAMES libgomp.so.1 gomp PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH)
if(TORCH_GOMP_LIB)
  set(TORCH_OPENMP_FLAGS -fopenmp)
  set(TORCH_OPENMP_LIBS ${TORCH_GOMP_LIB})
else()
  find_package(OpenMP COMPONENTS CXX)
  if(OpenMP_CXX_FOUND)
    set(TORCH_OPENMP_FLAGS ${OpenMP_CXX_FLAGS})
    set(TORCH_OPENMP_LIBS OpenMP::OpenMP_CXX)
  endif()
endif()
