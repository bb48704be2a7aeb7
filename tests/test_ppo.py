"""PPO's pieces, and tiny end-to-end runs of train_ppo.py."""

import json
import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from minalign import ops
from minalign.ppo import (AdaptiveKLController, explained_variance, kl_estimate, masked_whiten, single_process,
                          token_rewards, token_share)
from script_runs import run_script

ROOT = Path(__file__).resolve().parents[1]


def ragged_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T), right-padded


def test_gae_matches_an_explicit_reversed_loop():
    torch.manual_seed(0)
    lengths, T, gamma, lam = [5, 1, 8, 3], 8, 0.99, 0.9
    mask = ragged_mask(lengths, T)
    rewards, values = torch.randn(4, T), torch.randn(4, T)
    advantages, returns = ops.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0  # after the end: 0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            last = delta + gamma * lam * last
            assert advantages[b, t].item() == pytest.approx(last, abs=1e-5)
            assert returns[b, t].item() == pytest.approx(last + values[b, t].item(), abs=1e-5)
        assert (advantages[b, n:] == 0).all() and (returns[b, n:] == 0).all()


def _ppo_pieces(rows, all_sum=single_process, world_size=1) -> dict:
    """Whitened advantages, explained variance, and PPO's gradient and figures as DDP
    would average them, on `rows` of a fixed batch whose rows differ in length (2 and 3
    real tokens against 6 and 5) and in advantage (the first two rows' run higher)."""
    g = torch.Generator().manual_seed(0)
    mask = ragged_mask([2, 3, 6, 5], 6)[rows]
    raw_advantages = (torch.randn(4, 6, generator=g) + torch.tensor([[2.0], [2.0], [0.0], [0.0]]))[rows]
    logps, old_logps = (-torch.rand(4, 6, generator=g))[rows], (-torch.rand(4, 6, generator=g))[rows]
    values, old_values, returns = (torch.randn(4, 6, generator=g)[rows] for _ in range(3))
    theta, phi = torch.zeros(6, requires_grad=True), torch.zeros(6, requires_grad=True)  # "weights" every row shares

    advantages = masked_whiten(raw_advantages, mask, all_sum=all_sum)
    pg = ops.ppo_policy_loss(logps + theta, old_logps, advantages, mask, 0.2)
    vf = ops.ppo_value_loss(values + phi, old_values, returns, mask, 0.2)
    share = token_share(mask, world_size, all_sum)
    ((pg.loss + 0.1 * vf.loss) * share).backward()
    grads = all_sum(torch.cat([theta.grad, phi.grad])) / world_size  # DDP's average over processes
    figures = all_sum(torch.stack([pg.loss, pg.clipfrac, pg.approx_kl, vf.loss, vf.clipfrac]) * share) / world_size
    return {"advantages": advantages.tolist(), "explained_variance": explained_variance(values, returns, mask, all_sum),
            "grads": grads.tolist(), "figures": figures.tolist()}


def _ppo_pieces_in_process(rank, init_file, results):
    import torch.distributed as torch_dist

    from minalign import distributed

    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    info = distributed.DistInfo(rank=rank, world_size=2)
    results[rank] = _ppo_pieces(slice(2 * rank, 2 * rank + 2), partial(distributed.all_reduce_sum, info=info), 2)
    torch_dist.destroy_process_group()


def test_ppo_on_two_processes_is_ppo_on_the_whole_batch(tmp_path):
    """Each of two processes holds two of the four rollouts: whitening, the losses'
    gradient and the figures are those of one process holding all four."""
    import torch.multiprocessing as mp

    whole = _ppo_pieces(slice(0, 4))
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ppo_pieces_in_process, args=(str(tmp_path / "init"), results), nprocs=2)
        halves = [results[0], results[1]]
    advantages = torch.tensor(halves[0]["advantages"] + halves[1]["advantages"])
    torch.testing.assert_close(advantages, torch.tensor(whole["advantages"]))
    for half in halves:
        assert half["explained_variance"] == pytest.approx(whole["explained_variance"], abs=1e-6)
        torch.testing.assert_close(torch.tensor(half["grads"]), torch.tensor(whole["grads"]))
        torch.testing.assert_close(torch.tensor(half["figures"]), torch.tensor(whole["figures"]))


def test_kl_controller_moves_beta_toward_the_target():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(12.0, 100)  # too much KL: a stronger penalty
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    before = ctl.value
    ctl.update(3.0, 100)  # too little: a weaker one
    assert ctl.value < before
    fixed = AdaptiveKLController(0.05)
    fixed.update(100.0, 100)
    assert fixed.value == 0.05


def test_reward_layout_score_on_last_token_kl_everywhere_nothing_on_padding():
    mask = ragged_mask([3, 5], 6)
    kl = torch.ones(2, 6)
    rewards = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, beta=0.1)  # kl unmasked: padding gets none
    expected = torch.tensor([[-0.1, -0.1, -0.1 + 2.0, 0, 0, 0], [-0.1, -0.1, -0.1, -0.1, -0.1 - 1.0, 0]])
    torch.testing.assert_close(rewards, expected)


def test_kl_estimators_k1_and_k3_by_hand_and_others_refused():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), logp - ref)
    k3 = kl_estimate(logp, ref, "k3")
    assert (k3 >= 0).all()
    torch.testing.assert_close(k3, torch.exp(ref - logp) - 1 - (ref - logp))
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logp, ref, "k2")


def test_whitening_ignores_padding():
    mask = ragged_mask([2, 3], 5)
    x = torch.tensor([[1.0, 3.0, 99.0, 99.0, 99.0], [5.0, 7.0, 9.0, -50.0, 0.0]])
    white = masked_whiten(x, mask)
    real = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0])
    torch.testing.assert_close(white[mask], (real - real.mean()) / real.std(unbiased=False), atol=1e-5, rtol=1e-5)
    assert (white[~mask] == 0).all()
    one = masked_whiten(torch.tensor([[2.0, 5.0]]), torch.tensor([[True, False]]))
    assert torch.equal(one, torch.zeros(1, 2))  # one real token (variance 0): zeros, not NaN


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_ppo_losses_give_no_gradient_to_old_logprobs_advantages_or_returns(impl):
    from minalign import reference

    module = ops if impl == "ops" else reference
    lp, old, adv = (torch.tensor([[a, b]], requires_grad=True) for a, b in ((-1.0, -2.0), (-1.5, -1.0), (1.0, -2.0)))
    module.ppo_policy_loss(lp, old, adv, torch.ones(1, 2)).loss.backward()
    assert lp.grad is not None and old.grad is None and adv.grad is None
    v, old_v, ret = (torch.tensor([[a, b]], requires_grad=True) for a, b in ((1.0, 3.0), (0.5, 0.5), (0.0, 1.0)))
    module.ppo_value_loss(v, old_v, ret, torch.ones(1, 2)).loss.backward()
    assert v.grad is not None and old_v.grad is None and ret.grad is None


def run_ppo(workdir, out, *extra, nproc=1, returncode=0):
    """train_ppo.py's metrics rows (or, when it is to fail, its stderr)."""
    result = run_script("train_ppo.py", ["--sft-dir", workdir / "sft", "--rm-dir", workdir / "rm", "--out-dir", out,
                                         "--rollout-batch-size", "16", "--minibatch-size", "8", "--epochs", "2",
                                         "--max-new-tokens", "16", "--eval-prompts", "8", "--log-interval", "1", *extra],
                        nproc)
    assert result.returncode == returncode, result.output()
    if returncode:
        return result.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny SFT policy and reward model, trained once."""
    work = tmp_path_factory.mktemp("ppo")
    for cmd in (["train_sft.py", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "40",
                 "--batch-size", "16", "--max-steps", "60", "--eval-interval", "1000", "--num-samples", "1",
                 "--out-dir", str(work / "sft")],
                ["train_rm.py", "--sft-dir", str(work / "sft"), "--pairs-dir", str(work / "pairs"),
                 "--out-dir", str(work / "rm"), "--n-train-prompts", "40", "--n-test-prompts", "8",
                 "--max-length", "40", "--batch-size", "16", "--epochs", "3", "--lr", "1e-3"]):
        result = run_script(cmd[0], cmd[1:])
        assert result.returncode == 0, result.output()
    return work


@pytest.mark.slow
def test_ppo_raises_the_reward_model_score_and_repeats_exactly(workdir, tmp_path):
    a = run_ppo(workdir, tmp_path / "a", "--updates", "12", "--lr", "1e-3", "--kl-coef", "0.01", "--eval-interval", "6")
    scores = [r["objective/scores"] for r in a if "objective/scores" in r]
    assert sum(scores[-4:]) / 4 > sum(scores[:4]) / 4  # the policy learns what the reward model likes
    names = {"objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
             "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
             "val/ratio", "val/num_eos_tokens", "losses/explained_variance", "kl_coef", "objective/gold_scores"}
    assert names <= next(r for r in a if "objective/scores" in r).keys()
    evals = [r for r in a if "eval/gold_reward" in r]  # before training, along it, and at the end
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert all({"eval/rm_score", "eval/kl", "eval/win_rate"} <= r.keys() for r in evals)
    assert evals[0]["eval/kl"] == 0.0  # before training the policy is the reference
    assert evals[-1]["eval/kl"] > 0  # ... and not after it
    b = run_ppo(workdir, tmp_path / "b", "--updates", "12", "--lr", "1e-3", "--kl-coef", "0.01", "--eval-interval", "6")
    timing = {"time", "rollout_tokens_per_s", "eps", "eval/train_seconds"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert strip(a) == strip(b)  # seeded runs repeat exactly on the CPU
    result = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert {"gold_reward", "win_rate", "kl", "response_length", "train_seconds"} <= result.keys()
    assert a[-1] == {"step": 12, "time": a[-1]["time"], **{f"eval/{k}": v for k, v in result.items() if k != "samples"}}


@pytest.mark.slow
def test_the_clip_settings_each_reach_their_step(workdir, tmp_path):
    def first_update(name, *flags):
        rows = run_ppo(workdir, tmp_path / name, "--updates", "2", "--stop-at", "1", "--lr", "1e-3", *flags)
        return next(r for r in rows if "objective/scores" in r)

    base = first_update("base")
    # after the first of the update's four steps, the policy being trained is no longer
    # the one that sampled: its ratio moves, past the clip for some tokens, and so do the values
    assert base["policy/approxkl_avg"] > 0 and base["policy/clipfrac_avg"] > 0 and base["val/clipfrac_avg"] > 0
    # each clip is its own model's: policy and critic are separate models (and Adam sees
    # each parameter alone), so one's clip leaves the other's figures as they were
    clip = first_update("clip", "--clip-eps", "0.02")
    assert clip["policy/clipfrac_avg"] > base["policy/clipfrac_avg"]
    assert clip["val/clipfrac_avg"] == base["val/clipfrac_avg"]
    value_clip = first_update("value-clip", "--value-clip", "0.002")
    assert value_clip["val/clipfrac_avg"] > base["val/clipfrac_avg"]
    assert value_clip["policy/clipfrac_avg"] == base["policy/clipfrac_avg"]
    # gradients clipped to a norm of 1e-12 fall below Adam's epsilon: the models barely move
    frozen = first_update("grad-clip", "--grad-clip", "1e-12")
    assert frozen["policy/approxkl_avg"] < base["policy/approxkl_avg"] / 100
    assert frozen["val/clipfrac_avg"] < base["val/clipfrac_avg"]


@pytest.mark.slow
def test_an_evaluation_that_fails_is_finished_by_resume(workdir, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT))
    import train_ppo

    from minalign.checkpoint import load_checkpoint

    def fails(*args, **kwargs):
        raise RuntimeError("the evaluation failed")

    monkeypatch.setattr(train_ppo, "held_out_eval", fails)
    args = train_ppo.Args(sft_dir=str(workdir / "sft"), rm_dir=str(workdir / "rm"), out_dir=str(tmp_path), updates=1,
                          rollout_batch_size=8, minibatch_size=8, epochs=1, max_new_tokens=16, eval_prompts=8)
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        train_ppo.main(args)
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")  # the last update's, to resume from
    assert ckpt["step"] == 1 and "resume" in ckpt and not (tmp_path / "eval.json").exists()
    monkeypatch.undo()
    capsys.readouterr()
    train_ppo.main(train_ppo.Args(out_dir=str(tmp_path), resume=True))
    assert "at update 1 of 1: training is done, the final evaluation is left" in capsys.readouterr().out
    final = load_checkpoint(tmp_path / "ckpt.pt")
    assert final["step"] == 1 and "resume" not in final
    assert all(torch.equal(final["model"][k], v) for k, v in ckpt["model"].items())
    result = json.loads((tmp_path / "eval.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 1]  # the update's figures, then its evaluation's, once
    assert rows[-1] == {"step": 1, "time": rows[-1]["time"], **{f"eval/{k}": v for k, v in result.items() if k != "samples"}}


# 16 rollouts a process; minibatches of 16 in all, 8 of each process's: two steps an
# epoch, the second after the first has moved the policy
TWO_PROCESSES = ("--updates", "2", "--eval-interval", "2", "--rollout-batch-size", "32", "--minibatch-size", "16",
                 "--epochs", "1", "--kl-target", "1", "--kl-horizon", "320", "--save-interval", "1")


@pytest.fixture(scope="module")
def two_process_run(workdir, tmp_path_factory):
    """A run of TWO_PROCESSES under torchrun: its folder and metrics rows."""
    out = tmp_path_factory.mktemp("ppo-two-processes")
    return out, run_ppo(workdir, out, *TWO_PROCESSES, nproc=2)


@pytest.mark.slow
def test_ppo_runs_under_two_processes(two_process_run):
    # (how the processes' figures combine is test_plumbing's test_reduce_metrics_over_two_processes)
    # the KL controller moves beta by the global batch's KL and count: 32 rollouts, not 16
    out, rows = two_process_run
    updates = [r for r in rows if "objective/scores" in r]
    assert [r["step"] for r in updates] == [1, 2]
    error = min(max(updates[0]["objective/kl"] / 1 - 1, -0.2), 0.2)
    assert updates[0]["kl_coef"] == 0.05 and updates[1]["kl_coef"] == pytest.approx(0.05 * (1 + error * 32 / 320))
    assert all(0 <= r["val/num_eos_tokens"] <= 32 and math.isfinite(r["loss/policy_avg"]) for r in updates)
    assert all(r["val/ratio"] != 1.0 for r in updates)  # one minibatch (16 a process) would leave it at 1
    assert [r["step"] for r in rows if "eval/gold_reward" in r] == [0, 2]
    assert (out / "ckpt.pt").exists() and (out / "eval.json").exists()


@pytest.mark.slow
def test_a_diverged_ppo_run_stops_with_one_line_and_saves_nothing(workdir, tmp_path):
    from minalign.checkpoint import save_checkpoint

    # an earlier run's results: replaced as training starts, so none is left beside this run's metrics
    save_checkpoint(tmp_path / "ckpt.pt", {"model": {}, "model_config": {}, "args": {}, "stage": "ppo"})
    (tmp_path / "eval.json").write_text("{}")
    stderr = run_ppo(workdir, tmp_path, "--updates", "3", "--lr", "1e30", returncode=2)
    assert "Traceback" not in stderr and "training diverged" in stderr.strip().splitlines()[-1], stderr[-2000:]
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "eval.json").exists()


def _score_rollout_setup(seed=0):
    """Tiny policy, a different reference, a reward model and a rollout with one row that never ends."""
    sys.path.insert(0, str(ROOT))
    from minalign.model import GPT, GPTConfig
    from minalign.reward import RewardModel
    from minalign.rollout import Rollout

    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=24)
    policy, reference, reward_model = GPT(config).eval(), GPT(config).eval(), RewardModel(config).eval()
    eos = 7
    prompt_ids = torch.tensor([[3, 4, 5], [0, 8, 9]])
    prompt_mask = torch.tensor([[True, True, True], [False, True, True]])
    response_ids = torch.tensor([[11, 12, eos, 0], [13, 14, 15, 16]])  # row 1 runs out of room
    response_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    return policy, reference, reward_model, Rollout(prompt_ids, prompt_mask, response_ids, response_mask), eos


def test_prepare_update_by_hand():
    import train_ppo
    from minalign.rollout import response_logprobs

    policy, reference, reward_model, rollout, eos = _score_rollout_setup()
    args = train_ppo.Args(kl_coef=0.3, missing_eos_score=-1.0)
    old_logps, values, advantages, returns, stats = train_ppo.prepare_update(
        policy, reference, reward_model, reward_model, rollout, args, 0.3, eos)
    mask = rollout.response_mask
    kl = (response_logprobs(policy, rollout).token_logps - response_logprobs(reference, rollout).token_logps) * mask
    rm = reward_model(rollout.sequences, rollout.attention_mask)
    scores = torch.stack([rm[0], torch.tensor(-1.0)])  # the unfinished row gets missing_eos_score
    assert stats["objective/kl"] == pytest.approx(kl.sum(1).mean().item(), abs=1e-5)
    assert stats["objective/scores"] == pytest.approx(scores.mean().item(), abs=1e-5)
    assert stats["objective/rlhf_reward"] == pytest.approx((scores - 0.3 * kl.sum(1)).mean().item(), abs=1e-5)
    assert stats["objective/non_score_reward"] == pytest.approx(-0.3 * kl.sum(1).mean().item(), abs=1e-5)
    entropy = (response_logprobs(policy, rollout, return_entropy=True).entropy * mask).sum(1)
    assert stats["objective/entropy"] == pytest.approx(entropy.mean().item(), abs=1e-5)
    assert stats["response_length"] == 3.5
    assert stats["val/num_eos_tokens"] == 1
    real = advantages[mask]
    assert real.mean().item() == pytest.approx(0, abs=1e-5) and real.std(unbiased=False).item() == pytest.approx(1, abs=1e-3)
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()
    # k3 only measures: the penalty, and so every advantage, stays the log ratio's
    k3_args = train_ppo.Args(kl_coef=0.3, missing_eos_score=-1.0, kl_estimator="k3")
    *_, k3_advantages, k3_returns, k3_stats = train_ppo.prepare_update(
        policy, reference, reward_model, reward_model, rollout, k3_args, 0.3, eos)
    assert torch.equal(k3_advantages, advantages) and torch.equal(k3_returns, returns)
    assert k3_stats["objective/rlhf_reward"] == stats["objective/rlhf_reward"]
    k3 = (kl_estimate(old_logps, response_logprobs(reference, rollout).token_logps, "k3") * mask).sum(1)
    assert k3_stats["objective/kl"] == pytest.approx(k3.mean().item(), abs=1e-5)
    assert abs(k3_stats["objective/kl"] - stats["objective/kl"]) > 1e-3


def test_prepare_update_takes_both_models_at_the_runs_temperature():
    import train_ppo
    from minalign.rollout import response_logprobs

    policy, reference, reward_model, rollout, eos = _score_rollout_setup()
    args = train_ppo.Args(kl_coef=0.3, temperature=0.5)
    *_, stats = train_ppo.prepare_update(policy, reference, reward_model, reward_model, rollout, args, 0.3, eos)
    kl = (response_logprobs(policy, rollout, temperature=0.5).token_logps
          - response_logprobs(reference, rollout, temperature=0.5).token_logps) * rollout.response_mask
    assert stats["objective/kl"] == pytest.approx(kl.sum(1).mean().item(), abs=1e-5)


def test_minibatch_stats_by_hand():
    import train_ppo
    from minalign.reference import PolicyLoss, ValueLoss

    mask = ragged_mask([1, 3], 3)
    logprobs = torch.tensor([[-1.0, 5.0, 5.0], [-1.0, -2.0, -2.0]])  # padding holds junk: left out
    old = torch.tensor([[-1.5, 0.0, 0.0], [-1.0, -2.0, -2.0 - math.log(2.0)]])
    pg = PolicyLoss(torch.tensor(0.5), torch.tensor(0.25), torch.tensor(0.01))
    vf = ValueLoss(torch.tensor(2.0), torch.tensor(0.75))
    stats = train_ppo.minibatch_stats(pg, vf, logprobs, old, mask)
    ratios = [math.exp(0.5), 1.0, 1.0, 2.0]  # the 4 real tokens
    assert stats == pytest.approx({"loss/policy_avg": 0.5, "loss/value_avg": 2.0, "policy/clipfrac_avg": 0.25,
                                   "policy/approxkl_avg": 0.01, "val/clipfrac_avg": 0.75,
                                   "val/ratio": sum(ratios) / 4})


def test_the_held_out_evaluation_samples_at_the_runs_temperature():
    import train_ppo
    from minalign.model import GPT, GPTConfig
    from minalign.reward import RewardModel
    from minalign.tokenizer import get_tokenizer

    class Logger:
        def log(self, step, **values):
            self.logged = (step, values)

    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=32)
    policy, reference, reward_model = GPT(config), GPT(config), RewardModel(config)
    logger = Logger()
    args = train_ppo.Args(temperature=0.5, eval_prompts=3, max_new_tokens=5)
    result = train_ppo.held_out_eval(policy, reference, reward_model, tok, args, logger, update=7)
    assert result["temperature"] == 0.5 and result["n_prompts"] == 3
    assert logger.logged[0] == 7 and logger.logged[1]["eval/temperature"] == 0.5
    assert logger.logged[1]["eval/kl"] == result["kl"] and "eval/samples" not in logger.logged[1]


def test_critic_values_are_those_of_the_states_before_each_response_token():
    from minalign.rollout import response_values

    _, _, critic, rollout, _ = _score_rollout_setup(seed=1)
    values = response_values(critic, rollout)  # (B, N)
    for b in range(2):
        keep = rollout.prompt_mask[b]
        ids = torch.cat([rollout.prompt_ids[b][keep], rollout.response_ids[b]])[None]  # unpadded
        P = int(keep.sum())
        alone = critic(ids, torch.ones_like(ids, dtype=torch.bool), per_token=True)[0]  # (P + N,)
        torch.testing.assert_close(values[b], alone[P - 1 : P - 1 + values.shape[1]], atol=1e-5, rtol=1e-5)


def test_explained_variance_and_the_kl_controller_by_hand():
    from minalign.ppo import explained_variance

    returns = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(returns + torch.tensor([[1.0, -1.0, 1.0, 0.0]]), returns, mask) == pytest.approx(
        1 - (8 / 9) / (2 / 3))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(60.0, 10)  # far above the target: the error is clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 1000))
    ctl.update(0.0, 10)  # far below: -0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 1000) * (1 - 0.2 * 10 / 1000))


def test_kl_horizon_without_kl_target_is_refused_not_ignored(tmp_path):
    sys.path.insert(0, str(ROOT))
    import train_ppo

    from minalign.cli import ArgumentError, parse_args

    args = parse_args(train_ppo.Args, ["--kl-horizon", "5000", "--out-dir", str(tmp_path / "ppo")])
    with pytest.raises(ArgumentError, match="--kl-horizon: sets the adaptive KL controller's pace: give --kl-target"):
        train_ppo.main(args)
    assert not (tmp_path / "ppo").exists()  # refused before anything was made


def test_a_value_clip_or_value_coefficient_of_zero_is_refused_it_would_freeze_the_critic():
    sys.path.insert(0, str(ROOT))
    import train_ppo

    from minalign import reference
    from minalign.cli import ArgumentError

    values = torch.tensor([[0.5, 1.5]], requires_grad=True)  # moved towards the returns since the rollout
    old, returns, mask = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    reference.ppo_value_loss(values, old, returns, mask, clip=0.0).loss.backward()
    assert values.grad.abs().max() == 0  # the clipped loss no longer pulls it: the critic cannot learn
    with pytest.raises(ArgumentError, match="^--value-clip 0.0: must be > 0$"):
        train_ppo.Args(value_clip=0.0)
    with pytest.raises(ArgumentError, match="^--vf-coef 0.0: must be > 0$"):
        train_ppo.Args(vf_coef=0.0)  # its loss, weighed by 0, gives the critic no gradient


def test_batch_sizes_count_all_processes_and_must_split_evenly(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import train_ppo

    from minalign.cli import ArgumentError
    from minalign.distributed import DistInfo

    monkeypatch.setattr(train_ppo.distributed, "setup", lambda device: DistInfo(world_size=4))
    for sizes, message in (({"rollout_batch_size": 66, "minibatch_size": 66}, "--rollout-batch-size 66 must be divisible by the 4"),
                           ({"rollout_batch_size": 36, "minibatch_size": 18}, "--minibatch-size 18 must be divisible by the 4")):
        with pytest.raises(ArgumentError, match=message):
            train_ppo.main(train_ppo.Args(out_dir=str(tmp_path / "ppo"), **sizes))
    assert not (tmp_path / "ppo").exists()  # refused before anything was made


def test_a_reward_model_that_cannot_be_trained_here_says_how_to_make_one(tmp_path):
    # train_rm.py's defaults (--max-length 64) do not fit this SFT policy's 40 positions
    sys.path.insert(0, str(ROOT))
    import dataclasses

    import train_ppo

    from minalign.checkpoint import save_checkpoint
    from minalign.cli import ArgumentError
    from minalign.model import GPT, GPTConfig
    from minalign.tokenizer import get_tokenizer

    config = GPTConfig(vocab_size=get_tokenizer("builtin").vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=40)
    save_checkpoint(tmp_path / "sft" / "ckpt.pt", {"model": GPT(config).state_dict(), "stage": "sft",
                                                   "model_config": dataclasses.asdict(config), "args": {},
                                                   "tokenizer": "builtin"})
    args = train_ppo.Args(sft_dir=str(tmp_path / "sft"), rm_dir=str(tmp_path / "rm"), out_dir=str(tmp_path / "ppo"),
                          max_new_tokens=16)
    rm = tmp_path / "rm"
    with pytest.raises(ArgumentError, match=f"^no reward model in {rm}, and training one with train_rm.py's defaults "
                                            f"failed: --max-length 64 exceeds the block size 40 .*; train one with "
                                            f"`python train_rm.py --out-dir {rm} --tokenizer builtin --sft-dir "
                                            f"{tmp_path / 'sft'}`"):
        train_ppo.main(args)
    # an SFT policy of another tokenizer is named as such, before a reward model is trained from it
    ckpt = torch.load(tmp_path / "sft" / "ckpt.pt", weights_only=True)
    save_checkpoint(tmp_path / "sft" / "ckpt.pt", {**ckpt, "tokenizer": "gpt2"})
    with pytest.raises(ArgumentError, match="sft.ckpt.pt was trained with tokenizer 'gpt2', not 'builtin': pass "
                                            "--tokenizer gpt2"):
        train_ppo.main(args)
    assert not rm.exists()
    # an SFT policy with no room for the rollouts: refused before a reward model is trained from it
    save_checkpoint(tmp_path / "sft" / "ckpt.pt", ckpt)
    with pytest.raises(ArgumentError, match=r"--max-new-tokens 40: .* in the SFT policy in .*sft's block of 40: "
                                            r"pass --max-new-tokens \d+ or less"):
        train_ppo.main(dataclasses.replace(args, max_new_tokens=40))
    assert not rm.exists()


def test_a_reward_model_too_small_for_the_rollouts_is_refused_before_any_training(tmp_path):
    sys.path.insert(0, str(ROOT))
    import train_ppo

    from minalign.checkpoint import save_checkpoint
    from minalign.cli import ArgumentError, parse_args

    save_checkpoint(tmp_path / "rm" / "ckpt.pt", {"model": {}, "model_config": {"block_size": 24}, "args": {},
                                                  "stage": "rm"})
    args = parse_args(train_ppo.Args, ["--rm-dir", str(tmp_path / "rm"), "--sft-dir", str(tmp_path / "sft"),
                                       "--out-dir", str(tmp_path / "ppo")])
    with pytest.raises(ArgumentError, match=r"--max-new-tokens 40: .* in the reward model in .*rm's block of 24: "
                                            r"pass --max-new-tokens \d+ or less"):
        train_ppo.main(args)
    assert not (tmp_path / "sft").exists()  # no SFT policy trained first


def test_a_read_only_reward_model_folder_is_only_read(tmp_path, read_only):
    import train_ppo
    from conftest import listing
    from minalign.checkpoint import save_checkpoint
    from minalign.cli import ArgumentError

    save_checkpoint(tmp_path / "shared" / "rm" / "ckpt.pt", {"model": {}, "model_config": {"block_size": 24},
                                                             "args": {}, "stage": "rm"})
    read_only(tmp_path / "shared")
    before = listing(tmp_path / "shared")
    args = train_ppo.Args(rm_dir=str(tmp_path / "shared" / "rm"), sft_dir=str(tmp_path / "sft"),
                          out_dir=str(tmp_path / "ppo"))
    # past the folder checks: refused by the next one, the reward model's room for the rollouts
    with pytest.raises(ArgumentError, match=r"--max-new-tokens 40: .* in the reward model in .*rm's block of 24"):
        train_ppo.main(args)
    assert listing(tmp_path / "shared") == before


def test_advantages_and_returns_by_hand():
    from minalign import reference
    from minalign.ppo import advantages_and_returns, masked_whiten

    torch.manual_seed(0)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    scores, kl, values = torch.tensor([1.5, -0.5]), torch.randn(2, 4) * mask, torch.randn(2, 4)
    adv, ret = advantages_and_returns(scores, kl, values, mask, beta=0.3, gamma=0.9, lam=0.8)
    rewards = -0.3 * kl * mask
    rewards[0, 2] += 1.5
    rewards[1, 3] += -0.5
    want = reference.gae(rewards, values, mask, 0.9, 0.8)
    torch.testing.assert_close(adv, masked_whiten(want.advantages, mask))
    torch.testing.assert_close(ret, want.returns)  # the critic's targets: not whitened


def test_prepare_update_passes_gamma_and_lam():
    sys.path.insert(0, str(ROOT))
    import train_ppo
    policy, reference_, rm, rollout, eos = _score_rollout_setup()
    a = train_ppo.prepare_update(policy, reference_, rm, rm, rollout, train_ppo.Args(), 0.3, eos)
    b = train_ppo.prepare_update(policy, reference_, rm, rm, rollout, train_ppo.Args(gamma=0.5, lam=0.5), 0.3, eos)
    assert not torch.allclose(a[3], b[3])  # the returns follow --gamma and --lam


def _without_timing(rows):
    timing = {"time", "rollout_tokens_per_s", "eps", "eval/train_seconds"}
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def _same_weights(a, b):
    from minalign.checkpoint import load_checkpoint

    left, right = load_checkpoint(a / "ckpt.pt"), load_checkpoint(b / "ckpt.pt")
    return left["model"].keys() == right["model"].keys() and all(
        torch.equal(value, right["model"][name]) for name, value in left["model"].items())


@pytest.mark.slow
def test_ppo_resume_is_bit_for_bit_and_only_from_the_same_models(workdir, tmp_path):
    import shutil

    from minalign.checkpoint import load_checkpoint, save_checkpoint

    settings = ("--updates", "4", "--save-interval", "2", "--eval-interval", "2", "--lr", "1e-3",
                "--kl-target", "1", "--kl-horizon", "100")  # beta moves every update: it must be restored too
    full = run_ppo(workdir, tmp_path / "full", *settings)
    run_ppo(workdir, tmp_path / "split", *settings, "--stop-at", "3")
    ckpt = load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert ckpt["step"] == 3 and {"critic", "optimizer", "kl_coef", "generators"} <= ckpt["resume"].keys()
    assert not (tmp_path / "split" / "eval.json").exists()  # no final evaluation for a run cut short
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:  # logged after the checkpoint, then cut short
        f.write(json.dumps({"step": 4, "objective/scores": 123.0}) + "\n")

    other_rm = tmp_path / "other-rm"  # a reward model that differs from the run's in one weight
    shutil.copytree(workdir / "rm", other_rm)
    rm = load_checkpoint(other_rm / "ckpt.pt")
    rm["model"][next(iter(rm["model"]))] += 1e-3
    save_checkpoint(other_rm / "ckpt.pt", rm)
    refused = run_ppo(workdir, tmp_path / "split", "--resume", "--rm-dir", str(other_rm), returncode=2)
    assert f"--resume: the reward model in {other_rm} is not the one the run started from" in refused
    refused = run_ppo(workdir, tmp_path / "split", "--resume", "--kl-coef", "0.5", returncode=2)
    assert "--kl-coef 0.5 (it has 0.05)" in refused and "Traceback" not in refused

    split = run_ppo(workdir, tmp_path / "split", "--resume")  # the rest of the settings from the checkpoint
    assert _without_timing(split) == _without_timing(full)
    assert [r["step"] for r in split if "eval/gold_reward" in r] == [0, 2, 4]  # the update-2 one not repeated
    assert _same_weights(tmp_path / "split", tmp_path / "full")
    assert "resume" not in load_checkpoint(tmp_path / "split" / "ckpt.pt")  # the final one: the policy alone
    refused = run_ppo(workdir, tmp_path / "split", "--resume", returncode=2)
    assert "finished at update 4: nothing is left to train" in refused


@pytest.mark.slow
def test_ppo_resume_under_two_processes_continues_each_ones_sampling(workdir, two_process_run, tmp_path):
    full_out, full = two_process_run
    run_ppo(workdir, tmp_path, *TWO_PROCESSES, "--stop-at", "1", nproc=2)
    refused = run_ppo(workdir, tmp_path, "--resume", *TWO_PROCESSES, returncode=2)  # one process
    assert "sampled in 2 processes" in refused and "--nproc_per_node=2" in refused
    split = run_ppo(workdir, tmp_path, "--resume", *TWO_PROCESSES, nproc=2)
    assert _without_timing(split) == _without_timing(full)
    assert _same_weights(tmp_path, full_out)


def test_resume_on_another_kind_of_device_is_refused_before_any_work(tmp_path):
    # each process's sampling state is its device's own random stream: a run sampled on
    # a GPU cannot go on bit for bit on the CPU
    sys.path.insert(0, str(ROOT))
    from dataclasses import asdict

    import train_ppo

    from minalign.checkpoint import save_checkpoint
    from minalign.cli import ArgumentError
    from minalign.distributed import DistInfo

    run_args = train_ppo.Args(out_dir=str(tmp_path / "ppo"), device="cuda")
    save_checkpoint(tmp_path / "ppo" / "ckpt.pt", {
        "model": {}, "model_config": {}, "args": asdict(run_args), "step": 20, "stage": "ppo",
        "resume": {"generators": [torch.Generator().get_state()], "sampling_device": "cuda"}})
    with pytest.raises(ArgumentError, match=r"sampled on cuda, whose random stream another device cannot continue: "
                                            r"pass --device cuda"):
        train_ppo.continue_ppo_run(train_ppo.Args(out_dir=str(tmp_path / "ppo"), resume=True, device="cpu"),
                                   DistInfo())
    assert sorted(p.name for p in (tmp_path / "ppo").iterdir()) == ["ckpt.pt"]


@pytest.mark.slow
def test_the_readmes_example_of_using_trained_models_runs(workdir, tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python\n", readme.index("## Using a trained model")) + len("```python\n")
    code = readme[start:readme.index("```\n", start)]
    assert "max_new_tokens=40" in code
    code = code.replace("max_new_tokens=40", "max_new_tokens=16")  # the tiny models' block holds 40 tokens
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dpo").symlink_to(workdir / "sft")  # any policy of the built-in task
    (tmp_path / "out" / "rm").symlink_to(workdir / "rm")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out  # (a response of this barely trained policy may hold a newline)
    assert out.startswith("The acting was") and "\nI expected more from" in out
    scores = out.splitlines()[-1]
    assert scores.startswith("tensor([") and len(scores.split(",")) == 2  # a score per response


def test_the_processes_share_of_an_updates_prompts_is_one_processs_slice():
    import train_ppo
    from minalign.distributed import DistInfo

    prompts = [f"prompt {i}" for i in range(100)]
    for update in (1, 2, 3, 7, 8, 50):  # (update - 1) * 16 passes 100 - 16 at update 7: it wraps round
        alone = train_ppo.rollout_prompts(prompts, update, 16, DistInfo())
        assert len(alone) == 16 and alone[0] == prompts[(update - 1) * 16 % 85]
        for world_size in (2, 4):
            parts = [train_ppo.rollout_prompts(prompts, update, 16, DistInfo(rank=r, world_size=world_size))
                     for r in range(world_size)]
            assert sum(parts, []) == alone, (update, world_size)
    # over enough updates every prompt is sampled, the last one too
    seen = {p for update in range(1, 200) for p in train_ppo.rollout_prompts(prompts, update, 16, DistInfo())}
    assert seen == set(prompts)


def test_the_reference_is_a_frozen_copy_of_the_policy_and_the_critic_a_copy_of_the_reward_model(tmp_path,
                                                                                               monkeypatch):
    import dataclasses

    import train_ppo
    import train_rm
    import train_sft

    from minalign.checkpoint import save_checkpoint
    from minalign.distributed import DistInfo
    from minalign.model import GPT, GPTConfig
    from minalign.reward import RewardModel
    from minalign.tokenizer import get_tokenizer

    tok = get_tokenizer("builtin")
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=40)
    common = {"model_config": dataclasses.asdict(config), "args": {}, "tokenizer": "builtin"}
    save_checkpoint(tmp_path / "sft.pt", {"model": GPT(config).state_dict(), "stage": "sft", **common})
    save_checkpoint(tmp_path / "rm.pt", {"model": RewardModel(config).state_dict(), "stage": "rm", "kind": "reward",
                                         **common})
    monkeypatch.setattr(train_sft, "ensure", lambda *args, **kwargs: str(tmp_path / "sft.pt"))
    monkeypatch.setattr(train_rm, "ensure", lambda *args, **kwargs: str(tmp_path / "rm.pt"))
    policy, reference, reward_model, critic = train_ppo.load_models(train_ppo.Args(), DistInfo(), tok)
    assert reference is not policy and critic is not reward_model
    assert not any(p.requires_grad for model in (reference, reward_model) for p in model.parameters())
    assert all(p.requires_grad for model in (policy, critic) for p in model.parameters())
    before = {name: value.clone() for name, value in reference.state_dict().items()}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)  # as a training step moves the policy ...
    assert all(torch.equal(value, before[name]) for name, value in reference.state_dict().items())  # ... not its reference


def test_each_epoch_draws_new_minibatches_that_cover_the_rollout(workdir, tmp_path, monkeypatch):
    from minalign.rollout import Rollout

    drawn, rows = [], Rollout.rows

    def record(self, idx):
        drawn.append(idx.tolist())
        return rows(self, idx)

    monkeypatch.setattr(Rollout, "rows", record)
    run_ppo(workdir, tmp_path, "--updates", "2", "--stop-at", "1")  # rollouts of 16, minibatches of 8, 2 epochs
    assert len(drawn) == 4
    for epoch in (drawn[:2], drawn[2:]):
        assert sorted(epoch[0] + epoch[1]) == list(range(16))  # every rollout once an epoch
    assert drawn[:2] != drawn[2:]  # and other minibatches in the second
