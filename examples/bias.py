"""The bias of entropy control, measured on a tabular bandit with covkernels' own losses.

Baehr & Lei (arXiv 2604.09676) show for a softmax policy that a dense entropy bonus moves the stationary
policy to softmax(r / alpha), while covariance-based control (Cui et al., arXiv 2505.22617: Clip-Cov and
KL-Cov) acts on a sparse set of high-covariance tokens and is asymptotically unbiased when its coefficient
is annealed. The bandit, its sampling and every hyperparameter below are ours, not the papers': S states x K
actions with one best action per state (Bernoulli mean 0.8, the others U(0, 0.7)); the parameters are the
logits table itself; every update is a covkernels.PolicyLoss: no control (PPO-clip), entropy bonus alpha,
Clip-Cov and KL-Cov on a fraction `ratio` of the tokens (KL-Cov beta = 1), and AEnt (Shen, arXiv 2509.03493;
clamp fraction 0.3 and clamped-entropy band [0.05, 0.23] are the author's, lambda starts at alpha with a
step and bounds for this bandit). "Annealed": alpha, or the ratio, goes linearly to exactly 0 at mid-run
(a ratio of 0 selects no token), the same schedule for every method.

Two kinds of runs:
  sampled: G actions per state from the current policy, Bernoulli rewards, leave-one-out advantages (RLOO:
    r_i - mean of the other G - 1, an unbiased baseline, so the constant-bonus fixed point is exactly
    softmax(r / alpha)), then `minibatches` SGD updates on disjoint slices of the G samples (the first
    on-policy, the rest off-policy, as verl's mini-batches). Two starts: uniform logits, and N(0, 1) logits
    (a confident prior, often on a wrong action, as a pretrained model has).
  exact: the expected gradient at the current policy instead of samples, one update per step. Every action
    of every state is one token weighted K pi(a) (rollout_is_weights), with its expected reward and the exact
    advantage r - E_pi[r]; Clip-Cov drops the probability mass infinitely many samples would. No sampling
    noise: the end of a run is the method's stationary point (the unbiased ones approach the argmax).
    KL-Cov's |l - l_old| has zero gradient on-policy, so its exact run is the run without control: it acts
    only through the off-policy updates of the sampled runs.
The sweep: exact runs of the constant bonus and of Clip-Cov over their strength (alpha, ratio); P(best)
against entropy at the end, beside the closed form softmax(r / alpha) over alpha.

    python examples/bias.py [--small] [--out DIR] [--seeds N] [--steps N] [--jobs N]
"""
import argparse
import copy
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from covkernels import AEntController, PolicyLoss, logprobs_and_entropy, schedules
from covkernels.distributed import CovSelection
from covkernels.theory import entropy_regularized_policy

METHODS = ("no control", "entropy bonus", "entropy bonus, annealed", "Clip-Cov", "Clip-Cov, annealed", "KL-Cov",
           "KL-Cov, annealed", "AEnt")
SWEPT = ("entropy bonus", "Clip-Cov")
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


def loss_fns(args, steps=None, alpha=None, ratio=None):
    """method name -> PolicyLoss; annealed coefficients go linearly to 0 over the first half of `steps`
    (default args.steps). alpha and ratio default to args.alpha and args.cov_ratio."""
    half = max(1, (args.steps if steps is None else steps) // 2)
    alpha = args.alpha if alpha is None else alpha
    ratio = args.cov_ratio if ratio is None else ratio
    cc = {"clip_cov_lb": args.clip_cov_lb, "clip_cov_ub": args.clip_cov_ub}
    return {
        "no control": PolicyLoss("ppo"),
        "entropy bonus": PolicyLoss("ppo", entropy_coef=alpha),
        "entropy bonus, annealed": PolicyLoss("ppo", entropy_coef=schedules.linear(alpha, 0.0, half)),
        "Clip-Cov": PolicyLoss("clip_cov", clip_cov_ratio=ratio, **cc),
        "Clip-Cov, annealed": PolicyLoss("clip_cov", clip_cov_ratio=schedules.linear(ratio, 0.0, half), **cc),
        "KL-Cov": PolicyLoss("kl_cov", kl_cov_ratio=ratio, ppo_kl_coef=args.beta),
        "KL-Cov, annealed": PolicyLoss("kl_cov", kl_cov_ratio=schedules.linear(ratio, 0.0, half),
                                       ppo_kl_coef=args.beta),
        "AEnt": PolicyLoss("ppo", aent_coef=AEntController(alpha, lr=args.aent_lr, coef_min=0.0,
                                                           coef_max=args.aent_max)),
    }


def policy_metrics(p, bandit):
    """Means over states of P(best action), regret r* - E_pi[r], entropy and expected reward E_pi[r]."""
    r = bandit.rewards
    reward = (p * r).sum(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    p_best = p[torch.arange(r.shape[0]), bandit.best]
    return {"p_best": p_best.mean().item(), "regret": (r.max(-1).values - reward).mean().item(),
            "entropy": entropy.mean().item(), "reward": reward.mean().item()}


def _sampled_updates(bandit, z, p, *, group, minibatches, g):
    """One step's samples: per update, (rows of z, targets, old_logp, advantages, weights, selection), [S, m]."""
    S = p.shape[0]
    actions = torch.multinomial(p, group, replacement=True, generator=g)  # [S, G]
    rew = torch.bernoulli(bandit.rewards.gather(1, actions), generator=g)
    adv = (rew - rew.mean(1, keepdim=True)) * group / (group - 1)  # r_i - mean of the others
    rows = torch.arange(S)[:, None].expand(S, group)
    # From covkernels' own pass, as a trainer's old log-probs are: on-policy, logp - old_logp is then exactly
    # 0, where KL-Cov's |logp - old_logp| has no gradient (one rounding apart, it would push by sign(noise)).
    old_logp = logprobs_and_entropy(z[rows], actions)[0]
    m = group // minibatches
    return [(rows[:, j * m:(j + 1) * m], actions[:, j * m:(j + 1) * m], old_logp[:, j * m:(j + 1) * m],
             adv[:, j * m:(j + 1) * m], None, None) for j in range(minibatches)]


def _exact_update(bandit, z, loss_fn, step):
    """The expected loss of one step at pi = softmax(z): every (state, action) pair is one token of a [1, S K]
    batch, weighted K pi(a), with its exact advantage r - E_pi[r]. Clip-Cov drops, of its candidates, the
    probability mass `ratio` x S that infinitely many samples would: a uniform share q of each candidate,
    in expectation its weight scaled by 1 - q. KL-Cov needs nothing of the kind: its |l - l_old| has zero
    gradient at the current policy, whichever tokens it selects."""
    p = torch.softmax(z, -1)
    S, K = p.shape
    rows, targets = torch.arange(S).repeat_interleave(K), torch.arange(K).repeat(S)
    mass, logp = p.flatten(), logprobs_and_entropy(z[rows][None], targets[None])[0].flatten()
    adv = (bandit.rewards - (p * bandit.rewards).sum(-1, keepdim=True)).flatten()
    weights, sel = K * mass, None
    config = loss_fn.config
    if config["method"] == "clip_cov":
        # Batch centring: the mean log-prob of infinitely many samples; their mean advantage is 0. On-policy
        # nothing is PPO-clipped, so every pair in (lb, ub) is a candidate.
        scores = (logp - (mass * logp).sum() / S) * adv
        cand = (scores > config["clip_cov_lb"]) & (scores < config["clip_cov_ub"])
        cand_mass = (mass * cand).sum()
        budget = loss_fn.coefficients(step)["clip_cov_ratio"] * S
        q = (budget / cand_mass).clamp(max=1.0) if cand_mass > 0 else 0.0
        weights = weights * (1 - q * cand)
        sel = CovSelection("clip_cov", torch.zeros(1, S * K, dtype=torch.bool), scores[None],
                           torch.tensor(float(S * K)), torch.tensor(1.0))
    return rows[None], targets[None], logp[None], adv[None], weights[None], sel


def train(bandit, loss_fn, *, steps, group, minibatches, lr, seed, exact=False):
    """Trains the logits table (sampled, or with the exact expected loss); returns (final policy [S, K],
    {metric: [steps + 1] list}) (index 0 = init). loss_fn is copied: AEnt's controller starts afresh."""
    loss_fn = copy.deepcopy(loss_fn)
    controller = loss_fn.config["aent_coef"]
    g = torch.Generator().manual_seed(seed)
    S = bandit.rewards.shape[0]
    z = bandit.init_logits.clone().requires_grad_(True)
    # The loss is a mean over the S states: lr * S is a step of lr on each state's logits.
    opt = torch.optim.SGD([z], lr=lr * S)
    log = {k: [] for k in METRICS}
    for step in range(steps + 1):
        with torch.no_grad():
            p = torch.softmax(z, -1)
            for k, v in policy_metrics(p, bandit).items():
                log[k].append(v)
            if step == steps:
                break
            # The exact runs take the expected gradient at the current policy: one on-policy update per step.
            updates = [_exact_update(bandit, z, loss_fn, step)] if exact else _sampled_updates(
                bandit, z, p, group=group, minibatches=minibatches, g=g)
        for j, (rows, targets, old_logp, adv, weights, sel) in enumerate(updates):
            # One row of logits per token: [S, m, K] sampled, [1, S K, K] exact.
            loss, metrics = loss_fn(z[rows], targets, old_logp, adv, torch.ones(targets.shape, dtype=torch.bool),
                                    step=step, generator=g, rollout_is_weights=weights, selection=sel)
            if j == 0:
                on_policy_metrics = metrics
            opt.zero_grad()
            loss.backward()
            opt.step()
        if isinstance(controller, AEntController):
            controller.update(on_policy_metrics["clamped_entropy"])
    return torch.softmax(z.detach(), -1), log


def _tv(p, q):
    return 0.5 * (p - q).abs().sum(-1).mean().item()


def _job(args, name, seed, init_std=0.0, exact=False, strength=None):
    """One run: its log, the TV distance of its final policy to softmax(r / alpha), and the closed form's metrics."""
    torch.set_num_threads(1)
    steps = args.exact_steps if exact else args.steps
    alpha = strength if strength is not None and name.startswith("entropy bonus") else args.alpha
    ratio = strength if strength is not None and not name.startswith("entropy bonus") else args.cov_ratio
    bandit = make_bandit(args.states, args.actions, init_std, seed)
    final, log = train(bandit, loss_fns(args, steps, alpha, ratio)[name], steps=steps, group=args.group,
                       minibatches=args.minibatches, lr=args.exact_lr if exact else args.lr, seed=seed, exact=exact)
    q = entropy_regularized_policy(bandit.rewards, alpha).float()
    return log, _tv(final, q), policy_metrics(q, bandit)


def _mean(xs):
    return sum(xs) / len(xs)


def _table(args, results):
    """Rows (final metrics: mean and std over seeds, mean regret over training, TV) and mean curves of one
    set of runs {(method, seed): (log, tv, closed)}."""
    rows, curves = {}, {}
    for name in METHODS:
        runs = [results[name, seed] for seed in range(args.seeds)]
        final = torch.tensor([[log[k][-1] for k in METRICS] for log, _, _ in runs], dtype=torch.float64)
        std = final.std(0) if args.seeds > 1 else torch.zeros(len(METRICS), dtype=torch.float64)
        rows[name] = {k: final[:, i].mean().item() for i, k in enumerate(METRICS)}
        rows[name].update({k + "_std": std[i].item() for i, k in enumerate(METRICS)})
        rows[name]["mean_regret"] = _mean([_mean(log["regret"]) for log, _, _ in runs])
        rows[name]["tv_closed_form"] = _mean([tv for _, tv, _ in runs])
        curves[name] = {k: [round(v, 6) for v in torch.tensor([log[k] for log, _, _ in runs]).mean(0).tolist()]
                        for k in METRICS}
    rows[CLOSED] = {k: _mean([results[METHODS[0], s][2][k] for s in range(args.seeds)]) for k in METRICS}
    rows[CLOSED]["tv_closed_form"] = 0.0
    return {"rows": rows, "curves": curves}


def run(args):
    """Every run of the study, in `args.jobs` processes. Returns the sampled tables (one per initial-logit
    scale), the exact table (uniform start) and the sweep."""
    jobs = {("sampled", s, name, seed): dict(init_std=s) for s in args.init_std for name in METHODS
            for seed in range(args.seeds)}
    jobs.update({("exact", 0.0, name, seed): dict(exact=True) for name in METHODS for seed in range(args.seeds)})
    jobs.update({("sweep", x, name, seed): dict(exact=True, strength=x) for name in SWEPT
                 for x in (args.sweep_alpha if name == "entropy bonus" else args.sweep_ratio)
                 for seed in range(args.sweep_seeds)})
    calls = [(args, key[2], key[3]) for key in jobs]
    kwargs = list(jobs.values())
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            outs = list(pool.map(_call, calls, kwargs))
    else:
        outs = [_call(c, k) for c, k in zip(calls, kwargs)]
    done = dict(zip(jobs, outs))
    sampled = [{"init_std": s, **_table(args, {(n, seed): v for (kind, x, n, seed), v in done.items()
                                               if kind == "sampled" and x == s})} for s in args.init_std]
    exact = _table(args, {(n, seed): v for (kind, _, n, seed), v in done.items() if kind == "exact"})
    sweep = {name: [{"strength": x, **{k: _mean([done["sweep", x, name, seed][0][k][-1]
                                                 for seed in range(args.sweep_seeds)]) for k in METRICS}}
                     for x in (args.sweep_alpha if name == "entropy bonus" else args.sweep_ratio)] for name in SWEPT}
    sweep[CLOSED] = closed_form_curve(args)
    return sampled, exact, sweep


def _call(call, kwargs):
    return _job(*call, **kwargs)


def closed_form_curve(args):
    """softmax(r / alpha) over a log grid of alpha, metrics averaged over the sweep's bandits."""
    points = []
    for alpha in torch.logspace(-3, 0.5, 40).tolist():
        ms = [policy_metrics(entropy_regularized_policy(b.rewards, alpha).float(), b)
              for b in (make_bandit(args.states, args.actions, 0.0, seed) for seed in range(args.sweep_seeds))]
        points.append({"strength": alpha, **{k: _mean([m[k] for m in ms]) for k in METRICS}})
    return points


def print_table(title, table):
    print(f"\n{title}")
    print("| method | P(best action) | regret | entropy | mean regret over training | TV to softmax(r / alpha) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in table["rows"].items():
        if name == CLOSED:
            print(f"| {name} | {row['p_best']:.4f} | {row['regret']:.4f} | {row['entropy']:.3f} | | 0 |")
            continue
        print(f"| {name} | {row['p_best']:.4f} +- {row['p_best_std']:.4f} | {row['regret']:.4f} | "
              f"{row['entropy']:.3f} +- {row['entropy_std']:.3f} | {row['mean_regret']:.4f} | "
              f"{row['tv_closed_form']:.4f} |")


def print_sweep(sweep):
    print("\nSweep (exact runs, end of run): strength -> P(best), entropy")
    print("| method | strength | P(best action) | entropy |")
    print("|---|---:|---:|---:|")
    for name in SWEPT:
        for pt in sweep[name]:
            print(f"| {name} | {pt['strength']:g} | {pt['p_best']:.4f} | {pt['entropy']:.3f} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", "--quick", action="store_true", help="CI size: 2 seeds, 150 steps, uniform start only")
    p.add_argument("--out", default=None, help="directory for bias.png, bias_sweep.png and bias.json")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--states", type=int, default=16)
    p.add_argument("--actions", type=int, default=20)
    p.add_argument("--group", type=int, default=16, help="samples per state and step (G)")
    p.add_argument("--minibatches", type=int, default=4, help="updates per sampled step, on disjoint slices of G")
    p.add_argument("--lr", type=float, default=1.0, help="SGD step on each state's logits")
    p.add_argument("--init-std", type=float, nargs="+", default=[0.0, 1.0],
                   help="std of the initial logits of the sampled runs (one table per value; 0 = uniform)")
    p.add_argument("--alpha", type=float, default=0.05, help="entropy bonus coefficient (and AEnt's first lambda)")
    p.add_argument("--cov-ratio", type=float, default=0.05, help="Clip-Cov / KL-Cov fraction of tokens")
    p.add_argument("--clip-cov-lb", type=float, default=1.0)
    p.add_argument("--clip-cov-ub", type=float, default=5.0)
    p.add_argument("--beta", type=float, default=1.0, help="KL-Cov coefficient (ppo_kl_coef)")
    p.add_argument("--aent-lr", type=float, default=0.01, help="AEnt's controller step")
    p.add_argument("--aent-max", type=float, default=0.5, help="AEnt's largest lambda")
    p.add_argument("--exact-steps", type=int, default=2000, help="steps of the exact runs")
    p.add_argument("--exact-lr", type=float, default=16.0, help="lr of the exact runs (one update per step)")
    p.add_argument("--sweep-alpha", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2])
    p.add_argument("--sweep-ratio", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2])
    p.add_argument("--sweep-seeds", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1, help="processes (one run each)")
    args = p.parse_args(argv)
    if args.small:
        args.seeds, args.steps, args.init_std, args.exact_steps = 2, 150, [0.0], 300
        args.sweep_alpha, args.sweep_ratio, args.sweep_seeds = [0.02, 0.2], [0.02, 0.2], 1
    if args.group < 2 or args.group % args.minibatches:
        p.error("--group must be >= 2 and a multiple of --minibatches")
    if min(args.seeds, args.steps, args.exact_steps, args.sweep_seeds) < 1:
        p.error("--seeds, --steps, --exact-steps and --sweep-seeds must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    # Tensors of a few hundred elements: one thread avoids OpenMP overheads (and oversubscription).
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    sampled, exact, sweep = run(args)
    setup = (f"{args.seeds} seeds x {args.states} states x {args.actions} actions; alpha {args.alpha}, Clip-Cov / "
             f"KL-Cov ratio {args.cov_ratio}, KL-Cov beta {args.beta}; mean +- std over seeds")
    for table in sampled:
        print_table(f"Sampled, initial logits N(0, {table['init_std']:g}^2): {args.steps} steps of {args.group} "
                    f"samples per state in {args.minibatches} updates, lr {args.lr}; {setup}.", table)
    print_table(f"Exact expected gradient, uniform start: {args.exact_steps} steps of one update, lr "
                f"{args.exact_lr}; {setup}.", exact)
    print_sweep(sweep)
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.out:
        from bias_plots import plot_curves, plot_sweep

        os.makedirs(args.out, exist_ok=True)
        plot_curves(sampled, exact, args, os.path.join(args.out, "bias.png"))
        plot_sweep(sweep, exact, args, os.path.join(args.out, "bias_sweep.png"))
        with open(os.path.join(args.out, "bias.json"), "w") as f:
            json.dump({"args": vars(args), "results": sampled, "exact": exact, "sweep": sweep}, f)
    return {"results": sampled, "exact": exact, "sweep": sweep}


if __name__ == "__main__":
    main()
