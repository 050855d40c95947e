// expand: Y[t, n] (= | +=) drop(sum_j H[t, j] * M[slot(e(t), j), n])
//
// One block per (tile of BM tokens, tile of BN output columns). As in shrink, a token tile that
// straddles examples runs one pass per example over that example's slots and writes only that
// example's rows from it (never a sum over examples: another example's rows of the pass hold
// 0 * its factor rows, NaN where those are inf). Accumulating into Y (the base output from
// cuBLAS, or dy W for the input gradient): rows whose example uses no feature are neither read
// nor written.
#include "common.cuh"

namespace flix {
namespace {

template <typename TA, typename TC, int BM, int BN, int BK>
__global__ void __launch_bounds__(kThreads)
    expand_kernel(const float* __restrict__ H, int64_t sht, const TC* __restrict__ M, int64_t smr, int64_t smn,
                  TA* __restrict__ Y, int64_t syt, int64_t syn, int64_t T, int N, bool accumulate, Routing routing,
                  Dropout dropout) {
  using Tile = TokenTile<TC, BM, BN, BK>;
  __shared__ BlockShared<Tile, BM, BK> sh;  // a_row: H rows of the pass's example; b_row: its slots' rows of M
  __shared__ int row_example[BM];
  int64_t* h_row = sh.a_row;
  int64_t* m_row = sh.b_row;

  const TokenMap map{routing.cu_seqlens, routing.num_examples, routing.seq_len};
  const int R = routing.slots;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int n0 = blockIdx.y * BN;
  const int ncols = min(BN, N - n0);

  int e_first, e_last;
  tile_examples<BM>(map, t0, T, row_example, e_first, e_last);

  typename Tile::Mma mma;
  const float* Cs = sh.Cs();
  const DropoutTransform drop = DropoutTransform::make(dropout);
  const int64_t t_stop = min(t0 + BM, T);
  for (int e = e_first; e <= e_last; ++e) {
    int64_t start, end;
    map.range(e, start, end);
    if (start >= end) continue;  // an empty (packed) example owns no row of the tile
    const int r_begin = static_cast<int>(max(start, t0) - t0), r_end = static_cast<int>(min(end, t_stop) - t0);
    mma.zero();
    bool active = false;  // block-uniform: does the example use a feature?
    for (int j0 = 0; j0 < R; j0 += BK) {
      if (routing.slot_feature[static_cast<int64_t>(e) * R + j0] < 0) break;  // the rest is padding
      active = true;
      __syncthreads();  // the previous pass is done with h_row / m_row and the tiles
      if (threadIdx.x < BM) {
        const int64_t t = t0 + threadIdx.x;
        h_row[threadIdx.x] = (t < T && row_example[threadIdx.x] == e) ? t * sht + j0 : -1;
      }
      static_assert(BK <= kThreads, "one slot per thread");
      bool valid = false;
      if (threadIdx.x < BK) {
        const int j = threadIdx.x;
        const int64_t idx = static_cast<int64_t>(e) * R + j0 + j;
        valid = j0 + j < R && routing.slot_feature[idx] >= 0;
        m_row[j] = valid ? routing.slot_rank[idx] * smr + n0 * smn : -1;
      }
      // Valid slots are a prefix: their count bounds the H columns read (padding columns of H
      // are never read, whatever they hold).
      const int jn = __syncthreads_count(valid);
      load_tile<BM, BK, Tile::LDA, 1>(sh.As(), H, h_row, 1, jn, NoTransform{});
      load_tile<BK, BN, 1, Tile::LDB>(sh.Bs(), M, m_row, smn, ncols, NoTransform{});
      __syncthreads();
      mma.step(sh.As(), sh.Bs());
    }
    if (accumulate && !active) continue;  // Y keeps this example's rows, unread
    if (active) stage_result<Tile::LDC>(mma, sh.Cs());
    const int rows = r_end - r_begin;
    for (int i = threadIdx.x; i < rows * BN; i += kThreads) {
      const int r = r_begin + i / BN, c = i % BN;
      if (c >= ncols) continue;
      const int64_t t = t0 + r;
      float v = active ? drop.apply(Cs[r * Tile::LDC + c], t, n0 + c) : 0.0f;
      TA* y = Y + t * syt + static_cast<int64_t>(n0 + c) * syn;
      if (accumulate) v += to_f32(*y);
      *y = from_f32<TA>(v);
    }
  }
}

template <typename TA, typename TC, int BM, int BN, int BK>
void launch(const Matrix& h, const Matrix& m, const Matrix& y, bool accumulate, const Routing& routing,
            Dropout dropout, cudaStream_t stream) {
  const int64_t T = y.rows;
  const int N = static_cast<int>(y.cols);
  const dim3 grid(static_cast<unsigned>((T + BM - 1) / BM), static_cast<unsigned>((N + BN - 1) / BN));
  require(grid.y <= 65535, "flix_kernels._C.expand: too many output columns for one launch");
  expand_kernel<TA, TC, BM, BN, BK><<<grid, kThreads, 0, stream>>>(
      static_cast<const float*>(h.data), h.stride0, static_cast<const TC*>(m.data), m.stride0, m.stride1,
      static_cast<TA*>(const_cast<void*>(y.data)), y.stride0, y.stride1, T, N, accumulate, routing, dropout);
  check_launch("expand_kernel");
}

// The two tile classes' block shapes (flix.h).
constexpr BlockShape kSmall = kExpandBlock[0], kLarge = kExpandBlock[1];

}  // namespace

void expand(const Matrix& h, const Matrix& m, const Matrix& y, bool accumulate, const Routing& routing,
            Dropout dropout, Tile tile, int device, uintptr_t stream) {
  require(h.dtype == DType::f32 && h.stride1 == 1, "flix_kernels._C.expand: h must be fp32 with unit column stride");
  require(h.rows == y.rows && h.cols == routing.slots, "flix_kernels._C.expand: h must be (T, slots)");
  require(m.cols == y.cols && y.cols < (int64_t{1} << 31), "flix_kernels._C.expand: the factor and y disagree on N");
  require(routing.slots >= 0 && routing.num_examples >= 0, "flix_kernels._C.expand: bad routing sizes");
  if (y.rows == 0 || y.cols == 0 || (accumulate && routing.slots == 0)) return;
  // With no slots at all (no feature anywhere) the kernel writes zeros and reads no metadata.
  require(routing.num_examples > 0 && y.data != nullptr &&
              (routing.slots == 0 || (h.data != nullptr && m.data != nullptr && routing.slot_rank != nullptr &&
                                      routing.slot_feature != nullptr)),
          "flix_kernels._C.expand: null pointer");
  require(routing.cu_seqlens != nullptr || routing.seq_len > 0, "flix_kernels._C.expand: batched routing needs seq_len > 0");
  require_dtype_pair(y.dtype, m.dtype, "expand");
  DeviceGuard guard(device, "expand");
  dispatch_dtypes(y.dtype, m.dtype, "expand", [&](auto act, auto compute) {
    using TA = typename decltype(act)::type;
    using TC = typename decltype(compute)::type;
    if (tile == Tile::small) {
      launch<TA, TC, kSmall.rows, kSmall.cols, kSmall.k>(h, m, y, accumulate, routing, dropout, as_stream(stream));
    } else {
      launch<TA, TC, kLarge.rows, kLarge.cols, kLarge.k>(h, m, y, accumulate, routing, dropout, as_stream(stream));
    }
  });
}

}  // namespace flix
