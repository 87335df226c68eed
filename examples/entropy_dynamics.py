"""Predicted against measured entropy change after one policy-gradient step (docs/entropy_dynamics.md).

Part 1, tabular: a softmax policy whose parameters are the logits, a table of S states x V actions. One
token is sampled per state and gets an advantage A ~ N(0, 1); one step of the policy gradient (logit step
lr A (e_t - p)) or of the natural gradient (lr A e_t / p_t) is taken, and the entropy change of every state
is compared with covkernels.entropy_change (kind "pg" / "npg"). The prediction is first order, so its error
must shrink like the step squared: the table halves the step twice.

Part 2, a tiny causal LM (transformers LlamaConfig: 2 layers, V = 256, random weights, no download, float64),
trained briefly on a random sparse bigram chain so that its entropy (~2 nats) is that of a language model
rather than log V. Each trial samples a batch of responses (reward: the mean of a fixed random score of their
tokens; group-normalised advantages) and takes one SGD step on covkernels.policy_loss (on-policy PPO = the
token-mean policy gradient) from the same weights, at three step sizes. The logits of every response token
are computed before and after the step, on the trained batch and on a held-out batch of responses that the
step never saw, and covkernels.entropy_change_from_logits gives each token's measured entropy change and Cui
et al.'s Lemma 1 with the ACTUAL logit change, -Cov_p(log p, dz). Beside it, three heuristics that do not
see dz, each at its best scale, since on a network that shares its parameters between tokens they are off by
one to two orders of magnitude:
  - token-local pg (`entropy_change`, docs/entropy_dynamics.md#one-step-on-the-sampled-token): the tabular
    step lr / N on each token's own logits,
  - token-local npg, (l + H) A,
  - Cui et al.'s selection score for Clip-Cov / KL-Cov (their Eq. 10, as verl computes it),
    (l - mean l)(A - mean A), batch-centred.

    python examples/entropy_dynamics.py [--small] [--out DIR]
"""
import argparse
import json
import os
import time

import torch

from covkernels import (cov_scores, entropy_change, entropy_change_from_logits, logprobs_and_entropy, policy_loss,
                        token_stats)


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
    rows = []
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
    return {"rows": rows, "entropy": h0.mean().item(),
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


def sample_responses(model, chain, batch, prompt, length, g):
    """[batch, prompt + length] token ids: prompts from the chain, responses sampled from the model."""
    ids = sample_chain(chain, batch, prompt, g)
    with torch.no_grad():
        for _ in range(length):
            p = torch.softmax(model(ids).logits[:, -1], -1)
            ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
    return ids


def lm_trial(model, chain, score, args, g):
    """One batch of responses, one SGD step per lr from the same weights. Per response token of the trained
    batch and of a held-out batch: the measured entropy change, Lemma 1 with the actual dz, the heuristics."""
    from torch.func import functional_call

    prompt = 4
    ids = sample_responses(model, chain, args.batch, prompt, args.length, g)
    held = sample_responses(model, chain, args.batch, prompt, args.length, g)
    targets = ids[:, prompt:]
    reward = score[targets].mean(1)
    adv = ((reward - reward.mean()) / (reward.std() + 1e-6))[:, None].expand_as(targets).contiguous()
    mask = torch.ones_like(targets, dtype=torch.bool)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits_of(p, x):
        with torch.no_grad():
            return functional_call(model, p, (x,)).logits[:, prompt - 1:-1]

    before = {"trained": logits_of(params, ids), "held-out": logits_of(params, held)}
    stats = token_stats(before["trained"], targets)
    live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    # On-policy PPO (old_logp = logp, ratio 1, nothing clipped) is the token-mean policy gradient.
    logits = functional_call(model, live, (ids,)).logits[:, prompt - 1:-1]
    loss, _ = policy_loss(logits, targets, stats.logp.detach(), adv, mask)
    grads = dict(zip(live, torch.autograd.grad(loss, list(live.values()))))
    n = targets.numel()
    score_eq10 = cov_scores(stats.logp, adv, mask)  # (l - mean l)(A - mean A), batch-centred as verl
    out = []
    for lr in args.lm_lrs:
        stepped = {k: params[k] - lr * grads[k] for k in params}
        row = {"entropy": stats.entropy.mean().item()}
        for name, x in (("trained", ids), ("held-out", held)):
            change = entropy_change_from_logits(before[name], logits_of(stepped, x))
            row[name] = {"measured": change.actual.flatten(), "lemma1": change.predicted.flatten()}
        row["trained"].update(pg=entropy_change(stats, adv, kind="pg", lr=lr / n).flatten(),
                              npg=entropy_change(stats, adv, kind="npg", lr=lr / n).flatten(),
                              eq10=-(lr / n) * score_eq10.flatten())
        out.append(row)
    return out


def _fit(measured, predicted):
    """corr, scale c = argmin |measured - c predicted|, relative errors before and after scaling."""
    c = (predicted @ measured / (predicted @ predicted)).item()
    return {"corr": corr(measured, predicted), "scale": c, "rel_err": rel_err(measured, predicted),
            "rel_err_scaled": rel_err(measured, c * predicted)}


def lm_study(args):
    model, chain = tiny_lm(args.lm_vocab, args.pretrain_steps, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    score = torch.randn(args.lm_vocab, generator=g, dtype=torch.float64)
    trials = [lm_trial(model, chain, score, args, g) for _ in range(args.trials)]
    rows = []
    for i, lr in enumerate(args.lm_lrs):
        for states in ("trained", "held-out"):
            for k in PREDICTORS if states == "trained" else ("lemma1",):
                y = torch.cat([t[i][states]["measured"] for t in trials])
                x = torch.cat([t[i][states][k] for t in trials])
                means = [torch.stack([t[i][states][key].mean() for t in trials]) for key in ("measured", k)]
                rows.append({"lr": lr, "states": states, "predictor": k, **_fit(y, x),
                             "batch_corr": corr(*means)})
    # Per lr: {states: {"measured" / predictor: [all tokens of all trials]}}, for the figure.
    tokens = [{s: {k: torch.cat([t[i][s][k] for t in trials]) for k in trials[0][i][s]} for s in ("trained", "held-out")}
              for i in range(len(args.lm_lrs))]
    return {"rows": rows, "entropy": sum(t[0]["entropy"] for t in trials) / len(trials), "tokens": tokens}


PREDICTORS = ("lemma1", "pg", "npg", "eq10")
NAMES = {"lemma1": "Lemma 1 with the actual dz, -Cov(log p, dz)",
         "pg": "heuristic: token-local pg (entropy_change)",
         "npg": "heuristic: token-local npg, (l + H) A", "eq10": "heuristic: Eq. 10 score (l - l_bar)(A - A_bar)"}


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
          f"{args.batch} x {args.length} response tokens, one SGD step each from the same weights; held-out = "
          f"another batch of responses per trial, not in the loss. Scale c = the least-squares factor on the prediction.")
    print("| lr | states | predictor | corr. per token | scale c | rel. error | rel. error of c x pred | "
          "corr. of batch means |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        print(f"| {r['lr']:g} | {r['states']} | {NAMES[r['predictor']]} | {r['corr']:.5f} | {r['scale']:.4g} | "
              f"{r['rel_err']:.3g} | {r['rel_err_scaled']:.3f} | {r['batch_corr']:.3f} |")


def _identity(ax, x, y):
    lim = [min(x.min(), y.min()).item(), max(x.max(), y.max()).item()]
    ax.plot(lim, lim, "k--", lw=0.8)


def plot(tab, lm, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    if lm is not None:
        ax = axes[0]
        for states, color in (("trained", "C0"), ("held-out", "C1")):
            d = lm["tokens"][0][states]
            ax.scatter(d["measured"], d["lemma1"], s=3, alpha=0.5, color=color, label=f"{states} states")
            _identity(ax, d["measured"], d["lemma1"])
        ax.set(xlabel="measured dH per token", ylabel="-Cov(log p, dz), actual dz",
               title=f"tiny LM, Lemma 1, lr = {args.lm_lrs[0]:g}")
        ax.legend(fontsize=7, markerscale=3)
        ax = axes[1]
        for states, color in (("trained", "C0"), ("held-out", "C1")):
            errs = [r["rel_err"] for r in lm["rows"] if r["states"] == states and r["predictor"] == "lemma1"]
            ax.loglog(args.lm_lrs, errs, "o-", color=color, label=states)
        x = torch.tensor(args.lm_lrs)
        first = next(r["rel_err"] for r in lm["rows"] if r["predictor"] == "lemma1")
        ax.loglog(x, first * x / x[0], "k:", lw=0.8, label="slope 1")
        ax.set_xticks(args.lm_lrs, [f"{v:g}" for v in args.lm_lrs])
        ax.minorticks_off()
        ax.set(xlabel="lr", ylabel="relative error of Lemma 1", title="tiny LM: error vs step")
        ax.legend(fontsize=7)
        ax = axes[2]
        d = lm["tokens"][0]["trained"]
        for k, color in (("pg", "C2"), ("npg", "C3"), ("eq10", "C4")):
            c = next(r["scale"] for r in lm["rows"] if r["predictor"] == k)
            ax.scatter(d["measured"], c * d[k], s=3, alpha=0.4, color=color, label=f"{NAMES[k]} x {c:.3g}")
        _identity(ax, d["measured"], d["measured"])
        ax.set(xlabel="measured dH per token", ylabel="heuristic x best scale c",
               title="tiny LM, heuristics (no dz), trained states")
        ax.legend(fontsize=6, markerscale=3)
    else:
        axes[0].axis("off")
        axes[1].axis("off")
        axes[2].axis("off")
    ax = axes[3]
    x = torch.tensor(args.moves)
    for kind, color in (("pg", "C0"), ("npg", "C1")):
        rows = [r for r in tab["rows"] if r["kind"] == kind]
        ax.loglog(x, [r["rms_err"] for r in rows], "o-", color=color, label=kind)
        ax.loglog(x, rows[0]["rms_err"] * (x / x[0]) ** 2, "k:", lw=0.8, label="slope 2" if kind == "pg" else None)
    ax.set_xticks(args.moves, [f"{m:g}" for m in args.moves])
    ax.minorticks_off()
    ax.set(xlabel="max |dz| of the step", ylabel="rms error of predicted dH", title="tabular softmax: error vs step")
    ax.legend(fontsize=7)
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
    p.add_argument("--lm-vocab", type=int, default=256)
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
