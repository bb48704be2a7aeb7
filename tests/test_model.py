import pytest
import torch

from minalign.model import GPT, GPTConfig, attention_bias, sample_token

V = 61  # not a multiple of 64: the padded vocabulary has 3 extra rows


def tiny_model(seed=0, scale=1.0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=48)).eval()
    if scale != 1.0:  # larger weights: sharper, more varied distributions than at init
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
    return model


def left_pad(rows, pad_id=V - 1):
    """Left-pad lists of token ids into (ids [B, P], mask [B, P])."""
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_id)
    mask = torch.zeros(len(rows), P, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r)
        mask[i, P - len(r):] = True
    return ids, mask


def test_shapes_and_padded_vocab():
    model = tiny_model()
    x = torch.randint(0, V, (3, 10))
    logits, hidden = model(x)
    assert logits.shape == (3, 10, 64)
    assert hidden.shape == (3, 10, 32)
    assert torch.isinf(logits[..., V:]).all() and (logits[..., V:] < 0).all()
    assert torch.isfinite(logits[..., :V]).all()
    probs = logits.softmax(-1)
    assert probs[..., V:].sum() == 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 10))


def test_padding_rows_get_no_gradient_and_loss_is_finite():
    model = tiny_model().train()
    x = torch.randint(0, V, (2, 8))
    logits, _ = model(x)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, 64), x.view(-1))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(model.wte.weight.grad).all()
    assert model.wte.weight.grad[V:].abs().sum() == 0  # padding rows never learn


def test_attention_bias_is_causal_skips_padding_keys_and_leaves_no_query_without_a_key():
    key_mask = torch.tensor([[False, False, True, True], [True, True, True, True]])  # row 0 left-padded
    allowed = attention_bias(key_mask, q_start=0, q_len=4)[:, 0]  # (B, q, k)
    causal = torch.ones(4, 4).tril().bool()
    assert torch.equal(allowed[1], causal)
    expected = causal & key_mask[0]
    expected[0, 0] = expected[1, 1] = True  # a padding query attends to itself alone: softmax stays finite
    assert torch.equal(allowed[0], expected)
    # the queries of a cached step: slots 4 and 5 over 6 keys
    step = attention_bias(torch.cat([key_mask, torch.ones(2, 2, dtype=torch.bool)], 1), q_start=4, q_len=2)[:, 0]
    assert torch.equal(step[0], torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool))


def test_logits_never_depend_on_later_tokens():
    model = tiny_model(scale=3.0)
    x = torch.randint(0, V, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, V, (2, 5))
    lx, _ = model(x)
    ly, _ = model(y)
    torch.testing.assert_close(lx[:, :7, :V], ly[:, :7, :V])
    assert not torch.allclose(lx[:, 7:, :V], ly[:, 7:, :V])


def test_left_padding_invariance_of_logits():
    model = tiny_model(scale=3.0)
    rows = [[5, 9, 2, 40, 11, 3, 7], [8, 1], [33, 21, 17, 4]]
    ids, mask = left_pad(rows)
    padded_logits, _ = model(ids, mask)
    for i, r in enumerate(rows):
        alone, _ = model(torch.tensor([r]))
        torch.testing.assert_close(padded_logits[i, -len(r):, :V], alone[0, :, :V], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_kv_cache_greedy_equals_full_recompute(scale):
    model = tiny_model(seed=1, scale=scale)
    ids, mask = left_pad([[5, 9, 2, 40], [8, 1], [33, 21, 17, 4, 2, 9]])
    cached, cmask = model.generate(ids, mask, max_new_tokens=25, temperature=0, use_cache=True)
    full, fmask = model.generate(ids, mask, max_new_tokens=25, temperature=0, use_cache=False)
    assert torch.equal(cached, full) and torch.equal(cmask, fmask)


def test_kv_cache_logits_match_recompute():
    model = tiny_model(seed=2, scale=3.0)
    from minalign.model import KVCache

    ids, mask = left_pad([[5, 9, 2, 40, 12], [8, 1, 3]])
    cont = torch.randint(0, V, (2, 6))
    cache = KVCache(2, 2, 2, 11, 16, torch.float32, "cpu")
    h = [model.hidden_states(ids, mask, cache)[:, -1]]
    for t in range(6):
        h.append(model.hidden_states(cont[:, t:t + 1], torch.ones(2, 1, dtype=torch.bool), cache)[:, -1])
    full = model.hidden_states(torch.cat([ids, cont], 1), torch.cat([mask, torch.ones(2, 6, dtype=torch.bool)], 1))
    torch.testing.assert_close(torch.stack(h, 1), full[:, -7:], atol=1e-5, rtol=1e-5)


def test_left_padding_invariance_of_greedy_generation():
    model = tiny_model(seed=3, scale=4.0)
    rows = [[5, 9, 2, 40], [8, 1], [33, 21, 17, 4, 2, 9]]
    ids, mask = left_pad(rows)
    batch, _ = model.generate(ids, mask, max_new_tokens=20, temperature=0)
    for i, r in enumerate(rows):
        alone, _ = model.generate(torch.tensor([r]), max_new_tokens=20, temperature=0)
        assert torch.equal(batch[i], alone[0])


def test_eos_stops_rows_and_masks_after_eos():
    model = tiny_model(seed=4, scale=4.0)
    ids, mask = left_pad([[5, 9], [8, 1, 3]])
    greedy, _ = model.generate(ids, mask, max_new_tokens=20, temperature=0)
    # an EOS that row 0 emits early and row 1 not for a while, so row 1 goes on after row 0 ends
    eos = next(int(t) for t in greedy[0, :6] if int(t) not in greedy[1, :12].tolist())
    tokens, rmask = model.generate(ids, mask, max_new_tokens=20, temperature=0, eos_token_id=eos, pad_token_id=V - 1)
    first_eos = (tokens[0] == eos).nonzero()[0].item()
    assert first_eos < 6 and tokens.shape[1] >= first_eos + 4  # generation went on for row 1
    assert rmask[0, : first_eos + 1].all() and not rmask[0, first_eos + 1:].any()
    assert (tokens[0, first_eos + 1:] == V - 1).all()  # row 0 is padded after its EOS
    assert rmask[1, : first_eos + 4].all() and (tokens[1, : first_eos + 4] == greedy[1, : first_eos + 4]).all()


def test_generation_stops_when_all_rows_end():
    model = tiny_model(seed=5, scale=4.0)
    ids = torch.tensor([[5, 9, 2]])
    greedy, _ = model.generate(ids, max_new_tokens=10, temperature=0)
    tokens, rmask = model.generate(ids, max_new_tokens=10, temperature=0, eos_token_id=int(greedy[0, 2]))
    assert tokens.shape[1] <= 3 and rmask.all()


def test_sampling_never_picks_padded_vocab_and_respects_top_k():
    model = tiny_model(seed=6)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (64, 3))
    tokens, _ = model.generate(ids, max_new_tokens=8, generator=gen)
    assert tokens.max() < V
    logits = torch.randn(500, V, generator=gen)
    top3 = torch.topk(logits, 3).indices
    picks = sample_token(logits, top_k=3, generator=gen)
    assert (top3 == picks[:, None]).any(1).all()


def test_the_pad_token_is_never_sampled_nor_given_probability():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=32, block_size=16, pad_id=V - 1)).eval()
    with torch.no_grad():
        model.wte.weight[V - 1] = 50 * model.ln_f(model.wte.weight[:V]).mean(0)  # PAD would win everywhere
    ids = torch.randint(0, V - 1, (32, 3))
    logits, _ = model(ids)
    assert (logits[..., V - 1] == float("-inf")).all()
    torch.testing.assert_close(logits.softmax(-1).sum(-1), torch.ones(32, 3))
    tokens, _ = model.generate(ids, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    assert not (tokens == V - 1).any()
    unmasked = GPT(GPTConfig(**{**model.config.__dict__, "pad_id": None})).eval()
    unmasked.load_state_dict(model.state_dict())
    assert (unmasked(ids)[0].argmax(-1) == V - 1).float().mean() > 0.5  # what the mask keeps out
    with pytest.raises(ValueError, match=f"pad_id {V} is not a token id"):
        GPTConfig(vocab_size=V, pad_id=V)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).expand(2000, 4))
    picks = sample_token(logits, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {0, 1}  # 0.5 < 0.7 needs the second token; never the third
    greedy = sample_token(logits, temperature=0)
    assert (greedy == 0).all()
    unsorted = torch.log(torch.tensor([[0.05, 0.15, 0.3, 0.5]]).expand(2000, 4))  # the nucleus is at the end
    picks = sample_token(unsorted, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {2, 3}  # the kept set is mapped back from sorted to vocabulary order
    halves = sample_token(torch.zeros(2000, 2), top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert len(set(halves.tolist())) == 1  # one token of 0.5 reaches top_p = 0.5: the second is dropped


def test_top_k_keeps_exactly_k_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).expand(4000, 4)
    picks = sample_token(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {0, 1}  # the k-th token is kept, the (k+1)-th is not


def test_too_long_raises():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.zeros(1, 40, dtype=torch.long), max_new_tokens=20)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_disable_dropout_makes_train_mode_deterministic():
    from minalign.model import disable_dropout
    from minalign.reward import RewardModel

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=48, dropout=0.3)
    ids = torch.randint(0, V, (2, 10))
    gpt, reward_model = GPT(config), RewardModel(GPTConfig(**config.__dict__))
    for model, output in ((gpt, lambda: gpt(ids)[0]), (reward_model, lambda: reward_model.values(ids))):
        model.train()
        assert not torch.equal(output(), output())  # dropout is on
        disable_dropout(model)
        assert model.training
        in_train_mode = output()
        model.eval()
        torch.testing.assert_close(in_train_mode, output(), atol=0, rtol=0)
    assert reward_model.config.dropout == 0.0
    assert config.dropout == 0.0  # what a checkpoint of the model records


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_follows_the_tempered_distribution(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    picks = sample_token(logits, temperature=temperature, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(picks, minlength=4).float() / len(picks)
    torch.testing.assert_close(frequencies, (logits[0] / temperature).softmax(-1), atol=0.012, rtol=0)


def test_weight_decay_falls_on_matrices_only():
    from minalign.optim import make_optimizer

    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=8))
    decayed, plain = make_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert any("wte" in names[id(p)] for p in decayed["params"])  # embeddings and matmuls decay
    assert any("ln" in names[id(p)] for p in plain["params"])  # norms (and biases) do not
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_evaluating_turns_dropout_off_and_gives_each_model_its_own_mode_back():
    from minalign.model import evaluating

    a, b = torch.nn.Dropout(0.5).train(), torch.nn.Dropout(0.5).eval()
    with evaluating(a, b):
        assert not a.training and not b.training
    assert a.training and not b.training
    with pytest.raises(RuntimeError), evaluating(a):  # given back even when the block fails
        raise RuntimeError
    assert a.training
