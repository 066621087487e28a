# Unit test of cmake/cuda_architectures.cmake's resolution of FLASH_KDA_CUDA_ARCHS (no GPU needed: the
# local compute capabilities are given). Run by CTest:  cmake -DSOURCE_DIR=<repo> -P <this file>
include(${SOURCE_DIR}/cmake/cuda_architectures.cmake)

function(expect requested capabilities expected_archs expected_why)
  flash_kda_resolve_cuda_archs("${requested}" "${capabilities}" archs why)
  if(NOT archs STREQUAL expected_archs OR NOT why MATCHES "${expected_why}")
    message(FATAL_ERROR "FLASH_KDA_CUDA_ARCHS='${requested}' with GPUs '${capabilities}': got '${archs}' "
                        "(${why}), expected '${expected_archs}' (${expected_why})")
  endif()
endfunction()

expect("native" "9.0" "90a" "^native: this machine's GPUs$")
expect("" "9.0;9.0" "90a" "^native: this machine's GPUs$")
expect("native" "9.0;8.0" "90a" "no kernel for sm_80\\)$")
expect("native" "" "90a" "found no GPU, so the default")
expect("native" "8.0;10.0" "90a" "only sm_80, sm_100\\)")
expect("90a" "" "90a" "as FLASH_KDA_CUDA_ARCHS asks")
expect("90a;100a" "8.0" "90a;100a" "as FLASH_KDA_CUDA_ARCHS asks")
message(STATUS "cuda_architectures: all cases resolved as expected")
