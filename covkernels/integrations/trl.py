"""TRL (1.16): GRPOTrainer with covkernels' fused pass, and covkernels' covariance and entropy controls.

    FusedGRPOTrainer  TRL's GRPOTrainer, its per-token log-probs and entropies from covkernels' fused pass
                      (the fused LM head where the model's head allows it); TRL's loss for every GRPOConfig
                      setting (covkernels.integrations.trl_fused).
    CovGRPOTrainer    FusedGRPOTrainer + Clip-Cov, KL-Cov, per-state centering, an entropy-bonus schedule and
                      AEnt composed with whichever TRL loss type and options are chosen, configured by a
                      CovLossConfig (covkernels.integrations.trl_cov, which documents the composition).

Importing this module imports TRL; `import covkernels` never does.

    >>> from covkernels.integrations.trl import CovGRPOTrainer, CovLossConfig
    >>> trainer = CovGRPOTrainer(model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=dataset,
    ...                          cov_config=CovLossConfig(method="kl_cov", kl_cov_ratio=2e-3))
"""
from .trl_cov import CovGRPOTrainer, CovLossConfig
from .trl_fused import FusedGRPOTrainer, add_fused_pass

__all__ = ["CovGRPOTrainer", "CovLossConfig", "FusedGRPOTrainer", "add_fused_pass"]
