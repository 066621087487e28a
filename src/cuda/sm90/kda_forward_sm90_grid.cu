// KDA forward for Hopper (sm_90a), the `grid` schedule: 32-token chunks, handed to the state CTAs through L2 by
// producer teams on every SM the state CTAs leave. Design, budget and measurements: docs/kernel_sm90.md, "The grid
// schedule".
//
// Why: with 16-token chunks the state warps' own chain sets a floor of ~0.59 µs per chunk (1×32768 H32: 1.20 ms
// with nothing else to wait for, v16). A 32-token step costs them 0.84 µs (0.42 per 16 tokens): the products get
// twice as wide while the fixed costs per step (FULL wait, release, loop, the decay and the bf16 copy of S) are paid
// once. Its chunks are 30.6 KB, more than the SMs' DSMEM ports carry at that pace (v16), so they go through L2:
//   - CTAs [0, 2·pairs) are the state CTAs, two per (sequence, head) pair (value rows 0–63 and 64–127), each with
//     a ring of kSharedRing slots that a loader lane fills by bulk copy from the pair's L2 ring;
//   - every other CTA (one per SM, all resident: a cooperative launch) runs kTeams producer teams of 4 warps; a team
//     takes the next chunk of a pair by ticket, prepares it in its stage (GridStage), stores it into the pair's L2
//     ring (GridWorkspace) and raises the slot's flag; when its pair has no chunks left it moves to the next pair;
//   - a publisher lane in each state CTA reports how many chunks its CTA has loaded, which bounds the reuse of the
//     L2 ring's slots;
//   - where production sets the pace (many pairs, few producer SMs: grid_state_teams), warpgroup 1 of each state
//     CTA is one more producer team, on the state SM's spare issue slots.
//
// The 32-token chunk in the T' form, from two 16-token blocks (0: tokens 0–15, 1: tokens 16–31). The blocks keep
// block-local decays where factorised decays would overflow (KR, as in the 16-token kernels: the lower-bound gate
// bounds 2^±Γ by e^±80 within 16 tokens, not within 32); everything the state warps multiply with S or add to it
// is relative to the chunk's start (KG, QG) or end (KU), and so ≤ 1:
//   A₀₀ = KG₀·KR₀ᵀ, A₁₁ = KG₁loc·KR₁ᵀ (strict lower, · b · kn) → T'₀₀, T'₁₁ by substitution (fp32);
//   M₁₀ = diag(kn₁)·KG₁·KR₀ᵀ;  T'₁₀ = −T'₁₁·M₁₀·T'₀₀ (fp32);
//   A_qk = lower([QG₀·KR₀ᵀ, 0; QG₁·KR₀ᵀ, QG₁loc·KR₁ᵀ]);
// and then per chunk, as in the 16-token step: v' = T'·(v − diag(kn)·KG·S), o = diag(qs)·(QG·S + A_qk·v'),
// S ← diag(2^Γ_C)·S + KUᵀ·diag(kn)·v'. The chunk rounds differently from the 16-token schedules (its bf16 tiles
// carry other decays), so `grid` matches the fp64 gold as closely as they do, not bit for bit.
#include <cstddef>
#include <cstdint>

#include "cuda/sm90/forward_parts.cuh"

namespace flash_kda::cuda::sm90 {
namespace {

// ---------------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------------
struct GridConfig {
  static constexpr int kChunk = 32;              // tokens per chunk: two blocks of Config::kChunk
  static constexpr int kBlock = Config::kChunk;  // 16
  static constexpr int kStateCtasPerPair = 2;    // value rows [0, 64) and [64, 128)
  static constexpr int kStateWarps = 4;          // warpgroup 0 of a state CTA
  static constexpr int kValueRows = 16 * kStateWarps;
  static constexpr int kLoaderWarp = 8;     // lane 0: bulk loads from the L2 ring (warpgroup 2)
  static constexpr int kPublisherWarp = 9;  // lane 0: the loaded count (warpgroup 2)
  static constexpr int kSharedRing = 4;     // slots per state CTA (39 KB each)
  static constexpr int kL2Ring = 16;        // slots per pair in the workspace (v16: 4 too few, 16 enough)
  static constexpr int kTeams = 4;          // per producer CTA: 55 KB stages, 4 fit
  static constexpr int kTeamWarps = 4;      // warp (h, b): channel half h, token block b
  static constexpr int kTeamThreads = kTeamWarps * 32;
  static constexpr int kThreads = kTeams * kTeamThreads;
  static constexpr int kFirstTeamBarrier = 1;  // named barriers 1..kTeams; 0 is __syncthreads'
  // setmaxnreg in a state CTA, per warpgroup: the launch gives every thread 65536 / 512 = 128 registers; the
  // state warps take 232, warpgroup 2 (the two lanes) 56, warpgroup 1 160 as a state team or else 24 as warpgroup 3
  // (idle). The team loop is inlined twice: the producer CTAs' copy fits in the launch's 128 registers, the state
  // team's copy at 128 spilled 8 bytes (ptxas, session 22), so it gets 160.
  static constexpr int kLaunchRegisters = (65536 / kThreads) / 8 * 8;
  static constexpr int kStateRegisters = 232;
  static constexpr int kLaneRegisters = 56;
  static constexpr int kStateTeamRegisters = 160;
  static constexpr int kIdleRegisters = 24;

  static_assert(kChunk == 2 * kBlock, "a chunk is two 16-token blocks (the T' form's blocks)");
  static_assert(kStateCtasPerPair * kValueRows == Config::kHeadDimV, "the state CTAs together hold all value rows");
  static_assert(kTeamWarps == 2 * (kChunk / kBlock), "a team warp per (channel half, token block)");
  static_assert(kLoaderWarp / 4 == 2 && kPublisherWarp / 4 == 2, "the lanes' warps are warpgroup 2");
  static_assert((kStateRegisters + kLaneRegisters + kStateTeamRegisters + kIdleRegisters) * 128 <=
                    kLaunchRegisters * kThreads,
                "the state CTA's registers fit in its allocation");
  static_assert(kFirstTeamBarrier + kTeams <= 16, "sm_90 has 16 named barriers per CTA");
  static_assert(kThreads == 4 * 128, "a state CTA's roles are its four warpgroups (state, team or idle, lanes, idle)");
};
constexpr int kSmall32 = GridConfig::kChunk + 8;  // 80-byte rows: 8 rows of an ldmatrix in distinct bank groups
// T'₀₀ᵀ, T'₁₁ and yᵀ (fp32 16 × 16) in 80-byte rows: T'₁₀'s products read T'₁₁ at a warp's 8 rows i0 = 2·(lane/4)
// at once, where 64-byte rows put all 8 in one bank group (8-way conflicts) and 80-byte rows in four (2-way); they
// read T'₀₀ᵀ and yᵀ as float4 at the warp's 4 rows j, which 80-byte rows put in distinct banks. M₁₀, read like T'₁₁,
// keeps 64-byte rows: padding it too spills registers (ptxas, session 21).
constexpr int kFp32Row = Config::kChunk + 4;
static_assert(kFp32Row * sizeof(float) % 16 == 0, "the fp32 rows are read as float4");

// ---------------------------------------------------------------------------------------------------
// Layouts: what crosses L2 (GridChunkTiles), a state CTA's slot, a producer team's stage
// ---------------------------------------------------------------------------------------------------
// The prepared chunk, as the state warps read it; the producers store its first kGridPayloadBytes into the L2 ring
// and the loader lane bulk-loads them. kq and ku in the swizzled layouts of the 16-token PreparedChunk (one
// 128-byte row per token and 64-channel half), T' and A_qk row-major.
struct alignas(1024) GridChunkTiles {
  bf16 kq[kKeyHalves][2 * GridConfig::kChunk][kHalfChannels];  // rows 0–31: KG, 32–63: QG (chunk-start decays)
  bf16 ku[kKeyHalves][GridConfig::kChunk][kHalfChannels];      // KU (chunk-end decays)
  bf16 t_scaled[GridConfig::kChunk][kSmall32];                 // T'[t][s]
  bf16 a_qk[GridConfig::kChunk][kSmall32];                     // A_qk[t][s]
  float decay[Config::kHeadDimK];                              // 2^Γ_C over the 32 tokens
  float q_scale[GridConfig::kChunk];
  float k_rnorm[GridConfig::kChunk];
  float b[GridConfig::kChunk];
};
// The bytes that cross L2: up to the last member, not sizeof (whose tail padding is not data). Members are
// composed, never inherited: a derived struct's first member can sit in its base's tail padding, and a copy of
// sizeof(base) bytes then overwrites it (v16's 32-token probe lost the first row of v that way).
constexpr uint32_t kGridPayloadBytes = offsetof(GridChunkTiles, b) + sizeof(GridChunkTiles::b);
constexpr uint32_t kGridPayloadUnits = kGridPayloadBytes / 16;
static_assert(kGridPayloadBytes % 128 == 0, "L2 ring slots are whole 128-byte lines, bulk copies whole 16-byte units");
static_assert(offsetof(GridChunkTiles, kq) % kSwizzleAtomBytes == 0 &&
                  offsetof(GridChunkTiles, ku) % kSwizzleAtomBytes == 0,
              "swizzled tiles start on a swizzle-atom boundary");
static_assert(offsetof(GridChunkTiles, t_scaled) % 16 == 0 && offsetof(GridChunkTiles, a_qk) % 16 == 0,
              "ldmatrix rows are 16-byte aligned");

// A state CTA's ring slot: the tiles by bulk copy, v by the state warps' own cp.async (GridValuePrefetch).
struct alignas(1024) GridSlot {
  GridChunkTiles tiles;
  bf16 v[GridConfig::kChunk][Config::kTileStride];
};

// A producer team's stage: raw q, k land in tiles.kq and g in kr; they are prepared in place, plus fp32 scratch.
struct alignas(1024) GridStage {
  GridChunkTiles tiles;
  bf16 kr[GridConfig::kChunk][Config::kTileStride];  // g, then KR (block-local decays)
  bf16 loc[GridConfig::kChunk][Config::kTileStride];  // rows 0–15: KG₁loc, 16–31: QG₁loc (block 1's local decays)
  float a_kk_t[2][Config::kChunk][Config::kChunk];  // A_kkᵀ of blocks 0, 1 (column m is a row)
  float t_fp32[2][Config::kChunk][kFp32Row];        // T'₀₀ᵀ [j][i], T'₁₁ [i][j]: both read by rows
  float m10[Config::kChunk][Config::kChunk];
  float y[Config::kChunk][kFp32Row];   // (M₁₀·T'₀₀)ᵀ [j][i]
  float totals[2][Config::kHeadDimK];  // Γ_C of each block, per channel
};

struct GridStateStorage {
  GridSlot ring[GridConfig::kSharedRing];
  bf16 out_stage[GridConfig::kStateWarps][GridConfig::kChunk][Config::kSmallStride];
  uint64_t full[GridConfig::kSharedRing];   // the loader's arrive.expect_tx + the bulk copy's bytes
  uint64_t empty[GridConfig::kSharedRing];  // the state warps' 128 threads and the publisher
  GridStage team_stage;  // warpgroup 1's, when it is a state team (grid_state_teams)
  uint32_t team_word;    // its leader's ticket
};
struct GridProducerStorage {
  GridStage stage[GridConfig::kTeams];
  uint32_t team_word[GridConfig::kTeams];  // the leader's ticket, read by the team after a barrier
};
constexpr size_t kGridSmemBytes = dynamic_smem_bytes<GridStateStorage, GridProducerStorage>();
static_assert(kGridSmemBytes <= 227 * 1024, "shared memory per block on sm_90 is at most 227 KB");

// ---------------------------------------------------------------------------------------------------
// The workspace (global memory, from the caller): per pair an L2 ring, its flags, a ticket and the loaded counts.
// The counters are zeroed by the host before every launch (launch_grid); the ring needs no initial value.
// ---------------------------------------------------------------------------------------------------
// Every counter has a 128-byte line of its own: packed, all pairs' tickets shared one line and each pair's 16 flags
// another, and how fast the hand-over ran depended on where those few hot lines fell in L2 (0.82 against 1.40 ms at
// 1x32768 H16 for two placements of the same workspace, repeatable within one process).
inline constexpr int kCounterStride = 128 / sizeof(uint32_t);
struct GridWorkspace {
  uint4* ring;        // [pairs][kL2Ring][kGridPayloadUnits]
  uint32_t* flags;    // [pairs][kL2Ring] (strided): c + 1 once chunk c is in slot c mod kL2Ring
  uint32_t* tickets;  // [pairs] (strided): the next chunk to prepare
  uint32_t* loaded;   // [pairs][2] (strided): chunks each state CTA of the pair has loaded from the ring
  __device__ uint32_t* flag(int64_t pair, int slot) const {
    return flags + (pair * GridConfig::kL2Ring + slot) * kCounterStride;
  }
  __device__ uint32_t* ticket(int64_t pair) const { return tickets + pair * kCounterStride; }
  __device__ uint32_t* loaded_count(int64_t pair, int rank) const {
    return loaded + (2 * pair + rank) * kCounterStride;
  }
};

__device__ __forceinline__ uint32_t load_acquire_gpu(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint32_t load_relaxed_gpu(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_release_gpu(uint32_t* p, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// Bulk copy (copy engine) of `bytes` from global to this CTA's shared memory, completing on mbarrier `bar`.
__device__ __forceinline__ void bulk_load_global_to_shared(uint32_t dst, const void* src, uint32_t bytes,
                                                           uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
// Bulk copy of `bytes` from this CTA's shared memory to global, as a bulk group of its own.
__device__ __forceinline__ void bulk_store_shared_to_global(void* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n cp.async.bulk.commit_group;" ::"l"(dst),
               "r"(src), "r"(bytes)
               : "memory");
}
// This thread's bulk stores have read their source (the stage may be overwritten).
__device__ __forceinline__ void bulk_stores_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
// This thread's bulk stores are complete, and ordered before its later generic accesses (the flag's release).
__device__ __forceinline__ void bulk_stores_written() {
  asm volatile("cp.async.bulk.wait_group 0;\n fence.proxy.async.global;" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)), "r"(bytes)
               : "memory");
}
// One wait for the phase with `parity`, suspended by the hardware until it completes or `ns` pass.
__device__ __forceinline__ bool mbarrier_try_wait_for(uint64_t* bar, uint32_t parity, uint32_t ns) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2, %3;\n selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done)
      : "r"(shared_address(bar)), "r"(parity), "r"(ns)
      : "memory");
  return done != 0;
}
// One non-blocking test of the phase with `parity` (the publisher polls several barriers in turn).
__device__ __forceinline__ bool mbarrier_test_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile("{\n .reg .pred p;\n mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
               : "=r"(done)
               : "r"(shared_address(bar)), "r"(parity)
               : "memory");
  return done != 0;
}
__device__ __forceinline__ void team_sync(int barrier) {
  asm volatile("bar.sync %0, %1;" ::"r"(barrier), "n"(GridConfig::kTeamThreads) : "memory");
}

__device__ __forceinline__ int64_t grid_chunks(const SequenceBounds& sb) {
  return (sb.length + GridConfig::kChunk - 1) / GridConfig::kChunk;
}

// ---------------------------------------------------------------------------------------------------
// Math, the recurrence over one 32-token chunk (a state warp, value rows [row0, +16) of the warpgroup's 64):
//   Pᵀ = Sᵀ·KGᵀ and Oᵀ = Sᵀ·QGᵀ as two batches of 8 × wgmma m64n32k16; v'ᵀ = (v − diag(kn)·P)ᵀ·T'ᵀ and A_qk·v' as
//   mma.sync over the blocks on or below the diagonal; Sᵀ ← Sᵀ·diag(decay) + (diag(kn)·v')ᵀ·KU as 4 × wgmma m64n64k16.
// ---------------------------------------------------------------------------------------------------
template <int N, size_t... I>
__device__ __forceinline__ void p_or_o_fma(const uint32_t (&a)[4], uint64_t desc, float (&acc)[N],
                                           std::index_sequence<I...>) {
  using namespace cute::SM90::GMMA;
  uint32_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  MMA_64x32x16_F32BF16BF16_RS<Major::K, Major::K>::fma(a0, a1, a2, a3, desc, acc[I]...);
}
template <size_t... I>
__device__ __forceinline__ void update_fma(const uint32_t (&a)[4], uint64_t desc, float* s, std::index_sequence<I...>) {
  using namespace cute::SM90::GMMA;
  uint32_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  MMA_64x64x16_F32BF16BF16_RS<Major::K, Major::MN>::fma(a0, a1, a2, a3, desc, s[I]...);
}

// acc[j] (token n8 tile j) += x[kb] · M[t][s]ᵀ over the 16 × 16 blocks of M on or below the diagonal (M row-major
// [t][s], stride kSmall32; x[kb]: this warp's A fragment of token block kb).
__device__ __forceinline__ void lower_product(const bf16 (&m)[GridConfig::kChunk][kSmall32], const uint32_t (&x)[2][4],
                                              float (&acc)[4][4], int lane) {
  uint32_t b[4];
  ldsm(b_frag_addr_n_major(&m[0][0], kSmall32, 0, lane), b);  // t 0–15, s 0–15
  mma(acc[0], x[0], b[0], b[1]);
  mma(acc[1], x[0], b[2], b[3]);
  ldsm(b_frag_addr_n_major(&m[16][0], kSmall32, 0, lane), b);  // t 16–31, s 0–15
  mma(acc[2], x[0], b[0], b[1]);
  mma(acc[3], x[0], b[2], b[3]);
  ldsm(b_frag_addr_n_major(&m[16][0], kSmall32, 16, lane), b);  // t 16–31, s 16–31
  mma(acc[2], x[1], b[0], b[1]);
  mma(acc[3], x[1], b[2], b[3]);
}

// One chunk of StateWarp `s` from `slot`; release() once the warp has read the slot (before the o store).
template <class Release>
__device__ __forceinline__ void grid_step(StateWarp& s, const GridSlot& slot,
                                          bf16 (&out_stage)[GridConfig::kChunk][Config::kSmallStride],
                                          const ForwardParams& p, Release&& release) {
  const GridChunkTiles& cur = slot.tiles;
  const int lane = s.lane, quad = s.quad, group = s.group, row0 = s.row0;
  // ---- Pᵀ = Sᵀ·KGᵀ, then Oᵀ = Sᵀ·QGᵀ (tokens 0–31 each), two batches ----
  // v' needs only P: waiting for P alone lets O run on the tensor cores while the warps start on v' (v22; O is
  // waited for with the update, and its A fragments stay untouched until then).
  float p_acc[16] = {}, o_from_state[16] = {};
  uint32_t a[Config::kHeadDimK / 16][4];
  {
#pragma unroll
    for (int kk = 0; kk < Config::kHeadDimK / 16; ++kk) s.state_operand(kk, a[kk]);
    const uint64_t kq_desc = swizzled_k_major_desc(&cur.kq[0][0][0]);
    wgmma_fence_operands(a);
    wgmma_fence_operands(p_acc);
    wgmma_fence_operands(o_from_state);
    cute::warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < Config::kHeadDimK / 16; ++kk)  // k-step kk: half kk / 4, 32-byte column kk % 4
      p_or_o_fma(a[kk], kq_desc + descriptor_address((kk / 4) * sizeof(cur.kq[0]) + (kk % 4) * 32), p_acc,
                 std::make_index_sequence<16>{});
    cute::warpgroup_commit_batch();
#pragma unroll
    for (int kk = 0; kk < Config::kHeadDimK / 16; ++kk)  // QG: the 32 rows after KG's
      p_or_o_fma(a[kk],
                 kq_desc + descriptor_address((kk / 4) * sizeof(cur.kq[0]) + (kk % 4) * 32 +
                                              GridConfig::kChunk * sizeof(cur.kq[0][0])),
                 o_from_state, std::make_index_sequence<16>{});
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<1>();
    wgmma_fence_operands(p_acc);
  }
  float kn[4][2], qs[4][2];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 k2 = *reinterpret_cast<const float2*>(&cur.k_rnorm[8 * j + 2 * quad]);
    const float2 q2 = *reinterpret_cast<const float2*>(&cur.q_scale[8 * j + 2 * quad]);
    kn[j][0] = k2.x, kn[j][1] = k2.y, qs[j][0] = q2.x, qs[j][1] = q2.y;
  }
  // ---- v'ᵀ = (v − diag(kn)·P)ᵀ·T'ᵀ ----
  uint32_t d_frag[2][4];
  {
    float d[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int v = row0 + group + 8 * (e / 2);
        const int t = 8 * j + 2 * quad + (e % 2);
        d[j][e] = fmaf(-kn[j][e % 2], p_acc[4 * j + e], __bfloat162float(slot.v[t][v]));
      }
    accum_to_a_frag(*reinterpret_cast<const float(*)[2][4]>(&d[0]), d_frag[0]);
    accum_to_a_frag(*reinterpret_cast<const float(*)[2][4]>(&d[2]), d_frag[1]);
  }
  float vp[4][4] = {};
  lower_product(cur.t_scaled, d_frag, vp, lane);
  uint32_t vp_frag[2][4], w_frag[2][4];
  {
    float w[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) w[j][e] = vp[j][e] * kn[j][e % 2];
    accum_to_a_frag(*reinterpret_cast<const float(*)[2][4]>(&vp[0]), vp_frag[0]);
    accum_to_a_frag(*reinterpret_cast<const float(*)[2][4]>(&vp[2]), vp_frag[1]);
    accum_to_a_frag(*reinterpret_cast<const float(*)[2][4]>(&w[0]), w_frag[0]);
    accum_to_a_frag(*reinterpret_cast<const float(*)[2][4]>(&w[2]), w_frag[1]);
  }
  // ---- decay, the update (4 wgmma, issued), A_qk·v' on the tensor cores beside it ----
#pragma unroll
  for (int n = 0; n < StateWarp::kFrags; ++n) {
    const float2 decay = *reinterpret_cast<const float2*>(&cur.decay[8 * n + 2 * quad]);
    s.st[n][0] *= decay.x;
    s.st[n][1] *= decay.y;
    s.st[n][2] *= decay.x;
    s.st[n][3] *= decay.y;
  }
  wgmma_fence_operands(w_frag);
  wgmma_fence_operands(s.st);
  cute::warpgroup_arrive();
  {
    // KU is MN-major: 32 token rows per half, k-step kb = token block kb (2048 bytes in).
    const uint64_t ku_desc = matrix_desc(&cur.ku[0][0][0], GridConfig::kChunk * 128, kSwizzleAtomBytes, 1);
#pragma unroll
    for (int kb = 0; kb < 2; ++kb)
#pragma unroll
      for (int h = 0; h < kKeyHalves; ++h)
        update_fma(w_frag[kb], ku_desc + descriptor_address(h * sizeof(cur.ku[0]) + kb * 2048), &s.st[8 * h][0],
                   std::make_index_sequence<32>{});
  }
  cute::warpgroup_commit_batch();
  float o_intra[4][4] = {};
  lower_product(cur.a_qk, vp_frag, o_intra, lane);
  cute::warpgroup_wait<0>();
  wgmma_fence_operands(s.st);
  wgmma_fence_operands(o_from_state);
  wgmma_fence_operands(a);  // O's A fragments, live until here
  float o_acc[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[j][e] = o_from_state[4 * j + e] + o_intra[j][e];
  release();
  // ---- store: two 16-token blocks, transposed through shared memory into 16-byte pieces ----
#pragma unroll
  for (int blk = 0; blk < 2; ++blk) {
    uint32_t packed[4];
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        packed[2 * n + h] = pack_bf16x2(o_acc[2 * blk + n][2 * h] * qs[2 * blk + n][0],
                                        o_acc[2 * blk + n][2 * h + 1] * qs[2 * blk + n][1]);
    const int block = lane / 8;
    stsm_trans(&out_stage[16 * blk + 8 * (block / 2) + lane % 8][8 * (block % 2)], packed);
  }
  __syncwarp();
#pragma unroll
  for (int blk = 0; blk < 2; ++blk)
    if (16 * blk + lane / 2 < s.tokens_left)
      *reinterpret_cast<uint4*>(s.out_piece + 16 * blk * p.out.token_stride) =
          *reinterpret_cast<const uint4*>(&out_stage[16 * blk + lane / 2][8 * (lane % 2)]);
  s.out_piece += GridConfig::kChunk * p.out.token_stride;
  s.tokens_left -= GridConfig::kChunk;
  __syncwarp();  // the next chunk's stores reuse out_stage
}

// Load, state side: v by the state warps themselves, for the chunk kLookahead ahead (ValuePrefetchOf: two 16-byte
// cp.async per lane, one per 16-token block); v never crosses between SMs.
using GridValuePrefetch = ValuePrefetchOf<GridConfig::kChunk, 3>;
static_assert(GridValuePrefetch::kLookahead < GridConfig::kSharedRing,
              "a prefetch lands in a slot this warp is done with");

// ---------------------------------------------------------------------------------------------------
// Load, producer side: tensor kTensor (0 q, 1 k, 2 g: ChunkLoader's order) of token block b into the stage (q, k
// into the swizzled kq rows of QG and KG, g into kr). kWhole: every row of the block is inside the sequence, no
// predicate (v34: the predicated copy costs ~8 instructions, this one ~4); otherwise predicated, zero fill past the
// sequence. The tensor is a template argument: a runtime index into the loader's row pointers would put them in
// local memory.
// ---------------------------------------------------------------------------------------------------
template <int kTensor, bool kWhole>
__device__ __forceinline__ void load_block(const ChunkLoader& L, int64_t chunk, int64_t length, GridStage& st, int b) {
  const int64_t first_token = chunk * GridConfig::kChunk + GridConfig::kBlock * b;
  const bf16* row_src = L.first_source(kTensor, first_token);
  const int64_t step = ChunkLoader::kRowsPerPass * L.token_stride[kTensor];
#pragma unroll
  for (int pass = 0; pass < ChunkLoader::kPasses; ++pass) {
    const int row = L.row0 + ChunkLoader::kRowsPerPass * pass;
    bf16* dst = kTensor == 2 ? &st.kr[GridConfig::kBlock * b + row][L.seg * 8]
                             : &st.tiles.kq[L.seg / 8][(kTensor == 0 ? GridConfig::kChunk : 0) +
                                                       GridConfig::kBlock * b + row][((L.seg % 8) ^ (row % 8)) * 8];
    if constexpr (kWhole) {
      copy_16_bytes_async(shared_address(dst), row_src);
    } else {
      const bool valid = first_token + row < length;
      copy_16_bytes_async_or_zero(shared_address(dst), valid ? row_src : L.first_row[kTensor], valid);
    }
    row_src += step;
  }
}
// Warp (h, b)'s loads: h = 0 q and k of block b, h = 1 its g; the choice of form made once for the warp's tensors.
template <bool kWhole>
__device__ __forceinline__ void load_warp_blocks(const ChunkLoader& L, int64_t chunk, int64_t length, GridStage& st,
                                                 int h, int b) {
  if (h == 0) {
    load_block<0, kWhole>(L, chunk, length, st, b);
    load_block<1, kWhole>(L, chunk, length, st, b);
  } else {
    load_block<2, kWhole>(L, chunk, length, st, b);
  }
}

// ---------------------------------------------------------------------------------------------------
// Math, producer side (a team of 4 warps, warp (h, b)): norms, gate, tiles, the intra-chunk matrices
// ---------------------------------------------------------------------------------------------------
// acc = X(16 rows: swizzled kq rows from x_row, or row-major loc rows if x_loc) · KR(rows kr_row..+15)ᵀ.
__device__ __forceinline__ void block_product(const GridStage& st, int x_row, bool x_loc, int kr_row, int lane,
                                              float (&acc)[2][4]) {
#pragma unroll
  for (int kk = 0; kk < Config::kHeadDimK / 16; ++kk) {
    uint32_t a[4], b[4];
    if (x_loc) {
      ldsm(&st.loc[x_row + lane % 16][16 * kk + 8 * (lane / 16)], a);
    } else {
      const int r = x_row + lane % 16;
      ldsm(&st.tiles.kq[kk / 4][r][(((2 * kk + lane / 16) % 8) ^ (r % 8)) * 8], a);
    }
    ldsm(b_frag_addr_n_major(&st.kr[kr_row][0], Config::kTileStride, 16 * kk, lane), b);
    mma(acc[0], a, b[0], b[1]);
    mma(acc[1], a, b[2], b[3]);
  }
}

// A_bb (strict lower, in acc) of block bb, times b·kn of its rows, transposed into a_kk_t[bb] for the substitution.
__device__ __forceinline__ void store_a_kk(GridStage& st, const float (&acc)[2][4], int bb, int lane) {
  float(&a_kk_t)[Config::kChunk][Config::kChunk] = st.a_kk_t[bb];
  const int base = GridConfig::kBlock * bb;
  for_each_element(acc, lane, [&](int i, int j, float x) {
    a_kk_t[j][i] = j < i ? st.tiles.b[base + i] * st.tiles.k_rnorm[base + i] * x : 0.f;
  });
}

// T'₀₀ and T'₁₁ from a_kk_t, both blocks in one warp (v37: one half-warp per block, where a warp per block left
// half of each idle): lane l solves column l mod 16 of block l / 16 by right-looking forward substitution; bf16
// into the diagonal blocks of t_scaled, fp32 into t_fp32 (T'₀₀ transposed, T'₁₁ as is).
__device__ __forceinline__ void substitute_blocks(GridStage& st, int lane) {
  const int l = recomputed_here(lane);
  const int bb = l / GridConfig::kBlock, j = l % GridConfig::kBlock, base = GridConfig::kBlock * bb;
  const float(&a_kk_t)[Config::kChunk][Config::kChunk] = st.a_kk_t[bb];
  float column[Config::kChunk];
  solve_unit_column(a_kk_t, j, column);
  const float bj = st.tiles.b[base + j];
#pragma unroll
  for (int i = 0; i < Config::kChunk; ++i) column[i] *= bj;
  if (bb == 0) {  // T'₀₀ transposed: lane j's own row, as y's product reads it
#pragma unroll
    for (int i4 = 0; i4 < Config::kChunk / 4; ++i4)
      *reinterpret_cast<float4*>(&st.t_fp32[0][j][4 * i4]) =
          make_float4(column[4 * i4], column[4 * i4 + 1], column[4 * i4 + 2], column[4 * i4 + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < Config::kChunk; ++i) st.t_fp32[1][i][j] = column[i];
  }
#pragma unroll
  for (int i = 0; i < Config::kChunk; ++i) st.tiles.t_scaled[base + i][base + j] = __float2bfloat16_rn(column[i]);
}

// Prepares `chunk` of the pair in `st`: warp (h, b) = channel half h (its gate round and tiles), token block b.
// after_load() runs once the loads are issued (the leader takes its next ticket there, hidden by the loads).
// Ends without a team barrier: the caller's, after each thread's proxy fence, completes the stage (v32).
template <class AfterLoad>
__device__ __forceinline__ void prepare_chunk(const ChunkProducer& pr, const ForwardParams& p, const SequenceBounds& sb,
                                              int head, int64_t chunk, GridStage& st, int h, int b, int barrier,
                                              int lane, AfterLoad&& after_load) {
  constexpr int kC = GridConfig::kChunk, kB = GridConfig::kBlock;
  const ChunkPreparer& prep = pr.preparer;
  GridChunkTiles& t = st.tiles;
  // ---- load: h = 0 q and k of block b, h = 1 its g ----
  if (chunk * kC + kB * (b + 1) <= sb.length)
    load_warp_blocks<true>(pr.loader, chunk, sb.length, st, h, b);
  else
    load_warp_blocks<false>(pr.loader, chunk, sb.length, st, h, b);
  cute::cp_async_fence();
  const int64_t first_token = chunk * kC;
  const float beta_logit = h == 0 ? load_beta(p, sb, head, first_token + kB * b + lane / 2) : 0.f;
  after_load();
  cute::cp_async_wait<0>();
  team_sync(barrier);
  const int64_t left = sb.length - first_token;
  const int valid = static_cast<int>(left < kC ? left : kC);  // rows of the chunk inside the sequence
  // ---- norms and b: h = 0 the q rows of block b, h = 1 its k rows, two lanes per row ----
  {
    const int row = kB * b + lane / 2;
    float sum = ChunkPreparer::half_row_sum_of_squares(t, (h == 0 ? kC : 0) + row, lane % 2, 4 * (lane % 2));
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    if (lane % 2 == 0) {
      const float rnorm = p.l2norm_qk ? rsqrtf(sum + 1e-6f) : 1.f;
      if (h == 0) {
        t.q_scale[row] = rnorm * p.scale;
        t.b[row] = row < valid ? sigmoid(beta_logit) * (p.beta_times_two ? 2.f : 1.f) : 0.f;
      } else {
        t.k_rnorm[row] = rnorm;
      }
    }
  }
  // ---- gate: round h over block b (lane: channels 64h + 2·lane, +1); the blocks' totals are exchanged ----
  const int ch = 64 * h + 2 * lane;
  // A select, not exp_offset[h]: a runtime index into the preparer's registers would put them in local memory.
  const float offset[2] = {h == 0 ? prep.exp_offset[0][0] : prep.exp_offset[1][0],
                           h == 0 ? prep.exp_offset[0][1] : prep.exp_offset[1][1]};
  float gate[kB][2];
  float total[2] = {0.f, 0.f};
#pragma unroll
  for (int tk = 0; tk < kB; ++tk) {
    const float2 g = unpack_bf16x2(*reinterpret_cast<const uint32_t*>(&st.kr[kB * b + tk][ch]));
    const float g2[2] = {g.x, g.y};
    const float bound = kB * b + tk < valid ? prep.lower_bound_log2 : 0.f;  // no decay past the sequence
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      gate[tk][c] = bound * fast_rcp(1.f + fast_exp2(fmaf(prep.exp_scale, g2[c], offset[c])));
      total[c] += gate[tk][c];
    }
  }
  *reinterpret_cast<float2*>(&st.totals[b][ch]) = make_float2(total[0], total[1]);
  team_sync(barrier);  // norms written, totals of both blocks known
  const float2 other2 = *reinterpret_cast<const float2*>(&st.totals[1 - b][ch]);
  const float other[2] = {other2.x, other2.y};
  const float decay_end[2] = {fast_exp2(total[0]), fast_exp2(total[1])};    // 2^Γ_C of this block
  const float other_decay[2] = {fast_exp2(other[0]), fast_exp2(other[1])};  // of the other block
  if (b == 0)
    *reinterpret_cast<float2*>(&t.decay[ch]) =
        make_float2(fast_exp2(total[0] + other[0]), fast_exp2(total[1] + other[1]));
  // ---- tiles, in place: block 0 local = chunk-start decays; block 1's KG, QG · block 0's total; block 0's KU ·
  // block 1's total; KR block-local; block 1's local KG, QG also into loc for its diagonal products ----
  {
    bf16* kq_half = &t.kq[h][0][0];
    bf16* ku_half = &t.ku[h][0][0];
    const int lane_unit = recomputed_here((lane / 4) * 8 + 2 * (lane % 4));
    // Per channel, hoisted out of the token loop (v33): to the chunk's start, block 1 also decays by block 0's
    // total; to its end, block 0 also by block 1's.
    const float to_start[2] = {b == 0 ? 1.f : other_decay[0], b == 0 ? 1.f : other_decay[1]};
    const float to_end[2] = {b == 0 ? decay_end[0] * other_decay[0] : decay_end[0],
                             b == 0 ? decay_end[1] * other_decay[1] : decay_end[1]};
    float gamma[2] = {0.f, 0.f};
#pragma unroll
    for (int tk = 0; tk < kB; ++tk) {
      const int row = kB * b + tk;
      const float kn = t.k_rnorm[row];
      const int in_row = lane_unit ^ ((tk % 8) * 8);
      bf16* qg_at = kq_half + (kC + row) * kHalfChannels + in_row;
      bf16* kg_at = kq_half + row * kHalfChannels + in_row;
      const float2 q = unpack_bf16x2(*reinterpret_cast<const uint32_t*>(qg_at));
      const float2 k = unpack_bf16x2(*reinterpret_cast<const uint32_t*>(kg_at));
      const float q2[2] = {q.x, q.y}, k2[2] = {k.x, k.y};
      float qg[2], kg[2], kr[2], ku[2], kl[2], ql[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        gamma[c] += gate[tk][c];
        const float up = fast_exp2(gamma[c]);
        const float down = fast_exp2(-gamma[c]);
        kl[c] = k2[c] * up;  // block-local
        ql[c] = q2[c] * up;
        kg[c] = kl[c] * to_start[c];  // relative to the chunk's start
        qg[c] = ql[c] * to_start[c];
        const float k_down = k2[c] * down;  // shared by KR and KU: one multiplication fewer (v54)
        kr[c] = k_down * kn;
        ku[c] = k_down * to_end[c];  // to the chunk's end
      }
      *reinterpret_cast<uint32_t*>(qg_at) = pack_bf16x2(qg[0], qg[1]);
      *reinterpret_cast<uint32_t*>(kg_at) = pack_bf16x2(kg[0], kg[1]);
      *reinterpret_cast<uint32_t*>(&st.kr[row][ch]) = pack_bf16x2(kr[0], kr[1]);
      *reinterpret_cast<uint32_t*>(ku_half + row * kHalfChannels + in_row) = pack_bf16x2(ku[0], ku[1]);
      if (b == 1) {
        *reinterpret_cast<uint32_t*>(&st.loc[tk][ch]) = pack_bf16x2(kl[0], kl[1]);
        *reinterpret_cast<uint32_t*>(&st.loc[kB + tk][ch]) = pack_bf16x2(ql[0], ql[1]);
      }
    }
  }
  team_sync(barrier);  // every tile written
  // ---- the intra-chunk matrices: six 16 × 16 × 128 products and both blocks' T', in two steps ----
  // Step 1, a product per warp: A₀₀ and A₁₁ into a_kk_t, A_qk₀₀, M₁₀. Step 2: warp 0 solves both blocks' T' (v37:
  // a half-warp per block, where a warp per block left half of each idle) while warps 1 and 2 form A_qk₁₁, A_qk₁₀.
  const int w = 2 * b + h;
  {
    float acc[2][4] = {};
    if (w == 0) {  // A₀₀
      block_product(st, 0, false, 0, lane, acc);
      store_a_kk(st, acc, 0, lane);
    } else if (w == 2) {  // A₁₁ (block 1's local KG)
      block_product(st, 0, true, kB, lane, acc);
      store_a_kk(st, acc, 1, lane);
    } else if (w == 1) {  // A_qk₀₀
      block_product(st, kC, false, 0, lane, acc);
      for_each_element(acc, lane, [&](int i, int j, float x) { t.a_qk[i][j] = __float2bfloat16_rn(j <= i ? x : 0.f); });
    } else {  // M₁₀ = diag(kn₁)·KG₁·KR₀ᵀ (chunk-start KG₁)
      block_product(st, kB, false, 0, lane, acc);
      for_each_element(acc, lane, [&](int i, int j, float x) { st.m10[i][j] = t.k_rnorm[kB + i] * x; });
    }
  }
  team_sync(barrier);  // A₀₀ and A₁₁ stored
  if (w == 0) {  // T'₀₀ and T'₁₁
    substitute_blocks(st, lane);
  } else if (w == 1) {  // A_qk₁₁ (block 1's local QG)
    float acc[2][4] = {};
    block_product(st, kB, true, kB, lane, acc);
    for_each_element(acc, lane,
                     [&](int i, int j, float x) { t.a_qk[kB + i][kB + j] = __float2bfloat16_rn(j <= i ? x : 0.f); });
  } else if (w == 2) {  // A_qk₁₀ = QG₁·KR₀ᵀ (chunk-start QG₁)
    float acc[2][4] = {};
    block_product(st, kC + kB, false, 0, lane, acc);
    for_each_element(acc, lane, [&](int i, int j, float x) { t.a_qk[kB + i][j] = __float2bfloat16_rn(x); });
  }
  team_sync(barrier);
  // ---- T'₁₀ = −T'₁₁·(M₁₀·T'₀₀): warp w computes columns 4w..4w+3, a lane two rows of one column ----
  const int j = 4 * w + lane % 4, i0 = 2 * (lane / 4);
  {
    float y[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int l = 0; l < kB; ++l) y[r] = fmaf(st.m10[i0 + r][l], st.t_fp32[0][j][l], y[r]);
    *reinterpret_cast<float2*>(&st.y[j][i0]) = make_float2(y[0], y[1]);
  }
  // The second product reads only the columns of y this warp wrote (all 16 rows of columns 4w..4w+3), so a warp
  // barrier suffices (v32).
  __syncwarp();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float tt = 0.f;
#pragma unroll
    for (int k = 0; k < kB; ++k) tt = fmaf(st.t_fp32[1][i0 + r][k], st.y[j][k], tt);
    t.t_scaled[kB + i0 + r][j] = __float2bfloat16_rn(-tt);
  }
  // T'₀₁ (above the diagonal) is never read (lower_product skips the block), and neither is A_qk₀₁.
}

// ---------------------------------------------------------------------------------------------------
// Scheduling, producer CTAs: a team's loop over tickets and pairs
// ---------------------------------------------------------------------------------------------------
// A team serves pair `team mod pairs` until its chunks are all taken, then the next pairs in turn (varlen: the
// teams of short sequences move on to the long ones). Per chunk: prepare, wait until the slot's previous chunk has
// been loaded by both state CTAs, store into the slot (one bulk copy by the leader), and raise the flag once
// the store is complete: while the next chunk's loads fly, so that the wait for the store is off the team's path,
// and at the latest when the team leaves the pair. Were there fewer teams than pairs, the pairs that no team starts
// on would wait until a team has finished its first pair (correct but slower; the loader's 60 s hang guard would
// bound how long a first pair may take); the producer CTAs' teams alone are that few above 4·SMs/9 pairs, but the
// state teams are on from 2·SMs/9 (grid_state_teams), and with them there are 4·SMs − 6·pairs ≥ pairs teams.
// Inlined at both call sites, so that each copy gets its caller's registers (128 in a producer CTA, 160 in a state
// team).
__device__ __forceinline__ void run_grid_team(const ForwardParams& p, const GridWorkspace& ws, int pairs, int team,
                                              GridStage& st, uint32_t& team_word, int team_warp, int barrier,
                                              int lane) {
  const int h = team_warp % 2, b = team_warp / 2;
  const bool leader = team_warp == 0 && lane == 0;
  volatile uint32_t& word = team_word;
  uint32_t* pending_flag = nullptr;  // the leader's: the flag of the chunk stored last, not yet raised
  uint32_t pending_value = 0;
  // The leader raises it once the chunk's bulk store is complete: while the next chunk's loads fly, or before
  // any wait (a held-back flag can deadlock the ring: v17), or at the end.
  const auto raise_flag = [&] {
    bulk_stores_written();
    store_release_gpu(pending_flag, pending_value);
    pending_flag = nullptr;
  };
  for (int visit = 0; visit < pairs; ++visit) {
    const int pair = (team + visit) % pairs;  // 32-bit: pairs < SMs (a 64-bit division is a call that spills)
    const PairWork work = pair_work(p, pair / p.heads, pair % p.heads);
    const int64_t num_chunks = grid_chunks(work.sb);
    team_sync(barrier);  // the whole team has read the last visit's word
    if (leader) word = load_relaxed_gpu(ws.ticket(pair)) < num_chunks ? atomicAdd(ws.ticket(pair), 1u) : ~0u;
    team_sync(barrier);
    int64_t chunk = word;
    if (chunk >= num_chunks) continue;  // every chunk of this pair is taken already
    const ChunkProducer producer(p, work.sb, work.head, lane);
    const uint32_t* loaded[2] = {ws.loaded_count(pair, 0), ws.loaded_count(pair, 1)};
    uint32_t loaded_seen = 0;  // the leader's: both state CTAs have loaded this many chunks
    uint32_t next = 0;
    while (chunk < num_chunks) {
      prepare_chunk(producer, p, work.sb, work.head, chunk, st, h, b, barrier, lane, [&] {
        if (leader) {
          next = atomicAdd(ws.ticket(pair), 1u);
          if (pending_flag != nullptr) raise_flag();  // the previous chunk's store has had its time to land
        }
      });
      // ---- store into the L2 ring: one bulk copy by the leader; the team waits only until it has read the stage ----
      fence_proxy_async_shared();  // each thread's writes to the stage, before the copy engine reads them
      team_sync(barrier);
      if (leader) {
        // ---- flow control, after the preparation: slot chunk mod kL2Ring is free once chunk − kL2Ring is loaded
        // into both state CTAs. Waiting here rather than before the loads lets a team prepare its chunk while the
        // state side drains the ring (the stage holds one chunk more per team, outside L2). ----
        if (chunk >= GridConfig::kL2Ring) {
          const uint32_t need = static_cast<uint32_t>(chunk - GridConfig::kL2Ring + 1);
          // No flag is held back here (a held-back flag can deadlock the ring: v17): after_load raised the last one.
          if (loaded_seen < need)
            wait_until([&] {
              const uint32_t c0 = load_acquire_gpu(loaded[0]), c1 = load_acquire_gpu(loaded[1]);
              loaded_seen = c0 < c1 ? c0 : c1;
              return loaded_seen >= need;  // no __nanosleep: a sleep costs more reaction time than the poll
            });
        }
        asm volatile("fence.proxy.async.global;" ::: "memory");  // the flow control's acquire, before the writes
        bulk_store_shared_to_global(
            ws.ring + (pair * GridConfig::kL2Ring + chunk % GridConfig::kL2Ring) * kGridPayloadUnits,
            shared_address(&st.tiles), kGridPayloadBytes);
        bulk_stores_read();
        word = next;
      }
      team_sync(barrier);  // the stage is read: the next chunk may load into it
      pending_flag = ws.flag(pair, chunk % GridConfig::kL2Ring);
      pending_value = static_cast<uint32_t>(chunk + 1);
      chunk = word;
    }
    // The pair's last chunk: its flag goes up now, not after the visits of the pairs with nothing left (their
    // tickets, bounds and barriers take microseconds while this pair's loader waits).
    if (leader && pending_flag != nullptr) raise_flag();
  }
}

// ---------------------------------------------------------------------------------------------------
// Scheduling, state CTAs: state warps, the loader lane, the publisher lane
// ---------------------------------------------------------------------------------------------------
// The loader: for each chunk, waits for its shared slot (EMPTY) and for the L2 slot's flag, then bulk-loads the
// tiles into the shared slot, completing FULL with the bytes.
__device__ void run_grid_loader(const GridWorkspace& ws, int64_t pair, int64_t num_chunks, GridStateStorage& ss) {
  int slot = 0, l2_slot = 0;
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    if (chunk >= GridConfig::kSharedRing)
      mbarrier_wait_guarded(&ss.empty[slot], static_cast<uint32_t>((chunk / GridConfig::kSharedRing - 1) & 1));
    const uint32_t* flag = ws.flag(pair, l2_slot);
    wait_until([&] {
      return load_acquire_gpu(flag) == static_cast<uint32_t>(chunk + 1);  // no __nanosleep, as above
    });
    mbarrier_arrive_expect_tx(&ss.full[slot], kGridPayloadBytes);
    asm volatile("fence.proxy.async.global;" ::: "memory");  // the acquire above, before the bulk copy's reads
    bulk_load_global_to_shared(shared_address(&ss.ring[slot].tiles),
                               ws.ring + (pair * GridConfig::kL2Ring + l2_slot) * kGridPayloadUnits, kGridPayloadBytes,
                               shared_address(&ss.full[slot]));
    if (++slot == GridConfig::kSharedRing) slot = 0;
    if (++l2_slot == GridConfig::kL2Ring) l2_slot = 0;
  }
}

// The publisher: how many chunks this CTA has loaded (their FULL phase completed), for the producers' flow control.
// It takes part in every chunk's EMPTY phase (one arrival beside the state warps' 128), once it has seen that chunk's
// FULL phase complete. So the parity it tests is never ambiguous: a slot's FULL barrier cannot be a phase behind
// (the lane takes the chunks in order, and chunk c − kSharedRing's phase completed before it looked at chunk c), nor
// a phase ahead (chunk c + kSharedRing's load waits for chunk c's EMPTY, which waits for this lane). The state warps
// then need no count of their own (v25: their release fence per chunk cost the chain ~1.5%).
__device__ void run_grid_publisher(const GridWorkspace& ws, int64_t pair, int rank, int64_t num_chunks,
                                   GridStateStorage& ss) {
  int slot = 0;
  uint32_t parity = 0;
  int64_t chunk = 0;
  while (chunk < num_chunks) {
    // Suspended (up to 2 µs at a time) until the chunk's bulk load lands.
    wait_until_trap_after([&] { return mbarrier_try_wait_for(&ss.full[slot], parity, 2000); });
    do {  // this chunk, and the next ones that have landed too: one report for all of them
      mbarrier_arrive(&ss.empty[slot]);
      ++chunk;
      if (++slot == GridConfig::kSharedRing) slot = 0, parity ^= 1;
    } while (chunk < num_chunks && mbarrier_test_wait(&ss.full[slot], parity));
    store_release_gpu(ws.loaded_count(pair, rank), static_cast<uint32_t>(chunk));
  }
}

__device__ void run_grid_state_warp(const ForwardParams& p, const PairWork& work, int64_t num_chunks, int row0,
                                    int warp, int lane, GridStateStorage& ss) {
  StateWarp state(p, work.seq, work.head, work.sb, row0, lane);
  GridValuePrefetch values(p, work.sb, work.head, row0, lane);
#pragma unroll
  for (int c = 0; c < GridValuePrefetch::kLookahead; ++c) values.issue(ss.ring[c]);
  int slot = 0, ahead = GridValuePrefetch::kLookahead;  // ahead: the slot of chunk + kLookahead
  uint32_t parity = 0;
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    mbarrier_wait_guarded(&ss.full[slot], parity);
    GridValuePrefetch::wait_for_current();
    values.issue(ss.ring[ahead]);
    if (++ahead == GridConfig::kSharedRing) ahead = 0;
    grid_step(state, ss.ring[slot], ss.out_stage[warp], p, [&] { mbarrier_arrive(&ss.empty[slot]); });
    if (++slot == GridConfig::kSharedRing) slot = 0, parity ^= 1;
  }
  state.store_final(p);
}

// One CTA per SM, all resident (cooperative launch): CTAs [0, 2·pairs) are the state CTAs (pair i / 2, value rows
// of half i mod 2), the others producer CTAs. With state_teams (grid_state_teams: where production sets the pace)
// warpgroup 1 of each state CTA is one more producer team.
__global__ void __launch_bounds__(GridConfig::kThreads, 1)
    kda_forward_grid_kernel(const __grid_constant__ ForwardParams p, const GridWorkspace ws, bool state_teams) {
  using GC = GridConfig;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t pairs = p.num_sequences * p.heads;
  const int64_t state_ctas = GC::kStateCtasPerPair * pairs;
  if (static_cast<int64_t>(blockIdx.x) < state_ctas) {
    GridStateStorage& ss = dynamic_shared_storage<GridStateStorage>(smem_raw);
    const int64_t pair = blockIdx.x / GC::kStateCtasPerPair;
    const int rank = static_cast<int>(blockIdx.x % GC::kStateCtasPerPair);
    const PairWork work = pair_work_in_index_order(p, pair);
    const int64_t num_chunks = grid_chunks(work.sb);
    if (threadIdx.x == 0) {
      for (int i = 0; i < GC::kSharedRing; ++i) mbarrier_init(&ss.full[i], 1);
      for (int i = 0; i < GC::kSharedRing; ++i) mbarrier_init(&ss.empty[i], GC::kStateWarps * 32 + 1);
      fence_mbarrier_init_cluster();
    }
    __syncthreads();
    const int warpgroup = warp / 4;
    if (warpgroup == 0) {
      asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(GC::kStateRegisters));
      run_grid_state_warp(p, work, num_chunks, rank * GC::kValueRows + 16 * warp, warp, lane, ss);
    } else if (warpgroup == 2) {
      asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(GC::kLaneRegisters));
      if (warp == GC::kLoaderWarp && lane == 0) run_grid_loader(ws, pair, num_chunks, ss);
      if (warp == GC::kPublisherWarp && lane == 0) run_grid_publisher(ws, pair, rank, num_chunks, ss);
    } else if (warpgroup == 1 && state_teams) {  // a state team: numbered after the producer CTAs' teams
      asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(GC::kStateTeamRegisters));
      const int producer_teams = static_cast<int>(gridDim.x - state_ctas) * GC::kTeams;
      run_grid_team(p, ws, static_cast<int>(pairs), producer_teams + static_cast<int>(blockIdx.x), ss.team_stage,
                    ss.team_word, warp % GC::kTeamWarps, GC::kFirstTeamBarrier, lane);
    } else {
      asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(GC::kIdleRegisters));
    }
  } else {
    GridProducerStorage& ps = dynamic_shared_storage<GridProducerStorage>(smem_raw);
    const int team_in_cta = warp / GC::kTeamWarps;
    const int team = static_cast<int>(blockIdx.x - state_ctas) * GC::kTeams + team_in_cta;
    run_grid_team(p, ws, static_cast<int>(pairs), team, ps.stage[team_in_cta], ps.team_word[team_in_cta],
                  warp % GC::kTeamWarps, GC::kFirstTeamBarrier + team_in_cta, lane);
  }
  __syncthreads();
#endif  // __CUDA_ARCH__ >= 900
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Host: workspace and launch
// ---------------------------------------------------------------------------------------------------
namespace {

// Workspace layout: the rings first (128-byte aligned slots), then the counters that launch_grid zeroes: per pair
// kL2Ring flags, then per pair a ticket, then per pair the two loaded counts (GridWorkspace's members, in order).
struct GridWorkspaceLayout {
  static constexpr int64_t kFlagsPerPair = GridConfig::kL2Ring, kTicketsPerPair = 1, kLoadedPerPair = 2;
  int64_t pairs;
  size_t ring_bytes, counter_bytes;
  explicit GridWorkspaceLayout(int64_t pairs_)
      : pairs(pairs_),
        ring_bytes(static_cast<size_t>(pairs) * GridConfig::kL2Ring * kGridPayloadBytes),
        counter_bytes(static_cast<size_t>(pairs) * (kFlagsPerPair + kTicketsPerPair + kLoadedPerPair) *
                      kCounterStride * sizeof(uint32_t)) {}
  size_t total() const { return ring_bytes + counter_bytes; }
  uint32_t* counters(void* base) const {
    return reinterpret_cast<uint32_t*>(static_cast<unsigned char*>(base) + ring_bytes);
  }
  GridWorkspace in(void* base) const {
    uint32_t* flags = counters(base);
    uint32_t* tickets = flags + pairs * kFlagsPerPair * kCounterStride;
    uint32_t* loaded = tickets + pairs * kTicketsPerPair * kCounterStride;
    return GridWorkspace{static_cast<uint4*>(base), flags, tickets, loaded};
  }
};

// FLASH_KDA_SM90_GRID_STATE_TEAMS=auto|on|off (for tests and benchmarks): grid_state_teams' choice, or forced.
bool resolve_state_teams(int64_t pairs, const DeviceLaunchFacts& facts) {
  switch (parse_knob("FLASH_KDA_SM90_GRID_STATE_TEAMS", {"auto", "on", "off"})) {
    case 0:
      return grid_state_teams(pairs, facts.multiprocessors);
    case 1:
      return true;
    default:
      return false;
  }
}

}  // namespace

bool grid_fits(int64_t pairs, const DeviceLaunchFacts& facts) {
  return pairs > 0 && GridConfig::kStateCtasPerPair * pairs < facts.multiprocessors;
}

size_t grid_workspace_bytes(int64_t pairs) { return GridWorkspaceLayout(pairs).total(); }

void prepare_grid_kernel() {
  check_cuda(cudaFuncSetAttribute(kda_forward_grid_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(kGridSmemBytes)),
             "cudaFuncSetAttribute(kda_forward_grid_kernel)");
}

void launch_grid(const ForwardParams& params, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                 const DeviceLaunchFacts& facts) {
  const int64_t pairs = params.num_sequences * params.heads;
  FLASH_KDA_CHECK(grid_fits(pairs, facts), "FLASH_KDA_SM90_SCHEDULE=grid: needs 2 * N * H < ", facts.multiprocessors,
                  " (the SMs of this GPU: two state CTAs per (sequence, head) pair and at least one producer SM), "
                  "got N * H = ",
                  pairs);
  FLASH_KDA_CHECK(facts.cooperative_launch,
                  "FLASH_KDA_SM90_SCHEDULE=grid: this device cannot launch cooperative "
                  "kernels (all CTAs must be resident at once)");
  const GridWorkspaceLayout layout(pairs);
  FLASH_KDA_CHECK(workspace != nullptr && workspace_bytes >= layout.total(), "workspace: the grid schedule needs ",
                  layout.total(), " bytes (cuda_forward_workspace_bytes), got ", workspace_bytes,
                  workspace == nullptr ? " (null)" : "");
  FLASH_KDA_CHECK(reinterpret_cast<uintptr_t>(workspace) % 128 == 0, "workspace: expected a 128-byte aligned address");
  const GridWorkspace ws = layout.in(workspace);
  check_cuda(cudaMemsetAsync(layout.counters(workspace), 0, layout.counter_bytes, stream),
             "cudaMemsetAsync(grid workspace counters)");
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeCooperative;
  attribute.val.cooperative = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(facts.multiprocessors));
  config.blockDim = dim3(GridConfig::kThreads);
  config.dynamicSmemBytes = kGridSmemBytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  const bool state_teams = resolve_state_teams(pairs, facts);
  check_cuda(cudaLaunchKernelEx(&config, kda_forward_grid_kernel, params, ws, state_teams),
             "launch of kda_forward_grid_kernel");
}

}  // namespace flash_kda::cuda::sm90
