// cpu_blocks.h's functions built for AVX-512 (x86-64-v4): vectors of 16 floats.

#include <cstdint>  // every header before the target changes: only the kernels take it
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu_blocks.h"

#ifdef MINALIGN_MULTI_ISA
#pragma GCC target("arch=x86-64-v4")
#define MINALIGN_BLOCKS avx512
#define MINALIGN_LANES 16  // the pragma leaves the ISA macros (__AVX2__, ...) as they were
#include "cpu_blocks_impl.h"
#endif
