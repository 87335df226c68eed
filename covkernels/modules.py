"""nn.Module front-end holding the LossConfig of a policy loss."""
from torch import nn

from .losses import SCHEDULED, LossConfig, policy_loss
from .losses.config import with_overrides


class PolicyLoss(nn.Module):
    """`policy_loss` with its LossConfig held (`self.config`); see `covkernels.LossConfig` for the fields.

    PolicyLoss(config) holds a LossConfig; PolicyLoss("kl_cov", kl_cov_ratio=...) builds one (a method
    name, then fields by name), and fields given by name replace those of a config given. Scheduled
    fields (entropy_coef, ppo_kl_coef, clip_cov_ratio, kl_cov_ratio, aent_coef) may be schedules
    (`covkernels.schedules.linear(1e-3, 0.0, steps=500)`, ...), read at the `step` given to forward:
    annealing a coefficient to 0 is what makes entropy and covariance control asymptotically unbiased.
    aent_coef may also be an AEntController (its clamp_fraction is used unless one is given); call its
    update(metrics["clamped_entropy"]) once per optimizer step.

    Example:
        >>> loss_fn = PolicyLoss("kl_cov", ppo_kl_coef=schedules.cosine(1.0, 0.0, steps=1000))
        >>> loss, metrics = loss_fn(logits, targets, old_logp, advantages, mask, step=global_step)
    """

    def __init__(self, config=None, **overrides):
        super().__init__()
        self.config = with_overrides(LossConfig(config) if isinstance(config, str) else config, overrides)

    def coefficients(self, step):
        """The scheduled fields as numbers at `step`."""
        config = self.config.at(step)
        return {name: config[name] for name in SCHEDULED}

    def forward(self, logits, targets, old_logp, advantages, response_mask, *, step=0, generator=None,
                rollout_is_weights=None, num_tokens=None, num_seqs=None, process_group=None, selection=None):
        """logits [B, T, V] or an LMHead (hidden [B, T, D], weight, bias); the rest [B, T]. Returns
        (loss, metrics) as `policy_loss` with `self.config.at(step)` (see it for process_group and
        selection)."""
        return policy_loss(logits, targets, old_logp, advantages, response_mask, self.config.at(step),
                           generator=generator, rollout_is_weights=rollout_is_weights, num_tokens=num_tokens,
                           num_seqs=num_seqs, process_group=process_group, selection=selection)

    def extra_repr(self):
        return repr(self.config)
