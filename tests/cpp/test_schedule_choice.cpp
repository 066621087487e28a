// kAuto's schedule choice (src/cuda/sm90/schedule_choice.hpp), on the CPU: the grid's bounds (SMs per pair by tokens
// per sequence, cooperative launch), varlen averaging, the grid's state teams, and the 16-token order. The
// GPU suite checks that the launch runs what this rule picks (tests/python/test_cuda_forward.py,
// test_auto_takes_grid_for_few_long_sequences).
#include <gtest/gtest.h>

#include <cstdint>

#include "cuda/sm90/schedule_choice.hpp"

namespace {

using flash_kda::cuda::ForwardParams;
using flash_kda::cuda::sm90::choose_schedule;
using flash_kda::cuda::sm90::choose_schedule_16;
using flash_kda::cuda::sm90::DeviceLaunchFacts;
using flash_kda::cuda::sm90::Schedule;

// An H100 SXM / H200 with made-up residency limits that keep the 16-token choices apart: 16 clusters of 4, 33 of 3.
constexpr DeviceLaunchFacts kHopper132{132, 16, 33, true};

ForwardParams fixed(int64_t batch, int64_t tokens, int32_t heads) {
  ForwardParams p;
  p.num_sequences = batch;
  p.tokens = tokens;
  p.heads = heads;
  return p;
}

ForwardParams varlen(int64_t sequences, int64_t total_tokens, int32_t heads) {
  static const int64_t kSomeOffsets[1] = {0};  // only its presence matters to the choice
  ForwardParams p = fixed(sequences, total_tokens, heads);
  p.cu_seqlens = kSomeOffsets;
  return p;
}

TEST(ScheduleChoice, GridFromOneThousandTokensPerSequence) {
  // 1024 tokens: 5.5 SMs per pair, 24 pairs on 132 SMs.
  EXPECT_EQ(choose_schedule(fixed(1, 1024, 1), kHopper132), Schedule::kGrid);
  EXPECT_EQ(choose_schedule(fixed(1, 1024, 4), kHopper132), Schedule::kGrid);
  EXPECT_EQ(choose_schedule(fixed(1, 1023, 4), kHopper132), Schedule::kCluster);
  EXPECT_EQ(choose_schedule(fixed(1, 1024, 24), kHopper132), Schedule::kGrid);
  EXPECT_EQ(choose_schedule(fixed(1, 1024, 25), kHopper132), Schedule::kTrio);
  EXPECT_EQ(choose_schedule(fixed(1, 1535, 25), kHopper132), Schedule::kTrio);
  // 1536 tokens: 4.1, 32 pairs.
  EXPECT_EQ(choose_schedule(fixed(1, 1536, 25), kHopper132), Schedule::kGrid);
  EXPECT_EQ(choose_schedule(fixed(1, 1536, 32), kHopper132), Schedule::kGrid);
  EXPECT_EQ(choose_schedule(fixed(1, 1536, 33), kHopper132), Schedule::kTrio);
  EXPECT_EQ(choose_schedule(fixed(1, 2047, 33), kHopper132), Schedule::kTrio);
}

TEST(ScheduleChoice, LongerSequencesTakeGridWithFewerSmsPerPair) {
  // 2048 tokens: 3.8 SMs per pair, 34 pairs on 132 SMs.
  EXPECT_EQ(choose_schedule(fixed(1, 2048, 33), kHopper132), Schedule::kGrid);
  EXPECT_EQ(choose_schedule(fixed(1, 2048, 34), kHopper132), Schedule::kGrid);
  EXPECT_EQ(choose_schedule(fixed(1, 2048, 35), kHopper132), Schedule::kPair);
  EXPECT_EQ(choose_schedule(fixed(1, 4095, 35), kHopper132), Schedule::kPair);
  // 4096 tokens: 3.3, 40 pairs.
  EXPECT_EQ(choose_schedule(fixed(1, 4096, 35), kHopper132), Schedule::kGrid);
  EXPECT_EQ(choose_schedule(fixed(1, 4096, 40), kHopper132), Schedule::kGrid);
  EXPECT_EQ(choose_schedule(fixed(1, 4096, 41), kHopper132), Schedule::kPair);
  EXPECT_EQ(choose_schedule(fixed(1, 8191, 41), kHopper132), Schedule::kPair);
  // 8192 tokens and more: 3.0, 44 pairs; never above.
  EXPECT_EQ(choose_schedule(fixed(1, 8192, 41), kHopper132), Schedule::kGrid);
  EXPECT_EQ(choose_schedule(fixed(2, 8192, 22), kHopper132), Schedule::kGrid);  // 44 pairs
  EXPECT_EQ(choose_schedule(fixed(1, 8192, 45), kHopper132), Schedule::kPair);
  EXPECT_EQ(choose_schedule(fixed(1, 1 << 20, 45), kHopper132), Schedule::kPair);
  EXPECT_EQ(choose_schedule(fixed(2, 16384, 32), kHopper132), Schedule::kPair);  // 64 pairs
}

TEST(ScheduleChoice, FixedBatchesCountTokensPerSequence) {
  EXPECT_EQ(choose_schedule(fixed(2, 1024, 8), kHopper132), Schedule::kGrid);     // 16 pairs of 1024 tokens
  EXPECT_EQ(choose_schedule(fixed(8, 1000, 2), kHopper132), Schedule::kCluster);  // 8000 tokens, 1000 per sequence
}

TEST(ScheduleChoice, VarlenAveragesOverEverySequenceEmptyOnesIncluded) {
  EXPECT_EQ(choose_schedule(varlen(4, 4100, 2), kHopper132), Schedule::kGrid);     // 1025 per sequence
  EXPECT_EQ(choose_schedule(varlen(4, 4000, 2), kHopper132), Schedule::kCluster);  // 1000 (1333 over 3)
  EXPECT_EQ(choose_schedule(varlen(4, 6143, 7), kHopper132), Schedule::kTrio);     // 28 pairs: 1535
  EXPECT_EQ(choose_schedule(varlen(4, 6144, 7), kHopper132), Schedule::kGrid);     // 1536
}

TEST(ScheduleChoice, GridBoundsScaleWithSmsAndNeedCooperativeLaunch) {
  constexpr DeviceLaunchFacts h100_pcie{114, 16, 33, true};
  EXPECT_EQ(choose_schedule(fixed(1, 2048, 30), h100_pcie), Schedule::kGrid);   // 1140 ≥ 38 · 30
  EXPECT_EQ(choose_schedule(fixed(1, 2048, 31), h100_pcie), Schedule::kTrio);   // 1140 < 38 · 31
  EXPECT_EQ(choose_schedule(fixed(1, 32768, 38), h100_pcie), Schedule::kGrid);  // 1140 ≥ 30 · 38
  EXPECT_EQ(choose_schedule(fixed(1, 32768, 39), h100_pcie), Schedule::kPair);
  constexpr DeviceLaunchFacts no_cooperative{132, 16, 33, false};
  EXPECT_EQ(choose_schedule(fixed(1, 32768, 4), no_cooperative), Schedule::kCluster);
}

TEST(ScheduleChoice, GridStateTeamsBelowTwoAndAHalfProducerSmsPerPair) {
  using flash_kda::cuda::sm90::grid_state_teams;
  EXPECT_FALSE(grid_state_teams(16, 132));  // 100 producer SMs for 16 pairs: the state side sets the pace
  EXPECT_FALSE(grid_state_teams(29, 132));  // 74 for 29: 2.55 per pair
  EXPECT_TRUE(grid_state_teams(30, 132));   // 72 for 30: 2.4 per pair
  EXPECT_TRUE(grid_state_teams(32, 132));   // 68 for 32: production sets the pace (measured −10%)
  EXPECT_TRUE(grid_state_teams(64, 132));   // a forced grid: 4 producer SMs for 64 pairs
  EXPECT_FALSE(grid_state_teams(25, 114));  // an H100 PCIe: 64 for 25
  EXPECT_TRUE(grid_state_teams(26, 114));   // 62 for 26
  EXPECT_FALSE(grid_state_teams(28, 126));  // 70 for 28: exactly 2.5 per pair, not below
}

TEST(ScheduleChoice, SixteenTokenOrderClusterTrioPairWhole) {
  EXPECT_EQ(choose_schedule_16(16, kHopper132), Schedule::kCluster);
  EXPECT_EQ(choose_schedule_16(17, kHopper132), Schedule::kTrio);
  EXPECT_EQ(choose_schedule_16(34, kHopper132), Schedule::kPair);
  EXPECT_EQ(choose_schedule_16(66, kHopper132), Schedule::kPair);
  EXPECT_EQ(choose_schedule_16(67, kHopper132), Schedule::kWhole);
}

}  // namespace
