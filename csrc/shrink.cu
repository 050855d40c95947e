// shrink: H[t, j] = s_j * sum_k drop(X)[t, k] * M[slot(e(t), j), k]   (fp32 out)
//
// One block per (tile of BM tokens, tile of BN slots, part of K). A token tile may straddle examples
// (decode: one token per example); the block then runs one pass per example, loading only that
// example's token rows (the others read as zero) and its own gathered rank rows, and writes only
// that example's rows from the pass's accumulator: the other rows hold 0 * (its rank rows), which
// is NaN where a feature's values are inf, so they are never summed across examples. X is read
// once in total; each example's rank rows once per token tile. With K split over blocks, each
// split writes its partial tile and the last block of the tile sums them in split order into H
// (arrive_last: one launch, deterministic).
#include "common.cuh"

namespace flix {
namespace {

template <typename TA, typename TC, int BM, int BN, int BK>
__global__ void __launch_bounds__(kThreads)
    shrink_kernel(const TA* __restrict__ X, int64_t sxt, int64_t sxk, int64_t T, int K, const TC* __restrict__ M,
                  int64_t smr, int64_t smk, float* __restrict__ h, float* __restrict__ parts, int k_per_split,
                  int* __restrict__ counters, Routing routing, Scales scales, Dropout dropout) {
  using Tile = TokenTile<TC, BM, BN, BK>;
  __shared__ BlockShared<Tile, BM, BN> sh;  // a_row: x rows of the pass's example; b_row: its slots' rows of M
  __shared__ int row_example[BM];
  int64_t* x_row = sh.a_row;
  int64_t* m_row = sh.b_row;

  const TokenMap map{routing.cu_seqlens, routing.num_examples, routing.seq_len};
  const int R = routing.slots;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int j0 = blockIdx.y * BN;
  const int k_begin = blockIdx.z * k_per_split;
  const int k_end = min(K, k_begin + k_per_split);
  const DropoutTransform drop = DropoutTransform::make(dropout);

  int e_first, e_last;
  tile_examples<BM>(map, t0, T, row_example, e_first, e_last);

  typename Tile::Mma mma;
  const float* Cs = sh.Cs();
  const int64_t split_stride = T * R;
  float* o = gridDim.z > 1 ? parts + blockIdx.z * split_stride : h;
  const int64_t t_stop = min(t0 + BM, T);
  for (int e = e_first; e <= e_last; ++e) {
    int64_t start, end;
    map.range(e, start, end);
    if (start >= end) continue;  // an empty (packed) example owns no row of the tile
    const int r_begin = static_cast<int>(max(start, t0) - t0), r_end = static_cast<int>(min(end, t_stop) - t0);
    // Block-uniform: does the example have a slot in this slot tile (slots are a valid prefix)?
    const bool has_slots = routing.slot_feature[static_cast<int64_t>(e) * R + j0] >= 0;
    mma.zero();
    if (has_slots) {
      __syncthreads();  // the previous pass is done with x_row / m_row
      if (threadIdx.x < BM) {
        const int64_t t = t0 + threadIdx.x;
        x_row[threadIdx.x] = (t < T && row_example[threadIdx.x] == e) ? t * sxt : -1;
      }
      for (int j = threadIdx.x; j < BN; j += kThreads) {
        const int64_t idx = static_cast<int64_t>(e) * R + j0 + j;
        m_row[j] = (j0 + j < R && routing.slot_feature[idx] >= 0) ? routing.slot_rank[idx] * smr : -1;
      }
      __syncthreads();
      for (int k0 = k_begin; k0 < k_end; k0 += BK) {
        const int kn = min(BK, k_end - k0);
        const auto dropped = [&](int r, int c, float v) { return drop.apply(v, t0 + r, k0 + c); };
        load_tile<BM, BK, Tile::LDA, 1>(sh.As(), X + k0 * sxk, x_row, sxk, kn, dropped);
        load_tile<BN, BK, Tile::LDB, 1>(sh.Bs(), M + k0 * smk, m_row, smk, kn, NoTransform{});
        __syncthreads();
        mma.step(sh.As(), sh.Bs());
        __syncthreads();
      }
      stage_result<Tile::LDC>(mma, sh.Cs());
    }
    const int rows = r_end - r_begin;
    for (int i = threadIdx.x; i < rows * BN; i += kThreads) {
      const int r = r_begin + i / BN, j = i % BN;
      if (j0 + j >= R) continue;
      const int f = routing.slot_feature[static_cast<int64_t>(e) * R + j0 + j];
      // Padding slots are exactly 0 (not acc * 0, which is NaN for an inf input).
      const float s = f < 0 ? 0.0f : scale_of(scales, f);
      o[(t0 + r) * R + j0 + j] = f < 0 ? 0.0f : Cs[r * Tile::LDC + j] * s;
    }
  }
  if (gridDim.z == 1 || !arrive_last(counters + blockIdx.y * gridDim.x + blockIdx.x, gridDim.z)) return;
  const int rows = static_cast<int>(t_stop - t0), cols = min(BN, R - j0);
  for (int i = threadIdx.x; i < rows * cols; i += kThreads) {
    const int64_t at = (t0 + i / cols) * R + j0 + i % cols;
    float acc = 0.0f;
    for (int s = 0; s < static_cast<int>(gridDim.z); ++s) acc += __ldcg(parts + s * split_stride + at);
    h[at] = acc;
  }
}

template <typename TA, typename TC, int BM, int BN, int BK>
void launch(const Matrix& x, const Matrix& m, float* h, float* workspace, int* counters, int splits,
            const Routing& routing, Scales scales, Dropout dropout, cudaStream_t stream) {
  const int64_t T = x.rows;
  const int K = static_cast<int>(x.cols);
  const int R = routing.slots;
  // Whole BK blocks per split; fewer splits than asked when K is short.
  int k_per_split = (K + splits - 1) / splits;
  k_per_split = ((k_per_split + BK - 1) / BK) * BK;
  if (k_per_split == 0) k_per_split = BK;
  const int used = (K + k_per_split - 1) / k_per_split > 0 ? (K + k_per_split - 1) / k_per_split : 1;
  const dim3 grid(static_cast<unsigned>((T + BM - 1) / BM), static_cast<unsigned>((R + BN - 1) / BN),
                  static_cast<unsigned>(used));
  require(grid.y <= 65535 && grid.z <= 65535, "flix_kernels._C.shrink: too many slots or K splits for one launch");
  require(used == 1 || grid.x * static_cast<int64_t>(grid.y) <= kMaxSplitTiles,
          "flix_kernels._C.shrink: too many tiles for a K split");
  shrink_kernel<TA, TC, BM, BN, BK><<<grid, kThreads, 0, stream>>>(
      static_cast<const TA*>(x.data), x.stride0, x.stride1, T, K, static_cast<const TC*>(m.data), m.stride0, m.stride1,
      h, workspace, k_per_split, counters, routing, scales, dropout);
  check_launch("shrink_kernel");
}

// The two tile classes' block shapes (flix.h).
constexpr BlockShape kSmall = kShrinkBlock[0], kLarge = kShrinkBlock[1];

}  // namespace

void shrink(const Matrix& x, const Matrix& m, float* h, float* workspace, int* counters, int splits,
            const Routing& routing, Scales scales, Dropout dropout, Tile tile, int device, uintptr_t stream) {
  require(x.rows >= 0 && x.cols >= 0 && x.cols < (int64_t{1} << 31), "flix_kernels._C.shrink: bad x shape");
  require(m.cols == x.cols, "flix_kernels._C.shrink: the factor must have as many columns as x (in_features)");
  require(routing.slots >= 0 && routing.num_examples >= 0, "flix_kernels._C.shrink: bad routing sizes");
  require(splits >= 1, "flix_kernels._C.shrink: splits must be >= 1");
  require(splits == 1 || (workspace != nullptr && counters != nullptr),
          "flix_kernels._C.shrink: K splits need a workspace and zeroed counters");
  if (x.rows == 0 || routing.slots == 0) return;
  require(routing.num_examples > 0 && h != nullptr && x.data != nullptr && m.data != nullptr &&
              routing.slot_rank != nullptr && routing.slot_feature != nullptr,
          "flix_kernels._C.shrink: null pointer");
  require(routing.cu_seqlens != nullptr || routing.seq_len > 0, "flix_kernels._C.shrink: batched routing needs seq_len > 0");
  require_dtype_pair(x.dtype, m.dtype, "shrink");
  DeviceGuard guard(device, "shrink");
  dispatch_dtypes(x.dtype, m.dtype, "shrink", [&](auto act, auto compute) {
    using TA = typename decltype(act)::type;
    using TC = typename decltype(compute)::type;
    if (tile == Tile::small) {
      launch<TA, TC, kSmall.rows, kSmall.cols, kSmall.k>(
          x, m, h, workspace, counters, splits, routing, scales, dropout, as_stream(stream));
    } else {
      launch<TA, TC, kLarge.rows, kLarge.cols, kLarge.k>(
          x, m, h, workspace, counters, splits, routing, scales, dropout, as_stream(stream));
    }
  });
}

}  // namespace flix
