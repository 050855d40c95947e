// decode: a FLix linear layer at decode sizes (T <= 64 tokens) in two launches.
//
//   1. H (T, slots) fp32 = s * drop(X) A_S^T: shrink_kernel (shrink.cu) with 16-token tiles, K split
//      over blocks and the parts summed by the last block of each tile;
//   2. Y (T, N) = X W^T + bias + H M_S: decode_linear_kernel below.
//
// decode_linear_kernel: one block per (64-column tile, part of K). Every token is in the block's one row
// tile (BM = 16 or 64 rows; rows past T are zero-filled by the copies and never written), so each row of
// W is read once in all, in 16-byte cp.async copies through a STAGES-deep shared-memory ring, and the
// tensor cores (WMMA, fp32 accumulators; FMA for fp32) multiply. A 64-column tile is about as wide as
// the token tile, so the copies of x (from L2) do not outweigh those of W. K is split over enough blocks
// to fill the GPU; each split writes its fp32 partial and the last block of the column tile to finish
// sums them in split order (arrive_last), adds the bias and writes Y: one launch, deterministic.
//
// The FLix update is added to the partials: split s adds it for the tokens t with t % splits == s, so the
// work is spread over the splits and still summed once. Per output (t, n) it is a dot product over the
// valid slots of t's example only (slots are a valid prefix; padding and other examples' features are
// never read, so no other feature's values reach an output), with H[t, j] (fp32, scaled by the shrink)
// and M[rank_j, n]; where 16 bytes of consecutive, aligned rank rows belong to consecutive slots (a
// feature's rows: M is lora_B^T, contiguous along the rank), they come in one 16-byte load.
#include "common.cuh"

namespace flix {
namespace {

constexpr int kBN = kDecodeBlock.cols;  // output columns per block
constexpr int kBK = kDecodeBlock.k;     // K per pipeline stage

template <typename TA>
constexpr int stages() { return sizeof(TA) == 4 ? 2 : 4; }  // keeps every ring under 48 KiB of static smem

template <typename TA, int BM>
struct DecodeTile {
  using Tile = TokenTile<TA, BM, kBN, kBK>;  // As (BM x BK) x rows, Bs (BN x BK) W rows: both k-contiguous
  static constexpr int LDA = Tile::LDA;
  static constexpr int kStageElems = (BM + kBN) * LDA;
  static constexpr int kStages = stages<TA>();
  static constexpr int kRingBytes = kStages * kStageElems * static_cast<int>(sizeof(TA));
  static constexpr int kResultBytes = BM * Tile::LDC * static_cast<int>(sizeof(float));
  static constexpr int kSmemBytes = kRingBytes > kResultBytes ? kRingBytes : kResultBytes;
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory is limited to 48 KiB");
  static_assert(LDA * sizeof(TA) % 16 == 0, "shared rows must stay 16-byte aligned for cp.async");
};

// sum over the valid slots j of token t's example e of H[t, j] * M[rank_j, n].
template <typename TC>
__device__ __forceinline__ float flix_update(const float* __restrict__ h_row, const int32_t* __restrict__ feature,
                                             const int32_t* __restrict__ rank, int R, const TC* __restrict__ M,
                                             int64_t smr, int64_t smn, bool m_vec, int n) {
  constexpr int V = 16 / sizeof(TC);
  const TC* m_col = M + n * smn;
  float acc = 0.0f;
  int j = 0;
  while (j < R && feature[j] >= 0) {
    const int r0 = rank[j];
    bool run = m_vec && j + V <= R && r0 % V == 0;
#pragma unroll
    for (int q = 1; q < V; ++q) run = run && feature[j + q] >= 0 && rank[j + q] == r0 + q;
    if (run) {  // V consecutive rank rows of M (smr == 1): one 16-byte load
      alignas(16) TC raw[V];
      *reinterpret_cast<uint4*>(raw) = __ldg(reinterpret_cast<const uint4*>(m_col + r0));
#pragma unroll
      for (int q = 0; q < V; ++q) acc = fmaf(h_row[j + q], to_f32(raw[q]), acc);
      j += V;
    } else {
      acc = fmaf(h_row[j], to_f32(m_col[r0 * smr]), acc);
      ++j;
    }
  }
  return acc;
}

template <typename TA, typename TC, int BM>
__global__ void __launch_bounds__(kThreads)
    decode_linear_kernel(const TA* __restrict__ X, int64_t sxt, const TA* __restrict__ W, int64_t swn,
                         const TA* __restrict__ bias, const float* __restrict__ H, const TC* __restrict__ M,
                         int64_t smr, int64_t smn, bool m_vec, TA* __restrict__ Y, int64_t syt, int64_t syn, int T,
                         int N, int K, int k_per_split, float* __restrict__ workspace, int* __restrict__ counters,
                         Routing routing) {
  using D = DecodeTile<TA, BM>;
  using Tile = typename D::Tile;
  constexpr int LDA = D::LDA, LDC = Tile::LDC, STAGES = D::kStages;
  constexpr int VEC = 16 / sizeof(TA), CHUNKS = kBK / VEC;  // 16-byte copies per row and stage
  __shared__ __align__(128) unsigned char smem[D::kSmemBytes];
  __shared__ int row_example[BM];
  TA* ring = reinterpret_cast<TA*>(smem);

  const int n0 = blockIdx.x * kBN;
  const int split = blockIdx.y, splits = gridDim.y;
  const int k_begin = split * k_per_split;
  const int k_end = min(K, k_begin + k_per_split);
  const int steps = k_end > k_begin ? (k_end - k_begin + kBK - 1) / kBK : 0;
  const TokenMap map{routing.cu_seqlens, routing.num_examples, routing.seq_len};
  if (threadIdx.x < BM) row_example[threadIdx.x] = static_cast<int>(threadIdx.x) < T ? map.example_of(threadIdx.x) : -1;

  // Stage `step`: x rows [0, BM) (zeros past T) and W rows [n0, n0 + BN) (zeros past N), k in [k0, k0 + BK).
  const auto copy_stage = [&](int step) {
    TA* As = ring + (step % STAGES) * D::kStageElems;
    TA* Bs = As + BM * LDA;
    const int k0 = k_begin + step * kBK;
    for (int i = threadIdx.x; i < (BM + kBN) * CHUNKS; i += kThreads) {
      const int row = i / CHUNKS, c = (i % CHUNKS) * VEC;
      const bool is_x = row < BM;
      const int r = is_x ? row : row - BM;
      const bool in = (is_x ? r < T : n0 + r < N) && k0 + c < k_end;
      const TA* src = !in ? X : is_x ? X + r * sxt + k0 + c : W + (n0 + r) * swn + k0 + c;
      cp_async16((is_x ? As : Bs) + r * LDA + c, src, in);
    }
  };

  typename Tile::Mma mma;
  mma.zero();
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < steps) copy_stage(s);
    cp_async_commit();  // always one group per stage, so the wait below counts right
  }
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<STAGES - 2>();  // this thread's copies of `step` landed
    __syncthreads();              // everyone's did, and everyone is done with the slot refilled next
    if (step + STAGES - 1 < steps) copy_stage(step + STAGES - 1);
    cp_async_commit();
    const TA* As = ring + (step % STAGES) * D::kStageElems;
    mma.step(As, As + BM * LDA);
  }
  cp_async_wait<0>();
  float* Cs = reinterpret_cast<float*>(smem);
  stage_result<LDC>(mma, Cs);  // barriers around the reuse of the ring

  const int R = routing.slots;
  const int ncols = min(kBN, N - n0);
  for (int i = threadIdx.x; i < T * kBN; i += kThreads) {
    const int t = i / kBN, c = i % kBN;
    if (c >= ncols) continue;
    float v = Cs[t * LDC + c];
    if (R > 0 && t % splits == split) {
      const int64_t e = row_example[t];
      v += flix_update(H + static_cast<int64_t>(t) * R, routing.slot_feature + e * R, routing.slot_rank + e * R, R,
                       M, smr, smn, m_vec, n0 + c);
    }
    if (splits == 1) {
      if (bias != nullptr) v += to_f32(bias[n0 + c]);
      Y[t * syt + static_cast<int64_t>(n0 + c) * syn] = from_f32<TA>(v);
    } else {
      workspace[(static_cast<int64_t>(split) * T + t) * N + n0 + c] = v;
    }
  }
  if (splits == 1 || !arrive_last(counters + blockIdx.x, splits)) return;
  for (int i = threadIdx.x; i < T * kBN; i += kThreads) {
    const int t = i / kBN, c = i % kBN;
    if (c >= ncols) continue;
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) v += __ldcg(workspace + (static_cast<int64_t>(s) * T + t) * N + n0 + c);
    if (bias != nullptr) v += to_f32(bias[n0 + c]);
    Y[t * syt + static_cast<int64_t>(n0 + c) * syn] = from_f32<TA>(v);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename TA, typename TC, int BM>
void launch(const DecodeLinear& a, const Routing& routing, cudaStream_t stream) {
  const int T = static_cast<int>(a.y.rows), N = static_cast<int>(a.y.cols), K = static_cast<int>(a.x.cols);
  int k_per_split = (K + a.splits - 1) / a.splits;
  k_per_split = std::max(kBK, ((k_per_split + kBK - 1) / kBK) * kBK);  // whole stages per split
  const int used = std::max(1, (K + k_per_split - 1) / k_per_split);  // <= a.splits (checked by the caller)
  const int64_t col_tiles = (N + kBN - 1) / kBN;
  constexpr int V = 16 / sizeof(TC);
  const bool m_vec = a.m.stride0 == 1 && a.m.stride1 % V == 0 && aligned16(a.m.data);
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(used));
  decode_linear_kernel<TA, TC, BM><<<grid, kThreads, 0, stream>>>(
      static_cast<const TA*>(a.x.data), a.x.stride0, static_cast<const TA*>(a.w.data), a.w.stride0,
      static_cast<const TA*>(a.bias), a.h, static_cast<const TC*>(a.m.data), a.m.stride0, a.m.stride1, m_vec,
      static_cast<TA*>(const_cast<void*>(a.y.data)), a.y.stride0, a.y.stride1, T, N, K, k_per_split, a.workspace,
      a.counters, routing);
  check_launch("decode_linear_kernel");
}

}  // namespace

void decode_linear(const DecodeLinear& a, const Routing& routing, int device, uintptr_t stream) {
  const char* what = "flix_kernels._C.decode_linear: ";
  const std::string w(what);
  require(a.x.rows >= 0 && a.x.rows <= kDecodeTokens, w + "the decode path takes at most 64 tokens");
  require(a.y.rows == a.x.rows && a.w.cols == a.x.cols && a.y.cols == a.w.rows && a.m.cols == a.y.cols &&
              a.a.cols == a.x.cols && a.x.cols < (int64_t{1} << 31) && a.y.cols < (int64_t{1} << 31),
          w + "x (T, K), W (N, K), y (T, N), A (R, K) and the expand factor (R, N) disagree");
  require(a.x.dtype == a.w.dtype && a.y.dtype == a.x.dtype, w + "x, W and y must share the activation dtype");
  require(a.m.dtype == a.a.dtype, w + "the two factors must share the adapter dtype");
  require(routing.slots >= 0 && routing.num_examples >= 0, w + "bad routing sizes");
  if (a.x.rows == 0 || a.y.cols == 0) return;
  const int elem = a.x.dtype == DType::f32 ? 4 : 2;
  const int vec = 16 / elem;
  require(a.x.stride1 == 1 && a.w.stride1 == 1 && a.x.stride0 % vec == 0 && a.w.stride0 % vec == 0 &&
              a.x.cols % vec == 0 && aligned16(a.x.data) && aligned16(a.w.data),
          w + "x and W need unit column strides, 16-byte aligned rows and K a multiple of 16 bytes");
  require(a.y.data != nullptr && a.x.data != nullptr && a.w.data != nullptr && routing.num_examples > 0 &&
              (routing.cu_seqlens != nullptr || routing.seq_len > 0),
          w + "null pointer or empty routing");
  // No slot anywhere (no example uses a feature): h is empty and nothing reads it or the factors.
  require(routing.slots == 0 || (a.h != nullptr && a.a.data != nullptr && a.m.data != nullptr &&
                                 routing.slot_rank != nullptr && routing.slot_feature != nullptr),
          w + "null h, factor or routing pointer");
  const int64_t col_tiles = (a.y.cols + kBN - 1) / kBN;
  require(a.splits >= 1 && a.splits <= 65535 && col_tiles <= 0x7fffffff, w + "too many tiles for one launch");
  require(a.splits == 1 || (a.workspace != nullptr && a.counters != nullptr && col_tiles <= kMaxSplitTiles),
          w + "a K split needs a workspace and zeroed counters (at most kMaxSplitTiles column tiles)");
  require(a.shrink_splits == 1 || (a.shrink_workspace != nullptr && a.counters != nullptr),
          w + "a K split of the shrink needs a workspace and zeroed counters");
  require_dtype_pair(a.x.dtype, a.m.dtype, "decode_linear");
  DeviceGuard guard(device, "decode_linear");
  if (routing.slots > 0 && a.x.cols > 0) {
    shrink(a.x, a.a, a.h, a.shrink_workspace, a.counters, a.shrink_splits, routing, a.scales, a.dropout, Tile::small,
           device, stream);
  } else if (routing.slots > 0) {  // K == 0 (a raw call; the Python path sends it to the general kernels)
    check_cuda(cudaMemsetAsync(a.h, 0, sizeof(float) * a.x.rows * routing.slots, as_stream(stream)), "decode_linear");
  }
  dispatch_dtypes(a.x.dtype, a.m.dtype, "decode_linear", [&](auto act, auto compute) {
    using TA = typename decltype(act)::type;
    using TC = typename decltype(compute)::type;
    if (a.x.rows <= 16) {
      launch<TA, TC, 16>(a, routing, as_stream(stream));
    } else {
      launch<TA, TC, 64>(a, routing, as_stream(stream));
    }
  });
}

}  // namespace flix
