// Host entry of the sm_90a forward kernels (kda_forward_sm90.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "cuda/forward_params.hpp"
#include "cuda/sm90/schedule_choice.hpp"

namespace flash_kda::cuda::sm90 {

// A knob's setting (the FLASH_KDA_SM90_* environment variables, for tests and benchmarks): the index of the variable
// `knob`'s value among `names`, 0 (the first name) when unset or empty. Throws flash_kda::Error naming `knob` and the
// names otherwise.
int parse_knob(const char* knob, std::initializer_list<const char*> names);

// The schedule that FLASH_KDA_SM90_SCHEDULE names (auto, whole, split, pair, trio, cluster, grid; unset means auto): a
// knob for tests and benchmarks. The 16-token schedules compute the same bits; `grid` rounds differently (as close to
// the fp64 gold). Throws flash_kda::Error otherwise.
Schedule parse_schedule();

// Sets the kernels' attributes (dynamic shared memory) on the current device and measures what
// DeviceLaunchFacts holds. Call once per device, after checking that it is an sm_90 GPU.
DeviceLaunchFacts prepare_device(int multiprocessors);

// The schedule a launch with `workspace_bytes` of workspace runs: FLASH_KDA_SM90_SCHEDULE's, or kAuto's choice, which
// takes kGrid only when the workspace holds grid's (else choose_schedule_16's; forward_workspace_bytes asks with
// SIZE_MAX).
Schedule resolve_schedule(const ForwardParams& params, const DeviceLaunchFacts& facts, size_t workspace_bytes);

// Global-memory scratch the launch needs: kGrid's rings and counters, the single-CTA kernel's ticket counter where
// its CTAs are persistent, else 0.
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
