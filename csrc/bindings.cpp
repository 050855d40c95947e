// Python bindings of flix_kernels._C (pybind11). Tensors cross as plain integers: device pointers,
// sizes and strides in elements, dtype codes (0 fp32, 1 fp16, 2 bf16), the device index and the CUDA
// stream handle. flix_kernels/cuda/launch.py builds these from torch tensors after validating them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <string>
#include <tuple>

#include "flix.h"
#include "philox.h"

namespace py = pybind11;

namespace {

// (pointer, rows, cols, stride0, stride1, dtype)
using MatrixArg = std::tuple<uintptr_t, int64_t, int64_t, int64_t, int64_t, int>;
// (slot_rank, slot_feature, cu_seqlens or 0, num_examples, slots, seq_len)
using RoutingArg = std::tuple<uintptr_t, uintptr_t, uintptr_t, int32_t, int32_t, int32_t>;
// (pair_example, pair_slot, feature_pair_start, rank_offsets, num_features, max_feature_rank)
using PairsArg = std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t, int32_t, int32_t>;
// (seed pointer or 0, p)
using DropoutArg = std::tuple<uintptr_t, float>;

template <typename T>
const T* ptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }

flix::DType dtype(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("flix_kernels._C: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  return static_cast<flix::DType>(code);
}

flix::Matrix matrix(const MatrixArg& a) {
  flix::Matrix m;
  m.data = reinterpret_cast<const void*>(std::get<0>(a));
  m.rows = std::get<1>(a);
  m.cols = std::get<2>(a);
  m.stride0 = std::get<3>(a);
  m.stride1 = std::get<4>(a);
  m.dtype = dtype(std::get<5>(a));
  if (m.rows < 0 || m.cols < 0) throw std::invalid_argument("flix_kernels._C: negative matrix size");
  return m;
}

flix::Routing routing(const RoutingArg& a) {
  flix::Routing r;
  r.slot_rank = ptr<int32_t>(std::get<0>(a));
  r.slot_feature = ptr<int32_t>(std::get<1>(a));
  r.cu_seqlens = ptr<int32_t>(std::get<2>(a));
  r.num_examples = std::get<3>(a);
  r.slots = std::get<4>(a);
  r.seq_len = std::get<5>(a);
  return r;
}

flix::Pairs pairs(const PairsArg& a) {
  flix::Pairs p;
  p.pair_example = ptr<int32_t>(std::get<0>(a));
  p.pair_slot = ptr<int32_t>(std::get<1>(a));
  p.feature_pair_start = ptr<int32_t>(std::get<2>(a));
  p.rank_offsets = ptr<int32_t>(std::get<3>(a));
  p.num_features = std::get<4>(a);
  p.max_feature_rank = std::get<5>(a);
  return p;
}

flix::Dropout dropout(const DropoutArg& a) {
  flix::Dropout d;
  d.seed = ptr<int64_t>(std::get<0>(a));
  d.p = std::get<1>(a);
  if (d.seed != nullptr && !(d.p >= 0.0f && d.p < 1.0f)) throw std::invalid_argument("flix_kernels._C: dropout p must be in [0, 1)");
  return d;
}

flix::Tile tile(int code) {
  if (code != 0 && code != 1) throw std::invalid_argument("flix_kernels._C: tile must be 0 (small) or 1 (large)");
  return static_cast<flix::Tile>(code);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flix_kernels CUDA kernels (raw launchers; use flix_kernels.cuda.launch, which validates tensors)";

  m.def(
      "shrink",
      [](const MatrixArg& x, const MatrixArg& factor, uintptr_t h, uintptr_t workspace, int splits,
         const RoutingArg& r, uintptr_t scaling, float scale, const DropoutArg& d, int t, int device,
         uintptr_t stream) {
        flix::shrink(matrix(x), matrix(factor), reinterpret_cast<float*>(h), reinterpret_cast<float*>(workspace),
                     splits, routing(r), ptr<float>(scaling), scale, dropout(d), tile(t), device, stream);
      },
      py::arg("x"), py::arg("factor"), py::arg("h"), py::arg("workspace"), py::arg("splits"), py::arg("routing"),
      py::arg("scaling"), py::arg("scale"), py::arg("dropout"), py::arg("tile"), py::arg("device"), py::arg("stream"));

  m.def(
      "expand",
      [](const MatrixArg& h, const MatrixArg& factor, const MatrixArg& y, bool accumulate, const RoutingArg& r,
         const DropoutArg& d, int t, int device, uintptr_t stream) {
        flix::expand(matrix(h), matrix(factor), matrix(y), accumulate, routing(r), dropout(d), tile(t), device, stream);
      },
      py::arg("h"), py::arg("factor"), py::arg("y"), py::arg("accumulate"), py::arg("routing"), py::arg("dropout"),
      py::arg("tile"), py::arg("device"), py::arg("stream"));

  m.def(
      "weight_grad",
      [](const MatrixArg& l, const MatrixArg& r, const MatrixArg& g, const RoutingArg& rt, const PairsArg& p,
         uintptr_t workspace, int chunks, int chunk, const DropoutArg& d, int t, int device, uintptr_t stream) {
        flix::weight_grad(matrix(l), matrix(r), matrix(g), routing(rt), pairs(p), reinterpret_cast<float*>(workspace),
                          chunks, chunk, dropout(d), tile(t), device, stream);
      },
      py::arg("l"), py::arg("r"), py::arg("g"), py::arg("routing"), py::arg("pairs"), py::arg("workspace"),
      py::arg("chunks"), py::arg("chunk"), py::arg("dropout"), py::arg("tile"), py::arg("device"), py::arg("stream"));

  m.def(
      "keep_mask",
      [](int64_t seed, int64_t T, int64_t K, float p) {
        if (T < 0 || K < 0 || T >= (int64_t{1} << 32) || K >= (int64_t{1} << 32))
          throw std::invalid_argument("keep_mask: T and K must be in [0, 2**32)");
        std::string out(static_cast<size_t>(T * K), '\0');
        for (int64_t t = 0; t < T; ++t)
          for (int64_t k = 0; k < K; ++k)
            out[t * K + k] = flix::keep_element(static_cast<uint64_t>(seed), static_cast<uint32_t>(t),
                                                static_cast<uint32_t>(k), p);
        return py::bytes(out);
      },
      py::arg("seed"), py::arg("T"), py::arg("K"), py::arg("p"),
      "The (T, K) dropout keep-mask of `seed`, computed on the host with the kernels' own Philox code "
      "(row-major bytes, 1 = kept).");

  m.def(
      "device_count",
      []() -> std::tuple<int, std::string> {
        int n = 0;
        const cudaError_t err = cudaGetDeviceCount(&n);
        if (err != cudaSuccess) {
          cudaGetLastError();  // clear it: not a launch error of ours
          return {0, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err)};
        }
        return {n, std::string()};
      },
      "(number of CUDA devices, why none: the CUDA error, or '').");

  m.def("build_info", []() {
    py::dict info;
    info["archs"] = flix::build_archs();
    info["cuda_runtime"] = flix::cuda_runtime_version();
    info["compiler"] = flix::compiler_version();
    info["flags"] = flix::build_flags();
    info["cudart"] = "static";
    int driver = 0;
    info["driver"] = cudaDriverGetVersion(&driver) == cudaSuccess ? driver : 0;
    return info;
  });
}
