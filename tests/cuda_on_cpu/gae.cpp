// minalign's CUDA GAE kernel (csrc/gae_cuda.cu) built for the CPU with emulation.h,
// behind a C interface for tests/test_cuda_kernels_on_cpu.py. Its own translation
// unit: the GAE and log-prob kernel files each define their own kThreads.

#include "emulation.h"

#include "gae_cuda.cu"

extern "C" void gae(bool vec4, const float* rewards, const float* values, const float* mask,
                    int64_t B, int64_t T, float gamma, float gamma_lam, float* advantages,
                    float* returns) {
  emulation::launch(B, minalign::kThreads, 0, [&] {
    if (vec4) {
      minalign::gae_kernel<true>(rewards, values, mask, T, gamma, gamma_lam, advantages, returns);
    } else {
      minalign::gae_kernel<false>(rewards, values, mask, T, gamma, gamma_lam, advantages, returns);
    }
  });
}
