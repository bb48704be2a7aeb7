"""token_logprobs(..., inplace_backward=True): the gradient written over the logits."""

import pytest
import torch

from minalign import ops, reference
from test_ops_logprobs import DEVICES, DTYPES, TOL, make_inputs

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="minalign._C is not built")


def values_and_grads(logits, labels, return_entropy, inplace_backward, fn=ops.token_logprobs):
    """Values and the gradient w.r.t. a non-leaf copy of logits (a leaf is refused in place)."""
    leaf = logits.detach().clone().requires_grad_()
    x = leaf.clone()  # stands for a model's output: not a leaf, nothing else reads it
    if fn is ops.token_logprobs:
        out = fn(x, labels, -100, return_entropy, inplace_backward=inplace_backward)
    else:
        out = fn(x, labels, -100, return_entropy)
    logprobs, entropy = out if return_entropy else (out, None)
    g = torch.Generator().manual_seed(1)
    loss = (torch.randn(logprobs.shape, generator=g).to(x.device) * logprobs).sum()
    if return_entropy:
        loss = loss + (torch.randn(entropy.shape, generator=g).to(x.device) * entropy).sum()
    loss.backward()
    return logprobs, entropy, leaf.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,V", [((5,), 1), ((4, 3), 3), ((7,), 127), ((2, 3), 1001), ((3,), 50257)])
@pytest.mark.parametrize("return_entropy", [False, True])
def test_inplace_backward_matches_default_and_reference(device, dtype, shape, V, return_entropy):
    logits, labels = make_inputs(shape, V, dtype, device, pad_cols=V // 4)
    inplace = values_and_grads(logits, labels, return_entropy, True)
    default = values_and_grads(logits, labels, return_entropy, False)
    ref = values_and_grads(logits, labels, return_entropy, False, fn=reference.token_logprobs)
    for a, b in zip(inplace, default):  # the same kernel writes either way
        assert (a is None and b is None) or torch.equal(a, b)
    atol, grad_atol = TOL[dtype]
    torch.testing.assert_close(inplace[0], ref[0], atol=atol, rtol=1e-5)
    if return_entropy:
        torch.testing.assert_close(inplace[1], ref[1], atol=atol, rtol=1e-5)
    assert inplace[2].dtype == dtype
    torch.testing.assert_close(inplace[2].float(), ref[2].float(), atol=grad_atol, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_inplace_gradient_aliases_the_logits(device, inplace_backward):
    logits, labels = make_inputs((6,), 300, torch.float32, device)
    x = logits.clone().requires_grad_().clone()  # [6, 300], not a leaf
    seen = []
    x.register_hook(seen.append)  # the gradient w.r.t. x, as backward produced it
    ops.token_logprobs(x, labels, inplace_backward=inplace_backward).sum().backward()
    (grad,) = seen
    aliases = grad.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert aliases == inplace_backward
    if inplace_backward:
        assert torch.equal(x.detach(), grad)  # the logits now hold their gradient
    else:
        assert torch.equal(x.detach(), logits)  # untouched


@pytest.mark.parametrize("device", DEVICES)
def test_sequence_logprobs_inplace_backward(device):
    B, T, V = 3, 5, 301
    logits, labels = make_inputs((B, T), V, torch.float32, device, pad_cols=7)
    mask = (labels != -100).float()
    grads = []
    for inplace_backward in (False, True):
        leaf = logits.clone().requires_grad_()
        out = ops.sequence_logprobs(leaf * 1, labels, mask, inplace_backward=inplace_backward)
        out.sum_logps.sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


def test_inplace_backward_refuses_leaves_and_their_views():
    logits, labels = make_inputs((4,), 10, torch.float32, "cpu")
    leaf = logits.clone().requires_grad_()
    for x, y in ((leaf, labels), (leaf.view(2, 2, 10), labels.view(2, 2)), (leaf[1:], labels[1:])):
        with pytest.raises(ValueError, match="leaf"):
            ops.token_logprobs(x, y, inplace_backward=True)
    with pytest.raises(ValueError, match="leaf"):
        ops.sequence_logprobs(leaf[None], labels[None], torch.ones(1, 4), inplace_backward=True)
    # without grad there is no backward, so nothing to refuse; a non-leaf is accepted
    ops.token_logprobs(logits, labels, inplace_backward=True)
    with torch.no_grad():
        ops.token_logprobs(leaf, labels, inplace_backward=True)
    ops.token_logprobs(leaf * 2, labels, inplace_backward=True).sum().backward()


def test_inplace_backward_fails_loudly_when_the_logits_are_needed_later():
    logits, labels = make_inputs((4,), 10, torch.float32, "cpu")
    leaf = logits.clone().requires_grad_()
    x = leaf * 1
    square = (x * x).sum()  # MulBackward saves x and runs after token_logprobs' backward
    loss = ops.token_logprobs(x, labels, inplace_backward=True).sum() + square
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    x = leaf * 1
    loss = ops.token_logprobs(x, labels, inplace_backward=True).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the saved logits are gone


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_inplace(device, dtype):
    logits, labels = make_inputs((5,), 33, dtype, device, pad_cols=2)
    for with_entropy in (False, True):
        x = logits.clone().requires_grad_()
        torch.library.opcheck(torch.ops.minalign.token_logprobs.default, (x, labels, -100, with_entropy, True))
    _, lse, entropy = torch.ops.minalign.token_logprobs(logits, labels, -100, True)
    grad = torch.randn(5, device=device)
    torch.library.opcheck(torch.ops.minalign.token_logprobs_backward_.default,
                          (grad, grad.clone(), logits.clone(), labels, lse, entropy, -100))
    torch.library.opcheck(torch.ops.minalign.token_logprobs_backward_.default,
                          (grad, None, logits.clone(), labels, lse, None, -100))
