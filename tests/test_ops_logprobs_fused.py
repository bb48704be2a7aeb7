"""weighted_logprob_sum: the gradient computed during the forward, against minalign.reference."""

import math

import pytest
import torch

from minalign import ops, reference
from test_ops_logprobs import DEVICES, DTYPES, TOL, make_inputs

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="minalign._C is not built")


def weights_for(labels, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(labels.shape, generator=g).to(labels.device)


def fused_value_and_grad(logits, labels, weights, upstream=1.0):
    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1  # not a leaf: what a model's last layer gives
    loss = ops.weighted_logprob_sum(x, labels, weights)
    (upstream * loss).backward()
    return loss.detach(), leaf.grad


def reference_value_and_grad(logits, labels, weights, upstream=1.0):
    leaf = logits.detach().clone().requires_grad_()
    loss = reference.weighted_logprob_sum(leaf, labels, weights)
    (upstream * loss).backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,V", [((5,), 1), ((4, 3), 3), ((7,), 127), ((2, 3), 1001), ((3,), 50257)])
def test_matches_reference(device, dtype, shape, V):
    logits, labels = make_inputs(shape, V, dtype, device, pad_cols=2 if V > 2 else 0)
    weights = weights_for(labels)
    value, grad = fused_value_and_grad(logits, labels, weights)
    ref_value, ref_grad = reference_value_and_grad(logits, labels, weights)
    value_tol, grad_tol = TOL[dtype]
    torch.testing.assert_close(value, ref_value, atol=value_tol * labels.numel(), rtol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=grad_tol, rtol=1e-3 if dtype != torch.float32 else 1e-5)
    assert grad.dtype == dtype
    assert (grad.view(-1, V)[labels.view(-1) == -100] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_and_upstream_gradient(device):
    # w = -1/n on the trained rows is F.cross_entropy's mean; an upstream gradient of 3
    # scales the stored gradient
    logits, labels = make_inputs((6, 4), 301, torch.float32, device)
    trained = labels != -100
    weights = -trained.float() / trained.sum()
    value, grad = fused_value_and_grad(logits, labels, weights, upstream=3.0)
    leaf = logits.detach().clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(leaf.view(-1, 301), labels.view(-1))
    (3 * expected).backward()
    torch.testing.assert_close(value, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, leaf.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_logits_hold_the_gradient_and_savers_fail(device):
    logits, labels = make_inputs((5,), 50, torch.float32, device)
    weights = weights_for(labels)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1
    ops.weighted_logprob_sum(x, labels, weights)  # writes the gradient over x
    _, ref_grad = reference_value_and_grad(logits, labels, weights)
    torch.testing.assert_close(x.detach(), ref_grad, atol=1e-6, rtol=1e-5)  # overwritten in forward
    # a node that saved the logits before the call fails loudly instead of reading the gradient
    leaf2 = logits.clone().requires_grad_()
    x2 = leaf2 * 1
    squared = x2 * x2
    loss2 = ops.weighted_logprob_sum(x2, labels, weights)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss2 + squared.sum()).backward()


@pytest.mark.parametrize("device", DEVICES)
def test_without_a_gradient_nothing_is_overwritten(device):
    logits, labels = make_inputs((4, 2), 30, torch.bfloat16, device)
    weights = weights_for(labels)
    before = logits.clone()
    with torch.no_grad():
        value = ops.weighted_logprob_sum(logits, labels, weights)
    assert torch.equal(logits, before)
    torch.testing.assert_close(value, reference.weighted_logprob_sum(logits, labels, weights), atol=1e-4, rtol=1e-5)


def test_bad_inputs():
    logits, labels = make_inputs((4,), 10, torch.float32, "cpu")
    weights = weights_for(labels)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1
    cases = [
        (ValueError, "the fused forward would write the gradient over a leaf", lambda: ops.weighted_logprob_sum(leaf, labels, weights)),
        (ValueError, "view of a leaf", lambda: ops.weighted_logprob_sum(leaf.view(2, 2, 10), labels.view(2, 2), weights.view(2, 2))),
        (ValueError, "weights must be a floating-point tensor", lambda: ops.weighted_logprob_sum(x, labels, weights[:3])),
        (ValueError, "weights must be a floating-point tensor", lambda: ops.weighted_logprob_sum(x, labels, labels)),
        (TypeError, "int64", lambda: ops.weighted_logprob_sum(x, labels.int(), weights)),
        (ValueError, "contiguous", lambda: ops.weighted_logprob_sum(x.t().contiguous().t(), labels, weights)),
    ]
    for error, words, call in cases:
        with pytest.raises(error, match=words):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_label_is_reported_before_anything_is_overwritten(device):
    logits, _ = make_inputs((5,), 10, torch.float32, device)
    labels = torch.tensor([0, -100, 10, 2, -1], device=device)  # rows 2 and 4 out of range
    weights = torch.ones(5, device=device)
    x = logits.clone().requires_grad_() * 1
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match=r"labels\[2\] = 10 is out of range"):
        ops.weighted_logprob_sum(x, labels, weights)
    assert torch.equal(x.detach(), before)


def float64_gradient(logits, labels, weights):
    """w ([j = y] - p) computed in float64 (minalign.reference works in float32), 0 on ignored rows."""
    p = torch.softmax(logits.double(), -1)
    kept = labels != -100
    onehot = torch.zeros_like(p)
    onehot[kept, labels[kept]] = 1
    return weights.double()[:, None] * (onehot - p) * kept[:, None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_scale", [1.0, 1e-6])  # SFT's weights are -1/(tokens in the batch)
def test_against_the_forward_and_backward_kernels(device, dtype, weight_scale):
    # log p(label) is the forward kernel's, bit for bit. The CUDA kernel computes
    # p = e^(x - lse) as the backward kernel does, so its gradient is bit for bit that
    # too. The CPU kernel scales the terms e^(x - M) its first pass kept, so its gradient
    # differs in rounding only, and is as close to float64's as the backward's.
    V = 3 * 2048 + 11
    logits, labels = make_inputs((15,), V, dtype, device, pad_cols=4)
    logits = logits * 3  # lse from 30 to 40: its rounding weighs on every e^(x - lse)
    weights = weights_for(labels) * weight_scale
    x = logits.clone()
    fused_logps = torch.ops.minalign.token_logprobs_fused_(x, labels, weights, -100)
    logps, lse, _ = torch.ops.minalign.token_logprobs(logits, labels, -100, False)
    grad = torch.ops.minalign.token_logprobs_backward(weights, None, logits, labels, lse, None, -100)
    assert torch.equal(fused_logps, logps)
    if device == "cuda":
        assert torch.equal(x, grad)
        return
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(x, grad, rtol=ulp, atol=1e-30)
    if dtype == torch.float32:  # 16-bit results are dominated by their own rounding
        exact = float64_gradient(logits, labels, weights)
        normal = exact.abs() > 1e-30 * weight_scale
        fused_error = ((x.double() - exact).abs() / exact.abs())[normal].max()
        split_error = ((grad.double() - exact).abs() / exact.abs())[normal].max()
        assert fused_error < 1e-5 and fused_error <= 2 * split_error


@pytest.mark.skipif(not (torch.cuda.is_available() and ops.HAS_CUDA_KERNELS), reason="no CUDA device or no CUDA kernels")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_cache_size_changes_nothing_but_speed(dtype, monkeypatch):
    # MINALIGN_FUSED_CACHE_KB: none of the row kept in shared memory, part of it, all of it
    logits, labels = make_inputs((9,), 3 * 2048 + 11, dtype, "cuda", pad_cols=4)
    weights = weights_for(labels)
    results = []
    for kb in ["", "0", "1", "200"]:
        monkeypatch.setenv("MINALIGN_FUSED_CACHE_KB", kb)
        x = logits.clone()
        results.append((torch.ops.minalign.token_logprobs_fused_(x, labels, weights, -100), x))
    for logps, grad in results[1:]:
        assert torch.equal(logps, results[0][0]) and torch.equal(grad, results[0][1])
    monkeypatch.setenv("MINALIGN_FUSED_CACHE_KB", "lots")
    x = logits.clone()
    with pytest.raises(RuntimeError, match="MINALIGN_FUSED_CACHE_KB must be a whole number"):
        torch.ops.minalign.token_logprobs_fused_(x, labels, weights, -100)
    assert torch.equal(x, logits)


@pytest.mark.skipif(not (torch.cuda.is_available() and ops.HAS_CUDA_KERNELS), reason="no CUDA device or no CUDA kernels")
def test_cuda_graph_capture_and_replay_give_the_eager_step():
    # Nothing in a step may wait for the GPU while a CUDA graph is captured: the label
    # checks and the fused backward's test of its upstream gradient are skipped then.
    logits, labels = make_inputs((6, 5), 1001, torch.float32, "cuda", pad_cols=3)
    weights = weights_for(labels)
    leaf = logits.clone().requires_grad_()

    def step():
        fused = ops.weighted_logprob_sum(leaf * 1, labels, weights)
        logps, entropy = ops.token_logprobs(leaf * 2, labels, return_entropy=True)
        (fused + logps.sum() + 0.5 * entropy.sum()).backward()
        return fused.detach(), logps.detach()

    eager = step()
    eager_grad = leaf.grad.clone()
    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            leaf.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(leaf.grad, eager_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_jumps_between_blocks_nan_and_inf_match_the_reference(device, dtype):
    # The CPU kernel sums each block of 2,048 logits against a reference it raises only
    # when a block's max goes more than 16 above it, and keeps each block's terms with
    # their reference for the gradient: every case of that, NaN and inf, row by row.
    inf, nan = float("inf"), float("nan")
    V = 3 * 2048 + 5
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(4))
    logits[0, 2 * 2048 + 7] = 60.0  # one far larger logit in the third block
    logits[1] = torch.linspace(-300, 300, V)  # every block raises the reference
    logits[2, :2048] = -inf  # nothing in the first block
    logits[3, :2048] = -inf
    logits[3, 5] = nan  # a NaN with no finite logit beside it
    logits[4, 4000:] = -inf  # the last blocks empty
    logits[5] = -inf  # no finite logit at all
    logits[6, 100] = inf
    logits[7] -= 200  # log-sum-exp far below 0, after an empty block
    logits[7, :2048] = -inf
    logits = logits.to(dtype).to(device)
    labels = torch.tensor([2 * 2048 + 7, V - 1, 3000, 3000, 10, 3, 100, 5000], device=device)
    weights = torch.linspace(-1.5, 2.0, 8, device=device)
    x = logits.clone()
    logps = torch.ops.minalign.token_logprobs_fused_(x, labels, weights, -100)
    leaf = logits.clone().requires_grad_()
    ref_logps = reference.token_logprobs(leaf, labels)
    (weights * ref_logps).sum().backward()
    _, grad_tol = TOL[dtype]
    torch.testing.assert_close(logps, ref_logps.detach(), atol=2e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(x.float(), leaf.grad.float(), atol=grad_tol, rtol=1e-3, equal_nan=True)
    assert logps[[0, 1, 2, 4, 7]].isfinite().all() and logps[[3, 5, 6]].isnan().all()


@pytest.mark.parametrize("top,weight", [(100.0, 1.0), (86.0, -1e-4)])
def test_blocks_far_below_the_log_sum_exp_keep_their_precision(top, weight):
    # The CPU kernel scales a block's kept terms e^(x - M) by e^(M - lse). Below e^-87 that
    # factor would be a float denormal with few bits left, so such a block computes
    # e^(x - lse) from its logits instead (top = 100), as the backward kernel does. Above
    # it, p = e^(x - M) e^(M - lse) is formed first and then weighted, so a small weight
    # cannot make the factor denormal either (top = 86).
    V = 3 * 2048
    logits = torch.zeros(1, V)
    logits[0, 2048:4096] = torch.linspace(0, 16, 2048)  # terms up to e^16 against M = 0
    logits[0, 5000] = top  # raises the reference in the third block: lse = top
    labels = torch.tensor([5000])
    weights = torch.tensor([weight])
    x = logits.clone()
    torch.ops.minalign.token_logprobs_fused_(x, labels, weights, -100)
    exact = float64_gradient(logits, labels, weights)
    normal = exact.abs() > 1e-37  # gradients well inside float's normal range
    assert normal[0, 2048:4096].sum() > 100
    relative_error = (x.double() - exact).abs()[normal] / exact.abs()[normal]
    assert relative_error.max() < 1e-5


def test_probabilities_below_the_normal_range_are_0_as_in_the_backward():
    # e^x gives 0 below e^-87.3; the kept terms times their factor can go lower (e^-103
    # here), and are then 0 too, not float denormals.
    V = 3 * 2048
    logits = torch.zeros(1, V)
    logits[0, :2048] = torch.linspace(-87, 0, 2048)  # kept terms from e^-87 to 1
    logits[0, 5000] = 16.0  # lse = 16, the reference stays 0: the factor is e^-16
    labels = torch.tensor([5000])
    x = logits.clone()
    torch.ops.minalign.token_logprobs_fused_(x, labels, torch.ones(1), -100)
    denormal = (x != 0) & (x.abs() < torch.finfo(torch.float32).tiny)
    assert not denormal.any()
    assert (x[0, :2048] == 0).sum() > 300  # e^(x - 16) below float's normal range


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    logits, labels = make_inputs((6,), 37, dtype, device)
    weights = weights_for(labels)
    torch.library.opcheck(torch.ops.minalign.token_logprobs_fused_.default, (logits, labels, weights, -100))


def test_torch_compile():
    logits, labels = make_inputs((6,), 50, torch.float32, "cpu")
    weights = weights_for(labels)
    step = torch.compile(lambda leaf: ops.weighted_logprob_sum(leaf * 1, labels, weights), fullgraph=True)
    for upstream in (1.0, 2.5):  # the compiled backward always scales by the upstream gradient
        leaf = logits.clone().requires_grad_()
        loss = step(leaf)
        (upstream * loss).backward()
        ref_value, ref_grad = reference_value_and_grad(logits, labels, weights, upstream)
        torch.testing.assert_close(loss.detach(), ref_value, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(leaf.grad, ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_large_vocabularies(device):
    # V of Llama 3 (128,256) and Gemma (256,000), a few rows each
    for V in (128256, 256000):
        logits, labels = make_inputs((3,), V, torch.bfloat16, device, pad_cols=5)
        weights = weights_for(labels)
        value, grad = fused_value_and_grad(logits, labels, weights)
        ref_value, ref_grad = reference_value_and_grad(logits, labels, weights)
        torch.testing.assert_close(value, ref_value, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(grad.float(), ref_grad.float(), atol=8e-3, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("N, V", [(2, 2**30 + 3), (32_771, 65_537)], ids=["long rows", "many rows"])
@pytest.mark.parametrize("device", DEVICES)
def test_offsets_beyond_2_to_the_31(device, N, V):
    # N * V > 2^31 logits (4 GiB of bf16): offsets must be 64-bit, within a row (the
    # long rows) and to its start (row * V, past 2^31 from row 32,768 of the many). All
    # zeros but the last logit of the last row (5), so the answers are known in closed form.
    base = torch.zeros(1, device=device, requires_grad=True)
    x = base.to(torch.bfloat16).expand(N, V).contiguous()  # not a leaf: the fused op may overwrite it
    with torch.no_grad():
        x[-1, -1] = 5.0
    labels = torch.zeros(N, dtype=torch.long, device=device)
    labels[-1] = V - 1
    z = V - 1 + math.exp(5.0)  # the last row's sum of exponentials
    expected = torch.full((N,), -math.log(V))
    expected[-1] = 5.0 - math.log(z)
    with torch.no_grad():
        logprobs = ops.token_logprobs(x, labels)
    torch.testing.assert_close(logprobs.cpu(), expected, atol=2e-4, rtol=0)
    weights = torch.zeros(N, device=device)
    weights[-1] = 1.0
    loss = ops.weighted_logprob_sum(x, labels, weights)
    assert abs(loss.item() - (5.0 - math.log(z))) < 2e-4
    grad = x.detach()
    assert grad[:-1].amin().item() == 0 == grad[:-1].amax().item()  # weight 0
    assert grad[-1, -1].item() == pytest.approx(1 - math.exp(5.0) / z, abs=2e-3)  # bf16: steps of 2^-8 below 1
    assert grad[-1, V // 2].item() == pytest.approx(-1 / z, rel=1e-2)  # past 2^31 from the start


@pytest.mark.parametrize("device", DEVICES)
def test_weights_get_their_gradient_and_double_backward_raises(device):
    # d loss / d w_i = log p(label_i), as in the reference; a gradient of the gradient is refused
    logits, labels = make_inputs((6,), 40, torch.float32, device)
    weights = weights_for(labels)
    w = weights.clone().requires_grad_()
    ops.weighted_logprob_sum(logits.clone().requires_grad_() * 1, labels, w).backward()
    w_ref = weights.clone().requires_grad_()
    reference.weighted_logprob_sum(logits.clone().requires_grad_(), labels, w_ref).backward()
    torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-5, rtol=1e-5)
    leaf = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(ops.weighted_logprob_sum(leaf * 1.5, labels, weights), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice|does not require grad"):
        torch.autograd.grad((grad ** 2).sum(), leaf)
