"""TRL: GRPOTrainer with covkernels' fused log-prob/entropy pass and its PPO-clip, Clip-Cov or KL-Cov loss.

Written against TRL 1.16. `CovGRPOTrainer` overrides two methods of `trl.GRPOTrainer`:
- `_get_per_token_logps_and_entropies`, which TRL calls for the loss and for the old and reference
  log-probs: the model's logits at the completion positions, then `covkernels.logprobs_and_entropy` (one
  read of the logits gives both; one fused backward).
- `_compute_loss`: `covkernels.token_loss` on those log-probs, normalised as TRL's `loss_type`, plus TRL's
  reference KL (`beta`) and vLLM importance weights; metrics under "covkernels/..." in TRL's logs.
PPO clip ranges (`epsilon`, `epsilon_high`), `temperature`, `beta` and `loss_type` stay in `GRPOConfig`; the
covkernels side is a `CovLossConfig`. Importing this module imports TRL; `import covkernels` never does.

    >>> from covkernels.integrations.trl import CovGRPOTrainer, CovLossConfig
    >>> trainer = CovGRPOTrainer(model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=dataset,
    ...                          cov_config=CovLossConfig(method="kl_cov", kl_cov_ratio=2e-3))
    >>> trainer.train()
"""
from dataclasses import dataclass
from typing import Any

import torch
from trl import GRPOTrainer

from .. import PolicyLoss, agg_loss, logprobs_and_entropy, schedules, token_loss

IGNORE_INDEX = -100
# TRL's loss types whose per-token loss is PPO-clip; the others (cispo, sapo, luspo, vespo) are other losses.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCHEDULED = ("clip_cov_ratio", "kl_cov_ratio", "ppo_kl_coef", "entropy_coef")
# Extra model inputs TRL 1.16 passes for vision-language models; with any of them TRL's own path runs.
MODEL_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class CovLossConfig:
    """The covkernels side of CovGRPOTrainer's loss (see `covkernels.token_loss` for the formulas).

    method: "ppo" (PPO-clip), "clip_cov" (drop the gradient of a random few high-covariance tokens) or
        "kl_cov" (|logp - old_logp| penalty on the top covariance tokens; no PPO clipping).
    centering: "batch" (verl-compatible, means over the micro-batch) or "state" (per state, (logp + H) A).
    clip_cov_ratio, clip_cov_lb, clip_cov_ub: Clip-Cov's fraction of valid tokens and score window.
    kl_cov_ratio, ppo_kl_coef: KL-Cov's fraction of valid tokens and coefficient.
    clip_ratio_c: verl's dual clip for method="ppo" (None, the default: off, as TRL).
    entropy_coef: loss -= entropy_coef * agg(H), aggregated like the policy loss (TRL's own entropy bonus
        must stay off). The ratios and coefficients may be schedules from `covkernels.schedules`, read at
        the trainer's global step.
    fused_pass: False keeps TRL's log-prob/entropy path (its chunked LM head, which never holds the
        logits) and takes only the loss from covkernels.
    validate: covkernels' input checks (targets in range, finite old log-probs; host syncs).
    seed: seed of the Clip-Cov selection (None: GRPOConfig.seed + process index).
    """

    method: str = "clip_cov"
    centering: str = "batch"
    clip_cov_ratio: Any = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: Any = 2e-4
    ppo_kl_coef: Any = 1.0
    clip_ratio_c: float | None = None
    entropy_coef: Any = 0.0
    fused_pass: bool = True
    validate: bool = False
    seed: int | None = None

    def coefficients(self, step):
        """The scheduled ratios and coefficients as floats at `step`."""
        return {name: schedules.resolve(getattr(self, name), step) for name in SCHEDULED}

    def __post_init__(self):
        # PolicyLoss checks the same hyperparameters (schedules at step 0) and names the one at fault.
        PolicyLoss(self.method, centering=self.centering, clip_cov_ratio=self.clip_cov_ratio,
                   clip_cov_lb=self.clip_cov_lb, clip_cov_ub=self.clip_cov_ub, clip_ratio_c=self.clip_ratio_c,
                   kl_cov_ratio=self.kl_cov_ratio, ppo_kl_coef=self.ppo_kl_coef,
                   entropy_coef=self.entropy_coef)


class CovGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose log-probs, entropy and policy loss come from covkernels.

    Takes GRPOTrainer's arguments and `cov_config` (a CovLossConfig; default Clip-Cov). Logs, per
    micro-batch (averaged over processes): covkernels/entropy (token mean, TRL's "entropy" metric too),
    covkernels/policy_loss, ppo_kl, pg_clipfrac (Clip-Cov, KL-Cov: the fraction selected), cov_mean,
    cov_max, n_selected, pg_clipfrac_lower (method "ppo") and kl (beta != 0).
    """

    def __init__(self, *args, cov_config=None, **kwargs):
        self.cov_config = CovLossConfig() if cov_config is None else cov_config
        super().__init__(*args, **kwargs)
        unsupported = {
            f"loss_type={self.loss_type!r} (supported: {LOSS_TYPES})": self.loss_type not in LOSS_TYPES,
            "importance_sampling_level='sequence'": self.importance_sampling_level != "token",
            "delta (two-sided clipping)": self.args.delta is not None,
            "top_entropy_quantile < 1": self.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
            "entropy_coef, use_adaptive_entropy (see CovLossConfig)": self._entropy_bonus_enabled,
            "router_aux_loss_coef != 0 (MoE auxiliary loss)": self.aux_loss_enabled,
        }
        bad = [name for name, flag in unsupported.items() if flag]
        if bad:
            raise ValueError(f"CovGRPOTrainer does not support these GRPOConfig settings: {bad}")
        seed = self.cov_config.seed
        seed = self.args.seed + self.accelerator.process_index if seed is None else seed
        self._cov_generator = torch.Generator(device=self.accelerator.device).manual_seed(seed)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **model_inputs):
        """(log-probs [B, logits_to_keep], entropies or None, None) of the completion tokens, from the fused
        pass over the model's logits; positions outside attention_mask give 0."""
        multimodal = any(v is not None for v in model_inputs.values())
        if not self.cov_config.fused_pass or compute_aux_loss or multimodal:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **model_inputs)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for ids, mask in zip(input_ids.split(batch_size), attention_mask.split(batch_size)):
            with self.accelerator.autocast():
                # Logits at positions -K-1 .. -2 predict the K completion tokens.
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=logits_to_keep + 1,
                               use_cache=False).logits[:, :-1]
            # Padding is ignored: its logits are never read and it gets no gradient.
            targets = ids[:, -logits_to_keep:].masked_fill(mask[:, -logits_to_keep:] == 0, IGNORE_INDEX)
            logp, entropy = logprobs_and_entropy(logits, targets, temperature=self.temperature,
                                                 ignore_index=IGNORE_INDEX, validate=self.cov_config.validate)
            logps.append(logp)
            entropies.append(entropy)
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _aggregation(self, inputs, mask, mode):
        """(aggregation arguments of token_loss, gradient-accumulation divisor) that give TRL's normalisation
        of its loss_type: grpo = per-sequence token mean over all B sequences; bnpo = token mean;
        dr_grpo = token sum / (B * max_completion_length); dapo = token sum / the tokens of the accumulated
        batch per process."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        if self.loss_type == "grpo":
            return {"loss_agg_mode": "seq-mean-token-mean", "num_seqs": mask.size(0)}, accumulation
        if self.loss_type == "bnpo":
            return {"loss_agg_mode": "token-mean"}, accumulation
        if self.loss_type == "dr_grpo":
            tokens = mask.size(0) * self.max_completion_length
            return {"loss_agg_mode": "token-mean", "num_tokens": tokens}, accumulation
        # dapo: num_items_in_batch counts the generation batch; TRL rescales it to one accumulation window.
        tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            tokens = tokens * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return {"loss_agg_mode": "token-mean", "num_tokens": tokens}, 1

    def _compute_loss(self, model, inputs):
        cfg = self.cov_config
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logp, entropy, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            **{name: inputs.get(name) for name in MODEL_INPUTS})

        advantages = inputs["advantages"]
        advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand_as(logp)
        old_logp = inputs.get("old_per_token_logps")
        # On-policy (num_iterations = 1) TRL skips the old log-probs: the ratio is 1 (KL-Cov adds nothing).
        old_logp = logp.detach() if old_logp is None else old_logp
        weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights = inputs["importance_sampling_ratio"].expand_as(logp)
        mode = "train" if self.model.training else "eval"
        agg, accumulation = self._aggregation(inputs, mask, mode)
        loss, metrics = token_loss(
            logp, old_logp, advantages, mask, entropy=entropy, method=cfg.method,
            clip_ratio_low=self.epsilon_low, clip_ratio_high=self.epsilon_high, clip_cov_lb=cfg.clip_cov_lb,
            clip_cov_ub=cfg.clip_cov_ub, clip_ratio_c=cfg.clip_ratio_c, centering=cfg.centering,
            rollout_is_weights=weights, generator=self._cov_generator, validate=cfg.validate,
            **cfg.coefficients(self.state.global_step), **agg)
        metrics["policy_loss"] = loss.detach()
        if self.beta != 0.0:
            # TRL's k3 estimate of KL(pi || pi_ref), optionally importance-corrected, in the same aggregation.
            delta = inputs["ref_per_token_logps"] - logp
            kl = torch.exp(delta) - delta - 1
            if self.args.use_bias_correction_kl:
                kl = kl * torch.exp(logp - old_logp)
            loss = loss + self.beta * agg_loss(kl, mask, **agg)
            metrics["kl"] = agg_loss(kl.detach(), mask, "token-mean")
        self._log_cov_metrics(mode, metrics, entropy, mask)
        return loss / accumulation

    def _log_cov_metrics(self, mode, metrics, entropy, mask):
        """Appends the metrics to TRL's log with one reduction and one host sync; entropy is the token
        mean over every process (TRL's definition of its "entropy" metric), the rest process means."""
        names = sorted(name for name in metrics if name != "entropy")
        valid = mask != 0
        entropy_sum = torch.where(valid, entropy.detach(), 0.0).sum()
        local = torch.stack([*(metrics[name].float() for name in names), entropy_sum.float(),
                             valid.sum().float()])
        values = self.accelerator.reduce(local, reduction="sum").tolist()
        for name, value in zip(names, values):
            self._metrics[mode][f"covkernels/{name}"].append(value / self.accelerator.num_processes)
        mean_entropy = values[-2] / max(values[-1], 1.0)
        self._metrics[mode]["covkernels/entropy"].append(mean_entropy)
        self._metrics[mode]["entropy"].append(mean_entropy)
