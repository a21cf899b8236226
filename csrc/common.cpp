#include "common.h"

#include <algorithm>
#include <atomic>
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

namespace {

CpuIsa detect_isa() {
#if defined(__GNUC__) && defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    return CpuIsa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::avx2;
#endif
  return CpuIsa::base;
}

bool parse_isa(const std::string& name, CpuIsa* out) {
  if (name == "base") return *out = CpuIsa::base, true;
  if (name == "avx2") return *out = CpuIsa::avx2, true;
  if (name == "avx512") return *out = CpuIsa::avx512, true;
  return false;
}

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    default: return "base";
  }
}

std::atomic<int>& isa_cap() {
  static std::atomic<int> cap{[] {
    const char* v = std::getenv("COCONUT_CPU_ISA");
    CpuIsa isa = CpuIsa::avx512;
    if (v != nullptr && v[0] != '\0')
      COCONUT_CHECK(parse_isa(v, &isa), "COCONUT_CPU_ISA must be base, avx2 or avx512, got '", v, "'");
    return static_cast<int>(isa);
  }()};
  return cap;
}

}  // namespace

CpuIsa cpu_isa_supported() {
  static const CpuIsa isa = detect_isa();
  return isa;
}

CpuIsa cpu_isa() {
  const int cap = isa_cap().load(std::memory_order_relaxed);
  return static_cast<CpuIsa>(std::min(static_cast<int>(cpu_isa_supported()), cap));
}

void set_cpu_isa_cap(CpuIsa cap) { isa_cap().store(static_cast<int>(cap), std::memory_order_relaxed); }

// coconut::_cpu_isa: with a name, caps the CPU kernels' instruction set at it; returns the one they now run.
std::string cpu_isa_op(std::string name) {
  if (!name.empty()) {
    CpuIsa cap;
    COCONUT_CHECK(parse_isa(name, &cap), "isa must be base, avx2 or avx512, got '", name, "'");
    set_cpu_isa_cap(cap);
  }
  return isa_name(cpu_isa());
}

}  // namespace coconut
