// The parts every sm_90a forward kernel shares (kda_forward_sm90.cu: the 16-token schedules; kda_forward_sm90_grid.cu:
// the 32-token `grid` schedule): PTX primitives, the operand layouts, the chunk loader, preparer and producer, and
// the state warp. Device code in an unnamed namespace: each kernel file compiles its own copy.
// The math and the conventions are described at the top of kda_forward_sm90.cu and in docs/kernel_sm90.md.
#pragma once

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
  static constexpr int kStages = kPrepWarps;  // `pair`'s stages: stage s holds chunks s, s + 8, ... (the single-CTA
                                              // kernel has one more, kSingleCtaStages)
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
// A cross-CTA hand-over wait (cluster, pair, trio and grid kernels) that lasts this long is a bug (no chunk takes
// more than microseconds): trap, so that the launch fails with an error instead of hanging the GPU. (The
// single-CTA kernels' waits go without: their producer warps have no registers to spare for the timer.)
// 60 s, not 10: under compute-sanitizer's racecheck a tiny `trio` launch took 0.3-7 s, and 3 of 15 serial runs ran
// past 10 s and trapped (H200, session 24; 40 000 launches without a sanitizer never did).
constexpr uint64_t kHangTrapNanoseconds = 60'000'000'000ull;

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
// 16 × 16 matrices (A_qk: B[s][t] = M[t][s], K-major; T' transposed, since v55) in wgmma's non-swizzled core-matrix
// layout: 8 × 8 blocks of 128 contiguous bytes (one 16-byte row per t), blocks along s 128 bytes apart (LBO), along t
// 256 bytes apart (SBO).
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
  bf16 t_scaled[Config::kChunk * Config::kChunk];          // T'ᵀ (T' = (I + A_kk)^-1 diag(b)), core_matrix_offset
  bf16 a_qk[Config::kChunk * Config::kChunk];              // core_matrix_offset
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
// A_kkᵀ's fp32 scratch (1 KB) over the stage's KR, dead once A_kk's product has read it: where a single warp prepares
// the stage (ChunkProducer::produce<true>), so that no other warp still reads KR (v57: the single-CTA kernel's
// ninth stage needs the 8 KB).
static_assert(sizeof(Stage::kr) >= sizeof(float[Config::kChunk][Config::kChunk]),
              "A_kk's scratch fits in KR");
static_assert((offsetof(PreparedChunk, v) + sizeof(PreparedChunk::v)) % 16 == 0,
              "KR, which follows v (above), is 16-byte aligned for the scratch's float4 column loads");
__device__ __forceinline__ float (&a_kk_scratch_in_kr(Stage& st))[Config::kChunk][Config::kChunk] {
  return *reinterpret_cast<float(*)[Config::kChunk][Config::kChunk]>(&st.kr[0][0]);
}

// Shared memory of a `pair` CTA: stage s holds chunks s, s + 8, ..., prepared in place by the CTA that owns it
// (s mod 2), which copies it into the other CTA's stage s; each CTA's state warps read their own. (The single-CTA
// kernel lays out its own, SingleCtaStorage.)
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
  // below 144. Since v51 the single-CTA kernel gives `split`'s producers 120: its pair loop spilled at 104 and 112.)
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

// The same, longest sequence first (the single-CTA kernel, which runs its pairs in several waves of CTAs, or in
// persistent CTAs that take the next pair as they finish one: the work handed out last sets the end, so a varlen
// batch takes its sequences by decreasing length (ties by index) and a long sequence never starts last). (Mixed
// H = 64 of the benchmark: 352 → 261 chunk steps on the busiest SM in a greedy simulation of 132 SMs.) Larger
// batches keep their order: ranking them would cost more than their short sequences lose in the tail.
constexpr int kMaxOrderedSequences = 256;
__device__ __forceinline__ bool sequences_ranked(const ForwardParams& p) {
  return p.cu_seqlens != nullptr && p.num_sequences > 1 && p.num_sequences <= kMaxOrderedSequences;
}
// The ranking, once per CTA: sequence_of_rank[r] is the r-th longest sequence, for r < min(N, kMaxOrderedSequences)
// (the identity where sequences_ranked does not hold). Every thread of the CTA must call it (it synchronises the
// CTA); `length_scratch` is shared memory for kMaxOrderedSequences values that nothing else uses yet.
__device__ void rank_sequences_longest_first(const ForwardParams& p, int32_t (&sequence_of_rank)[kMaxOrderedSequences],
                                             int64_t* length_scratch) {
  const int sequences = static_cast<int>(min(p.num_sequences, int64_t{kMaxOrderedSequences}));
  if (!sequences_ranked(p)) {
    for (int i = threadIdx.x; i < sequences; i += blockDim.x) sequence_of_rank[i] = i;
    return;  // the caller synchronises before the first use
  }
  for (int i = threadIdx.x; i < sequences; i += blockDim.x) length_scratch[i] = sequence_bounds(p, i).length;
  __syncthreads();
  // The ranks are a permutation of [0, sequences).
  for (int i = threadIdx.x; i < sequences; i += blockDim.x) {
    int rank = 0;
    for (int j = 0; j < sequences; ++j)
      rank += length_scratch[j] > length_scratch[i] || (length_scratch[j] == length_scratch[i] && j < i);
    sequence_of_rank[rank] = i;
  }
  __syncthreads();  // everyone has read the scratch before it gets its real use
}
// The pair of launch index `index` (< 2^31, the launch limit: 32-bit division), after the ranking (the caller has
// synchronised since).
__device__ __forceinline__ PairWork pair_work_longest_first(const ForwardParams& p, uint32_t index,
                                                            const int32_t (&sequence_of_rank)[kMaxOrderedSequences]) {
  const uint32_t heads = static_cast<uint32_t>(p.heads);
  const uint32_t rank = index / heads;
  return pair_work(p, rank < kMaxOrderedSequences ? sequence_of_rank[rank] : rank, static_cast<int>(index % heads));
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

// beta's logit of `token` as its raw bf16 bits (0 past the sequence): the 16-token producers convert them where the
// norms use them, so that the warp does not stall at the conversion with its chunk's copies in flight (v48, kept
// with v54: the profile of session 29 had 7% of whole's producer samples there).
__device__ __forceinline__ uint32_t load_beta_bits(const ForwardParams& p, const SequenceBounds& sb, int head,
                                                   int64_t token) {
  if (token >= sb.length) return 0u;
  const uint16_t* beta = static_cast<const uint16_t*>(p.beta.data);
  return beta[token_offset(p.beta, sb, token, head)];
}
__device__ __forceinline__ float beta_from_bits(uint32_t bits) { return __uint_as_float(bits << 16); }
__device__ __forceinline__ float load_beta(const ForwardParams& p, const SequenceBounds& sb, int head, int64_t token) {
  return beta_from_bits(load_beta_bits(p, sb, head, token));
}

// Load, ring-fed state warps (`trio`, `cluster`, `pair`, `grid`): a state warp copies its own 16 value columns of v
// for the chunk kLookahead ahead straight from global memory into that chunk's ring slot (per lane and 16-token
// block of the chunk one 16-byte cp.async: token 16·block + lane / 2, columns row0 + 8·(lane % 2); rows past the
// sequence zero-filled), and waits for the current chunk's copy before its step. So v never crosses between SMs,
// and since no other warp reads these columns, the warp's own cp.async groups order everything: the slot's
// previous chunk is one this warp has already run.
template <int kChunkTokens, int kLookaheadChunks>
struct ValuePrefetchOf {
  static constexpr int kLookahead = kLookaheadChunks;
  static constexpr int kBlocks = kChunkTokens / 16;
  static_assert(kChunkTokens % 16 == 0, "whole 16-token blocks: two lanes per token row of 16 columns");
  const bf16* first_row;  // the sequence's first token, this lane's columns (the address of zero-filled rows)
  const bf16* src;        // this lane's row of the next chunk to issue
  int64_t chunk_stride, block_stride;
  int64_t tokens_left;  // of the sequence, from the next chunk to issue on
  int row, column;      // this lane's token in a block, and its first value column

  __device__ ValuePrefetchOf(const ForwardParams& p, const SequenceBounds& sb, int head, int row0, int lane)
      : first_row(static_cast<const bf16*>(p.v.data) + token_offset(p.v, sb, 0, head) + row0 + 8 * (lane % 2)),
        src(first_row + (lane / 2) * p.v.token_stride),
        chunk_stride(kChunkTokens * p.v.token_stride),
        block_stride(16 * p.v.token_stride),
        tokens_left(sb.length),
        row(lane / 2),
        column(row0 + 8 * (lane % 2)) {}

  // The next chunk's copy into `slot`, as one commit group (an empty one past the last chunk).
  template <class Slot>
  __device__ __forceinline__ void issue(Slot& slot) {
    if (tokens_left > 0) {
#pragma unroll
      for (int blk = 0; blk < kBlocks; ++blk) {
        const bool valid = row + 16 * blk < tokens_left;
        copy_16_bytes_async_or_zero(shared_address(&slot.v[row + 16 * blk][column]),
                                    valid ? src + blk * block_stride : first_row, valid);
      }
    }
    cute::cp_async_fence();
    src += chunk_stride;
    tokens_left -= kChunkTokens;
  }
  // The current chunk's copy has landed and is visible to the whole warp.
  __device__ __forceinline__ static void wait_for_current() {
    cute::cp_async_wait<kLookahead - 1>();
    __syncwarp();
  }
};

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

  // Σ x² over the 64 channels of `half` of row `row` of the kq tile (its 8 segments from first_unit on): of a
  // 16-token Stage here, of the 32-token GridChunkTiles in the grid kernel (the same swizzled rows).
  // first_unit: the 16-byte unit the sum starts at (then in turn, mod 8); lanes that read rows of both halves at
  // once start them 4 apart, so that they read distinct banks (grid: 2-way conflicts otherwise, ncu session 21).
  template <class Tiles>
  __device__ static float half_row_sum_of_squares(const Tiles& st, int row, int half, int first_unit = 0) {
    float partial[4] = {};
    const bf16* row_start = &st.kq[half][row][0];
    const int swizzle = recomputed_here(row % 8);
#pragma unroll
    for (int c = 0; c < kHalfChannels / 8; ++c) {
      const int unit = (c + first_unit) % (kHalfChannels / 8);
      const uint4 raw = *reinterpret_cast<const uint4*>(row_start + ((unit ^ swizzle) * 8));
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
          const float k_down = k2[c] * down;  // shared by KR and KU: one multiplication fewer (v54)
          kr[c] = k_down * kn;
          ku[c] = k_down * decay_end[c];
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

// Column j of T = (I + A)^-1 for a strictly lower 16 × 16 A given transposed (a_kk_t[m] is A's column m), by forward
// substitution in fp32, one column per lane. Right-looking: once t_m is final it updates every later row at once, so
// the dependent chain is 15 FMAs long instead of 120, and the column loads of A are independent of the running values.
// `j` must vary by lane in a way the compiler cannot see through (recomputed_here), or the 16 initial 0/1 values are
// hoisted out of the caller's chunk loop. Shared by the 16-token producers and the grid's (one 16-token block each).
__device__ __forceinline__ void solve_unit_column(const float (&a_kk_t)[Config::kChunk][Config::kChunk], int j,
                                                  float (&column)[Config::kChunk]) {
#pragma unroll
  for (int i = 0; i < Config::kChunk; ++i) column[i] = i == j ? 1.f : 0.f;
#pragma unroll
  for (int m = 0; m < Config::kChunk - 1; ++m) {
    float a_col[Config::kChunk];  // A[·][m]
#pragma unroll
    for (int i4 = 0; i4 < Config::kChunk / 4; ++i4)
      *reinterpret_cast<float4*>(&a_col[4 * i4]) = *reinterpret_cast<const float4*>(&a_kk_t[m][4 * i4]);
#pragma unroll
    for (int i = m + 1; i < Config::kChunk; ++i) column[i] -= a_col[i] * column[m];
  }
}

// kScratchInKr: a_kk_t overlays the stage's KR, which the product has just read (the single-CTA kernel, v57).
template <bool kScratchInKr = false>
__device__ __forceinline__ void build_a_kk_and_t(Stage& st, float (&a_kk_t)[16][16], int lane) {
  float kk_acc[2][4] = {};
  product_with_kr(st, PreparedChunk::kKgRow, lane, kk_acc);
  if constexpr (kScratchInKr) __syncwarp();  // every lane's reads of KR before any lane's writes over it
  for_each_element(kk_acc, lane, [&](int i, int j, float x) {  // select, as in build_a_qk
    a_kk_t[j][i] = j < i ? st.b[i] * st.k_rnorm[i] * x : 0.f;
  });
  __syncwarp();
  // T = (I + A_kk)^-1: lane j solves column j.
  if (lane < Config::kChunk) {
    const int j = recomputed_here(lane);
    float column[Config::kChunk];
    solve_unit_column(a_kk_t, j, column);
    // Stored transposed (v55): lane j's column of T' is row j of T'ᵀ, two 16-byte core-matrix rows, where storing T'
    // itself took 16 scattered 2-byte stores. The state warps read it with ldmatrix.trans.
    const float bj = st.b[j];
    uint32_t packed[Config::kChunk / 2];
#pragma unroll
    for (int i2 = 0; i2 < Config::kChunk / 2; ++i2)
      packed[i2] = pack_bf16x2(column[2 * i2] * bj, column[2 * i2 + 1] * bj);
#pragma unroll
    for (int half = 0; half < 2; ++half)
      *reinterpret_cast<uint4*>(&st.t_scaled[core_matrix_offset(j, 8 * half)]) =
          make_uint4(packed[4 * half], packed[4 * half + 1], packed[4 * half + 2], packed[4 * half + 3]);
  }
}

template <bool kScratchInKr = false>
__device__ __forceinline__ void build_intra_chunk_matrices(Stage& st, float (&a_kk_t)[16][16], int lane) {
  build_a_qk(st, lane);
  build_a_kk_and_t<kScratchInKr>(st, a_kk_t, lane);
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
  template <bool kScratchInKr = false>
  __device__ void produce(int64_t chunk, Stage& st, float (&a_kk_t)[Config::kChunk][Config::kChunk]) const {
    loader.load(chunk, sb.length, st);
    const uint32_t beta_bits = lane < Config::kChunk ? load_beta_bits(p, sb, head, chunk * Config::kChunk + lane) : 0u;
    cute::cp_async_wait<0>();
    __syncwarp();
    const int valid = rows_in_sequence(sb, chunk);
    preparer.norms_and_beta(st, valid, beta_from_bits(beta_bits));
    __syncwarp();
    preparer.gate_and_tiles(st, valid);
    __syncwarp();
    build_intra_chunk_matrices<kScratchInKr>(st, a_kk_t, lane);
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
    const uint32_t beta_bits = half == 0 ? load_beta_bits(p, sb, head, chunk * Config::kChunk + lane / 2) : 0u;
    cute::cp_async_wait<0>();
    team_sync(team_barrier);
    const int valid = rows_in_sequence(sb, chunk);
    preparer.norms_and_beta_half(st, valid, half, beta_from_bits(beta_bits));
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
      // T'ᵀ by ldmatrix.trans: the same fragments as ldmatrix gives of T', with the second and third 8 × 8 blocks
      // exchanged (block (t, s) of T'ᵀ is block (s, t) of T').
      uint32_t b[4];
      ldsm_trans(&cur.t_scaled[core_matrix_b_frag_offset(lane)], b);
      mma(vp[0], d_frag, b[0], b[2]);
      mma(vp[1], d_frag, b[1], b[3]);
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

}  // namespace
}  // namespace flash_kda::cuda::sm90
