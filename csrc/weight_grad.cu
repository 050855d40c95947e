// Weight gradients of the rank factors, as segment-owned reductions (no atomics: bit-identical run
// to run). For feature k with rows rank_offsets[k] .. rank_offsets[k + 1]:
//
//   G[rank_offsets[k] + j, n] = sum over tokens t of examples having k of L[t, slot_k(e) + j] * drop(R)[t, n]
//
// dB^T: L = h (the shrunk input), R = dy.  dA: L = g (the shrunk output gradient), R = drop(x).
//
// Two paths, chosen by the launcher (flix_kernels/cuda/launch.py):
// * owner: one block per (feature, column tile, row block) owns its output and walks the feature's
//   (example, tokens) pairs in order. No workspace. Reads R once per (feature, example) pair.
// * split: one block per (example, chunk of its tokens, column tile, row block) multiplies its chunk
//   for all of the example's slots at once into its own fp32 workspace tile (R read once per token),
//   then one block per (feature, column tile, row block) adds its pairs' tiles in a fixed order.
#include "common.cuh"

namespace flix {
namespace {

template <typename TC, int BM, int BN, int BK>
struct GradTile {
  using Compute = TC;
  static constexpr int LDA = BM + 8;  // As[t][j]: A(j, t) = As[t * LDA + j]
  static constexpr int LDB = BN + 8;  // Bs[t][n]
  static constexpr int LDC = BN + 4;
  static constexpr int kAElems = BK * LDA;
  using Mma = BlockMma<TC, BM, BN, BK, 1, LDA, LDB, 1>;
  using Smem = SharedTiles<(kAElems + BK * LDB) * sizeof(TC), BM * LDC * sizeof(float)>;
  using Shared = BlockShared<GradTile, BK, BK>;  // a_row: rows of L, b_row: rows of R, per token
};

struct GradOperands {
  const float* L;
  int64_t slt;  // row stride of L (its columns are contiguous)
  const void* R;
  int64_t srt, srn;
  int N;
};

// mma += L[t, col0 + j] drop(R)[t, n0 + n] summed over tokens [t_begin, t_end), for j < rows.
template <typename TA, typename TC, int BM, int BN, int BK>
__device__ __forceinline__ void accumulate_tokens(typename GradTile<TC, BM, BN, BK>::Mma& mma,
                                                  typename GradTile<TC, BM, BN, BK>::Shared& sh, const GradOperands& op,
                                                  int64_t col0, int rows, int n0, int64_t t_begin, int64_t t_end,
                                                  const DropoutTransform& drop) {
  using Tile = GradTile<TC, BM, BN, BK>;
  const TA* R = static_cast<const TA*>(op.R);
  const int ncols = min(BN, op.N - n0);
  for (int64_t tk = t_begin; tk < t_end; tk += BK) {
    __syncthreads();  // the previous step is done with the row offsets and the tiles
    for (int r = threadIdx.x; r < BK; r += kThreads) {
      const int64_t t = tk + r;
      sh.a_row[r] = t < t_end ? t * op.slt + col0 : -1;
      sh.b_row[r] = t < t_end ? t * op.srt + n0 * op.srn : -1;
    }
    __syncthreads();
    const auto dropped = [&](int r, int c, float v) { return drop.apply(v, tk + r, n0 + c); };
    load_tile<BK, BM, Tile::LDA, 1>(sh.As(), op.L, sh.a_row, 1, rows, NoTransform{});
    load_tile<BK, BN, Tile::LDB, 1>(sh.Bs(), R, sh.b_row, op.srn, ncols, dropped);
    __syncthreads();
    mma.step(sh.As(), sh.Bs());
  }
}

template <typename TA, typename TC, int BM, int BN, int BK>
__global__ void __launch_bounds__(kThreads)
    grad_owner_kernel(GradOperands op, TC* __restrict__ G, int64_t sgr, int64_t sgn, Routing routing, Pairs pairs,
                      Dropout dropout) {
  using Tile = GradTile<TC, BM, BN, BK>;
  __shared__ typename Tile::Shared sh;

  const int k = blockIdx.x;
  const int n0 = blockIdx.y * BN;
  const int j0 = blockIdx.z * BM;
  const int row0 = pairs.rank_offsets[k];
  const int rank = pairs.rank_offsets[k + 1] - row0;
  if (j0 >= rank) return;
  const int rows = min(BM, rank - j0);
  const TokenMap map{routing.cu_seqlens, routing.num_examples, routing.seq_len};
  const DropoutTransform drop = DropoutTransform::make(dropout);

  typename Tile::Mma mma;
  mma.zero();
  for (int p = pairs.feature_pair_start[k]; p < pairs.feature_pair_start[k + 1]; ++p) {
    int64_t start, end;
    map.range(pairs.pair_example[p], start, end);
    accumulate_tokens<TA, TC, BM, BN, BK>(mma, sh, op, pairs.pair_slot[p] + j0, rows, n0, start,
                                          end, drop);
  }
  const float* Cs = sh.Cs();
  stage_result<Tile::LDC>(mma, sh.Cs());
  const int ncols = min(BN, op.N - n0);
  // Threads walk G's contiguous direction: columns for dA, rows for dB^T (lora_B's rank dim).
  const bool rows_fastest = sgr == 1 && sgn != 1;
  for (int i = threadIdx.x; i < BM * BN; i += kThreads) {
    const int r = rows_fastest ? i % BM : i / BN;
    const int c = rows_fastest ? i / BM : i % BN;
    if (r < rows && c < ncols) {
      G[static_cast<int64_t>(row0 + j0 + r) * sgr + static_cast<int64_t>(n0 + c) * sgn] =
          from_f32<TC>(Cs[r * Tile::LDC + c]);
    }
  }
}

template <typename TA, typename TC, int BM, int BN, int BK>
__global__ void __launch_bounds__(kThreads)
    grad_partial_kernel(GradOperands op, float* __restrict__ ws, int chunks, int chunk, int col_tiles, Routing routing,
                        Dropout dropout) {
  using Tile = GradTile<TC, BM, BN, BK>;
  __shared__ typename Tile::Shared sh;

  const int e = blockIdx.x;
  const int c = blockIdx.y;
  const int n0 = (blockIdx.z % col_tiles) * BN;
  const int j0 = (blockIdx.z / col_tiles) * BM;
  const int R = routing.slots;
  if (j0 >= R || routing.slot_feature[static_cast<int64_t>(e) * R + j0] < 0) return;  // only padding slots
  const TokenMap map{routing.cu_seqlens, routing.num_examples, routing.seq_len};
  int64_t start, end;
  map.range(e, start, end);
  const int64_t t_begin = start + static_cast<int64_t>(c) * chunk;
  const int64_t t_end = min(t_begin + chunk, end);
  if (t_begin >= t_end) return;
  const int rows = min(BM, R - j0);
  const DropoutTransform drop = DropoutTransform::make(dropout);

  typename Tile::Mma mma;
  mma.zero();
  accumulate_tokens<TA, TC, BM, BN, BK>(mma, sh, op, j0, rows, n0, t_begin, t_end, drop);
  const float* Cs = sh.Cs();
  stage_result<Tile::LDC>(mma, sh.Cs());
  const int ncols = min(BN, op.N - n0);
  const int64_t base = (static_cast<int64_t>(e) * chunks + c) * R;
  for (int i = threadIdx.x; i < BM * BN; i += kThreads) {
    const int r = i / BN, col = i % BN;
    if (r < rows && col < ncols) ws[(base + j0 + r) * op.N + n0 + col] = Cs[r * Tile::LDC + col];
  }
}

// G rows of feature k = the sum of its pairs' workspace tiles, pairs then chunks in order.
constexpr int kReduceRows = 16;

template <typename TC>
__global__ void __launch_bounds__(kThreads)
    grad_reduce_kernel(const float* __restrict__ ws, TC* __restrict__ G, int64_t sgr, int64_t sgn, int N, int chunks,
                       int chunk, Routing routing, Pairs pairs) {
  const int k = blockIdx.x;
  const int n = blockIdx.y * kThreads + threadIdx.x;
  const int j0 = blockIdx.z * kReduceRows;
  const int row0 = pairs.rank_offsets[k];
  const int rank = pairs.rank_offsets[k + 1] - row0;
  if (j0 >= rank || n >= N) return;
  const int rows = min(kReduceRows, rank - j0);
  const TokenMap map{routing.cu_seqlens, routing.num_examples, routing.seq_len};
  const int R = routing.slots;
  float acc[kReduceRows];
#pragma unroll
  for (int j = 0; j < kReduceRows; ++j) acc[j] = 0.0f;
  for (int p = pairs.feature_pair_start[k]; p < pairs.feature_pair_start[k + 1]; ++p) {
    const int e = pairs.pair_example[p];
    int64_t start, end;
    map.range(e, start, end);
    // Chunks the partial kernel wrote (the launcher sizes chunks * chunk to cover the longest example).
    const int64_t used = min((end - start + chunk - 1) / chunk, static_cast<int64_t>(chunks));
    for (int64_t c = 0; c < used; ++c) {
      const float* tile = ws + ((static_cast<int64_t>(e) * chunks + c) * R + pairs.pair_slot[p] + j0) * N + n;
#pragma unroll
      for (int j = 0; j < kReduceRows; ++j)
        if (j < rows) acc[j] += tile[static_cast<int64_t>(j) * N];
    }
  }
#pragma unroll
  for (int j = 0; j < kReduceRows; ++j)
    if (j < rows) G[static_cast<int64_t>(row0 + j0 + j) * sgr + static_cast<int64_t>(n) * sgn] = from_f32<TC>(acc[j]);
}

template <typename TA, typename TC, int BM, int BN, int BK>
void launch(const GradOperands& op, const Matrix& g, const Routing& routing, const Pairs& pairs, float* ws, int chunks,
            int chunk, Dropout dropout, cudaStream_t stream) {
  TC* G = static_cast<TC*>(const_cast<void*>(g.data));
  const unsigned col_tiles = static_cast<unsigned>((op.N + BN - 1) / BN);
  if (chunks == 0) {
    const dim3 grid(static_cast<unsigned>(pairs.num_features), col_tiles,
                    static_cast<unsigned>((pairs.max_feature_rank + BM - 1) / BM));
    require(grid.y <= 65535 && grid.z <= 65535, "flix_kernels._C.weight_grad: grid too large");
    grad_owner_kernel<TA, TC, BM, BN, BK><<<grid, kThreads, 0, stream>>>(op, G, g.stride0, g.stride1, routing, pairs,
                                                                        dropout);
    check_launch("grad_owner_kernel");
    return;
  }
  const unsigned row_blocks = static_cast<unsigned>((routing.slots + BM - 1) / BM);
  const dim3 grid(static_cast<unsigned>(routing.num_examples), static_cast<unsigned>(chunks), col_tiles * row_blocks);
  require(grid.y <= 65535 && grid.z <= 65535, "flix_kernels._C.weight_grad: too many chunks or column tiles");
  grad_partial_kernel<TA, TC, BM, BN, BK><<<grid, kThreads, 0, stream>>>(op, ws, chunks, chunk,
                                                                        static_cast<int>(col_tiles), routing, dropout);
  check_launch("grad_partial_kernel");
  const dim3 rgrid(static_cast<unsigned>(pairs.num_features), static_cast<unsigned>((op.N + kThreads - 1) / kThreads),
                   static_cast<unsigned>((pairs.max_feature_rank + kReduceRows - 1) / kReduceRows));
  require(rgrid.y <= 65535 && rgrid.z <= 65535, "flix_kernels._C.weight_grad: grid too large");
  grad_reduce_kernel<TC><<<rgrid, kThreads, 0, stream>>>(ws, G, g.stride0, g.stride1, op.N, chunks, chunk, routing,
                                                         pairs);
  check_launch("grad_reduce_kernel");
}

// The two tile classes' block shapes (flix.h).
constexpr BlockShape kSmall = kWeightGradBlock[0], kLarge = kWeightGradBlock[1];

}  // namespace

void weight_grad(const Matrix& l, const Matrix& r, const Matrix& g, const Routing& routing, const Pairs& pairs,
                 float* workspace, int chunks, int chunk, Dropout dropout, Tile tile, int device, uintptr_t stream) {
  require(l.dtype == DType::f32 && l.stride1 == 1, "flix_kernels._C.weight_grad: L must be fp32 with unit column stride");
  require(l.rows == r.rows && l.cols == routing.slots, "flix_kernels._C.weight_grad: L must be (T, slots) with T = R's rows");
  require(g.cols == r.cols && r.cols < (int64_t{1} << 31), "flix_kernels._C.weight_grad: G and R disagree on N");
  require(pairs.num_features >= 0 && pairs.max_feature_rank >= 0 && routing.slots >= 0 && routing.num_examples >= 0,
          "flix_kernels._C.weight_grad: bad routing sizes");
  require(chunks >= 0 && (chunks == 0 || (chunk > 0 && workspace != nullptr)),
          "flix_kernels._C.weight_grad: the split path needs chunk > 0 and a workspace");
  if (g.rows == 0 || g.cols == 0 || pairs.num_features == 0) return;
  require(g.data != nullptr && pairs.rank_offsets != nullptr && pairs.feature_pair_start != nullptr,
          "flix_kernels._C.weight_grad: null pointer");
  require(routing.cu_seqlens != nullptr || routing.seq_len > 0 || routing.num_examples == 0,
          "flix_kernels._C.weight_grad: batched routing needs seq_len > 0");
  require(chunks == 0 || routing.num_examples > 0, "flix_kernels._C.weight_grad: the split path needs examples");
  require_dtype_pair(r.dtype, g.dtype, "weight_grad");
  DeviceGuard guard(device, "weight_grad");
  const GradOperands op{static_cast<const float*>(l.data), l.stride0, r.data, r.stride0, r.stride1,
                        static_cast<int>(r.cols)};
  dispatch_dtypes(r.dtype, g.dtype, "weight_grad", [&](auto act, auto compute) {
    using TA = typename decltype(act)::type;
    using TC = typename decltype(compute)::type;
    if (tile == Tile::small) {
      launch<TA, TC, kSmall.rows, kSmall.cols, kSmall.k>(
          op, g, routing, pairs, workspace, chunks, chunk, dropout, as_stream(stream));
    } else {
      launch<TA, TC, kLarge.rows, kLarge.cols, kLarge.k>(
          op, g, routing, pairs, workspace, chunks, chunk, dropout, as_stream(stream));
    }
  });
}

}  // namespace flix
