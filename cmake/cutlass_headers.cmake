# Locates the CUTLASS/CuTe include tree. CUTLASS is a dependency, never part of this repository.
# Order: -DFLASH_KDA_CUTLASS_INCLUDE_DIR=..., then $CUTLASS_INCLUDE_DIR, then the headers shipped in the
# `nvidia-cutlass` Python package (cutlass_library/source/include), found through the Python on PATH.
set(FLASH_KDA_CUTLASS_INCLUDE_DIR "$ENV{CUTLASS_INCLUDE_DIR}" CACHE PATH "CUTLASS include directory")
if(NOT FLASH_KDA_CUTLASS_INCLUDE_DIR)
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_Interpreter_FOUND)
    execute_process(
      COMMAND ${Python3_EXECUTABLE} -c
        "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(os.path.dirname(s.origin), 'source', 'include') if s else '')"
      OUTPUT_VARIABLE _flash_kda_cutlass_dir OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    set(FLASH_KDA_CUTLASS_INCLUDE_DIR "${_flash_kda_cutlass_dir}" CACHE PATH "CUTLASS include directory" FORCE)
  endif()
endif()
if(NOT EXISTS "${FLASH_KDA_CUTLASS_INCLUDE_DIR}/cute/tensor.hpp")
  message(FATAL_ERROR "CUTLASS headers not found (looked in '${FLASH_KDA_CUTLASS_INCLUDE_DIR}'). Install them with "
                      "`python3 -m pip install --no-deps nvidia-cutlass`, or point -DFLASH_KDA_CUTLASS_INCLUDE_DIR "
                      "(or the CUTLASS_INCLUDE_DIR environment variable) at a CUTLASS include tree.")
endif()
message(STATUS "flash_kda: CUTLASS headers from ${FLASH_KDA_CUTLASS_INCLUDE_DIR}")
