// The C++ interface of flix_kernels._C: launchers of the FLix CUDA kernels.
//
// Nothing here depends on PyTorch: the Python layer (flix_kernels/cuda/launch.py) validates the
// tensors (device, dtype, shape, strides) and passes raw device pointers, sizes, strides (in
// elements) and the CUDA stream to launch on. So one build works with any torch version.
// Launchers check their arguments (std::invalid_argument -> ValueError) and every CUDA call
// (std::runtime_error -> RuntimeError, naming the kernel).
#pragma once
#include <cstdint>

namespace flix {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// A strided 2-D view of device memory: element (i, j) is at data + i * stride0 + j * stride1.
struct Matrix {
  const void* data = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t stride0 = 0, stride1 = 0;
  DType dtype = DType::f32;
};

// A batch's routing (flix_kernels.routing.KernelMetadata), int32 device tensors.
struct Routing {
  const int32_t* slot_rank = nullptr;     // (B, slots): row of lora_A / column of lora_B of each slot
  const int32_t* slot_feature = nullptr;  // (B, slots): feature owning the slot, -1 = padding (slots are
                                          // a valid prefix followed by padding)
  const int32_t* cu_seqlens = nullptr;    // (B + 1,) for packed tokens; nullptr: example e owns
                                          // tokens [e * seq_len, (e + 1) * seq_len)
  int32_t num_examples = 0;               // B
  int32_t slots = 0;                      // R_slots, the largest active rank of the batch
  int32_t seq_len = 0;                    // tokens per example when not packed
};

// The (feature, example) pairs of the batch, sorted by feature then example.
struct Pairs {
  const int32_t* pair_example = nullptr;        // (P,)
  const int32_t* pair_slot = nullptr;           // (P,) first slot of the pair's feature in the example
  const int32_t* feature_pair_start = nullptr;  // (F + 1,)
  const int32_t* rank_offsets = nullptr;        // (F + 1,)
  int32_t num_features = 0;                     // F
  int32_t max_feature_rank = 0;                 // largest rank of the feature space
};

// Per-feature scales: data (F,) in dtype, or nullptr to use `value` for every feature.
struct Scales {
  const void* data = nullptr;
  DType dtype = DType::f32;
  float value = 0.0f;
};

struct Dropout {
  const int64_t* seed = nullptr;  // (1,) device int64; nullptr = no dropout
  float p = 0.0f;
};

enum class Tile : int { small = 0, large = 1 };  // 16-row tiles (decode, rank <= 16) or 64-row tiles

// Block shapes of each kernel family by tile class (index: Tile), written once: the launchers
// instantiate them and the extension reports them (_C.TILES) to the Python launch plans.
struct BlockShape {
  int rows, cols, k;  // token (or rank) rows, columns, K per step
};
constexpr BlockShape kShrinkBlock[2] = {{16, 64, 64}, {64, 64, 32}};        // rows: tokens, cols: rank slots
constexpr BlockShape kExpandBlock[2] = {{16, 64, 32}, {64, 128, 32}};       // rows: tokens, k: rank slots
constexpr BlockShape kWeightGradBlock[2] = {{16, 128, 32}, {64, 128, 32}};  // rows: rank rows, k: tokens
constexpr BlockShape kDecodeBlock = {0, 64, 32};  // cols: output columns per block, k: K per pipeline stage

// Kernels that split K over blocks sum the parts in the same launch: the last block of each output
// tile to finish adds them in split order. They count arrivals in `counters`, int32 device memory of
// at least kMaxSplitTiles entries that must be zero before a launch and is zero again after it (one
// buffer per stream: launches that run at the same time must not share one).
constexpr int kMaxSplitTiles = 1 << 16;

// H (T, slots) fp32 = s_slot * drop(X) M_S^T, M_S the rank rows of each token's example.
// X is (T, K) in the activation dtype, M the factor (R_total, K) in the compute dtype (for the input
// gradient: lora_B^T). With splits > 1 the K range is cut into `splits` parts whose results go to
// `workspace` (splits, T, slots) and are summed in a fixed order (deterministic).
void shrink(const Matrix& x, const Matrix& m, float* h, float* workspace, int* counters, int splits,
            const Routing& routing, Scales scales, Dropout dropout, Tile tile, int device, uintptr_t stream);

// The decode path (T <= kDecodeTokens): a whole FLix linear layer in two launches,
//   H (T, slots) fp32 = shrink(X, A) (written to h; K split in `shrink_splits` parts, see shrink), then
//   Y (T, N) = X W^T + bias + H M_S, M the expand factor (R_total, N) (lora_B^T) in the compute dtype,
// by one kernel that reads each row of W once: every token is in the one row of tiles (16 or 64 rows,
// zero-filled past T), K is split over `splits` blocks per 64-column tile whose fp32 partials
// (workspace: splits x T x N) the last of them sums in split order, and each split adds the FLix update
// of the tokens t with t % splits == its index. X, W, Y and bias are in the activation dtype; X and W
// have unit column stride, 16-byte aligned rows and K a multiple of 16 bytes (cp.async); bias may be
// nullptr. The forward of the layer: no dropout after the shrink.
constexpr int kDecodeTokens = 64;

struct DecodeLinear {
  Matrix x, w, a, m, y;  // a: the shrink factor (lora_A, R_total x K); m: the expand factor (R_total x N)
  const void* bias = nullptr;
  float* h = nullptr;
  float* shrink_workspace = nullptr;
  int shrink_splits = 1;
  float* workspace = nullptr;
  int splits = 1;
  int* counters = nullptr;
  Scales scales;
  Dropout dropout;
};
void decode_linear(const DecodeLinear& args, const Routing& routing, int device, uintptr_t stream);

// Y (T, N) (=, or += when accumulate) drop(H M_S) where M is (R_total, N) in the compute dtype
// (lora_B^T, or lora_A for the input gradient) and Y is in the activation dtype. Tiles whose tokens
// use no feature leave Y untouched when accumulating.
void expand(const Matrix& h, const Matrix& m, const Matrix& y, bool accumulate, const Routing& routing,
            Dropout dropout, Tile tile, int device, uintptr_t stream);

// Rows of G (R_total, N) per feature k: G[k's rows, n] = sum over k's tokens t of L[t, slot_k + j] drop(R)[t, n].
// L (T, slots) fp32 (h or the shrunk output gradient), R (T, N) in the activation dtype, G in the compute
// dtype. chunks == 0: one program per (feature, column tile) owns its rows and walks the feature's tokens.
// chunks > 0: each (example, chunk of `chunk` tokens, column tile) writes its own fp32 tile of `workspace`
// (B, chunks, slots, N), then one program per (feature, column tile) adds them in a fixed order. Both are
// deterministic (no atomics); features absent from the batch get zero rows.
void weight_grad(const Matrix& l, const Matrix& r, const Matrix& g, const Routing& routing, const Pairs& pairs,
                 float* workspace, int chunks, int chunk, Dropout dropout, Tile tile, int device, uintptr_t stream);

// Build facts: target architectures, CUDA version, compiler.
const char* build_archs();
int cuda_runtime_version();  // the CUDA runtime this was built with (e.g. 13000)
const char* compiler_version();
const char* build_flags();  // build type and nvcc options

}  // namespace flix
