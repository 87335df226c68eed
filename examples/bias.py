"""The bias of entropy control, measured on a tabular bandit with covkernels' own losses.

Baehr & Lei (arXiv 2604.09676) argue that a dense entropy bonus moves the stationary policy to
softmax(r / alpha), while Clip-Cov and KL-Cov (Cui et al., arXiv 2505.22617) act on a sparse set of
high-covariance tokens and are asymptotically unbiased when their coefficient is annealed. This is the
experiment they propose: S states x K actions with one best action per state and Bernoulli rewards; the
parameters are the logits table itself; every update is a covkernels.PolicyLoss (PPO-clip, + entropy
bonus, Clip-Cov, KL-Cov) with constant or annealed (covkernels.schedules, linear to 0 at mid-run)
coefficients.

One step: G actions per state from the current policy, rewards, leave-one-out advantages (RLOO:
r_i - mean of the other G - 1, an unbiased baseline, so the constant-bonus fixed point is exactly
softmax(r / alpha)), then `minibatches` SGD updates on disjoint slices of the G samples (the first on-policy,
the rest off-policy, as verl's mini-batches). Two starts: uniform logits, and logits N(0, 1): a confident
prior, often about a wrong action, as a pretrained model has. Clip-Cov / KL-Cov select 5 % of the tokens
of an update (3 of 64): the LLM defaults (2e-4) would round to the minimum of one token in batches this small.

A separate check runs the constant bonus with the exact expected gradient instead of samples, which must
converge to softmax(r / alpha) (exact_fixed_point).

    python examples/bias.py [--small] [--out DIR] [--seeds N] [--steps N] [--jobs N]
"""
import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from covkernels import PolicyLoss, policy_loss, schedules
from covkernels.theory import entropy_regularized_policy

METHODS = ("no control", "entropy bonus", "entropy bonus, annealed", "Clip-Cov", "Clip-Cov, annealed", "KL-Cov",
           "KL-Cov, annealed")
METRICS = ("p_best", "regret", "entropy", "reward")
CLOSED = "closed form softmax(r / alpha)"


@dataclass
class Bandit:
    rewards: torch.Tensor  # [S, K] Bernoulli means
    best: torch.Tensor  # [S] the unique best action
    init_logits: torch.Tensor  # [S, K]


def make_bandit(states, actions, init_std, seed):
    """Best action: mean reward 0.8; the others U(0, 0.7), so every gap is at least 0.1. The rewards depend
    on the seed only (not on init_std), so runs from different initial logits share their bandits."""
    g = torch.Generator().manual_seed(10_000 + seed)
    rewards = 0.7 * torch.rand(states, actions, generator=g)
    best = torch.randint(0, actions, (states,), generator=g)
    rewards[torch.arange(states), best] = 0.8
    init = init_std * torch.randn(states, actions, generator=g)
    return Bandit(rewards, best, init)


def loss_fns(args):
    """method name -> PolicyLoss; annealed coefficients go linearly to 0 over the first half of the run."""
    half = max(1, args.steps // 2)
    cc = {"clip_cov_lb": args.clip_cov_lb, "clip_cov_ub": args.clip_cov_ub}
    return {
        "no control": PolicyLoss("ppo"),
        "entropy bonus": PolicyLoss("ppo", entropy_coef=args.alpha),
        "entropy bonus, annealed": PolicyLoss("ppo", entropy_coef=schedules.linear(args.alpha, 0.0, half)),
        "Clip-Cov": PolicyLoss("clip_cov", clip_cov_ratio=args.cov_ratio, **cc),
        "Clip-Cov, annealed": PolicyLoss("clip_cov", clip_cov_ratio=schedules.linear(args.cov_ratio, 0.0, half),
                                         **cc),
        "KL-Cov": PolicyLoss("kl_cov", kl_cov_ratio=args.cov_ratio, ppo_kl_coef=args.beta),
        "KL-Cov, annealed": PolicyLoss("kl_cov", kl_cov_ratio=args.cov_ratio,
                                       ppo_kl_coef=schedules.linear(args.beta, 0.0, half)),
    }


def policy_metrics(p, bandit):
    """Means over states of P(best action), regret r* - E_pi[r], entropy and expected reward E_pi[r]."""
    r = bandit.rewards
    reward = (p * r).sum(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    p_best = p[torch.arange(r.shape[0]), bandit.best]
    return {"p_best": p_best.mean().item(), "regret": (r.max(-1).values - reward).mean().item(),
            "entropy": entropy.mean().item(), "reward": reward.mean().item()}


def train(bandit, loss_fn, *, steps, group, minibatches, lr, seed):
    """Trains the logits table; returns (final policy [S, K], {metric: [steps + 1] list}) (index 0 = init)."""
    g = torch.Generator().manual_seed(seed)
    S, K = bandit.rewards.shape
    m = group // minibatches
    z = bandit.init_logits.clone().requires_grad_(True)
    # The loss is a mean over the S states: lr * S is a step of lr on each state's logits.
    opt = torch.optim.SGD([z], lr=lr * S)
    mask = torch.ones(S, m, dtype=torch.bool)
    log = {k: [] for k in METRICS}
    for step in range(steps + 1):
        with torch.no_grad():
            p = torch.softmax(z, -1)
            for k, v in policy_metrics(p, bandit).items():
                log[k].append(v)
            if step == steps:
                break
            actions = torch.multinomial(p, group, replacement=True, generator=g)  # [S, G]
            rew = torch.bernoulli(bandit.rewards.gather(1, actions), generator=g)
            adv = (rew - rew.mean(1, keepdim=True)) * group / (group - 1)  # r_i - mean of the others
            old_logp = torch.log_softmax(z, -1).gather(1, actions)
        for j in range(minibatches):
            cols = slice(j * m, (j + 1) * m)
            # One row of logits per sampled token: [S, m, K].
            logits = z[:, None, :].expand(S, m, K).contiguous()
            loss, _ = loss_fn(logits, actions[:, cols], old_logp[:, cols], adv[:, cols], mask, step=step,
                              generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return torch.softmax(z.detach(), -1), log


def exact_fixed_point(bandit, alpha, *, steps, lr):
    """The constant entropy bonus with the exact expected gradient instead of samples: every action is a
    token, weighted by K * pi (rollout_is_weights), with advantage r - E_pi[r]. Then covkernels' loss is
    exactly -mean over states of (E_pi[r] + alpha H), and SGD on it must reach softmax(r / alpha).
    Returns P(best action) per step ([steps + 1] list) and the final policy."""
    S, K = bandit.rewards.shape
    z = bandit.init_logits.clone().requires_grad_(True)
    opt = torch.optim.SGD([z], lr=lr * S)
    targets = torch.arange(K).expand(S, K)
    mask = torch.ones(S, K, dtype=torch.bool)
    p_best = []
    for step in range(steps + 1):
        with torch.no_grad():
            p = torch.softmax(z, -1)
            p_best.append(p[torch.arange(S), bandit.best].mean().item())
            if step == steps:
                break
            adv = bandit.rewards - (p * bandit.rewards).sum(-1, keepdim=True)
            old_logp = torch.log_softmax(z, -1)
        loss, _ = policy_loss(z[:, None, :].expand(S, K, K).contiguous(), targets, old_logp, adv, mask,
                              entropy_coef=alpha, rollout_is_weights=K * p)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return p_best, torch.softmax(z.detach(), -1)


def _run_seed(args, init_std, seed):
    """Every method on one seed's bandit: {method: (log, TV to softmax(r / alpha))}, closed-form metrics."""
    torch.set_num_threads(1)
    fns = loss_fns(args)
    bandit = make_bandit(args.states, args.actions, init_std, seed)
    q = entropy_regularized_policy(bandit.rewards, args.alpha).float()
    out = {}
    for name in METHODS:
        final, log = train(bandit, fns[name], steps=args.steps, group=args.group, minibatches=args.minibatches,
                           lr=args.lr, seed=seed)
        out[name] = (log, 0.5 * (final - q).abs().sum(-1).mean().item())
    return out, policy_metrics(q, bandit)


def _mean(xs):
    return sum(xs) / len(xs)


def run(args, init_std):
    """Every method on every seed from initial logits N(0, init_std^2); table rows and mean curves."""
    jobs = [(args, init_std, seed) for seed in range(args.seeds)]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            per_seed = list(pool.map(_run_seed, *zip(*jobs)))
    else:
        per_seed = [_run_seed(*job) for job in jobs]
    rows, curves = {}, {}
    for name in METHODS:
        logs = [out[name][0] for out, _ in per_seed]
        final = torch.tensor([[log[k][-1] for k in METRICS] for log in logs], dtype=torch.float64)
        std = final.std(0) if args.seeds > 1 else torch.zeros(len(METRICS), dtype=torch.float64)
        rows[name] = {k: final[:, i].mean().item() for i, k in enumerate(METRICS)}
        rows[name].update({k + "_std": std[i].item() for i, k in enumerate(METRICS)})
        rows[name]["mean_regret"] = _mean([_mean(log["regret"]) for log in logs])
        rows[name]["tv_closed_form"] = _mean([out[name][1] for out, _ in per_seed])
        curves[name] = {k: [round(v, 6) for v in torch.tensor([log[k] for log in logs]).mean(0).tolist()]
                        for k in METRICS}
    rows[CLOSED] = {k: _mean([closed[k] for _, closed in per_seed]) for k in METRICS}
    return {"init_std": init_std, "rows": rows, "curves": curves}


def run_exact(args):
    """exact_fixed_point from uniform logits on every seed's bandit: P(best) curve (mean), TV and max error."""
    curves, tv, err, p_closed = [], [], [], []
    for seed in range(args.seeds):
        bandit = make_bandit(args.states, args.actions, 0.0, seed)
        q = entropy_regularized_policy(bandit.rewards, args.alpha).float()
        p_best, final = exact_fixed_point(bandit, args.alpha, steps=args.exact_steps, lr=args.exact_lr)
        curves.append(p_best)
        tv.append(0.5 * (final - q).abs().sum(-1).mean().item())
        err.append((final - q).abs().max().item())
        p_closed.append(policy_metrics(q, bandit)["p_best"])
    return {"p_best": torch.tensor(curves).mean(0).tolist(), "tv": _mean(tv), "max_abs_err": max(err),
            "p_best_closed_form": _mean(p_closed)}


def print_table(result, args):
    print(f"\nInitial logits N(0, {result['init_std']:g}^2). {args.seeds} seeds x {args.states} states x "
          f"{args.actions} actions; {args.steps} steps of {args.group} samples per state in {args.minibatches} "
          f"updates; lr {args.lr}, alpha {args.alpha}, Clip-Cov / KL-Cov ratio {args.cov_ratio}, KL-Cov beta "
          f"{args.beta}. Final policy, mean +- std over seeds; TV = total variation to softmax(r / alpha).")
    print("| method | P(best action) | regret | entropy | mean regret over training | TV |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in result["rows"].items():
        if name == CLOSED:
            print(f"| {name} | {row['p_best']:.3f} | {row['regret']:.4f} | {row['entropy']:.3f} | | 0 |")
            continue
        print(f"| {name} | {row['p_best']:.3f} +- {row['p_best_std']:.3f} | {row['regret']:.4f} +- "
              f"{row['regret_std']:.4f} | {row['entropy']:.3f} +- {row['entropy_std']:.3f} | "
              f"{row['mean_regret']:.4f} | {row['tv_closed_form']:.3f} |")


def print_exact(exact, args):
    print(f"\nConstant bonus with the exact expected gradient ({args.exact_steps} steps, lr {args.exact_lr}, from "
          f"uniform logits): P(best) {exact['p_best'][-1]:.4f} vs softmax(r / alpha) "
          f"{exact['p_best_closed_form']:.4f}; TV {exact['tv']:.2e}, max |pi - softmax(r / alpha)| "
          f"{exact['max_abs_err']:.2e}")


STYLES = {"no control": ("k", "-"), "entropy bonus": ("C0", "-"), "entropy bonus, annealed": ("C0", "--"),
          "Clip-Cov": ("C1", "-"), "Clip-Cov, annealed": ("C1", "--"), "KL-Cov": ("C2", "-"),
          "KL-Cov, annealed": ("C2", "--")}


def plot(results, exact, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("p_best", "regret", "entropy")
    fig, axes = plt.subplots(len(results), 3, figsize=(13, 3.3 * len(results)), squeeze=False)
    for row_axes, result in zip(axes, results):
        for name, curve in result["curves"].items():
            color, ls = STYLES[name]
            for ax, key in zip(row_axes, keys):
                ax.plot(curve[key], color=color, ls=ls, lw=1.2, label=name)
        if result["init_std"] == 0:
            row_axes[0].plot(range(args.steps + 1), exact["p_best"][:args.steps + 1], color="C0", ls=":", lw=1.5,
                             label=f"entropy bonus, exact gradient (lr {args.exact_lr:g})")
        closed = result["rows"][CLOSED]
        for ax, key in zip(row_axes, keys):
            ax.axhline(closed[key], color="0.5", lw=0.8, ls=":", label="softmax(r / alpha)")
            ax.set_xlabel("step")
        row_axes[0].set_ylabel(f"P(best action)\ninit N(0, {result['init_std']:g}^2)")
        row_axes[1].set_ylabel("regret  r* - E[r]")
        row_axes[1].set_yscale("log")
        row_axes[2].set_ylabel("entropy (nats)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Bandit, {args.states} states x {args.actions} actions, mean of {args.seeds} seeds "
                 f"(alpha = {args.alpha}; annealed: linear to 0 at step {args.steps // 2})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", "--quick", action="store_true", help="CI size: 2 seeds, 150 steps, uniform start only")
    p.add_argument("--out", default=None, help="directory for bias.png and bias.json (default: none written)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--states", type=int, default=16)
    p.add_argument("--actions", type=int, default=20)
    p.add_argument("--group", type=int, default=16, help="samples per state and step (G)")
    p.add_argument("--minibatches", type=int, default=4, help="updates per step, on disjoint slices of G")
    p.add_argument("--lr", type=float, default=1.0, help="SGD step on each state's logits")
    p.add_argument("--init-std", type=float, nargs="+", default=[0.0, 1.0],
                   help="std of the initial logits (one table per value; 0 = uniform)")
    p.add_argument("--alpha", type=float, default=0.05, help="entropy bonus coefficient")
    p.add_argument("--cov-ratio", type=float, default=0.05, help="Clip-Cov / KL-Cov fraction of tokens")
    p.add_argument("--clip-cov-lb", type=float, default=1.0)
    p.add_argument("--clip-cov-ub", type=float, default=5.0)
    p.add_argument("--beta", type=float, default=1.0, help="KL-Cov coefficient (ppo_kl_coef)")
    p.add_argument("--exact-steps", type=int, default=2000, help="steps of the exact-gradient check")
    p.add_argument("--exact-lr", type=float, default=16.0, help="lr of the exact-gradient check")
    p.add_argument("--jobs", type=int, default=1, help="processes (one seed each)")
    args = p.parse_args(argv)
    if args.small:
        args.seeds, args.steps, args.init_std, args.exact_steps = 2, 150, [0.0], 300
    if args.group < 2 or args.group % args.minibatches:
        p.error("--group must be >= 2 and a multiple of --minibatches")
    if args.seeds < 1 or args.steps < 1 or args.exact_steps < 1:
        p.error("--seeds, --steps and --exact-steps must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    # Tensors of a few hundred elements: one thread avoids OpenMP overheads (and oversubscription).
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = [run(args, init_std) for init_std in args.init_std]
    exact = run_exact(args)
    for result in results:
        print_table(result, args)
    print_exact(exact, args)
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        plot(results, exact, args, os.path.join(args.out, "bias.png"))
        with open(os.path.join(args.out, "bias.json"), "w") as f:
            json.dump({"args": vars(args), "results": results, "exact": exact}, f)
    return {"results": results, "exact": exact}


if __name__ == "__main__":
    main()
