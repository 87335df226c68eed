"""AEnt's adaptive coefficient (Shen 2025, arXiv 2509.03493; docs/aent.md#the-coefficient-controller)."""
import math

from ._validation import check_fraction, check_nonnegative, check_positive


class AEntController:
    """Keeps the mean clamped entropy in [entropy_low, entropy_high] by steering the bonus coefficient lambda.

    Once per optimizer step, `update(mean_clamped_entropy)`; after the first `warmup` calls each one applies
    lambda <- clip(lambda - lr * [min(0, H - entropy_low) + max(0, H - entropy_high)], coef_min, coef_max):
    below the band lambda grows, above it lambda shrinks. Defaults are the author's. `coef` is the lambda to
    pass as `policy_loss(..., aent_coef=controller.coef, clamp_fraction=controller.clamp_fraction)`;
    state_dict / load_state_dict let a checkpoint resume it.

    Example:
        >>> ctl = AEntController()
        >>> loss, metrics = policy_loss(..., aent_coef=ctl.coef, clamp_fraction=ctl.clamp_fraction)
        >>> ctl.update(metrics["clamped_entropy"])   # one host sync per step
    """

    def __init__(self, coef=2e-4, *, clamp_fraction=0.3, entropy_low=0.05, entropy_high=0.23, lr=1e-3,
                 coef_min=1e-5, coef_max=3e-3, warmup=29):
        check_fraction("clamp_fraction", clamp_fraction)
        check_positive("lr", lr)
        check_nonnegative("coef_min", coef_min)
        check_nonnegative("warmup", warmup)
        if not entropy_low <= entropy_high:
            raise ValueError(f"entropy_low must be <= entropy_high, got {entropy_low} > {entropy_high}")
        if not coef_min <= coef <= coef_max:
            raise ValueError(f"coef must be in [coef_min, coef_max] = [{coef_min}, {coef_max}], got {coef}")
        self.coef = float(coef)
        self.clamp_fraction = clamp_fraction
        self.entropy_low, self.entropy_high = entropy_low, entropy_high
        self.lr, self.coef_min, self.coef_max, self.warmup = lr, coef_min, coef_max, int(warmup)
        self.steps = 0

    def update(self, mean_clamped_entropy):
        """One controller step from the step's mean clamped entropy (float or 0-dim tensor); returns coef."""
        h = float(mean_clamped_entropy)
        if not math.isfinite(h):
            raise ValueError(f"mean_clamped_entropy must be finite, got {h}")
        self.steps += 1
        if self.steps > self.warmup:
            push = min(0.0, h - self.entropy_low) + max(0.0, h - self.entropy_high)
            self.coef = min(max(self.coef - self.lr * push, self.coef_min), self.coef_max)
        return self.coef

    def state_dict(self):
        return {"coef": self.coef, "steps": self.steps}

    def load_state_dict(self, state):
        self.coef, self.steps = float(state["coef"]), int(state["steps"])
