// One family of host-side checks. Every failure throws flash_kda::Error with a precise message.
//   FLASH_KDA_CHECK(cond, "q: expected rank 4, got ", q.rank);      -> user error, message as given
//   FLASH_KDA_INTERNAL_CHECK(cond, ...)                              -> bug in this library, file:line
//   FLASH_KDA_CUDA_CHECK(cudaMalloc(...))                           -> CUDA error name, string, call
#pragma once

#include <sstream>
#include <string>

#include "flash_kda/flash_kda.hpp"

namespace flash_kda::detail {

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

[[noreturn]] inline void fail(const std::string& message) { throw Error(message); }

[[noreturn]] inline void fail_internal(const char* file, int line, const std::string& message) {
  throw Error(concat("flash_kda internal error at ", file, ":", line, ": ", message));
}

}  // namespace flash_kda::detail

#define FLASH_KDA_CHECK(cond, ...)                                                    \
  do {                                                                                \
    if (!(cond)) ::flash_kda::detail::fail(::flash_kda::detail::concat(__VA_ARGS__)); \
  } while (0)

#define FLASH_KDA_INTERNAL_CHECK(cond, ...)                                                         \
  do {                                                                                              \
    if (!(cond))                                                                                    \
      ::flash_kda::detail::fail_internal(__FILE__, __LINE__,                                        \
                                         ::flash_kda::detail::concat("(" #cond ") ", __VA_ARGS__)); \
  } while (0)
