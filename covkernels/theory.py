"""Closed forms from the entropy-mechanism papers, to check training runs against.

fit_entropy_law: Cui et al.'s empirical law between policy entropy H and reward R over training,
    R = -a exp(H) + b, fitted by least squares with standard errors.
entropy_regularized_policy: softmax(r / alpha), the maximiser of E_pi[r] + alpha H(pi) in a bandit
    state, i.e. the stationary policy of a constant entropy bonus (docs/losses.md#entropy-bonus).

    >>> law = fit_entropy_law(entropy=[2.0, 1.5, 1.0, 0.5], reward=[0.1, 0.5, 0.7, 0.8])
    >>> law.ceiling          # predicted reward at H = 0, b - a
"""
import math
import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EntropyLaw:
    """R = -a exp(H) + b fitted to n points; *_se are standard errors, cov_ab the covariance of (a, b).

    The standard errors assume independent residuals of equal variance. Successive points of one
    training curve are correlated, so on a logged curve they understate the real uncertainty.
    """

    a: float
    b: float
    a_se: float
    b_se: float
    cov_ab: float
    r2: float
    n: int

    def predict(self, entropy):
        """-a exp(H) + b for a number (returns a float) or a tensor / sequence (returns float64 tensor)."""
        if isinstance(entropy, numbers.Real):
            return -self.a * math.exp(entropy) + self.b
        return -self.a * torch.as_tensor(entropy, dtype=torch.float64).exp() + self.b

    @property
    def ceiling(self):
        """The reward the law predicts at zero entropy, b - a (Cui et al.'s performance ceiling)."""
        return self.b - self.a

    @property
    def ceiling_se(self):
        """Standard error of b - a."""
        return math.sqrt(max(self.a_se ** 2 + self.b_se ** 2 - 2 * self.cov_ab, 0.0))


def _as_vector(name, x):
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be a sequence or tensor of numbers, got {type(x).__name__}")
    try:
        v = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a sequence or tensor of numbers, got {type(x).__name__}") from err
    if v.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} must be finite, got {int((~torch.isfinite(v)).sum())} non-finite values")
    return v


def fit_entropy_law(entropy, reward):
    """Least-squares fit of R = -a exp(H) + b (Cui et al., arXiv 2505.22617, section 2).

    Linear in (a, b) given x = exp(H), so the fit is ordinary least squares of R on [1, x] in closed form,
    in float64: slope = S_xR / S_xx, a = -slope, b = mean R - slope mean x; with s^2 = RSS / (n - 2),
    Var(a) = s^2 / S_xx, Var(b) = s^2 (1/n + mean(x)^2 / S_xx), Cov(a, b) = s^2 mean(x) / S_xx.

    Args:
        entropy: [n] entropies H >= 0 (nats), e.g. the mean token entropy logged at each step.
        reward: [n] rewards (or accuracies) logged at the same steps.
        Sequences, numpy arrays or tensors; n >= 3; at least two distinct entropies.

    Returns:
        EntropyLaw(a, b, a_se, b_se, cov_ab, r2, n); r2 is NaN when every reward is the same.
    """
    h, r = _as_vector("entropy", entropy), _as_vector("reward", reward)
    if h.numel() != r.numel():
        raise ValueError(f"entropy and reward must have the same length, got {h.numel()} and {r.numel()}")
    n = h.numel()
    if n < 3:
        raise ValueError(f"fit_entropy_law needs at least 3 points (2 parameters and a residual), got {n}")
    if (h < 0).any():
        raise ValueError(f"entropy must be >= 0, got min {h.min().item():.4g}")
    if h.max() > 700:
        raise ValueError(f"entropy must be <= 700 nats (exp(H) overflows float64), got {h.max().item():.4g}")
    x = h.exp()
    xc, rc = x - x.mean(), r - r.mean()
    sxx, syy = float((xc * xc).sum()), float((rc * rc).sum())
    # Relative to the spread of the points themselves, so that a fit on near-equal entropies is refused
    # rather than answered with a meaningless slope.
    if sxx <= (1e-12 * float(x.abs().max())) ** 2 * n:
        raise ValueError("entropy must take at least two distinct values to fit the law")
    slope = float((xc * rc).sum()) / sxx
    b = float(r.mean()) - slope * float(x.mean())
    rss = float(((rc - slope * xc) ** 2).sum())
    s2 = rss / (n - 2)
    mean_x = float(x.mean())
    return EntropyLaw(a=-slope, b=b, a_se=math.sqrt(s2 / sxx), b_se=math.sqrt(s2 * (1.0 / n + mean_x ** 2 / sxx)),
                      cov_ab=s2 * mean_x / sxx, r2=1.0 - rss / syy if syy > 0 else float("nan"), n=n)


def entropy_regularized_policy(rewards, alpha):
    """softmax(rewards / alpha) over the last dim: the policy maximising E_pi[r] + alpha H(pi).

    rewards: [..., K] expected reward of each action (float); alpha > 0. Returns float64 [..., K]. It is the
    stationary point of a policy gradient with a constant entropy bonus alpha on a softmax policy: every
    action keeps probability, so the bonus is biased unless alpha is annealed to 0.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.dim() < 1 or r.shape[-1] == 0:
        raise ValueError(f"rewards must have a non-empty last dim (actions), got shape {tuple(r.shape)}")
    return torch.softmax(r / alpha, dim=-1)
