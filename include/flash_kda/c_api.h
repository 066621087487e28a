/* flash_kda — C ABI used by language bindings (the Python package loads it with ctypes).
 * Each call returns 0 on success; on failure it returns non-zero and writes a NUL-terminated message
 * into err (at most err_len bytes). `problem` points to a flash_kda::ForwardProblem whose abi_version
 * must equal flash_kda_abi_version(). */
#ifndef FLASH_KDA_C_API_H_
#define FLASH_KDA_C_API_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define FLASH_KDA_C_EXPORT __declspec(dllexport)
#else
#define FLASH_KDA_C_EXPORT __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

FLASH_KDA_C_EXPORT int32_t flash_kda_abi_version(void);
FLASH_KDA_C_EXPORT size_t flash_kda_problem_size(void); /* sizeof(ForwardProblem) */
FLASH_KDA_C_EXPORT const char* flash_kda_version(void);
FLASH_KDA_C_EXPORT const char* flash_kda_cuda_architectures(void);

/* target: 0 = reference (CPU), 1 = CUDA. Only validates. */
FLASH_KDA_C_EXPORT int flash_kda_validate(const void* problem, int32_t target, char* err, size_t err_len);
/* fp64 token-by-token recurrence on the CPU. */
FLASH_KDA_C_EXPORT int flash_kda_reference_forward(const void* problem, char* err, size_t err_len);
/* fp32 chunked formulation on the CPU. */
FLASH_KDA_C_EXPORT int flash_kda_reference_forward_chunked(const void* problem, int32_t chunk_size, char* err,
                                                           size_t err_len);
FLASH_KDA_C_EXPORT int flash_kda_cuda_workspace_bytes(const void* problem, size_t* bytes, char* err, size_t err_len);
FLASH_KDA_C_EXPORT int flash_kda_cuda_forward(const void* problem, void* stream, void* workspace,
                                              size_t workspace_bytes, char* err, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif /* FLASH_KDA_C_API_H_ */
