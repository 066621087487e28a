// One family of host-side checks. Every failure throws flash_kda::Error with a precise message.
//   FLASH_KDA_CHECK(cond, "q: expected rank 4, got ", q.rank);      -> user error, message as given
//   FLASH_KDA_INTERNAL_CHECK(cond, ...)                              -> bug in this library, file:line
//   FLASH_KDA_CUDA_CHECK(cudaMalloc(...))                           -> CUDA error name, string, call
#pragma once

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

#include "flash_kda/flash_kda.hpp"

namespace flash_kda::detail {

// Appends one message part, formatted as `std::ostream <<` would (integers in decimal, bool as 1/0,
// floating point as %g). Written without iostreams on purpose: a library built on one of the GPU machines
// crashed inside its own copy of the ostream code when loaded into a torch process (an H200, seen
// 2026-12-01), and messages are built on the success path of validation too.
template <typename Part>
void append_part(std::string& out, const Part& part) {
  using T = std::decay_t<Part>;
  if constexpr (std::is_array_v<Part>) {  // a string literal or char buffer
    out += std::string_view(part);
  } else if constexpr (std::is_same_v<T, bool>) {
    out += part ? '1' : '0';
  } else if constexpr (std::is_same_v<T, char>) {
    out += part;
  } else if constexpr (std::is_enum_v<T>) {
    out += std::to_string(static_cast<std::underlying_type_t<T>>(part));
  } else if constexpr (std::is_integral_v<T>) {
    out += std::to_string(part);
  } else if constexpr (std::is_floating_point_v<T>) {
    char buffer[64];
    std::snprintf(buffer, sizeof buffer, "%g", static_cast<double>(part));
    out += buffer;
  } else if constexpr (std::is_same_v<T, const char*> || std::is_same_v<T, char*>) {
    out += part != nullptr ? part : "(null)";
  } else if constexpr (std::is_pointer_v<T>) {
    char buffer[32];
    std::snprintf(buffer, sizeof buffer, "%p", static_cast<const void*>(part));
    out += buffer;
  } else {
    static_assert(std::is_convertible_v<const Part&, std::string_view>, "concat: unsupported message part type");
    out += std::string_view(part);
  }
}

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::string out;
  (append_part(out, parts), ...);
  return out;
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
