// KDA forward for Hopper (sm_90a), version 1: one thread block per (sequence, head), 16-token chunks,
// fp32 state held in registers for the whole sequence, bf16 tensor-core products (mma.sync through CuTe's
// SM80 atoms), double-buffered cp.async loads. Design, byte/FLOP budget and measurements:
// docs/kernel_sm90.md.
//
// Per chunk of C = 16 tokens (Γ = inclusive cumsum of the log2-decay inside the chunk, all per key
// channel; scale folded into q):
//   QG = q̂·scale ⊙ 2^Γ,  KG = k̂ ⊙ 2^Γ,  KR = k̂ ⊙ 2^−Γ,  KU = k̂ ⊙ 2^(Γ_C − Γ)
//   A_kk = strict_lower(diag(b) · KG · KRᵀ),   A_qk = lower(QG · KRᵀ)
//   T'   = (I + A_kk)^−1 · diag(b)
//   v'   = T' · (v − KG · S)                 (= U − W·S of the SPEC, with W = T'·KG, U = T'·v)
//   o    = QG · S + A_qk · v'
//   S    ← diag(2^Γ_C) · S + KUᵀ · v'
// Within 16 tokens the lower-bound gate (a ≥ −5 per token) keeps 2^±Γ inside [e^−80, e^80], so the
// factorised decays e^(Γ_i − Γ_j) = 2^Γ_i · 2^−Γ_j stay finite in fp32 and bf16.
//
// The state lives transposed (Sᵀ, V × K, the FlashKDA layout) in the accumulator fragments of the
// 8 warps: warp w owns value rows [16w, 16w + 16). In that layout Sᵀ is directly the A operand of
// Sᵀ·Xᵀ products, so the state never goes through shared memory.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

#include "cuda/cuda_check.hpp"
#include "cuda/forward_params.hpp"
#include "cuda/sm90/kda_forward_sm90.hpp"

namespace flash_kda::cuda::sm90 {
namespace {

using bf16 = __nv_bfloat16;

struct Config {
  static constexpr int kChunk = 16;
  static constexpr int kHeadDimK = 128;
  static constexpr int kHeadDimV = 128;
  // Warp specialisation: warps [0, 8) hold the state and run the recurrence (consumers); warps [8, 16)
  // load and prepare chunks ahead of them (producers).
  static constexpr int kStateWarps = 8;
  static constexpr int kPrepWarps = 8;
  static constexpr int kGroupThreads = 256;  // threads per role
  static constexpr int kThreads = (kStateWarps + kPrepWarps) * 32;
  static constexpr int kStateRegisters = 184;  // setmaxnreg per role; 256 threads each: 184 + 72 = 256
  static constexpr int kPrepRegisters = 72;
  // Rows of 128 bf16 padded to 136 (272 bytes): the 8 row addresses of one ldmatrix then fall into
  // 8 different 16-byte bank groups, so loads are conflict-free without a swizzle.
  static constexpr int kTileStride = kHeadDimK + 8;
  // 16 × 16 matrices padded to 24 columns (48-byte rows), conflict-free for the same reason.
  static constexpr int kSmallStride = 24;
  static constexpr float kLog2e = 1.4426950408889634f;
  static constexpr int kStages = 3;  // raw-input stages: chunk c being prepared, c + 1 and c + 2 in flight

  static_assert(kHeadDimV == kStateWarps * 16, "each state warp owns 16 value rows of the transposed state");
  static_assert(kHeadDimV == kHeadDimK, "the preparer copies v with the key-channel mapping");
  static_assert(kGroupThreads == kStateWarps * 32 && kGroupThreads == kPrepWarps * 32, "two equal roles");
  static_assert(kGroupThreads == 2 * kHeadDimK, "preparation gives each key channel two threads");
  static_assert(kGroupThreads == 8 * 2 * kChunk, "preparation gives each q/k row 8 threads for its norm");
  static_assert(kChunk == 16, "the chunk is one m16n8k16 tile tall; the gate bound assumes 16 tokens");
  static_assert(kStateRegisters + kPrepRegisters == 256 && kStateRegisters % 8 == 0 && kPrepRegisters % 8 == 0,
                "the register file (64 K) split between two roles of 256 threads, in steps of 8");
};

// Named barriers (id 0 is __syncthreads). FULL[b]: producers → consumers, "prepared buffer b is ready";
// EMPTY[b]: consumers → producers, "buffer b may be overwritten"; kPrep: among the producers only.
enum class NamedBarrier : int { kPrep = 1, kFull0 = 2, kFull1 = 3, kEmpty0 = 4, kEmpty1 = 5 };

__device__ __forceinline__ void barrier_sync(NamedBarrier id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(static_cast<int>(id)), "r"(threads) : "memory");
}
__device__ __forceinline__ void barrier_arrive(NamedBarrier id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(static_cast<int>(id)), "r"(threads) : "memory");
}
__device__ __forceinline__ NamedBarrier full_barrier(int64_t chunk) {
  return chunk % 2 == 0 ? NamedBarrier::kFull0 : NamedBarrier::kFull1;
}
__device__ __forceinline__ NamedBarrier empty_barrier(int64_t chunk) {
  return chunk % 2 == 0 ? NamedBarrier::kEmpty0 : NamedBarrier::kEmpty1;
}

struct alignas(16) SharedStorage {
  struct Stage {  // raw inputs of one chunk, as loaded (read by the producers only)
    bf16 q[Config::kChunk][Config::kTileStride];
    bf16 k[Config::kChunk][Config::kTileStride];
    bf16 v[Config::kChunk][Config::kTileStride];
    bf16 g[Config::kChunk][Config::kTileStride];
  };
  struct Prepared {  // everything the state warps need about one chunk (header comment)
    bf16 qg[Config::kChunk][Config::kTileStride];
    bf16 kg[Config::kChunk][Config::kTileStride];
    bf16 kr[Config::kChunk][Config::kTileStride];
    bf16 ku[Config::kChunk][Config::kTileStride];
    bf16 v[Config::kChunk][Config::kTileStride];
    bf16 t_scaled[Config::kChunk][Config::kSmallStride];  // T' = (I + A_kk)^-1 diag(b)
    bf16 a_qk[Config::kChunk][Config::kSmallStride];
    float decay[Config::kHeadDimK];  // 2^Γ_C
    float q_rnorm[Config::kChunk];
    float k_rnorm[Config::kChunk];
    float b[Config::kChunk];
  };
  Stage stage[Config::kStages];
  Prepared prepared[2];  // chunk c (state warps) and chunk c + 1 (producers)
  bf16 out_stage[Config::kStateWarps][Config::kChunk][Config::kSmallStride];  // per-warp transpose of o
  float a_kk_t[Config::kChunk][Config::kChunk];  // A_kkᵀ (producer warp 0 only): column m is a row
};

// ---------------------------------------------------------------------------------------------------
// Small device helpers
// ---------------------------------------------------------------------------------------------------
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1 / (1 + e^-x); for x → −∞ the ex2 gives +inf and the reciprocal 0, as it should.
__device__ __forceinline__ float sigmoid(float x) { return fast_rcp(1.f + fast_exp2(-x * Config::kLog2e)); }

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// d += a · b for one m16n8k16 tile (bf16 operands, fp32 accumulators).
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  cute::SM80_16x8x16_F32BF16BF16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1, d[0], d[1], d[2],
                                            d[3]);
}

__device__ __forceinline__ void ldsm(const bf16* smem, uint32_t (&r)[4]) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r[0], r[1], r[2], r[3]);
}

__device__ __forceinline__ void ldsm_trans(const bf16* smem, uint32_t (&r)[4]) {
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r[0], r[1], r[2], r[3]);
}

// Address of this lane's row for an ldmatrix.x4 that yields the A fragment of a row-major 16 × 16
// block starting at (row0, col0).
__device__ __forceinline__ const bf16* a_frag_addr(const bf16* base, int stride, int col0, int lane) {
  return base + (lane % 16) * stride + col0 + (lane / 16) * 8;
}

// ldmatrix.x4 address giving the B fragments of two n8 tiles when B is stored n-major (Bt[n][k], i.e.
// the rows of the stored matrix are the output columns): r0,r1 = tile n0..7, r2,r3 = tile n8..15.
__device__ __forceinline__ const bf16* b_frag_addr_n_major(const bf16* base, int stride, int k0, int lane) {
  return base + ((lane % 8) + (lane / 16) * 8) * stride + k0 + ((lane / 8) % 2) * 8;
}

// ldmatrix.x4.trans address giving the B fragments of two n8 tiles when B is stored k-major (B[k][n]).
__device__ __forceinline__ const bf16* b_frag_addr_k_major(const bf16* base, int stride, int n0, int lane) {
  return base + ((lane % 8) + ((lane / 8) % 2) * 8) * stride + n0 + (lane / 16) * 8;
}

// Accumulator fragments of a 16 × 16 tile (two n8 tiles) re-read as the A fragment of a k16 product.
__device__ __forceinline__ void accum_to_a_frag(const float (&c)[2][4], uint32_t (&a)[4]) {
  a[0] = pack_bf16x2(c[0][0], c[0][1]);
  a[1] = pack_bf16x2(c[0][2], c[0][3]);
  a[2] = pack_bf16x2(c[1][0], c[1][1]);
  a[3] = pack_bf16x2(c[1][2], c[1][3]);
}

struct SequenceBounds {
  int64_t batch_index;  // row of the [B, ...] tensors
  int64_t first_token;  // within that row
  int64_t length;
};

// All varlen reads in one place. Bad cu_seqlens values (checked on the host where it may synchronise)
// are clamped so that the kernel never reads or writes outside [0, T).
__device__ __forceinline__ SequenceBounds sequence_bounds(const ForwardParams& p, int64_t seq) {
  if (p.cu_seqlens == nullptr) return {seq, 0, p.tokens};
  int64_t begin, end;
  if (p.cu_seqlens_is_int64) {
    begin = static_cast<const int64_t*>(p.cu_seqlens)[seq];
    end = static_cast<const int64_t*>(p.cu_seqlens)[seq + 1];
  } else {
    begin = static_cast<const int32_t*>(p.cu_seqlens)[seq];
    end = static_cast<const int32_t*>(p.cu_seqlens)[seq + 1];
  }
  begin = min(max(begin, int64_t{0}), p.tokens);
  end = min(max(end, begin), p.tokens);
  return {0, begin, end - begin};
}

__device__ __forceinline__ int64_t token_offset(const TokenTensor& t, const SequenceBounds& sb, int64_t token,
                                                int head) {
  return sb.batch_index * t.batch_stride + (sb.first_token + token) * t.token_stride + head * t.head_stride;
}

// Element (v, k) of one head's state, in either layout, as an offset from the head's first element.
__device__ __forceinline__ int64_t state_offset(int v, int k, bool value_first) {
  return value_first ? int64_t{v} * Config::kHeadDimK + k : int64_t{k} * Config::kHeadDimV + v;
}

__device__ __forceinline__ float load_state(const void* base, StateDType dtype, int64_t offset) {
  return dtype == StateDType::kFloat32 ? static_cast<const float*>(base)[offset]
                                       : __bfloat162float(static_cast<const bf16*>(base)[offset]);
}

__device__ __forceinline__ void store_state(void* base, StateDType dtype, int64_t offset, float value) {
  if (dtype == StateDType::kFloat32)
    static_cast<float*>(base)[offset] = value;
  else
    static_cast<bf16*>(base)[offset] = __float2bfloat16_rn(value);
}

// ---------------------------------------------------------------------------------------------------
// Load: one chunk of q, k, v, g into a stage with 16-byte cp.async; rows past the sequence are zero-filled.
// Each thread always copies the same (row, 16-byte segment) of the four tensors, so its source pointers
// are computed once and advance by one chunk of tokens per call.
// ---------------------------------------------------------------------------------------------------
struct ChunkLoader {
  static constexpr int kSegments = Config::kHeadDimK / 8;  // 16-byte segments per row
  static_assert(Config::kGroupThreads == Config::kChunk * kSegments, "one (row, segment) per producer and tensor");

  const bf16* src[4];       // q, k, v, g at (token = row of chunk 0, segment)
  int64_t chunk_stride[4];  // elements from one chunk to the next
  int row, seg;

  __device__ ChunkLoader(const ForwardParams& p, const SequenceBounds& sb, int head, int tid)
      : row(tid / kSegments), seg(tid % kSegments) {
    const TokenTensor* tensors[4] = {&p.q, &p.k, &p.v, &p.g};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // Rows past the sequence (zero-filled) still need a valid address: the sequence's first row.
      const int64_t token = row < sb.length ? row : 0;
      src[i] = static_cast<const bf16*>(tensors[i]->data) + token_offset(*tensors[i], sb, token, head) + seg * 8;
      chunk_stride[i] = Config::kChunk * tensors[i]->token_stride;
    }
  }

  __device__ void load(int64_t chunk, int64_t length, SharedStorage::Stage& stage) const {
    const bool valid = chunk * Config::kChunk + row < length;
    bf16* dst[4] = {&stage.q[row][seg * 8], &stage.k[row][seg * 8], &stage.v[row][seg * 8], &stage.g[row][seg * 8]};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bf16* from = valid ? src[i] + chunk * chunk_stride[i] : src[i];
      cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(*reinterpret_cast<const cute::uint128_t*>(from),
                                                                   *reinterpret_cast<cute::uint128_t*>(dst[i]), valid);
    }
    cute::cp_async_fence();
  }
};

__device__ __forceinline__ float load_beta(const ForwardParams& p, const SequenceBounds& sb, int head, int64_t token) {
  if (token >= sb.length) return 0.f;
  return __bfloat162float(static_cast<const bf16*>(p.beta.data)[token_offset(p.beta, sb, token, head)]);
}

// ---------------------------------------------------------------------------------------------------
// Math, state-independent part: preparing a chunk (gate, Γ, norms, b; then the decayed operand tiles).
// Each thread owns one key channel and one half of the chunk's tokens; the two halves of a channel are
// neighbouring lanes, so the second half's cumsum offset is one shuffle away. Γ stays in registers
// between the two steps (a block barrier separates them: the tiles need every row's norm).
// ---------------------------------------------------------------------------------------------------
struct ChunkPreparer {
  const ForwardParams& p;
  int head, channel, half, t0;
  float dt_bias, gate_mul, lower_bound_log2;

  __device__ void gate_and_norms(const SharedStorage::Stage& in, SharedStorage::Prepared& out, int valid,
                                 float beta_logit, int tid, int lane, float (&gamma)[Config::kChunk / 2]) const {
    float running = 0.f;
#pragma unroll
    for (int i = 0; i < Config::kChunk / 2; ++i) {
      const float x = gate_mul * (__bfloat162float(in.g[t0 + i][channel]) + dt_bias);
      // Padded rows past the sequence must not decay the state.
      running += t0 + i < valid ? lower_bound_log2 * sigmoid(x) : 0.f;
      gamma[i] = running;
    }
    const float first_half_total = __shfl_sync(0xffffffffu, running, lane & ~1);
    if (half == 1) {
#pragma unroll
      for (int i = 0; i < Config::kChunk / 2; ++i) gamma[i] += first_half_total;
    }

    // 32 rows (16 of q, then 16 of k), 8 threads per row with 16 elements each: 3 shuffles.
    const int row = tid / 8;
    const int piece = tid % 8;
    const bf16* src = (row < Config::kChunk ? in.q[row] : in.k[row - Config::kChunk]) + piece * 8;
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < 2; ++c) {  // 16-byte pieces at piece·8 and piece·8 + 64
      const uint4 raw = *reinterpret_cast<const uint4*>(src + 64 * c);
      const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 x = __bfloat1622float2(pairs[e]);
        sum += x.x * x.x + x.y * x.y;
      }
    }
#pragma unroll
    for (int offset = 1; offset < 8; offset *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (piece == 0) {
      const float rnorm = p.l2norm_qk ? rsqrtf(sum + 1e-6f) : 1.f;
      if (row < Config::kChunk)
        out.q_rnorm[row] = rnorm;
      else
        out.k_rnorm[row - Config::kChunk] = rnorm;
    }
    if (tid < Config::kChunk) out.b[tid] = tid < valid ? sigmoid(beta_logit) * (p.beta_times_two ? 2.f : 1.f) : 0.f;
  }

  __device__ void tiles(const SharedStorage::Stage& in, SharedStorage::Prepared& out, int lane,
                        const float (&gamma)[Config::kChunk / 2]) const {
    const float gamma_end = __shfl_sync(0xffffffffu, gamma[Config::kChunk / 2 - 1], lane | 1);
    const float decay_end = fast_exp2(gamma_end);
    if (half == 0) out.decay[channel] = decay_end;
#pragma unroll
    for (int i = 0; i < Config::kChunk / 2; ++i) {
      const int t = t0 + i;
      const float kn = __bfloat162float(in.k[t][channel]) * out.k_rnorm[t];
      const float qn = __bfloat162float(in.q[t][channel]) * out.q_rnorm[t] * p.scale;
      const float up = fast_exp2(gamma[i]);
      const float down = fast_exp2(-gamma[i]);  // ≤ e^80: finite (see the header comment)
      out.qg[t][channel] = __float2bfloat16_rn(qn * up);
      out.kg[t][channel] = __float2bfloat16_rn(kn * up);
      out.kr[t][channel] = __float2bfloat16_rn(kn * down);
      out.ku[t][channel] = __float2bfloat16_rn(kn * (decay_end * down));
      out.v[t][channel] = in.v[t][channel];
    }
  }
};

// (warp 0) A_kk = diag(b)·KG·KRᵀ (strictly lower) and T' = (I + A_kk)^-1·diag(b);
// (warp 1) A_qk = QG·KRᵀ (lower). 16 × 16, reduced over the 128 key channels.
__device__ __forceinline__ void build_intra_chunk_matrices(SharedStorage& s, SharedStorage::Prepared& cur, int warp,
                                                           int lane) {
  const int group = lane / 4, quad = lane % 4;
  const bf16* left = warp == 0 ? &cur.kg[0][0] : &cur.qg[0][0];
  float acc[2][4] = {};
#pragma unroll
  for (int kk = 0; kk < Config::kHeadDimK / 16; ++kk) {
    uint32_t a[4], b[4];
    ldsm(a_frag_addr(left, Config::kTileStride, 16 * kk, lane), a);
    ldsm(b_frag_addr_n_major(&cur.kr[0][0], Config::kTileStride, 16 * kk, lane), b);
    mma(acc[0], a, b[0], b[1]);
    mma(acc[1], a, b[2], b[3]);
  }
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = group + 8 * (e / 2);
      const int j = 8 * n + 2 * quad + (e % 2);
      // Select, never multiply: the upper triangle holds e^(Γ_i − Γ_j) with i < j, which may be huge.
      if (warp == 0)
        s.a_kk_t[j][i] = j < i ? cur.b[i] * acc[n][e] : 0.f;
      else
        cur.a_qk[i][j] = __float2bfloat16_rn(j <= i ? acc[n][e] : 0.f);
    }
  if (warp != 0) return;
  __syncwarp();
  // T = (I + A_kk)^-1 by forward substitution in fp32; lane j owns column j of T. Right-looking: once
  // t_m is final it updates every later row at once, so the dependent chain is 15 FMAs long instead of
  // 120, and the column loads of A_kk are independent of the running values.
  if (lane < Config::kChunk) {
    const int j = lane;
    float column[Config::kChunk];
#pragma unroll
    for (int i = 0; i < Config::kChunk; ++i) column[i] = i == j ? 1.f : 0.f;
#pragma unroll
    for (int m = 0; m < Config::kChunk - 1; ++m) {
      float a_col[Config::kChunk];  // A_kk[·][m]
#pragma unroll
      for (int i4 = 0; i4 < Config::kChunk / 4; ++i4)
        *reinterpret_cast<float4*>(&a_col[4 * i4]) = *reinterpret_cast<const float4*>(&s.a_kk_t[m][4 * i4]);
#pragma unroll
      for (int i = m + 1; i < Config::kChunk; ++i) column[i] -= a_col[i] * column[m];
    }
    const float bj = cur.b[j];
#pragma unroll
    for (int i = 0; i < Config::kChunk; ++i) cur.t_scaled[i][j] = __float2bfloat16_rn(column[i] * bj);
  }
}

// ---------------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(Config::kThreads, 1) kda_forward_kernel(const __grid_constant__ ForwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SharedStorage& s = *reinterpret_cast<SharedStorage*>(smem_raw);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  // ==== Scheduling: which (sequence, head) this block owns ====
  const int64_t seq = blockIdx.x / p.heads;
  const int head = static_cast<int>(blockIdx.x % p.heads);
  const SequenceBounds sb = sequence_bounds(p, seq);
  const int64_t num_chunks = (sb.length + Config::kChunk - 1) / Config::kChunk;
  auto chunk_valid = [&](int64_t chunk) {
    return static_cast<int>(min(int64_t{Config::kChunk}, sb.length - chunk * Config::kChunk));
  };

  if (warp >= Config::kStateWarps) {
    // =============================================================================================
    // Producers: load chunks and prepare them (gate, Γ, norms, b, decayed tiles, T', A_qk), two ahead
    // =============================================================================================
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(Config::kPrepRegisters));
    const int tid = threadIdx.x - Config::kGroupThreads;
    const int prep_warp = warp - Config::kStateWarps;
    const int channel = tid / 2;
    const int half = tid % 2;
    const ChunkPreparer preparer{p,
                                 head,
                                 channel,
                                 half,
                                 half * (Config::kChunk / 2),
                                 p.dt_bias != nullptr ? p.dt_bias[head * p.dt_bias_head_stride + channel] : 0.f,
                                 p.A_log != nullptr ? expf(p.A_log[head]) : 1.f,
                                 p.lower_bound * Config::kLog2e};
    const ChunkLoader loader(p, sb, head, tid);
    // One cp.async group per chunk, committed even when empty, so that "chunk c has landed" is always
    // cp.async.wait_group 2 (c + 1 and c + 2 may still be in flight).
    if (num_chunks > 0) loader.load(0, sb.length, s.stage[0]);
    cute::cp_async_fence();
    if (num_chunks > 1) loader.load(1, sb.length, s.stage[1]);
    cute::cp_async_fence();
    float beta_logit = tid < Config::kChunk ? load_beta(p, sb, head, tid) : 0.f;

    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      SharedStorage::Stage& in = s.stage[chunk % Config::kStages];
      SharedStorage::Prepared& out = s.prepared[chunk % 2];
      // ---- load: start chunk + 2 (its stage held chunk − 1, fully prepared), wait for chunk ----
      if (chunk + 2 < num_chunks) loader.load(chunk + 2, sb.length, s.stage[(chunk + 2) % Config::kStages]);
      cute::cp_async_fence();
      const float beta_now = beta_logit;
      if (tid < Config::kChunk) beta_logit = load_beta(p, sb, head, (chunk + 1) * Config::kChunk + tid);
      cute::cp_async_wait<2>();
      // ---- the state warps must be done with chunk − 2, which used the same prepared buffer ----
      if (chunk >= 2) barrier_sync(empty_barrier(chunk), Config::kThreads);
      barrier_sync(NamedBarrier::kPrep, Config::kGroupThreads);  // everyone's copies have landed
      float gamma[Config::kChunk / 2];
      preparer.gate_and_norms(in, out, chunk_valid(chunk), beta_now, tid, lane, gamma);
      barrier_sync(NamedBarrier::kPrep, Config::kGroupThreads);
      preparer.tiles(in, out, lane, gamma);
      barrier_sync(NamedBarrier::kPrep, Config::kGroupThreads);
      if (prep_warp < 2) build_intra_chunk_matrices(s, out, prep_warp, lane);
      // T' and A_qk (warps 0, 1) are complete before anyone signals the buffer: with the signal coming
      // straight after those writes, compute-sanitizer racecheck saw them race the state warps' reads.
      barrier_sync(NamedBarrier::kPrep, Config::kGroupThreads);
      barrier_arrive(full_barrier(chunk), Config::kThreads);
    }
    return;
  }

  // ===============================================================================================
  // State warps: the recurrence, chunk after chunk
  // ===============================================================================================
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(Config::kStateRegisters));
  const int group = lane / 4;  // accumulator row within an m16 tile (and +8)
  const int quad = lane % 4;   // accumulator column pair within an n8 tile

  // ---- the initial state into the accumulator fragments: st[n][e] holds Sᵀ at
  //      v = 16·warp + group + 8·(e / 2), k = 8·n + 2·quad + (e % 2) ----
  float st[Config::kHeadDimK / 8][4];
  const int64_t state_head_offset = (seq * p.heads + head) * int64_t{Config::kHeadDimK * Config::kHeadDimV};
#pragma unroll
  for (int n = 0; n < Config::kHeadDimK / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int v = 16 * warp + group + 8 * (e / 2);
      const int k = 8 * n + 2 * quad + (e % 2);
      st[n][e] = p.initial_state == nullptr ? 0.f
                                            : load_state(p.initial_state, p.initial_state_dtype,
                                                         state_head_offset + state_offset(v, k, p.state_value_first));
    }

  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    const int64_t chunk_start = chunk * Config::kChunk;
    const SharedStorage::Prepared& cur = s.prepared[chunk % 2];
    barrier_sync(full_barrier(chunk), Config::kThreads);

    // ---- P = KG·S and O = QG·S for this warp's value rows (as Pᵀ = Sᵀ·KGᵀ, Oᵀ = Sᵀ·QGᵀ) ----
    float p_acc[2][4] = {};  // Pᵀ (v, t)
    float o_acc[2][4] = {};  // Oᵀ (v, t)
#pragma unroll
    for (int kk = 0; kk < Config::kHeadDimK / 16; ++kk) {
      const uint32_t a[4] = {pack_bf16x2(st[2 * kk][0], st[2 * kk][1]), pack_bf16x2(st[2 * kk][2], st[2 * kk][3]),
                             pack_bf16x2(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                             pack_bf16x2(st[2 * kk + 1][2], st[2 * kk + 1][3])};
      uint32_t b[4];
      ldsm(b_frag_addr_n_major(&cur.kg[0][0], Config::kTileStride, 16 * kk, lane), b);
      mma(p_acc[0], a, b[0], b[1]);
      mma(p_acc[1], a, b[2], b[3]);
      ldsm(b_frag_addr_n_major(&cur.qg[0][0], Config::kTileStride, 16 * kk, lane), b);
      mma(o_acc[0], a, b[0], b[1]);
      mma(o_acc[1], a, b[2], b[3]);
    }

    // ---- v' = T'·(v − P); o += A_qk·v'; S ← diag(2^Γ_C)·S + KUᵀ·v' (all transposed) ----
    float d[2][4];  // (v − P)ᵀ
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int v = 16 * warp + group + 8 * (e / 2);
        const int t = 8 * n + 2 * quad + (e % 2);
        d[n][e] = __bfloat162float(cur.v[t][v]) - p_acc[n][e];
      }
    uint32_t d_frag[4];
    accum_to_a_frag(d, d_frag);
    float vp[2][4] = {};  // v'ᵀ (v, t)
    {
      uint32_t b[4];
      ldsm(b_frag_addr_n_major(&cur.t_scaled[0][0], Config::kSmallStride, 0, lane), b);
      mma(vp[0], d_frag, b[0], b[1]);
      mma(vp[1], d_frag, b[2], b[3]);
    }
    uint32_t vp_frag[4];
    accum_to_a_frag(vp, vp_frag);
    {
      uint32_t b[4];
      ldsm(b_frag_addr_n_major(&cur.a_qk[0][0], Config::kSmallStride, 0, lane), b);
      mma(o_acc[0], vp_frag, b[0], b[1]);
      mma(o_acc[1], vp_frag, b[2], b[3]);
    }
#pragma unroll
    for (int n = 0; n < Config::kHeadDimK / 8; ++n) {
      const float2 decay = *reinterpret_cast<const float2*>(&cur.decay[8 * n + 2 * quad]);
      st[n][0] *= decay.x;
      st[n][1] *= decay.y;
      st[n][2] *= decay.x;
      st[n][3] *= decay.y;
    }
#pragma unroll
    for (int np = 0; np < Config::kHeadDimK / 16; ++np) {
      uint32_t b[4];
      ldsm_trans(b_frag_addr_k_major(&cur.ku[0][0], Config::kTileStride, 16 * np, lane), b);
      mma(st[2 * np], vp_frag, b[0], b[1]);
      mma(st[2 * np + 1], vp_frag, b[2], b[3]);
    }
    // Everything this chunk needs from the prepared buffer has been read.
    if (chunk + 2 < num_chunks) barrier_arrive(empty_barrier(chunk), Config::kThreads);

      // ---- store: transpose this warp's 16 × 16 block of o through shared memory, 16-byte stores ----
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s.out_stage[warp][8 * n + 2 * quad + (e % 2)][group + 8 * (e / 2)] = __float2bfloat16_rn(o_acc[n][e]);
    __syncwarp();
    {
      const int t = lane / 2;
      const int piece = lane % 2;
      if (t < chunk_valid(chunk)) {
        bf16* dst = static_cast<bf16*>(const_cast<void*>(p.out.data)) + token_offset(p.out, sb, chunk_start + t, head) +
                    16 * warp + 8 * piece;
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(&s.out_stage[warp][t][8 * piece]);
      }
    }
    __syncwarp();  // the next chunk's stores reuse out_stage
  }

  // ==== Store the final state ====
  if (p.final_state != nullptr) {
#pragma unroll
    for (int n = 0; n < Config::kHeadDimK / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int v = 16 * warp + group + 8 * (e / 2);
        const int k = 8 * n + 2 * quad + (e % 2);
        store_state(p.final_state, p.final_state_dtype, state_head_offset + state_offset(v, k, p.state_value_first),
                    st[n][e]);
      }
  }
#endif  // __CUDA_ARCH__ >= 900
}

}  // namespace

void launch_forward(const ForwardParams& params, cudaStream_t stream) {
  const int64_t blocks = params.num_sequences * params.heads;
  if (blocks == 0) return;
  constexpr size_t kSmemBytes = sizeof(SharedStorage);
  check_cuda(cudaFuncSetAttribute(kda_forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(kSmemBytes)),
             "cudaFuncSetAttribute(kda_forward_kernel)");
  FLASH_KDA_INTERNAL_CHECK(blocks <= 0x7fffffff, "grid of ", blocks, " blocks exceeds the launch limit");
  kda_forward_kernel<<<static_cast<unsigned>(blocks), Config::kThreads, kSmemBytes, stream>>>(params);
  check_cuda(cudaGetLastError(), "launch of kda_forward_kernel");
}

}  // namespace flash_kda::cuda::sm90
