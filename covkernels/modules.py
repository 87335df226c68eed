"""nn.Module front-ends holding the hyperparameters of the losses."""
from torch import nn

from . import schedules
from .aent import AEntController
from .losses import _check_hyper, policy_loss

# Coefficients that may be a number or a schedule from covkernels.schedules, read at forward's `step`;
# aent_coef may also be an AEntController, read as its current coefficient.
SCHEDULED = ("entropy_coef", "ppo_kl_coef", "clip_cov_ratio", "kl_cov_ratio", "aent_coef")


class PolicyLoss(nn.Module):
    """`policy_loss` with its hyperparameters held; see `covkernels.policy_loss` for their meaning.

    entropy_coef, ppo_kl_coef, clip_cov_ratio and kl_cov_ratio may be floats or schedules
    (`covkernels.schedules.linear(1e-3, 0.0, steps=500)`, ...), evaluated at the `step` given to forward:
    annealing a coefficient to 0 is what makes entropy and covariance control asymptotically unbiased.
    aent_coef may also be an AEntController (its clamp_fraction is used unless one is given); call its
    update(metrics["clamped_entropy"]) once per optimizer step.

    Example:
        >>> loss_fn = PolicyLoss("kl_cov", ppo_kl_coef=schedules.cosine(1.0, 0.0, steps=1000))
        >>> loss, metrics = loss_fn(logits, targets, old_logp, advantages, mask, step=global_step)
    """

    def __init__(self, method="ppo", *, clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None,
                 clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0, clip_ratio_c=3.0, kl_cov_ratio=2e-4,
                 ppo_kl_coef=1.0, centering="batch", entropy_coef=0.0, loss_agg_mode="token-mean",
                 aent_coef=0.0, clamp_fraction=None, temperature=1.0, ignore_index=-100, validate=True):
        super().__init__()
        if isinstance(aent_coef, AEntController) and clamp_fraction is None:
            clamp_fraction = aent_coef.clamp_fraction
        self.config = dict(method=method, clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low,
                           clip_ratio_high=clip_ratio_high, clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb,
                           clip_cov_ub=clip_cov_ub, clip_ratio_c=clip_ratio_c, kl_cov_ratio=kl_cov_ratio,
                           ppo_kl_coef=ppo_kl_coef, centering=centering, entropy_coef=entropy_coef,
                           loss_agg_mode=loss_agg_mode, aent_coef=aent_coef, clamp_fraction=clamp_fraction,
                           temperature=temperature, ignore_index=ignore_index, validate=validate)
        _check_hyper({**self.config, **self.coefficients(0)})

    def coefficients(self, step):
        """The scheduled coefficients as floats at `step`."""
        return {name: self.config[name].coef if isinstance(self.config[name], AEntController)
                else schedules.resolve(self.config[name], step) for name in SCHEDULED}

    def forward(self, logits, targets, old_logp, advantages, response_mask, *, step=0, generator=None,
                rollout_is_weights=None, num_tokens=None, num_seqs=None, process_group=None, selection=None):
        """logits [B, T, V] or an LMHead (hidden [B, T, D], weight, bias); the rest [B, T]. Returns
        (loss, metrics) as `policy_loss` (see it for process_group and selection)."""
        kwargs = {**self.config, **self.coefficients(step)}
        return policy_loss(logits, targets, old_logp, advantages, response_mask, generator=generator,
                           rollout_is_weights=rollout_is_weights, num_tokens=num_tokens, num_seqs=num_seqs,
                           process_group=process_group, selection=selection, **kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())
