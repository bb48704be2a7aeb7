// minalign's CUDA log-prob kernels (csrc/logprobs_cuda.cu, csrc/logprobs_fused_cuda.cu)
// built for the CPU with emulation.h, behind a C interface that
// tests/test_cuda_kernels_on_cpu.py calls through ctypes with tensors' pointers.
// Each function launches a kernel the way its host function in csrc/ does.

#include "emulation.h"

#include "logprobs_cuda.cu"
#include "logprobs_fused_cuda.cu"

namespace {

using minalign::kThreads;
using minalign::kVec16;

enum Dtype { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Calls f(T{}) with T the C++ type of `dtype`.
template <typename F>
void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kBFloat16: f(c10::BFloat16{}); break;
    case kFloat16: f(c10::Half{}); break;
  }
}

}  // namespace

extern "C" {

void token_logprobs(int dtype, bool with_entropy, const void* logits, const int64_t* labels,
                    int64_t N, int64_t V, int64_t ignore_index, float* logprobs, float* lse,
                    float* entropy, unsigned long long* first_bad_row) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    const auto* x = static_cast<const T*>(logits);
    emulation::launch(N, kThreads, 0, [&] {
      if (with_entropy) {
        minalign::token_logprobs_kernel<T, true>(x, labels, V, ignore_index, logprobs, lse, entropy,
                                                 first_bad_row);
      } else {
        minalign::token_logprobs_kernel<T, false>(x, labels, V, ignore_index, logprobs, lse,
                                                  nullptr, first_bad_row);
      }
    });
  });
}

// wide: 16-byte vectors (logits and grad_logits rows equally aligned), else one element
// at a time.
void token_logprobs_backward(int dtype, bool with_entropy, bool wide, const float* grad_logprobs,
                             const float* grad_entropy, const void* logits, const int64_t* labels,
                             const float* lse, const float* entropy, int64_t N, int64_t V,
                             int64_t ignore_index, void* grad_logits) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    const auto* x = static_cast<const T*>(logits);
    auto* dx = static_cast<T*>(grad_logits);
    emulation::launch(N, kThreads, 0, [&] {
      if (wide && with_entropy) {
        minalign::token_logprobs_backward_kernel<T, kVec16<T>, true>(
            grad_logprobs, grad_entropy, x, labels, lse, entropy, V, ignore_index, dx);
      } else if (wide) {
        minalign::token_logprobs_backward_kernel<T, kVec16<T>, false>(
            grad_logprobs, nullptr, x, labels, lse, nullptr, V, ignore_index, dx);
      } else if (with_entropy) {
        minalign::token_logprobs_backward_kernel<T, 1, true>(
            grad_logprobs, grad_entropy, x, labels, lse, entropy, V, ignore_index, dx);
      } else {
        minalign::token_logprobs_backward_kernel<T, 1, false>(grad_logprobs, nullptr, x, labels,
                                                              lse, nullptr, V, ignore_index, dx);
      }
    });
  });
}

void token_logprobs_fused(int dtype, void* logits, const int64_t* labels, const float* weights,
                          int64_t N, int64_t V, int64_t ignore_index, int64_t cached_vecs,
                          float* logprobs) {
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    emulation::launch(N, kThreads, cached_vecs * 16, [&] {
      minalign::token_logprobs_fused_kernel<T>(static_cast<T*>(logits), labels, weights, V,
                                              ignore_index, cached_vecs, logprobs);
    });
  });
}

void find_bad_label(const int64_t* labels, int64_t N, int64_t V, int64_t ignore_index,
                    unsigned blocks, unsigned long long* first_bad_row) {
  emulation::launch(blocks, kThreads, 0, [&] {
    minalign::find_bad_label_kernel(labels, N, V, ignore_index, first_bad_row);
  });
}

}  // extern "C"
