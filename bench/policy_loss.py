"""The policy-loss family: the whole loss (log-probs, entropy, PPO / Clip-Cov / KL-Cov, aggregation), forward
and backward to the logits, as one optimizer micro-step computes it, per method.

A case is the logits pass's fwd_bwd case (padded layouts only) with a method; its bytes are the fused
pass's fwd_bwd count: the loss itself adds O(N) traffic to the 3 N V e of the logits (two reads of the
valid rows, one write of the gradient). Each provider is f(inputs, method, **opts) -> (loss, metrics),
inputs = PolicyInputs. covkernels.policy_loss has python_ref.policy_loss's signature; verl is its own
pipeline (torch log-probs and entropy, then core_algos' loss and agg_loss), the implementation users
compare against.

The check runs on a small instance of the case (same V, dtype and padding, CHECK_N tokens), against
python_ref in float64: the loss couples every token (the selections, the aggregation), so it cannot be
checked on a sample of rows. Selections are made deterministic there: Clip-Cov with ratio 1 keeps every
candidate (no random draw), KL-Cov's top-k is deterministic.
"""
import dataclasses
import types

import torch

import python_ref as ref

from . import cases as C
from .family import Family
from .providers import Provider, Unavailable, compiled, entry_point

METHODS = ("ppo", "clip_cov", "kl_cov")
VERL_NAMES = {"ppo": "vanilla", "clip_cov": "clip_cov", "kl_cov": "kl_cov"}
ENTROPY_COEF = 1e-3  # a dense entropy bonus, so every provider computes entropy with gradient
CHECK_N = 96


@dataclasses.dataclass(frozen=True)
class PolicyCase(C.Case):
    method: str = "ppo"

    @property
    def name(self):
        return super().name.replace(self.op, f"{self.op} {self.method}", 1)

    @property
    def backward(self):
        return True

    def fields(self, computes):
        return dict(super().fields(computes), method=self.method)


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
        logp = torch.cat([ref.logprobs_and_entropy(logits[b:b + 1].float(), targets[b:b + 1])[0]
                          for b in range(logits.shape[0])])
    old = (logp + 0.1 * torch.randn(logp.shape, device=device, generator=g)).clamp(max=0.0)
    adv = torch.randn((logits.shape[0], 1), device=device, generator=g).expand_as(logp).contiguous()
    return PolicyInputs(logits.requires_grad_(), targets, old, adv, mask)


def loss_and_grad(fn, x, method, **opts):
    loss, _ = fn(x, method, **opts)
    (grad,) = torch.autograd.grad(loss, x.logits)
    return {"loss": loss.detach(), "grad": grad}


def _covkernels():
    try:
        import covkernels as ck

        fn = ck.policy_loss
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"covkernels.policy_loss is not importable yet ({type(e).__name__}: {e})") from e
    return lambda x, method, **kw: fn(x.logits, x.targets, x.old_logp, x.advantages, x.response_mask,
                                      method=method, entropy_coef=ENTROPY_COEF,
                                      ignore_index=C.IGNORE_INDEX, **kw)


def _python_ref(compile_it=False):
    fn = compiled(ref.policy_loss) if compile_it else ref.policy_loss
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
    get_fn = entry_point("verl.trainer.ppo.core_algos", "get_policy_loss_fn", pip="verl")
    agg_loss = entry_point("verl.trainer.ppo.core_algos", "agg_loss")
    logprobs = entry_point("verl.utils.torch_functional", "logprobs_from_logits_v2")
    entropy_fn = entry_point("verl.utils.torch_functional", "entropy_from_logits")

    def fn(x, method, clip_cov_ratio=2e-4, kl_cov_ratio=2e-4):
        safe = torch.where(x.response_mask, x.targets, torch.zeros_like(x.targets))
        logp = logprobs(x.logits, safe)
        ent = entropy_fn(x.logits)
        mask = x.response_mask.to(logp.dtype)
        loss, metrics = get_fn(VERL_NAMES[method])(x.old_logp, logp, x.advantages, mask, "token-mean",
                                                   _verl_config(clip_cov_ratio, kl_cov_ratio))
        # verl's actor: policy loss minus entropy_coeff times the aggregated entropy.
        return loss - ENTROPY_COEF * agg_loss(ent, mask, "token-mean"), metrics
    return fn


class PolicyLoss(Family):
    name, title = "policy_loss", "policy-loss"
    ops = ("policy_loss",)
    in_main_job = False
    printed = (("policy loss", "policy_loss"),)
    conventions = {
        "policy_loss": "policy-loss rows (op policy_loss; case method N x V dtype pad): the loss with "
                       f"entropy_coef = {ENTROPY_COEF} and its gradient to the logits, token-mean; inputs as "
                       "above, old log-probs 0.1 N(0, 1) off the current ones, one N(0, 1) advantage per "
                       "sequence; bytes as fwd_bwd's; errors: loss and gradient on a small instance of the "
                       f"case ({CHECK_N} tokens) with deterministic selections (Clip-Cov ratio 1)"}
    providers = (
        Provider("covkernels", "ours", _covkernels, computes=("loss",)),
        Provider("python_ref", "reference", _python_ref, computes=("loss",), note="eager, input dtype"),
        Provider("compiled_ref", "reference", lambda: _python_ref(compile_it=True), computes=("loss",),
                 note="torch.compile(python_ref)"),
        Provider("verl", "peer", _verl, computes=("loss",),
                 note="logprobs_from_logits_v2 + entropy_from_logits, core_algos' loss"),
    )

    def all_cases(self, mode):
        return [PolicyCase("policy_loss", N, V, dtype, pad, method)
                for N, V, dtype, pad in C.shapes(mode, heavy=True) if pad for method in METHODS]

    def make_inputs(self, case, device, seed):
        return make_policy_inputs(case, device, seed)

    def call(self, case, provider, fn, inputs, grads):
        return loss_and_grad(fn, inputs, case.method)

    def reference(self, case, inputs, grads, device):
        """The float64 and plain references on a small instance of the case; `where` is that instance and
        the options that make its selections deterministic."""
        small = dataclasses.replace(case, N=CHECK_N)
        opts = {"clip_cov_ratio": 1.0} if case.method == "clip_cov" else {}
        x = make_policy_inputs(small, device, seed=5)
        x64 = dataclasses.replace(x, logits=x.logits.detach().double().requires_grad_(),
                                  old_logp=x.old_logp.double(), advantages=x.advantages.double())
        x_plain = dataclasses.replace(x, logits=x.logits.detach().clone().requires_grad_())
        fn = _python_ref()
        truth, plain = (loss_and_grad(fn, y, case.method, **opts) for y in (x64, x_plain))
        return {"truth": truth, "plain": plain}, (x, opts)

    def check_call(self, case, fn, run, where):
        x, opts = where
        return loss_and_grad(fn, x, case.method, **opts)

    def pick(self, case, provider, outputs, where):
        return outputs


FAMILY = PolicyLoss()
