"""minalign's fused operators: the one public entry point.

    token_logprobs     log p(label) per row of [..., V] logits (and the entropy), never
                       forming the [..., V] softmax
    sequence_logprobs  per-token, summed and mean log-probs of [B, T] labels
    weighted_logprob_sum  sum_i w_i log p(label_i) with its gradient computed in the same
                       pass (SFT's cross-entropy), written over the logits
    dpo_loss           DPO, IPO, SLiC-hinge and robust-DPO losses per pair
    ppo_policy_loss    PPO's clipped surrogate, clip fraction and approximate KL
    ppo_value_loss     PPO's clipped value loss and its clip fraction
    gae                generalised advantage estimation over right-padded [B, T]

Each op runs the C++ (CPU) or CUDA kernel of `minalign._C` when the extension is
built, and otherwise the plain PyTorch version in `minalign.reference`, which is the
specification (warning once that it does). Either way an op accepts the same inputs and returns
float32: the losses and GAE compute in float32 whatever floating dtype they are given.
The kernels' gradients are first derivatives only: a gradient of a gradient (double
backward) raises an error rather than coming out silently zero.

Importing `minalign._C` registers the kernels as torch.ops.minalign.*;
`minalign.op_registration` adds their fake (shape-only) versions and their autograd,
so they also work under torch.compile.
"""

import numbers
import warnings

import torch
from torch import Tensor

from minalign import reference
from minalign.reference import GAE, IGNORE_INDEX, DPOLoss, PolicyLoss, SequenceLogprobs, ValueLoss

_IMPORT_ERROR = None
try:
    from minalign import _C
except ImportError as error:  # not built, or built against another torch
    _C, _IMPORT_ERROR = None, error

HAS_EXTENSION = _C is not None
HAS_CUDA_KERNELS = HAS_EXTENSION and bool(_C.WITH_CUDA)
if HAS_EXTENSION:
    from minalign import op_registration  # noqa: F401  (fake kernels and autograd of torch.ops.minalign.*)
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")  # their index is the kernels' loss_type
_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned = False


def cpu_kernels() -> str:
    """Which build of the CPU kernels' vector loops runs: "avx512", "avx2" or "baseline"
    (the widest this CPU runs, or the one MINALIGN_CPU_BLOCKS asks for; ValueError for
    one it cannot give), or "reference" without the extension."""
    if not HAS_EXTENSION:
        return "reference"
    if not hasattr(_C, "cpu_kernels"):
        raise ValueError(f"{_C.__file__} was built from older sources: rebuild it "
                         f"(pip install --no-build-isolation -e . , see the README's Building)")
    return _C.cpu_kernels()


def _use_kernel(t: Tensor) -> bool:
    """True when a compiled kernel handles t's device; otherwise warn (once) and use the reference."""
    global _warned
    if t.device.type == "cpu" and HAS_EXTENSION or t.device.type == "cuda" and HAS_CUDA_KERNELS:
        return True
    if not _warned:
        _warned = True
        why = f"the extension minalign._C is not built ({_IMPORT_ERROR})" if not HAS_EXTENSION else (
            f"minalign._C has no kernels for {t.device.type} tensors")
        warnings.warn(f"minalign.ops: {why}; using the slower PyTorch reference", stacklevel=3)
    return False


def _check_floats(op: str, shape: tuple | None = None, **tensors: Tensor) -> None:
    """One shape and one device for all, of rank len(shape) when given, non-empty; floats but the mask."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if name != "mask" and not t.is_floating_point():  # a mask may be bool, int or float
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.shape != first.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
    if shape is not None and first.dim() != len(shape):
        raise ValueError(f"{op}: expected {first_name} of shape {list(shape)}, got {tuple(first.shape)}")
    if first.numel() == 0:
        raise ValueError(f"{op}: empty batch ({first_name} has shape {tuple(first.shape)})")


def _check_numbers(op: str, **values) -> None:
    """Hyperparameters are plain numbers: a tensor would get no gradient from the kernels."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")


# ---------------------------------------------------------------------- log-probs


def _check_inplace_backward(op: str, logits: Tensor, what: str = "inplace_backward=True",
                            instead: str = "use inplace_backward=False") -> None:
    """Refuse to write a gradient over logits where that would corrupt something we can see."""
    if not (logits.requires_grad and torch.is_grad_enabled()):
        return  # no backward will run
    if logits.is_leaf:
        raise ValueError(f"{op}: {what} would write the gradient over a leaf tensor that requires grad (its "
                         f"values, and its .grad, which would be the same memory); {instead}")
    base = logits._base  # a view: the memory belongs to its base
    if base is not None and base.is_leaf and base.requires_grad:
        raise ValueError(f"{op}: {what} would write the gradient over a view of a leaf tensor that requires "
                         f"grad (e.g. a parameter); {instead}")


def _check_logits_and_labels(op: str, logits: Tensor, labels: Tensor, ignore_index: int) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not -2**63 <= ignore_index < 2**63:
        raise TypeError(f"{op}: ignore_index must be an int64 integer, got {ignore_index!r}")
    if not isinstance(logits, Tensor) or logits.dtype not in _LOGITS_DTYPES:
        raise TypeError(f"{op}: logits must be a float32, bfloat16 or float16 tensor, got {getattr(logits, 'dtype', type(logits))}")
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
        raise TypeError(f"{op}: labels must be an int64 tensor, got {getattr(labels, 'dtype', type(labels))}")
    if logits.dim() == 0 or labels.shape != logits.shape[:-1]:
        raise ValueError(f"{op}: labels must have shape logits.shape[:-1]; got logits {tuple(logits.shape)}, labels {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"{op}: labels are on {labels.device} but logits on {logits.device}")
    if labels.numel() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{op}: empty batch (logits has shape {tuple(logits.shape)})")
    if not logits.is_contiguous():
        raise ValueError(f"{op}: logits must be contiguous (a silent copy would double their memory); call .contiguous()")


def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, return_entropy: bool = False,
                   inplace_backward: bool = False):
    """log p(label) for every row of logits, float32 [...]; with return_entropy, (logp, entropy).

        logp = x_y - log sum_j exp(x_j)   (0 where labels == ignore_index)
        H    = -sum_j p_j log p_j         (0 where ignored)

    logits [..., V] contiguous float32, bfloat16 or float16 (-inf allowed: probability 0);
    labels [...] int64 in [0, V) or == ignore_index. Differentiable w.r.t. logits; the
    kernels keep O(N) extra memory where log_softmax + gather keeps [N, V].

    inplace_backward=True: backward writes the gradient over the logits' own memory
    instead of a new [..., V] tensor, which saves the memory and the time of a fresh
    allocation (on the CPU mostly its page faults). The logits' values are destroyed by
    backward: use it only when nothing reads the logits after backward (a training step
    that computes its loss from the log-probs). Refused (ValueError) when the logits are
    a leaf that requires grad, or a view of one. Another autograd node that saved the
    logits and runs its backward later fails with PyTorch's "modified by an inplace
    operation" error rather than using wrong values. The PyTorch reference ignores it.

    An out-of-range label raises. On CUDA that costs one wait for the GPU per call (the
    kernel reports the first bad row, the host reads it); inside a CUDA graph capture
    the check is skipped.
    """
    _check_logits_and_labels("token_logprobs", logits, labels, ignore_index)
    if inplace_backward:
        _check_inplace_backward("token_logprobs", logits)
    if not _use_kernel(logits):
        return reference.token_logprobs(logits, labels, ignore_index, return_entropy)
    V = logits.shape[-1]
    logprobs, _, entropy = torch.ops.minalign.token_logprobs(
        logits.view(-1, V), labels.reshape(-1).contiguous(), ignore_index, return_entropy, bool(inplace_backward))
    shape = logits.shape[:-1]
    return (logprobs.view(shape), entropy.view(shape)) if return_entropy else logprobs.view(shape)


def weighted_logprob_sum(logits: Tensor, labels: Tensor, weights: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """sum_i weights_i * log p(labels_i), a 0-dim float32 tensor, its gradient computed in the same pass.

        loss = sum_i w_i logp_i,   d loss / d x_ij = w_i ([j == y_i] - p_ij)

    A loss linear in the log-probs, with weights known before the forward (SFT's mean
    cross-entropy: w_i = -1/n on the n trained tokens), needs nothing from later in the
    step to know its gradient. So the kernel writes the gradient over the logits while
    each row is still in cache: one read and one write of the logits, where
    token_logprobs and its backward take two reads and a write (bench/bench_logprobs.py).
    DPO's and PPO's losses are not linear in the log-probs: they use token_logprobs.

    The logits are overwritten during this call when a gradient is wanted (they require
    grad and grad mode is on): read nothing from them afterwards. Their version counter
    is bumped, so an autograd node that saved them fails loudly. Refused (ValueError) for
    a leaf that requires grad, or a view of one. backward scales the stored gradient by
    the upstream one, a step skipped when that is 1 (as for loss.backward() on this loss
    alone) except under torch.compile or a CUDA graph capture, which always multiply.
    Without a gradient nothing is overwritten. Shapes: logits [..., V], labels and
    weights [...]; ignored rows add nothing whatever their weight. On CUDA the labels
    are checked by a small kernel before any logit is overwritten, and the host waits
    for it (one sync per call; skipped inside a CUDA graph capture).
    """
    op = "weighted_logprob_sum"
    _check_logits_and_labels(op, logits, labels, ignore_index)
    if not isinstance(weights, Tensor) or not weights.is_floating_point() or weights.shape != labels.shape:
        raise ValueError(f"{op}: weights must be a floating-point tensor of the labels' shape "
                         f"{tuple(labels.shape)}, got {getattr(weights, 'dtype', type(weights))} "
                         f"{tuple(getattr(weights, 'shape', ()))}")
    if weights.device != logits.device:
        raise ValueError(f"{op}: weights are on {weights.device} but logits on {logits.device}")
    if not (logits.requires_grad and torch.is_grad_enabled()):  # no backward will run: no gradient to write
        return (weights.float() * token_logprobs(logits, labels, ignore_index)).sum()
    _check_inplace_backward(op, logits, "the fused forward", "use token_logprobs, or pass logits that are "
                            "not a leaf (a model's output)")
    if not _use_kernel(logits):
        return reference.weighted_logprob_sum(logits, labels, weights, ignore_index)
    return _WeightedLogprobSum.apply(logits, labels, weights, ignore_index)


class _WeightedLogprobSum(torch.autograd.Function):
    """Runs the fused kernel in forward; backward hands on the gradient it left in the
    logits (and, when the weights require grad, d loss / d w_i = logp_i)."""

    @staticmethod
    def forward(ctx, logits, labels, weights, ignore_index):
        V = logits.shape[-1]
        w = weights.detach().float().reshape(-1).contiguous()
        logprobs = torch.ops.minalign.token_logprobs_fused_(
            logits.view(-1, V), labels.reshape(-1).contiguous(), w, ignore_index)
        # The dispatcher does not count this write; counting it makes a node that saved the
        # logits before (and runs its backward later) fail instead of reading the gradient.
        torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(logits, logprobs.view(weights.shape) if ctx.needs_input_grad[2] else None)
        return (w * logprobs).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable  # the stored gradient has no graph of its own
    def backward(ctx, grad_loss):
        grad, logprobs = ctx.saved_tensors  # d loss / d logits, written by forward
        # One more pass over the logits, only when needed. Knowing costs the host a wait
        # for grad_loss, which a compiled graph cannot branch on and a CUDA graph capture
        # cannot wait for: those always multiply.
        if (torch.compiler.is_compiling() or (grad_loss.is_cuda and torch.cuda.is_current_stream_capturing())
                or not bool(grad_loss == 1)):
            grad.mul_(grad_loss)  # in float32, rounded once to the logits' dtype
        grad_weights = None if logprobs is None else grad_loss * logprobs
        return grad.detach(), None, grad_weights, None  # the logits' memory, without their history


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor, return_entropy: bool = False,
                      inplace_backward: bool = False) -> SequenceLogprobs:
    """Per-token [B, T], summed [B] and length-normalised [B] log-probs of labels (and entropy [B, T]).

    logits [B, T, V]; labels [B, T] aligned with them (labels[b, t] is the token that
    logits[b, t] predicts); mask [B, T], 1 for the tokens that count (labels under a 0
    may hold anything). See reference.sequence_logprobs for the formulas.
    inplace_backward=True: backward overwrites the logits with their gradient (see
    token_logprobs).
    """
    op = "sequence_logprobs"
    if not (isinstance(logits, Tensor) and logits.dim() == 3):
        raise ValueError(f"{op}: logits must be [B, T, V], got shape {tuple(getattr(logits, 'shape', ()))}")
    for name, t in (("labels", labels), ("mask", mask)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.shape != logits.shape[:2]:  # no broadcasting: a [B, 1] label is a mistake
            raise ValueError(f"{op}: {name} must have shape {tuple(logits.shape[:2])}, got {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{op}: {name} is on {t.device} but logits on {logits.device}")
    if mask.is_complex():
        raise TypeError(f"{op}: mask must be bool, integer or floating point, got {mask.dtype}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{op}: labels must be an int64 tensor, got {labels.dtype}")
    mask = mask.detach().float()
    labels = labels.masked_fill(mask == 0, IGNORE_INDEX)  # [B, T]
    out = token_logprobs(logits, labels, IGNORE_INDEX, return_entropy, inplace_backward)
    token_logps, entropy = out if return_entropy else (out, None)
    sum_logps = token_logps.sum(-1)  # [B]
    return SequenceLogprobs(token_logps, sum_logps, sum_logps / mask.sum(-1).clamp(min=1), entropy)


# ---------------------------------------------------------------------- losses


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOLoss:
    """Per-pair losses [B] and detached rewards [B]: sigmoid (DPO), ipo, hinge (SLiC/RSO) or robust.

    See reference.dpo_loss for the formulas and papers (and why train_dpo.py passes
    length-normalised log-probs to "ipo"); label_smoothing (in [0, 0.5)) applies to
    "sigmoid" and "robust".
    """
    _check_numbers("dpo_loss", beta=beta, label_smoothing=label_smoothing)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type in ("ipo", "hinge"):
        raise ValueError(f"dpo_loss: label_smoothing applies to 'sigmoid' and 'robust' only, not {loss_type!r}")
    logps = dict(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    _check_floats("dpo_loss", ("B",), **logps)
    pc, pr, rc, rr = (t.float().contiguous() for t in logps.values())  # float32, as the kernels compute
    if not _use_kernel(policy_chosen_logps):
        return reference.dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing)
    losses, chosen, rejected = torch.ops.minalign.dpo_loss(
        pc, pr, rc.detach(), rr.detach(), float(beta), DPO_LOSS_TYPES.index(loss_type), float(label_smoothing))
    return DPOLoss(losses, chosen.detach(), rejected.detach())


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    clip_eps: float = 0.2) -> PolicyLoss:
    """PPO clipped-surrogate loss (0-dim), clip fraction and approx KL over [B, T]; gradient w.r.t. logprobs.

    See reference.ppo_policy_loss for the formulas.
    """
    _check_floats("ppo_policy_loss", ("B", "T"), logprobs=logprobs, old_logprobs=old_logprobs,
                  advantages=advantages, mask=mask)
    _check_numbers("ppo_policy_loss", clip_eps=clip_eps)
    if not clip_eps >= 0:
        raise ValueError(f"ppo_policy_loss: clip_eps must be >= 0, got {clip_eps}")
    inputs = (logprobs.float().contiguous(), old_logprobs.detach().float().contiguous(),
              advantages.detach().float().contiguous(), mask.detach().float().contiguous())
    if not _use_kernel(logprobs):
        return reference.ppo_policy_loss(*inputs, clip_eps)
    loss, clipfrac, approx_kl = torch.ops.minalign.ppo_policy_loss(*inputs, float(clip_eps))
    return PolicyLoss(loss, clipfrac.detach(), approx_kl.detach())


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2) -> ValueLoss:
    """PPO clipped value loss (0-dim) and value clip fraction over [B, T]; gradient w.r.t. values.

    See reference.ppo_value_loss for the formulas.
    """
    _check_floats("ppo_value_loss", ("B", "T"), values=values, old_values=old_values, returns=returns, mask=mask)
    _check_numbers("ppo_value_loss", clip=clip)
    if not clip >= 0:
        raise ValueError(f"ppo_value_loss: clip must be >= 0, got {clip}")
    inputs = (values.float().contiguous(), old_values.detach().float().contiguous(),
              returns.detach().float().contiguous(), mask.detach().float().contiguous())
    if not _use_kernel(values):
        return reference.ppo_value_loss(*inputs, clip)
    loss, clipfrac = torch.ops.minalign.ppo_value_loss(*inputs, float(clip))
    return ValueLoss(loss, clipfrac.detach())


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> GAE:
    """Advantages and returns [B, T] for right-padded rollouts; no gradient.

    See reference.gae for the recursion; positions where mask is 0 get 0.
    """
    _check_floats("gae", ("B", "T"), rewards=rewards, values=values, mask=mask)
    _check_numbers("gae", gamma=gamma, lam=lam)
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gae: gamma and lam must be in [0, 1], got {gamma} and {lam}")
    inputs = tuple(t.detach().float().contiguous() for t in (rewards, values, mask))
    if not _use_kernel(rewards):
        return reference.gae(*inputs, gamma, lam)
    advantages, returns = torch.ops.minalign.gae(*inputs, float(gamma), float(lam))
    return GAE(advantages, returns)
