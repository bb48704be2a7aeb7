"""minalign's CUDA kernels, compiled for the CPU (tests/cuda_on_cpu), against the reference.

Most machines that build minalign have no GPU, so the CUDA kernels' own tests skip
there. These run the kernels' device code on CPU threads, one per CUDA thread, with
real barriers for __syncthreads and the warp shuffles: they check the arithmetic,
the indexing of rows at every alignment, the shared-memory cache of the fused kernel
and the block reductions, on every machine with a C++20 compiler. The GPU's own
exp2f and logf differ in the last bits from the CPU's, so values are compared with
the reference to a tolerance, and the kernels with each other bit for bit.

Built with a sanitizer (MINALIGN_CUDA_ON_CPU_CXXFLAGS adds compiler flags), the same
tests do what compute-sanitizer does on a GPU: AddressSanitizer finds reads and writes
past the logits (memcheck), ThreadSanitizer races between the threads of a block, such
as a shared value read without a barrier after its write (racecheck). Either fails the
command:

    ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD=$(c++ -print-file-name=libasan.so) \
    MINALIGN_CUDA_ON_CPU_CXXFLAGS="-fsanitize=address -g -O1" python -m pytest tests/test_cuda_kernels_on_cpu.py

    OMP_NUM_THREADS=1 LD_PRELOAD=$(c++ -print-file-name=libtsan.so) \
    MINALIGN_CUDA_ON_CPU_CXXFLAGS="-fsanitize=thread -g -O1" python -m pytest tests/test_cuda_kernels_on_cpu.py

(ThreadSanitizer cannot see the synchronisation of torch's own OpenMP threads, hence
OMP_NUM_THREADS=1; AddressSanitizer stops the process at the first error, so add -s to
pytest to see its report.) Without a sanitizer, a 16-byte vector access at an address
that is not a multiple of 16, which faults on a GPU, stops the process the same way
(csrc/cuda_common.cuh, as_vectors).
"""

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minalign import reference

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
IGNORE = -100
# (values, gradients), as in test_ops_logprobs: 16-bit gradients differ by their rounding
TOL = {torch.float32: (2e-5, 1e-6), torch.bfloat16: (1e-4, 8e-3), torch.float16: (1e-4, 1e-3)}


# The most blocks stage 1 of the sums in csrc/sum_cuda.cuh takes: 1,024 on a GPU, fewer
# here, where each block's threads take turns on the CPU.
SUM_MAX_PARTIALS = 260


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """The kernels as a shared library, built once per test run (a file a process)."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None or not sys.platform.startswith("linux"):
        if os.environ.get("MINALIGN_EXPECT_EXTENSION"):  # CI: a compiler built the extension
            pytest.fail("no C++ compiler found to build the CUDA kernels for the CPU")
        pytest.skip("needs a C++20 compiler on Linux")
    folder = tmp_path_factory.mktemp("cuda_on_cpu")
    library = folder / "kernels.so"
    includes = [f"-I{p}" for p in [ROOT / "csrc", ROOT / "tests" / "cuda_on_cpu", Path(torch.__file__).parent / "include"]]
    names = ("logprobs", "gae", "dpo", "ppo")
    extra = os.environ.get("MINALIGN_CUDA_ON_CPU_CXXFLAGS", "").split()  # see the top of the file
    warnings = ["-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas"]  # #pragma unroll is nvcc's
    flags = [compiler, "-std=c++20", "-O2", "-fPIC", "-pthread", *warnings, *includes,
             f"-DMINALIGN_SUM_MAX_PARTIALS={SUM_MAX_PARTIALS}", *extra]
    compiles = [subprocess.Popen([*flags, "-c", ROOT / "tests" / "cuda_on_cpu" / f"{name}.cpp", "-o", folder / f"{name}.o"],
                                 stderr=subprocess.PIPE, text=True) for name in names]
    for name, compile_ in zip(names, compiles):
        errors = compile_.communicate()[1]
        assert compile_.returncode == 0, f"{name}.cpp: {errors[-4000:]}"
    built = subprocess.run([*flags, "-shared", *(folder / f"{name}.o" for name in names), "-o", library],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    lib = ctypes.CDLL(str(library))
    P, I64, INT, BOOL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_bool
    lib.token_logprobs.argtypes = [INT, BOOL, P, P, I64, I64, I64, P, P, P, P]
    lib.token_logprobs_backward.argtypes = [INT, BOOL, BOOL, P, P, P, P, P, P, I64, I64, I64, P]
    lib.token_logprobs_fused.argtypes = [INT, P, P, P, I64, I64, I64, I64, P]
    lib.find_bad_label.argtypes = [P, I64, I64, I64, ctypes.c_uint, P]
    lib.gae.argtypes = [BOOL, P, P, P, I64, I64, ctypes.c_float, ctypes.c_float, P, P]
    F64 = ctypes.c_double
    lib.dpo_loss.argtypes = [P, P, P, P, I64, F64, I64, F64, P, P, P]
    lib.dpo_loss_backward.argtypes = [P, P, P, P, P, I64, F64, I64, F64, P, P]
    lib.ppo_policy_loss.argtypes = [P, P, P, P, I64, F64, P, P, P]
    lib.ppo_policy_loss_backward.argtypes = [P, P, P, P, P, I64, F64, P]
    lib.ppo_value_loss.argtypes = [P, P, P, P, I64, F64, P, P]
    lib.ppo_value_loss_backward.argtypes = [P, P, P, P, P, I64, F64, P]
    return lib


def ptr(t):
    return None if t is None else t.data_ptr()


def misaligned(t, offset):
    """A copy of t in memory that starts `offset` elements past a 64-byte boundary and
    ends where its allocation does (so that AddressSanitizer sees a read past the end)."""
    buf = torch.empty(offset + t.numel(), dtype=t.dtype)
    assert buf.data_ptr() % 64 == 0, "torch's CPU allocations start on 64-byte boundaries"
    out = buf[offset:].view(t.shape)
    out.copy_(t)
    return out


def aligned_like(t):
    """A copy of t whose rows have the alignment of t's (as the 16-byte backward needs)."""
    return misaligned(t, t.data_ptr() % 64 // t.element_size())


def make_inputs(N, V, dtype, seed=0):
    """Logits [N, V] with ignored rows, -inf columns, a row of -inf but its label, a NaN row."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1::3] = IGNORE
    if V > 4:
        logits[0, (labels[0] + 1) % V] = float("-inf")
        logits[2, :] = float("-inf")
        logits[2, labels[2]] = 0.0
        logits[3 % N, V // 2] = float("nan")
    return logits, labels


def run_forward(kernels, logits, labels, with_entropy):
    N, V = logits.shape
    logprobs, lse, entropy = (torch.full((N,), -7.0) for _ in range(3))
    first_bad_row = torch.tensor([N])
    kernels.token_logprobs(DTYPES[logits.dtype], with_entropy, ptr(logits), ptr(labels), N, V, IGNORE,
                           ptr(logprobs), ptr(lse), ptr(entropy), ptr(first_bad_row))
    return logprobs, lse, entropy if with_entropy else None, int(first_bad_row)


def run_backward(kernels, logits, labels, lse, entropy, g, h, out, wide):
    N, V = logits.shape
    kernels.token_logprobs_backward(DTYPES[logits.dtype], h is not None, wide, ptr(g), ptr(h), ptr(logits),
                                    ptr(labels), ptr(lse), ptr(entropy), N, V, IGNORE, ptr(out))
    return out


def reference_values_and_grad(logits, labels, g, h):
    """Log-probs, lse, entropy and the gradient of sum(g logprobs + h entropy), in float64."""
    x = logits.double().requires_grad_()
    logprobs, entropy = reference.token_logprobs(x, labels, IGNORE, return_entropy=True)
    loss = (g * logprobs).sum() + ((h * entropy).sum() if h is not None else 0)
    loss.backward()
    return logprobs.detach().double(), torch.logsumexp(x.detach(), -1), entropy.detach().double(), x.grad


def same_bits(a, b):
    """Equal bit for bit, except that one NaN is as good as another (sign and payload may differ)."""
    nan = a.isnan()
    bits = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(bits)[~nan], b.view(bits)[~nan])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 3, 9, 1001, 20011])  # 20,011: several rounds of loads per thread
@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_forward_and_backward_match_the_reference(kernels, dtype, V, offset, with_entropy):
    logits, labels = make_inputs(5, V, dtype, seed=V + offset)
    logits = misaligned(logits, offset)  # rows start anywhere in a 16-byte vector
    g, h = torch.randn(2, 5, generator=torch.Generator().manual_seed(V))
    h = h if with_entropy else None
    logprobs, lse, entropy, bad = run_forward(kernels, logits, labels, with_entropy)
    grad = run_backward(kernels, logits, labels, lse, entropy, g, h, aligned_like(logits), wide=True)
    ref_logprobs, ref_lse, ref_entropy, ref_grad = reference_values_and_grad(logits, labels, g, h)

    value_tol, grad_tol = TOL[dtype]
    assert bad == 5, "no label is out of range"
    torch.testing.assert_close(logprobs.double(), ref_logprobs, atol=value_tol, rtol=1e-5, equal_nan=True)
    trained = labels != IGNORE
    torch.testing.assert_close(lse[trained].double(), ref_lse[trained], atol=value_tol, rtol=1e-5, equal_nan=True)
    if with_entropy:
        torch.testing.assert_close(entropy.double(), ref_entropy, atol=value_tol, rtol=1e-5, equal_nan=True)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad.to(dtype).double(), atol=grad_tol, rtol=1e-3, equal_nan=True)
    assert (grad[~trained] == 0).all()
    # the element-wise backward (rows of logits and gradient aligned differently) is the same
    narrow = run_backward(kernels, logits, labels, lse, entropy, g, h, misaligned(torch.zeros_like(logits), 1),
                          wide=False)
    assert same_bits(narrow, grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [3, 1001, 20011])
@pytest.mark.parametrize("cached", ["none", "part", "all"])
def test_fused_kernel_is_the_forward_and_backward_bit_for_bit(kernels, dtype, V, cached):
    logits, labels = make_inputs(6, V, dtype, seed=V)
    logits = misaligned(logits, 1)
    weights = torch.randn(6, generator=torch.Generator().manual_seed(V))
    whole_vectors = V // (16 // logits.element_size())
    cached_vecs = {"none": 0, "part": whole_vectors // 3, "all": whole_vectors}[cached]

    # The fused kernel writes the gradient over its logits; their copy keeps the rows'
    # alignment, which decides the order a row is summed in, and so the last bit of lse.
    x = aligned_like(logits)
    fused_logprobs = torch.full((6,), -7.0)
    kernels.token_logprobs_fused(DTYPES[dtype], ptr(x), ptr(labels), ptr(weights), 6, V, IGNORE, cached_vecs,
                                 ptr(fused_logprobs))
    logprobs, lse, _, _ = run_forward(kernels, logits, labels, with_entropy=False)
    grad = run_backward(kernels, logits, labels, lse, None, weights, None, aligned_like(logits), wide=True)

    assert same_bits(fused_logprobs, logprobs)
    assert same_bits(x, grad)
    # ... and both are right
    ref_logprobs, _, _, ref_grad = reference_values_and_grad(logits, labels, weights, None)
    torch.testing.assert_close(x.double(), ref_grad.to(dtype).double(), atol=TOL[dtype][1], rtol=1e-3, equal_nan=True)


def test_out_of_range_labels_are_found_and_never_used(kernels):
    N, V = 40, 50
    labels = torch.randint(0, V, (N,))
    labels[::5] = IGNORE
    labels[[31, 17, 36]] = torch.tensor([V, -1, 10**12])
    logprobs, _, _, bad = run_forward(kernels, torch.randn(N, V), labels, with_entropy=False)
    assert bad == 17  # the first
    assert logprobs[[17, 31, 36]].isnan().all() and not logprobs[labels.ge(0) & labels.lt(V)].isnan().any()


def test_the_label_check_before_the_fused_kernel_covers_every_row(kernels):
    # two blocks of 256 threads over 1,300 rows: each thread checks several
    N, V = 1300, 50
    labels = torch.randint(0, V, (N,))
    labels[::7] = IGNORE
    first_bad_row = torch.tensor([N])
    kernels.find_bad_label(ptr(labels), N, V, IGNORE, 2, ptr(first_bad_row))
    assert int(first_bad_row) == N
    labels[[1299, 611, 1024]] = torch.tensor([V, -2, 10**12])
    kernels.find_bad_label(ptr(labels), N, V, IGNORE, 2, ptr(first_bad_row))
    assert int(first_bad_row) == 611


# A tile is 1,024 steps; the 16-byte path (vec4) needs T % 4 == 0.
@pytest.mark.parametrize("T,vec4", [(1, False), (3, False), (255, False), (1027, False), (3001, False),
                                    (4, True), (1024, True), (2052, True), (2052, False)])
def test_gae_matches_the_reference(kernels, T, vec4):
    B, gamma, lam = 4, 0.99, 0.95
    g = torch.Generator().manual_seed(T)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = [T, max(T // 2, 1), 1, 0]  # right padding; the last row is all padding
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).float()
    mask[0] *= (torch.rand(T, generator=g) < 0.7).float()  # zeros inside a row end its episodes too
    advantages, returns = torch.full((B, T), 7.0), torch.full((B, T), 7.0)
    kernels.gae(vec4, ptr(rewards), ptr(values), ptr(mask), B, T, gamma, gamma * lam, ptr(advantages), ptr(returns))
    expected = reference.gae(rewards, values, mask, gamma, lam)  # a loop over t: other rounding
    torch.testing.assert_close(advantages, expected.advantages, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(returns, expected.returns, atol=1e-4, rtol=1e-5)
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()


@pytest.mark.parametrize("loss_type,label_smoothing",
                         [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_dpo_loss_matches_the_reference(kernels, loss_type, label_smoothing):
    n, beta = 1000, 0.5  # four blocks
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-20 * torch.rand(n, generator=g) for _ in range(4))
    pc[:5], pr[:5], rc[:5], rr[:5] = -1.0, -3.0, -2.0, -2.0  # beta h = 1 exactly: the hinge's kink
    pc[5], rr[6] = float("nan"), float("nan")  # NaN stays NaN (fmaxf would drop it from the hinge)
    grad_losses = torch.randn(n, generator=g)
    losses, chosen, rejected, grad_chosen, grad_rejected = (torch.full((n,), 7.0) for _ in range(5))
    kind = ("sigmoid", "ipo", "hinge", "robust").index(loss_type)
    kernels.dpo_loss(ptr(pc), ptr(pr), ptr(rc), ptr(rr), n, beta, kind, label_smoothing,
                     ptr(losses), ptr(chosen), ptr(rejected))
    kernels.dpo_loss_backward(ptr(grad_losses), ptr(pc), ptr(pr), ptr(rc), ptr(rr), n, beta, kind, label_smoothing,
                              ptr(grad_chosen), ptr(grad_rejected))
    x = [t.clone().requires_grad_() for t in (pc, pr)]
    expected = reference.dpo_loss(*x, rc, rr, beta, loss_type, label_smoothing)
    expected.losses.backward(grad_losses)
    torch.testing.assert_close(losses, expected.losses.detach(), atol=1e-6, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(chosen, expected.chosen_rewards, equal_nan=True)
    torch.testing.assert_close(rejected, expected.rejected_rewards, equal_nan=True)
    torch.testing.assert_close(grad_chosen, x[0].grad, atol=1e-6, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(grad_rejected, x[1].grad, atol=1e-6, rtol=1e-5, equal_nan=True)


def ppo_inputs(n, seed=0):
    """Three [n] float32 tensors and a mask; the value loss's max ties where its gradient depends on the tie."""
    g = torch.Generator().manual_seed(seed)
    a, b, c = (0.3 * torch.randn(n, generator=g) for _ in range(3))
    mask = (torch.rand(n, generator=g) < 0.8).float()
    b[: n // 10] = a[: n // 10]  # ratio 1 (policy), values at their old values
    c[n // 10 : n // 5] = 0.0  # zero advantages
    # value 1 clipped to 0.25 around old value 0, return 0.625: (v - R)^2 == (v_clip - R)^2, and
    # only the first term passes a gradient (torch.maximum gives each half)
    a[n // 5 :: 7], b[n // 5 :: 7], c[n // 5 :: 7] = 1.0, 0.0, 0.625
    a[n // 5 + 3 :: 7], b[n // 5 + 3 :: 7] = 0.25, 0.0  # v - old at the end of the clip interval
    return a, b, c, mask


@pytest.mark.parametrize("n", [1, 300, 5000])
def test_ppo_losses_match_the_reference(kernels, n):
    logp, old, adv, mask = ppo_inputs(n)
    scalars = [torch.full((), 7.0) for _ in range(5)]
    kernels.ppo_policy_loss(ptr(logp), ptr(old), ptr(adv), ptr(mask), n, 0.25, *map(ptr, scalars[:3]))
    kernels.ppo_value_loss(ptr(logp), ptr(old), ptr(adv), ptr(mask), n, 0.25, *map(ptr, scalars[3:]))
    grad_loss = torch.tensor(0.7)
    policy_grad, value_grad = torch.full((n,), 7.0), torch.full((n,), 7.0)
    kernels.ppo_policy_loss_backward(ptr(grad_loss), ptr(logp), ptr(old), ptr(adv), ptr(mask), n, 0.25,
                                     ptr(policy_grad))
    kernels.ppo_value_loss_backward(ptr(grad_loss), ptr(logp), ptr(old), ptr(adv), ptr(mask), n, 0.25,
                                    ptr(value_grad))

    x = logp.clone().requires_grad_()
    policy = reference.ppo_policy_loss(x, old, adv, mask, 0.25)
    (grad_loss * policy.loss).backward()
    v = logp.clone().requires_grad_()  # the same numbers as values, old values and returns
    value = reference.ppo_value_loss(v, old, adv, mask, 0.25)
    (grad_loss * value.loss).backward()
    for ours, theirs in zip(scalars, [policy.loss, policy.clipfrac, policy.approx_kl, value.loss, value.clipfrac]):
        torch.testing.assert_close(ours, theirs.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(policy_grad, x.grad, atol=1e-9, rtol=1e-5)
    torch.testing.assert_close(value_grad, v.grad, atol=1e-9, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_of_rows_that_start_at_the_lowest_float(kernels, dtype):
    # Rebasing the entropy's sum from a max near float's lowest: shift * sum overflows to
    # -inf, and its scale is 0; the sum must stay finite, as the reference's does.
    logits = 3 * torch.randn(4, 20011, generator=torch.Generator().manual_seed(1))
    logits[:, :9000] = torch.finfo(dtype).min
    logits = logits.to(dtype)
    labels = torch.tensor([9000, 12000, 20010, 15000])
    logprobs, lse, entropy, _ = run_forward(kernels, logits, labels, True)
    ref_logprobs, _, ref_entropy, _ = reference_values_and_grad(logits, labels, torch.ones(4), torch.ones(4))
    assert entropy.isfinite().all()
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logprobs.double(), ref_logprobs, atol=1e-4, rtol=1e-5)


def test_ppo_losses_propagate_nan_like_the_reference(kernels):
    logp, old, adv, mask = ppo_inputs(300)
    old[10], adv[20] = float("nan"), float("nan")  # an old log-prob / old value, an advantage / return
    scalars = [torch.full((), 7.0) for _ in range(5)]
    kernels.ppo_policy_loss(ptr(logp), ptr(old), ptr(adv), ptr(mask), 300, 0.25, *map(ptr, scalars[:3]))
    kernels.ppo_value_loss(ptr(logp), ptr(old), ptr(adv), ptr(mask), 300, 0.25, *map(ptr, scalars[3:]))
    grads = torch.full((300,), 7.0), torch.full((300,), 7.0)
    one = torch.tensor(1.0)
    kernels.ppo_policy_loss_backward(ptr(one), ptr(logp), ptr(old), ptr(adv), ptr(mask), 300, 0.25, ptr(grads[0]))
    kernels.ppo_value_loss_backward(ptr(one), ptr(logp), ptr(old), ptr(adv), ptr(mask), 300, 0.25, ptr(grads[1]))
    for i, fn in enumerate((reference.ppo_policy_loss, reference.ppo_value_loss)):
        x = logp.clone().requires_grad_()
        expected = fn(x, old, adv, mask, 0.25)
        expected.loss.backward()
        torch.testing.assert_close(scalars[3 * i], expected.loss.detach(), equal_nan=True)
        torch.testing.assert_close(grads[i], x.grad, atol=1e-9, rtol=1e-5, equal_nan=True)


def test_ppo_losses_with_nothing_under_the_mask_are_zero(kernels):
    # masked means divide by max(sum(mask), 1): an empty mask gives 0, not 0/0
    logp, old, adv, _ = ppo_inputs(300)
    mask = torch.zeros(300)
    scalars = [torch.full((), 7.0) for _ in range(5)]
    kernels.ppo_policy_loss(ptr(logp), ptr(old), ptr(adv), ptr(mask), 300, 0.25, *map(ptr, scalars[:3]))
    kernels.ppo_value_loss(ptr(logp), ptr(old), ptr(adv), ptr(mask), 300, 0.25, *map(ptr, scalars[3:]))
    assert all(s.item() == 0.0 for s in scalars)
    grad, grad_loss = torch.full((300,), 7.0), torch.tensor(1.0)  # named: alive while the kernel reads them
    kernels.ppo_policy_loss_backward(ptr(grad_loss), ptr(logp), ptr(old), ptr(adv), ptr(mask), 300, 0.25, ptr(grad))
    assert (grad == 0).all()


# More tokens than the blocks of stage 1 cover in one pass, and more partials than
# stage 2 has threads (256). The policy loss alone (the value loss runs the same
# two-stage reduction; the backward maps have no reduction).
@pytest.mark.slow
def test_ppo_reduction_over_more_tokens_than_one_pass_of_the_grid(kernels):
    assert SUM_MAX_PARTIALS > 256
    n = SUM_MAX_PARTIALS * 256 + 4321
    logp, old, adv, mask = ppo_inputs(n)
    scalars = [torch.full((), 7.0) for _ in range(3)]
    kernels.ppo_policy_loss(ptr(logp), ptr(old), ptr(adv), ptr(mask), n, 0.25, *map(ptr, scalars))
    policy = reference.ppo_policy_loss(logp, old, adv, mask, 0.25)
    for ours, theirs in zip(scalars, [policy.loss, policy.clipfrac, policy.approx_kl]):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_a_misaligned_vector_access_stops_with_a_message(kernels):
    # 16-byte stores to a gradient 4 bytes past a 16-byte boundary fault on a GPU; here
    # as_vectors stops the process first, so it runs in a child process
    code = f"""if True:
        import ctypes, torch
        lib = ctypes.CDLL({kernels._name!r})
        P, I64 = ctypes.c_void_p, ctypes.c_int64
        lib.token_logprobs_backward.argtypes = [ctypes.c_int, ctypes.c_bool, ctypes.c_bool, P, P, P, P, P, P,
                                                I64, I64, I64, P]
        N, V = 2, 64
        logits, labels, g = torch.randn(N, V), torch.zeros(N, dtype=torch.long), torch.ones(N)
        lse = torch.logsumexp(logits, -1)
        out = torch.empty(N * V + 1)[1:]
        lib.token_logprobs_backward(0, False, True, g.data_ptr(), None, logits.data_ptr(), labels.data_ptr(),
                                    lse.data_ptr(), None, N, V, {IGNORE}, out.data_ptr())
        print("no stop")
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no stop" not in result.stdout
    assert "cuda_on_cpu: a 16-byte vector access at 0x" in result.stderr and "not 16-byte aligned" in result.stderr
