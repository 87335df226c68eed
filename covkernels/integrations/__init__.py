"""Drop-in integrations with RL trainers. Each submodule imports its trainer; this package imports none.

covkernels.integrations.trl   CovGRPOTrainer: TRL's GRPOTrainer with the fused pass and PPO/Clip-Cov/KL-Cov.
covkernels.integrations.verl  "ck_ppo", "ck_clip_cov", "ck_kl_cov" in verl's policy-loss registry, and verl's
                              logprobs_from_logits / entropy_from_logits computed by the fused pass.
"""
