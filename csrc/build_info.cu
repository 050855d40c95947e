// Facts about this build, reported by flix_kernels.info() / `flix-kernels info`.
#include "common.cuh"

#ifndef FLIX_BUILD_ARCHS
#define FLIX_BUILD_ARCHS "unknown"
#endif
#ifndef FLIX_BUILD_FLAGS
#define FLIX_BUILD_FLAGS "unknown"
#endif
#ifndef FLIX_NVCC_VERSION
#define FLIX_NVCC_VERSION "unknown"
#endif

namespace flix {

const char* build_archs() { return FLIX_BUILD_ARCHS; }
int cuda_runtime_version() { return CUDART_VERSION; }
const char* compiler_version() { return "nvcc " FLIX_NVCC_VERSION; }
const char* build_flags() { return FLIX_BUILD_FLAGS; }

}  // namespace flix
