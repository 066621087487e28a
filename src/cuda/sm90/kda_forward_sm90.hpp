// Host entry of the sm_90a forward kernels (kda_forward_sm90.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
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

// The schedule named by FLASH_KDA_SM90_SCHEDULE (auto, whole, split, pair, trio, cluster, grid; unset means auto): a
// knob for tests and benchmarks. The 16-token schedules compute the same bits; `grid` rounds differently (as close to
// the fp64 gold). Throws flash_kda::Error otherwise.
Schedule parse_schedule(const char* name);

// What the schedule choice needs to know about a device: queried once per device (prepare_device) and
// cached by the caller, because the forward runs it on every call.
struct DeviceLaunchFacts {
  int multiprocessors = 0;
  int resident_clusters = 0;        // clusters of the kCluster kernel that run at once (GPCs decide, not only SMs)
  int resident_trios = 0;           // the same for the kTrio kernel's clusters of 3
  bool cooperative_launch = false;  // kGrid needs all its CTAs resident at once
};

// kAuto's choice for a launch: kGrid for few long sequences (at most kGridAutoMaxPairs (sequence, head) pairs,
// grid_auto_min_tokens(pairs) tokens or more per sequence on average, at least 4 SMs per pair, cooperative launch),
// else choose_schedule_16's. The bounds are where grid measured faster (H200, docs/kernel_sm90.md, "auto's
// bounds"): from 2048 tokens for up to 16 pairs (−19–25% there), from 3072 above (measured at 32 pairs: 2048 tokens a
// tie, 3072 −5%).
inline constexpr int64_t kGridAutoMaxPairs = 32;
inline constexpr int64_t kGridAutoFewPairs = 16;
inline constexpr int64_t kGridAutoMinTokensFewPairs = 2048;
inline constexpr int64_t kGridAutoMinTokensManyPairs = 3072;
constexpr int64_t grid_auto_min_tokens(int64_t pairs) {
  return pairs <= kGridAutoFewPairs ? kGridAutoMinTokensFewPairs : kGridAutoMinTokensManyPairs;
}
Schedule choose_schedule(const ForwardParams& params, const DeviceLaunchFacts& facts);

// The best 16-token schedule for `pairs` pairs: the cluster kernel when all its clusters are resident at once,
// else the trio kernel when all of its are, else two CTAs per pair (kPair) when they fit in one wave, else one.
Schedule choose_schedule_16(int64_t pairs, const DeviceLaunchFacts& facts);

// Sets the kernels' attributes (dynamic shared memory) on the current device and measures what
// DeviceLaunchFacts holds. Call once per device, after checking that it is an sm_90 GPU.
DeviceLaunchFacts prepare_device(int multiprocessors);

// The schedule a launch with `workspace_bytes` of workspace runs: FLASH_KDA_SM90_SCHEDULE's, or kAuto's choice, which
// takes kGrid only when the workspace holds grid's (else choose_schedule_16's; forward_workspace_bytes asks with
// SIZE_MAX).
Schedule resolve_schedule(const ForwardParams& params, const DeviceLaunchFacts& facts, size_t workspace_bytes);

// Global-memory scratch the launch needs (0 but for kGrid).
size_t forward_workspace_bytes(const ForwardParams& params, const DeviceLaunchFacts& facts);

// Enqueues the forward on `stream` (current device must be the tensors' device, prepared by
// prepare_device), with `workspace` of at least forward_workspace_bytes bytes. Never synchronises.
void launch_forward(const ForwardParams& params, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                    const DeviceLaunchFacts& facts);

// kGrid (kda_forward_sm90_grid.cu): whether `pairs` pairs fit (2 state CTAs each and at least one producer SM),
// its workspace, its kernel's attributes (prepare_device calls it), and its launch.
bool grid_fits(int64_t pairs, const DeviceLaunchFacts& facts);
size_t grid_workspace_bytes(int64_t pairs);
void prepare_grid_kernel();
void launch_grid(const ForwardParams& params, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                 const DeviceLaunchFacts& facts);

}  // namespace flash_kda::cuda::sm90
