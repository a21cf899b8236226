#include "common.h"

#include <cstdlib>
#include <cstring>

namespace coconut {

bool debug_checks() {
  static const bool on = [] {
    const char* v = std::getenv("COCONUT_DEBUG");
    return v != nullptr && std::strcmp(v, "0") != 0 && v[0] != '\0';
  }();
  return on;
}

}  // namespace coconut
