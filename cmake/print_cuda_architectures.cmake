# Prints what FLASH_KDA_CUDA_ARCHS resolves to on this machine (no compiler needed):
#   cmake -P cmake/print_cuda_architectures.cmake            (FLASH_KDA_CUDA_ARCHS from the environment)
include(${CMAKE_CURRENT_LIST_DIR}/cuda_architectures.cmake)
flash_kda_local_compute_capabilities(capabilities)
flash_kda_resolve_cuda_archs("$ENV{FLASH_KDA_CUDA_ARCHS}" "${capabilities}" archs why)
message("flash_kda CUDA architectures: ${archs} (${why})")
