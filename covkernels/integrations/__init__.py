"""Drop-in integrations with RL trainers. Each submodule imports its trainer; this package imports none.

covkernels.integrations.trl   FusedGRPOTrainer (TRL's GRPOTrainer, its per-token log-probs and entropies from
                              covkernels) and CovGRPOTrainer (+ Clip-Cov, KL-Cov, AEnt on TRL's loss).
covkernels.integrations.verl  the "ck_*" losses in verl's policy-loss registry, and (verl_engine) verl's actor
                              engine with covkernels as its fused-kernel backend.
"""
