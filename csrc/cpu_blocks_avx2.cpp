// cpu_blocks.h's functions built for AVX2 and FMA (x86-64-v3): vectors of 8 floats.

#include <cstdint>  // every header before the target changes: only the kernels take it
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu_blocks.h"

#ifdef MINALIGN_MULTI_ISA
#pragma GCC target("arch=x86-64-v3")
#define MINALIGN_BLOCKS avx2
#define MINALIGN_LANES 8  // the pragma leaves the ISA macros (__AVX2__, ...) as they were
#include "cpu_blocks_impl.h"
#endif
