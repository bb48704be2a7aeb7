// cpu_blocks.h's functions built for the baseline ISA (vectors of 4 floats on x86-64's
// SSE2 or aarch64's NEON; as wide as the build's own flags allow elsewhere), and the
// choice of build.

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "cpu_blocks.h"

#define MINALIGN_BLOCKS baseline
#include "cpu_blocks_impl.h"

namespace minalign {
namespace {

// The widest build the CPU runs; MINALIGN_CPU_BLOCKS=avx2 or baseline asks for a
// narrower one (the tests run the kernels on each build this machine can).
const CpuBlocks& choose() {
#ifdef MINALIGN_MULTI_ISA
  const bool avx512_ok = __builtin_cpu_supports("x86-64-v4"), avx2_ok = __builtin_cpu_supports("x86-64-v3");
#else
  const bool avx512_ok = false, avx2_ok = false;
#endif
  const char* env = std::getenv("MINALIGN_CPU_BLOCKS");
  const std::string asked = env ? env : "";
  TORCH_CHECK(asked.empty() || asked == "avx512" || asked == "avx2" || asked == "baseline",
              "MINALIGN_CPU_BLOCKS=", asked, ": must be avx512, avx2 or baseline");
  TORCH_CHECK(asked != "avx512" || avx512_ok, "MINALIGN_CPU_BLOCKS=avx512: this CPU or build has no AVX-512 kernels");
  TORCH_CHECK(asked != "avx2" || avx2_ok, "MINALIGN_CPU_BLOCKS=avx2: this CPU or build has no AVX2 kernels");
#ifdef MINALIGN_MULTI_ISA
  if (asked != "baseline" && asked != "avx2" && avx512_ok) return avx512::blocks;
  if (asked != "baseline" && avx2_ok) return avx2::blocks;
#endif
  return baseline::blocks;
}

}  // namespace

const CpuBlocks& cpu_blocks() {
  static const CpuBlocks& chosen = choose();
  return chosen;
}

}  // namespace minalign
