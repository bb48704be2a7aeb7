"""gae: the kernel against an explicit per-element loop and minalign.reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minalign import ops, reference

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="minalign._C is not built")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.HAS_CUDA_KERNELS), reason="no CUDA device or no CUDA kernels"))]


def gae_by_loop(rewards, values, mask, gamma, lam):
    """The spec, one element at a time in float64."""
    B, T = rewards.shape
    adv, ret = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        next_value = next_adv = 0.0
        for t in reversed(range(T)):
            m = float(mask[b, t])
            value = float(values[b, t]) * m
            delta = float(rewards[b, t]) * m + gamma * next_value - value
            next_adv = m * (delta + gamma * lam * next_adv)
            adv[b, t], ret[b, t] = next_adv, next_adv + value
            next_value = value
    return adv.float(), ret.float()


def rollout(B, T, seed=0, device="cpu", ragged=True, gaps=False):
    """Rewards, values and a right-padded mask; with `gaps`, also zeros inside the rows,
    each of which ends an episode as padding does (reference.gae's docstring)."""
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = torch.randint(0, T + 1, (B,), generator=g) if ragged else torch.full((B,), T)
    mask = (torch.arange(T) < lengths[:, None]).float()
    if gaps:
        mask *= (torch.rand(B, T, generator=g) < 0.7).float()
    return rewards.to(device), values.to(device), mask.to(device)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       gamma=st.sampled_from([1.0, 0.99, 0.5, 0.0]), lam=st.sampled_from([0.95, 1.0, 0.0]), gaps=st.booleans())
def test_gae_matches_an_explicit_loop(B, T, seed, gamma, lam, gaps):
    rewards, values, mask = rollout(B, T, seed, gaps=gaps)
    advantages, returns = ops.gae(rewards, values, mask, gamma, lam)
    exp_adv, exp_ret = gae_by_loop(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, exp_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns, exp_ret, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
# T a multiple of 4 takes the GPU's 16-byte loads; rows longer than 1,024 steps are
# scanned tile by tile (1,024 steps per tile), with the value carried between tiles
@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (13, 33), (64, 512), (5, 1024), (3, 3077), (4, 4100)])
@pytest.mark.parametrize("gaps", [False, True])
def test_gae_matches_reference(device, B, T, gaps):
    rewards, values, mask = rollout(B, T, device=device, gaps=gaps)
    for a, b in zip(ops.gae(rewards, values, mask, 0.99, 0.95), reference.gae(rewards, values, mask, 0.99, 0.95)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gae", [ops.gae, reference.gae])
def test_a_zero_inside_the_mask_ends_the_episode_by_hand(device, gae):
    rewards = torch.tensor([[1.0, 2.0, 3.0]], device=device)
    values = torch.tensor([[0.5, 0.7, 0.2]], device=device)
    mask = torch.tensor([[1.0, 0.0, 1.0]], device=device)
    advantages, returns = gae(rewards, values, mask, 1.0, 1.0)
    # t = 2: 3 - 0.2; t = 1: nothing; t = 0: 1 + 0 (the value after it is masked) - 0.5
    torch.testing.assert_close(advantages.cpu(), torch.tensor([[0.5, 0.0, 2.8]]))
    torch.testing.assert_close(returns.cpu(), torch.tensor([[1.0, 0.0, 3.0]]))


@pytest.mark.parametrize("device", DEVICES)
def test_gae_is_the_reward_to_go_at_lambda_1_and_the_td_error_at_lambda_0(device):
    rewards, values, mask = rollout(8, 30, device=device)
    advantages, returns = ops.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # gamma = lam = 1: the return is the sum of the rewards still to come
    future = (rewards * mask).flip(1).cumsum(1).flip(1) * mask
    torch.testing.assert_close(returns, future, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(advantages, future - values * mask, atol=1e-4, rtol=1e-5)
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()
    # lam = 0: one-step TD errors
    advantages, _ = ops.gae(rewards, values, torch.ones_like(mask), gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    torch.testing.assert_close(advantages, rewards + 0.9 * next_values - values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gae_opcheck(device):
    rewards, values, mask = rollout(4, 9, device=device)
    torch.library.opcheck(torch.ops.minalign.gae.default, (rewards, values, mask, 1.0, 0.95))


def test_gae_rejects_bad_inputs():
    rewards, values, mask = rollout(2, 5)
    with pytest.raises(ValueError, match="shape"):
        ops.gae(rewards, values[:, :4], mask)
    with pytest.raises(ValueError, match=r"shape \['B', 'T'\]"):
        ops.gae(rewards[0], values[0], mask[0])
    with pytest.raises(ValueError, match="gamma and lam"):
        ops.gae(rewards, values, mask, gamma=1.5)
    with pytest.raises(ValueError, match="empty batch"):
        ops.gae(rewards[:0], values[:0], mask[:0])
    with pytest.raises(TypeError, match="floating-point"):
        ops.gae(rewards.long(), values, mask)
    with pytest.raises(RuntimeError, match="values must be float32"):
        torch.ops.minalign.gae(rewards, values.double(), mask, 1.0, 0.95)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.minalign.gae(rewards.t().contiguous().t(), values, mask, 1.0, 0.95)
