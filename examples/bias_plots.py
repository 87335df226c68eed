"""The figures of examples/bias.py, from the results it computed (matplotlib, Agg)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bias import CLOSED, SWEPT  # noqa: E402

STYLES = {"no control": ("k", "-"), "entropy bonus": ("C0", "-"), "entropy bonus, annealed": ("C0", "--"),
          "Clip-Cov": ("C1", "-"), "Clip-Cov, annealed": ("C1", "--"), "KL-Cov": ("C2", "-"),
          "KL-Cov, annealed": ("C2", "--"), "AEnt": ("C3", "-")}


def plot_curves(sampled, exact, args, path):
    """P(best), regret and entropy over training: one row per sampled start, one for the exact runs."""
    keys = ("p_best", "regret", "entropy")
    rows = [(f"sampled, init N(0, {t['init_std']:g}^2)", t) for t in sampled] + [("exact, uniform init", exact)]
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 3.2 * len(rows)), squeeze=False)
    for row_axes, (label, table) in zip(axes, rows):
        for name, curve in table["curves"].items():
            color, ls = STYLES[name]
            for ax, key in zip(row_axes, keys):
                ax.plot(curve[key], color=color, ls=ls, lw=1.2, label=name)
        closed = table["rows"][CLOSED]
        for ax, key in zip(row_axes, keys):
            ax.axhline(closed[key], color="0.5", lw=0.8, ls=":", label="softmax(r / alpha)")
            ax.set_xlabel("step")
        row_axes[0].set_ylabel(f"P(best action)\n{label}")
        row_axes[1].set_ylabel("regret  r* - E[r]")
        row_axes[1].set_yscale("log")
        row_axes[2].set_ylabel("entropy (nats)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Bandit, {args.states} states x {args.actions} actions, mean of {args.seeds} seeds (alpha = "
                 f"{args.alpha}, ratio = {args.cov_ratio}; annealed: linear to 0 at mid-run)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def plot_sweep(sweep, exact, args, path):
    """P(best) against entropy at the end of exact runs, over each method's strength."""
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    curve = sweep[CLOSED]
    ax.plot([p["entropy"] for p in curve], [p["p_best"] for p in curve], color="0.5", lw=1,
            label="softmax(r / alpha), alpha from 1e-3 to 3")
    for name, marker in zip(SWEPT, "os^"):
        pts = sweep[name]
        color = STYLES[name][0]
        strengths = ", ".join(f"{p['strength']:g}" for p in pts)
        label = f"{name} ({'alpha' if name == 'entropy bonus' else 'ratio'} {strengths})"
        ax.plot([p["entropy"] for p in pts], [p["p_best"] for p in pts], marker=marker, color=color, lw=0.8,
                label=label)
        for p in pts if name == "entropy bonus" else []:  # Clip-Cov's points coincide
            ax.annotate(f"{p['strength']:g}", (p["entropy"], p["p_best"]), fontsize=6, color=color,
                        xytext=(3, 3), textcoords="offset points")
    for name in ("no control", "entropy bonus, annealed", "Clip-Cov, annealed", "AEnt"):
        row = exact["rows"][name]
        color, _ = STYLES[name]
        label = "no control (= KL-Cov, any ratio)" if name == "no control" else name
        ax.plot(row["entropy"], row["p_best"], "x" if name != "AEnt" else "D", color=color, ms=7, label=label)
    ax.set(xlabel="entropy at the end of the run (nats)", ylabel="P(best action)",
           title=f"Exact runs, {args.exact_steps} steps: P(best) against entropy")
    ax.set_xscale("symlog", linthresh=1e-2)
    ax.title.set_fontsize(10)
    ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
