"""Providers of the whole policy loss (log-probs, entropy, PPO / Clip-Cov / KL-Cov, aggregation), forward
and backward to the logits, as one optimizer micro-step computes it.

Each is f(inputs, method, **opts) -> (loss, metrics), inputs = PolicyInputs. covkernels.policy_loss has
python_ref.policy_loss's signature; verl is its own pipeline (torch log-probs and entropy, then
core_algos' registered loss and agg_loss), the implementation users compare against.
"""
import dataclasses
import types

import torch

from . import cases as C
from .providers import Unavailable, _module, raise_recompile_limit

METHODS = ("ppo", "clip_cov", "kl_cov")
VERL_NAMES = {"ppo": "vanilla", "clip_cov": "clip_cov", "kl_cov": "kl_cov"}
ENTROPY_COEF = 1e-3  # a dense entropy bonus, so every provider computes entropy with gradient


@dataclasses.dataclass
class PolicyInputs:
    logits: torch.Tensor  # [B, T, V], requires grad
    targets: torch.Tensor  # [B, T], ignore_index at padding
    old_logp: torch.Tensor  # [B, T] fp32, <= 0
    advantages: torch.Tensor  # [B, T] fp32
    response_mask: torch.Tensor  # [B, T] bool


def make_policy_inputs(case, device, seed=0):
    """A case's logits and targets, with old log-probs near the current ones (a policy a few steps old:
    ratios around 1, some clipped) and per-sequence advantages, as GRPO gives them."""
    logits, targets = C.make_inputs(case, device, seed)
    mask = targets != C.IGNORE_INDEX
    g = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        import python_ref as ref

        logp = torch.cat([ref.logprobs_and_entropy(logits[b:b + 1].float(), targets[b:b + 1])[0]
                          for b in range(logits.shape[0])])
    old = (logp + 0.1 * torch.randn(logp.shape, device=device, generator=g)).clamp(max=0.0)
    adv = torch.randn((logits.shape[0], 1), device=device, generator=g).expand_as(logp).contiguous()
    return PolicyInputs(logits.requires_grad_(), targets, old, adv, mask)


def _covkernels():
    try:
        import covkernels as ck

        fn = ck.policy_loss
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"covkernels.policy_loss is not importable yet ({type(e).__name__}: {e})") from e
    return lambda x, method, **kw: fn(x.logits, x.targets, x.old_logp, x.advantages, x.response_mask,
                                      method=method, entropy_coef=ENTROPY_COEF,
                                      ignore_index=C.IGNORE_INDEX, **kw)


def _python_ref(compiled=False):
    import python_ref as ref

    if compiled:
        raise_recompile_limit()
    fn = torch.compile(ref.policy_loss) if compiled else ref.policy_loss
    return lambda x, method, **kw: fn(x.logits, x.targets, x.old_logp, x.advantages, x.response_mask,
                                      method=method, entropy_coef=ENTROPY_COEF,
                                      ignore_index=C.IGNORE_INDEX, **kw)


def _verl_config(clip_cov_ratio, kl_cov_ratio):
    """The fields of verl's ActorConfig that its loss functions read, without building one."""
    values = {"clip_ratio_c": 3.0}
    policy_loss = types.SimpleNamespace(clip_cov_ratio=clip_cov_ratio, clip_cov_lb=1.0, clip_cov_ub=5.0,
                                        kl_cov_ratio=kl_cov_ratio, ppo_kl_coef=1.0)
    return types.SimpleNamespace(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None,
                                 policy_loss=policy_loss, global_batch_info={},
                                 get=lambda key, default=None: values.get(key, default))


def _verl():
    get_fn = _module("verl.trainer.ppo.core_algos", "get_policy_loss_fn", pip="verl")
    agg_loss = _module("verl.trainer.ppo.core_algos", "agg_loss")
    logprobs = _module("verl.utils.torch_functional", "logprobs_from_logits_v2")
    entropy_fn = _module("verl.utils.torch_functional", "entropy_from_logits")

    def fn(x, method, clip_cov_ratio=2e-4, kl_cov_ratio=2e-4, generator=None):
        safe = torch.where(x.response_mask, x.targets, torch.zeros_like(x.targets))
        logp = logprobs(x.logits, safe)
        ent = entropy_fn(x.logits)
        mask = x.response_mask.to(logp.dtype)
        loss, metrics = get_fn(VERL_NAMES[method])(x.old_logp, logp, x.advantages, mask, "token-mean",
                                                   _verl_config(clip_cov_ratio, kl_cov_ratio))
        # verl's actor: policy loss minus entropy_coeff times the aggregated entropy.
        return loss - ENTROPY_COEF * agg_loss(ent, mask, "token-mean"), metrics
    return fn


PROVIDERS = {"covkernels": _covkernels, "python_ref": _python_ref,
             "compiled_ref": lambda: _python_ref(compiled=True), "verl": _verl}
KINDS = {"covkernels": "ours", "python_ref": "reference", "compiled_ref": "reference", "verl": "peer"}


def loss_and_grad(fn, x, method, **kw):
    loss, _ = fn(x, method, **kw)
    (grad,) = torch.autograd.grad(loss, x.logits)
    return loss.detach(), grad


def check(fn, case, device, method):
    """Loss and gradient on a small instance of the case (same V and dtype, 2 x 48 tokens) against
    python_ref in float64. Selections are made deterministic: Clip-Cov with ratio 1 keeps every candidate
    (no random draw), KL-Cov's top-k is deterministic. Returns (loss error, gradient error, ok)."""
    from .check import TOL, max_err

    small = C.Case("fwd_bwd", 96, case.V, case.dtype, case.pad)
    kw = {"clip_cov_ratio": 1.0} if method == "clip_cov" else {}
    x = make_policy_inputs(small, device, seed=5)
    loss, grad = loss_and_grad(fn, x, method, **kw)
    x64 = dataclasses.replace(x, logits=x.logits.detach().double().requires_grad_(),
                              old_logp=x.old_logp.double(), advantages=x.advantages.double())
    want_loss, want_grad = loss_and_grad(_python_ref(), x64, method, **kw)
    x_plain = dataclasses.replace(x, logits=x.logits.detach().clone().requires_grad_())
    plain_loss, plain_grad = loss_and_grad(_python_ref(), x_plain, method, **kw)
    errs = max_err(loss, want_loss), max_err(grad, want_grad)
    tol = TOL[case.torch_dtype]
    ok = (errs[0] <= 4 * max_err(plain_loss, want_loss) + tol * (1 + want_loss.abs().item())
          and errs[1] <= 4 * max_err(plain_grad, want_grad) + tol * (1 + want_grad.abs().max().item()))
    return errs[0], errs[1], ok
