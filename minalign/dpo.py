"""Direct Preference Optimisation: the policy learns from preference pairs directly.

DPO (Rafailov et al. 2023) shows that the KL-regularised RLHF objective has a closed-
form optimum, pi*(y|x) proportional to pi_ref(y|x) exp(r(x, y) / beta), so the reward
is implicit in the policy: r(x, y) = beta log(pi(y|x) / pi_ref(y|x)) + const.
Putting that into the Bradley-Terry likelihood of the preference pairs gives a loss
on the policy alone, with no reward model and no sampling:

    loss = -log sigmoid(beta [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))])

The loss itself (and its relatives IPO, SLiC-hinge, robust DPO) is
`minalign.ops.dpo_loss`; this module computes the log-probabilities it needs.
"""

import torch

from minalign import ops
from minalign.data import collate_pairs


def pair_logps(model, batch) -> tuple[ops.SequenceLogprobs, ops.SequenceLogprobs]:
    """Log-probs of the chosen and rejected responses of a pair batch, in one forward pass.

    The chosen and rejected halves share one padded length, so they go through the
    model as one [2B, T] batch. Right padding needs no attention mask.
    """
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])  # (2B, T)
    logits, _ = model(input_ids)  # (2B, T, Vp)
    out = ops.sequence_logprobs(logits, labels, labels != -100, inplace_backward=True)  # logits not read again
    B = batch["chosen_input_ids"].shape[0]
    chosen = ops.SequenceLogprobs(*(None if t is None else t[:B] for t in out))
    rejected = ops.SequenceLogprobs(*(None if t is None else t[B:] for t in out))
    return chosen, rejected


@torch.no_grad()
def reference_logps(model, pairs, pad_id, batch_size=32, verbose=False) -> torch.Tensor:
    """[n_pairs, 4] reference log-probs of every pair: chosen sum, rejected sum,
    chosen mean, rejected mean. Computed once before training, so the reference model
    need not stay in memory (it is the frozen SFT model). `verbose` prints progress."""
    device = model.wte.weight.device
    was_training = model.training
    model.eval()
    rows = []
    starts = range(0, len(pairs), batch_size)
    report_every = max(1, len(starts) // 10)  # batches between progress lines: about ten of them
    for i, start in enumerate(starts, 1):
        batch = collate_pairs(pairs[start : start + batch_size], pad_id, device)
        chosen, rejected = pair_logps(model, batch)
        logps = [chosen.sum_logps, rejected.sum_logps, chosen.mean_logps, rejected.mean_logps]
        rows.append(torch.stack(logps, 1))  # (b, 4)
        if verbose and (i % report_every == 0 or i == len(starts)):
            print(f"  reference log-probs: {min(start + batch_size, len(pairs))}/{len(pairs)} pairs", flush=True)
    model.train(was_training)
    return torch.cat(rows).cpu()
