"""token_logprobs and sequence_logprobs: the kernels against minalign.reference."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minalign import ops, reference

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="minalign._C is not built")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.HAS_CUDA_KERNELS), reason="no CUDA device or no CUDA kernels"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (values, gradients): both sides read the same rounded logits and accumulate in float32;
# gradients in 16-bit types differ by the last bit of their rounding
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-4, 8e-3), torch.float16: (1e-4, 1e-3)}


def make_inputs(shape, V, dtype, device, pad_cols=0, seed=0):
    """Logits [*shape, V] (the last pad_cols columns -inf, like a padded vocabulary) and labels."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, V, generator=g)).to(dtype)
    if pad_cols:
        logits[..., V - pad_cols:] = float("-inf")
    labels = torch.randint(0, V - pad_cols, shape, generator=g)
    labels.view(-1)[::3] = -100  # some ignored rows
    labels.view(-1)[-1] = V - pad_cols - 1  # the last real column
    return logits.to(device), labels.to(device)


def values_and_grads(fn, logits, labels, return_entropy, seed=1):
    x = logits.detach().clone().requires_grad_()
    out = fn(x, labels, -100, return_entropy)
    logprobs, entropy = out if return_entropy else (out, None)
    g = torch.Generator().manual_seed(seed)
    loss = (torch.randn(logprobs.shape, generator=g).to(x.device) * logprobs).sum()
    if return_entropy:
        loss = loss + (torch.randn(entropy.shape, generator=g).to(x.device) * entropy).sum()
    loss.backward()
    return logprobs, entropy, x.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,V", [((5,), 1), ((4, 3), 3), ((7,), 127), ((2, 3), 1000), ((3,), 50257)])
@pytest.mark.parametrize("return_entropy", [False, True])
def test_token_logprobs_matches_reference(device, dtype, shape, V, return_entropy):
    logits, labels = make_inputs(shape, V, dtype, device, pad_cols=V // 4)
    ours = values_and_grads(ops.token_logprobs, logits, labels, return_entropy)
    ref = values_and_grads(reference.token_logprobs, logits, labels, return_entropy)
    atol, grad_atol = TOL[dtype]
    assert ours[0].dtype == torch.float32 and ours[0].shape == shape
    torch.testing.assert_close(ours[0], ref[0], atol=atol, rtol=1e-5)
    if return_entropy:
        torch.testing.assert_close(ours[1], ref[1], atol=atol, rtol=1e-5)
    assert ours[2].dtype == dtype
    torch.testing.assert_close(ours[2].float(), ref[2].float(), atol=grad_atol, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_vocabulary_columns_are_invisible(device):
    # a model pads V = 50,257 to 50,304 with -inf columns: same log-probs and entropy as
    # the unpadded logits, and a zero gradient on the padding
    logits, labels = make_inputs((6,), 50304, torch.float32, device, pad_cols=47)
    x = logits.clone().requires_grad_()
    logprobs, entropy = ops.token_logprobs(x, labels, return_entropy=True)
    (logprobs.sum() + entropy.sum()).backward()
    exp_logprobs, exp_entropy = reference.token_logprobs(logits[:, :50257], labels, return_entropy=True)
    torch.testing.assert_close(logprobs, exp_logprobs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, exp_entropy, atol=2e-5, rtol=1e-5)
    assert torch.isfinite(x.grad).all()
    assert (x.grad[:, 50257:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_propagate_like_the_reference(device):
    logits, labels = make_inputs((4,), 300, torch.float32, device)
    labels[:] = 5
    logits[1, 17] = float("nan")
    logits[2, 40] = float("inf")
    logits[3] = float("-inf")  # nothing is possible in this row
    ours = ops.token_logprobs(logits, labels, return_entropy=True)
    ref = reference.token_logprobs(logits, labels, return_entropy=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, equal_nan=True)
        assert torch.isfinite(a[0]) and a[1:].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_are_stable(device):
    logits, labels = make_inputs((8,), 1000, torch.float32, device)
    logits = logits * 1e4  # exp would overflow without the max shift
    ours = values_and_grads(ops.token_logprobs, logits, labels, True)
    ref = values_and_grads(reference.token_logprobs, logits, labels, True)
    for a, b in zip(ours, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-5)


def test_max_jumps_between_blocks():
    # the CPU kernel sums relative to the first block's max and raises that reference only
    # when a later block (2,048 logits) goes more than 16 above it: exercise every case
    V = 3 * 2048 + 5
    logits = torch.randn(6, V)
    logits[0, 2 * 2048 + 7] = 60.0  # one far larger logit in the third block
    logits[1] = torch.linspace(-300, 300, V)  # every block raises the max
    logits[2, :2048] = float("-inf")  # nothing in the first block
    logits[3, :2048] = float("-inf")
    logits[3, 5] = float("nan")  # a NaN with no finite logit beside it
    logits[4, 4000:] = float("-inf")  # the last blocks empty
    logits[5, :2048] = torch.finfo(torch.float32).min  # rescaling the entropy's sum must not overflow
    labels = torch.tensor([2 * 2048 + 7, V - 1, 3000, 3000, 10, 3000])
    ours = values_and_grads(ops.token_logprobs, logits, labels, True)
    ref = values_and_grads(reference.token_logprobs, logits, labels, True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, equal_nan=True)
    assert ours[0][3].isnan() and torch.isfinite(ours[0][[0, 1, 2, 4, 5]]).all()
    assert torch.isfinite(ours[1][5]) and torch.isfinite(ours[2][5]).all()  # entropy and gradient


def test_cpu_exp_is_within_an_ulp_over_its_whole_range():
    # In a row [0, d] with d <= -17, lse = log(1 + e^d) rounds to 0, so the backward's
    # gradient of log p(0) at column 1 is exactly -e^d as the kernel's e^x computes it:
    # compare that with double's exp for d all the way down to float's normal range.
    d = torch.linspace(-87.3, -17.0, 200_003)
    logits = torch.stack([torch.zeros_like(d), d], dim=1).requires_grad_()
    ops.token_logprobs(logits, torch.zeros(len(d), dtype=torch.long)).sum().backward()
    got = -logits.grad[:, 1].double()
    want = d.double().exp()
    ulp = torch.ldexp(torch.ones_like(want), torch.frexp(want).exponent - 24)
    bound = 1.2 if ops.cpu_kernels() == "baseline" else 0.95  # x86-64's baseline has no FMA
    assert ((got - want).abs() / ulp).max() <= bound
    # below e^-87.3 (float's smallest normal is e^-87.34) it gives 0, as at -inf
    logits = torch.tensor([[0.0, -87.4], [0.0, -200.0], [0.0, float("-inf")]], requires_grad=True)
    ops.token_logprobs(logits, torch.zeros(3, dtype=torch.long)).sum().backward()
    assert torch.equal(logits.grad[:, 1], torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_logits_are_widened_exactly_and_rounded_to_nearest(dtype):
    # The CPU kernels widen 16-bit logits to float32, compute as for float32 and round
    # each stored gradient to nearest, ties to even: bit for bit the float32 kernels on
    # the widened logits, then torch's own rounding. The rows span the 16-bit types'
    # subnormal gradients, overflow to inf (a weight of 1e5 in float16), -inf logits,
    # NaN, a tail of V % 16 = 13, and exact ties: a row whose only finite logit is not
    # its label has gradient -w there and exactly w at the label, and the last four
    # weights lie halfway between two neighbours in bfloat16 or in float16.
    V = 2 * 2048 + 45
    g = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(10, V, generator=g)).to(dtype)
    logits[1, ::7] = float("-inf")
    logits[2, 10] = float("nan")
    logits[3] = torch.linspace(-40, 8, V)  # gradients down through the subnormals to 0
    logits[4, 100] = 30.0
    logits[6:] = float("-inf")
    logits[6:, 0] = 0.0
    labels = torch.randint(1, V, (10,), generator=g)
    labels[5] = -100
    ties = [1 + 2**-8, -(1 + 3 * 2**-8), 1 + 2**-11, -(1 + 3 * 2**-11)]  # bfloat16, bfloat16, float16, float16
    weights = torch.tensor([1.0, -0.3, 2.0, -1.0, 1e5, 1.0] + ties)
    grad_logps = torch.cat([torch.randn(6, generator=g), torch.tensor(ties)])

    def run(x):
        x = x.clone()
        logps, lse, _ = torch.ops.minalign.token_logprobs(x, labels, -100, False)
        grad = torch.ops.minalign.token_logprobs_backward(grad_logps, None, x, labels, lse, None, -100)
        fused_logps = torch.ops.minalign.token_logprobs_fused_(x, labels, weights, -100)
        return logps, grad, fused_logps, x

    logps, grad, fused_logps, fused_grad = run(logits)
    logps32, grad32, fused_logps32, fused_grad32 = run(logits.float())
    assert torch.equal(logps.nan_to_num(7.0), logps32.nan_to_num(7.0))
    assert torch.equal(fused_logps.nan_to_num(7.0), fused_logps32.nan_to_num(7.0))
    for ours, wide in ((grad, grad32), (fused_grad, fused_grad32)):
        expected = wide.to(dtype)
        assert ours.dtype == dtype
        assert torch.equal(ours.isnan(), expected.isnan())
        assert torch.equal(ours.nan_to_num(7.0).view(torch.int16), expected.nan_to_num(7.0).view(torch.int16))
        assert torch.equal(wide[6:, labels[6:]].diagonal(), torch.tensor(ties))  # the ties reach the rounding
    assert fused_grad[4].isinf().any() == (dtype == torch.float16)  # 1e5 overflows float16 only
    subnormal = (fused_grad[3] != 0) & (fused_grad[3].abs() < torch.finfo(dtype).tiny)
    assert subnormal.any() == (dtype == torch.float16)  # bfloat16's range is float32's


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_conversions_match_torch_for_every_exponent_and_tie(dtype):
    # Widening: each of the 65,536 16-bit values is a logit beside a 0, whose log p is
    # -softplus(-x), strictly monotonic: the same bits as on the widened float32 row.
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    logits = torch.stack([every, torch.zeros_like(every)], 1)  # [65536, 2]
    labels = torch.zeros(len(every), dtype=torch.long)
    narrow = torch.ops.minalign.token_logprobs(logits, labels, -100, False)[0]
    wide = torch.ops.minalign.token_logprobs(logits.float(), labels, -100, False)[0]
    assert torch.equal(narrow.isnan(), wide.isnan()) and torch.equal(narrow.nan_to_num(7.0), wide.nan_to_num(7.0))
    # Rounding: a row [0, -inf] with label 1 has gradient (-g, g) (in float32, exactly),
    # so the stored gradient is g rounded. g runs over every 1,024th float32 bit pattern
    # (every exponent, and the ties of both types, whose low 16 or 13 bits are 0x8000 or
    # 0x1000) and 2^18 random ones; infinities and NaN are left out (-inf * 0 is NaN).
    bits = torch.cat([torch.arange(0, 2**32, 1024, dtype=torch.int64),
                      torch.randint(0, 2**32, (2**18,), generator=torch.Generator().manual_seed(0))])
    g = (bits - (bits >= 2**31).long() * 2**32).to(torch.int32).view(torch.float32)
    g = g[torch.isfinite(g)]
    logits = torch.tensor([0.0, float("-inf")], dtype=dtype).expand(len(g), 2).contiguous()
    labels = torch.ones(len(g), dtype=torch.long)
    lse = torch.zeros(len(g))
    grad = torch.ops.minalign.token_logprobs_backward(g, None, logits, labels, lse, None, -100)
    grad32 = torch.ops.minalign.token_logprobs_backward(g, None, logits.float(), labels, lse, None, -100)
    assert torch.equal(grad32[g != 0], torch.stack([-g, g], 1)[g != 0])  # (and +0 for g = -0)
    assert torch.equal(grad.view(torch.int16), grad32.to(dtype).view(torch.int16))


def test_gradcheck():
    # The kernels compute in float32, so gradcheck runs in float32 with a step and
    # tolerances sized for it; the comparisons with the reference are the tight check.
    logits, labels = make_inputs((4,), 7, torch.float32, "cpu", pad_cols=1)
    labels[0] = -100

    def f(x):
        logprobs, entropy = ops.token_logprobs(x, labels, return_entropy=True)
        return logprobs, entropy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not double precision"
        assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(),), eps=1e-3, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    logits, labels = make_inputs((5,), 33, dtype, device, pad_cols=2)
    logits.requires_grad_()
    for with_entropy in (False, True):
        torch.library.opcheck(torch.ops.minalign.token_logprobs.default, (logits, labels, -100, with_entropy))
    _, lse, entropy = torch.ops.minalign.token_logprobs(logits.detach(), labels, -100, True)
    grad = torch.randn(5, device=device)
    torch.library.opcheck(torch.ops.minalign.token_logprobs_backward.default,
                          (grad, grad.clone(), logits.detach(), labels, lse, entropy, -100))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), V=st.integers(1, 3000), pad=st.integers(0, 50), seed=st.integers(0, 2**31 - 1),
       ignore_index=st.sampled_from([-100, -1, 0]))
def test_token_logprobs_property(n, V, pad, seed, ignore_index):
    pad = min(pad, V - 1)
    logits, labels = make_inputs((n,), V, torch.float32, "cpu", pad_cols=pad, seed=seed)
    labels[labels == -100] = ignore_index
    ours = ops.token_logprobs(logits, labels, ignore_index, return_entropy=True)
    ref = reference.token_logprobs(logits, labels, ignore_index, return_entropy=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_sequence_logprobs_matches_reference(device):
    B, T, V = 3, 7, 300
    logits, labels = make_inputs((B, T), V, torch.float32, device, pad_cols=20)
    mask = torch.ones(B, T, device=device)
    mask[0, 5:] = 0
    mask[1, :2] = 0
    mask[2] = 0  # an empty sequence: sum 0, mean 0
    labels[mask == 0] = -100
    x, xr = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = ops.sequence_logprobs(x, labels, mask, return_entropy=True)
    ref = reference.sequence_logprobs(xr, labels, mask, return_entropy=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert (ours.token_logps[mask == 0] == 0).all() and ours.sum_logps[2] == 0 and ours.mean_logps[2] == 0
    torch.testing.assert_close(ours.mean_logps[0], ours.token_logps[0, :5].mean())
    (ours.sum_logps.sum() + ours.mean_logps.sum() + ours.entropy.sum()).backward()
    (ref.sum_logps.sum() + ref.mean_logps.sum() + ref.entropy.sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=1e-4)
    assert (x.grad[2] == 0).all()


# ------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    logits, labels = make_inputs((4,), 10, torch.float32, device)
    t = lambda values: torch.tensor(values, device=device)
    cases = [
        (TypeError, "float32, bfloat16 or float16", lambda: ops.token_logprobs(logits.double(), labels)),
        (TypeError, "int64", lambda: ops.token_logprobs(logits, labels.int())),
        (ValueError, "shape", lambda: ops.token_logprobs(logits, labels[:3])),
        (ValueError, "shape", lambda: ops.token_logprobs(logits[0], labels)),
        (ValueError, "contiguous", lambda: ops.token_logprobs(logits.t().contiguous().t(), labels)),
        (ValueError, "empty batch", lambda: ops.token_logprobs(logits[:0], labels[:0])),
        (ValueError, "meta", lambda: ops.token_logprobs(logits, labels.to("meta"))),
        (RuntimeError, "out of range", lambda: ops.token_logprobs(logits, t([0, 1, 10, 2]))),
        (RuntimeError, "out of range", lambda: ops.token_logprobs(logits, t([0, -1, 3, 2]))),
        (ValueError, "mask must have shape", lambda: ops.sequence_logprobs(logits[None], labels[None], labels)),
        (ValueError, "labels must have shape", lambda: ops.sequence_logprobs(logits[None], labels[None, :1],
                                                                                 torch.ones(1, 4, device=device))),
        (TypeError, "labels must be a tensor", lambda: ops.sequence_logprobs(logits[None], [[0, 1, 2, 3]],
                                                                                 torch.ones(1, 4, device=device))),
        (ValueError, "mask is on meta", lambda: ops.sequence_logprobs(logits[None], labels[None],
                                                                          torch.ones(1, 4, device="meta"))),
        (TypeError, "ignore_index must be an int64 integer", lambda: ops.token_logprobs(logits, labels, -100.5)),
        (TypeError, "ignore_index must be an int64 integer", lambda: ops.token_logprobs(logits, labels, 2**63)),
    ]
    for error, words, call in cases:
        with pytest.raises(error, match=words):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_checks_its_inputs(device):
    # the operator itself, called without the Python wrapper, refuses bad inputs too
    op = torch.ops.minalign.token_logprobs
    logits, labels = make_inputs((4,), 10, torch.float32, device)
    cases = [
        ("2-D", lambda: op(logits[0], labels, -100, False)),
        ("float32, bfloat16 or float16, got float64", lambda: op(logits.double(), labels, -100, False)),
        ("labels must be int64, got int32", lambda: op(logits, labels.int(), -100, False)),
        ("1-D", lambda: op(logits, labels[:2], -100, False)),
        ("contiguous", lambda: op(logits.t().contiguous().t(), labels, -100, False)),
        ("empty batch", lambda: op(logits[:0], labels[:0], -100, False)),
        (r"labels\[2\] = 12 is out of range", lambda: op(logits, torch.tensor([0, 1, 12, 2], device=device), -100, False)),
    ]
    for words, call in cases:
        with pytest.raises(RuntimeError, match=words):
            call()
    _, lse, _ = op(logits, labels, -100, False)
    ones = lambda n: torch.ones(n, device=device)
    with pytest.raises(RuntimeError, match="grad_logprobs must have shape"):
        torch.ops.minalign.token_logprobs_backward(ones(3), None, logits, labels, lse, None, -100)
    with pytest.raises(RuntimeError, match="without the saved entropy"):
        torch.ops.minalign.token_logprobs_backward(ones(4), ones(4), logits, labels, lse, None, -100)
    # after all these errors the device still works
    torch.testing.assert_close(op(logits, labels, -100, False)[1], lse)


@pytest.mark.parametrize("device", DEVICES)
def test_labels_may_be_any_view(device):
    logits, labels = make_inputs((4,), 10, torch.float32, device, pad_cols=0)
    strided = torch.stack([labels, labels], 1)[:, 0]  # 1-D, every other element
    assert not strided.is_contiguous()
    assert torch.equal(ops.token_logprobs(logits, strided), ops.token_logprobs(logits, labels))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_a_gradient_of_the_gradient_raises_instead_of_being_zero(device, inplace_backward):
    logits, labels = make_inputs((3,), 5, torch.float32, device, pad_cols=0)
    leaf = logits.clone().requires_grad_()
    logprobs = ops.token_logprobs(leaf * 1, labels, inplace_backward=inplace_backward)
    with pytest.raises(RuntimeError, match="double backward|create_graph=True"):
        (grad,) = torch.autograd.grad(logprobs.sum(), leaf, create_graph=True)
        torch.autograd.grad((grad ** 2).sum(), leaf)
