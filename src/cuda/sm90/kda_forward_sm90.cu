// KDA forward for Hopper (sm_90a), version 7: 16-token chunks, fp32 state held in registers for the whole
// sequence, bf16 tensor-core products. Warp-specialised: state warps run the recurrence (as warpgroups:
// the two large products per chunk are wgmma with the state as register A operand, or mma.sync where the
// state warps have their SM to themselves, the two 16 × 16 ones mma.sync); producer warps load and prepare whole
// chunks, several chunks ahead, in the operand layouts that wgmma reads from shared memory. Five schedules (Schedule in
// kda_forward_sm90.hpp) place the roles: one CTA per (sequence, head) with 8 producer + 8 state warps; two CTAs per
// pair, 64 value rows each, alone (split) or as a cluster of 2 that prepares each chunk once (pair); or a cluster of 3
// or 4 CTAs in which 1 or 2 producer CTAs push prepared chunks into 2 state CTAs (DSMEM; trio, cluster). Design,
// byte/FLOP budget and measurements: docs/kernel_sm90.md.
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
// The state lives transposed (Sᵀ, V × K, the FlashKDA layout) in the accumulator fragments of the state
// warps: warp w owns value rows [16w, 16w + 16), in the layout that both mma.sync (m16n8) and wgmma
// (m64nN, 16 rows per warp) use. In that layout Sᵀ is directly the A operand of Sᵀ·Xᵀ products, so the
// state never goes through shared memory.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>

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
  static_assert(kChunk == 16, "the chunk is one m16n8k16 tile tall; the gate bound assumes 16 tokens");
  static_assert(2 * kChunk == 32, "the norm pass gives each of the 32 q/k rows of a chunk one lane");
  static_assert(kGateRounds * 32 * kChannelsPerLane == kHeadDimK, "the gate rounds cover every key channel");
  static_assert((kChunk * kHeadDimK * 2) % (32 * 16) == 0,
                "a chunk row set is a whole number of 16-byte copies per lane");
};

// Hand-over between the roles: mbarriers in shared memory, one pair per stage. FULL[s] completes a phase
// when the 32 lanes of producer warp s have prepared a chunk in stage s; EMPTY[s] when the 256 state
// threads are done reading it. Chunk c uses stage c mod 8 in round c / 8, so its phase parity is
// (c / 8) & 1.
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes from global to shared memory (cp.async, L2 only), completed by the caller's commit groups.
__device__ __forceinline__ void copy_16_bytes_async(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
// The same, or 16 zero bytes where !valid (then `src` must still be a valid address; it is not read).
__device__ __forceinline__ void copy_16_bytes_async_or_zero(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(arrivals) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(bar)) : "memory");
}
// A cross-CTA hand-over wait (cluster and pair kernels) that lasts this long is a bug (no chunk takes more
// than microseconds): trap, so that the launch fails with an error instead of hanging the GPU. (The
// single-CTA kernels' waits go without: their producer warps have no registers to spare for the timer.)
constexpr uint64_t kHangTrapNanoseconds = 10'000'000'000ull;

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Spins on `try_wait()` (an mbarrier test, or a counter read) until it holds; traps on a hang (above).
// The state warps' form puts the trap after the loop: with a trap inside, ptxas serialised every wgmma of
// a 512-thread kernel (C7512, "insufficient register resources"; v9, docs/kernel_sm90.md). The producers'
// form keeps it inside, which costs them one register fewer (the pair kernel's producers spill otherwise).
template <class TryWait>
__device__ __forceinline__ void wait_until(TryWait&& try_wait) {
  if (try_wait()) return;
  const uint64_t start = global_timer_ns();
  while (!try_wait())
    if (global_timer_ns() - start > kHangTrapNanoseconds) __trap();
}
template <class TryWait>
__device__ __forceinline__ void wait_until_trap_after(TryWait&& try_wait) {
  if (try_wait()) return;
  const uint64_t start = global_timer_ns();
  bool done = false;
  while (!(done = try_wait()) && global_timer_ns() - start <= kHangTrapNanoseconds) {
  }
  if (!done) __trap();
}

// One test of the phase with `parity`, with the try-wait's default CTA-scope acquire (see
// mbarrier_wait_guarded for why that scope suffices for the cross-CTA FULL barriers too).
__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
               : "=r"(done)
               : "r"(shared_address(bar)), "r"(parity)
               : "memory");
  return done != 0;
}

__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  while (!mbarrier_try_wait(bar, parity)) {
  }
}

// ---- cluster (DSMEM) primitives of the cluster kernel ----
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}
// The address of the same shared-memory location in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t map_shared_to_rank(uint32_t address, int rank) {
  uint32_t mapped;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(mapped) : "r"(address), "r"(rank));
  return mapped;
}
// All threads of all CTAs of the cluster; orders everything before it (release) with everything after (acquire).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\n barrier.cluster.wait.acquire;" ::: "memory");
}
__device__ __forceinline__ void fence_mbarrier_init_cluster() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
// Waits for the phase with `parity` of a FULL barrier that other CTAs arrive on, trapping on a hang. The
// acquire is at CTA scope (the try-wait's default), as for TMA loads: what the waiter then reads arrived by
// bulk copy, whose bytes the phase's transaction count covers, or was written by this CTA's own producer
// lanes, whose arrivals release at CTA scope. A cluster-scope acquire would add an L1 invalidate
// (`CCTL.IVALL`) per chunk to the state warps' chain.
__device__ __forceinline__ void mbarrier_wait_guarded(uint64_t* bar, uint32_t parity) {
  wait_until_trap_after([&] { return mbarrier_try_wait(bar, parity); });
}
// Monotonic release counters (cluster kernel): a consumer adds 1 to a counter in another CTA with release
// semantics; the owner waits until it reaches a count, with acquire. Unlike a phase parity, a count cannot
// be mistaken for one two phases away, whatever the lag between waiter and signaller.
//
// The release is at CTA scope, as in the usual remote mbarrier arrive (PTX's default .release.cta): all
// it must order before the count are this warp's reads of its own CTA's shared memory (the slot that the
// producer will overwrite), and a CTA-scope release covers those. A cluster-scope release compiles to a
// GPU-wide MEMBAR that also waits for the warp's global stores of o, once per chunk: with it the state CTAs
// of the cluster schedule needed 0.95 µs per chunk, without it 0.63 (1×32768, H = 16, H200).
__device__ __forceinline__ void red_add_release_cluster(uint32_t cluster_counter, uint32_t value) {
  asm volatile("red.release.cta.shared::cluster.add.u32 [%0], %1;" ::"r"(cluster_counter), "r"(value)
               : "memory");
}
__device__ __forceinline__ uint32_t load_acquire_cluster(const uint32_t* counter) {
  uint32_t value;
  asm volatile("ld.acquire.cluster.shared::cta.u32 %0, [%1];" : "=r"(value) : "r"(shared_address(counter)) : "memory");
  return value;
}
// The same read of a counter in any CTA of the cluster (`cluster_counter`: a mapa'd address).
__device__ __forceinline__ uint32_t load_acquire_cluster(uint32_t cluster_counter) {
  uint32_t value;
  asm volatile("ld.acquire.cluster.shared::cluster.u32 %0, [%1];" : "=r"(value) : "r"(cluster_counter) : "memory");
  return value;
}
// `counter`: a pointer into this CTA's shared memory, or a mapa'd address in the cluster's.
template <class Counter>
__device__ __forceinline__ void wait_count_at_least(Counter counter, uint32_t target) {
  wait_until([&] {
    if (load_acquire_cluster(counter) >= target) return true;
    __nanosleep(32);  // the producer SM's other warps are computing: poll gently
    return false;
  });
}
// A ticket from a counter in any CTA of the cluster: returns its value before the increment. Relaxed:
// the ticket orders nothing, it only hands out the chunks in increasing order.
__device__ __forceinline__ uint32_t fetch_add_cluster(uint32_t cluster_counter, uint32_t value) {
  uint32_t old;
  asm volatile("atom.relaxed.cluster.shared::cluster.add.u32 %0, [%1], %2;"
               : "=r"(old)
               : "r"(cluster_counter), "r"(value)
               : "memory");
  return old;
}
// Before a CTA leaves: waits until the remote adds that the other CTAs make to its release counts have all
// landed (counts[s] = per_chunk × the number of chunks ring slot s held, for each slot that `held_here`
// accepts). The final cluster barrier orders them already; waiting for them keeps the CTA visibly running
// while they land, which compute-sanitizer's racecheck otherwise reports, now and then, as an access to a
// block that might have exited.
template <int kSlots, class HeldHere>
__device__ __forceinline__ void wait_for_every_release(const uint32_t (&counts)[kSlots], int64_t num_chunks,
                                                       uint32_t per_chunk, HeldHere&& held_here) {
  for (int s = 0; s < kSlots && s < num_chunks; ++s)
    if (held_here(s))
      wait_count_at_least(&counts[s], per_chunk * static_cast<uint32_t>((num_chunks - 1 - s) / kSlots + 1));
}
// Arrive (release at CTA scope, see above) on another CTA's mbarrier and announce `bytes` of transaction.
__device__ __forceinline__ void mbarrier_arrive_expect_tx_remote(uint32_t cluster_bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cluster.b64 _, [%0], %1;" ::"r"(cluster_bar),
               "r"(bytes)
               : "memory");
}
// `count` more arrivals (release at CTA scope) on another CTA's mbarrier.
__device__ __forceinline__ void mbarrier_arrive_remote(uint32_t cluster_bar, uint32_t count) {
  asm volatile("mbarrier.arrive.release.cta.shared::cluster.b64 _, [%0], %1;" ::"r"(cluster_bar), "r"(count)
               : "memory");
}
// Bulk copy (copy engine) of `bytes` from this CTA's shared memory to another CTA's; completes `bytes`
// of transaction on the destination CTA's mbarrier `cluster_bar`.
__device__ __forceinline__ void bulk_copy_shared_to_cluster(uint32_t cluster_dst, uint32_t src, uint32_t bytes,
                                                            uint32_t cluster_bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          cluster_dst),
      "r"(src), "r"(bytes), "r"(cluster_bar)
      : "memory");
}

// ---- Operand layouts: what the state warpgroup's wgmma reads straight from shared memory ----
// Key-channel tiles (rows = tokens, 128 key channels) are stored per 64-channel half, one 128-byte row per
// token, with the 128-byte swizzle: 16-byte unit u of row r sits at unit u ^ (r mod 8). That is the
// canonical SW128 layout of a wgmma B operand that is K-major (QG, KG: B[token][channel], K = channels) as
// well as of one that is MN-major (KU: B[token][channel], K = tokens), and row-wise writes and ldmatrix
// reads of 8 rows are both free of bank conflicts. The base of every such tile is 1024-byte aligned.
constexpr int kHalfChannels = 64;                           // one swizzle row: 128 bytes of bf16
constexpr int kKeyHalves = Config::kHeadDimK / kHalfChannels;  // 2
constexpr uint32_t kSwizzleAtomBytes = 8 * 128;            // 8 rows of 128 bytes: the swizzle repeats
// 16 × 16 matrices (T', A_qk: B[s][t] = M[t][s], K-major) in wgmma's non-swizzled core-matrix layout:
// 8 × 8 blocks of 128 contiguous bytes (one 16-byte row per t), blocks along s 128 bytes apart (LBO),
// along t 256 bytes apart (SBO).
__device__ __forceinline__ int core_matrix_offset(int t, int s) {
  return (t / 8) * 128 + (s / 8) * 64 + (t % 8) * 8 + s % 8;
}
// This lane's row address for an ldmatrix.x4 of such a tile that yields the B fragments of both n8 tiles
// of a k16 product (r0, r1: t 0–7; r2, r3: t 8–15), as b_frag_addr_n_major does for row-major tiles.
__device__ __forceinline__ int core_matrix_b_frag_offset(int lane) {
  return core_matrix_offset((lane % 8) + (lane / 16) * 8, ((lane / 8) % 2) * 8);
}

// The swizzled addresses of a producer lane depend only on the lane, so the compiler hoists all of them
// out of the chunk loop and keeps them in registers across it, which the producers (104–112 registers)
// cannot afford. Passing the lane-dependent part through this opaque copy inside the loop keeps each XOR
// next to its use (one instruction each).
__device__ __forceinline__ int recomputed_here(int x) {
  int y;
  asm volatile("mov.b32 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

// What the state warps read of one prepared chunk. Producers on another SM push it as one bulk copy into
// the state CTA, so it is one contiguous block of whole 16-byte units; v comes last, so that `trio` can
// push only what precedes it (its state warps load their own columns of v, ValuePrefetch).
struct alignas(1024) PreparedChunk {
  bf16 kq[kKeyHalves][2 * Config::kChunk][kHalfChannels];  // rows 0–15: KG, 16–31: QG (one B operand)
  bf16 ku[kKeyHalves][Config::kChunk][kHalfChannels];      // KU
  bf16 t_scaled[Config::kChunk * Config::kChunk];  // T' = (I + A_kk)^-1 diag(b), core_matrix_offset
  bf16 a_qk[Config::kChunk * Config::kChunk];      // core_matrix_offset
  float decay[Config::kHeadDimK];  // 2^Γ_C
  float q_scale[Config::kChunk];   // qs_t
  float k_rnorm[Config::kChunk];   // kn_t
  float b[Config::kChunk];
  bf16 v[Config::kChunk][Config::kTileStride];

  static constexpr int kKgRow = 0, kQgRow = Config::kChunk;  // first row of KG, QG in kq
};
// `pair`, `cluster`: one bulk copy between CTAs. sizeof includes the tail padding after v, and `Stage` (below)
// puts the first 64 bytes of its kr there (offsetof(Stage, kr) = 18 368 < sizeof(PreparedChunk) = 18 432), so a
// copy out of a Stage carries them along. Harmless as used: `cluster` copies into a ring of PreparedChunks
// (padding there), and `pair` into the peer's stage s, which only CTA s mod 2 ever prepares in. A receiver
// that prepares in the stage it receives into must copy offsetof(PreparedChunk, v) + sizeof(v) bytes instead
// (v16's 32-token probe lost v's first row to this layout).
constexpr uint32_t kPreparedChunkBytes = sizeof(PreparedChunk);
// `trio`: what a producer pushes into a state CTA, everything but v. The bytes between SMs set a floor of
// their own: one SM's bulk copies to other SMs move ~40 GB/s, whatever the number of clusters (v10k).
constexpr uint32_t kPushedTileBytes = offsetof(PreparedChunk, v);
static_assert(kPreparedChunkBytes % 16 == 0 && kPushedTileBytes % 16 == 0, "bulk copies move whole 16-byte units");
static_assert(offsetof(PreparedChunk, kq) % kSwizzleAtomBytes == 0 &&
                  offsetof(PreparedChunk, ku) % kSwizzleAtomBytes == 0,
              "swizzled tiles start on a swizzle-atom boundary");
static_assert(offsetof(PreparedChunk, t_scaled) % 16 == 0 && offsetof(PreparedChunk, a_qk) % 16 == 0,
              "core matrices are 16-byte aligned");

// Dynamic shared memory, rounded up to the swizzle atom (the launches ask for kSmemAlignmentSlack more).
// Every CTA of a kernel gets the same address, so a member's address mapped to another rank of the
// cluster is that member in the other CTA.
constexpr size_t kSmemAlignmentSlack = kSwizzleAtomBytes;
template <class Storage>
__device__ __forceinline__ Storage& dynamic_shared_storage(unsigned char* smem_raw) {
  const uint32_t address = shared_address(smem_raw);
  const uint32_t aligned = (address + kSwizzleAtomBytes - 1) & ~(kSwizzleAtomBytes - 1);
  return *reinterpret_cast<Storage*>(smem_raw + (aligned - address));
}
template <class Storage>
constexpr size_t dynamic_smem_bytes() {
  return sizeof(Storage) + kSmemAlignmentSlack;
}
// The same for a kernel whose CTAs lay their shared memory out in one of two ways (by cluster rank).
template <class StateCtaStorage, class ProducerCtaStorage>
constexpr size_t dynamic_smem_bytes() {
  return (sizeof(StateCtaStorage) > sizeof(ProducerCtaStorage) ? sizeof(StateCtaStorage) : sizeof(ProducerCtaStorage)) +
         kSmemAlignmentSlack;
}

// One chunk as a producer warp works on it: raw inputs land here and are prepared in place (q → QG,
// k → KG, g → KR); KR is needed only by the producer (for A_kk and A_qk).
struct Stage : PreparedChunk {
  bf16 kr[Config::kChunk][Config::kTileStride];
};

// Shared memory of the single-CTA schedules: stage w is producer warp w's and is read in place by the
// state warps.
struct SharedStorage {
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
  // (v7: the producers spill below 104 (112 beside the 8 state warps of `whole`), and those state warps
  // below 144.)
  static constexpr int kStateRegisters = kStateWarps == 8 ? 144 : 232;
  static constexpr int kPrepRegisters = kStateWarps == 8 ? 112 : 104;
  static_assert(kStateRegisters % 8 == 0 && kPrepRegisters % 8 == 0, "setmaxnreg takes multiples of 8");
  static_assert(kStateRegisters * kStateWarps + kPrepRegisters * Config::kPrepWarps <=
                    kLaunchRegisters * (kStateWarps + Config::kPrepWarps),
                "the roles' registers fit in the block's allocation");
  static_assert(kValueParts * kValueRows == Config::kHeadDimV, "value parts tile the value rows");
  static_assert(kStateWarps % 4 == 0, "setmaxnreg and the role split work on whole warpgroups");
  static_assert(kStateWarps <= Config::kMaxStateWarps, "out_stage has room for 8 state warps");
};
static_assert(dynamic_smem_bytes<SharedStorage>() <= 227 * 1024, "shared memory per block on sm_90 is at most 227 KB");

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

// Two bf16 (lo in bits 0–15) as floats: exact, one shift and one mask (__bfloat1622float2 spends an extra
// byte permute on the high half: ~50 instructions per gate round of a producer lane).
__device__ __forceinline__ float2 unpack_bf16x2(uint32_t pair) {
  return make_float2(__uint_as_float(pair << 16), __uint_as_float(pair & 0xffff0000u));
}

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

// stmatrix.x4.trans: 8 × 8 block j of bf16 pairs r[j] (mma fragment layout) is stored transposed, row i of
// it at the address that lane 8·j + i gives.
__device__ __forceinline__ void stsm_trans(bf16* row, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.x4.trans.m8n8.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(shared_address(row)),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// ldmatrix.x4 address giving the B fragments of two n8 tiles when B is stored n-major (Bt[n][k], i.e.
// the rows of the stored matrix are the output columns): r0,r1 = tile n0..7, r2,r3 = tile n8..15.
__device__ __forceinline__ const bf16* b_frag_addr_n_major(const bf16* base, int stride, int k0, int lane) {
  return base + ((lane % 8) + (lane / 16) * 8) * stride + k0 + ((lane / 8) % 2) * 8;
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

// One (sequence, head) pair: its tokens and its number of chunks.
struct PairWork {
  int64_t seq;
  int head;
  SequenceBounds sb;
  int64_t num_chunks;
};

// The rows of `chunk` that lie inside the sequence: kChunk, except in a last partial chunk (≤ 0 past the end).
__device__ __forceinline__ int rows_in_sequence(const SequenceBounds& sb, int64_t chunk) {
  return static_cast<int>(min(int64_t{Config::kChunk}, sb.length - chunk * Config::kChunk));
}

__device__ __forceinline__ PairWork pair_work(const ForwardParams& p, int64_t seq, int head) {
  const SequenceBounds sb = sequence_bounds(p, seq);
  return {seq, head, sb, (sb.length + Config::kChunk - 1) / Config::kChunk};
}

// The pair of launch index `index` (blockIdx.x / CTAs per pair) in blockIdx order: sequence index / H,
// head index % H. For the kernels whose auto choice runs in one wave (pair, cluster).
__device__ __forceinline__ PairWork pair_work_in_index_order(const ForwardParams& p, int64_t index) {
  return pair_work(p, index / p.heads, static_cast<int>(index % p.heads));
}

// The same, longest sequence first (for the single-CTA kernel, which runs in several waves when there are
// many pairs). CTAs start roughly in blockIdx order, and the work that starts last sets the end, so a
// varlen batch takes its sequences by decreasing length (ties by index): a long sequence never starts in
// the last wave. (Mixed H = 64 of the benchmark: 352 → 261 chunk steps on the busiest SM in a greedy
// simulation of 132 SMs.) Every thread of the CTA must call it (it synchronises the CTA); `scratch` is
// shared memory for kMaxOrderedSequences + 1 values that nothing else uses yet. Larger batches keep
// their order: ranking them would cost more than their short sequences lose in the tail.
constexpr int kMaxOrderedSequences = 256;
__device__ PairWork pair_work_longest_first(const ForwardParams& p, int64_t index, int64_t* scratch) {
  int64_t seq = index / p.heads;
  const int64_t sequences = p.num_sequences;
  if (p.cu_seqlens != nullptr && sequences > 1 && sequences <= kMaxOrderedSequences) {
    int64_t* length = scratch;
    int64_t* chosen = scratch + kMaxOrderedSequences;
    for (int i = threadIdx.x; i < sequences; i += blockDim.x) length[i] = sequence_bounds(p, i).length;
    __syncthreads();
    // The ranks are a permutation of [0, sequences): exactly one thread finds the sequence of rank `seq`.
    for (int i = threadIdx.x; i < sequences; i += blockDim.x) {
      int64_t rank = 0;
      for (int j = 0; j < sequences; ++j) rank += length[j] > length[i] || (length[j] == length[i] && j < i);
      if (rank == seq) *chosen = i;
    }
    __syncthreads();
    seq = *chosen;
    __syncthreads();  // everyone has read it before the shared memory gets its real use
  }
  return pair_work(p, seq, static_cast<int>(index % p.heads));
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
// each tensor, from per-lane row pointers computed once per sequence. Whole chunks (all but a sequence's
// last) take a path without predicates or zero fill.
// ---------------------------------------------------------------------------------------------------
struct ChunkLoader {
  static constexpr int kSegments = Config::kHeadDimK / 8;      // 16-byte segments per row
  static constexpr int kRowsPerPass = 32 / kSegments;          // rows one warp-wide copy covers
  static constexpr int kPasses = Config::kChunk / kRowsPerPass;  // copies per lane and tensor
  static_assert(32 % kSegments == 0 && Config::kChunk % kRowsPerPass == 0, "whole rows per warp-wide copy");
  static_assert(kRowsPerPass == 2, "the swizzle of pass p's row is (row0 + 2p) mod 8 = row0 ^ 2·(p mod 4)");

  const bf16* first_row[4];  // q, k, g, v at (the sequence's first token, this lane's segment)
  int64_t token_stride[4];
  int row0, seg;

  __device__ ChunkLoader(const ForwardParams& p, const SequenceBounds& sb, int head, int lane)
      : row0(lane / kSegments), seg(lane % kSegments) {
    const TokenTensor* tensors[4] = {&p.q, &p.k, &p.g, &p.v};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      first_row[i] = static_cast<const bf16*>(tensors[i]->data) + token_offset(*tensors[i], sb, 0, head) + seg * 8;
      token_stride[i] = tensors[i]->token_stride;
    }
  }

  // Tensors [first, first + count) of q, k, g, v (all four by default; a team of two warps splits them;
  // `trio` leaves v to its state warps). q and k land in the swizzled kq tile (QG and KG
  // rows), g and v in padded row-major tiles.
  __device__ void load(int64_t chunk, int64_t length, Stage& stage, int first = 0, int count = 4) const {
    const int64_t first_token = chunk * Config::kChunk;
    if (first_token + Config::kChunk <= length) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (i >= first && i < first + count) load_whole_chunk(i, first_token, stage);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (i >= first && i < first + count) load_last_chunk(i, first_token, length, stage);
    }
    cute::cp_async_fence();
  }

  // Row row0 + 2·pass of tensor i: the shared-memory address of this lane's 16-byte segment. Swizzled rows:
  // row r's segment goes to unit (seg mod 8) ^ (r mod 8); with r = row0 + 2·pass that is
  // swizzle_base ^ 2·(pass mod 4).
  __device__ __forceinline__ uint32_t destination(int i, int pass, int swizzle_base, Stage& stage) const {
    const int row = row0 + kRowsPerPass * pass;
    if (i >= 2) {
      bf16* padded = i == 2 ? &stage.kr[0][0] : &stage.v[0][0];
      return shared_address(padded + row * Config::kTileStride + seg * 8);
    }
    const bf16* kq_rows = &stage.kq[seg / 8][i == 0 ? PreparedChunk::kQgRow : PreparedChunk::kKgRow][0];
    return shared_address(kq_rows + row * kHalfChannels + ((swizzle_base ^ (kRowsPerPass * (pass % 4))) * 8));
  }

  // Every row inside the sequence (all chunks but a sequence's last): no predicate and no zero fill. Pass
  // p's destination is pass 0's plus a constant, XORed in the swizzled tiles with the constant 32·(p mod 4)
  // (the unit bits of a 128-byte row; adding whole rows never carries into them), so a copy costs one LOP3,
  // a 64-bit source add and the copy (the predicated form below: ~20 instructions per copy; v14a).
  __device__ __forceinline__ void load_whole_chunk(int i, int64_t first_token, Stage& stage) const {
    const bf16* row_src = first_source(i, first_token);
    const int64_t pass_step = kRowsPerPass * token_stride[i];
    const uint32_t first_dst = destination(i, 0, recomputed_here((seg % 8) ^ row0), stage);
    constexpr uint32_t kSwizzledPassBytes = kRowsPerPass * kHalfChannels * sizeof(bf16);
    constexpr uint32_t kPaddedPassBytes = kRowsPerPass * Config::kTileStride * sizeof(bf16);
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const uint32_t dst = i >= 2 ? first_dst + pass * kPaddedPassBytes
                                  : (first_dst ^ (kRowsPerPass * 16 * (pass % 4))) + pass * kSwizzledPassBytes;
      copy_16_bytes_async(dst, row_src);
      row_src += pass_step;
    }
  }

  // A sequence's last chunk: rows past its end are zero-filled (their source is the sequence's first row,
  // a valid address that is not read). Chosen once for all tensors: a per-tensor choice made ptxas keep
  // the predicate across the copies, and `trio`'s producers spilled it.
  __device__ __forceinline__ void load_last_chunk(int i, int64_t first_token, int64_t length, Stage& stage) const {
    const bf16* row_src = first_source(i, first_token);
    const int64_t pass_step = kRowsPerPass * token_stride[i];
    const int swizzle_base = recomputed_here((seg % 8) ^ row0);
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const bool valid = first_token + row0 + kRowsPerPass * pass < length;
      copy_16_bytes_async_or_zero(destination(i, pass, swizzle_base, stage), valid ? row_src : first_row[i], valid);
      row_src += pass_step;
    }
  }

  // This lane's source in tensor i for pass 0 of the chunk starting at `first_token`.
  __device__ __forceinline__ const bf16* first_source(int i, int64_t first_token) const {
    return first_row[i] + (first_token + row0) * token_stride[i];
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

  // Σ x² over the 64 channels of `half` of row `row` of the kq tile (its 8 segments in channel order).
  __device__ static float half_row_sum_of_squares(const Stage& st, int row, int half) {
    float partial[4] = {};
    const bf16* row_start = &st.kq[half][row][0];
    const int swizzle = recomputed_here(row % 8);
#pragma unroll
    for (int c = 0; c < kHalfChannels / 8; ++c) {
      const uint4 raw = *reinterpret_cast<const uint4*>(row_start + ((c ^ swizzle) * 8));
      const uint32_t pairs[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 x = unpack_bf16x2(pairs[e]);
        partial[e] = fmaf(x.x, x.x, fmaf(x.y, x.y, partial[e]));
      }
    }
    return (partial[0] + partial[1]) + (partial[2] + partial[3]);
  }

  // From a row's Σ x²: q rows give qs and b, k rows kn.
  __device__ void store_norm(Stage& st, bool q_row, int row, float sum, int valid, float beta_logit) const {
    const float rnorm = p.l2norm_qk ? rsqrtf(sum + 1e-6f) : 1.f;
    if (q_row) {
      st.q_scale[row] = rnorm * p.scale;
      st.b[row] = row < valid ? sigmoid(beta_logit) * (p.beta_times_two ? 2.f : 1.f) : 0.f;
    } else {
      st.k_rnorm[row] = rnorm;
    }
  }

  // One warp: lane l < 16 → q row l, lane l ≥ 16 → k row l − 16 (beta_logit: token l's, for l < 16). The
  // two halves of the row are summed apart and then added, as the two lanes of norms_and_beta_half do.
  __device__ void norms_and_beta(Stage& st, int valid, float beta_logit) const {
    const int row = lane % Config::kChunk;
    const bool q_row = lane < Config::kChunk;
    const int kq_row = (q_row ? PreparedChunk::kQgRow : PreparedChunk::kKgRow) + row;
    store_norm(st, q_row, row, half_row_sum_of_squares(st, kq_row, 0) + half_row_sum_of_squares(st, kq_row, 1), valid,
               beta_logit);
  }

  // Half of a team of two warps: half 0 the q rows, half 1 the k rows, two lanes per row (64 channels
  // each). beta_logit: token lane / 2's, for half 0.
  __device__ void norms_and_beta_half(Stage& st, int valid, int half, float beta_logit) const {
    const int row = lane / 2;
    const int kq_row = (half == 0 ? PreparedChunk::kQgRow : PreparedChunk::kKgRow) + row;
    float sum = half_row_sum_of_squares(st, kq_row, lane % 2);  // then the other lane's half is added
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    if (lane % 2 == 0) store_norm(st, half == 0, row, sum, valid, beta_logit);
  }

  // Gate rounds [first, first + count): all of them for one warp, one each in a team of two.
  __device__ void gate_and_tiles(Stage& st, int valid, int first = 0, int count = Config::kGateRounds) const {
#pragma unroll 1  // two identical rounds: one copy of the code (instruction-cache pressure)
    for (int round = first; round < first + count; ++round) {
      const int ch = 64 * round + Config::kChannelsPerLane * lane;
      const float offset[2] = {round == 0 ? exp_offset[0][0] : exp_offset[1][0],
                               round == 0 ? exp_offset[0][1] : exp_offset[1][1]};
      // ---- the per-token log2-decays of both channels (0 on rows past the sequence), and Γ_C ----
      float gate[Config::kChunk][2];
      float total[2] = {0.f, 0.f};
#pragma unroll
      for (int t = 0; t < Config::kChunk; ++t) {
        const float2 g = unpack_bf16x2(*reinterpret_cast<const uint32_t*>(&st.kr[t][ch]));
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
      // This lane's channel pair in the swizzled rows of token t: row t of the round's half, 16-byte unit
      // (lane / 4) ^ (t mod 8), so one XOR with a constant per token serves all three swizzled tiles.
      bf16* kq_half = &st.kq[round][0][0];
      bf16* ku_half = &st.ku[round][0][0];
      const int lane_unit = recomputed_here((lane / 4) * 8 + Config::kChannelsPerLane * (lane % 4));  // in bf16
      float gamma[2] = {0.f, 0.f};
#pragma unroll
      for (int t = 0; t < Config::kChunk; ++t) {
        const float kn = st.k_rnorm[t];
        const int in_row = lane_unit ^ ((t % 8) * 8);
        bf16* qg_at = kq_half + (PreparedChunk::kQgRow + t) * kHalfChannels + in_row;
        bf16* kg_at = kq_half + (PreparedChunk::kKgRow + t) * kHalfChannels + in_row;
        const float2 q = unpack_bf16x2(*reinterpret_cast<const uint32_t*>(qg_at));
        const float2 k = unpack_bf16x2(*reinterpret_cast<const uint32_t*>(kg_at));
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
        *reinterpret_cast<uint32_t*>(qg_at) = pack_bf16x2(qg[0], qg[1]);
        *reinterpret_cast<uint32_t*>(kg_at) = pack_bf16x2(kg[0], kg[1]);
        *reinterpret_cast<uint32_t*>(&st.kr[t][ch]) = pack_bf16x2(kr[0], kr[1]);
        *reinterpret_cast<uint32_t*>(ku_half + t * kHalfChannels + in_row) = pack_bf16x2(ku[0], ku[1]);
      }
    }
  }
};

// A_kk = strict_lower(diag(b·kn)·KG·KRᵀ) (fp32, transposed into the warp's scratch), A_qk = lower(QG·KRᵀ)
// (bf16, into the stage), both 16 × 16 reduced over the 128 key channels; then T' = (I + A_kk)^-1·diag(b).
// X·KRᵀ (X = KG or QG), 16 × 16 over the 128 key channels, as two m16n8 accumulators.
// `x_row`: the first kq row of X (PreparedChunk::kKgRow or kQgRow).
__device__ __forceinline__ void product_with_kr(const Stage& st, int x_row, int lane, float (&acc)[2][4]) {
  const int unit_swizzle = recomputed_here((lane / 16) ^ (lane % 8));  // (x_row + lane) mod 8 = lane mod 8
#pragma unroll
  for (int kk = 0; kk < Config::kHeadDimK / 16; ++kk) {
    uint32_t a[4], b[4];
    // The A fragment's rows: row x_row + lane mod 16, 16-byte unit 2·kk + lane / 16 of its half, swizzled.
    const bf16* row = &st.kq[kk / 4][x_row + lane % 16][0];
    ldsm(row + ((((2 * kk) % 8) ^ unit_swizzle) * 8), a);
    ldsm(b_frag_addr_n_major(&st.kr[0][0], Config::kTileStride, 16 * kk, lane), b);
    mma(acc[0], a, b[0], b[1]);
    mma(acc[1], a, b[2], b[3]);
  }
}

// Calls f(i, j, value) for this lane's elements of a 16 × 16 result held as two m16n8 accumulators.
template <class F>
__device__ __forceinline__ void for_each_element(const float (&acc)[2][4], int lane, F&& f) {
#pragma unroll
  for (int n = 0; n < 2; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) f((lane / 4) + 8 * (e / 2), 8 * n + 2 * (lane % 4) + (e % 2), acc[n][e]);
}

__device__ __forceinline__ void build_a_qk(Stage& st, int lane) {
  float qk_acc[2][4] = {};
  product_with_kr(st, PreparedChunk::kQgRow, lane, qk_acc);
  // Select, never multiply: the upper triangle holds e^(Γ_i − Γ_j) with i < j, which may be huge.
  for_each_element(qk_acc, lane,
                   [&](int i, int j, float x) {
                     st.a_qk[core_matrix_offset(i, j)] = __float2bfloat16_rn(j <= i ? x : 0.f);
                   });
}

__device__ __forceinline__ void build_a_kk_and_t(Stage& st, float (&a_kk_t)[16][16], int lane) {
  float kk_acc[2][4] = {};
  product_with_kr(st, PreparedChunk::kKgRow, lane, kk_acc);
  for_each_element(kk_acc, lane, [&](int i, int j, float x) {  // select, as in build_a_qk
    a_kk_t[j][i] = j < i ? st.b[i] * st.k_rnorm[i] * x : 0.f;
  });
  __syncwarp();
  // T = (I + A_kk)^-1 by forward substitution in fp32; lane j owns column j of T. Right-looking: once
  // t_m is final it updates every later row at once, so the dependent chain is 15 FMAs long instead of
  // 120, and the column loads of A_kk are independent of the running values.
  if (lane < Config::kChunk) {
    const int j = recomputed_here(lane);  // else the 16 initial 0/1 values are hoisted out of the chunk loop
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
    for (int i = 0; i < Config::kChunk; ++i)
      st.t_scaled[core_matrix_offset(i, j)] = __float2bfloat16_rn(column[i] * bj);
  }
}

__device__ __forceinline__ void build_intra_chunk_matrices(Stage& st, float (&a_kk_t)[16][16], int lane) {
  build_a_qk(st, lane);
  build_a_kk_and_t(st, a_kk_t, lane);
}

// ---------------------------------------------------------------------------------------------------
// Math, state-independent part, as one producer warp runs it for one chunk: load, norms and b, gate and
// tiles, A_kk / A_qk / T'. Shared by every kernel.
// ---------------------------------------------------------------------------------------------------
struct ChunkProducer {
  ChunkPreparer preparer;
  ChunkLoader loader;
  const ForwardParams& p;
  const SequenceBounds& sb;
  int head, lane;

  __device__ ChunkProducer(const ForwardParams& p_, const SequenceBounds& sb_, int head_, int lane_)
      : preparer{p_, lane_, 0.f, p_.lower_bound * Config::kLog2e, {}}, loader(p_, sb_, head_, lane_), p(p_), sb(sb_),
        head(head_), lane(lane_) {
    preparer.exp_scale = -(p.A_log != nullptr ? expf(p.A_log[head]) : 1.f) * Config::kLog2e;
#pragma unroll
    for (int round = 0; round < Config::kGateRounds; ++round)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int ch = 64 * round + Config::kChannelsPerLane * lane + c;
        const float bias = p.dt_bias != nullptr ? p.dt_bias[head * p.dt_bias_head_stride + ch] : 0.f;
        preparer.exp_offset[round][c] = preparer.exp_scale * bias;
      }
  }

  // Loads and prepares `chunk` in `st` (the warp's own stage: only __syncwarp inside).
  __device__ void produce(int64_t chunk, Stage& st, float (&a_kk_t)[Config::kChunk][Config::kChunk]) const {
    loader.load(chunk, sb.length, st);
    const float beta_logit = lane < Config::kChunk ? load_beta(p, sb, head, chunk * Config::kChunk + lane) : 0.f;
    cute::cp_async_wait<0>();
    __syncwarp();
    const int valid = rows_in_sequence(sb, chunk);
    preparer.norms_and_beta(st, valid, beta_logit);
    __syncwarp();
    preparer.gate_and_tiles(st, valid);
    __syncwarp();
    build_intra_chunk_matrices(st, a_kk_t, lane);
    __syncwarp();
  }

  // The same preparation by a team of two warps (`half` 0 and 1, named barrier `team_barrier` of 64
  // threads): each loads two of the four tensors, normalises the q or the k rows, runs one gate round
  // (64 key channels), then half 0 builds A_kk and T', half 1 A_qk. Every step of the single-warp order
  // runs in the same order on the same data, so the prepared chunk is the same bit for bit. Without
  // kLoadsV the stage's v is left alone: the producers never read it, and the state warps load it
  // themselves (ValuePrefetch).
  template <bool kLoadsV = true>
  __device__ void produce_half(int64_t chunk, Stage& st, float (&a_kk_t)[Config::kChunk][Config::kChunk], int half,
                               int team_barrier) const {
    loader.load(chunk, sb.length, st, 2 * half, half == 0 || kLoadsV ? 2 : 1);
    const float beta_logit = half == 0 ? load_beta(p, sb, head, chunk * Config::kChunk + lane / 2) : 0.f;
    cute::cp_async_wait<0>();
    team_sync(team_barrier);
    const int valid = rows_in_sequence(sb, chunk);
    preparer.norms_and_beta_half(st, valid, half, beta_logit);
    team_sync(team_barrier);
    preparer.gate_and_tiles(st, valid, half, 1);
    team_sync(team_barrier);
    if (half == 0)
      build_a_kk_and_t(st, a_kk_t, lane);
    else
      build_a_qk(st, lane);
    __syncwarp();
  }

  static __device__ void team_sync(int barrier) {
    asm volatile("bar.sync %0, %1;" ::"r"(barrier), "n"(2 * 32) : "memory");
  }
};

// ---- wgmma operands ----
// Matrix descriptors (PTX ISA, "Matrix Descriptor Format"): start address, leading and stride byte offsets
// in 16-byte units (bits 0–13, 16–29, 32–45) and the layout (bits 62–63: 0 none, 1 = 128-byte swizzle).
__device__ __forceinline__ uint64_t descriptor_address(uint32_t bytes) { return (bytes >> 4) & 0x3fff; }
__device__ __forceinline__ uint64_t matrix_desc(const void* smem, uint32_t leading_bytes, uint32_t stride_bytes,
                                                uint64_t layout) {
  return descriptor_address(shared_address(smem)) | (descriptor_address(leading_bytes) << 16) |
         (descriptor_address(stride_bytes) << 32) | (layout << 62);
}
// A swizzled key-channel tile as a K-major B operand (QG, KG: rows = N = tokens): 8-row groups 1024 bytes
// apart; the leading offset is unused with a swizzle. k-steps inside a 128-byte row advance the address.
__device__ __forceinline__ uint64_t swizzled_k_major_desc(const bf16* tile) {
  return matrix_desc(tile, 16, kSwizzleAtomBytes, 1);
}
// A swizzled tile as an MN-major B operand (KU: rows = K = tokens, 64 channels of N per row): 8-row groups
// (k) 1024 bytes apart; one product covers one 64-channel half, so the leading (N) offset is never used.
__device__ __forceinline__ uint64_t swizzled_mn_major_desc(const bf16* tile) {
  return matrix_desc(tile, Config::kChunk * 128, kSwizzleAtomBytes, 1);
}

// PTX requires a wgmma.fence between any register write and a wgmma that reads the register (accumulator
// or A fragment), and the compiler may move plain register arithmetic (the bf16 packing of the A
// fragments) past the fence, after which ptxas serialises every wgmma. These empty asm statements, issued
// before the fence, make the values final there; after the wait they keep the compiler from moving the
// accumulators' next uses before it (as CUTLASS's warpgroup_fence_operand does).
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
template <class T, int N, int M>
__device__ __forceinline__ void wgmma_fence_operands(T (&r)[N][M]) {
#pragma unroll
  for (int i = 0; i < N; ++i) wgmma_fence_operands(r[i]);
}

// ---------------------------------------------------------------------------------------------------
// Math, the recurrence: one state warp owns value rows [row0, row0 + 16) of Sᵀ as accumulator fragments,
// st[n][e] = Sᵀ at v = row0 + group + 8·(e / 2), k = 8·n + 2·quad + (e % 2). Shared by every kernel.
// ---------------------------------------------------------------------------------------------------
struct StateWarp {
  static constexpr int kFrags = Config::kHeadDimK / 8;
  float st[kFrags][4];
  // This lane's 16-byte piece of o in the current chunk (token lane / 2, value rows row0 + 8·(lane % 2)),
  // and the tokens of the sequence from the current chunk on: advanced per chunk, so that the store needs
  // no 64-bit offset arithmetic (v10i).
  bf16* out_piece;
  int64_t tokens_left;
  int row0, lane, group, quad;
  int64_t state_head_offset;

  __device__ StateWarp(const ForwardParams& p, int64_t seq, int head, const SequenceBounds& sb, int row0_, int lane_)
      : out_piece(static_cast<bf16*>(const_cast<void*>(p.out.data)) + token_offset(p.out, sb, lane_ / 2, head) +
                  row0_ + 8 * (lane_ % 2)),
        tokens_left(sb.length), row0(row0_), lane(lane_), group(lane_ / 4), quad(lane_ % 4),
        state_head_offset((seq * p.heads + head) * int64_t{Config::kHeadDimK * Config::kHeadDimV}) {
#pragma unroll
    for (int n = 0; n < kFrags; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        st[n][e] = p.initial_state == nullptr ? 0.f
                                              : load_state(p.initial_state, p.initial_state_dtype, offset_of(p, n, e));
  }

  // Offset of fragment element st[n][e] in the [N, H, ...] state tensors.
  __device__ int64_t offset_of(const ForwardParams& p, int n, int e) const {
    return state_head_offset +
           state_offset(row0 + group + 8 * (e / 2), 8 * n + 2 * quad + (e % 2), p.state_value_first);
  }

  __device__ void store_final(const ForwardParams& p) const {
    if (p.final_state == nullptr) return;
#pragma unroll
    for (int n = 0; n < kFrags; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) store_state(p.final_state, p.final_state_dtype, offset_of(p, n, e), st[n][e]);
  }

  // k-step kk of Sᵀ (channels [16·kk, +16)) as a bf16 A fragment.
  __device__ __forceinline__ void state_operand(int kk, uint32_t (&a)[4]) const {
    a[0] = pack_bf16x2(st[2 * kk][0], st[2 * kk][1]);
    a[1] = pack_bf16x2(st[2 * kk][2], st[2 * kk][3]);
    a[2] = pack_bf16x2(st[2 * kk + 1][0], st[2 * kk + 1][1]);
    a[3] = pack_bf16x2(st[2 * kk + 1][2], st[2 * kk + 1][3]);
  }

  // [Pᵀ | Oᵀ] = Sᵀ·[KG; QG]ᵀ for this warp's value rows, as 8 wgmma of the warpgroup: the state converted to
  // bf16 is the register A operand, the swizzled kq tile is read by the tensor cores once per warpgroup.
  __device__ __forceinline__ void p_and_o_by_wgmma(const PreparedChunk& cur, float (&po)[16]) {
    using namespace cute::SM90::GMMA;
    uint32_t a[Config::kHeadDimK / 16][4];
#pragma unroll
    for (int kk = 0; kk < Config::kHeadDimK / 16; ++kk) state_operand(kk, a[kk]);
    const uint64_t kq_desc = swizzled_k_major_desc(&cur.kq[0][0][0]);
    wgmma_fence_operands(a);
    wgmma_fence_operands(po);
    cute::warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < Config::kHeadDimK / 16; ++kk) {
      // k-step kk: channels [16·kk, +16) = half kk / 4, 32-byte column (kk % 4) of its swizzled rows.
      const uint64_t desc = kq_desc + descriptor_address((kk / 4) * sizeof(cur.kq[0]) + (kk % 4) * 32);
      MMA_64x32x16_F32BF16BF16_RS<Major::K, Major::K>::fma(
          a[kk][0], a[kk][1], a[kk][2], a[kk][3], desc, po[0], po[1], po[2], po[3], po[4], po[5], po[6], po[7], po[8],
          po[9], po[10], po[11], po[12], po[13], po[14], po[15]);
    }
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
    wgmma_fence_operands(po);
  }

  // The same as 32 mma.sync of this warp, the B fragments by ldmatrix from the swizzled rows: token row
  // t = lane % 8 + 8·(lane / 16), 16-byte unit (2·kk + (lane / 8) % 2) ^ (t mod 8) of half kk / 4.
  __device__ __forceinline__ void p_and_o_by_mma_sync(const PreparedChunk& cur, float (&po)[16]) const {
    const int t = (lane % 8) + (lane / 16) * 8;
#pragma unroll
    for (int kk = 0; kk < Config::kHeadDimK / 16; ++kk) {
      uint32_t a[4], b[4];
      state_operand(kk, a);
      const int unit = ((2 * kk + (lane / 8) % 2) % 8) ^ (t % 8);
      ldsm(&cur.kq[kk / 4][PreparedChunk::kKgRow + t][unit * 8], b);
      mma(*reinterpret_cast<float(*)[4]>(&po[0]), a, b[0], b[1]);
      mma(*reinterpret_cast<float(*)[4]>(&po[4]), a, b[2], b[3]);
      ldsm(&cur.kq[kk / 4][PreparedChunk::kQgRow + t][unit * 8], b);
      mma(*reinterpret_cast<float(*)[4]>(&po[8]), a, b[0], b[1]);
      mma(*reinterpret_cast<float(*)[4]>(&po[12]), a, b[2], b[3]);
    }
  }

  // Sᵀ += (diag(kn)·v')ᵀ·KU as 2 wgmma of the warpgroup (one per 64-channel half): issued, not waited for.
  __device__ __forceinline__ void issue_update_by_wgmma(const PreparedChunk& cur, uint32_t (&w_frag)[4]) {
    using namespace cute::SM90::GMMA;
    wgmma_fence_operands(w_frag);
    wgmma_fence_operands(st);
    cute::warpgroup_arrive();
    const uint64_t ku_desc = swizzled_mn_major_desc(&cur.ku[0][0][0]);
#pragma unroll
    for (int h = 0; h < kKeyHalves; ++h) {
      float(&d_half)[8][4] = *reinterpret_cast<float(*)[8][4]>(&st[8 * h][0]);
      MMA_64x64x16_F32BF16BF16_RS<Major::K, Major::MN>::fma(
          w_frag[0], w_frag[1], w_frag[2], w_frag[3], ku_desc + descriptor_address(h * sizeof(cur.ku[0])),
          d_half[0][0], d_half[0][1], d_half[0][2], d_half[0][3], d_half[1][0], d_half[1][1], d_half[1][2],
          d_half[1][3], d_half[2][0], d_half[2][1], d_half[2][2], d_half[2][3], d_half[3][0], d_half[3][1],
          d_half[3][2], d_half[3][3], d_half[4][0], d_half[4][1], d_half[4][2], d_half[4][3], d_half[5][0],
          d_half[5][1], d_half[5][2], d_half[5][3], d_half[6][0], d_half[6][1], d_half[6][2], d_half[6][3],
          d_half[7][0], d_half[7][1], d_half[7][2], d_half[7][3]);
    }
    cute::warpgroup_commit_batch();
  }

  // The same as 16 mma.sync of this warp: KU's rows are the k (token) rows of the B operand, so
  // ldmatrix.trans, token row t = lane % 8 + 8·((lane / 8) % 2), unit (2·np + lane / 16) ^ (t mod 8).
  __device__ __forceinline__ void update_by_mma_sync(const PreparedChunk& cur, const uint32_t (&w_frag)[4]) {
    const int t = (lane % 8) + ((lane / 8) % 2) * 8;
#pragma unroll
    for (int np = 0; np < Config::kHeadDimK / 16; ++np) {
      uint32_t b[4];
      ldsm_trans(&cur.ku[np / 4][t][(((2 * np + lane / 16) % 8) ^ (t % 8)) * 8], b);
      mma(st[2 * np], w_frag, b[0], b[1]);
      mma(st[2 * np + 1], w_frag, b[2], b[3]);
    }
  }

  // One chunk: reads `cur`, updates st, writes this warp's 16 × 16 block of o (tokens of the chunk × its
  // value rows). `release()` runs as soon as nothing more is read from `cur`, before the output store.
  // The four warps of a warpgroup call it together. With kWgmma the two large products are wgmma over
  // their 64 value rows, the tiles read by the tensor cores once per warpgroup instead of once per warp
  // (v7); without, they are mma.sync with ldmatrix operands: 4 times the shared-memory traffic, a shorter
  // chain (see ClusterConfig). Both give the same bits (the schedule tests compare them).
  template <bool kWgmma = true, class Release>
  __device__ void step(const PreparedChunk& cur, bf16 (&out_stage)[Config::kChunk][Config::kSmallStride],
                       const ForwardParams& p, Release&& release) {
    // ---- P = KG·S and O = QG·S for this warp's value rows (as [Pᵀ | Oᵀ] = Sᵀ·[KG; QG]ᵀ, one product) ----
    float po[16] = {};  // n8 blocks 0, 1: Pᵀ (v, t); blocks 2, 3: Oᵀ (v, t)
    if constexpr (kWgmma)
      p_and_o_by_wgmma(cur, po);
    else
      p_and_o_by_mma_sync(cur, po);

    // Per-token factors of this lane's columns t = 8·n + 2·quad + (e % 2).
    float kn[2][2], qs[2][2];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const float2 k2 = *reinterpret_cast<const float2*>(&cur.k_rnorm[8 * n + 2 * quad]);
      const float2 q2 = *reinterpret_cast<const float2*>(&cur.q_scale[8 * n + 2 * quad]);
      kn[n][0] = k2.x, kn[n][1] = k2.y, qs[n][0] = q2.x, qs[n][1] = q2.y;
    }

    // ---- v' = T'·(v − diag(kn)·P) (transposed: v'ᵀ = (v − diag(kn)·P)ᵀ·T'ᵀ) ----
    float d[2][4];  // (v − diag(kn)·P)ᵀ
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int v = row0 + group + 8 * (e / 2);
        const int t = 8 * n + 2 * quad + (e % 2);
        d[n][e] = fmaf(-kn[n][e % 2], po[4 * n + e], __bfloat162float(cur.v[t][v]));
      }
    uint32_t d_frag[4];
    accum_to_a_frag(d, d_frag);
    // The two 16 × 16 products of each warp (T', A_qk) run as mma.sync: a wgmma round trip (fence,
    // commit, wait) would lengthen the chain more than they take (v7 measurements, docs/kernel_sm90.md).
    float vp[2][4] = {};  // v'ᵀ (v, t)
    {
      uint32_t b[4];
      ldsm(&cur.t_scaled[core_matrix_b_frag_offset(lane)], b);
      mma(vp[0], d_frag, b[0], b[1]);
      mma(vp[1], d_frag, b[2], b[3]);
    }

    // ---- S ← diag(2^Γ_C)·S + KUᵀ·diag(kn)·v' (transposed), and A_qk·v' while a wgmma form runs ----
    uint32_t vp_frag[4];
    accum_to_a_frag(vp, vp_frag);
    float w[2][4];  // (diag(kn)·v')ᵀ
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) w[n][e] = vp[n][e] * kn[n][e % 2];
    uint32_t w_frag[4];
    accum_to_a_frag(w, w_frag);
#pragma unroll
    for (int n = 0; n < kFrags; ++n) {
      const float2 decay = *reinterpret_cast<const float2*>(&cur.decay[8 * n + 2 * quad]);
      st[n][0] *= decay.x;
      st[n][1] *= decay.y;
      st[n][2] *= decay.x;
      st[n][3] *= decay.y;
    }
    if constexpr (kWgmma)
      issue_update_by_wgmma(cur, w_frag);
    else
      update_by_mma_sync(cur, w_frag);
    float o_intra[2][4] = {};  // (A_qk·v')ᵀ
    {
      uint32_t b[4];
      ldsm(&cur.a_qk[core_matrix_b_frag_offset(lane)], b);
      mma(o_intra[0], vp_frag, b[0], b[1]);
      mma(o_intra[1], vp_frag, b[2], b[3]);
    }
    if constexpr (kWgmma) {
      cute::warpgroup_wait<0>();
      wgmma_fence_operands(st);
    }
    float o_acc[2][4];  // Oᵀ (v, t) = (QG·S + A_qk·v')ᵀ
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) o_acc[n][e] = po[8 + 4 * n + e] + o_intra[n][e];
    // Everything this chunk needs from `cur` has been read (the products completed): it may be refilled.
    release();

    // ---- store: o = diag(qs)·(...); transpose this warp's 16 × 16 block through shared memory ----
    // One stmatrix.trans instead of 8 element stores: 8 × 8 block j = 2·(t / 8) + v / 8 of the accumulator
    // layout lands transposed (token rows, value columns); lane 8·j + i gives the address of block j's token
    // row i (48-byte rows: the 8 rows of a block fall into distinct banks).
    {
      uint32_t packed[4];
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          packed[2 * n + h] = pack_bf16x2(o_acc[n][2 * h] * qs[n][0], o_acc[n][2 * h + 1] * qs[n][1]);
      const int block = lane / 8;
      stsm_trans(&out_stage[8 * (block / 2) + lane % 8][8 * (block % 2)], packed);
    }
    __syncwarp();
    if (lane / 2 < tokens_left)
      *reinterpret_cast<uint4*>(out_piece) = *reinterpret_cast<const uint4*>(&out_stage[lane / 2][8 * (lane % 2)]);
    out_piece += Config::kChunk * p.out.token_stride;
    tokens_left -= Config::kChunk;
    __syncwarp();  // the next chunk's stores reuse out_stage
  }
};

// ---------------------------------------------------------------------------------------------------
// Scheduling, single-CTA kernel: one or two CTAs per (sequence, head), each with its own 8 producer warps
// and 8 or 4 state warps (Roles).
// ---------------------------------------------------------------------------------------------------
template <int kStateWarps>
__global__ void __launch_bounds__(Roles<kStateWarps>::kThreads, 1)
    kda_forward_kernel(const __grid_constant__ ForwardParams p) {
  using R = Roles<kStateWarps>;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SharedStorage& s = dynamic_shared_storage<SharedStorage>(smem_raw);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  // ==== Scheduling: which (sequence, head) and which value rows this block owns ====
  const auto [seq, head, sb, num_chunks] =
      pair_work_longest_first(p, blockIdx.x / R::kValueParts, reinterpret_cast<int64_t*>(&s));
  const int value_base = static_cast<int>(blockIdx.x % R::kValueParts) * R::kValueRows;

  if (threadIdx.x == 0) {
    for (int i = 0; i < Config::kStages; ++i) {
      mbarrier_init(&s.full[i], 32);
      mbarrier_init(&s.empty[i], R::kStateThreads);
    }
  }
  __syncthreads();

  if (warp >= R::kStateWarps) {
    // ==== Producers: warp w loads and prepares chunks w, w + 8, w + 16, ... in stage w ====
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R::kPrepRegisters));
    const int prep_warp = warp - R::kStateWarps;
    const ChunkProducer producer(p, sb, head, lane);
    for (int64_t chunk = prep_warp, round = 0; chunk < num_chunks; chunk += Config::kStages, ++round) {
      // The state warps must be done with the stage's previous chunk (chunk − 8).
      if (round > 0) mbarrier_wait(&s.empty[prep_warp], static_cast<uint32_t>((round - 1) & 1));
      producer.produce(chunk, s.stage[prep_warp], s.a_kk_t[prep_warp]);
      // Written through the generic proxy, read by the state warps' wgmma through the async proxy.
      fence_proxy_async_shared();
      mbarrier_arrive(&s.full[prep_warp]);
    }
    return;
  }

  // ==== State warps: the recurrence, chunk after chunk ====
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R::kStateRegisters));
  StateWarp state(p, seq, head, sb, value_base + 16 * warp, lane);
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    const int stage = static_cast<int>(chunk % Config::kStages);
    mbarrier_wait(&s.full[stage], static_cast<uint32_t>((chunk / Config::kStages) & 1));
    state.step(s.stage[stage], s.out_stage[warp], p, [&] { mbarrier_arrive(&s.empty[stage]); });
  }
  state.store_final(p);
#endif  // __CUDA_ARCH__ >= 900
}

// ---------------------------------------------------------------------------------------------------
// Hand-over to ring-fed state CTAs (cluster and trio kernels; `pair` pushes with the same helper): ranks 0
// and 1 of the cluster hold value rows [0, 64) and [64, 128) and a ring of prepared chunks, chunk c in slot
// c mod kRing; FULL[slot] completes on its producer's arrivals (the first with arrive.expect_tx) and the bulk
// copy's bytes.
// ---------------------------------------------------------------------------------------------------
constexpr int kRingStateCtas = 2;

// Pushes the prepared chunk in `st` into `slot` of state CTA `rank` (`slot` and `full` are this CTA's
// addresses of the same shared-memory layout): arrives on its FULL[slot] with the byte count (`arrivals`
// in all, FULL's count) and bulk-copies; the copy completes the transaction. One lane per destination;
// the caller has fenced the stage's generic-proxy writes (fence.proxy.async) and synchronised its writers.
__device__ __forceinline__ void push_to_state_cta(const Stage& st, const PreparedChunk& slot, uint64_t& full, int rank,
                                                  uint32_t bytes, uint32_t arrivals = 1) {
  const uint32_t remote_full = map_shared_to_rank(shared_address(&full), rank);
  mbarrier_arrive_expect_tx_remote(remote_full, bytes);
  if (arrivals > 1) mbarrier_arrive_remote(remote_full, arrivals - 1);
  bulk_copy_shared_to_cluster(map_shared_to_rank(shared_address(&slot), rank),
                              shared_address(static_cast<const PreparedChunk*>(&st)), bytes, remote_full);
}

// A state warp's release of a ring slot to its producers: one remote add to `counter` in CTA `rank`,
// once the whole warp has read the slot.
__device__ __forceinline__ void add_release(uint32_t& counter, int rank, int lane) {
  __syncwarp();
  if (lane == 0) red_add_release_cluster(map_shared_to_rank(shared_address(&counter), rank), 1);
}

// Load, ring-fed state warps (`trio`): a state warp copies its own 16 value columns of v for the
// chunk kLookahead ahead straight from global memory into that chunk's ring slot (one 16-byte cp.async
// per lane and chunk: token lane / 2, columns row0 + 8·(lane % 2); rows past the sequence zero-filled),
// and waits for the current chunk's copy before its step. So v never crosses between SMs (the producers
// push kPushedTileBytes), and since no other warp reads these columns, the warp's own cp.async groups
// order everything: the slot's previous chunk is one this warp has already run.
struct ValuePrefetch {
  static constexpr int kLookahead = 4;  // chunks in flight: ~2.5 µs at the state warps' pace, > a DRAM round trip
  const bf16* first_row;  // the sequence's first token, this lane's columns (the address of zero-filled rows)
  const bf16* src;        // this lane's row of the next chunk to issue
  int64_t chunk_stride;
  int64_t tokens_left;  // of the sequence, from the next chunk to issue on
  int row, column;      // this lane's token in a chunk, and its first value column

  __device__ ValuePrefetch(const ForwardParams& p, const SequenceBounds& sb, int head, int row0, int lane)
      : first_row(static_cast<const bf16*>(p.v.data) + token_offset(p.v, sb, 0, head) + row0 + 8 * (lane % 2)),
        src(first_row + (lane / 2) * p.v.token_stride), chunk_stride(Config::kChunk * p.v.token_stride),
        tokens_left(sb.length), row(lane / 2), column(row0 + 8 * (lane % 2)) {}

  // The next chunk's copy into `slot`, as one commit group (an empty one past the last chunk).
  template <class Slot>
  __device__ __forceinline__ void issue(Slot& slot) {
    if (tokens_left > 0) {
      const bool valid = row < tokens_left;
      copy_16_bytes_async_or_zero(shared_address(&slot.v[row][column]), valid ? src : first_row, valid);
    }
    cute::cp_async_fence();
    src += chunk_stride;
    tokens_left -= Config::kChunk;
  }
  // The current chunk's copy has landed and is visible to the whole warp.
  __device__ __forceinline__ static void wait_for_current() {
    cute::cp_async_wait<kLookahead - 1>();
    __syncwarp();
  }
};

// A state warp of the clustered kernels (cluster, trio, pair), value rows [row0, +16): waits for each
// chunk's slot (FULL, hang-guarded), runs it, and releases the slot with release(chunk, slot). (Slot:
// PreparedChunk, or Stage where producers of the state warps' own CTA prepare in place.) With kLoadsV the
// warp loads its columns of v itself (ValuePrefetch); otherwise they come with the slot.
template <int kRing, bool kWgmma, bool kLoadsV, class Slot, class Release>
__device__ __forceinline__ void run_ring_fed_state_warp(const ForwardParams& p, int64_t seq, int head,
                                                        const SequenceBounds& sb, int64_t num_chunks, int row0,
                                                        int lane, Slot (&ring)[kRing], uint64_t (&full)[kRing],
                                                        bf16 (&out_stage)[Config::kChunk][Config::kSmallStride],
                                                        Release&& release) {
  static_assert(!kLoadsV || ValuePrefetch::kLookahead < kRing, "a prefetch lands in a slot this warp is done with");
  StateWarp state(p, seq, head, sb, row0, lane);
  ValuePrefetch values(p, sb, head, row0, lane);
  if constexpr (kLoadsV)
#pragma unroll
    for (int c = 0; c < ValuePrefetch::kLookahead; ++c) values.issue(ring[c]);
  // Slot and parity advance with the chunk (kRing need not be a power of two: `cluster` has 10 slots, and
  // chunk % 10 in 64 bits cost the state warps ~9% of their time, v10i).
  int slot = 0, ahead = ValuePrefetch::kLookahead;  // ahead: the slot of chunk + kLookahead
  uint32_t parity = 0;
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    mbarrier_wait_guarded(&full[slot], parity);
    if constexpr (kLoadsV) {
      ValuePrefetch::wait_for_current();
      values.issue(ring[ahead]);
      if (++ahead == kRing) ahead = 0;
    }
    state.template step<kWgmma>(ring[slot], out_stage, p, [&] { release(chunk, slot); });
    if (++slot == kRing) slot = 0, parity ^= 1;
  }
  state.store_final(p);
}

// ---------------------------------------------------------------------------------------------------
// Scheduling, cluster kernel (few (sequence, head) pairs): the roles on different SMs. A cluster of four
// CTAs serves one (sequence, head): CTAs 0 and 1 hold value rows [0, 64) and [64, 128) of the state
// (4 state warps each, the other 4 warps idle); CTAs 2 and 3 are producers (8 warps each) that prepare the
// even and the odd chunks and push each prepared chunk into both state CTAs' rings with bulk shared-to-
// shared copies. The state SMs then issue only state work, and the preparation is done once per chunk
// instead of once per value half.
//
// Hand-over, chunk c (round r = c / kRing) in ring slot c mod kRing: the producer warp waits until its
// previous chunk (c − 16) was consumed by both state CTAs, so delivered and its stage free (`released` in the
// producer CTA counts one remote add per state warp and chunk), prepares c in its own stage, waits until the
// slot was released r times (chunk c − kRing consumed), then arrives on FULL of each state CTA with the byte
// count and copies; the bulk copy completes the transaction on that FULL barrier.
//
// Why a count and not an EMPTY mbarrier: a producer warp's chunks are 16 apart, more than the 10 slots, so
// when it comes to wait for round r − 1 of a slot, that slot may still be in round r − 2, and a parity wait
// would take the old phase for the one it waits for. FULL is safe with parities: each state warp consumes
// every chunk in order, so it is never more than one phase away from the slot's barrier.
// ---------------------------------------------------------------------------------------------------
struct ClusterConfig {
  static constexpr int kStateCtas = kRingStateCtas;
  static constexpr int kProducerCtas = 2;
  static constexpr int kCtas = kStateCtas + kProducerCtas;
  static constexpr int kStateWarps = 4;  // per state CTA
  static constexpr int kValueRows = 16 * kStateWarps;
  static constexpr int kThreads = Config::kPrepWarps * 32;
  static constexpr int kRing = 10;
  static constexpr int kChunksPerRound = kProducerCtas * Config::kPrepWarps;  // a producer warp's chunk stride
  // Alone on their SM the state warps are faster with mma.sync and ldmatrix than with wgmma (v10f:
  // 1×32768 H16 1.268 against 1.341 ms): nothing else competes for the SM's shared-memory bandwidth.
  static constexpr bool kWgmmaStateProducts = false;
  static constexpr uint32_t kReleasesPerChunk = kStateCtas * kStateWarps;

  static_assert(kStateCtas * kValueRows == Config::kHeadDimV, "the state CTAs together hold all value rows");
  static_assert(kRing % kProducerCtas == 0, "slot s is always fed by producer CTA s mod kProducerCtas");
  static_assert(kChunksPerRound > kRing, "a warp's previous chunk is older than the slot's previous chunk");
  static_assert(kStateWarps <= Config::kPrepWarps, "the state CTA has as many threads as a producer CTA");
};

struct ClusterStateStorage {
  PreparedChunk ring[ClusterConfig::kRing];
  bf16 out_stage[ClusterConfig::kStateWarps][Config::kChunk][Config::kSmallStride];
  uint64_t full[ClusterConfig::kRing];
};
struct ClusterProducerStorage {
  Stage work[Config::kPrepWarps];
  float a_kk_t[Config::kPrepWarps][Config::kChunk][Config::kChunk];
  uint32_t released[ClusterConfig::kRing];  // state-warp releases of each slot, over all rounds
};
constexpr size_t kClusterSmemBytes = dynamic_smem_bytes<ClusterStateStorage, ClusterProducerStorage>();
static_assert(kClusterSmemBytes <= 227 * 1024, "shared memory per block on sm_90 is at most 227 KB");
static_assert(sizeof(SharedStorage) >= (kMaxOrderedSequences + 1) * sizeof(int64_t),
              "the single-CTA kernel's shared memory holds the launch-order scratch");

__global__ void __launch_bounds__(ClusterConfig::kThreads, 1)
    kda_forward_cluster_kernel(const __grid_constant__ ForwardParams p) {
  using CC = ClusterConfig;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem_raw[];
  ClusterStateStorage& ss = dynamic_shared_storage<ClusterStateStorage>(smem_raw);
  ClusterProducerStorage& ps = dynamic_shared_storage<ClusterProducerStorage>(smem_raw);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int rank = static_cast<int>(cluster_ctarank());
  const bool state_cta = rank < CC::kStateCtas;

  // ==== Scheduling: one cluster per (sequence, head) ====
  const auto [seq, head, sb, num_chunks] = pair_work_in_index_order(p, blockIdx.x / CC::kCtas);

  if (threadIdx.x == 0) {
    for (int i = 0; i < CC::kRing; ++i) {
      if (state_cta)
        mbarrier_init(&ss.full[i], 1);  // the producer's arrive.expect_tx; the bytes complete the phase
      else
        ps.released[i] = 0;
    }
    fence_mbarrier_init_cluster();
  }
  cluster_sync();  // every barrier and counter of the cluster is initialised before anyone uses it

  if (!state_cta) {
    // ==== Producers: CTA 2 + q, warp w prepares chunks q + 2·w, q + 2·w + 16, ... ====
    const int producer_cta = rank - CC::kStateCtas;
    Stage& st = ps.work[warp];
    const ChunkProducer producer(p, sb, head, lane);
    for (int64_t chunk = producer_cta + CC::kProducerCtas * warp; chunk < num_chunks; chunk += CC::kChunksPerRound) {
      // The warp's own stage: its previous chunk (chunk − 16) must have been delivered, which it was once
      // that chunk was consumed. The ring slot is waited for only after the preparation.
      if (chunk >= CC::kChunksPerRound) {
        const int64_t previous = chunk - CC::kChunksPerRound;
        wait_count_at_least(&ps.released[previous % CC::kRing],
                            CC::kReleasesPerChunk * static_cast<uint32_t>(previous / CC::kRing + 1));
      }
      producer.produce(chunk, st, ps.a_kk_t[warp]);
      const int slot = static_cast<int>(chunk % CC::kRing);
      const int64_t round = chunk / CC::kRing;
      if (round > 0) wait_count_at_least(&ps.released[slot], CC::kReleasesPerChunk * static_cast<uint32_t>(round));
      // The stage was written through the generic proxy; the bulk copy reads it through the async proxy.
      fence_proxy_async_shared();
      __syncwarp();
      if (lane < CC::kStateCtas)  // lane d: CTA d
        push_to_state_cta(st, ss.ring[slot], ss.full[slot], lane, kPreparedChunkBytes);
    }
  } else if (warp < CC::kStateWarps) {
    // ==== State warps: value rows [64·rank + 16·warp, +16) ====
    run_ring_fed_state_warp<CC::kRing, CC::kWgmmaStateProducts, false>(
        p, seq, head, sb, num_chunks, rank * CC::kValueRows + 16 * warp, lane, ss.ring, ss.full, ss.out_stage[warp],
        [&](int64_t chunk, int slot) {
          add_release(ps.released[slot], CC::kStateCtas + static_cast<int>(chunk % CC::kProducerCtas), lane);
        });
  }
  if (!state_cta && threadIdx.x == 0)  // this producer CTA's slots: those of its chunks
    wait_for_every_release(ps.released, num_chunks, CC::kReleasesPerChunk,
                           [&](int slot) { return slot % CC::kProducerCtas == rank - CC::kStateCtas; });
  // No CTA leaves while another may still copy into its shared memory or arrive on its barriers.
  cluster_sync();
#endif  // __CUDA_ARCH__ >= 900
}

// ---------------------------------------------------------------------------------------------------
// Scheduling, trio kernel (v10; few (sequence, head) pairs, too many for the clusters of 4 of `cluster`):
// a cluster of three CTAs per (sequence, head). CTAs 0 and 1 hold value rows [0, 64) and [64, 128) of the
// state (warpgroup 0: 4 state warps) and run 2 teams of two producer warps beside them (warpgroup 1; the
// other 8 warps give their registers away and idle); CTA 2 runs 8 teams of two producer warps. Every team
// prepares whole chunks (ChunkProducer::produce_half). Who prepares which chunk is not fixed: a team takes
// the next chunk from a ticket counter in CTA 2 when it is free, so the teams beside the state warps take
// fewer chunks when the state warps leave them less of the SM. (v9: the same three CTAs without producers
// beside the state warps were bound by the one producer SM, ~1.06 µs per chunk; the state warps alone need
// ~0.65 µs.)
//
// Hand-over, chunk c (round r = c / kRing) in ring slot c mod kRing of both state CTAs:
//   a team of CTA 2 waits until its previous chunk was consumed by both state CTAs (so delivered: its own
//     stage is free), takes chunk c = ticket++, prepares it in its stage, waits until the slot's previous
//     chunk c − kRing was consumed (`released[slot]` in CTA 2 counts one remote add per state warp and
//     chunk: ≥ 8·r), then one lane per state CTA arrives on that CTA's FULL[slot] with the byte count (all
//     64 arrivals of the phase) and bulk-copies the chunk there.
//   a team of state CTA s takes chunk c, waits for the slot as above (and for its own CTA's EMPTY[slot],
//     see run_trio_team), prepares c in place in its own ring slot, arrives on its own FULL[slot] with its
//     64 lanes (as in `pair`), and one lane pushes the chunk to the other state CTA as above. Preparing in
//     place, not in a stage of its own that is then copied into the ring, took 1×32768 H32 from 1.66 to
//     1.46 ms.
//   state warps: wait FULL[slot] with parity r & 1 and for their own copy of v (v10k: the pushes stop
//     before v, ValuePrefetch), run the chunk, arrive on EMPTY[slot], add 1 to `released[slot]`.
// No wait can starve: the tickets go out in chunk order, so the oldest chunk still to be delivered only
// waits for older ones, which have been delivered and are consumed in order. The counts are monotonic for
// the reason given for `cluster`; they and the ticket are 32-bit, far above any sequence's chunk count.
// ---------------------------------------------------------------------------------------------------
struct TrioConfig {
  static constexpr int kStateCtas = kRingStateCtas;
  static constexpr int kCtas = kStateCtas + 1;
  static constexpr int kProducerRank = kStateCtas;  // CTA 2: producer teams, ticket and release counts
  static constexpr int kStateWarps = 4;             // per state CTA: warpgroup 0
  static constexpr int kValueRows = 16 * kStateWarps;
  static constexpr int kTeamWarps = 2;
  static constexpr int kProducerCtaTeams = 8;
  static constexpr int kStateCtaTeams = 2;  // warpgroup 1 of a state CTA
  static constexpr int kThreads = kProducerCtaTeams * kTeamWarps * 32;
  static constexpr int kRing = 8;
  static constexpr uint32_t kReleasesPerChunk = kStateCtas * kStateWarps;
  static constexpr uint32_t kFullArrivals = kTeamWarps * 32;
  // Beside producer teams the wgmma form is faster (v10f: 1×32768 H32 1.476 against 1.544 ms with mma.sync).
  static constexpr bool kWgmmaStateProducts = true;
  static constexpr int kFirstTeamBarrier = 1;  // named barriers 1..8; 0 is __syncthreads'
  // setmaxnreg, per warpgroup: the launch gives every thread 65536 / 512 = 128 registers; in a state CTA
  // warpgroup 0 takes 232, warpgroup 1 (producers) keeps 128, warpgroups 2 and 3 keep 24.
  static constexpr int kLaunchRegisters = (65536 / kThreads) / 8 * 8;
  static constexpr int kStateRegisters = 232;
  static constexpr int kIdleRegisters = 24;
  static constexpr int kIdleWarpgroups = kThreads / 128 - 2;

  static_assert(kStateCtas * kValueRows == Config::kHeadDimV, "the state CTAs together hold all value rows");
  static_assert(kStateWarps == 4 && kStateCtaTeams * kTeamWarps == 4,
                "a state CTA's roles are whole warpgroups: state warps, then producer warps (setmaxnreg)");
  static_assert(kStateRegisters * 128 + kLaunchRegisters * 128 + kIdleRegisters * 128 * kIdleWarpgroups <=
                    kLaunchRegisters * kThreads,
                "the state CTA's registers fit in its allocation");
  static_assert(kLaunchRegisters >= 104, "the producers spill below 104 registers (v7)");
  static_assert(kFirstTeamBarrier + kProducerCtaTeams <= 16, "sm_90 has 16 named barriers per CTA");
};

// A state CTA's ring slots are whole stages: its own teams prepare their chunks in place (the KR scratch
// included), the producer CTA's bulk copies fill the PreparedChunk part before v, and the state warps load
// v (ValuePrefetch).
struct TrioStateStorage {
  Stage ring[TrioConfig::kRing];
  float a_kk_t[TrioConfig::kStateCtaTeams][Config::kChunk][Config::kChunk];
  bf16 out_stage[TrioConfig::kStateWarps][Config::kChunk][Config::kSmallStride];
  uint64_t full[TrioConfig::kRing];
  uint64_t empty[TrioConfig::kRing];                // this CTA's state threads are done with the slot's chunk
  uint32_t team_chunk[TrioConfig::kStateCtaTeams];  // a team's current ticket, for its second warp
};
struct TrioProducerStorage {
  Stage work[TrioConfig::kProducerCtaTeams];
  float a_kk_t[TrioConfig::kProducerCtaTeams][Config::kChunk][Config::kChunk];
  uint32_t released[TrioConfig::kRing];  // state-warp releases of each slot, over all rounds
  uint32_t next_chunk;                   // the ticket counter of all the teams
  uint32_t team_chunk[TrioConfig::kProducerCtaTeams];
};
constexpr size_t kTrioSmemBytes = dynamic_smem_bytes<TrioStateStorage, TrioProducerStorage>();
static_assert(kTrioSmemBytes <= 227 * 1024, "shared memory per block on sm_90 is at most 227 KB");

// One producer team of the trio kernel. In CTA 2 (`own_stage` given) it prepares in its own stage and
// pushes the chunk into both state CTAs; in state CTA `rank` (`own_stage` null) it waits for the ring slot,
// prepares in place there, arrives on its own FULL and pushes the chunk to the other state CTA.
// `a_kk_t`, `team_chunk` are the team's own; `ss` and `ps` are this CTA's shared memory seen in the state
// and producer CTA layouts (the same addresses in every CTA of the cluster, mapped to the CTA that holds them).
__device__ __forceinline__ void run_trio_team(const ForwardParams& p, const SequenceBounds& sb, int head,
                                              int64_t num_chunks, Stage* own_stage,
                                              float (&a_kk_t)[Config::kChunk][Config::kChunk], uint32_t& team_chunk,
                                              int half, int team_barrier, int lane, int rank, TrioStateStorage& ss,
                                              TrioProducerStorage& ps) {
  using TC = TrioConfig;
  const auto released = [&](int64_t chunk) {
    return map_shared_to_rank(shared_address(&ps.released[chunk % TC::kRing]), TC::kProducerRank);
  };
  const auto wait_slot_free = [&](int64_t chunk) {  // the slot's previous chunk consumed by both state CTAs
    if (chunk >= TC::kRing)
      wait_count_at_least(released(chunk), TC::kReleasesPerChunk * static_cast<uint32_t>(chunk / TC::kRing));
  };
  const ChunkProducer producer(p, sb, head, lane);
  for (uint32_t taken = 0;; ++taken) {
    // An own stage holds the team's previous chunk until both state CTAs consumed it (so it was delivered).
    if (own_stage != nullptr && taken > 0) {
      const uint32_t previous = *static_cast<volatile uint32_t*>(&team_chunk);
      wait_count_at_least(released(previous), TC::kReleasesPerChunk * (previous / TC::kRing + 1));
    }
    ChunkProducer::team_sync(team_barrier);  // both warps have read the previous ticket
    if (half == 0 && lane == 0)
      team_chunk = fetch_add_cluster(map_shared_to_rank(shared_address(&ps.next_chunk), TC::kProducerRank), 1);
    ChunkProducer::team_sync(team_barrier);  // both warps see the new ticket
    const int64_t chunk = *static_cast<volatile uint32_t*>(&team_chunk);
    if (chunk >= num_chunks) break;
    const int slot = static_cast<int>(chunk % TC::kRing);
    if (own_stage == nullptr) {
      wait_slot_free(chunk);
      // ... which for this CTA's state threads also shows as the phase of EMPTY[slot] for chunk − kRing.
      // The count alone orders the writes below after their reads (release at CTA scope, acquire at
      // cluster scope); the mbarrier makes that order visible to compute-sanitizer's racecheck too. It
      // cannot be a phase off: the count says that phase completed, and the next one needs this chunk.
      if (chunk >= TC::kRing) mbarrier_wait(&ss.empty[slot], static_cast<uint32_t>((chunk / TC::kRing - 1) & 1));
    }
    Stage& st = own_stage != nullptr ? *own_stage : ss.ring[slot];
    producer.produce_half<false>(chunk, st, a_kk_t, half, team_barrier);
    if (own_stage != nullptr) wait_slot_free(chunk);
    // The stage was written through the generic proxy; wgmma and the bulk copy read it through the async one.
    fence_proxy_async_shared();
    // FULL takes the team's 64 arrivals: every lane's own, where the team prepared in place (as in `pair`),
    // or all 64 from the lane that pushes the chunk.
    if (own_stage == nullptr) mbarrier_arrive(&ss.full[slot]);
    ChunkProducer::team_sync(team_barrier);  // both halves wrote their part before it is copied
    if (half != 0 || lane >= TC::kStateCtas) continue;
    if (own_stage != nullptr)
      push_to_state_cta(st, ss.ring[slot], ss.full[slot], lane, kPushedTileBytes, TC::kFullArrivals);  // lane d: CTA d
    else if (lane == 0)
      push_to_state_cta(st, ss.ring[slot], ss.full[slot], rank ^ 1, kPushedTileBytes, TC::kFullArrivals);
  }
}

__global__ void __launch_bounds__(TrioConfig::kThreads, 1)
    kda_forward_trio_kernel(const __grid_constant__ ForwardParams p) {
  using TC = TrioConfig;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem_raw[];
  TrioStateStorage& ss = dynamic_shared_storage<TrioStateStorage>(smem_raw);
  TrioProducerStorage& ps = dynamic_shared_storage<TrioProducerStorage>(smem_raw);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int rank = static_cast<int>(cluster_ctarank());
  const bool state_cta = rank < TC::kStateCtas;

  // ==== Scheduling: one cluster per (sequence, head) ====
  const auto [seq, head, sb, num_chunks] = pair_work_in_index_order(p, blockIdx.x / TC::kCtas);

  if (threadIdx.x == 0) {
    if (state_cta) {
      for (int i = 0; i < TC::kRing; ++i) {
        mbarrier_init(&ss.full[i], TC::kFullArrivals);  // a team's lanes, or one pushing lane for them
        mbarrier_init(&ss.empty[i], TC::kStateWarps * 32);
      }
    } else {
      for (int i = 0; i < TC::kRing; ++i) ps.released[i] = 0;
      ps.next_chunk = 0;
    }
    fence_mbarrier_init_cluster();
  }
  cluster_sync();  // every barrier and counter of the cluster is initialised before anyone uses it

  const int warpgroup = warp / 4;
  if (state_cta && warpgroup == 0) {
    // ==== State warps: value rows [64·rank + 16·warp, +16) ====
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(TC::kStateRegisters));
    run_ring_fed_state_warp<TC::kRing, TC::kWgmmaStateProducts, true>(
        p, seq, head, sb, num_chunks, rank * TC::kValueRows + 16 * warp, lane, ss.ring, ss.full, ss.out_stage[warp],
        [&](int64_t, int slot) {
          mbarrier_arrive(&ss.empty[slot]);  // for this CTA's own teams
          add_release(ps.released[slot], TC::kProducerRank, lane);
        });
  } else if (state_cta && warpgroup > 1) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(TC::kIdleRegisters));  // idle until the end
  } else {
    // ==== Producers: team t = warps 2·t, 2·t + 1 of CTA 2, or of warpgroup 1 of a state CTA ====
    // (One call site for both: the producer code is the largest part of the kernel.)
    const int team = (state_cta ? warp - 4 : warp) / TC::kTeamWarps;
    run_trio_team(p, sb, head, num_chunks, state_cta ? nullptr : &ps.work[team],
                  state_cta ? ss.a_kk_t[team] : ps.a_kk_t[team], state_cta ? ss.team_chunk[team] : ps.team_chunk[team],
                  warp % TC::kTeamWarps, TC::kFirstTeamBarrier + team, lane, rank, ss, ps);
  }
  if (!state_cta && threadIdx.x == 0) {
    // Every team's last ticket (one past the chunks each) and every release have landed.
    wait_count_at_least(&ps.next_chunk, static_cast<uint32_t>(num_chunks) + TC::kProducerCtaTeams +
                                            TC::kStateCtas * TC::kStateCtaTeams);
    wait_for_every_release(ps.released, num_chunks, TC::kReleasesPerChunk, [](int) { return true; });
  }
  // No CTA leaves while another may still copy into its shared memory or arrive on its barriers.
  cluster_sync();
#endif  // __CUDA_ARCH__ >= 900
}

// ---------------------------------------------------------------------------------------------------
// Scheduling, pair kernel (N·H ≤ SMs / 2): `split`'s two CTAs of 64 value rows, made a cluster of 2 that
// prepares each chunk once. Both CTAs keep 8 stages; chunk c lives in stage c mod 8 of both. Stage s is
// prepared by CTA s mod 2 (its owner: team s / 2 of its 4 teams of two producer warps), read in place
// there, and pushed with a bulk copy into stage s of the other CTA. Two warps share a chunk
// (ChunkProducer::produce_half) because with 8 chunks in flight the preparation latency is what bounds
// `split` (v5 profile: its state warps wait for a prepared chunk 26% of the time).
//
// Hand-over, chunk c in stage s = c mod 8, round r = c / 8, owner o, peer o ^ 1:
//   owner's producers: round r > 0 wait until its own state warps consumed chunk c − 8 (EMPTY[s], a local
//     mbarrier of 128 arrivals, parity (r − 1) & 1) and the peer's did (`peer_released[s]` in the owner
//     counts 4 remote adds per chunk, monotonic: ≥ 4·r), which also means that the bulk copy of chunk c − 8
//     out of stage s is complete; prepare c; arrive on their own FULL[s] (64 lanes); after a team barrier
//     one lane arrives with the byte count on the peer's FULL[s] (1 arrival + transaction) and copies the
//     PreparedChunk part over.
//   state warps of both CTAs: wait FULL[s] with parity r & 1, run the chunk, release: the owner's arrive on
//     EMPTY[s], the peer's add 1 to the owner's `peer_released[s]`.
// Parities cannot alias: nobody arrives for chunk c before every reader of chunk c − 8 is done.
// ---------------------------------------------------------------------------------------------------
struct PairConfig {
  using R = Roles<4>;  // 4 state warps + 8 producer warps, registers as in `split`
  static constexpr int kCtas = 2;
  static constexpr int kStateWarps = R::kStateWarps;
  static constexpr int kOwnedStages = Config::kStages / kCtas;
  static constexpr int kTeamWarps = 2;
  static constexpr int kValueRows = 16 * kStateWarps;
  static constexpr int kThreads = R::kThreads;
  static constexpr int kFirstTeamBarrier = 1;  // named barriers 1..4; 0 is __syncthreads'
  static_assert(kCtas * kValueRows == Config::kHeadDimV, "the two CTAs together hold all value rows");
  static_assert(Config::kStages % kCtas == 0, "chunks c and c + kStages have the same owner");
  static_assert(kOwnedStages * kTeamWarps == Config::kPrepWarps, "a team of two producer warps per owned stage");
  static_assert(kFirstTeamBarrier + kOwnedStages <= 16, "sm_90 has 16 named barriers per CTA");
};

struct PairStorage {
  SharedStorage local;
  uint32_t peer_released[Config::kStages];  // the peer's state-warp releases of an owned stage, all rounds
};
static_assert(dynamic_smem_bytes<PairStorage>() <= 227 * 1024, "shared memory per block on sm_90 is at most 227 KB");

__global__ void __launch_bounds__(PairConfig::kThreads, 1)
    kda_forward_pair_kernel(const __grid_constant__ ForwardParams p) {
  using PC = PairConfig;
  using R = PC::R;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem_raw[];
  PairStorage& ps = dynamic_shared_storage<PairStorage>(smem_raw);
  SharedStorage& s = ps.local;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int rank = static_cast<int>(cluster_ctarank());
  const int peer = rank ^ 1;

  // ==== Scheduling: one cluster per (sequence, head), CTA `rank` holds value rows [64·rank, +64) ====
  const auto [seq, head, sb, num_chunks] = pair_work_in_index_order(p, blockIdx.x / PC::kCtas);

  if (threadIdx.x == 0) {
    for (int i = 0; i < Config::kStages; ++i) {
      const bool owned = i % PC::kCtas == rank;
      mbarrier_init(&s.full[i], owned ? PC::kTeamWarps * 32 : 1);  // own team's lanes, or the peer's expect_tx
      if (owned) mbarrier_init(&s.empty[i], PC::kStateWarps * 32);
      ps.peer_released[i] = 0;
    }
    fence_mbarrier_init_cluster();
  }
  cluster_sync();  // every barrier and counter of the cluster is initialised before anyone uses it

  if (warp >= PC::kStateWarps) {
    // ==== Producers: team t (warps 2·t, 2·t + 1 after the state warps) prepares owned stage 2·t + rank ====
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R::kPrepRegisters));
    const int team = (warp - PC::kStateWarps) / PC::kTeamWarps;
    const int half = (warp - PC::kStateWarps) % PC::kTeamWarps;
    const int team_barrier = PC::kFirstTeamBarrier + team;
    const int stage = PC::kCtas * team + rank;
    Stage& st = s.stage[stage];
    const ChunkProducer producer(p, sb, head, lane);
    for (int64_t chunk = stage, round = 0; chunk < num_chunks; chunk += Config::kStages, ++round) {
      if (round > 0) {
        mbarrier_wait(&s.empty[stage], static_cast<uint32_t>((round - 1) & 1));
        wait_count_at_least(&ps.peer_released[stage], PC::kStateWarps * static_cast<uint32_t>(round));
      }
      producer.produce_half(chunk, st, s.a_kk_t[team], half, team_barrier);
      // The stage was written through the generic proxy; the bulk copy reads it through the async proxy.
      fence_proxy_async_shared();
      mbarrier_arrive(&s.full[stage]);
      ChunkProducer::team_sync(team_barrier);  // both halves wrote their part before it is copied
      if (half == 0 && lane == 0) push_to_state_cta(st, s.stage[stage], s.full[stage], peer, kPreparedChunkBytes);
    }
  } else {
    // ==== State warps: value rows [64·rank + 16·warp, +16) ====
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R::kStateRegisters));
    run_ring_fed_state_warp<Config::kStages, true, false>(
        p, seq, head, sb, num_chunks, rank * PC::kValueRows + 16 * warp, lane, s.stage, s.full, s.out_stage[warp],
        [&](int64_t, int stage) {
          if (stage % PC::kCtas == rank)  // this CTA owns (prepared) the stage
            mbarrier_arrive(&s.empty[stage]);
          else
            add_release(ps.peer_released[stage], peer, lane);
        });
  }
  if (threadIdx.x == 0)  // the peer's releases of the stages this CTA owns
    wait_for_every_release(ps.peer_released, num_chunks, PC::kStateWarps,
                           [&](int stage) { return stage % PC::kCtas == rank; });
  // No CTA leaves while the other may still copy into its shared memory or arrive on its barriers.
  cluster_sync();
#endif  // __CUDA_ARCH__ >= 900
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Host: schedule choice and launch
// ---------------------------------------------------------------------------------------------------
namespace {

template <int kStateWarps>
void launch_single_cta(const ForwardParams& params, cudaStream_t stream) {
  using R = Roles<kStateWarps>;
  const int64_t blocks = params.num_sequences * params.heads * R::kValueParts;
  FLASH_KDA_INTERNAL_CHECK(blocks <= 0x7fffffff, "grid of ", blocks, " blocks exceeds the launch limit");
  kda_forward_kernel<kStateWarps>
      <<<static_cast<unsigned>(blocks), R::kThreads, dynamic_smem_bytes<SharedStorage>(), stream>>>(params);
  check_cuda(cudaGetLastError(), "launch of kda_forward_kernel");
}

// A launch of `blocks` CTAs of `threads` in clusters of `cluster_ctas`; `attribute` must outlive the launch.
cudaLaunchConfig_t cluster_launch_config(int64_t blocks, int cluster_ctas, int threads, size_t smem_bytes,
                                         cudaStream_t stream, cudaLaunchAttribute* attribute) {
  attribute->id = cudaLaunchAttributeClusterDimension;
  attribute->val.clusterDim.x = static_cast<unsigned>(cluster_ctas);
  attribute->val.clusterDim.y = 1;
  attribute->val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = 1;
  return config;
}

template <class Kernel>
void allow_dynamic_shared_memory(Kernel kernel, size_t bytes, const char* name) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)), name);
}

// One (sequence, head) pair per cluster of `cluster_ctas` CTAs.
template <class Kernel>
void launch_clustered(Kernel kernel, const char* name, const ForwardParams& params, int cluster_ctas, int threads,
                      size_t smem_bytes, cudaStream_t stream) {
  const int64_t blocks = params.num_sequences * params.heads * cluster_ctas;
  FLASH_KDA_INTERNAL_CHECK(blocks <= 0x7fffffff, "grid of ", blocks, " blocks exceeds the launch limit");
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config =
      cluster_launch_config(blocks, cluster_ctas, threads, smem_bytes, stream, &attribute);
  check_cuda(cudaLaunchKernelEx(&config, kernel, params), name);
}

// How many clusters of `kernel` run at once (the GPCs decide, not only the SM count); `what` names the query.
template <class Kernel>
int resident_clusters(Kernel kernel, const char* what, int cluster_ctas, int threads, size_t smem_bytes) {
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config =
      cluster_launch_config(cluster_ctas, cluster_ctas, threads, smem_bytes, nullptr, &attribute);
  int clusters = 0;
  check_cuda(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config), what);
  return clusters;
}

}  // namespace

DeviceLaunchFacts prepare_device(int multiprocessors) {
  allow_dynamic_shared_memory(kda_forward_kernel<8>, dynamic_smem_bytes<SharedStorage>(),
                              "cudaFuncSetAttribute(kda_forward_kernel<8>)");
  allow_dynamic_shared_memory(kda_forward_kernel<4>, dynamic_smem_bytes<SharedStorage>(),
                              "cudaFuncSetAttribute(kda_forward_kernel<4>)");
  allow_dynamic_shared_memory(kda_forward_pair_kernel, dynamic_smem_bytes<PairStorage>(),
                              "cudaFuncSetAttribute(kda_forward_pair_kernel)");
  allow_dynamic_shared_memory(kda_forward_cluster_kernel, kClusterSmemBytes,
                              "cudaFuncSetAttribute(kda_forward_cluster_kernel)");
  allow_dynamic_shared_memory(kda_forward_trio_kernel, kTrioSmemBytes, "cudaFuncSetAttribute(kda_forward_trio_kernel)");
  DeviceLaunchFacts facts;
  facts.multiprocessors = multiprocessors;
  facts.resident_clusters =
      resident_clusters(kda_forward_cluster_kernel, "cudaOccupancyMaxActiveClusters(kda_forward_cluster_kernel)",
                        ClusterConfig::kCtas, ClusterConfig::kThreads, kClusterSmemBytes);
  facts.resident_trios =
      resident_clusters(kda_forward_trio_kernel, "cudaOccupancyMaxActiveClusters(kda_forward_trio_kernel)",
                        TrioConfig::kCtas, TrioConfig::kThreads, kTrioSmemBytes);
  return facts;
}

Schedule parse_schedule(const char* name) {
  if (name == nullptr || *name == '\0' || std::strcmp(name, "auto") == 0) return Schedule::kAuto;
  if (std::strcmp(name, "whole") == 0) return Schedule::kWhole;
  if (std::strcmp(name, "split") == 0) return Schedule::kSplitValues;
  if (std::strcmp(name, "cluster") == 0) return Schedule::kCluster;
  if (std::strcmp(name, "pair") == 0) return Schedule::kPair;
  if (std::strcmp(name, "trio") == 0) return Schedule::kTrio;
  FLASH_KDA_CHECK(false, "FLASH_KDA_SM90_SCHEDULE: expected one of auto, whole, split, pair, trio, cluster, got '",
                  name, "'");
  return Schedule::kAuto;
}

Schedule choose_schedule(int64_t pairs, const DeviceLaunchFacts& facts) {
  // One CTA per SM (about 200 KB of shared memory each). Few pairs: the cluster kernel, when all of its
  // clusters run at once, else the trio kernel when all of its clusters do; else split the value rows over
  // two CTAs when that still fits in one wave, as a cluster of 2 (`pair`: faster than `split` on every case
  // measured; `trio` faster than `pair`, `cluster` than `trio`: docs/kernel_sm90.md).
  if (pairs <= facts.resident_clusters) return Schedule::kCluster;
  if (pairs <= facts.resident_trios) return Schedule::kTrio;
  if (2 * pairs <= facts.multiprocessors) return Schedule::kPair;
  return Schedule::kWhole;
}

void launch_forward(const ForwardParams& params, cudaStream_t stream, const DeviceLaunchFacts& facts) {
  const int64_t pairs = params.num_sequences * params.heads;
  if (pairs == 0) return;
  Schedule schedule = parse_schedule(std::getenv("FLASH_KDA_SM90_SCHEDULE"));
  if (schedule == Schedule::kAuto) schedule = choose_schedule(pairs, facts);
  switch (schedule) {
    case Schedule::kCluster:
      launch_clustered(kda_forward_cluster_kernel, "launch of kda_forward_cluster_kernel", params, ClusterConfig::kCtas,
                       ClusterConfig::kThreads, kClusterSmemBytes, stream);
      break;
    case Schedule::kSplitValues:
      launch_single_cta<4>(params, stream);
      break;
    case Schedule::kTrio:
      launch_clustered(kda_forward_trio_kernel, "launch of kda_forward_trio_kernel", params, TrioConfig::kCtas,
                       TrioConfig::kThreads, kTrioSmemBytes, stream);
      break;
    case Schedule::kPair:
      launch_clustered(kda_forward_pair_kernel, "launch of kda_forward_pair_kernel", params, PairConfig::kCtas,
                       PairConfig::kThreads, dynamic_smem_bytes<PairStorage>(), stream);
      break;
    default:
      launch_single_cta<8>(params, stream);
      break;
  }
}

}  // namespace flash_kda::cuda::sm90
