// Dilated attention on tensor cores: one branch of the forward and of the backward (SPEC §3-5).
//
// NOT YET RUN ON A GPU. Compiled without a device by NVRTC for sm_80 and sm_90 in CI
// (tests/test_tensor_core_compile.py); its tile loop is emulated in NumPy against the reference
// (tests/test_tensor_core_tiles.py). Device correctness and speed: benchmarks/gpu_check.sh.
//
// The host (longnet_ref/backends/tensor_core.py) launches one kernel per branch and pass, on the
// CuPy arrays, and mixes the branches (SPEC §4) with the reference's mix_branches. Layout:
// q, k (B, N, H, D), v, dout (B, N, H, DV) of T = __half or __nv_bfloat16; every result in float.
//
// Work split (docs/gpu.md, "The tensor-core kernels", has the figure):
//   a thread block = WARPS warps = one tile of BLOCK_Q rows of one sparse segment P(i, s, h);
//   a warp = ROWS = 16 rows, the M of one nvcuda::wmma 16x16x16 fragment;
//   grid.x = segment s * tiles_per_segment + tile, grid.y = b * H + h.
// Rows of a sparse segment are s*w + o + t*r (SPEC §2): the tile loads compute that position
// and read the row straight from q, k, v, so no gathered copy is ever written.
// Index rules: transcribed from longnet_ref/index_sets.py (segment_size, segment_position,
// causal_key_count), the only home of which rows a head sees; the CI compile static_asserts
// this copy against values index_sets.py computes, and the NumPy tiling plan
// (longnet_ref/backends/tensor_core_tiles.py) calls those functions and is tested against them.

#include <mma.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace dilated {

using namespace nvcuda;

constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
constexpr int ROWS = 16;                   // rows per warp: one wmma fragment
constexpr int BLOCK_Q = WARPS * ROWS;      // 64 query rows per block
constexpr int BLOCK_K = 64;                // key rows per shared tile
constexpr int PAD = 8;                     // 16 bytes per shared row of T: fewer bank conflicts
constexpr int FLOAT_PAD = 4;               // 16 bytes per shared row of float
constexpr unsigned FULL = 0xffffffffu;          // every lane of a warp
#define INF __int_as_float(0x7f800000)        // +inf (NVRTC has no <cmath> INFINITY)

// ---- the index rules of SPEC §2-3 (longnet_ref/index_sets.py) ----------------------------

// Plain constexpr integer functions, so that the CI compile (tests/test_tensor_core_compile.py)
// checks them with static_asserts against values computed by index_sets.py itself.

// segment_size: #{t : o + t r < w, s w + o + t r < N}
__host__ __device__ constexpr int segment_size(int n, int w, int r, int o, int s) {
  const long long rest = (long long)n - (long long)s * w;             // N - s w
  const long long extent = (w < rest ? (long long)w : rest) - o;      // rows at or after the offset
  return extent <= 0 ? 0 : (int)((extent + r - 1) / r);
}

// segment_position: the t-th selected row of segment s, s w + o + t r
__host__ __device__ constexpr long long segment_position(int w, int r, int o, int s, int t) {
  return (long long)s * w + o + (long long)t * r;
}

// causal_key_count: query t of a sparse segment attends its keys 0..t
__host__ __device__ constexpr int causal_key_count(int t) { return t + 1; }

// ---- element types ------------------------------------------------------------------------

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---- one sparse segment of one (batch, head) ------------------------------------------------

struct Segment {
  int n, heads, w, r, o, s, b, h;
  int size;  // T_s, rows of this sparse segment

  __device__ Segment(int n_, int heads_, int w_, int r_, const int* offsets, int tiles_per_segment) {
    n = n_; heads = heads_; w = w_; r = r_;
    s = blockIdx.x / tiles_per_segment;
    b = blockIdx.y / heads;
    h = blockIdx.y % heads;
    o = offsets[h];
    size = segment_size(n, w, r, o, s);
  }

  // Element index of (b, position of row t, h, 0) in a (B, N, H, cols) array.
  __device__ __forceinline__ long long element(int t, int cols) const {
    return (((long long)b * n + segment_position(w, r, o, s, t)) * heads + h) * cols;
  }
  // Index of (b, position of row t, h) in a (B, N, H) array.
  __device__ __forceinline__ long long scalar(int t) const {
    return ((long long)b * n + segment_position(w, r, o, s, t)) * heads + h;
  }
};

// The gathered tile load: rows t0 .. t0 + TILE_ROWS - 1 of the sparse segment into a shared
// tile (row-major, leading dimension ld), 16 bytes per thread and access, zeros past `size`
// (zeros, not garbage: a masked score still multiplies a row of V in the P V product).
template <typename T, int COLS, int TILE_ROWS>
__device__ __forceinline__ void load_rows(T* tile, int ld, const T* x, const Segment& seg, int t0) {
  constexpr int VECTOR = 16 / sizeof(T);          // elements per 16-byte access
  constexpr int PER_ROW = COLS / VECTOR;
  for (int i = threadIdx.x; i < TILE_ROWS * PER_ROW; i += THREADS) {
    const int j = i / PER_ROW, c = (i % PER_ROW) * VECTOR;
    int4 value = make_int4(0, 0, 0, 0);
    if (t0 + j < seg.size) value = *reinterpret_cast<const int4*>(x + seg.element(t0 + j, COLS) + c);
    *reinterpret_cast<int4*>(tile + j * ld + c) = value;
  }
}

// A (ROWS x 16*N_BLOCKS) float block = A (ROWS x 16*K_BLOCKS, row-major) times B, stored
// row-major at `out` (leading dimension ldo). B_TRANSPOSED: B = X^T of a row-major tile X,
// read column-major (the Q K^T of the scores); otherwise B is row-major (the P V of the outputs).
template <bool TRANSPOSED> struct LayoutOf { using type = wmma::row_major; };
template <> struct LayoutOf<true> { using type = wmma::col_major; };

template <typename T, int K_BLOCKS, int N_BLOCKS, bool B_TRANSPOSED>
__device__ __forceinline__ void warp_product(const T* a, int lda, const T* b, int ldb, float* out, int ldo) {
  for (int nb = 0; nb < N_BLOCKS; ++nb) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.0f);
    for (int kb = 0; kb < K_BLOCKS; ++kb) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, typename LayoutOf<B_TRANSPOSED>::type> fb;
      wmma::load_matrix_sync(fa, a + kb * 16, lda);
      if constexpr (B_TRANSPOSED) {
        wmma::load_matrix_sync(fb, b + nb * 16 * ldb + kb * 16, ldb);  // B[k][n] = X[n][k]
      } else {
        wmma::load_matrix_sync(fb, b + kb * 16 * ldb + nb * 16, ldb);
      }
      wmma::mma_sync(c, fa, fb, c);
    }
    wmma::store_matrix_sync(out + nb * 16, c, ldo, wmma::mem_row_major);
  }
}

// Accumulating version: acc[nb] += A B with B row-major, the fragments kept across tiles
// (the backward's dK, dV, dQ are never rescaled, so they stay in registers).
template <typename T, int K_BLOCKS, int N_BLOCKS>
__device__ __forceinline__ void warp_accumulate(
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&acc)[N_BLOCKS],
    const T* a, int lda, const T* b, int ldb) {
  for (int nb = 0; nb < N_BLOCKS; ++nb) {
    for (int kb = 0; kb < K_BLOCKS; ++kb) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, a + kb * 16, lda);
      wmma::load_matrix_sync(fb, b + kb * 16 * ldb + nb * 16, ldb);
      wmma::mma_sync(acc[nb], fa, fb, acc[nb]);
    }
  }
}

// The max of the online softmax, NaN-sticky (fmaxf would drop a NaN: SPEC §7 wants it kept).
__device__ __forceinline__ float max_keep_nan(float a, float b) { return (b > a || b != b) ? b : a; }

// The kernel needs `bytes` of dynamic shared memory; a launch with less is a host bug: trap.
__device__ __forceinline__ void require_shared(unsigned bytes) {
  unsigned given;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(given));
  if (given < bytes) __trap();
}

// ---- forward ------------------------------------------------------------------------------

// Shared memory of the forward, byte offsets (every region starts 32-byte aligned, as wmma needs).
template <typename T, int D, int DV>
struct ForwardShared {
  static constexpr int LDQ = D + PAD, LDV = DV + PAD, LDP = BLOCK_K + PAD;
  static constexpr int LDS = (BLOCK_K > DV ? BLOCK_K : DV) + FLOAT_PAD;  // scores, then P V
  static constexpr unsigned q = 0;
  static constexpr unsigned k = q + BLOCK_Q * LDQ * sizeof(T);
  static constexpr unsigned v = k + BLOCK_K * LDQ * sizeof(T);
  static constexpr unsigned scores = v + BLOCK_K * LDV * sizeof(T);      // float [WARPS][ROWS][LDS]
  static constexpr unsigned probs = scores + WARPS * ROWS * LDS * 4;     // T [WARPS][ROWS][LDP]
  static constexpr unsigned bytes = probs + WARPS * ROWS * LDP * sizeof(T);
};

// One branch: o_i and lse_i of SPEC §3 for the rows of this block (FlashAttention-2 forward).
//
// Per key tile: S = Q K^T on the tensor cores (fp32 accumulate) into the warp's float scratch;
// two lanes per query row mask, scale and fold S into the online softmax (m, l) and rescale
// their half of the output accumulator (registers); P rounded to T; P V on the tensor cores
// into the scratch, added to the accumulator. Uncovered rows keep lse_i = -inf (host fills).
template <typename T, int D, int DV>
__global__ void __launch_bounds__(THREADS) forward_branch(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    int n, int heads, int w, int r, const int* __restrict__ offsets, int tiles_per_segment,
    int causal, float scale, float* __restrict__ out_branch, float* __restrict__ lse_branch) {
  using S = ForwardShared<T, D, DV>;
  extern __shared__ __align__(128) unsigned char shared[];
  require_shared(S::bytes);
  T* q_tile = reinterpret_cast<T*>(shared + S::q);
  T* k_tile = reinterpret_cast<T*>(shared + S::k);
  T* v_tile = reinterpret_cast<T*>(shared + S::v);

  const Segment seg(n, heads, w, r, offsets, tiles_per_segment);
  const int q0 = (blockIdx.x % tiles_per_segment) * BLOCK_Q;
  if (q0 >= seg.size) return;  // the whole block lies past a short segment: no barrier skipped
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* scores = reinterpret_cast<float*>(shared + S::scores) + warp * ROWS * S::LDS;
  T* probs = reinterpret_cast<T*>(shared + S::probs) + warp * ROWS * S::LDP;
  const int row = lane / 2, half = lane % 2;   // two lanes per query row, half the columns each
  const int tq = q0 + warp * ROWS + row;       // this lane's query row of the sparse segment
  constexpr int KEY_COLS = BLOCK_K / 2, OUT_COLS = DV / 2;

  load_rows<T, D, BLOCK_Q>(q_tile, S::LDQ, q, seg, q0);
  float m = -INF, l = 0.0f, acc[OUT_COLS];
#pragma unroll
  for (int c = 0; c < OUT_COLS; ++c) acc[c] = 0.0f;

  // Causal: the block's last row attends keys up to itself; later tiles are skipped by all.
  const int key_end = causal ? min(seg.size, causal_key_count(q0 + BLOCK_Q - 1)) : seg.size;
  for (int k0 = 0; k0 < key_end; k0 += BLOCK_K) {
    __syncthreads();  // the previous tile is no longer read
    load_rows<T, D, BLOCK_K>(k_tile, S::LDQ, k, seg, k0);
    load_rows<T, DV, BLOCK_K>(v_tile, S::LDV, v, seg, k0);
    __syncthreads();

    // S = Q K^T: (16 x D) times (D x 64), this warp's rows.
    warp_product<T, D / 16, BLOCK_K / 16, true>(q_tile + warp * ROWS * S::LDQ, S::LDQ, k_tile, S::LDQ, scores, S::LDS);
    __syncwarp();

    // Online softmax on this lane's 32 scores of row `row`.
    float tile_max = -INF;
    for (int j = half * KEY_COLS; j < (half + 1) * KEY_COLS; ++j) {
      const int tk = k0 + j;
      const bool attended = tq < seg.size && tk < seg.size && (!causal || tk < causal_key_count(tq));
      const float score = attended ? scale * scores[row * S::LDS + j] : -INF;
      scores[row * S::LDS + j] = score;
      tile_max = max_keep_nan(tile_max, score);
    }
    tile_max = max_keep_nan(tile_max, __shfl_xor_sync(FULL, tile_max, 1));
    const float m_new = max_keep_nan(m, tile_max);
    const float correction = m == -INF ? 0.0f : expf(m - m_new);  // rescales the old terms
    const float shift = m_new == -INF ? 0.0f : m_new;
    float tile_sum = 0.0f;
    for (int j = half * KEY_COLS; j < (half + 1) * KEY_COLS; ++j) {
      const float p = expf(scores[row * S::LDS + j] - shift);  // masked: exp(-inf) = 0
      tile_sum += p;
      probs[row * S::LDP + j] = from_float<T>(p);
    }
    tile_sum += __shfl_xor_sync(FULL, tile_sum, 1);
    l = l * correction + tile_sum;
    m = m_new;
#pragma unroll
    for (int c = 0; c < OUT_COLS; ++c) acc[c] *= correction;
    __syncwarp();

    // P V: (16 x 64) times (64 x DV) into the scratch, then into the accumulator.
    warp_product<T, BLOCK_K / 16, DV / 16, false>(probs, S::LDP, v_tile, S::LDV, scores, S::LDS);
    __syncwarp();
#pragma unroll
    for (int c = 0; c < OUT_COLS; ++c) acc[c] += scores[row * S::LDS + half * OUT_COLS + c];
    __syncwarp();  // the scratch is written again by the next tile's scores
  }

  if (tq < seg.size && l != 0.0f) {  // l = 0: no key attended (NaN: kept, SPEC §7)
    const long long e = seg.element(tq, DV) + half * OUT_COLS;
#pragma unroll
    for (int c = 0; c < OUT_COLS; ++c) out_branch[e + c] = acc[c] / l;   // o_i
    if (half == 0) lse_branch[seg.scalar(tq)] = m + logf(l);              // lse_i = m + log l
  }
}

// ---- backward -----------------------------------------------------------------------------

// Shared memory of both backward kernels: the block's own 64 rows (`own`: keys for dK/dV,
// queries for dQ) and the 64 rows of the tile it loops over (`other`).
template <typename T, int D, int DV>
struct BackwardShared {
  static constexpr int LDQ = D + PAD, LDV = DV + PAD, LDP = BLOCK_K + PAD;
  static constexpr int LDS = (BLOCK_K > D ? BLOCK_K : D) + FLOAT_PAD;
  static constexpr int LDS_V = (BLOCK_K > DV ? BLOCK_K : DV) + FLOAT_PAD;
  static constexpr unsigned own_d = 0;                                      // K (dK/dV) or Q (dQ)
  static constexpr unsigned own_dv = own_d + BLOCK_Q * LDQ * sizeof(T);      // V or dO
  static constexpr unsigned other_d = own_dv + BLOCK_Q * LDV * sizeof(T);    // Q or K
  static constexpr unsigned other_dv = other_d + BLOCK_K * LDQ * sizeof(T);  // dO or V
  static constexpr unsigned lse = other_dv + BLOCK_K * LDV * sizeof(T);      // float [64]
  static constexpr unsigned dsum = lse + BLOCK_K * 4;                        // float [64]
  static constexpr unsigned scores = dsum + BLOCK_K * 4;                     // float [WARPS][ROWS][LDS]
  static constexpr unsigned dprobs = scores + WARPS * ROWS * LDS * 4;        // float [WARPS][ROWS][LDS_V]
  static constexpr unsigned probs = dprobs + WARPS * ROWS * LDS_V * 4;       // T [WARPS][ROWS][LDP]
  static constexpr unsigned dscores = probs + WARPS * ROWS * LDP * sizeof(T); // T [WARPS][ROWS][LDP]
  static constexpr unsigned bytes = dscores + WARPS * ROWS * LDP * sizeof(T);
};

// BackwardShared's regions as pointers, the scratch ones this warp's rows. A kernel binds them to
// its own names: `const auto [k_tile, v_tile, q_tile, do_tile, ...] = BackwardTiles<T, D, DV>(warp);`
// (own = K, V for dK/dV and Q, dO for dQ; other = the tile it loops over). The kernel needs
// BackwardShared::bytes of dynamic shared memory; a launch with less is a host bug: trap.
template <typename T, int D, int DV>
struct BackwardTiles {
  using S = BackwardShared<T, D, DV>;
  T *own_d, *own_dv, *other_d, *other_dv;
  float *lse, *dsum;        // [BLOCK_K]
  float *scores, *dprobs;   // this warp's [ROWS][LDS] and [ROWS][LDS_V]
  T *probs, *dscores;       // this warp's [ROWS][LDP]

  __device__ __forceinline__ explicit BackwardTiles(int warp) {
    extern __shared__ __align__(128) unsigned char shared[];
    require_shared(S::bytes);
    own_d = reinterpret_cast<T*>(shared + S::own_d);
    own_dv = reinterpret_cast<T*>(shared + S::own_dv);
    other_d = reinterpret_cast<T*>(shared + S::other_d);
    other_dv = reinterpret_cast<T*>(shared + S::other_dv);
    lse = reinterpret_cast<float*>(shared + S::lse);
    dsum = reinterpret_cast<float*>(shared + S::dsum);
    scores = reinterpret_cast<float*>(shared + S::scores) + warp * ROWS * S::LDS;
    dprobs = reinterpret_cast<float*>(shared + S::dprobs) + warp * ROWS * S::LDS_V;
    probs = reinterpret_cast<T*>(shared + S::probs) + warp * ROWS * S::LDP;
    dscores = reinterpret_cast<T*>(shared + S::dscores) + warp * ROWS * S::LDP;
  }
};

// The global LSE and Dsum of `count` query rows into shared memory. An uncovered row
// (LSE = -inf) is read as +inf, so its P = exp(S - LSE) is 0, not NaN.
__device__ __forceinline__ void load_row_stats(float* lse_tile, float* dsum_tile, const float* lse, const float* dsum,
                                               const Segment& seg, int t0) {
  for (int i = threadIdx.x; i < BLOCK_K; i += THREADS) {
    const bool valid = t0 + i < seg.size;
    const float value = valid ? lse[seg.scalar(t0 + i)] : INF;
    lse_tile[i] = value == -INF ? INF : value;
    dsum_tile[i] = valid ? dsum[seg.scalar(t0 + i)] : 0.0f;
  }
}

// Add a warp's (16 x COLS) float block (row-major in `scratch`) times `factor` into the rows
// t0 + warp*16 + i of a (B, N, H, COLS) float gradient. Within one launch every row of the
// branch belongs to exactly one block, and branches run one launch after another: no atomics.
template <int COLS>
__device__ __forceinline__ void add_rows(float* grad, const float* scratch, int ld, const Segment& seg, int t_first, float factor) {
  const int lane = threadIdx.x % 32;
  for (int i = lane; i < ROWS * COLS; i += 32) {
    const int j = i / COLS, c = i % COLS;
    if (t_first + j < seg.size) grad[seg.element(t_first + j, COLS) + c] += factor * scratch[j * ld + c];
  }
}

// dK and dV of one branch (SPEC §5), FlashAttention-2 form: a block owns 64 key rows (a warp 16)
// and loops over the query tiles that attend them, with the MIXED LSE and Dsum = rowsum(dO * out):
//   S^T = K Q^T,  P^T = exp(scale S^T - LSE),  dP^T = V dO^T,  dS^T = P^T (dP^T - Dsum),
//   dV += P^T dO,  dK += scale dS^T Q   (accumulated in wmma fragments across query tiles).
template <typename T, int D, int DV>
__global__ void __launch_bounds__(THREADS) backward_keys_branch(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ dsum,
    int n, int heads, int w, int r, const int* __restrict__ offsets, int tiles_per_segment,
    int causal, float scale, float* __restrict__ dk, float* __restrict__ dv) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row = lane / 2, half = lane % 2;
  const auto [k_tile, v_tile, q_tile, do_tile, lse_tile, dsum_tile, scores, dprobs, probs, dscores] = BackwardTiles<T, D, DV>(warp);
  const Segment seg(n, heads, w, r, offsets, tiles_per_segment);
  const int k0 = (blockIdx.x % tiles_per_segment) * BLOCK_Q;
  if (k0 >= seg.size) return;
  const int tk = k0 + warp * ROWS + row;  // this lane's key row
  using S = BackwardShared<T, D, DV>;
  constexpr int QUERY_COLS = BLOCK_K / 2;

  load_rows<T, D, BLOCK_Q>(k_tile, S::LDQ, k, seg, k0);
  load_rows<T, DV, BLOCK_Q>(v_tile, S::LDV, v, seg, k0);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk_acc[D / 16], dv_acc[DV / 16];
  for (auto& f : dk_acc) wmma::fill_fragment(f, 0.0f);
  for (auto& f : dv_acc) wmma::fill_fragment(f, 0.0f);

  // Causal: queries before the block's first key never attend it (BLOCK_K == BLOCK_Q).
  for (int q0 = causal ? k0 : 0; q0 < seg.size; q0 += BLOCK_K) {
    __syncthreads();
    load_rows<T, D, BLOCK_K>(q_tile, S::LDQ, q, seg, q0);
    load_rows<T, DV, BLOCK_K>(do_tile, S::LDV, dout, seg, q0);
    load_row_stats(lse_tile, dsum_tile, lse, dsum, seg, q0);
    __syncthreads();

    warp_product<T, D / 16, BLOCK_K / 16, true>(k_tile + warp * ROWS * S::LDQ, S::LDQ, q_tile, S::LDQ, scores, S::LDS);        // S^T = K Q^T
    warp_product<T, DV / 16, BLOCK_K / 16, true>(v_tile + warp * ROWS * S::LDV, S::LDV, do_tile, S::LDV, dprobs, S::LDS_V);  // dP^T = V dO^T
    __syncwarp();
    for (int j = half * QUERY_COLS; j < (half + 1) * QUERY_COLS; ++j) {
      const int tq = q0 + j;
      const bool attended = tk < seg.size && tq < seg.size && (!causal || tk < causal_key_count(tq));
      const float p = attended ? expf(scale * scores[row * S::LDS + j] - lse_tile[j]) : 0.0f;
      const float ds = attended ? p * (dprobs[row * S::LDS_V + j] - dsum_tile[j]) : 0.0f;
      probs[row * S::LDP + j] = from_float<T>(p);      // P^T
      dscores[row * S::LDP + j] = from_float<T>(ds);   // dS^T
    }
    __syncwarp();
    warp_accumulate<T, BLOCK_K / 16, DV / 16>(dv_acc, probs, S::LDP, do_tile, S::LDV);   // dV += P^T dO
    warp_accumulate<T, BLOCK_K / 16, D / 16>(dk_acc, dscores, S::LDP, q_tile, S::LDQ);   // dK += dS^T Q
  }

  __syncwarp();
  for (int nb = 0; nb < DV / 16; ++nb) wmma::store_matrix_sync(dprobs + nb * 16, dv_acc[nb], S::LDS_V, wmma::mem_row_major);
  __syncwarp();
  add_rows<DV>(dv, dprobs, S::LDS_V, seg, k0 + warp * ROWS, 1.0f);
  for (int nb = 0; nb < D / 16; ++nb) wmma::store_matrix_sync(scores + nb * 16, dk_acc[nb], S::LDS, wmma::mem_row_major);
  __syncwarp();
  add_rows<D>(dk, scores, S::LDS, seg, k0 + warp * ROWS, scale);
}

// dQ of one branch (SPEC §5), the second pass of the FlashAttention-2 backward (deterministic,
// no atomics): a block owns 64 query rows (a warp 16) and loops over their key tiles:
//   S = Q K^T,  P = exp(scale S - LSE),  dP = dO V^T,  dS = P (dP - Dsum),  dQ += scale dS K.
template <typename T, int D, int DV>
__global__ void __launch_bounds__(THREADS) backward_queries_branch(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ dsum,
    int n, int heads, int w, int r, const int* __restrict__ offsets, int tiles_per_segment,
    int causal, float scale, float* __restrict__ dq) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row = lane / 2, half = lane % 2;
  const auto [q_tile, do_tile, k_tile, v_tile, lse_tile, dsum_tile, scores, dprobs, unused_probs, dscores] = BackwardTiles<T, D, DV>(warp);
  const Segment seg(n, heads, w, r, offsets, tiles_per_segment);
  const int q0 = (blockIdx.x % tiles_per_segment) * BLOCK_Q;
  if (q0 >= seg.size) return;
  const int local = warp * ROWS + row;  // this lane's query row within the block
  const int tq = q0 + local;
  using S = BackwardShared<T, D, DV>;
  constexpr int KEY_COLS = BLOCK_K / 2;

  load_rows<T, D, BLOCK_Q>(q_tile, S::LDQ, q, seg, q0);
  load_rows<T, DV, BLOCK_Q>(do_tile, S::LDV, dout, seg, q0);
  load_row_stats(lse_tile, dsum_tile, lse, dsum, seg, q0);  // this block's own query rows
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dq_acc[D / 16];
  for (auto& f : dq_acc) wmma::fill_fragment(f, 0.0f);

  const int key_end = causal ? min(seg.size, causal_key_count(q0 + BLOCK_Q - 1)) : seg.size;
  for (int k0 = 0; k0 < key_end; k0 += BLOCK_K) {
    __syncthreads();
    load_rows<T, D, BLOCK_K>(k_tile, S::LDQ, k, seg, k0);
    load_rows<T, DV, BLOCK_K>(v_tile, S::LDV, v, seg, k0);
    __syncthreads();

    warp_product<T, D / 16, BLOCK_K / 16, true>(q_tile + warp * ROWS * S::LDQ, S::LDQ, k_tile, S::LDQ, scores, S::LDS);        // S = Q K^T
    warp_product<T, DV / 16, BLOCK_K / 16, true>(do_tile + warp * ROWS * S::LDV, S::LDV, v_tile, S::LDV, dprobs, S::LDS_V);  // dP = dO V^T
    __syncwarp();
    const float lse_q = lse_tile[local], dsum_q = dsum_tile[local];
    for (int j = half * KEY_COLS; j < (half + 1) * KEY_COLS; ++j) {
      const int tk = k0 + j;
      const bool attended = tq < seg.size && tk < seg.size && (!causal || tk < causal_key_count(tq));
      const float p = attended ? expf(scale * scores[row * S::LDS + j] - lse_q) : 0.0f;
      dscores[row * S::LDP + j] = from_float<T>(attended ? p * (dprobs[row * S::LDS_V + j] - dsum_q) : 0.0f);
    }
    __syncwarp();
    warp_accumulate<T, BLOCK_K / 16, D / 16>(dq_acc, dscores, S::LDP, k_tile, S::LDQ);  // dQ += dS K
  }

  __syncwarp();
  for (int nb = 0; nb < D / 16; ++nb) wmma::store_matrix_sync(scores + nb * 16, dq_acc[nb], S::LDS, wmma::mem_row_major);
  __syncwarp();
  add_rows<D>(dq, scores, S::LDS, seg, q0 + warp * ROWS, scale);
}

}  // namespace dilated
