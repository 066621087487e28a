// C ABI over the C++ API: turns exceptions into (non-zero return, message) for language bindings.
#include "flash_kda/c_api.h"

#include <cstring>
#include <exception>

#include "common/check.hpp"

namespace {

using flash_kda::ForwardProblem;

void write_message(char* err, size_t err_len, const char* message) {
  if (err == nullptr || err_len == 0) return;
  std::strncpy(err, message, err_len - 1);
  err[err_len - 1] = '\0';
}

const ForwardProblem& as_problem(const void* problem) {
  FLASH_KDA_CHECK(problem != nullptr, "problem: expected a ForwardProblem, got a null pointer");
  const auto& p = *static_cast<const ForwardProblem*>(problem);
  FLASH_KDA_CHECK(p.abi_version == flash_kda::kAbiVersion, "problem.abi_version: expected ", flash_kda::kAbiVersion,
                  " (this library), got ", p.abi_version, " — the binding and the library come from different builds");
  return p;
}

template <typename Body>
int guarded(char* err, size_t err_len, Body&& body) {
  try {
    body();
    write_message(err, err_len, "");
    return 0;
  } catch (const std::exception& e) {
    write_message(err, err_len, e.what());
  } catch (...) {
    write_message(err, err_len, "flash_kda: unknown C++ exception");
  }
  return 1;
}

}  // namespace

extern "C" {

int32_t flash_kda_abi_version(void) { return flash_kda::kAbiVersion; }
size_t flash_kda_problem_size(void) { return sizeof(ForwardProblem); }
const char* flash_kda_version(void) { return flash_kda::version(); }
const char* flash_kda_cuda_architectures(void) { return flash_kda::compiled_cuda_architectures(); }

int flash_kda_validate(const void* problem, int32_t target, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    FLASH_KDA_CHECK(target == 0 || target == 1, "target: expected 0 (reference) or 1 (cuda), got ", target);
    flash_kda::validate_forward(as_problem(problem), static_cast<flash_kda::Target>(target));
  });
}

int flash_kda_reference_forward(const void* problem, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { flash_kda::reference_forward_recurrent(as_problem(problem)); });
}

int flash_kda_reference_forward_chunked(const void* problem, int32_t chunk_size, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { flash_kda::reference_forward_chunked(as_problem(problem), chunk_size); });
}

int flash_kda_cuda_workspace_bytes(const void* problem, size_t* bytes, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    FLASH_KDA_CHECK(bytes != nullptr, "bytes: expected a pointer, got null");
    *bytes = flash_kda::cuda_forward_workspace_bytes(as_problem(problem));
  });
}

int flash_kda_cuda_forward(const void* problem, void* stream, void* workspace, size_t workspace_bytes, char* err,
                           size_t err_len) {
  return guarded(err, err_len,
                 [&] { flash_kda::cuda_forward(as_problem(problem), stream, workspace, workspace_bytes); });
}

}  // extern "C"
