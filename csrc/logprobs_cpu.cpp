// token_logprobs on the CPU: log p(label) of each row of logits, the row's
// log-sum-exp, optionally its entropy, and the gradient of those w.r.t. the logits.
//
// For one row x of V logits and its label y:
//   lse    = log sum_j e^{x_j}
//   logp_y = x_y - lse
//   H      = -sum_j p_j log p_j,   p_j = e^{x_j - lse}   (0 log 0 = 0: -inf logits add 0)
// Backward, with upstream gradients g (of logp_y) and gh (of H):
//   d logp_y / dx_j = [j = y] - p_j
//   d H / dx_j      = -p_j (log p_j + H)
//   grad_j          = g [j = y] - p_j (g + gh (x_j - lse + H))
// Rows whose label is ignore_index get logp 0, entropy 0 and a zero gradient.
//
// Never materialised: the [N, V] softmax or log-softmax. The forward reads each row
// once, the backward reads it once more, recomputes p_j from the saved lse and writes
// the gradient, either into a new tensor or (token_logprobs_backward_) over the
// logits themselves. Extra memory: O(N). The row arithmetic is in softmax_cpu.h;
// weighted_logprob_sum's fused kernel is logprobs_fused_cpu.cpp.

#include <torch/library.h>

#include "softmax_cpu.h"

namespace minalign {
namespace {

template <typename T>
void forward_rows(const at::Tensor& logits, const int64_t* labels, int64_t ignore_index,
                  bool with_entropy, float* logprobs, float* lse, float* entropy) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const T* x = logits.const_data_ptr<T>();
  at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
    float buf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * V;  // int64 offset: N * V may exceed 2^31
      RowState st;
      for (int64_t j = 0; j < V; j += kBlock) {
        const int64_t n = std::min(kBlock, V - j);
        fold_block(as_float(row + j, n, buf), n, with_entropy, std::is_same_v<T, float>, st);
      }
      const float log_sum = std::log(st.sum);
      lse[r] = st.ref + log_sum;
      const bool ignored = labels[r] == ignore_index;
      logprobs[r] = ignored ? 0.f : static_cast<float>(row[labels[r]]) - lse[r];
      if (with_entropy) entropy[r] = ignored ? 0.f : log_sum - st.xsum / st.sum;
    }
  });
}

template <typename T>
void backward_rows(const at::Tensor& logits, const int64_t* labels, int64_t ignore_index,
                   const float* grad_logprobs, const float* grad_entropy, const float* lse,
                   const float* entropy, at::Tensor& grad_logits) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const T* x = logits.const_data_ptr<T>();
  T* out = grad_logits.mutable_data_ptr<T>();
  at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
    float buf[kBlock], grad_buf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * V;
      T* out_row = out + r * V;
      const int64_t y = labels[r];
      if (y == ignore_index) {
        std::fill(out_row, out_row + V, T(0));
        continue;
      }
      const float g = grad_logprobs[r];
      const float gh = grad_entropy ? grad_entropy[r] : 0.f;
      const float h = grad_entropy ? entropy[r] : 0.f;
      for (int64_t j = 0; j < V; j += kBlock) {
        const int64_t n = std::min(kBlock, V - j);
        float* o = std::is_same_v<T, float> ? reinterpret_cast<float*>(out_row + j) : grad_buf;
        grad_block(as_float(row + j, n, buf), n, lse[r], g, gh, h, std::is_same_v<T, float>, o);
        if (j <= y && y < j + n) o[y - j] += g;
        if constexpr (!std::is_same_v<T, float>)
          round_block(o, n, out_row + j);
      }
    }
  });
}

void check_row_vector(const at::Tensor& t, const char* name, int64_t N) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "minalign.token_logprobs_backward: ", name, " must be float32, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N, "minalign.token_logprobs_backward: ", name, " must have shape [", N, "], got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "minalign.token_logprobs_backward: ", name, " must be on the CPU like the logits, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "minalign.token_logprobs_backward: ", name, " must be contiguous");
}

// inplace_backward only tells autograd which backward to run.
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                                  int64_t ignore_index, bool with_entropy,
                                                                  bool /*inplace_backward*/) {
  constexpr const char* op = "minalign.token_logprobs";
  check_inputs(op, logits, labels, ignore_index);
  const int64_t N = logits.size(0);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({N}, opts), lse = at::empty({N}, opts);
  at::Tensor entropy = at::empty({with_entropy ? N : 0}, opts);
  dispatch_logits(op, logits.scalar_type(), [&](auto t) {
    forward_rows<decltype(t)>(logits, labels.const_data_ptr<int64_t>(), ignore_index, with_entropy,
                              logprobs.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(),
                              with_entropy ? entropy.mutable_data_ptr<float>() : nullptr);
  });
  return {logprobs, lse, entropy};
}

// Writes the gradient into grad_logits, which may be logits itself.
void backward_into(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                   const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                   const std::optional<at::Tensor>& entropy, int64_t ignore_index, at::Tensor& grad_logits) {
  constexpr const char* op = "minalign.token_logprobs_backward";
  check_inputs(op, logits, labels, ignore_index);
  const int64_t N = logits.size(0);
  check_row_vector(grad_logprobs, "grad_logprobs", N);
  check_row_vector(lse, "lse", N);
  const bool with_entropy = grad_entropy.has_value() && grad_entropy->defined();
  if (with_entropy) {
    TORCH_CHECK(entropy.has_value() && entropy->defined(),
                "minalign.token_logprobs_backward: grad_entropy was given without the saved entropy");
    check_row_vector(*grad_entropy, "grad_entropy", N);
    check_row_vector(*entropy, "entropy", N);
  }
  dispatch_logits(op, logits.scalar_type(), [&](auto t) {
    backward_rows<decltype(t)>(logits, labels.const_data_ptr<int64_t>(), ignore_index,
                               grad_logprobs.const_data_ptr<float>(),
                               with_entropy ? grad_entropy->const_data_ptr<float>() : nullptr,
                               lse.const_data_ptr<float>(), with_entropy ? entropy->const_data_ptr<float>() : nullptr,
                               grad_logits);
  });
}

at::Tensor token_logprobs_backward_cpu(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                                       const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                       const std::optional<at::Tensor>& entropy, int64_t ignore_index) {
  at::Tensor grad_logits = at::empty_like(logits);
  backward_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, ignore_index, grad_logits);
  return grad_logits;
}

// The same gradient, written over the logits (memory already touched: no new [N, V] tensor).
void token_logprobs_backward_inplace_cpu(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                                         at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                         const std::optional<at::Tensor>& entropy, int64_t ignore_index) {
  backward_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, ignore_index, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(minalign, CPU, m) {
  m.impl("token_logprobs", &token_logprobs_cpu);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cpu);
  m.impl("token_logprobs_backward_", &token_logprobs_backward_inplace_cpu);
}

}  // namespace minalign
