// The single-CTA kernel's chunk placement (src/cuda/sm90/single_cta_progress.hpp), on the CPU: over a CTA's run of
// pairs, every chunk of every pair is prepared by exactly one producer warp, the CTA's n-th chunk by warp n mod 8 in
// stage n mod 9 with round parity (n / 9) mod 2, and the queue entry advances by one per pair, also where the
// register wraps. The GPU suite checks that the kernel computes with this placement (tests/python/test_cuda_forward.py:
// persistent against one CTA per pair, bit for bit, and every schedule against the CPU reference).
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "cuda/sm90/single_cta_progress.hpp"

namespace {

using flash_kda::cuda::sm90::CtaProgress;
using flash_kda::cuda::sm90::kSingleCtaProducers;
using flash_kda::cuda::sm90::kSingleCtaStages;
using flash_kda::cuda::sm90::parity_of;
using flash_kda::cuda::sm90::stage_of;

// Runs one CTA's pairs of `chunks_per_pair` chunks as the kernel's producers and state warps walk them.
void check_placement(const std::vector<int64_t>& chunks_per_pair) {
  CtaProgress at;
  int64_t cta_chunks = 0;  // the CTA's chunks before the current pair, uncounted by any modulus
  uint32_t pairs = 0;
  for (const int64_t num_chunks : chunks_per_pair) {
    ASSERT_EQ(at.entry(), pairs);
    std::vector<int> producer_of(static_cast<size_t>(num_chunks), -1);
    for (int warp = 0; warp < kSingleCtaProducers; ++warp)
      for (int64_t chunk = at.first_chunk_of_producer(warp); chunk < num_chunks; chunk += kSingleCtaProducers) {
        ASSERT_GE(chunk, 0);
        ASSERT_EQ(producer_of[static_cast<size_t>(chunk)], -1) << "chunk " << chunk << " prepared twice";
        producer_of[static_cast<size_t>(chunk)] = warp;
      }
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      const int64_t n = cta_chunks + chunk;
      const uint32_t cycle = at.stage_cycle(chunk);
      ASSERT_EQ(producer_of[static_cast<size_t>(chunk)], n % kSingleCtaProducers) << "CTA chunk " << n;
      ASSERT_EQ(stage_of(cycle), n % kSingleCtaStages) << "CTA chunk " << n;
      ASSERT_EQ(parity_of(cycle), static_cast<uint32_t>((n / kSingleCtaStages) % 2)) << "CTA chunk " << n;
    }
    at.next_pair(num_chunks);
    cta_chunks += num_chunks;
    ++pairs;
  }
}

TEST(SingleCtaProgress, PlacesEveryChunkOnceAcrossPairsOfAnyLength) {
  // Lengths around the producer count, the stage count, their cycles (18, 72) and large ones, in several orders.
  check_placement({1, 2, 3, 5, 7, 8, 9, 10, 16, 17, 18, 19, 35, 71, 72, 73, 144, 513});
  check_placement({513, 73, 0, 9, 0, 8, 1, 17, 71, 4096});
  check_placement(std::vector<int64_t>(40, 7));
  check_placement(std::vector<int64_t>(40, 9));
  check_placement({int64_t{1} << 20, 5, (int64_t{1} << 20) + 3, 11});  // chunk counts far beyond the cycle
}

TEST(SingleCtaProgress, EmptyPairsMoveOnlyTheQueue) {
  CtaProgress at;
  at.next_pair(5);
  const uint32_t base = at.base();
  at.next_pair(0);
  at.next_pair(0);
  EXPECT_EQ(at.base(), base);
  EXPECT_EQ(at.entry(), 3u);
}

TEST(SingleCtaProgress, QueueEntryWrapsConsistently) {
  // The queue reads entries mod 2·kEntries = 8; after 2^25 pairs the register wraps, which must keep that and the
  // chunk count mod 72.
  CtaProgress at;
  int64_t cta_chunks = 0;
  const uint32_t pairs = (1u << 25) + 13;
  for (uint32_t pair = 0; pair < pairs; ++pair) {
    const int64_t num_chunks = pair % 23;
    at.next_pair(num_chunks);
    cta_chunks += num_chunks;
  }
  EXPECT_EQ(at.entry() % 8, pairs % 8);
  EXPECT_EQ(at.base(), static_cast<uint32_t>(cta_chunks % CtaProgress::kCycle));
}

}  // namespace
