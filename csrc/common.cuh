// Building blocks of the FLix CUDA kernels: element types, error checks, the token -> example
// map, a shared-memory tile loader and a block-level matrix multiply (tensor-core WMMA for
// fp16/bf16, FMA for fp32).
//
// Every kernel runs 128 threads (4 warps). Operands are staged in shared memory in the compute
// dtype; results are accumulated in fp32 and staged through shared memory once more for the
// epilogue, so the epilogue can mask, scale and convert per element without knowing the tensor
// core fragment layout.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "flix.h"
#include "philox.h"

namespace flix {

constexpr int kThreads = 128;

// ---------------------------------------------------------------------------------------------
// Host side: errors and the device guard
// ---------------------------------------------------------------------------------------------
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("flix_kernels._C.") + what + ": CUDA error " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
  }
}

inline void require(bool cond, const std::string& msg) {
  if (!cond) throw std::invalid_argument(msg);
}

// After a launch: a launch failure (bad configuration, no kernel image for this GPU, ...) is raised
// with the kernel's name. cudaGetLastError also reports an earlier asynchronous error, if any.
inline void check_launch(const char* kernel) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("flix_kernels._C: kernel ") + kernel + " failed: " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
  }
}

// Makes `device` current for the launches of one call and restores the caller's device after.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* what) : device_(device) {
    check_cuda(cudaGetDevice(&previous_), what);
    if (previous_ != device_) check_cuda(cudaSetDevice(device_), what);
  }
  ~DeviceGuard() {
    if (previous_ >= 0 && previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = -1;
};

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct Tag {
  using type = T;
};

// The supported (activation, compute) dtype pairs: both the same, or fp16/bf16 activations with
// fp32 adapters (PEFT's upcast adapters). Checked before anything touches the device.
inline void require_dtype_pair(DType act, DType compute, const char* what) {
  const bool ok = act == compute || (compute == DType::f32 && (act == DType::f16 || act == DType::bf16));
  if (!ok) {
    throw std::invalid_argument(std::string("flix_kernels._C.") + what + ": unsupported dtype pair (activation " +
                                std::to_string(static_cast<int>(act)) + ", adapters " +
                                std::to_string(static_cast<int>(compute)) +
                                "); supported: equal dtypes, or fp16/bf16 activations with fp32 adapters");
  }
}

// Calls f(Tag<Act>{}, Tag<Compute>{}) for a pair that require_dtype_pair accepts.
template <typename F>
void dispatch_dtypes(DType act, DType compute, const char* what, F&& f) {
  require_dtype_pair(act, compute, what);
  if (compute == DType::f32) {
    if (act == DType::f16) return f(Tag<__half>{}, Tag<float>{});
    if (act == DType::bf16) return f(Tag<__nv_bfloat16>{}, Tag<float>{});
    return f(Tag<float>{}, Tag<float>{});
  }
  if (compute == DType::f16) return f(Tag<__half>{}, Tag<__half>{});
  return f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
}

// ---------------------------------------------------------------------------------------------
// Tokens and examples
// ---------------------------------------------------------------------------------------------
struct TokenMap {
  const int32_t* cu;  // nullptr: batched
  int32_t num_examples;
  int32_t seq_len;

  // The example owning token t: the last e < B with cu[e] <= t (so empty examples are skipped).
  __device__ __forceinline__ int example_of(int64_t t) const {
    if (cu == nullptr) return static_cast<int>(t / seq_len);
    int lo = 0, hi = num_examples - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (cu[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
  }
  __device__ __forceinline__ void range(int e, int64_t& start, int64_t& end) const {
    if (cu == nullptr) {
      start = static_cast<int64_t>(e) * seq_len;
      end = start + seq_len;
    } else {
      start = cu[e];
      end = cu[e + 1];
    }
  }
};

// The scale of feature f (per-feature scales in their own dtype, or one value for all).
__device__ __forceinline__ float scale_of(const Scales& s, int f) {
  if (s.data == nullptr) return s.value;
  if (s.dtype == DType::f16) return __half2float(static_cast<const __half*>(s.data)[f]);
  if (s.dtype == DType::bf16) return __bfloat162float(static_cast<const __nv_bfloat16*>(s.data)[f]);
  return static_cast<const float*>(s.data)[f];
}

// ---------------------------------------------------------------------------------------------
// Dropout
// ---------------------------------------------------------------------------------------------
struct DropoutTransform {
  uint64_t seed;
  float p, inv_keep;  // inv_keep = 1 / (1 - p), as the Triton kernels compute it (fp32)
  bool on;

  __device__ static DropoutTransform make(Dropout d) {
    DropoutTransform x;
    x.on = d.seed != nullptr;
    x.seed = x.on ? static_cast<uint64_t>(*d.seed) : 0;
    x.p = d.p;
    x.inv_keep = 1.0f / (1.0f - d.p);
    return x;
  }
  // Element (t, k) of the dropped tensor, given its fp32 value.
  __device__ __forceinline__ float apply(float v, int64_t t, int64_t k) const {
    if (!on) return v;
    return keep_element(seed, static_cast<uint32_t>(t), static_cast<uint32_t>(k), p) ? v * inv_keep : 0.0f;
  }
};

// ---------------------------------------------------------------------------------------------
// Shared-memory tile loader
// ---------------------------------------------------------------------------------------------
// Copies a ROWS x COLS tile of a strided source into shared memory, converting to Tdst:
//   dst[r * DR + c * DC] = xform(r, c, src[row_off[r] + c * cs])  for c < ncols and row_off[r] >= 0,
//   0 elsewhere.
// row_off (shared memory) gives each tile row's offset (a gather, or a plain row stride), negative for a
// row that must read nothing (another example's token, a padding slot, past the end). Threads walk the
// source's contiguous direction: along columns with 16-byte vector loads where cs == 1 and the row is
// aligned, along rows otherwise (the gathered slots of a transposed factor are adjacent in memory).
template <int ROWS, int COLS, int DR, int DC, typename Tdst, typename Tsrc, typename Xform>
__device__ __forceinline__ void load_tile(Tdst* dst, const Tsrc* __restrict__ src, const int64_t* row_off, int64_t cs,
                                          int ncols, Xform xform) {
  constexpr int VEC = 16 / sizeof(Tsrc);
  if (cs == 1) {
    const bool base_aligned = (reinterpret_cast<uintptr_t>(src) % 16) == 0;
    static_assert(COLS % VEC == 0, "tile columns must be a multiple of the vector width");
    for (int i = threadIdx.x; i < ROWS * (COLS / VEC); i += kThreads) {
      const int r = i / (COLS / VEC);
      const int c = (i % (COLS / VEC)) * VEC;
      const int64_t off = row_off[r];
      float v[VEC];
      if (off >= 0 && base_aligned && c + VEC <= ncols && (off % VEC) == 0) {
        alignas(16) Tsrc raw[VEC];
        *reinterpret_cast<uint4*>(raw) = __ldg(reinterpret_cast<const uint4*>(src + off + c));
#pragma unroll
        for (int q = 0; q < VEC; ++q) v[q] = to_f32(raw[q]);
      } else {
#pragma unroll
        for (int q = 0; q < VEC; ++q) v[q] = (off >= 0 && c + q < ncols) ? to_f32(src[off + c + q]) : 0.0f;
      }
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        const float x = (off >= 0 && c + q < ncols) ? xform(r, c + q, v[q]) : 0.0f;
        dst[r * DR + (c + q) * DC] = from_f32<Tdst>(x);
      }
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * COLS; i += kThreads) {
      const int r = i % ROWS;
      const int c = i / ROWS;
      const int64_t off = row_off[r];
      float x = 0.0f;
      if (off >= 0 && c < ncols) x = xform(r, c, to_f32(src[off + c * cs]));
      dst[r * DR + c * DC] = from_f32<Tdst>(x);
    }
  }
}

struct NoTransform {
  __device__ __forceinline__ float operator()(int, int, float v) const { return v; }
};

// ---------------------------------------------------------------------------------------------
// Block matrix multiply: C (BM x BN, fp32) += A (BM x BK) B (BK x BN), operands in shared memory
// ---------------------------------------------------------------------------------------------
// A(m, k) = As[m * A_M + k * A_K] and B(k, n) = Bs[k * B_K + n * B_N]; one of each pair of strides is
// 1 (the operand's contiguous direction), the other the padded leading dimension.
template <typename T, int BM, int BN, int BK, int A_M, int A_K, int B_K, int B_N, bool TENSOR_CORES>
struct BlockMmaImpl;

// fp32: every thread owns a (BM / 16) x (BN / 8) grid of outputs, rows strided by 16, columns by 8.
template <int BM, int BN, int BK, int A_M, int A_K, int B_K, int B_N>
struct BlockMmaImpl<float, BM, BN, BK, A_M, A_K, B_K, B_N, false> {
  static constexpr int TY = 16, TX = 8, TM = BM / TY, TN = BN / TX;
  static_assert(BM % TY == 0 && BN % TX == 0, "tile too small for 128 threads");
  float c[TM][TN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) c[i][j] = 0.0f;
  }
  __device__ __forceinline__ void step(const float* As, const float* Bs) {
    const int ty = threadIdx.x / TX, tx = threadIdx.x % TX;
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[(ty + i * TY) * A_M + k * A_K];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Bs[k * B_K + (tx + j * TX) * B_N];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) c[i][j] = fmaf(a[i], b[j], c[i][j]);
    }
  }
  template <int LDC>
  __device__ __forceinline__ void store(float* Cs) const {
    const int ty = threadIdx.x / TX, tx = threadIdx.x % TX;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) Cs[(ty + i * TY) * LDC + tx + j * TX] = c[i][j];
  }
};

// fp16 / bf16: tensor cores through WMMA 16x16x16 fragments with fp32 accumulators. The 4 warps tile
// the block 1 x 4 (16-row tiles) or 2 x 2.
template <typename T, int BM, int BN, int BK, int A_M, int A_K, int B_K, int B_N>
struct BlockMmaImpl<T, BM, BN, BK, A_M, A_K, B_K, B_N, true> {
  static_assert(A_M == 1 || A_K == 1, "A must be contiguous along m or k");
  static_assert(B_K == 1 || B_N == 1, "B must be contiguous along k or n");
  using ALayout = std::conditional_t<A_K == 1, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  using BLayout = std::conditional_t<B_N == 1, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  static constexpr int LDA = A_K == 1 ? A_M : A_K;
  static constexpr int LDB = B_N == 1 ? B_K : B_N;
  static_assert(LDA % 8 == 0 && LDB % 8 == 0, "WMMA needs leading dimensions that are multiples of 16 bytes");
  static constexpr int WM = BM >= 32 ? 2 : 1, WN = 4 / WM;
  static constexpr int FM = BM / 16 / WM, FN = BN / 16 / WN;
  static_assert(FM >= 1 && FN >= 1 && FM * 16 * WM == BM && FN * 16 * WN == BN, "tile does not split over 4 warps");
  static_assert(BK % 16 == 0, "BK must be a multiple of 16");
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[FM][FN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }
  __device__ __forceinline__ void step(const T* As, const T* Bs) {
    const int warp = threadIdx.x / 32;
    const int m0 = (warp / WN) * FM * 16, n0 = (warp % WN) * FN * 16;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, ALayout> a[FM];
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, BLayout> b[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) nvcuda::wmma::load_matrix_sync(a[i], As + (m0 + i * 16) * A_M + kk * A_K, LDA);
#pragma unroll
      for (int j = 0; j < FN; ++j) nvcuda::wmma::load_matrix_sync(b[j], Bs + kk * B_K + (n0 + j * 16) * B_N, LDB);
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) nvcuda::wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  template <int LDC>
  __device__ __forceinline__ void store(float* Cs) const {
    static_assert(LDC % 4 == 0, "accumulator stores need a leading dimension that is a multiple of 16 bytes");
    const int warp = threadIdx.x / 32;
    const int m0 = (warp / WN) * FM * 16, n0 = (warp % WN) * FN * 16;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
        nvcuda::wmma::store_matrix_sync(Cs + (m0 + i * 16) * LDC + n0 + j * 16, acc[i][j], LDC,
                                        nvcuda::wmma::mem_row_major);
  }
};

template <typename T, int BM, int BN, int BK, int A_M, int A_K, int B_K, int B_N>
using BlockMma = BlockMmaImpl<T, BM, BN, BK, A_M, A_K, B_K, B_N, !std::is_same<T, float>::value>;

// Shared memory of a kernel: the operand tiles during the main loop, reused for the fp32 result tile
// in the epilogue (stage_result puts the barriers around the reuse).
template <int OPERAND_BYTES, int RESULT_BYTES>
struct SharedTiles {
  static constexpr int kBytes = OPERAND_BYTES > RESULT_BYTES ? OPERAND_BYTES : RESULT_BYTES;
  static_assert(kBytes <= 48 * 1024, "static shared memory is limited to 48 KiB");
};

// The shared memory of one block: the operand tiles As and Bs, aliased by the fp32 result tile Cs
// (see stage_result), and the per-row source offsets of the two operand loads (see load_tile).
template <typename Tile, int A_ROWS, int B_ROWS>
struct BlockShared {
  using T = typename Tile::Compute;
  alignas(128) unsigned char tiles[Tile::Smem::kBytes];
  int64_t a_row[A_ROWS];
  int64_t b_row[B_ROWS];
  __device__ __forceinline__ T* As() { return reinterpret_cast<T*>(tiles); }
  __device__ __forceinline__ T* Bs() { return As() + Tile::kAElems; }
  __device__ __forceinline__ float* Cs() { return reinterpret_cast<float*>(tiles); }
};

// Token-major tiles (shrink, expand): C (BM tokens x BN) += A (tokens x BK, As[t][k]) times a
// gathered factor stored one output column per row (Bs[n][k], so a slot's values sit together).
template <typename TC, int BM, int BN, int BK>
struct TokenTile {
  using Compute = TC;
  static constexpr int LDA = BK + 8;
  static constexpr int LDB = BK + 8;
  static constexpr int LDC = BN + 4;
  static constexpr int kAElems = BM * LDA;
  using Mma = BlockMma<TC, BM, BN, BK, LDA, 1, 1, LDB>;
  using Smem = SharedTiles<(kAElems + BN * LDB) * sizeof(TC), BM * LDC * sizeof(float)>;
};

// The examples of the BM tokens from t0: row_example[r] (shared, -1 past T), and the first and last
// example of the tile (block-uniform; a tile straddles examples in decode and packed inputs).
template <int BM>
__device__ __forceinline__ void tile_examples(const TokenMap& map, int64_t t0, int64_t T, int* row_example,
                                              int& e_first, int& e_last) {
  if (threadIdx.x < BM) {
    const int64_t t = t0 + threadIdx.x;
    row_example[threadIdx.x] = t < T ? map.example_of(t) : -1;
  }
  __syncthreads();
  e_first = row_example[0];
  e_last = row_example[static_cast<int>(min(static_cast<int64_t>(BM), T - t0)) - 1];
}

// The accumulators into the fp32 result tile Cs, which aliases the operand tiles: a barrier before
// (the last MMA step is done reading them) and after (every value is in place for the epilogue).
template <int LDC, typename Mma>
__device__ __forceinline__ void stage_result(const Mma& mma, float* Cs) {
  __syncthreads();
  mma.template store<LDC>(Cs);
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// K split over blocks, summed in the same launch
// ---------------------------------------------------------------------------------------------
// Each block of a tile writes its fp32 partial, then counts itself in the tile's counter; the block
// that arrives last sees every partial and sums them in split order (deterministic, no atomics on
// the data). It also resets the counter, so the counters are zero again after every launch (the
// next launch on the stream, or a CUDA-graph replay, finds them as it needs them). Partials must
// then be read with ld.global.cg (L2): another SM wrote them and this SM's L1 may hold old lines.
__device__ __forceinline__ bool arrive_last(int* counter, int splits) {
  __shared__ int is_last;
  __threadfence();  // this thread's partial is visible device-wide before the block counts itself
  __syncthreads();
  if (threadIdx.x == 0) {
    const int seen = atomicAdd(counter, 1);
    is_last = seen == splits - 1;
    if (is_last) atomicExch(counter, 0);
  }
  __syncthreads();
  if (is_last) __threadfence();  // order the partial reads after the count
  return is_last != 0;
}

// ---------------------------------------------------------------------------------------------
// Asynchronous global -> shared copies (cp.async, sm_80+): 16 bytes, zero-filled when !pred
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = pred ? 16 : 0;  // 0: nothing is read, the 16 bytes are zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

}  // namespace flix
