"""Predicted against measured entropy change after one policy-gradient step (SPEC section 4).

Part 1, tabular: a softmax policy whose parameters are the logits, a table of S states x V actions. One
token is sampled per state and gets an advantage A ~ N(0, 1); one step of the policy gradient (logit step
lr A (e_t - p)) or of the natural gradient (lr A e_t / p_t) is taken, and the entropy change of every state
is compared with covkernels.entropy_change (kind "pg" / "npg"). The prediction is first order, so its error
must shrink like the step squared: the table halves the step twice.

Part 2, a tiny causal LM (transformers LlamaConfig, random weights, no download), trained for a few hundred
steps on a random sparse bigram chain so that its entropy (~2 nats) is that of a language model rather
than log V. It samples responses; their reward is the mean of a fixed random score of their tokens, with
group-normalised advantages; one SGD step on covkernels.policy_loss (on-policy PPO = the token-mean policy
gradient). Parameters are shared between tokens, so the tabular formula, which assumes each state moves
only its own logits, is a model, not an identity. Compared with the measured change of every token's entropy:
  - token-local "pg" (SPEC section 4, at the step lr / N each token's logits would take if they were free),
  - Cui et al.'s covariance score (l - mean l)(A - mean A), per token and as the batch mean,
  - the exact first-order change in parameter space, -Cov_p(log p, J dtheta), from a Jacobian-vector product.

    python examples/entropy_dynamics.py [--small] [--out DIR]
"""
import argparse
import json
import os
import time

import torch

from covkernels import cov_scores, entropy_change, logprobs_and_entropy, policy_loss, token_stats


def entropy(logits):
    """Entropy of every row of softmax(logits), through covkernels (any target will do)."""
    targets = torch.zeros(logits.shape[:-1], dtype=torch.long)
    return logprobs_and_entropy(logits, targets)[1].detach()


def corr(x, y):
    return torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1].item()


def rel_err(measured, predicted):
    return ((measured - predicted).norm() / measured.norm()).item()


def tabular(states, vocab, moves, seed=0, init_std=2.0):
    """One step per kind and size; size = the largest logit move of the step, max |dz|."""
    g = torch.Generator().manual_seed(seed)
    z = init_std * torch.randn(states, vocab, generator=g, dtype=torch.float64)
    t = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(-1)
    adv = torch.randn(states, generator=g, dtype=torch.float64)
    stats = token_stats(z, t)
    h0 = stats.entropy.detach()
    # Policy gradient through covkernels' own backward: -d(sum A logp)/dz = -A (e_t - p).
    zg = z.clone().requires_grad_(True)
    logp, _ = logprobs_and_entropy(zg, t)
    (-(adv * logp).sum()).backward()
    directions = {"pg": -zg.grad, "npg": torch.zeros_like(z)}
    directions["npg"][torch.arange(states), t] = adv / stats.p_target
    rows, scatter = [], {}
    for kind, d in directions.items():
        prev = None
        for move in moves:
            lr = move / d.abs().max().item()
            measured = entropy(z + lr * d) - h0
            predicted = entropy_change(stats, adv, kind=kind, lr=lr)
            err = (measured - predicted).norm().item()
            rows.append({"kind": kind, "max_move": move, "lr": lr, "rms_err": err / states ** 0.5,
                         "rel_err": rel_err(measured, predicted),
                         "err_ratio": None if prev is None else prev / err, "corr": corr(measured, predicted)})
            prev = err
            if move == moves[0]:
                scatter[kind] = (measured, predicted)
    return {"rows": rows, "scatter": scatter, "entropy": h0.mean().item(),
            "p_target_median": stats.p_target.median().item()}


def bigram_chain(vocab, successors, g):
    """A random sparse bigram chain: each token has `successors` next tokens with Dirichlet(1) weights."""
    nxt = torch.stack([torch.randperm(vocab, generator=g)[:successors] for _ in range(vocab)])
    # Dirichlet(1) weights: normalised exponential draws (torch.distributions takes no generator).
    w = -torch.rand(vocab, successors, generator=g, dtype=torch.float64).log()
    w = w / w.sum(-1, keepdim=True)
    return nxt, w


def sample_chain(chain, batch, length, g):
    nxt, w = chain
    x = torch.randint(0, nxt.shape[0], (batch, 1), generator=g)
    for _ in range(length - 1):
        j = torch.multinomial(w[x[:, -1]], 1, generator=g)
        x = torch.cat([x, nxt[x[:, -1]].gather(1, j)], 1)
    return x


def tiny_lm(vocab, pretrain_steps, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    chain = bigram_chain(vocab, 8, g)
    corpus = sample_chain(chain, 4096, 24, g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(pretrain_steps):
        x = corpus[torch.randint(0, corpus.shape[0], (32,), generator=g)]
        logp, _ = logprobs_and_entropy(model(x).logits[:, :-1], x[:, 1:])
        opt.zero_grad()
        (-logp.mean()).backward()
        opt.step()
    return model.double().eval(), chain


def lm_trial(model, chain, score, batch, prompt, length, lrs, g):
    """One batch of responses, one SGD step per lr from the same weights; per-token measured and predicted."""
    from torch.func import functional_call, jvp

    ids = sample_chain(chain, batch, prompt, g)
    with torch.no_grad():
        for _ in range(length):
            p = torch.softmax(model(ids).logits[:, -1], -1)
            ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
    targets = ids[:, prompt:]
    reward = score[targets].mean(1)
    adv = ((reward - reward.mean()) / (reward.std() + 1e-6))[:, None].expand_as(targets).contiguous()
    mask = torch.ones_like(targets, dtype=torch.bool)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits_of(p):
        return functional_call(model, p, (ids,)).logits[:, prompt - 1:-1]

    logits = logits_of(params)
    stats = token_stats(logits, targets)
    live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    # On-policy PPO (old_logp = logp, ratio 1, nothing clipped) is the token-mean policy gradient.
    loss, _ = policy_loss(logits_of(live), targets, stats.logp.detach(), adv, mask)
    grads = dict(zip(live, torch.autograd.grad(loss, list(live.values()))))
    n = targets.numel()
    logp_all = torch.log_softmax(logits.detach(), -1)
    h0 = stats.entropy.detach()
    # The logit change to first order, J dtheta, for a unit step (it is linear in lr).
    _, dz = jvp(logits_of, (params,), ({k: -v for k, v in grads.items()},))
    linear = -(logp_all.exp() * (logp_all + h0[..., None]) * dz.detach()).sum(-1).flatten()
    cov = cov_scores(stats.logp, adv, mask)  # (l - mean l)(A - mean A), batch-centred as verl
    out = []
    for lr in lrs:
        with torch.no_grad():
            measured = entropy(logits_of({k: params[k] - lr * grads[k] for k in params})) - h0
        out.append({"measured": measured.flatten(), "jvp": lr * linear,
                    "pg": entropy_change(stats, adv, kind="pg", lr=lr / n).flatten(),
                    "npg": entropy_change(stats, adv, kind="npg", lr=lr / n).flatten(),
                    "cov": -(lr / n) * cov.flatten(),
                    "entropy": h0.mean().item()})
    return out


def lm_study(args):
    model, chain = tiny_lm(args.lm_vocab, args.pretrain_steps, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    score = torch.randn(args.lm_vocab, generator=g, dtype=torch.float64)
    trials = [lm_trial(model, chain, score, args.batch, 4, args.length, args.lm_lrs, g) for _ in range(args.trials)]
    rows = []
    for i, lr in enumerate(args.lm_lrs):
        cat = {k: torch.cat([t[i][k] for t in trials]) for k in ("measured", "jvp", "pg", "npg", "cov")}
        means = {k: torch.stack([t[i][k].mean() for t in trials]) for k in cat}
        for k in ("jvp", "pg", "npg", "cov"):
            x, y = cat[k], cat["measured"]
            scale = (x @ y / (x @ x)).item()
            rows.append({"lr": lr, "predictor": k, "corr": corr(y, x), "rel_err": rel_err(y, x), "scale": scale,
                         "rel_err_scaled": rel_err(y, scale * x), "batch_corr": corr(means["measured"], means[k]),
                         "batch_rel_err": rel_err(means["measured"], means[k])})
    return {"rows": rows, "entropy": sum(t[0]["entropy"] for t in trials) / len(trials),
            "scatter": {k: torch.cat([t[0][k] for t in trials]) for k in ("measured", "jvp", "pg", "cov")},
            "batch": {k: torch.stack([t[0][k].mean() for t in trials]) for k in ("measured", "pg", "cov")}}


NAMES = {"jvp": "exact first order (JVP)", "pg": "token-local pg (SPEC 4)", "npg": "token-local npg, (l + H) A",
         "cov": "Cui et al. cov (l - l_bar)(A - A_bar)"}


def print_tabular(res, args):
    print(f"Tabular softmax, {args.states} states x {args.vocab} actions (mean entropy {res['entropy']:.2f} nats, "
          f"median p_t {res['p_target_median']:.2g}); step size = the largest logit move max |dz|")
    print("| kind | max abs dz | lr | rms error | relative error | error ratio (previous / this) | correlation |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        ratio = "" if r["err_ratio"] is None else f"{r['err_ratio']:.2f}"
        print(f"| {r['kind']} | {r['max_move']:g} | {r['lr']:.3g} | {r['rms_err']:.2e} | {r['rel_err']:.2e} | "
              f"{ratio} | {r['corr']:.5f} |")


def print_lm(res, args):
    print(f"\nTiny causal LM (V = {args.lm_vocab}, mean entropy {res['entropy']:.2f} nats): {args.trials} batches of "
          f"{args.batch} x {args.length} tokens, one SGD step each from the same weights")
    print("| lr | predictor | corr. per token | rel. error | best scale c | rel. error of c x pred | "
          "corr. of batch means | rel. error of batch means |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        print(f"| {r['lr']:g} | {NAMES[r['predictor']]} | {r['corr']:.3f} | {r['rel_err']:.3g} | {r['scale']:.3g} | "
              f"{r['rel_err_scaled']:.3f} | {r['batch_corr']:.3f} | {r['batch_rel_err']:.3g} |")


def plot(tab, lm, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.9))
    meas, pred = tab["scatter"]["pg"]
    ax = axes[0]
    ax.scatter(meas, pred, s=4, alpha=0.5)
    lim = [min(meas.min(), pred.min()).item(), max(meas.max(), pred.max()).item()]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set(xlabel="measured dH", ylabel="predicted dH (pg)", title=f"tabular, max|dz| = {args.moves[0]:g}")
    ax = axes[1]
    x = torch.tensor(args.moves)
    for kind, color in (("pg", "C0"), ("npg", "C1")):
        rows = [r for r in tab["rows"] if r["kind"] == kind]
        ax.loglog(x, [r["rms_err"] for r in rows], "o-", color=color, label=kind)
        ax.loglog(x, rows[0]["rms_err"] * (x / x[0]) ** 2, "k:", lw=0.8, label="slope 2" if kind == "pg" else None)
    ax.set_xticks(args.moves, [f"{m:g}" for m in args.moves])
    ax.minorticks_off()
    ax.set(xlabel="max |dz| of the step", ylabel="rms error of predicted dH", title="tabular: error vs step")
    ax.legend(fontsize=7)
    if lm is not None:
        ax = axes[2]
        s = lm["scatter"]
        c = next(r["scale"] for r in lm["rows"] if r["predictor"] == "pg")
        ax.scatter(s["measured"], c * s["pg"], s=3, alpha=0.4, color="C1", label=f"token-local pg x {c:.2g}")
        ax.scatter(s["measured"], s["jvp"], s=2, alpha=0.8, color="C0", label="exact first order (JVP)")
        lim = [s["measured"].min().item(), s["measured"].max().item()]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set(xlabel="measured dH per token", ylabel="predicted", title=f"tiny LM, lr = {args.lm_lrs[0]:g}")
        ax.legend(fontsize=7, markerscale=3)
        ax = axes[3]
        b = lm["batch"]
        for k, color in (("pg", "C1"), ("cov", "C2")):
            c = (b[k] @ b["measured"] / (b[k] @ b[k])).item()
            ax.scatter(b["measured"], c * b[k], s=12, color=color, label=f"{NAMES[k]} x {c:.2g}")
        lim = [b["measured"].min().item(), b["measured"].max().item()]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set(xlabel="measured mean dH of a batch", ylabel="predicted (best scale)", title="tiny LM, batch means")
        ax.legend(fontsize=7)
    else:
        axes[2].axis("off")
        axes[3].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", "--quick", action="store_true", help="CI size")
    p.add_argument("--out", default=None, help="directory for entropy_dynamics.png / .json (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--states", type=int, default=512)
    p.add_argument("--vocab", type=int, default=2048, help="actions per state of the tabular policy")
    p.add_argument("--moves", type=float, nargs="+", default=[0.4, 0.2, 0.1], help="max |dz| of the steps")
    p.add_argument("--no-lm", action="store_true", help="skip the tiny LM (needs transformers)")
    p.add_argument("--lm-vocab", type=int, default=1024)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--trials", type=int, default=32, help="batches of responses (one step each)")
    p.add_argument("--batch", type=int, default=8, help="responses per batch")
    p.add_argument("--length", type=int, default=32, help="tokens per response")
    p.add_argument("--lm-lrs", type=float, nargs="+", default=[0.02, 0.01, 0.005])
    args = p.parse_args(argv)
    if args.small:
        args.states, args.vocab = 64, 1024
        args.pretrain_steps, args.trials, args.batch, args.length = 100, 8, 4, 16
    return args


def main(argv=None):
    args = parse_args(argv)
    # Small tensors: one thread avoids OpenMP overheads (and oversubscription on a shared machine).
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tab = tabular(args.states, args.vocab, args.moves, args.seed)
    print_tabular(tab, args)
    lm = None if args.no_lm else lm_study(args)
    if lm is not None:
        print_lm(lm, args)
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        plot(tab, lm, args, os.path.join(args.out, "entropy_dynamics.png"))
        with open(os.path.join(args.out, "entropy_dynamics.json"), "w") as f:
            json.dump({"args": vars(args), "tabular": tab["rows"], "lm": None if lm is None else lm["rows"]}, f,
                      indent=1)
    return {"tabular": tab["rows"], "lm": None if lm is None else lm["rows"]}


if __name__ == "__main__":
    main()
