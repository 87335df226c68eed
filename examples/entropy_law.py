"""Cui et al.'s entropy-performance law, R = -a exp(H) + b, fitted to logged training curves.

Cui et al. (arXiv 2505.22617) fit the reward R of an RL run against its policy entropy H and read the
ceiling b - a (the reward at H = 0) off the fit, also from the early part of a run. This fits the law with
covkernels.theory.fit_entropy_law to the curves of examples/bias.py (mean over seeds, one point per step):
the whole run, and only its steps before the entropy falls below 0.5 nats, extrapolated to H = 0; both
against the reward the run reached and the best reward possible (0.8 in that bandit).

    python examples/entropy_law.py [--small] [--log results/bias.json] [--out DIR]
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import torch

from covkernels.theory import EntropyLaw, fit_entropy_law

# The bandit and its training loop are examples/bias.py's, imported from beside this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bias

OPTIMUM = 0.8  # the best action's mean reward in every state of bias.make_bandit


def curves_from_training(args):
    """Trains the bias.py bandit (its default or --small settings) with the chosen methods, from each of its
    initial-logit scales; {(method, init_std): {"entropy": [...], "reward": [...]}} (means over seeds)."""
    bargs = bias.parse_args(["--small"] if args.small else [])
    torch.set_num_threads(1)
    fns = bias.loss_fns(bargs)
    curves = {}
    for init_std in bargs.init_std:
        for name in args.methods:
            logs = []
            for seed in range(bargs.seeds):
                bandit = bias.make_bandit(bargs.states, bargs.actions, init_std, seed)
                logs.append(bias.train(bandit, fns[name], steps=bargs.steps, group=bargs.group,
                                       minibatches=bargs.minibatches, lr=bargs.lr, seed=seed)[1])
            curves[name, init_std] = {k: torch.tensor([log[k] for log in logs]).mean(0).tolist()
                                      for k in ("entropy", "reward")}
    return curves


def curves_from_log(path, methods):
    """The same from the bias.json that examples/bias.py --out writes."""
    with open(path) as f:
        results = json.load(f)["results"]
    return {(name, result["init_std"]): result["curves"][name] for result in results for name in methods}


def fits(curves, early_entropy):
    """The law fitted to each whole curve, and to its first points, while H >= early_entropy."""
    rows = {}
    for key, c in curves.items():
        h, r = torch.tensor(c["entropy"]), torch.tensor(c["reward"])
        below = (h < early_entropy).nonzero()
        n_early = below[0, 0].item() if below.numel() else h.numel()
        rows[key] = {"full": fit_entropy_law(h, r), "final_reward": r[-1].item(), "final_entropy": h[-1].item(),
                     "early": fit_entropy_law(h[:n_early], r[:n_early]) if n_early >= 3 else None}
    return rows


def print_table(rows, early_entropy):
    print(f"R = -a exp(H) + b fitted per method to the mean curve over seeds (one point per step); 'early' = only "
          f"the steps before H first falls below {early_entropy:g} nats, extrapolated to H = 0. Standard errors "
          f"assume independent residuals: optimistic on a training curve. Best possible reward {OPTIMUM}.")
    print("| method | initial logits | a | b | R^2 | ceiling b - a | early fit: steps, ceiling | final H | final R |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, init_std), row in rows.items():
        f, e = row["full"], row["early"]
        early = "-" if e is None else f"{e.n}, {e.ceiling:.4f} +- {e.ceiling_se:.1g}"
        print(f"| {name} | N(0, {init_std:g}^2) | {f.a:.4f} +- {f.a_se:.1g} | {f.b:.4f} +- {f.b_se:.1g} | "
              f"{f.r2:.3f} | {f.ceiling:.4f} +- {f.ceiling_se:.1g} | {early} | {row['final_entropy']:.3f} | "
              f"{row['final_reward']:.4f} |")


def plot(curves, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inits = sorted({init_std for _, init_std in curves})
    fig, axes = plt.subplots(1, len(inits), figsize=(5.5 * len(inits), 4), squeeze=False)
    for ax, init_std in zip(axes[0], inits):
        names = [name for name, s in curves if s == init_std]
        for i, name in enumerate(names):
            h = torch.tensor(curves[name, init_std]["entropy"])
            ax.plot(h, curves[name, init_std]["reward"], ".", ms=2, color=f"C{i}", alpha=0.5)
            grid = torch.linspace(0, h.max().item(), 100)
            law = rows[name, init_std]["full"]
            ax.plot(grid, law.predict(grid), "-", color=f"C{i}", lw=1,
                    label=f"{name}: a={law.a:.2f}, b={law.b:.2f}, R^2={law.r2:.2f}")
        ax.axhline(OPTIMUM, color="k", ls=":", lw=0.8, label="best possible")
        ax.set(xlabel="entropy H (nats)", ylabel="expected reward R",
               title=f"R = -a exp(H) + b, bias.py bandit, initial logits N(0, {init_std:g}^2)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", "--quick", action="store_true", help="CI size (trains bias.py's bandit with --small)")
    p.add_argument("--log", default=None, help="bias.json written by examples/bias.py --out (else: train here)")
    p.add_argument("--out", default=None, help="directory for entropy_law.png / .json (default: none)")
    p.add_argument("--methods", nargs="+", default=["no control", "entropy bonus, annealed", "KL-Cov"],
                   help="curves to fit (names as in bias.py)")
    p.add_argument("--early-entropy", type=float, default=0.5,
                   help="the early fit uses the steps before the entropy first falls below this (nats)")
    args = p.parse_args(argv)
    unknown = set(args.methods) - set(bias.METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {list(bias.METHODS)}")
    if not args.early_entropy > 0:
        p.error("--early-entropy must be > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.log:
        curves = curves_from_log(args.log, args.methods)
    else:
        curves = curves_from_training(args)
    rows = fits(curves, args.early_entropy)
    print_table(rows, args.early_entropy)
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        plot(curves, rows, os.path.join(args.out, "entropy_law.png"))
        with open(os.path.join(args.out, "entropy_law.json"), "w") as f:
            json.dump([{"method": name, "init_std": init_std,
                        **{k: asdict(v) if isinstance(v, EntropyLaw) else v for k, v in row.items()}}
                       for (name, init_std), row in rows.items()], f, indent=1)
    return rows


if __name__ == "__main__":
    main()
