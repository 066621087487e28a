// KDA forward for Hopper (sm_90a), version 4: one thread block per (sequence, head), 16-token chunks,
// fp32 state held in registers for the whole sequence, bf16 tensor-core products (mma.sync through CuTe's
// SM80 atoms). Warp-specialised: 8 state warps run the recurrence; 8 producer warps each load and prepare
// whole chunks on their own (chunk c by producer warp c mod 8, in shared-memory stage c mod 8), so up to
// eight chunks are loading or being prepared while the state warps work. Design, byte/FLOP budget and
// measurements: docs/kernel_sm90.md.
//
// Per chunk of C = 16 tokens (Γ = inclusive cumsum of the log2-decay inside the chunk, per key channel;
// q, k raw; kn_t = 1/‖k_t‖, qs_t = scale/‖q_t‖ (or 1 and scale without the L2 norm); b_t = sigmoid(β_t)):
//   QG = q ⊙ 2^Γ,  KG = k ⊙ 2^Γ,  KU = k ⊙ 2^(Γ_C − Γ),  KR = diag(kn)·k ⊙ 2^−Γ
//   A_kk = strict_lower(diag(b·kn) · KG · KRᵀ),   A_qk = lower(QG · KRᵀ)
//   T'   = (I + A_kk)^−1 · diag(b)
//   v'   = T' · (v − diag(kn) · KG · S)         (= U − W·S of the SPEC with normalised k)
//   o    = diag(qs) · (QG · S + A_qk · v')
//   S    ← diag(2^Γ_C) · S + KUᵀ · diag(kn) · v'
// The norms are applied as per-token factors instead of to the tiles (one multiply per token, not per
// element), except in KR: normalised there, KR ≤ 2^115 stays finite in bf16 whatever the size of k.
// Within 16 tokens the lower-bound gate (a ≥ −5 per token) keeps 2^±Γ inside [e^−80, e^80], so the
// factorised decays e^(Γ_i − Γ_j) = 2^Γ_i · 2^−Γ_j stay finite in fp32 and bf16.
//
// The state lives transposed (Sᵀ, V × K, the FlashKDA layout) in the accumulator fragments of the
// 8 state warps: warp w owns value rows [16w, 16w + 16). In that layout Sᵀ is directly the A operand of
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
  // Warp specialisation: the first warps hold the state and run the recurrence (consumers, 16 value rows
  // each: see Roles); the 8 warps after them load and prepare chunks ahead of them (producers), one whole
  // chunk per producer warp at a time.
  static constexpr int kMaxStateWarps = 8;
  static constexpr int kPrepWarps = 8;
  static constexpr int kStages = kPrepWarps;  // stage w belongs to producer warp w: chunks w, w + 8, ...
  static constexpr int kPrepRegisters = 96;  // setmaxnreg of the producers (they spill at 88)
  // Rows of 128 bf16 padded to 136 (272 bytes): the 8 row addresses of one ldmatrix then fall into
  // 8 different 16-byte bank groups, so loads are conflict-free without a swizzle.
  static constexpr int kTileStride = kHeadDimK + 8;
  // 16 × 16 matrices padded to 24 columns (48-byte rows), conflict-free for the same reason.
  static constexpr int kSmallStride = 24;
  static constexpr float kLog2e = 1.4426950408889634f;
  // A producer lane owns two neighbouring key channels for all 16 tokens of a chunk (their gates stay in
  // registers between the cumsum and the tiles); the warp covers the 128 channels in two rounds.
  static constexpr int kChannelsPerLane = 2;
  static constexpr int kGateRounds = kHeadDimK / (32 * kChannelsPerLane);

  static_assert(kHeadDimV == kMaxStateWarps * 16, "8 state warps of 16 value rows hold a whole head's state");
  static_assert(kPrepRegisters % 8 == 0, "setmaxnreg takes multiples of 8");
  static_assert(kChunk == 16, "the chunk is one m16n8k16 tile tall; the gate bound assumes 16 tokens");
  static_assert(2 * kChunk == 32, "the norm pass gives each of the 32 q/k rows of a chunk one lane");
  static_assert(kGateRounds * 32 * kChannelsPerLane == kHeadDimK, "the gate rounds cover every key channel");
  static_assert((kChunk * kHeadDimK * 2) % (32 * 16) == 0, "a chunk row set is a whole number of 16-byte copies per lane");
};

// Hand-over between the roles: mbarriers in shared memory, one pair per stage. FULL[s] completes a phase
// when the 32 lanes of producer warp s have prepared a chunk in stage s; EMPTY[s] when the 256 state
// threads are done reading it. Chunk c uses stage c mod 8 in round c / 8, so its phase parity is
// (c / 8) & 1.
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(arrivals) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(bar)) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(shared_address(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

struct alignas(16) SharedStorage {
  // One chunk: raw inputs land here and are prepared in place (q → QG, k → KG, g → KR); read by the state
  // warps until they release the stage.
  struct Stage {
    bf16 qg[Config::kChunk][Config::kTileStride];
    bf16 kg[Config::kChunk][Config::kTileStride];
    bf16 kr[Config::kChunk][Config::kTileStride];
    bf16 ku[Config::kChunk][Config::kTileStride];
    bf16 v[Config::kChunk][Config::kTileStride];
    bf16 t_scaled[Config::kChunk][Config::kSmallStride];  // T' = (I + A_kk)^-1 diag(b)
    bf16 a_qk[Config::kChunk][Config::kSmallStride];
    float decay[Config::kHeadDimK];  // 2^Γ_C
    float q_scale[Config::kChunk];   // qs_t
    float k_rnorm[Config::kChunk];   // kn_t
    float b[Config::kChunk];
  };
  Stage stage[Config::kStages];
  float a_kk_t[Config::kPrepWarps][Config::kChunk][Config::kChunk];  // A_kkᵀ per producer warp (column m is a row)
  bf16 out_stage[Config::kMaxStateWarps][Config::kChunk][Config::kSmallStride];  // per-warp transpose of o
  uint64_t full[Config::kStages];
  uint64_t empty[Config::kStages];
};

// A block holds the state rows [value_part · kValueRows, +kValueRows) of one (sequence, head): all 128
// (8 state warps) or, when there are too few (sequence, head) pairs to fill the GPU, half of them in each
// of two blocks (4 state warps; the value rows of the state evolve independently, so each block runs the
// same producers and half of the state work).
template <int kStateWarps_>
struct Roles {
  static constexpr int kStateWarps = kStateWarps_;
  static constexpr int kValueRows = 16 * kStateWarps;
  static constexpr int kValueParts = Config::kHeadDimV / kValueRows;
  static constexpr int kStateThreads = kStateWarps * 32;
  static constexpr int kThreads = (kStateWarps + Config::kPrepWarps) * 32;
  // setmaxnreg: the producers give registers to the state warps. The launch bound gives every thread
  // 65536 / kThreads (rounded down to 8); the two roles must fit in what the block got.
  static constexpr int kLaunchRegisters = (65536 / kThreads) / 8 * 8;
  static constexpr int kStateRegisters = kStateWarps == 8 ? 160 : 232;
  static_assert(kStateRegisters % 8 == 0, "setmaxnreg takes multiples of 8");
  static_assert(kStateRegisters * kStateWarps + Config::kPrepRegisters * Config::kPrepWarps <=
                    kLaunchRegisters * (kStateWarps + Config::kPrepWarps),
                "the roles' registers fit in the block's allocation");
  static_assert(kValueParts * kValueRows == Config::kHeadDimV, "value parts tile the value rows");
  static_assert(kStateWarps % 4 == 0, "setmaxnreg and the role split work on whole warpgroups");
  static_assert(kStateWarps <= Config::kMaxStateWarps, "out_stage has room for 8 state warps");
};
static_assert(sizeof(SharedStorage) <= 227 * 1024, "shared memory per block on sm_90 is at most 227 KB");

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
// Load: one chunk of q, k, v, g into a stage with 16-byte cp.async (one producer warp); rows past the
// sequence are zero-filled. Lane l copies 16-byte segment l mod 16 of rows l / 16, l / 16 + 2, ... of
// each tensor; its source pointers are computed once and advance by whole chunks.
// ---------------------------------------------------------------------------------------------------
struct ChunkLoader {
  static constexpr int kSegments = Config::kHeadDimK / 8;      // 16-byte segments per row
  static constexpr int kRowsPerPass = 32 / kSegments;          // rows one warp-wide copy covers
  static constexpr int kPasses = Config::kChunk / kRowsPerPass;  // copies per lane and tensor
  static_assert(32 % kSegments == 0 && Config::kChunk % kRowsPerPass == 0, "whole rows per warp-wide copy");

  const bf16* first_row[4];  // q, k, v, g at (the sequence's first token, this lane's segment)
  int64_t token_stride[4];
  int row0, seg;

  __device__ ChunkLoader(const ForwardParams& p, const SequenceBounds& sb, int head, int lane)
      : row0(lane / kSegments), seg(lane % kSegments) {
    const TokenTensor* tensors[4] = {&p.q, &p.k, &p.v, &p.g};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      first_row[i] = static_cast<const bf16*>(tensors[i]->data) + token_offset(*tensors[i], sb, 0, head) + seg * 8;
      token_stride[i] = tensors[i]->token_stride;
    }
  }

  __device__ void load(int64_t chunk, int64_t length, SharedStorage::Stage& stage) const {
    bf16* tiles[4] = {&stage.qg[0][0], &stage.kg[0][0], &stage.v[0][0], &stage.kr[0][0]};
    const int64_t first_token = chunk * Config::kChunk;
    const bool whole_chunk = first_token + Config::kChunk <= length;  // no row needs the zero fill
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bf16* row_src = first_row[i] + (first_token + row0) * token_stride[i];
      const int64_t pass_step = kRowsPerPass * token_stride[i];
      bf16* row_dst = tiles[i] + row0 * Config::kTileStride + seg * 8;
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass) {
        // Rows past the sequence (zero-filled) still need a valid address: the sequence's first row.
        const bool valid = whole_chunk || first_token + row0 + kRowsPerPass * pass < length;
        cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
            *reinterpret_cast<const cute::uint128_t*>(valid ? row_src : first_row[i]),
            *reinterpret_cast<cute::uint128_t*>(row_dst), valid);
        row_src += pass_step;
        row_dst += kRowsPerPass * Config::kTileStride;
      }
    }
    cute::cp_async_fence();
  }
};

__device__ __forceinline__ float load_beta(const ForwardParams& p, const SequenceBounds& sb, int head, int64_t token) {
  if (token >= sb.length) return 0.f;
  return __bfloat162float(static_cast<const bf16*>(p.beta.data)[token_offset(p.beta, sb, token, head)]);
}

// ---------------------------------------------------------------------------------------------------
// Math, state-independent part: one producer warp prepares one chunk in its stage, in place.
//   1. norms: lane l < 16 → q row l, lane l ≥ 16 → k row l − 16 (one 272-byte row each); b from beta;
//   2. gate: per round, lane l owns channels (64·round + 2l, +1) for all 16 tokens: the gates of the
//      chunk stay in registers, their sum gives Γ_C, and the running sum gives Γ for the tiles;
//   3. A_kk, A_qk on tensor cores, T' by substitution (see build_intra_chunk_matrices).
// Only __syncwarp between the steps: nothing else touches the stage while it is being prepared.
// ---------------------------------------------------------------------------------------------------
struct ChunkPreparer {
  const ForwardParams& p;
  int lane;
  // sigmoid(exp(A_log)·(g + dt_bias)) = 1 / (1 + 2^(exp_scale·g + exp_offset)): one FFMA before the ex2.
  float exp_scale;         // −exp(A_log)·log2 e
  float lower_bound_log2;  // lower_bound · log2 e
  float exp_offset[Config::kGateRounds][Config::kChannelsPerLane];  // exp_scale · dt_bias of this lane's channels

  __device__ void norms_and_beta(SharedStorage::Stage& st, int valid, float beta_logit) const {
    const int row = lane % Config::kChunk;
    const bf16* src = lane < Config::kChunk ? st.qg[row] : st.kg[row];
    float partial[4] = {};
#pragma unroll
    for (int c = 0; c < Config::kHeadDimK / 8; ++c) {
      const uint4 raw = *reinterpret_cast<const uint4*>(src + 8 * c);
      const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 x = __bfloat1622float2(pairs[e]);
        partial[e] = fmaf(x.x, x.x, fmaf(x.y, x.y, partial[e]));
      }
    }
    const float sum = (partial[0] + partial[1]) + (partial[2] + partial[3]);
    const float rnorm = p.l2norm_qk ? rsqrtf(sum + 1e-6f) : 1.f;
    if (lane < Config::kChunk) {
      st.q_scale[row] = rnorm * p.scale;
      st.b[row] = row < valid ? sigmoid(beta_logit) * (p.beta_times_two ? 2.f : 1.f) : 0.f;
    } else {
      st.k_rnorm[row] = rnorm;
    }
  }

  __device__ void gate_and_tiles(SharedStorage::Stage& st, int valid) const {
#pragma unroll 1  // two identical rounds: one copy of the code (instruction-cache pressure)
    for (int round = 0; round < Config::kGateRounds; ++round) {
      const int ch = 64 * round + Config::kChannelsPerLane * lane;
      const float offset[2] = {round == 0 ? exp_offset[0][0] : exp_offset[1][0],
                               round == 0 ? exp_offset[0][1] : exp_offset[1][1]};
      // ---- the per-token log2-decays of both channels (0 on rows past the sequence), and Γ_C ----
      float gate[Config::kChunk][2];
      float total[2] = {0.f, 0.f};
#pragma unroll
      for (int t = 0; t < Config::kChunk; ++t) {
        const float2 g = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&st.kr[t][ch]));
        const float g2[2] = {g.x, g.y};
        const float bound = t < valid ? lower_bound_log2 : 0.f;
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          gate[t][c] = bound * fast_rcp(1.f + fast_exp2(fmaf(exp_scale, g2[c], offset[c])));
          total[c] += gate[t][c];
        }
      }
      const float decay_end[2] = {fast_exp2(total[0]), fast_exp2(total[1])};
      *reinterpret_cast<float2*>(&st.decay[ch]) = make_float2(decay_end[0], decay_end[1]);
      // ---- the tiles, token by token with the running Γ (in place: g → KR, q → QG, k → KG) ----
      float gamma[2] = {0.f, 0.f};
#pragma unroll
      for (int t = 0; t < Config::kChunk; ++t) {
        const float kn = st.k_rnorm[t];
        const float2 q = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&st.qg[t][ch]));
        const float2 k = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&st.kg[t][ch]));
        const float q2[2] = {q.x, q.y}, k2[2] = {k.x, k.y};
        float qg[2], kg[2], kr[2], ku[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          gamma[c] += gate[t][c];
          const float up = fast_exp2(gamma[c]);
          const float down = fast_exp2(-gamma[c]);  // ≤ e^80: finite (see the header comment)
          qg[c] = q2[c] * up;
          kg[c] = k2[c] * up;
          kr[c] = k2[c] * (kn * down);
          ku[c] = k2[c] * (decay_end[c] * down);
        }
        *reinterpret_cast<uint32_t*>(&st.qg[t][ch]) = pack_bf16x2(qg[0], qg[1]);
        *reinterpret_cast<uint32_t*>(&st.kg[t][ch]) = pack_bf16x2(kg[0], kg[1]);
        *reinterpret_cast<uint32_t*>(&st.kr[t][ch]) = pack_bf16x2(kr[0], kr[1]);
        *reinterpret_cast<uint32_t*>(&st.ku[t][ch]) = pack_bf16x2(ku[0], ku[1]);
      }
    }
  }
};

// A_kk = strict_lower(diag(b·kn)·KG·KRᵀ) (fp32, transposed into the warp's scratch), A_qk = lower(QG·KRᵀ)
// (bf16, into the stage), both 16 × 16 reduced over the 128 key channels; then T' = (I + A_kk)^-1·diag(b).
__device__ __forceinline__ void build_intra_chunk_matrices(SharedStorage::Stage& st, float (&a_kk_t)[16][16],
                                                           int lane) {
  const int group = lane / 4, quad = lane % 4;
  float kk_acc[2][4] = {}, qk_acc[2][4] = {};
#pragma unroll
  for (int kk = 0; kk < Config::kHeadDimK / 16; ++kk) {
    uint32_t a_k[4], a_q[4], b[4];
    ldsm(a_frag_addr(&st.kg[0][0], Config::kTileStride, 16 * kk, lane), a_k);
    ldsm(a_frag_addr(&st.qg[0][0], Config::kTileStride, 16 * kk, lane), a_q);
    ldsm(b_frag_addr_n_major(&st.kr[0][0], Config::kTileStride, 16 * kk, lane), b);
    mma(kk_acc[0], a_k, b[0], b[1]);
    mma(kk_acc[1], a_k, b[2], b[3]);
    mma(qk_acc[0], a_q, b[0], b[1]);
    mma(qk_acc[1], a_q, b[2], b[3]);
  }
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = group + 8 * (e / 2);
      const int j = 8 * n + 2 * quad + (e % 2);
      // Select, never multiply: the upper triangle holds e^(Γ_i − Γ_j) with i < j, which may be huge.
      a_kk_t[j][i] = j < i ? st.b[i] * st.k_rnorm[i] * kk_acc[n][e] : 0.f;
      st.a_qk[i][j] = __float2bfloat16_rn(j <= i ? qk_acc[n][e] : 0.f);
    }
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
        *reinterpret_cast<float4*>(&a_col[4 * i4]) = *reinterpret_cast<const float4*>(&a_kk_t[m][4 * i4]);
#pragma unroll
      for (int i = m + 1; i < Config::kChunk; ++i) column[i] -= a_col[i] * column[m];
    }
    const float bj = st.b[j];
#pragma unroll
    for (int i = 0; i < Config::kChunk; ++i) st.t_scaled[i][j] = __float2bfloat16_rn(column[i] * bj);
  }
}

// ---------------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------------
template <int kStateWarps>
__global__ void __launch_bounds__(Roles<kStateWarps>::kThreads, 1)
    kda_forward_kernel(const __grid_constant__ ForwardParams p) {
  using R = Roles<kStateWarps>;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SharedStorage& s = *reinterpret_cast<SharedStorage*>(smem_raw);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  // ==== Scheduling: which (sequence, head) this block owns ====
  const int64_t pair = blockIdx.x / R::kValueParts;  // (sequence, head) = blockIdx.x / parts
  const int value_base = static_cast<int>(blockIdx.x % R::kValueParts) * R::kValueRows;
  const int64_t seq = pair / p.heads;
  const int head = static_cast<int>(pair % p.heads);
  const SequenceBounds sb = sequence_bounds(p, seq);
  const int64_t num_chunks = (sb.length + Config::kChunk - 1) / Config::kChunk;
  auto chunk_valid = [&](int64_t chunk) {
    return static_cast<int>(min(int64_t{Config::kChunk}, sb.length - chunk * Config::kChunk));
  };

  if (threadIdx.x == 0) {
    for (int i = 0; i < Config::kStages; ++i) {
      mbarrier_init(&s.full[i], 32);
      mbarrier_init(&s.empty[i], R::kStateThreads);
    }
  }
  __syncthreads();

  if (warp >= R::kStateWarps) {
    // =============================================================================================
    // Producers: warp w loads and prepares chunks w, w + 8, w + 16, ... in stage w
    // =============================================================================================
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(Config::kPrepRegisters));
    const int prep_warp = warp - R::kStateWarps;
    SharedStorage::Stage& st = s.stage[prep_warp];
    const float exp_scale = -(p.A_log != nullptr ? expf(p.A_log[head]) : 1.f) * Config::kLog2e;
    ChunkPreparer preparer{p, lane, exp_scale, p.lower_bound * Config::kLog2e, {}};
#pragma unroll
    for (int round = 0; round < Config::kGateRounds; ++round)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int ch = 64 * round + Config::kChannelsPerLane * lane + c;
        const float bias = p.dt_bias != nullptr ? p.dt_bias[head * p.dt_bias_head_stride + ch] : 0.f;
        preparer.exp_offset[round][c] = exp_scale * bias;
      }
    const ChunkLoader loader(p, sb, head, lane);

    for (int64_t chunk = prep_warp, round = 0; chunk < num_chunks; chunk += Config::kStages, ++round) {
      // ---- load: the state warps must be done with the stage's previous chunk (chunk − 8) ----
      if (round > 0) mbarrier_wait(&s.empty[prep_warp], static_cast<uint32_t>((round - 1) & 1));
      loader.load(chunk, sb.length, st);
      const float beta_logit = lane < Config::kChunk ? load_beta(p, sb, head, chunk * Config::kChunk + lane) : 0.f;
      cute::cp_async_wait<0>();
      __syncwarp();
      // ---- math: norms and b; gate, Γ and the tiles; A_kk, A_qk, T' ----
      const int valid = chunk_valid(chunk);
      preparer.norms_and_beta(st, valid, beta_logit);
      __syncwarp();
      preparer.gate_and_tiles(st, valid);
      __syncwarp();
      build_intra_chunk_matrices(st, s.a_kk_t[prep_warp], lane);
      __syncwarp();
      mbarrier_arrive(&s.full[prep_warp]);
    }
    return;
  }

  // ===============================================================================================
  // State warps: the recurrence, chunk after chunk
  // ===============================================================================================
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R::kStateRegisters));
  const int row0 = value_base + 16 * warp;  // this warp's first value row
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
      const int v = row0 + group + 8 * (e / 2);
      const int k = 8 * n + 2 * quad + (e % 2);
      st[n][e] = p.initial_state == nullptr ? 0.f
                                            : load_state(p.initial_state, p.initial_state_dtype,
                                                         state_head_offset + state_offset(v, k, p.state_value_first));
    }

  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    const int64_t chunk_start = chunk * Config::kChunk;
    const int stage = static_cast<int>(chunk % Config::kStages);
    const SharedStorage::Stage& cur = s.stage[stage];
    mbarrier_wait(&s.full[stage], static_cast<uint32_t>((chunk / Config::kStages) & 1));

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

    // Per-token factors of this lane's columns t = 8·n + 2·quad + (e % 2).
    float kn[2][2], qs[2][2];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const float2 k2 = *reinterpret_cast<const float2*>(&cur.k_rnorm[8 * n + 2 * quad]);
      const float2 q2 = *reinterpret_cast<const float2*>(&cur.q_scale[8 * n + 2 * quad]);
      kn[n][0] = k2.x, kn[n][1] = k2.y, qs[n][0] = q2.x, qs[n][1] = q2.y;
    }

    // ---- v' = T'·(v − diag(kn)·P); o += A_qk·v'; S ← diag(2^Γ_C)·S + KUᵀ·diag(kn)·v' (all transposed) ----
    float d[2][4];  // (v − diag(kn)·P)ᵀ
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int v = row0 + group + 8 * (e / 2);
        const int t = 8 * n + 2 * quad + (e % 2);
        d[n][e] = fmaf(-kn[n][e % 2], p_acc[n][e], __bfloat162float(cur.v[t][v]));
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
    float w[2][4];  // (diag(kn)·v')ᵀ
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) w[n][e] = vp[n][e] * kn[n][e % 2];
    uint32_t w_frag[4];
    accum_to_a_frag(w, w_frag);
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
      mma(st[2 * np], w_frag, b[0], b[1]);
      mma(st[2 * np + 1], w_frag, b[2], b[3]);
    }
    // Everything this chunk needs from the stage has been read: its producer may reload it.
    mbarrier_arrive(&s.empty[stage]);

    // ---- store: o = diag(qs)·(...); transpose this warp's 16 × 16 block through shared memory ----
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s.out_stage[warp][8 * n + 2 * quad + (e % 2)][group + 8 * (e / 2)] =
            __float2bfloat16_rn(o_acc[n][e] * qs[n][e % 2]);
    __syncwarp();
    {
      const int t = lane / 2;
      const int piece = lane % 2;
      if (t < chunk_valid(chunk)) {
        bf16* dst = static_cast<bf16*>(const_cast<void*>(p.out.data)) + token_offset(p.out, sb, chunk_start + t, head) +
                    row0 + 8 * piece;
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
        const int v = row0 + group + 8 * (e / 2);
        const int k = 8 * n + 2 * quad + (e % 2);
        store_state(p.final_state, p.final_state_dtype, state_head_offset + state_offset(v, k, p.state_value_first),
                    st[n][e]);
      }
  }
#endif  // __CUDA_ARCH__ >= 900
}

}  // namespace

template <int kStateWarps>
void launch(const ForwardParams& params, cudaStream_t stream) {
  using R = Roles<kStateWarps>;
  const int64_t blocks = params.num_sequences * params.heads * R::kValueParts;
  constexpr size_t kSmemBytes = sizeof(SharedStorage);
  check_cuda(cudaFuncSetAttribute(kda_forward_kernel<kStateWarps>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(kSmemBytes)),
             "cudaFuncSetAttribute(kda_forward_kernel)");
  FLASH_KDA_INTERNAL_CHECK(blocks <= 0x7fffffff, "grid of ", blocks, " blocks exceeds the launch limit");
  kda_forward_kernel<kStateWarps><<<static_cast<unsigned>(blocks), R::kThreads, kSmemBytes, stream>>>(params);
  check_cuda(cudaGetLastError(), "launch of kda_forward_kernel");
}

void launch_forward(const ForwardParams& params, cudaStream_t stream, int multiprocessors) {
  const int64_t pairs = params.num_sequences * params.heads;
  if (pairs == 0) return;
  // One block per SM (about 200 KB of shared memory each): split the value rows over two blocks when
  // that still fits in one wave, so that few (sequence, head) pairs do not leave SMs idle.
  if (2 * pairs <= multiprocessors)
    launch<4>(params, stream);
  else
    launch<8>(params, stream);
}

}  // namespace flash_kda::cuda::sm90
