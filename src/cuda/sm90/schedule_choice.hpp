// The sm_90a forward's schedule choice (kAuto): plain host code over a launch's shape and a device's facts, in a
// header so that the C++ tests check the rule without a GPU (tests/cpp/test_schedule_choice.cpp).
#pragma once

#include <cstdint>

#include "cuda/forward_params.hpp"

namespace flash_kda::cuda::sm90 {

// How the (sequence, head) pairs are spread over the GPU (docs/kernel_sm90.md):
//   kWhole       one CTA per pair: 8 producer warps + 8 state warps (all 128 value rows);
//   kSplitValues two CTAs per pair, 64 value rows each, each with its own 8 producer warps (forced only);
//   kPair        the same two CTAs as a cluster of 2, each preparing half of the chunks for both, two
//                producer warps per chunk;
//   kTrio        a cluster of 3 CTAs per pair: 2 state CTAs (64 value rows each, 2 producer teams beside
//                the state warps) and 1 producer CTA (8 teams), the 12 teams taking chunks as they get free;
//   kCluster     a cluster of 4 CTAs per pair: 2 state CTAs (64 value rows each) fed by 2 producer CTAs;
//   kGrid        32-token chunks (kda_forward_sm90_grid.cu): 2 state CTAs per pair, and on every other SM producer
//                teams that hand the chunks over through an L2 ring in the workspace (kAuto: few long sequences).
enum class Schedule { kAuto, kWhole, kSplitValues, kPair, kTrio, kCluster, kGrid };

// What the schedule choice needs to know about a device: queried once per device (prepare_device) and
// cached by the caller, because the forward runs it on every call.
struct DeviceLaunchFacts {
  int multiprocessors = 0;
  int resident_clusters = 0;        // clusters of the kCluster kernel that run at once (GPCs decide, not only SMs)
  int resident_trios = 0;           // the same for the kTrio kernel's clusters of 3
  bool cooperative_launch = false;  // kGrid needs all its CTAs resident at once
};

// kAuto's choice for a launch (choose_schedule below): kGrid for few long sequences (at most kGridAutoMaxPairs
// (sequence, head) pairs, grid_auto_min_tokens(pairs) tokens or more per sequence on average, at least 4 SMs per
// pair, cooperative launch), else choose_schedule_16's. The bounds are where grid measured faster (H200,
// docs/kernel_sm90.md, "auto's bounds"): from 2048 tokens for up to 16 pairs (−19–25% there), from 3072 above (measured
// at 32 pairs: 2048 tokens a tie, 3072 −5%).
inline constexpr int64_t kGridAutoMaxPairs = 32;
inline constexpr int64_t kGridAutoFewPairs = 16;
inline constexpr int64_t kGridAutoMinTokensFewPairs = 2048;
inline constexpr int64_t kGridAutoMinTokensManyPairs = 3072;
constexpr int64_t grid_auto_min_tokens(int64_t pairs) {
  return pairs <= kGridAutoFewPairs ? kGridAutoMinTokensFewPairs : kGridAutoMinTokensManyPairs;
}

// The best 16-token schedule for `pairs` pairs: the cluster kernel when all its clusters are resident at once,
// else the trio kernel when all of its are, else two CTAs per pair (kPair) when they fit in one wave, else one.
inline Schedule choose_schedule_16(int64_t pairs, const DeviceLaunchFacts& facts) {
  // One CTA per SM (about 200 KB of shared memory each). Few pairs: the cluster kernel, when all of its
  // clusters run at once, else the trio kernel when all of its clusters do; else split the value rows over
  // two CTAs when that still fits in one wave, as a cluster of 2 (`pair`: faster than `split` on every case
  // measured; `trio` faster than `pair`, `cluster` than `trio`: docs/kernel_sm90.md).
  if (pairs <= facts.resident_clusters) return Schedule::kCluster;
  if (pairs <= facts.resident_trios) return Schedule::kTrio;
  if (2 * pairs <= facts.multiprocessors) return Schedule::kPair;
  return Schedule::kWhole;
}

inline Schedule choose_schedule(const ForwardParams& params, const DeviceLaunchFacts& facts) {
  // The grid schedule where it was measured faster than every 16-token one (H200, docs/kernel_sm90.md, "The `grid`
  // schedule" and "auto's bounds"): at most 32 pairs, sequences of 2048 (up to 16 pairs) or 3072 tokens or more on
  // average, and a producer SM per state CTA.
  const int64_t pairs = params.num_sequences * params.heads;
  const int64_t tokens_per_sequence =
      params.cu_seqlens != nullptr ? params.tokens / params.num_sequences : params.tokens;
  if (pairs <= kGridAutoMaxPairs && tokens_per_sequence >= grid_auto_min_tokens(pairs) &&
      4 * pairs <= facts.multiprocessors && facts.cooperative_launch)
    return Schedule::kGrid;
  return choose_schedule_16(pairs, facts);
}

}  // namespace flash_kda::cuda::sm90
