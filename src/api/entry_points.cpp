// Entry points that need no GPU code, and build facts.
#include "flash_kda/flash_kda.hpp"

namespace flash_kda {

const char* version() { return FLASH_KDA_VERSION_STRING; }

}  // namespace flash_kda
