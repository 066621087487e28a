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
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/sm90/forward_parts.cuh"
#include "cuda/sm90/single_cta_progress.hpp"

namespace flash_kda::cuda::sm90 {
namespace {

// ---------------------------------------------------------------------------------------------------
// Scheduling, single-CTA kernel: one or two CTAs per (sequence, head), each with its own 8 producer warps
// and 8 or 4 state warps (Roles). A launch index ("ticket") t names the pair t / kValueParts, longest sequence
// first, and its value part t % kValueParts.
//
// Persistent CTAs (v51): with a ticket counter in the workspace, the launch has at most one CTA per SM, and a CTA
// that finishes a pair takes the next ticket, so that its producers prepare the next pair's first chunks while its
// state warps finish the last ones: a new CTA per pair paid, each time, the preparation latency of its first chunk
// (one producer warp per chunk), the drain of its last, and the CTA's start, with the SM's other work stopped.
// Without a counter every CTA runs its own ticket (blockIdx.x) alone, one CTA per ticket. Measured (H200): −4–9% at
// TARGETS.md's cases with more pairs than SMs, about half of what that account predicted (docs/kernel_sm90.md, v51).
// ---------------------------------------------------------------------------------------------------

// The tickets a CTA runs, in order, as a ring of kEntries in shared memory: entry k (slot k mod kEntries) is the
// CTA's k-th ticket; a ticket ≥ the launch's count ends the CTA. Entry 0 is blockIdx.x. Producer warp 0 (the
// scheduler) takes entry k + 1 from the counter once it has prepared its chunks of entry k's pair: as late as that,
// so that the pairs are handed out in the order the CTAs come to need them (longest first, as a new CTA per pair
// took them), and early enough that the other warps rarely wait. Every thread reads every entry in order (the chunk
// counts place the next pair's chunks in the stages) and releases it with one arrival; the scheduler refills a
// slot once every thread has released it. (Each thread arrives, not one lane per warp after a __syncwarp:
// racecheck reports the latter as a race between the readers and the refill.)
template <int kThreads>
struct TicketQueue {
  static constexpr int kEntries = 4;
  uint32_t ticket[kEntries];
  uint32_t last_filled;      // the scheduler's own count (in shared memory: the producers have no register to spare)
  uint64_t full[kEntries];   // one arrival: the scheduler's write
  uint64_t empty[kEntries];  // one arrival per thread

  __device__ void init(uint32_t first_ticket) {  // one thread, before the CTA's first __syncthreads
    for (int i = 0; i < kEntries; ++i) {
      mbarrier_init(&full[i], 1);
      mbarrier_init(&empty[i], kThreads);
    }
    ticket[0] = first_ticket;
    last_filled = 0;
    mbarrier_arrive(&full[0]);
  }

  // Entry k (every thread of the CTA, in order).
  __device__ uint32_t take(uint32_t k) {
    const uint32_t slot = k % kEntries;
    mbarrier_wait(&full[slot], (k / kEntries) & 1);
    const uint32_t mine = ticket[slot];
    mbarrier_arrive(&empty[slot]);
    return mine;
  }

  // The next entry, by the scheduler's lane 0: the next ticket from `counter` (null: none; the CTA ends).
  __device__ void fill_next(uint32_t* counter, uint32_t tickets) {
    // The slot's previous entry (next − kEntries) must have been read by every thread: the phase before the one
    // this entry's readers complete, which a fresh barrier counts as complete.
    const uint32_t next = ++last_filled, slot = next % kEntries;
    mbarrier_wait(&empty[slot], ((next / kEntries) & 1) ^ 1);
    ticket[slot] = counter != nullptr ? atomicAdd(counter, 1u) + gridDim.x : tickets;
    mbarrier_arrive(&full[slot]);
  }
};

// The chunks' placement (CtaProgress, kSingleCtaStages: 9 stages for 8 producers, v57) is in single_cta_progress.hpp.
// The 8 KB of the ninth stage come from A_kk's scratch, which lives in each stage's KR here (a_kk_scratch_in_kr).
static_assert(kSingleCtaProducers == Config::kPrepWarps, "the single-CTA kernel's producers are the 8 producer warps");

template <int kStateWarps>
struct SingleCtaStorage {
  Stage stage[kSingleCtaStages];
  bf16 out_stage[Config::kMaxStateWarps][Config::kChunk][Config::kSmallStride];  // per-warp transpose of o
  uint64_t full[kSingleCtaStages];
  uint64_t empty[kSingleCtaStages];
  int32_t sequence_of_rank[kMaxOrderedSequences];
  TicketQueue<Roles<kStateWarps>::kThreads> queue;
};

template <int kStateWarps>
__global__ void __launch_bounds__(Roles<kStateWarps>::kThreads, 1)
    kda_forward_kernel(const __grid_constant__ ForwardParams p, uint32_t* ticket_counter) {
  using R = Roles<kStateWarps>;
  // The producers' pair loop needs 120 registers beside 4 state warps (104 and 112 spilled; `pair` keeps 104).
  constexpr int kPrepRegisters = kStateWarps == 8 ? R::kPrepRegisters : 120;
  static_assert(R::kStateRegisters * kStateWarps + kPrepRegisters * Config::kPrepWarps <=
                    R::kLaunchRegisters * (kStateWarps + Config::kPrepWarps),
                "the roles' registers fit in the block's allocation");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SingleCtaStorage<kStateWarps>& s = dynamic_shared_storage<SingleCtaStorage<kStateWarps>>(smem_raw);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const uint32_t tickets = static_cast<uint32_t>(p.num_sequences * p.heads * R::kValueParts);

  if (threadIdx.x == 0) {
    for (int i = 0; i < kSingleCtaStages; ++i) {
      mbarrier_init(&s.full[i], 32);
      mbarrier_init(&s.empty[i], R::kStateThreads);
    }
    s.queue.init(blockIdx.x);
  }
  rank_sequences_longest_first(p, s.sequence_of_rank, reinterpret_cast<int64_t*>(&s.stage[0]));
  __syncthreads();

  // The CTA's chunks are numbered across its pairs (CtaProgress): its n-th chunk goes to stage n mod 9 in round n / 9.
  if (warp >= R::kStateWarps) {
    // ==== Producers: warp w loads and prepares the CTA's chunks w, w + 8, w + 16, ..., each in its stage ====
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kPrepRegisters));
    const int prep_warp = warp - R::kStateWarps;
    for (CtaProgress at;;) {
      const uint32_t ticket = s.queue.take(at.entry());
      if (ticket >= tickets) break;
      const auto [seq, head, sb, num_chunks] =
          pair_work_longest_first(p, ticket / R::kValueParts, s.sequence_of_rank);
      const ChunkProducer producer(p, sb, head, lane);
      for (int64_t chunk = at.first_chunk_of_producer(prep_warp); chunk < num_chunks; chunk += Config::kPrepWarps) {
        // The state warps must be done with the stage's previous chunk (the CTA's chunk 9 earlier). Round r waits
        // for the phase of round r − 1, parity (r − 1) & 1; a fresh barrier counts its phase "−1" as complete. The
        // parity cannot alias: this warp's previous chunk (8 earlier) waited for the chunk 17 earlier, and the
        // state warps consume in order, so the stage is at most one phase behind.
        const uint32_t cycle = at.stage_cycle(chunk);
        const int stage = stage_of(cycle);
        mbarrier_wait(&s.empty[stage], parity_of(cycle) ^ 1);
        producer.template produce<true>(chunk, s.stage[stage], a_kk_scratch_in_kr(s.stage[stage]));
        // Written through the generic proxy, read by the state warps' wgmma through the async proxy.
        fence_proxy_async_shared();
        mbarrier_arrive(&s.full[stage]);
      }
      // (Taking the ticket beside the scheduler's last chunk of the pair, or prefetching the next pair's initial
      // state into L2 from here, measured no better: docs/kernel_sm90.md, v51.)
      if (prep_warp == 0 && lane == 0) s.queue.fill_next(ticket_counter, tickets);
      at.next_pair(num_chunks);
    }
    return;
  }

  // ==== State warps: the recurrence, chunk after chunk, pair after pair ====
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R::kStateRegisters));
  for (CtaProgress at;;) {
    const uint32_t ticket = s.queue.take(at.entry());
    if (ticket >= tickets) break;
    const auto [seq, head, sb, num_chunks] =
        pair_work_longest_first(p, ticket / R::kValueParts, s.sequence_of_rank);
    const int value_base = static_cast<int>(ticket % R::kValueParts) * R::kValueRows;
    StateWarp state(p, seq, head, sb, value_base + 16 * warp, lane);
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      const uint32_t cycle = at.stage_cycle(chunk);
      const int stage = stage_of(cycle);
      mbarrier_wait(&s.full[stage], parity_of(cycle));
      state.step(s.stage[stage], s.out_stage[warp], p, [&] { mbarrier_arrive(&s.empty[stage]); });
    }
    state.store_final(p);
    at.next_pair(num_chunks);
  }
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

// Load, ring-fed state warps: v by the state warps themselves (ValuePrefetchOf; the producers push only the tiles,
// kPushedTileBytes); 4 chunks in flight, ~2.5 µs at the state warps' pace, more than a DRAM round trip.
using ValuePrefetch = ValuePrefetchOf<Config::kChunk, 4>;

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
static_assert(sizeof(SingleCtaStorage<8>::stage) >= kMaxOrderedSequences * sizeof(int64_t),
              "the single-CTA kernel's stages hold the ranking's scratch");
static_assert(dynamic_smem_bytes<SingleCtaStorage<8>>() <= 227 * 1024,
              "shared memory per block on sm_90 is at most 227 KB");

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

// The single-CTA kernel's tickets (one per pair and value part), and whether they run in persistent CTAs: where
// they outnumber the SMs (one wave of CTAs is the same thing otherwise) unless FLASH_KDA_SM90_PERSISTENT (on, off; a
// knob for tests and benchmarks) says off. Persistent CTAs need a ticket counter, the launch's workspace.
template <int kStateWarps>
int64_t single_cta_tickets(const ForwardParams& params) {
  return params.num_sequences * params.heads * Roles<kStateWarps>::kValueParts;
}
bool single_cta_persistent(const ForwardParams& params, Schedule schedule, const DeviceLaunchFacts& facts) {
  if (schedule != Schedule::kWhole && schedule != Schedule::kSplitValues) return false;
  // Read wherever these two run, so that a bad value is an error whatever the number of pairs.
  const bool allowed = parse_knob("FLASH_KDA_SM90_PERSISTENT", {"on", "off"}) == 0;
  const int64_t tickets =
      schedule == Schedule::kSplitValues ? single_cta_tickets<4>(params) : single_cta_tickets<8>(params);
  return allowed && tickets > facts.multiprocessors;
}
constexpr size_t kTicketCounterBytes = 128;  // one 32-bit counter in a 128-byte granule

// `ticket_counter`: null, one CTA per ticket; else persistent CTAs, one per SM at most.
template <int kStateWarps>
void launch_single_cta(const ForwardParams& params, uint32_t* ticket_counter, int multiprocessors,
                       cudaStream_t stream) {
  using R = Roles<kStateWarps>;
  const int64_t tickets = single_cta_tickets<kStateWarps>(params);
  FLASH_KDA_INTERNAL_CHECK(tickets <= 0x7fffffff, "grid of ", tickets, " blocks exceeds the launch limit");
  int64_t blocks = tickets;
  if (ticket_counter != nullptr) {
    check_cuda(cudaMemsetAsync(ticket_counter, 0, sizeof(uint32_t), stream), "cudaMemsetAsync(ticket counter)");
    blocks = std::min<int64_t>(tickets, multiprocessors);
  }
  kda_forward_kernel<kStateWarps>
      <<<static_cast<unsigned>(blocks), R::kThreads, dynamic_smem_bytes<SingleCtaStorage<kStateWarps>>(), stream>>>(
          params, ticket_counter);
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
  allow_dynamic_shared_memory(kda_forward_kernel<8>, dynamic_smem_bytes<SingleCtaStorage<8>>(),
                              "cudaFuncSetAttribute(kda_forward_kernel<8>)");
  allow_dynamic_shared_memory(kda_forward_kernel<4>, dynamic_smem_bytes<SingleCtaStorage<4>>(),
                              "cudaFuncSetAttribute(kda_forward_kernel<4>)");
  allow_dynamic_shared_memory(kda_forward_pair_kernel, dynamic_smem_bytes<PairStorage>(),
                              "cudaFuncSetAttribute(kda_forward_pair_kernel)");
  allow_dynamic_shared_memory(kda_forward_cluster_kernel, kClusterSmemBytes,
                              "cudaFuncSetAttribute(kda_forward_cluster_kernel)");
  allow_dynamic_shared_memory(kda_forward_trio_kernel, kTrioSmemBytes, "cudaFuncSetAttribute(kda_forward_trio_kernel)");
  prepare_grid_kernel();
  DeviceLaunchFacts facts;
  facts.multiprocessors = multiprocessors;
  int device = 0, cooperative = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device),
             "cudaDeviceGetAttribute(cooperativeLaunch)");
  facts.cooperative_launch = cooperative != 0;
  facts.resident_clusters =
      resident_clusters(kda_forward_cluster_kernel, "cudaOccupancyMaxActiveClusters(kda_forward_cluster_kernel)",
                        ClusterConfig::kCtas, ClusterConfig::kThreads, kClusterSmemBytes);
  facts.resident_trios =
      resident_clusters(kda_forward_trio_kernel, "cudaOccupancyMaxActiveClusters(kda_forward_trio_kernel)",
                        TrioConfig::kCtas, TrioConfig::kThreads, kTrioSmemBytes);
  return facts;
}

int parse_knob(const char* knob, std::initializer_list<const char*> names) {
  const char* value = std::getenv(knob);
  if (value == nullptr || *value == '\0') return 0;
  int index = 0;
  for (const char* name : names) {
    if (std::strcmp(value, name) == 0) return index;
    ++index;
  }
  std::string expected;
  for (const char* name : names) expected += (expected.empty() ? "" : ", ") + std::string(name);
  FLASH_KDA_CHECK(false, knob, ": expected one of ", expected, ", got '", value, "'");
  return 0;
}

Schedule parse_schedule() {
  constexpr Schedule kNamed[] = {Schedule::kAuto, Schedule::kWhole,   Schedule::kSplitValues, Schedule::kPair,
                                 Schedule::kTrio, Schedule::kCluster, Schedule::kGrid};
  return kNamed[parse_knob("FLASH_KDA_SM90_SCHEDULE", {"auto", "whole", "split", "pair", "trio", "cluster", "grid"})];
}

Schedule resolve_schedule(const ForwardParams& params, const DeviceLaunchFacts& facts, size_t workspace_bytes) {
  const Schedule forced = parse_schedule();
  if (forced != Schedule::kAuto) return forced;  // a forced grid reports a missing workspace (launch_grid)
  const Schedule chosen = choose_schedule(params, facts);
  // auto's grid needs its workspace; without it (a caller that skipped cuda_forward_workspace_bytes), the 16-token
  // choice computes the result as accurately, slower (other bits: grid rounds differently).
  const int64_t pairs = params.num_sequences * params.heads;
  if (chosen == Schedule::kGrid && workspace_bytes < grid_workspace_bytes(pairs))
    return choose_schedule_16(pairs, facts);
  return chosen;
}

size_t forward_workspace_bytes(const ForwardParams& params, const DeviceLaunchFacts& facts) {
  const int64_t pairs = params.num_sequences * params.heads;
  if (pairs == 0) return 0;
  const Schedule schedule = resolve_schedule(params, facts, SIZE_MAX);
  if (schedule == Schedule::kGrid) return grid_workspace_bytes(pairs);
  return single_cta_persistent(params, schedule, facts) ? kTicketCounterBytes : 0;
}

void launch_forward(const ForwardParams& params, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                    const DeviceLaunchFacts& facts) {
  const int64_t pairs = params.num_sequences * params.heads;
  if (pairs == 0) return;
  const Schedule schedule = resolve_schedule(params, facts, workspace != nullptr ? workspace_bytes : 0);
  switch (schedule) {
    case Schedule::kGrid:
      launch_grid(params, workspace, workspace_bytes, stream, facts);
      break;
    case Schedule::kCluster:
      launch_clustered(kda_forward_cluster_kernel, "launch of kda_forward_cluster_kernel", params, ClusterConfig::kCtas,
                       ClusterConfig::kThreads, kClusterSmemBytes, stream);
      break;
    case Schedule::kTrio:
      launch_clustered(kda_forward_trio_kernel, "launch of kda_forward_trio_kernel", params, TrioConfig::kCtas,
                       TrioConfig::kThreads, kTrioSmemBytes, stream);
      break;
    case Schedule::kPair:
      launch_clustered(kda_forward_pair_kernel, "launch of kda_forward_pair_kernel", params, PairConfig::kCtas,
                       PairConfig::kThreads, dynamic_smem_bytes<PairStorage>(), stream);
      break;
    default: {
      // whole or split; without the workspace (a caller that skipped cuda_forward_workspace_bytes) one CTA per
      // ticket, the same bits.
      uint32_t* ticket_counter = single_cta_persistent(params, schedule, facts) && workspace != nullptr &&
                                         workspace_bytes >= kTicketCounterBytes
                                     ? static_cast<uint32_t*>(workspace)
                                     : nullptr;
      if (schedule == Schedule::kSplitValues)
        launch_single_cta<4>(params, ticket_counter, facts.multiprocessors, stream);
      else
        launch_single_cta<8>(params, ticket_counter, facts.multiprocessors, stream);
      break;
    }
  }
}

}  // namespace flash_kda::cuda::sm90
