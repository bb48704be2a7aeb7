// token_logprobs_fused_: log p(label) of each row and, in the same visit to the row, the
// gradient of sum_r w_r logp_r written over the logits: w_r ([j = y_r] - p_rj). The row
// (V = 50,257 float32 is 200 KB) is read from memory once and written once.
//
// The first pass is the forward's online log-sum-exp (softmax_cpu.h), so log p(label) is
// bit for bit token_logprobs's. It also keeps each term e^{x_j - M_b}, M_b being the
// reference of the block b holding j, in a buffer of one row per thread (in L2 with the
// row). The second pass turns the kept terms into probabilities with one factor per block,
//   p_j = e^{x_j - lse} = e^{x_j - M_b} e^{M_b - lse},
// rather than computing e^x again, which costs more than everything else the pass does
// (about 16 vector instructions per vector of floats), and writes -w p_j as the backward
// does. So the gradient is token_logprobs_backward's with g = w up to rounding, not bit
// for bit: the backward rounds x - lse and then e^x; here x - M_b, e^x, the factor and the
// product each round. M_b <= M <= lse, M being the row's final reference, whose own block
// adds e^0 = 1 to the sum: the factor is at most 1. It is used while it is a normal float
// (at least e^-87): below that it would keep few bits. Such a block, a block before the
// row's first finite logit (its M_b is -inf), and every block of a row whose lse is not
// finite take the backward's path instead, from the logits, which are untouched until the
// second pass writes them.

#include <torch/library.h>

#include <vector>

#include "softmax_cpu.h"

namespace minalign {
namespace {

template <typename T>
void fused_rows(at::Tensor& logits, const int64_t* labels, int64_t ignore_index, const float* weights,
                float* logprobs) {
  const int64_t N = logits.size(0), V = logits.size(1);
  T* x = logits.mutable_data_ptr<T>();
  constexpr bool kFloat = std::is_same_v<T, float>;
  const CpuBlocks& blocks = cpu_blocks();
  at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
    float buf[kBlock];
    std::vector<float> kept(V);                           // e^{x_j - M_b} of the row
    std::vector<float> refs((V + kBlock - 1) / kBlock);  // M_b of each block
    for (int64_t r = begin; r < end; ++r) {
      T* row = x + r * V;
      const int64_t y = labels[r];
      if (y == ignore_index) {
        logprobs[r] = 0.f;
        std::fill(row, row + V, T(0));
        continue;
      }
      RowState st;
      for (int64_t j = 0; j < V; j += kBlock) {
        const int64_t n = std::min(kBlock, V - j);
        fold_block(as_float(row + j, n, buf), n, false, kFloat, st, kept.data() + j);
        refs[j / kBlock] = st.ref;
      }
      const float lse = st.ref + std::log(st.sum);
      logprobs[r] = static_cast<float>(row[y]) - lse;
      const float w = weights[r];
      for (int64_t j = 0; j < V; j += kBlock) {  // from L2 now: no prefetch
        const int64_t n = std::min(kBlock, V - j);
        float* o = kFloat ? reinterpret_cast<float*>(row + j) : buf;
        const float log_factor = refs[j / kBlock] - lse;  // -inf or NaN when either is not finite
        if (log_factor >= -87.f)  // e^{M_b - lse} is a normal float
          blocks.grad_kept(kept.data() + j, n, std::exp(log_factor), w, o);
        else
          grad_block(as_float(row + j, n, buf), n, lse, w, 0.f, 0.f, false, o);
        if (j <= y && y < j + n) o[y - j] += w;
        if constexpr (!kFloat)
          round_block(buf, n, row + j);
      }
    }
  });
}

at::Tensor token_logprobs_fused_cpu(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& weights,
                                    int64_t ignore_index) {
  constexpr const char* op = "minalign.token_logprobs_fused_";
  check_inputs(op, logits, labels, ignore_index);
  const int64_t N = logits.size(0);
  TORCH_CHECK(weights.scalar_type() == at::kFloat, op, ": weights must be float32, got ",
              dtype_name(weights.scalar_type()));
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == N, op, ": weights must have shape [", N, "], got ",
              weights.sizes());
  TORCH_CHECK(weights.device().is_cpu() && weights.is_contiguous(), op,
              ": weights must be a contiguous CPU tensor like the logits");
  at::Tensor logprobs = at::empty({N}, logits.options().dtype(at::kFloat));
  dispatch_logits(op, logits.scalar_type(), [&](auto t) {
    fused_rows<decltype(t)>(logits, labels.const_data_ptr<int64_t>(), ignore_index, weights.const_data_ptr<float>(),
                            logprobs.mutable_data_ptr<float>());
  });
  return logprobs;
}

}  // namespace

TORCH_LIBRARY_IMPL(minalign, CPU, m) {
  m.impl("token_logprobs_fused_", &token_logprobs_fused_cpu);
}

}  // namespace minalign
