"""A ratio of 0 selects no token (docs/selection.md#how-many-tokens): Clip-Cov and KL-Cov anneal to exactly
the plain loss, on every path (python_ref, the sync-free selection, policy_loss, torch.compile, schedules,
CovSelection, and data parallel over a spawned gloo group of two ranks). verl asserts ratio > 0 instead."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import covkernels as ck
import python_ref as ref
from covkernels import schedules
from covkernels.distributed import CovSelection
from test_policy_loss import make_batch, run
from test_policy_loss_contract import NoHostSync

# Scores inside Clip-Cov's (lb, ub) window at every valid token: any ratio > 0 selects at least one.
WINDOW = dict(lb=-100.0, ub=100.0)


def scores_and_mask(seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(5, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 9, generator=g) > 0.3
    return scores, mask


@pytest.mark.parametrize("lib", [ref, ck], ids=["python_ref", "covkernels"])
def test_selection_functions_select_nothing_at_ratio_zero(lib):
    scores, mask = scores_and_mask()
    for ratio, want in ((0.0, 0), (1e-9, 1), (0.25, int(0.25 * int(mask.sum())))):
        clip = lib.clip_cov_select(scores, mask, ratio=ratio, generator=torch.Generator().manual_seed(1), **WINDOW)
        assert int(clip.sum()) == want, ratio
        assert int(lib.kl_cov_select(scores, mask, ratio=ratio).sum()) == want, ratio


def test_sync_free_selection_at_ratio_zero():
    scores, mask = scores_and_mask(1)
    with NoHostSync():
        clip = ck.clip_cov_select(scores, mask, ratio=0.0, **WINDOW)
        kl = ck.kl_cov_select(scores, mask, ratio=0)
    assert not clip.any() and not kl.any()


def _no_selection_loss(method, batch):
    """What Clip-Cov / KL-Cov reduce to with nothing selected: PPO-clip without the dual clip, or -A rho."""
    logits, targets, old_logp, adv, mask = batch
    x = logits.clone().requires_grad_()
    logp, _ = ck.logprobs_and_entropy(x, targets)
    rho = (logp - old_logp).exp()
    loss_i = -adv * rho
    if method == "clip_cov":
        loss_i = torch.maximum(loss_i, -adv * rho.clamp(0.8, 1.2))
    loss = torch.where(mask, loss_i, 0.0).sum() / mask.sum()
    return loss.detach(), torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("lib", [ref, ck], ids=["python_ref", "covkernels"])
@pytest.mark.parametrize("method", ["clip_cov", "kl_cov"])
def test_policy_loss_at_ratio_zero_is_the_loss_without_selection(method, lib):
    batch = make_batch()
    loss, metrics, grad = run(lib, *batch, method=method, clip_cov_ratio=0.0, kl_cov_ratio=0.0,
                              clip_cov_lb=-100.0, clip_cov_ub=100.0, ppo_kl_coef=1.0)
    want_loss, want_grad = _no_selection_loss(method, batch)
    assert int(metrics["n_selected"]) == 0 and float(metrics["pg_clipfrac"]) == 0
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    # The same call with the smallest ratio > 0 does select (the test can fail).
    _, metrics, _ = run(lib, *batch, method=method, clip_cov_ratio=1e-9, kl_cov_ratio=1e-9, clip_cov_lb=-100.0,
                        clip_cov_ub=100.0, ppo_kl_coef=1.0)
    assert int(metrics["n_selected"]) == 1


@pytest.mark.parametrize("method", ["clip_cov", "kl_cov"])
def test_a_schedule_anneals_to_no_selection(method):
    batch = make_batch()
    ratio = schedules.linear(0.2, 0.0, steps=10)
    loss_fn = ck.PolicyLoss(method, clip_cov_ratio=ratio, kl_cov_ratio=ratio, clip_cov_lb=-100.0, clip_cov_ub=100.0)
    selected = [int(loss_fn(*batch, step=step, generator=torch.Generator().manual_seed(0))[1]["n_selected"])
                for step in (0, 9, 10, 20)]
    assert selected[0] > selected[1] > 0 and selected[2:] == [0, 0]


@pytest.mark.parametrize("method", ["clip_cov", "kl_cov"])
def test_compiled_loss_selects_nothing_at_ratio_zero(method):
    logits, *rest = make_batch()

    def step(x):
        loss, metrics = ck.policy_loss(x, *rest, method=method, clip_cov_ratio=0.0, kl_cov_ratio=0.0,
                                       clip_cov_lb=-100.0, clip_cov_ub=100.0, validate=False)
        return loss, metrics["n_selected"]

    torch._dynamo.reset()
    _, n = torch.compile(step, fullgraph=True, backend="aot_eager")(logits.clone().requires_grad_())
    assert int(n) == 0


@pytest.mark.parametrize("method", ["clip_cov", "kl_cov"])
def test_cov_selection_at_ratio_zero(method):
    logits, targets, old_logp, adv, mask = make_batch()
    logp, _ = ck.logprobs_and_entropy(logits, targets)
    sel = CovSelection.build(logp, old_logp, adv, mask, method=method, clip_cov_ratio=0.0, kl_cov_ratio=0.0,
                             clip_cov_lb=-100.0, clip_cov_ub=100.0)
    assert not sel.selected.any() and int(sel.num_tokens) == int(mask.sum())


# --- across ranks ---------------------------------------------------------------------------------------------

WORLD = 2


def _worker(rank, init_file, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        scores, mask = scores_and_mask(2)
        logits, targets, old_logp, adv, bmask = make_batch(B=2 * WORLD, seed=rank)
        rows = slice(rank * 2, (rank + 1) * 2)
        out = {}
        for ratio in (0.0, 0.1):
            out["clip", ratio] = int(ck.clip_cov_select(scores, mask, ratio=ratio, process_group=dist.group.WORLD,
                                                        **WINDOW).sum())
            out["kl", ratio] = int(ck.kl_cov_select(scores, mask, ratio=ratio, process_group=dist.group.WORLD).sum())
            for method in ("clip_cov", "kl_cov"):
                kw = dict(method=method, clip_cov_ratio=ratio, kl_cov_ratio=ratio, clip_cov_lb=-100.0,
                          clip_cov_ub=100.0)
                _, metrics = ck.policy_loss(logits[rows], targets[rows], old_logp[rows], adv[rows], bmask[rows],
                                            process_group=dist.group.WORLD, **kw)
                logp, _ = ck.logprobs_and_entropy(logits[rows], targets[rows])
                sel = CovSelection.build(logp, old_logp[rows], adv[rows], bmask[rows], process_group=dist.group.WORLD,
                                         **kw)
                out[method, ratio] = (int(metrics["n_selected"]), int(sel.selected.sum()))
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_together_select_nothing_at_ratio_zero(tmp_path, monkeypatch):
    # The children take the PyTorch path: the interpreter would only slow them down.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for key in results[0]:
        total = [sum(r[key][i] for r in results) for i in range(2)] if isinstance(results[0][key], tuple) else \
            [sum(r[key] for r in results)]
        if key[1] == 0.0:
            assert total == [0] * len(total), key
        else:
            assert min(total) >= 1, key
