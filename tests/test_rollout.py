"""response_logprobs: the log-probs PPO's ratio and KL penalty are built from."""

import pytest
import torch

from minalign.rollout import Rollout, response_logprobs
from test_model import V, left_pad, tiny_model


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_response_logprobs_are_those_of_the_sampling_distribution(temperature):
    # Each response token scored one row at a time, unpadded, under softmax(logits / T):
    # the distribution a token sampled at temperature T was drawn from.
    model = tiny_model(seed=3, scale=4.0)
    prompts = [[1, 2, 3], [4, 5]]
    responses = [[7, 8, 9, 10], [11, 12]]  # the second ends early: right padding after it
    prompt_ids, prompt_mask = left_pad(prompts)
    response_ids = torch.full((2, 4), V - 1)
    response_mask = torch.zeros(2, 4, dtype=torch.bool)
    for i, r in enumerate(responses):
        response_ids[i, : len(r)] = torch.tensor(r)
        response_mask[i, : len(r)] = True
    out = response_logprobs(model, Rollout(prompt_ids, prompt_mask, response_ids, response_mask),
                            return_entropy=True, temperature=temperature)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        logits, _ = model(torch.tensor([p + r]))
        logp = (logits[0, len(p) - 1 : len(p) + len(r) - 1] / temperature).log_softmax(-1)  # (len(r), Vp)
        expected = logp.gather(1, torch.tensor(r)[:, None]).squeeze(1)
        torch.testing.assert_close(out.token_logps[i, : len(r)], expected, atol=2e-5, rtol=1e-5)
        entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
        torch.testing.assert_close(out.entropy[i, : len(r)], entropy, atol=2e-5, rtol=1e-5)
        assert (out.token_logps[i, len(r):] == 0).all()
        torch.testing.assert_close(out.sum_logps[i], expected.sum(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_inplace_backward_gives_the_same_gradients(temperature):
    # PPO's training pass: the gradient is written over the logits (scaled by 1/T first)
    model = tiny_model(seed=5, scale=4.0)
    prompt_ids, prompt_mask = left_pad([[1, 2, 3], [4, 5]])
    response_ids = torch.tensor([[7, 8, 9], [11, 12, V - 1]])
    rollout = Rollout(prompt_ids, prompt_mask, response_ids, response_ids != V - 1)
    weights = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, 3.0]])
    grads = []
    for inplace in (False, True):
        model.zero_grad()
        out = response_logprobs(model, rollout, temperature=temperature, inplace_backward=inplace)
        (out.token_logps * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, inplace in zip(*grads):
        torch.testing.assert_close(inplace, plain, atol=0, rtol=0)


def test_check_room_names_the_flag_before_any_sampling():
    from minalign.cli import ArgumentError
    from minalign.rollout import check_room
    from minalign.tokenizer import get_tokenizer

    tok = get_tokenizer("builtin")
    model = tiny_model()  # a block of 48 tokens
    prompts = ["The acting was", "I saw it on a rainy afternoon with my friends"]
    longest = max(len(tok.encode(p)) for p in prompts)
    check_room(model.config.block_size, tok, prompts, 48 - longest, "--max-new-tokens")  # fits exactly
    with pytest.raises(ArgumentError, match=f"^--max-new-tokens {49 - longest}: prompts of up to {longest} tokens leave "
                                            f"room for {48 - longest} in the model's block of 48: pass "
                                            f"--max-new-tokens {48 - longest} or less$"):
        check_room(model.config.block_size, tok, prompts, 49 - longest, "--max-new-tokens")
    with pytest.raises(ArgumentError, match=f"prompts of up to {longest} tokens leave room for 0 in the model's block "
                                            f"of {longest}$"):  # no value fits: none suggested
        check_room(longest, tok, prompts, 1, "--max-new-tokens")


def test_evaluation_scores_both_models_without_dropout():
    import copy

    from minalign.evaluate import evaluate_policy
    from minalign.model import GPT, GPTConfig
    from minalign.tokenizer import get_tokenizer

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=32, dropout=0.5))
    reference = copy.deepcopy(policy).train()  # left in training mode by its caller
    policy.train()
    result = evaluate_policy(policy, reference, tok, ["The plot was", "I saw it"], max_new_tokens=6)
    assert result["kl"] == 0.0  # the same weights: the same distribution
    # but independent samples of it: the win rate compares two draws, not one twice
    assert any(s["response"] != s["ref_response"] for s in result["samples"])
    assert policy.training and reference.training  # modes restored


def test_evaluation_counts_ties_half_and_kl_from_the_policys_side():
    import copy

    from minalign.evaluate import evaluate_policy
    from minalign.model import GPT, GPTConfig
    from minalign.tokenizer import get_tokenizer

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    reference = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=32))
    sharper = copy.deepcopy(reference)
    with torch.no_grad():
        sharper.wte.weight.mul_(3.0)  # a policy far from the reference
    prompts = ["The plot was", "I saw it", "This film"]
    tie = evaluate_policy(sharper, reference, tok, prompts, max_new_tokens=6, judge=lambda texts: [0.0] * len(texts))
    assert tie["win_rate"] == 0.5  # every comparison a tie
    assert tie["kl"] > 0.1  # KL(pi || pi_ref) on pi's samples: positive (the opposite sign would be negative)
    by_length = evaluate_policy(sharper, reference, tok, prompts, max_new_tokens=6,
                                judge=lambda texts: [float(len(t)) for t in texts])
    wins = [1.0 if s["gold"] > s["ref_gold"] else 0.5 if s["gold"] == s["ref_gold"] else 0.0
            for s in by_length["samples"]]
    assert by_length["win_rate"] == pytest.approx(sum(wins) / 3)
    # each mean comes with its standard error over the prompts, from the per-sample figures
    assert tie["win_rate_stderr"] == 0.0
    for name, values in (("win_rate", wins), ("gold_reward", [s["gold"] for s in by_length["samples"]]),
                         ("kl", [s["kl"] for s in by_length["samples"]])):
        values = torch.tensor(values, dtype=torch.float64)
        assert by_length[name] == pytest.approx(values.mean().item(), rel=1e-5)
        assert by_length[f"{name}_stderr"] == pytest.approx(values.std().item() / 3 ** 0.5, rel=1e-5)


def test_evaluation_samples_and_takes_the_kl_at_the_temperature_given():
    import copy

    from minalign.evaluate import evaluate_policy
    from minalign.model import GPT, GPTConfig
    from minalign.rollout import response_logprobs, sample
    from minalign.tokenizer import get_tokenizer

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    reference = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=32)).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        policy.wte.weight.mul_(2.0)
    prompts = ["The plot was", "I saw it", "This film"]
    result = evaluate_policy(policy, reference, tok, prompts, max_new_tokens=6, seed=5, temperature=0.5)
    # by hand: the policy's samples under the same seed, both models' log-probs at temperature 0.5
    rollout = sample(policy, tok, prompts, 6, torch.Generator().manual_seed(5), temperature=0.5)
    kl = (response_logprobs(policy, rollout, temperature=0.5).sum_logps
          - response_logprobs(reference, rollout, temperature=0.5).sum_logps)
    assert [s["response"] for s in result["samples"]] == rollout.response_texts(tok)
    assert result["kl"] == pytest.approx(kl.mean().item(), abs=1e-5)
    ref_rollout = sample(reference, tok, prompts, 6, torch.Generator().manual_seed(6), temperature=0.5)
    assert [s["ref_response"] for s in result["samples"]] == ref_rollout.response_texts(tok)
    assert result["temperature"] == 0.5
    at_one = evaluate_policy(policy, reference, tok, prompts, max_new_tokens=6, seed=5)
    assert at_one["kl"] != pytest.approx(result["kl"], abs=1e-3)


def test_response_texts_leave_out_eos_and_padding():
    from minalign.rollout import Rollout
    from minalign.tokenizer import get_tokenizer

    tok = get_tokenizer("builtin")
    a, b = tok.encode(" great fun."), tok.encode(" dull")
    width = max(len(a), len(b)) + 2
    ids, mask = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.bool)
    for row, tokens in enumerate((a + [tok.eos_id], b)):  # one ended with EOS, one ran out of room
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = True
    rollout = Rollout(ids[:, :1], torch.ones(2, 1, dtype=torch.bool), ids, mask)
    assert rollout.response_texts(tok) == [" great fun.", " dull"]
    assert rollout.ended(tok.eos_id).tolist() == [True, False]


def test_a_batch_of_prompts_of_different_lengths_samples_as_each_prompt_alone():
    from minalign.model import GPT, GPTConfig
    from minalign.rollout import sample
    from minalign.tokenizer import get_tokenizer

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=48)).eval()
    with torch.no_grad():  # larger weights: varied greedy continuations
        for p in model.parameters():
            p.mul_(4.0)
    prompts = ["The plot was", "I saw it twice and it was"]  # the first is left-padded in the batch
    batch = sample(model, tok, prompts, 8, temperature=0)
    for i, prompt in enumerate(prompts):  # padding is masked out and positions start at each prompt
        alone = sample(model, tok, [prompt], 8, temperature=0).response_ids[0]
        assert torch.equal(batch.response_ids[i, : len(alone)], alone)


def test_evaluation_judges_prompt_and_response_and_scores_them_unpadded():
    import copy

    from minalign.evaluate import evaluate_policy
    from minalign.model import GPT, GPTConfig
    from minalign.reward import RewardModel
    from minalign.rollout import sample
    from minalign.tokenizer import get_tokenizer

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=32)
    reference, reward_model = GPT(config).eval(), RewardModel(config).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        policy.wte.weight.mul_(2.0)
    prompts = ["The plot was", "I saw it twice and it was", "This film"]  # padded to different lengths
    result = evaluate_policy(policy, reference, tok, prompts, max_new_tokens=6, seed=5, reward_model=reward_model,
                             judge=lambda texts: [float(len(t)) for t in texts])
    for prompt, s in zip(prompts, result["samples"]):
        assert s["gold"] == len(prompt + s["response"])  # the judge reads the whole review
    rollout = sample(policy, tok, prompts, 6, torch.Generator().manual_seed(5))
    assert result["response_length"] == pytest.approx(rollout.response_mask.sum(1).float().mean().item())  # with EOS
    alone = [reward_model(ids[m][None], torch.ones(1, int(m.sum()), dtype=torch.bool)).item()
             for ids, m in zip(rollout.sequences, rollout.attention_mask)]  # each sequence without its padding
    assert result["rm_score"] == pytest.approx(sum(alone) / len(alone), abs=1e-5)


def test_rows_of_a_rollout_are_its_minibatch():
    prompt_ids, response_ids = torch.arange(8).view(4, 2), torch.arange(100, 112).view(4, 3)
    rollout = Rollout(prompt_ids, prompt_ids > 0, response_ids, response_ids % 2 == 0)
    idx = torch.tensor([3, 1])
    mb = rollout.rows(idx)
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask"):
        assert torch.equal(getattr(mb, name), getattr(rollout, name)[idx]), name


def test_sampled_completions_say_which_ended(monkeypatch):
    from minalign import rollout
    from minalign.tokenizer import get_tokenizer

    tok = get_tokenizer("builtin")
    a, b = tok.encode(" It was"), tok.encode(" fine")
    ids = torch.tensor([[*a, tok.eos_id, tok.pad_id], [*b, *b, *b][: len(a) + 2]])  # (2, N): row 0 ends, row 1 runs out
    mask = torch.tensor([[True] * (len(a) + 1) + [False], [True] * (len(a) + 2)])
    prompts = torch.tensor([[5], [6]])
    fake = Rollout(prompts, torch.ones_like(prompts, dtype=torch.bool), ids, mask)
    monkeypatch.setattr(rollout, "sample_batches", lambda *args, **kwargs: [fake])
    texts, ended = rollout.sample_completions(None, tok, ["p", "q"], max_new_tokens=len(a) + 2)
    assert ended == [True, False]
    assert texts[0] == " It was" and texts == rollout.sample_texts(None, tok, ["p", "q"], len(a) + 2)


def test_eval_json_holds_no_nan(tmp_path):
    import json
    import math

    from minalign.evaluate import stderr, write_eval

    one_prompt = stderr(torch.tensor([0.5]))  # no spread to estimate from one figure
    assert math.isnan(one_prompt)
    path = write_eval(tmp_path, {"gold_reward": 0.5, "gold_reward_stderr": one_prompt})
    strict = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in eval.json"))
    assert strict == {"gold_reward": 0.5, "gold_reward_stderr": "nan"}
