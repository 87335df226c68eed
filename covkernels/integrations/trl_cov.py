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
- entropy_coef (a schedule): TRL's own entropy bonus, its coefficient set from the schedule at every step.
  With GRPOConfig.entropy_coef != 0 or use_adaptive_entropy it is a ValueError: one coefficient, two rules.
- AEnt: - aent_coef * mean clamped entropy over the tokens TRL's entropy bonus uses (completion mask and
  top-entropy mask), scaled for gradient accumulation like it; an AEntController is updated once per
  optimizer step from the step's mean over all processes. The clamped entropy needs whole rows of logits:
  with AEnt on, the loss's pass reads the model's logits instead of using the fused LM head.
"""
import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import AEntController, PolicyLoss, clip_cov_select, cov_scores, kl_cov_select, schedules
from .._validation import check_choice, check_fraction, check_nonnegative
from .trl_fused import FusedGRPOTrainer

METHODS = (None, "clip_cov", "kl_cov")
# TRL 1.16's loss types; the first five are PPO-clip on the ratio (luspo too, per sequence).
PPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LOSS_TYPES = (*PPO_LOSS_TYPES, "cispo", "sapo", "vespo")
AENT_FRACTION = 0.3  # the author's default p


@dataclass
class CovLossConfig:
    """The covkernels side of CovGRPOTrainer (module docstring for how it composes with TRL's loss).

    method: "clip_cov", "kl_cov" or None (TRL's loss with only the entropy schedule and AEnt below).
    centering: "batch" (verl) or "state" ((logp + H) A, Baehr & Lei).
    clip_cov_ratio, clip_cov_lb, clip_cov_ub: Clip-Cov's fraction of trained tokens and score window.
    kl_cov_ratio, ppo_kl_coef: KL-Cov's fraction of trained tokens and coefficient.
    entropy_coef: None, or a number or schedule (covkernels.schedules) for TRL's entropy bonus coefficient.
    aent_coef: AEnt's lambda: a number, a schedule or an AEntController (0: off).
    clamp_fraction: AEnt's p (default: the controller's, else 0.3).
    seed: of the Clip-Cov draw (default GRPOConfig.seed + process index).
    Ratios and coefficients may be schedules, read at the trainer's global step.
    """

    method: str | None = "clip_cov"
    centering: str = "batch"
    clip_cov_ratio: Any = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: Any = 2e-4
    ppo_kl_coef: Any = 1.0
    entropy_coef: Any = None
    aent_coef: Any = 0.0
    clamp_fraction: float | None = None
    seed: int | None = None

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        if self.clamp_fraction is None:
            controller = isinstance(self.aent_coef, AEntController)
            self.clamp_fraction = self.aent_coef.clamp_fraction if controller else AENT_FRACTION
        check_fraction("clamp_fraction", self.clamp_fraction)
        if not (isinstance(self.aent_coef, AEntController) or callable(self.aent_coef)):
            check_nonnegative("aent_coef", self.aent_coef)
        # PolicyLoss checks the same hyperparameters (schedules at step 0) and names the one at fault.
        PolicyLoss(self.method or "ppo", centering=self.centering, clip_cov_ratio=self.clip_cov_ratio,
                   clip_cov_lb=self.clip_cov_lb, clip_cov_ub=self.clip_cov_ub, kl_cov_ratio=self.kl_cov_ratio,
                   ppo_kl_coef=self.ppo_kl_coef, aent_coef=self.aent_coef, clamp_fraction=self.clamp_fraction,
                   entropy_coef=0.0 if self.entropy_coef is None else self.entropy_coef)

    @property
    def aent(self):
        return isinstance(self.aent_coef, AEntController) or callable(self.aent_coef) or self.aent_coef != 0

    def at(self, name, step):
        """A coefficient at `step` (an AEntController: its current coefficient)."""
        value = getattr(self, name)
        return value.coef if isinstance(value, AEntController) else schedules.resolve(value, step)


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
        self.cov_config = CovLossConfig() if cov_config is None else cov_config
        super().__init__(*args, **kwargs)
        cfg = self.cov_config
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is unknown to CovGRPOTrainer "
                             f"(known: {LOSS_TYPES})")
        if cfg.entropy_coef is not None and (self.args.entropy_coef != 0 or self.use_adaptive_entropy):
            raise ValueError("CovLossConfig.entropy_coef sets the coefficient of TRL's entropy bonus at "
                             "every step; it cannot also follow GRPOConfig.entropy_coef or "
                             "use_adaptive_entropy (one coefficient, two rules: set entropy_coef=0.0, "
                             "use_adaptive_entropy=False)")
        if cfg.entropy_coef is not None:
            self._entropy_bonus_enabled = True
        seed = self.args.seed + self.accelerator.process_index if cfg.seed is None else cfg.seed
        self._cov_generator = torch.Generator(device=self.accelerator.device).manual_seed(seed)
        self._cov_inputs = None  # the batch of the loss call in progress
        self._last_spec = None  # the PassSpec of the latest pass (AEnt's clamped entropies)
        self._cov_terms = None  # (extra loss, metrics) of that call
        self._aent_window = None  # [sum of clamped entropy, tokens] over the accumulation window

    def _pass_spec(self, logits_to_keep):
        spec = super()._pass_spec(logits_to_keep)
        if self._cov_inputs is not None and self.cov_config.aent:
            spec.clamp_fraction = self.cov_config.clamp_fraction
        self._last_spec = spec
        return spec

    def _compute_loss(self, model, inputs):
        """TRL's loss on the log-probs the pass returns (Clip-Cov: detached at the selected tokens), plus the
        KL-Cov penalty and the AEnt term."""
        if self.cov_config.entropy_coef is not None:
            self.entropy_coef = schedules.resolve(self.cov_config.entropy_coef, self.state.global_step)
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
        cfg, inputs, step = self.cov_config, self._cov_inputs, self.state.global_step
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
        if cfg.method is not None:
            scores = cov_scores(logp, adv, trained, centering=cfg.centering, entropy=entropy)
            if cfg.method == "clip_cov":
                selected = clip_cov_select(scores, trained, ratio=cfg.at("clip_cov_ratio", step),
                                           lb=cfg.clip_cov_lb, ub=cfg.clip_cov_ub,
                                           clipped=self._gradient_free(logp, old, adv, mask),
                                           generator=self._cov_generator)
                logp = torch.where(selected, logp.detach(), logp)
            else:
                selected = kl_cov_select(scores, trained, ratio=cfg.at("kl_cov_ratio", step))
                penalty = torch.where(selected, cfg.at("ppo_kl_coef", step) * (logp - old).abs(), 0.0)
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
        cfg, mode = self.cov_config, "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        total, count = (clamped * effective).sum(), effective.sum().float()
        coef = cfg.at("aent_coef", self.state.global_step)
        if isinstance(cfg.aent_coef, AEntController) and mode == "train":
            stats = torch.stack([total.detach(), count])
            self._aent_window = stats if self._aent_window is None else self._aent_window + stats
            if self.accelerator.sync_gradients:
                window = self.accelerator.reduce(self._aent_window, reduction="sum")
                cfg.aent_coef.update(window[0] / window[1].clamp(min=1.0))
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
