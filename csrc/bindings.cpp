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
// (per-feature scales pointer or 0, their dtype code, the scale of every feature when 0)
using ScalesArg = std::tuple<uintptr_t, int, float>;

template <typename T>
const T* ptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }

struct DecodePlan {
  flix::Routing routing;
  int64_t T = 0, K = 0, N = 0, R_total = 0;
  flix::DType act = flix::DType::f32, adapters = flix::DType::f32;
  int shrink_splits = 1, splits = 1, device = 0;
};

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

flix::Scales scales(const ScalesArg& a) {
  flix::Scales s;
  s.data = reinterpret_cast<const void*>(std::get<0>(a));
  s.dtype = dtype(std::get<1>(a));
  s.value = std::get<2>(a);
  return s;
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
      [](const MatrixArg& x, const MatrixArg& factor, uintptr_t h, uintptr_t workspace, uintptr_t counters,
         int splits, const RoutingArg& r, const ScalesArg& s, const DropoutArg& d, int t, int device,
         uintptr_t stream) {
        flix::shrink(matrix(x), matrix(factor), reinterpret_cast<float*>(h), reinterpret_cast<float*>(workspace),
                     reinterpret_cast<int*>(counters), splits, routing(r), scales(s), dropout(d), tile(t), device,
                     stream);
      },
      py::arg("x"), py::arg("factor"), py::arg("h"), py::arg("workspace"), py::arg("counters"), py::arg("splits"),
      py::arg("routing"), py::arg("scales"), py::arg("dropout"), py::arg("tile"), py::arg("device"), py::arg("stream"));

  m.attr("MAX_SPLIT_TILES") = flix::kMaxSplitTiles;
  m.attr("DECODE_TOKENS") = flix::kDecodeTokens;
  // The constants the Python side plans launches with, from their one definition in flix.h.
  auto shapes = [](const flix::BlockShape* s, int n) {
    py::list out;
    for (int i = 0; i < n; ++i) out.append(py::make_tuple(s[i].rows, s[i].cols, s[i].k));
    return out;
  };
  py::dict tiles;
  tiles["shrink"] = shapes(flix::kShrinkBlock, 2);
  tiles["expand"] = shapes(flix::kExpandBlock, 2);
  tiles["weight_grad"] = shapes(flix::kWeightGradBlock, 2);
  tiles["decode"] = shapes(&flix::kDecodeBlock, 1);
  m.attr("TILES") = tiles;
  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(flix::DType::f32);
  dtypes["float16"] = static_cast<int>(flix::DType::f16);
  dtypes["bfloat16"] = static_cast<int>(flix::DType::bf16);
  m.attr("DTYPE_CODES") = dtypes;

  // The decode path's fixed arguments, packed once per routing and layer shape (flix_kernels.cuda.launch.
  // DecodePlan): each call then passes only the tensors' pointers and row strides, positionally.
  py::class_<DecodePlan>(m, "DecodePlan")
      .def(py::init([](const RoutingArg& r, int64_t T, int64_t K, int64_t N, int64_t R_total, int act, int adapters,
                       int shrink_splits, int splits, int device) {
             DecodePlan p;
             p.routing = routing(r);
             p.T = T, p.K = K, p.N = N, p.R_total = R_total;
             p.act = dtype(act), p.adapters = dtype(adapters);
             p.shrink_splits = shrink_splits, p.splits = splits, p.device = device;
             if (T < 0 || K < 0 || N < 0 || R_total < 0 || shrink_splits < 1 || splits < 1)
               throw std::invalid_argument("flix_kernels._C.DecodePlan: negative size or splits < 1");
             return p;
           }),
           py::arg("routing"), py::arg("T"), py::arg("K"), py::arg("N"), py::arg("R_total"), py::arg("act"),
           py::arg("adapters"), py::arg("shrink_splits"), py::arg("splits"), py::arg("device"));

  // Pointers as ints, strides in elements; the factors are A (R_total x K) and the expand factor M (R_total x N).
  m.def(
      "decode_linear",
      [](const DecodePlan& p, uintptr_t x, int64_t sx, uintptr_t w, int64_t sw, uintptr_t bias, uintptr_t a,
         int64_t sar, int64_t sak, uintptr_t mf, int64_t smr, int64_t smn, uintptr_t y, uintptr_t h,
         uintptr_t shrink_ws, uintptr_t ws, uintptr_t counters, const ScalesArg& s, const DropoutArg& drop,
         uintptr_t stream) {
    flix::DecodeLinear d;
    d.x = matrix({x, p.T, p.K, sx, 1, static_cast<int>(p.act)});
    d.w = matrix({w, p.N, p.K, sw, 1, static_cast<int>(p.act)});
    d.a = matrix({a, p.R_total, p.K, sar, sak, static_cast<int>(p.adapters)});
    d.m = matrix({mf, p.R_total, p.N, smr, smn, static_cast<int>(p.adapters)});
    d.y = matrix({y, p.T, p.N, p.N, 1, static_cast<int>(p.act)});
    d.bias = reinterpret_cast<const void*>(bias);
    d.h = reinterpret_cast<float*>(h);
    d.shrink_workspace = reinterpret_cast<float*>(shrink_ws);
    d.shrink_splits = p.shrink_splits;
    d.workspace = reinterpret_cast<float*>(ws);
    d.splits = p.splits;
    d.counters = reinterpret_cast<int*>(counters);
    d.scales = scales(s);
    d.dropout = dropout(drop);
    flix::decode_linear(d, p.routing, p.device, stream);
      },
      py::arg("plan"), py::arg("x"), py::arg("sx"), py::arg("w"), py::arg("sw"), py::arg("bias"), py::arg("a"),
      py::arg("sar"), py::arg("sak"), py::arg("m"), py::arg("smr"), py::arg("smn"), py::arg("y"), py::arg("h"),
      py::arg("shrink_workspace"), py::arg("workspace"), py::arg("counters"), py::arg("scales"), py::arg("dropout"),
      py::arg("stream"));

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
