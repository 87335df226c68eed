"""Reference of AEnt's coefficient controller (docs/aent.md#the-coefficient-controller), written as one loop
over a logged run."""


def aent_coef_trajectory(entropies, *, coef=2e-4, entropy_low=0.05, entropy_high=0.23, lr=1e-3, coef_min=1e-5,
                         coef_max=3e-3, warmup=29):
    """The coefficient after each step, given each step's mean clamped entropy. The first `warmup` steps
    leave it unchanged; then lambda <- clip(lambda - lr [min(0, H - low) + max(0, H - high)], min, max)."""
    out = []
    for step, h in enumerate(entropies):
        if step >= warmup:
            coef -= lr * (min(0.0, h - entropy_low) + max(0.0, h - entropy_high))
            coef = min(max(coef, coef_min), coef_max)
        out.append(coef)
    return out
