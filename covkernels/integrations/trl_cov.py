"""CovGRPOTrainer: FusedGRPOTrainer plus Clip-Cov, KL-Cov, an entropy-bonus schedule and AEnt on any TRL loss.

Written against TRL 1.16. The loss is TRL's (`GRPOTrainer._compute_loss`, every loss_type and option) with
covkernels' terms composed into it as follows; everything is computed from the same fused pass.
- The tokens covariance control acts on are those TRL trains on: completion (and tool) mask, and TRL's own
  top_entropy_quantile mask and off-policy sequence mask where those are on. N_valid, the centering means
  and the selection are over them (per micro-batch, as verl).
- Score: C = (logp - mean)(A - mean) (centering="batch") or (logp + H) A (centering="state"), per token,
  with token log-probs whatever importance_sampling_level is.
- Clip-Cov: candidates are trained tokens with lb < C < ub whose gradient TRL's loss does not already
  remove (PPO-style loss types: ratio clipped on the side of A's sign, or above delta; with
  importance_sampling_level="sequence" the sequence ratio; cispo, sapo, vespo remove none); of them a
  uniform n = max(1, floor(ratio N_valid)). Their log-probs enter TRL's loss detached: they pass no
  gradient through any of its terms (the policy term, GSPO's sequence ratio, the beta KL, which TRL takes
  from the same log-probs). The loss value keeps their terms.
- KL-Cov: the n highest-C trained tokens; + ppo_kl_coef * |logp - old_logp| on them, normalised as the
  loss_type normalises its per-token loss (and weighted by the vLLM importance ratio as TRL weights its
  loss). TRL's clipping stays (the paper's KL-Cov has none: GRPOConfig(epsilon=1e9) removes it).
- entropy_coef (a number other than 0, or a schedule): TRL's own entropy bonus, its coefficient set from it at
  every step (0: TRL's own coefficient). With GRPOConfig.entropy_coef != 0 or use_adaptive_entropy it is a
  ValueError: one coefficient, two rules.
- AEnt: - aent_coef * mean clamped entropy over the tokens TRL's entropy bonus uses (completion mask and
  top-entropy mask), scaled for gradient accumulation like it; an AEntController is updated once per
  optimizer step from the step's mean over all processes. The clamped entropy needs whole rows of logits:
  with AEnt on, the loss's pass reads the model's logits instead of using the fused LM head.
"""
import math
import numbers
from dataclasses import dataclass

import torch

from .. import AEntController, LossConfig, clip_cov_select, cov_scores, kl_cov_select
from ..losses.config import FIELD_NAMES, active, with_overrides
from .trl_fused import FusedGRPOTrainer

# TRL 1.16's loss types; the first five are PPO-clip on the ratio (luspo too, per sequence).
PPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LOSS_TYPES = (*PPO_LOSS_TYPES, "cispo", "sapo", "vespo")
AENT_FRACTION = 0.3  # the author's default p
# LossConfig fields whose part TRL's own loss plays (GRPOConfig's epsilon, epsilon_high, delta, loss_type,
# temperature): a CovLossConfig keeps them at their defaults. ignore_index and validate have no use here.
TRL_OWNED = ("clip_ratio", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "loss_agg_mode", "temperature")
_DEFAULTS = LossConfig()


@dataclass(frozen=True, init=False)
class CovLossConfig:
    """The covkernels side of CovGRPOTrainer (module docstring for how it composes with TRL's loss): a
    LossConfig, `loss`, and the seed of the Clip-Cov draw.

    CovLossConfig(config) takes a LossConfig; CovLossConfig(method="kl_cov", kl_cov_ratio=2e-3, ...) makes
    one from LossConfig's defaults, except method="clip_cov" and clamp_fraction=0.3 (the author's p, or an
    AEntController's own); fields given by name replace those of a config given. The fields read, each
    also an attribute of the CovLossConfig (config.kl_cov_ratio):
    method: "clip_cov", "kl_cov", or None (a LossConfig's "ppo"): TRL's loss with only the entropy schedule
        and AEnt below.
    centering, clip_cov_ratio, clip_cov_lb, clip_cov_ub, kl_cov_ratio, ppo_kl_coef: as LossConfig.
    entropy_coef: 0 (TRL's own coefficient), or a number or schedule that sets the coefficient of TRL's
        entropy bonus at every step.
    aent_coef: AEnt's lambda: a number, a schedule or an AEntController (0: off); clamp_fraction: its p.
    Schedules are read at the trainer's global step. TRL_OWNED fields keep their defaults.
    seed: of the Clip-Cov draw (default GRPOConfig.seed + process index).
    """

    loss: LossConfig
    seed: int | None

    def __init__(self, config=None, *, seed=None, **overrides):
        if "method" in overrides and overrides["method"] is None:
            overrides["method"] = "ppo"
        if config is None:
            config = LossConfig("clip_cov")
            if "clamp_fraction" not in overrides and not isinstance(overrides.get("aent_coef"), AEntController):
                overrides["clamp_fraction"] = AENT_FRACTION
        loss = with_overrides(config, overrides)
        for name in TRL_OWNED:
            if loss[name] != _DEFAULTS[name]:
                raise ValueError(f"{name} must keep its default {_DEFAULTS[name]!r} in a CovLossConfig, got "
                                 f"{loss[name]!r}: TRL's loss sets it (GRPOConfig's epsilon, epsilon_high, "
                                 "delta, loss_type, temperature)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "seed", seed)

    @property
    def method(self):
        return None if self.loss.method == "ppo" else self.loss.method

    def __getattr__(self, name):
        # Reached only for names that are not CovLossConfig's own: those of its LossConfig's fields.
        if name in FIELD_NAMES:
            return getattr(self.loss, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class CovGRPOTrainer(FusedGRPOTrainer):
    """FusedGRPOTrainer with covkernels' covariance and entropy controls added to TRL's loss.

    Takes FusedGRPOTrainer's arguments and `cov_config` (a CovLossConfig; default Clip-Cov). Logs per
    micro-batch, summed (n_selected) or averaged over processes: covkernels/n_selected, cov_mean, cov_max,
    kl_cov_penalty (KL-Cov), clamped_entropy and aent_coef (AEnt); TRL's own metrics as TRL logs them.

    Example:
        >>> trainer = CovGRPOTrainer(model, reward_funcs=reward, args=GRPOConfig(loss_type="grpo"),
        ...                          train_dataset=data, cov_config=CovLossConfig(method="kl_cov"))
    """

    def __init__(self, *args, cov_config=None, **kwargs):
        if cov_config is None or isinstance(cov_config, LossConfig):
            cov_config = CovLossConfig(cov_config)
        self.cov_config = cov_config
        super().__init__(*args, **kwargs)
        cfg = self.cov_config
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is unknown to CovGRPOTrainer "
                             f"(known: {LOSS_TYPES})")
        if active(cfg.entropy_coef) and (self.args.entropy_coef != 0 or self.use_adaptive_entropy):
            raise ValueError("CovLossConfig.entropy_coef sets the coefficient of TRL's entropy bonus at "
                             "every step; it cannot also follow GRPOConfig.entropy_coef or "
                             "use_adaptive_entropy (one coefficient, two rules: set entropy_coef=0.0, "
                             "use_adaptive_entropy=False)")
        if active(cfg.entropy_coef):
            self._entropy_bonus_enabled = True
        seed = self.args.seed + self.accelerator.process_index if cfg.seed is None else cfg.seed
        self._cov_generator = torch.Generator(device=self.accelerator.device).manual_seed(seed)
        self._cov_inputs = None  # the batch of the loss call in progress
        self._last_spec = None  # the PassSpec of the latest pass (AEnt's clamped entropies)
        self._cov_terms = None  # (extra loss, metrics) of that call
        self._aent_window = None  # [sum of clamped entropy, tokens] over the accumulation window

    def _pass_spec(self, logits_to_keep):
        spec = super()._pass_spec(logits_to_keep)
        if self._cov_inputs is not None and active(self.cov_config.aent_coef):
            spec.clamp_fraction = self.cov_config.clamp_fraction
        self._last_spec = spec
        return spec

    def _compute_loss(self, model, inputs):
        """TRL's loss on the log-probs the pass returns (Clip-Cov: detached at the selected tokens), plus the
        KL-Cov penalty and the AEnt term."""
        if active(self.cov_config.entropy_coef):
            self.entropy_coef = self.cov_config.loss.at(self.state.global_step).entropy_coef
        self._cov_inputs = inputs
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._cov_inputs = None
        extra, metrics = self._cov_terms
        self._cov_terms = None
        self._log_cov_metrics(metrics)
        return loss + extra

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args,
                                           **kwargs):
        logp, entropy, aux_loss = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        if self._cov_inputs is None:
            return logp, entropy, aux_loss
        clamped = torch.cat(self._last_spec.clamped) if self._last_spec.clamped else None
        return self._apply_cov(logp, entropy, clamped), entropy, aux_loss

    def _apply_cov(self, logp, entropy, clamped):
        """Selects the tokens and stores the extra terms in self._cov_terms; returns the log-probs for TRL's
        loss."""
        cfg, inputs = self.cov_config.loss.at(self.state.global_step), self._cov_inputs
        mask = inputs["completion_mask"]
        mask = mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]
        adv = inputs["advantages"]
        adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand_as(logp)
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old
        entropy_mask = (self.get_high_entropy_mask(entropy, mask, 1 - self.top_entropy_quantile)
                        if self.top_entropy_quantile < 1.0 else mask.bool())
        trained = mask.bool() & entropy_mask
        if self.off_policy_mask_threshold is not None:
            keep = self.get_off_policy_mask(adv, logp, inputs.get("sampling_per_token_logps", old), mask,
                                            self.off_policy_mask_threshold)
            trained = trained & keep.bool()
        extra = torch.zeros((), dtype=logp.dtype, device=logp.device)
        metrics = {}
        if cfg.method != "ppo":
            scores = cov_scores(logp, adv, trained, centering=cfg.centering, entropy=entropy)
            if cfg.method == "clip_cov":
                selected = clip_cov_select(scores, trained, ratio=cfg.clip_cov_ratio,
                                           lb=cfg.clip_cov_lb, ub=cfg.clip_cov_ub,
                                           clipped=self._gradient_free(logp, old, adv, mask),
                                           generator=self._cov_generator)
                logp = torch.where(selected, logp.detach(), logp)
            else:
                selected = kl_cov_select(scores, trained, ratio=cfg.kl_cov_ratio)
                penalty = torch.where(selected, cfg.ppo_kl_coef * (logp - old).abs(), 0.0)
                if self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo":
                    penalty = penalty * inputs["importance_sampling_ratio"]
                metrics["kl_cov_penalty"] = self._aggregate(penalty, mask, inputs)
                extra = extra + metrics["kl_cov_penalty"]
            metrics["n_selected"] = selected.sum().float()
            metrics["cov_mean"] = (scores.sum() / trained.sum().clamp(min=1)).float()
            top = torch.where(trained, scores, -math.inf).amax()
            metrics["cov_max"] = torch.where(trained.any(), top, 0.0)
        if clamped is not None:
            metrics.update(self._aent_term(clamped, mask.bool() & entropy_mask))
            extra = extra - metrics["aent_coef"] * metrics["aent_loss"]
        self._cov_terms = (extra, metrics)
        return logp

    def _gradient_free(self, logp, old, adv, mask):
        """The tokens TRL's loss already gives no gradient (bool [B, K]), or None (cispo, sapo, vespo)."""
        if self.loss_type not in PPO_LOSS_TYPES:
            return None
        log_ratio = logp.detach() - old
        if self.importance_sampling_level == "sequence":
            log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        ratio = log_ratio.exp().expand_as(logp)
        # -min(min(r, delta) A, clip(r) A) is constant in r: for A > 0 above min(delta, 1 + eps_high), for
        # A < 0 below 1 - eps_low or above max(delta, 1 + eps_high).
        delta = math.inf if self.args.delta is None else self.args.delta
        high, low = 1 + self.epsilon_high, 1 - self.epsilon_low
        negative_free = (ratio < low) | (ratio > max(delta, high))
        return ((adv > 0) & (ratio > min(delta, high))) | ((adv < 0) & negative_free)

    def _aggregate(self, x, mask, inputs):
        """x [B, K] summed over the masked tokens and normalised as TRL normalises loss_type's per-token loss,
        gradient accumulation included."""
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        x = x * mask
        if self.loss_type in ("grpo", "sapo"):
            return (x.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return x.sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return x.sum() / (x.size(0) * self.max_completion_length) / accumulation
        if self.loss_type == "luspo":
            return x.sum(-1).mean() / accumulation
        # cispo, dapo, vespo: num_items_in_batch counts the generation batch; TRL rescales it to one window.
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * accumulation / self.args.steps_per_generation
        return x.sum() / normalizer

    def _aent_term(self, clamped, effective):
        """AEnt's metrics: aent_loss (the mean clamped entropy over `effective`, scaled for accumulation),
        clamped_entropy (its value) and aent_coef; updates an AEntController at optimizer-step boundaries."""
        controller, mode = self.cov_config.aent_coef, "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        total, count = (clamped * effective).sum(), effective.sum().float()
        coef = self.cov_config.loss.at(self.state.global_step).aent_coef
        if isinstance(controller, AEntController) and mode == "train":
            stats = torch.stack([total.detach(), count])
            self._aent_window = stats if self._aent_window is None else self._aent_window + stats
            if self.accelerator.sync_gradients:
                window = self.accelerator.reduce(self._aent_window, reduction="sum")
                controller.update(window[0] / window[1].clamp(min=1.0))
                self._aent_window = None
        mean = total / count.clamp(min=1.0)
        return {"aent_loss": mean / accumulation, "clamped_entropy": mean.detach(),
                "aent_coef": torch.tensor(coef, device=clamped.device)}

    def _log_cov_metrics(self, metrics):
        """One reduction and one host sync per call: n_selected summed over processes, the rest averaged."""
        if not metrics:
            return
        mode = "train" if self.model.training else "eval"
        names = sorted(name for name in metrics if name != "aent_loss")
        values = self.accelerator.reduce(torch.stack([metrics[n].detach().float() for n in names]),
                                         reduction="sum").tolist()
        for name, value in zip(names, values):
            scale = 1 if name == "n_selected" else self.accelerator.num_processes
            self._metrics[mode][f"covkernels/{name}"].append(value / scale)
