"""Direct Preference Optimisation: the policy learns from preference pairs directly.

DPO (Rafailov et al. 2023) shows that the KL-regularised RLHF objective has a closed-
form optimum, pi*(y|x) proportional to pi_ref(y|x) exp(r(x, y) / beta), so the reward
is implicit in the policy: r(x, y) = beta log(pi(y|x) / pi_ref(y|x)) + const.
Putting that into the Bradley-Terry likelihood of the preference pairs gives a loss
on the policy alone, with no reward model and no sampling:

    loss = -log sigmoid(beta [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))])

The loss itself and its relatives (IPO, SLiC-hinge, robust DPO) are a few lines of
`dpo_loss` in minalign/reference.py, the spec; `minalign.ops.dpo_loss` computes the
same in C++/CUDA. This module computes the log-probabilities it needs.
"""

import torch

from minalign import ops
from minalign.data import IGNORE_INDEX, collate_pairs
from minalign.distributed import DistInfo, all_reduce_sum
from minalign.model import evaluating


def uses_mean_logps(loss_type: str) -> bool:
    """Whether a DPO-family loss compares mean log-probs per response token: IPO's target
    margin is per token (TRL's convention, see reference.dpo_loss); the other losses
    compare log-probs summed over the response."""
    return loss_type == "ipo"


def pair_logps(model, batch, per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y|x) [B] of the chosen and of the rejected responses of a pair batch, in
    one forward pass: summed over each response's tokens, or their mean with `per_token`
    (IPO's convention, see reference.dpo_loss).

    The chosen and rejected halves share one padded length, so they go through the
    model as one [2B, T] batch. Right padding needs no attention mask.
    """
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])  # (2B, T)
    logits, _ = model(input_ids)  # (2B, T, Vp)
    out = ops.sequence_logprobs(logits, labels, labels != IGNORE_INDEX, inplace_backward=True)  # logits not read again
    logps = out.mean_logps if per_token else out.sum_logps  # (2B,)
    return logps.chunk(2)  # (B,) chosen, (B,) rejected


@torch.no_grad()
def reference_logps(model, pairs, pad_id, per_token: bool = False, batch_size=32, verbose=False,
                    dist: DistInfo = DistInfo()) -> torch.Tensor:
    """[n_pairs, 2] reference log-probs of every pair, chosen then rejected (`per_token`
    as in pair_logps). Computed once before training, so the reference model need not
    stay in memory (it is the frozen SFT model). `verbose` prints progress.

    Under DDP (`dist`) each process computes every world_size-th batch and the sum over
    processes fills in the rest: the batches one process would make, and so its numbers."""
    out = torch.zeros(len(pairs), 2, device=model.wte.weight.device)
    starts = range(0, len(pairs), batch_size)[dist.rank :: dist.world_size]  # this process's batches
    report_every = max(1, len(starts) // 10)  # batches between progress lines: about ten of them
    with evaluating(model):
        for i, start in enumerate(starts, 1):
            batch = collate_pairs(pairs[start : start + batch_size], pad_id, out.device)
            out[start : start + batch_size] = torch.stack(pair_logps(model, batch, per_token), 1)  # (b, 2)
            if verbose and (i % report_every == 0 or i == len(starts)):
                done = min(start + dist.world_size * batch_size, len(pairs))  # by all processes, about
                print(f"  reference log-probs: {done}/{len(pairs)} pairs", flush=True)
    return all_reduce_sum(out, dist).cpu()  # each row from one process, zeros from the others
