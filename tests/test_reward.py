import math

import pytest
import torch

from minalign.model import GPT, GPTConfig
from minalign.reward import RewardModel, bradley_terry_loss

V = 50


def tiny_rm(seed=0):
    torch.manual_seed(seed)
    return RewardModel(GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()


def test_score_reads_the_last_real_token_whatever_the_padding():
    rm = tiny_rm()
    seq = torch.randint(0, V - 1, (1, 9))
    alone = rm(seq, torch.ones_like(seq, dtype=torch.bool))
    right = torch.cat([seq, torch.full((1, 4), V - 1)], 1)
    right_mask = torch.cat([torch.ones(1, 9, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool)], 1)
    left = torch.cat([torch.full((1, 4), V - 1), seq], 1)
    left_mask = right_mask.flip(1)
    torch.testing.assert_close(rm(right, right_mask), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm(left, left_mask), alone, atol=1e-5, rtol=1e-5)
    # and it is the last token's score, not the first's
    shorter = rm(seq[:, :8], torch.ones(1, 8, dtype=torch.bool))
    assert not torch.allclose(shorter, alone)


def test_head_init_and_from_policy():
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=400, block_size=8))
    rm = RewardModel.from_policy(policy, seed=3)
    assert torch.equal(rm.trunk.wte.weight, policy.wte.weight)
    assert rm.head.bias.item() == 0
    assert rm.head.weight.std().item() == pytest.approx(1 / 401 ** 0.5, rel=0.15)
    state = torch.random.get_rng_state()
    torch.rand(1000)  # other work (an SFT policy trained first) draws from the global generator
    again = RewardModel.from_policy(policy, seed=3)
    assert torch.equal(again.head.weight, rm.head.weight)  # the same model all the same
    assert not torch.equal(RewardModel.from_policy(policy, seed=4).head.weight, rm.head.weight)
    torch.random.set_rng_state(state)
    RewardModel.from_policy(policy, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # and it leaves the global generator alone


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.3, -1.0], requires_grad=True)
    rejected = torch.tensor([0.5, 2.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(chosen - rejected))
    loss.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected
    torch.testing.assert_close(chosen.grad, -rejected.grad)


def test_bradley_terry_margin_and_centring():
    c, r = torch.tensor([1.0]), torch.tensor([0.0])
    assert bradley_terry_loss(c, r, margin=torch.tensor([1.0])).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert bradley_terry_loss(c, r, center_coef=0.5).item() == pytest.approx(
        bradley_terry_loss(c, r).item() + 0.5 * 1.0)
    # centring penalises the sum (r_c + r_r)^2, not the gap: chosen 1, rejected 2 gives 0.5 * 9
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([2.0]), center_coef=0.5).item() == pytest.approx(
        math.log1p(math.e) + 0.5 * 9.0)


def test_tied_scores_are_not_counted_as_right():
    from minalign import data
    from minalign.reward import accuracy_and_margin
    from minalign.tokenizer import get_tokenizer

    tok = get_tokenizer("builtin")
    rm = RewardModel(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=48))
    with torch.no_grad():
        rm.head.weight.zero_()  # every score is the bias: a collapsed reward model ties every pair
    pairs, _ = data.tokenize_pairs([{"prompt": "The plot was", "chosen": " great", "rejected": " dull"}], tok, 48)
    assert accuracy_and_margin(rm, pairs, tok.pad_id, "cpu") == (0.0, 0.0)


def test_normalisation_gives_mean_zero_std_one():
    rm = tiny_rm()
    seqs = torch.randint(0, V - 1, (64, 6))
    mask = torch.ones_like(seqs, dtype=torch.bool)
    raw = rm(seqs, mask).detach()
    rm.fit_normalisation(raw)
    scores = rm(seqs, mask).detach()
    assert abs(scores.mean().item()) < 1e-4 and scores.std().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(scores.argsort(), raw.argsort())  # an increasing map: ranking kept
    state = rm.state_dict()
    assert "gain" in state and "offset" in state  # saved with the checkpoint
    rm.fit_normalisation(scores)  # fitting again, on what it gives now, changes nothing
    torch.testing.assert_close(rm(seqs, mask).detach(), scores, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # scores off by a scale and a shift are fitted back to mean 0, std 1
        rm.gain.mul_(2.0)
        rm.offset.fill_(3.0)
    rm.fit_normalisation(rm(seqs, mask).detach())
    torch.testing.assert_close(rm(seqs, mask).detach(), scores, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no real token"):
        rm(seqs[:2], torch.tensor([[True] * 6, [False] * 6]))


def test_sampled_responses_are_scored_as_sampled_token_for_token():
    from minalign.reward import score_rollouts
    from minalign.rollout import sample_batches
    from minalign.tokenizer import get_tokenizer

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=48))
    rm = RewardModel(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=48)).train()
    prompts = ["The plot was", "I saw it twice and", "Acting:"]
    rollouts = sample_batches(policy, tok, prompts, 12, batch_size=2, seed=3)
    assert [r.sequences.shape[0] for r in rollouts] == [2, 1]
    scores = score_rollouts(rm, rollouts)
    assert rm.training  # left as it was found
    rm.eval()
    one_by_one = []
    for rollout in rollouts:  # each sequence alone, its padding removed: the ids PPO scores
        for ids, mask in zip(rollout.sequences, rollout.attention_mask):
            one_by_one.append(rm(ids[mask][None], torch.ones(1, int(mask.sum()), dtype=torch.bool)))
    torch.testing.assert_close(scores, torch.cat(one_by_one).detach(), atol=1e-5, rtol=1e-5)


def test_accuracy_and_margin_by_hand():
    from minalign import data
    from minalign.model import GPTConfig
    from minalign.reward import RewardModel, accuracy_and_margin, score_pairs
    from minalign.tokenizer import get_tokenizer

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=48,
                               dropout=0.5)).train()
    raw = [{"prompt": "The plot was", "chosen": f" great{'!' * k}", "rejected": f" dull{'.' * k}"} for k in range(8)]
    pairs, _ = data.tokenize_pairs(raw, tok, 48)
    c, r = score_pairs(rm, pairs, tok.pad_id, "cpu", batch_size=3)
    assert rm.training
    rm.eval()
    one = [rm(torch.tensor([ex.input_ids]), torch.ones(1, len(ex.input_ids), dtype=torch.bool)).item()
           for pair in pairs for ex in pair]
    torch.testing.assert_close(torch.stack([c, r], 1).flatten(), torch.tensor(one), atol=1e-5, rtol=1e-5)
    acc, margin = accuracy_and_margin(rm.train(), pairs, tok.pad_id, "cpu")
    assert acc == pytest.approx((c > r).float().mean().item())
    assert margin == pytest.approx((c - r).mean().item(), abs=1e-5)


def test_sampled_responses_are_scored_without_dropout():
    from minalign.model import GPT, GPTConfig
    from minalign.reward import RewardModel, score_rollouts
    from minalign.rollout import sample_batches
    from minalign.tokenizer import get_tokenizer

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=48))
    rm = RewardModel(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=48,
                               dropout=0.5)).train()
    rollouts = sample_batches(policy, tok, ["The plot was", "I saw it"], 8, batch_size=2, seed=3)
    torch.testing.assert_close(score_rollouts(rm, rollouts), score_rollouts(rm, rollouts))
    assert rm.training
