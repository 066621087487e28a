// Where the single-CTA kernel's warps are in their CTA's chunks (kda_forward_sm90.cu, v57): plain arithmetic, host and
// device, in a header so that the C++ tests check the chunks' placement without a GPU
// (tests/cpp/test_single_cta_progress.cpp).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FLASH_KDA_HOST_DEVICE __host__ __device__
#else
#define FLASH_KDA_HOST_DEVICE
#endif

namespace flash_kda::cuda::sm90 {

// The single-CTA kernel's producer warps and stages: one stage more than producers, so that a producer may start a
// chunk while the state warps still work on the chunk that its own previous one follows by 8. The CTA's n-th chunk
// (counted across its pairs) goes to stage n mod 9 in round n / 9, and to producer warp n mod 8.
inline constexpr int kSingleCtaProducers = 8;
inline constexpr int kSingleCtaStages = kSingleCtaProducers + 1;

// Where a warp is in its CTA's work, in one register (two counters spilled the producers): bits 0–6 count the CTA's
// chunks before the current pair mod 72, so that chunk c of the pair is the CTA's chunk (that count + c), whose
// producer warp needs it mod 8 and whose stage and phase parity mod 18 (72 = lcm(8, 2 · 9)); bits 7 up count the
// queue entries read before the current one (the queue needs them mod 2·kEntries, and they may wrap).
struct CtaProgress {
  static constexpr uint32_t kCycle = 72;
  static constexpr uint32_t kStageCycle = 2 * kSingleCtaStages;
  uint32_t bits = 0;
  FLASH_KDA_HOST_DEVICE uint32_t entry() const { return bits >> 7; }
  FLASH_KDA_HOST_DEVICE uint32_t base() const { return bits & 127; }
  // The pair's first chunk that producer warp `prep_warp` prepares.
  FLASH_KDA_HOST_DEVICE int64_t first_chunk_of_producer(int prep_warp) const {
    return (static_cast<uint32_t>(prep_warp) - base()) % kSingleCtaProducers;
  }
  // Chunk c's place as (the CTA's chunk mod 18): its stage is that mod 9, its round's parity whether it is ≥ 9. A
  // sequence has fewer than 2^31 chunks, so the 32-bit sum does not wrap.
  FLASH_KDA_HOST_DEVICE uint32_t stage_cycle(int64_t chunk) const {
    return (base() + static_cast<uint32_t>(chunk)) % kStageCycle;
  }
  FLASH_KDA_HOST_DEVICE void next_pair(int64_t num_chunks) {
    bits = (bits & ~127u) + 128 + (base() + static_cast<uint32_t>(num_chunks % kCycle)) % kCycle;
  }
};
static_assert(CtaProgress::kCycle % kSingleCtaProducers == 0 && CtaProgress::kCycle % CtaProgress::kStageCycle == 0 &&
                  CtaProgress::kCycle < 128,
              "CtaProgress's cycle holds whole rounds of producers and of the stages' two parities, in bits 0–6");
FLASH_KDA_HOST_DEVICE inline int stage_of(uint32_t cycle) { return static_cast<int>(cycle % kSingleCtaStages); }
FLASH_KDA_HOST_DEVICE inline uint32_t parity_of(uint32_t cycle) { return cycle >= kSingleCtaStages ? 1u : 0u; }

}  // namespace flash_kda::cuda::sm90
