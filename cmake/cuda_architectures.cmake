# Which GPU architectures the kernels are compiled for: FLASH_KDA_CUDA_ARCHS (CMake cache variable, whose
# default is the environment variable of the same name).
#   "native" (or empty): the architectures of this machine's GPUs that flash_kda has a kernel for. The only
#       kernel is Hopper's, so a compute capability 9.0 GPU means 90a (sm_90a: wgmma/TMA-era instructions are
#       not forward-compatible, hence the "a"). With no such GPU — none at all, as on CI, or other GPUs only —
#       it falls back to 90a, so that a build on a machine without a GPU still produces the Hopper kernel.
#   anything else, e.g. "90a" (wheel builds): used as given, a CMAKE_CUDA_ARCHITECTURES list.
set(FLASH_KDA_KERNEL_ARCHS "90a")  # every architecture a kernel exists for
set(FLASH_KDA_FALLBACK_ARCHS "90a")

# The architecture flash_kda compiles for a GPU of compute capability `capability` ("9.0"), or "" if none.
function(flash_kda_arch_for_capability capability out_var)
  string(REPLACE "." "" arch "${capability}")
  if("${arch}a" IN_LIST FLASH_KDA_KERNEL_ARCHS)
    set(${out_var} "${arch}a" PARENT_SCOPE)
  else()
    set(${out_var} "" PARENT_SCOPE)
  endif()
endfunction()

# Resolves `requested` (FLASH_KDA_CUDA_ARCHS) given the compute capabilities of the local GPUs (a list such
# as "9.0;9.0", empty without GPUs). Sets `out_var` to the architecture list and `why_var` to a sentence
# saying where it came from.
function(flash_kda_resolve_cuda_archs requested capabilities out_var why_var)
  if(NOT requested STREQUAL "" AND NOT requested STREQUAL "native")
    set(${out_var} "${requested}" PARENT_SCOPE)
    set(${why_var} "as FLASH_KDA_CUDA_ARCHS asks" PARENT_SCOPE)
    return()
  endif()
  set(archs "")
  set(unsupported "")
  foreach(capability IN LISTS capabilities)
    flash_kda_arch_for_capability("${capability}" arch)
    if(arch STREQUAL "")
      string(REPLACE "." "" sm "${capability}")
      list(APPEND unsupported "sm_${sm}")
    else()
      list(APPEND archs "${arch}")
    endif()
  endforeach()
  list(REMOVE_DUPLICATES archs)
  list(REMOVE_DUPLICATES unsupported)
  if(archs)
    set(why "native: this machine's GPUs")
    if(unsupported)
      list(JOIN unsupported ", " unsupported)
      string(APPEND why " (no kernel for ${unsupported})")
    endif()
  elseif(unsupported)
    list(JOIN unsupported ", " unsupported)
    set(archs "${FLASH_KDA_FALLBACK_ARCHS}")
    set(why "native found no GPU flash_kda has a kernel for (only ${unsupported}), so the default")
  else()
    set(archs "${FLASH_KDA_FALLBACK_ARCHS}")
    set(why "native found no GPU, so the default")
  endif()
  set(${out_var} "${archs}" PARENT_SCOPE)
  set(${why_var} "${why}" PARENT_SCOPE)
endfunction()

# Compute capabilities of the local GPUs ("9.0;8.0"), through nvidia-smi; empty without GPUs or driver.
function(flash_kda_local_compute_capabilities out_var)
  set(capabilities "")
  find_program(FLASH_KDA_NVIDIA_SMI nvidia-smi)
  if(FLASH_KDA_NVIDIA_SMI)
    execute_process(COMMAND ${FLASH_KDA_NVIDIA_SMI} --query-gpu=compute_cap --format=csv,noheader
                    OUTPUT_VARIABLE output RESULT_VARIABLE result ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(result EQUAL 0)
      string(REGEX MATCHALL "[0-9]+\\.[0-9]+" capabilities "${output}")
    endif()
  endif()
  set(${out_var} "${capabilities}" PARENT_SCOPE)
endfunction()
