"""dpo_loss, ppo_policy_loss and ppo_value_loss: the kernels against minalign.reference and by hand."""

import math
import warnings

import pytest
import torch

from minalign import ops, reference

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="minalign._C is not built")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.HAS_CUDA_KERNELS), reason="no CUDA device or no CUDA kernels"))]
VARIANTS = [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.0), ("robust", 0.2)]


def dpo_inputs(B=64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = [-50 + 10 * torch.randn(B, generator=g) for _ in range(4)]
    # two pairs on the hinge's kink, beta * h = 1 for beta 0.5 and 0.1: its gradient there is 0
    for row, kink in ((-2, (-1.0, -3.0, -2.0, -2.0)), (-1, (-1.0, -11.0, -2.0, -2.0))):
        for t, value in zip(logps, kink):
            t[row] = value
    return [t.to(device) for t in logps]


def dpo_values_and_grads(fn, logps, **kw):
    pc, pr = (t.clone().requires_grad_() for t in logps[:2])
    out = fn(pc, pr, *logps[2:], **kw)
    weights = torch.linspace(0.5, 1.5, len(pc), device=pc.device)
    (weights * out.losses).sum().backward()
    return (*out, pc.grad, pr.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_type,label_smoothing", VARIANTS)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_reference(device, loss_type, label_smoothing, beta):
    logps = dpo_inputs(device=device)
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    ours = dpo_values_and_grads(ops.dpo_loss, logps, **kw)
    ref = dpo_values_and_grads(reference.dpo_loss, logps, **kw)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for out in (ours, ref):  # rewards are detached
        assert not out[1].requires_grad and not out[2].requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dpo_loss", [ops.dpo_loss, reference.dpo_loss], ids=["ops", "reference"])
def test_dpo_loss_by_hand(device, dpo_loss):
    zeros = torch.zeros(2, device=device)
    same = [zeros - 3.0, zeros - 3.0, zeros - 5.0, zeros - 5.0]  # policy margin = reference margin
    expected = {("sigmoid", 0.0): math.log(2), ("sigmoid", 0.1): math.log(2), ("ipo", 0.0): (1 / (2 * 0.1)) ** 2,
                ("hinge", 0.0): 1.0, ("robust", 0.0): math.log(2), ("robust", 0.2): math.log(2)}
    for (loss_type, e), value in expected.items():
        out = dpo_loss(*same, beta=0.1, loss_type=loss_type, label_smoothing=e)
        torch.testing.assert_close(out.losses, torch.full_like(zeros, value))
        torch.testing.assert_close(out.chosen_rewards, torch.full_like(zeros, 0.1 * 2))
    # margin h = 1 with beta = 1: -log sigmoid(1) = log(1 + e^-1)
    pc, pr, rc, rr = (torch.tensor([x], device=device) for x in (-1.0, -2.0, -4.0, -4.0))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=1.0).losses.item(), math.log1p(math.exp(-1)))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge").losses.item(), 0.5)
    # conservative DPO, e = 0.1: -(0.9) log sigmoid(1) - 0.1 log sigmoid(-1) = log(1 + e^-1) + 0.1
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=1.0, label_smoothing=0.1).losses.item(),
                               math.log1p(math.exp(-1)) + 0.1)
    # robust DPO, e = 0.2: (-(0.8) log sigmoid(1) + 0.2 log sigmoid(-1)) / 0.6
    robust = (0.8 * math.log1p(math.exp(-1)) - 0.2 * math.log1p(math.exp(1))) / 0.6
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="robust", label_smoothing=0.2
                                        ).losses.item(), robust)
    # each response's implicit reward against its own reference: 0.5 (-1 + 4), 0.5 (-2 + 3)
    out = dpo_loss(pc, pr, rc, torch.tensor([-3.0], device=device), beta=0.5)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((1.5, 0.5))
    # huge margins stay finite: sigmoid loss ~ 0 on the right side, ~ beta |h| on the wrong one
    big = torch.tensor([1e4, -1e4], device=device)
    losses = dpo_loss(big, -big, torch.zeros(2, device=device), torch.zeros(2, device=device), beta=0.1).losses
    torch.testing.assert_close(losses, torch.tensor([0.0, 2e3], device=device))


def test_dpo_gradcheck():
    logps = [t.double().float() for t in dpo_inputs(B=5)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not double precision": the kernels are float32
        for loss_type, e in [("sigmoid", 0.1), ("ipo", 0.0), ("robust", 0.2)]:
            def f(pc, pr):
                return ops.dpo_loss(pc, pr, logps[2], logps[3], beta=0.1, loss_type=loss_type, label_smoothing=e).losses
            inputs = tuple(t.clone().requires_grad_() for t in logps[:2])
            assert torch.autograd.gradcheck(f, inputs, eps=1e-2, atol=2e-3, rtol=1e-2)


def test_dpo_loss_rejects_bad_arguments():
    logps = dpo_inputs(B=4)
    cases = [
        (ValueError, "loss_type", dict(loss_type="kto")),
        (ValueError, "beta", dict(beta=0.0)),
        (ValueError, "label_smoothing", dict(label_smoothing=0.5)),
        (ValueError, "applies to 'sigmoid' and 'robust'", dict(loss_type="ipo", label_smoothing=0.1)),
    ]
    for error, words, kw in cases:
        with pytest.raises(error, match=words):
            ops.dpo_loss(*logps, **kw)
    with pytest.raises(ValueError, match="shape"):
        ops.dpo_loss(logps[0][:3], *logps[1:])
    with pytest.raises(ValueError, match=r"shape \['B'\]"):
        ops.dpo_loss(*(t[None] for t in logps))
    with pytest.raises(TypeError, match="floating-point"):
        ops.dpo_loss(logps[0].long(), *logps[1:])
    with pytest.raises(ValueError, match="empty batch"):
        ops.dpo_loss(*(t[:0] for t in logps))
    with pytest.raises(RuntimeError, match="loss_type must be 0"):
        torch.ops.minalign.dpo_loss(*logps, 0.1, 7, 0.0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.minalign.dpo_loss(torch.zeros(4, 2)[:, 0], *logps[1:], 0.1, 0, 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_dpo_opcheck(device):
    logps = dpo_inputs(B=6, device=device)
    args = (logps[0].requires_grad_(), logps[1].requires_grad_(), logps[2], logps[3])
    for loss_type in range(4):
        torch.library.opcheck(torch.ops.minalign.dpo_loss.default, (*args, 0.1, loss_type, 0.1 * (loss_type != 1)))
    grad = torch.randn(6, device=device)
    plain = tuple(t.detach() for t in args)
    torch.library.opcheck(torch.ops.minalign.dpo_loss_backward.default, (grad, *plain, 0.1, 0, 0.1))


# ------------------------------------------------------------------ PPO


def ppo_inputs(B=6, T=37, device="cpu", seed=0):
    """logprobs, old_logprobs, advantages (or values, old_values, returns) and a ragged right-padded mask."""
    g = torch.Generator().manual_seed(seed)
    a = -2 + torch.randn(B, T, generator=g)
    b = a + 0.3 * torch.randn(B, T, generator=g)  # ratios around 1, many outside [0.8, 1.2]
    c = torch.randn(B, T, generator=g)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).float()
    return [t.to(device) for t in (a, b, c, mask)]


def ppo_values_and_grads(fn, inputs, **kw):
    x = inputs[0].clone().requires_grad_()
    out = fn(x, *inputs[1:], **kw)
    (3.0 * out.loss).backward()
    return (*out, x.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [0.0, 0.2])
@pytest.mark.parametrize("which", ["policy", "value"])
def test_ppo_losses_match_reference(device, clip, which):
    inputs = ppo_inputs(device=device)
    ours_fn, ref_fn = ((ops.ppo_policy_loss, reference.ppo_policy_loss) if which == "policy"
                       else (ops.ppo_value_loss, reference.ppo_value_loss))
    ours = ppo_values_and_grads(ours_fn, inputs, **{"clip_eps" if which == "policy" else "clip": clip})
    ref = ppo_values_and_grads(ref_fn, inputs, **{"clip_eps" if which == "policy" else "clip": clip})
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert ours[0].dim() == 0 and 0 < ours[1] < 1  # some tokens clipped, not all
    assert (ours[-1][inputs[3] == 0] == 0).all()  # no gradient where the mask is 0


@pytest.mark.parametrize("device", DEVICES)
def test_ppo_losses_by_hand(device):
    t = lambda *x: torch.tensor([list(x)], device=device)  # noqa: E731, [1, T]
    # ratio 1: loss = -mean(A) over the mask, nothing clipped, KL 0
    out = ops.ppo_policy_loss(t(-1.0, -2.0, -3.0), t(-1.0, -2.0, -3.0), t(1.0, 2.0, 100.0), t(1, 1, 0))
    torch.testing.assert_close((out.loss.item(), out.clipfrac.item(), out.approx_kl.item()), (-1.5, 0.0, 0.0))
    # A > 0 and ratio e^1 > 1.2: the clipped branch wins, loss = -1.2 A, no gradient
    lp = t(0.0).requires_grad_()
    out = ops.ppo_policy_loss(lp, t(-1.0), t(2.0), t(1.0))
    out.loss.backward()
    torch.testing.assert_close((out.loss.item(), out.clipfrac.item(), out.approx_kl.item()), (-2.4, 1.0, 0.5))
    assert lp.grad.item() == 0
    # value 3, old 1, return 0: clipped value 1.2 has the smaller error, the unclipped 9 counts
    v = t(3.0).requires_grad_()
    out = ops.ppo_value_loss(v, t(1.0), t(0.0), t(1.0))
    out.loss.backward()
    torch.testing.assert_close((out.loss.item(), out.clipfrac.item(), v.grad.item()), (4.5, 0.0, 3.0))
    # value == old value: the clipped value is the value itself, so nothing counts as clipped
    out = ops.ppo_value_loss(t(1.0), t(1.0), t(0.0), t(1.0))
    assert out.clipfrac.item() == 0 and out.loss.item() == pytest.approx(0.5)
    # an all-zero mask: the masked means divide by 1, everything is 0
    out = ops.ppo_value_loss(t(3.0), t(1.0), t(0.0), t(0.0))
    assert out.loss.item() == 0 and out.clipfrac.item() == 0


def test_reference_clamp_has_the_minimum_norm_gradient():
    x = torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5, float("nan")], requires_grad=True)
    y = reference.clamp(x, -0.25, 0.25)
    torch.testing.assert_close(y, torch.clamp(x.detach(), -0.25, 0.25), equal_nan=True)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", [ops, reference], ids=["kernels", "reference"])
def test_ppo_gradients_at_the_ends_of_the_clip_interval(device, impl):
    # There the clamp's slope counts as 0 and the max ties, so half the gradient flows.
    t = lambda *x: torch.tensor([list(x)], device=device)  # noqa: E731, [1, T]
    # ratio 1 with clip_eps 0 sits at both ends: d/dlogp = (1/2 tokens) 0.5 (-A r)
    lp = t(-1.0, -2.0).requires_grad_()
    impl.ppo_policy_loss(lp, t(-1.0, -2.0), t(2.0, -3.0), t(1.0, 1.0), clip_eps=0.0).loss.backward()
    assert lp.grad.tolist() == [[-0.5, 0.75]]
    # value 0.25 from old value 0 with clip 0.25: v_clip == v, d/dv = 0.5 (0.5 * 2 (v - R))
    v = t(0.25).requires_grad_()
    impl.ppo_value_loss(v, t(0.0), t(1.0), t(1.0), clip=0.25).loss.backward()
    assert v.grad.item() == -0.375


def test_ppo_losses_reject_bad_arguments():
    a, b, c, m = ppo_inputs(B=2, T=3)
    for fn in (ops.ppo_policy_loss, ops.ppo_value_loss):
        with pytest.raises(ValueError, match="shape"):
            fn(a, b[:, :2], c, m)
        with pytest.raises(ValueError, match=r"shape \['B', 'T'\]"):
            fn(a[0], b[0], c[0], m[0])
        with pytest.raises(TypeError, match="floating-point"):
            fn(a, b.long(), c, m)
        with pytest.raises(ValueError, match=">= 0"):
            fn(a, b, c, m, -0.1)
    with pytest.raises(RuntimeError, match="mask must be float32"):
        torch.ops.minalign.ppo_policy_loss(a, b, c, m.bool(), 0.2)
    with pytest.raises(RuntimeError, match="empty batch"):
        torch.ops.minalign.ppo_value_loss(a[:0], b[:0], c[:0], m[:0], 0.2)


@pytest.mark.parametrize("device", DEVICES)
def test_ppo_opcheck(device):
    a, b, c, m = ppo_inputs(B=3, T=5, device=device)
    for op in (torch.ops.minalign.ppo_policy_loss, torch.ops.minalign.ppo_value_loss):
        torch.library.opcheck(op.default, (a.clone().requires_grad_(), b, c, m, 0.2))
    grad = torch.tensor(1.5, device=device)
    for op in (torch.ops.minalign.ppo_policy_loss_backward, torch.ops.minalign.ppo_value_loss_backward):
        torch.library.opcheck(op.default, (grad, a, b, c, m, 0.2))


def test_dpo_loss_small_beta_limit():
    """As beta -> 0 the sigmoid loss tends to log 2 whatever the log-probs, with slope
    -beta/2 in the log-ratio difference h (the first-order term of -log sigmoid(beta h))."""
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16) * 5 for _ in range(4))
    h = (pc - pr) - (rc - rr)
    for beta in (1e-3, 1e-5):
        losses = ops.dpo_loss(pc, pr, rc, rr, beta=beta).losses
        torch.testing.assert_close(losses, math.log(2) - beta * h / 2, atol=beta**2 * h.abs().max() ** 2 + 1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_like_the_reference(device):
    # torch.relu and torch.maximum keep a NaN (std::max and fmaxf would drop it), and pass
    # their gradient as autograd does
    nan = float("nan")
    logps = [t.clone() for t in dpo_inputs(B=6, device=device)]
    logps[0][1], logps[2][3] = nan, nan  # a policy and a reference log-prob
    for loss_type, e in VARIANTS:
        kw = dict(beta=0.5, loss_type=loss_type, label_smoothing=e)
        for a, b in zip(dpo_values_and_grads(ops.dpo_loss, logps, **kw),
                        dpo_values_and_grads(reference.dpo_loss, logps, **kw)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, equal_nan=True)
    g = torch.Generator().manual_seed(0)
    a, b, c = (0.3 * torch.randn(2, 5, generator=g).to(device) for _ in range(3))
    mask = torch.ones(2, 5, device=device)
    b[0, 1], c[1, 2] = nan, nan  # an old log-prob / old value, an advantage / return
    for fn, ref in ((ops.ppo_policy_loss, reference.ppo_policy_loss), (ops.ppo_value_loss, reference.ppo_value_loss)):
        x, y = a.clone().requires_grad_(), a.clone().requires_grad_()
        ours, theirs = fn(x, b, c, mask, 0.2), ref(y, b, c, mask, 0.2)
        ours.loss.backward()
        theirs.loss.backward()
        torch.testing.assert_close(ours.loss, theirs.loss, equal_nan=True)
        torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_out_numbers_in_and_no_double_backward(device):
    logps = [t.double() for t in dpo_inputs(B=4, device=device)]
    assert ops.dpo_loss(*logps).losses.dtype == torch.float32  # as with the reference fallback
    half = [t.bfloat16() for t in logps]  # 16-bit inputs are widened, not computed in 16 bits
    torch.testing.assert_close(ops.dpo_loss(*half, loss_type="ipo").losses,
                               reference.dpo_loss(*(t.float() for t in half), loss_type="ipo").losses)
    with pytest.raises(TypeError, match="beta must be a number"):
        ops.dpo_loss(*logps, beta=torch.tensor(0.1, requires_grad=True))
    pc = logps[0].float().requires_grad_()
    (grad,) = torch.autograd.grad(ops.dpo_loss(pc, *logps[1:]).losses.sum(), pc, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(grad.sum(), pc)
    x, mask = torch.randn(2, 3, device=device, requires_grad=True), torch.ones(2, 3, device=device)
    for fn in (ops.ppo_policy_loss, ops.ppo_value_loss):
        (grad,) = torch.autograd.grad(fn(x, x.detach() + 0.1, x.detach(), mask, 0.2).loss, x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(grad.sum(), x)


@pytest.mark.parametrize("fn", [ops.dpo_loss, reference.dpo_loss])
def test_reference_log_probs_get_no_gradient(fn):
    pc, pr, rc, rr = (t.clone().requires_grad_() for t in dpo_inputs(B=5))
    fn(pc, pr, rc, rr).losses.sum().backward()
    assert rc.grad is None and rr.grad is None  # constants of the loss
    assert pc.grad is not None and pr.grad is not None
