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

// kGrid's bounds under kAuto: where grid measured faster than every 16-token schedule (H200, 132 SMs,
// docs/kernel_sm90.md, "auto's bounds" and "Measured (session 23)"). The longer the sequences, the fewer SMs per
// pair grid needs to win (with its state teams, production keeps up at ~3 SMs per pair once the chunks are many):
// from 1024 tokens per sequence at 5.5 SMs per pair or more (24 pairs on 132 SMs; −16–20% at 16 pairs and fewer, −7%
// at 24, +6% at 32), from 1536 at 4.1 (32 pairs; −3% at 32), from 2048 at 3.8 (34 pairs; −8% at 34, a tie at 36),
// from 4096 at 3.3 (40 pairs; 34–40 pairs −3–16%, 42 +4%), from 8192 at 3.0 (44 pairs; 42 and 44 pairs −2–8% at 8192
// and 16 384 tokens, 48 +8–12%). Shorter sequences were not measured. Tokens per sequence are averaged over every
// sequence, empty ones included.
struct GridAutoTier {
  int64_t min_tokens_per_sequence;
  int64_t min_tenths_of_sms_per_pair;
};
inline constexpr GridAutoTier kGridAutoTiers[] = {{1024, 55}, {1536, 41}, {2048, 38}, {4096, 33}, {8192, 30}};

inline constexpr bool grid_auto_bounds_hold(int64_t pairs, int64_t tokens_per_sequence, int multiprocessors) {
  for (const GridAutoTier& tier : kGridAutoTiers)
    if (tokens_per_sequence >= tier.min_tokens_per_sequence &&
        10 * static_cast<int64_t>(multiprocessors) >= tier.min_tenths_of_sms_per_pair * pairs)
      return true;
  return false;
}

// kGrid's state teams: warpgroup 1 of each state CTA runs one more producer team (one stage of 55 KB beside the
// shared ring) where production sets the pace, that is where fewer than 2.5 producer SMs per pair are left
// (SMs < 4.5 · pairs). Measured (H200, 132 SMs, 1×32768, session 22): 32 pairs −10% (1.04 → 0.94 ms); 28, 24 and 20
// pairs +4–9% and 16 and 8 pairs +2–5%, where the state side sets the pace and the team competes with its warps.
inline constexpr bool grid_state_teams(int64_t pairs, int multiprocessors) { return 2 * multiprocessors < 9 * pairs; }

// The best 16-token schedule for `pairs` pairs (one CTA per SM, about 200 KB of shared memory each): the cluster
// kernel when all its clusters are resident at once, else the trio kernel when all of its are, else two CTAs per
// pair as a cluster of 2 (kPair) when they fit in one wave, else one (`cluster` faster than `trio`, `trio` than
// `pair`, `pair` than `split` on every case measured: docs/kernel_sm90.md).
inline Schedule choose_schedule_16(int64_t pairs, const DeviceLaunchFacts& facts) {
  if (pairs <= facts.resident_clusters) return Schedule::kCluster;
  if (pairs <= facts.resident_trios) return Schedule::kTrio;
  if (2 * pairs <= facts.multiprocessors) return Schedule::kPair;
  return Schedule::kWhole;
}

// kAuto's choice for a launch: kGrid within its bounds (above) given a cooperative launch; else
// choose_schedule_16's.
inline Schedule choose_schedule(const ForwardParams& params, const DeviceLaunchFacts& facts) {
  const int64_t pairs = params.num_sequences * params.heads;
  const int64_t tokens_per_sequence =
      params.cu_seqlens != nullptr ? params.tokens / params.num_sequences : params.tokens;
  if (facts.cooperative_launch && grid_auto_bounds_hold(pairs, tokens_per_sequence, facts.multiprocessors))
    return Schedule::kGrid;
  return choose_schedule_16(pairs, facts);
}
}  // namespace flash_kda::cuda::sm90
