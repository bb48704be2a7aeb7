"""A compact GPT (GPT-2 architecture) with padding-aware attention and KV-cache sampling.

Reads bottom-up: attention, MLP, block, config, model, then sampling, then the
dropout switches the trainers use. Every script in minalign (SFT, reward model, PPO
policy and critic, DPO) uses this one model.

Padding. Batches for generation are left-padded: `attention_mask` marks real tokens,
position ids count real tokens only, and no real token attends to padding, so a padded
row gives the logits of the same row run alone. Training batches are right-padded and
need no mask: causal attention never looks right, and the loss ignores the padding.

Vocabulary padding. The embedding and the tied LM head have `vocab_size` rounded up
to a multiple of 64 rows (an unpadded 50,257-row head made GPU matmuls 6.6-7.4x
slower); the logits of the padding rows are set to -inf so no softmax, sample or
log-probability ever gives them probability. So is the PAD token's (`pad_id`): it only
fills batches and no loss ever targets it, so a policy that could still sample it would
hand the reward model a token it reads and the gold judge never sees.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated.

    Position slots are columns of the (left-padded) batch; `key_mask` says which slots
    hold real tokens, `length` how many slots are filled.
    """

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, dtype, device):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0


def attention_bias(key_mask: torch.Tensor, q_start: int, q_len: int) -> torch.Tensor:
    """Boolean [B, 1, q_len, k_len] mask: causal, and no attending to padding keys.

    Queries occupy slots q_start .. q_start+q_len-1 and keys slots 0 .. k_len-1.
    Every slot may attend to itself, so a padding query has at least one key and
    softmax stays finite (its output is never used).
    """
    k_len = key_mask.shape[1]
    q_slot = torch.arange(q_start, q_start + q_len, device=key_mask.device)[:, None]  # (q, 1)
    k_slot = torch.arange(k_len, device=key_mask.device)[None, :]  # (1, k)
    allowed = (k_slot <= q_slot) & key_mask[:, None, :]  # (B, q, k)
    allowed |= k_slot == q_slot
    return allowed[:, None]  # (B, 1, q, k)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, bias=None, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:  # append this chunk, then attend over everything so far
            end = cache.length + T
            cache.k[layer, :, :, cache.length : end] = k
            cache.v[layer, :, :, cache.length : end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]  # (B, nh, end, hs)
        dropout = self.dropout if self.training else 0.0
        if bias is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, bias=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), bias, cache, layer)
        return x + self.mlp(self.ln_2(x))


@dataclass
class GPTConfig:
    block_size: int = 128
    """Longest sequence (prompt + response) the model can read."""
    vocab_size: int = 50258
    """Number of token ids, special tokens included (the embedding pads it to a multiple of 64)."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block."""
    n_embd: int = 128
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability in attention and MLP outputs (0 for fine-tuning and RL)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers, as in GPT-2."""
    pad_id: int | None = None
    """The PAD token's id, whose logit is held at -inf like the padding rows' (None: no
    such token, as in checkpoints from before it was held)."""

    def __post_init__(self):
        if self.pad_id is not None and not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id {self.pad_id} is not a token id (vocab_size {self.vocab_size})")

    @property
    def padded_vocab_size(self) -> int:
        return 64 * math.ceil(self.vocab_size / 64)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer).
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, attention_mask=None, cache=None):
        """Final (post-LayerNorm) hidden states [B, T, C] of tokens `idx` [B, T].

        attention_mask [B, T] (bool, True on real tokens) is needed for left padding;
        `cache` continues a KVCache (decoding), covering the new tokens' slots too.
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if attention_mask is None and cache is None:
            bias = None  # plain causal attention (training on right-padded batches)
            pos = torch.arange(T, device=idx.device).expand(B, T)  # (B, T)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            if cache is not None:
                cache.key_mask[:, start : start + T] = attention_mask
                key_mask = cache.key_mask[:, : start + T]
            else:
                key_mask = attention_mask.bool()
            # position = number of real tokens before this one, so left padding shifts nothing
            pos = (key_mask.long().cumsum(1) - 1).clamp(min=0)[:, start:]  # (B, T)
            bias = attention_bias(key_mask, start, T)  # (B, 1, T, start+T)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, bias, cache, layer)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def logits(self, hidden):
        """Tied LM head: [B, T, C] -> [B, T, padded_vocab_size], the padding columns and PAD's at -inf."""
        logits = F.linear(hidden, self.wte.weight)  # (B, T, Vp)
        logits[..., self.config.vocab_size :] = float("-inf")
        if self.config.pad_id is not None:
            logits[..., self.config.pad_id] = float("-inf")
        return logits

    def forward(self, idx, attention_mask=None):
        """Returns (logits [B, T, Vp], hidden states [B, T, C])."""
        hidden = self.hidden_states(idx, attention_mask)
        return self.logits(hidden), hidden

    @torch.no_grad()
    def generate(
        self,
        idx,
        attention_mask=None,
        max_new_tokens=32,
        temperature=1.0,
        top_k=None,
        top_p=None,
        eos_token_id=None,
        pad_token_id=0,
        use_cache=True,
        generator=None,
    ):
        """Sample continuations of left-padded prompts `idx` [B, P].

        The defaults sample from the full distribution (temperature 1, no top-k/top-p),
        which is what PPO's KL estimate and DPO's preference data assume; temperature 0
        is greedy. A row stops at its first `eos_token_id` (included); after it the row
        holds `pad_token_id`. Stops early once every row has stopped.

        Returns (tokens [B, N], response_mask [B, N]) with N <= max_new_tokens; the mask
        is True on generated tokens up to and including EOS.
        """
        B, P = idx.shape
        if P + max_new_tokens > self.config.block_size:
            raise ValueError(
                f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds block_size {self.config.block_size}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(idx, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        cache = None
        if use_cache:
            hs = self.config.n_embd // self.config.n_head
            dtype = self.wte.weight.dtype
            cache = KVCache(self.config.n_layer, B, self.config.n_head, P + max_new_tokens, hs, dtype, idx.device)
        tokens, done = [], torch.zeros(B, dtype=torch.bool, device=idx.device)
        seq, mask = idx, attention_mask  # what the next forward pass reads
        for _ in range(max_new_tokens):
            if use_cache:
                hidden = self.hidden_states(seq, mask, cache)[:, -1]  # (B, C)
            else:  # full recompute of every position; plain causal attention when nothing is padded
                hidden = self.hidden_states(seq, None if bool(mask.all()) else mask)[:, -1]
            logits = self.logits(hidden)[:, : self.config.vocab_size].float()  # (B, V)
            next_token = sample_token(logits, temperature, top_k, top_p, generator)  # (B,)
            next_token = torch.where(done, torch.full_like(next_token, pad_token_id), next_token)
            tokens.append(next_token)
            if eos_token_id is not None:
                done |= next_token == eos_token_id
            step_mask = torch.ones(B, 1, dtype=torch.bool, device=idx.device)
            if use_cache:
                seq, mask = next_token[:, None], step_mask
            else:
                seq, mask = torch.cat([seq, next_token[:, None]], 1), torch.cat([mask, step_mask], 1)
            if done.all():
                break
        tokens = torch.stack(tokens, 1)  # (B, N)
        # a token is part of the response if no EOS came strictly before it
        if eos_token_id is None:
            response_mask = torch.ones_like(tokens, dtype=torch.bool)
        else:
            eos_before = (tokens == eos_token_id).long().cumsum(1) - (tokens == eos_token_id).long()
            response_mask = eos_before == 0
        return tokens, response_mask


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits [B, V]: temperature, then top-k, then nucleus (top-p)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:  # None or 0: no top-k
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V) each
        sorted_probs = sorted_logits.softmax(-1)  # (B, V)
        before = sorted_probs.cumsum(-1) - sorted_probs  # (B, V): the mass of the tokens ranked above
        # drop a token once the tokens before it already reach top_p (the first always stays)
        drop_sorted = before >= top_p  # (B, V)
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # (B, V), back in vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Turn every dropout of a model (a GPT, or a RewardModel around one) off, in place.

    PPO and DPO compare log-probs of the same tokens computed at different times (while
    sampling, under the frozen reference, during the update): with dropout on, those
    differ by noise, the PPO ratio and the KL penalty are off from the first step, and
    DPO's implicit rewards do not start at 0. TRL turns dropout off for the same reason.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, CausalSelfAttention):
            module.dropout = 0.0
        elif isinstance(module, GPT):
            module.config.dropout = 0.0  # saved with the checkpoint
    return model


@contextmanager
def evaluating(*models: nn.Module):
    """Eval mode (no dropout) inside the block; each model's own mode again after it."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
