"""Data and vocabulary parallelism on the CPU: gloo groups of 2 and 4 spawned processes.

Each world size is spawned once (a module fixture): its ranks run every scenario of `_worker` and save
what they computed beside what one process holding the whole batch computes from the same inputs, in
the same process with the same implementation; the tests compare the files. Children run the chunked
PyTorch path (TRITON_INTERPRET unset for them: the interpreter would take minutes here); the Triton path
of the vocabulary-parallel op is tested in one process in test_distributed_local.py.
"""
import contextlib
import datetime
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import covkernels as ck
import python_ref as ref
from covkernels.distributed import CovSelection, vocab_parallel_logprobs_and_entropy, vocab_parallel_token_stats
from test_policy_loss_contract import NoHostSync
from bench.tolerances import FP32_ACC, assert_close_to_ref, max_err

WORLDS = (2, 4)
METHODS = ["ppo", "clip_cov", "kl_cov"]
CENTERINGS = ["batch", "state"]
AGG_MODES = ["seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum"]
# Ratios that select a few tokens of a small batch; n_max = min(B T, floor(0.1 world B T)) < B T.
SELECTIVE = dict(clip_cov_ratio=0.1, clip_cov_lb=0.02, clip_cov_ub=3.0, kl_cov_ratio=0.1, entropy_coef=0.01)
B, T, V, D = 4, 7, 29, 5  # rows per rank, tokens, vocabulary, hidden size of the linear head


def make_batch(world, seed=0):
    """The whole batch [world B, T] of a step, float64, identical on every rank (rank r: rows [r B, (r+1) B))."""
    g = torch.Generator().manual_seed(seed)
    n = world * B
    hidden = torch.randn(n, T, D, generator=g, dtype=torch.float64)
    head = torch.randn(V, D, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (n, T), generator=g)
    old_logp = torch.log_softmax(torch.randn(n, T, V, generator=g, dtype=torch.float64), -1)
    old_logp = old_logp.gather(-1, targets[..., None]).squeeze(-1)
    advantages = torch.randn(n, T, generator=g, dtype=torch.float64) * 1.5
    mask = torch.rand(n, T, generator=g) > 0.2
    mask[1] = False  # a sequence with no valid token
    return hidden, head, targets, old_logp, advantages, mask


def vocab_inputs(world, dtype, seed=1):
    """Logits [world B, T, V] with -inf entries, a row whose second shard is all -inf, ignored rows; the
    uneven shard boundaries of the group."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.linspace(0, V, world + 1).round().long().tolist()
    cuts[1] -= 1  # uneven shards
    logits = (torch.randn(world * B, T, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    logits[0, 0, cuts[1]:cuts[2]] = float("-inf")
    logits[2, :, 3] = float("-inf")
    targets = torch.randint(0, cuts[1], (world * B, T), generator=g)  # held by shard 0, except:
    targets[1::2] = torch.randint(cuts[1], V, (world * B // 2, T), generator=g)
    targets[:, ::3] = -100
    g_logp, g_ent = torch.randn(2, world * B, T, generator=g)
    return logits, targets, cuts, g_logp, g_ent


@contextlib.contextmanager
def count_collectives(log):
    """Records (name, dtype, numel sent by this rank) of every torch.distributed collective call."""
    names = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather", "broadcast",
             "reduce_scatter_tensor", "all_to_all_single", "barrier")
    originals = {name: getattr(dist, name) for name in names if hasattr(dist, name)}

    def counted(name, fn):
        def call(*args, **kwargs):
            sent = args[1] if name.startswith("all_gather") and name != "all_gather" else args[0]
            log.append((name, str(sent.dtype), sent.numel()) if torch.is_tensor(sent) else (name, None, 0))
            return fn(*args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(dist, name, counted(name, fn))
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _loss_and_grads(logits, targets, old_logp, advantages, mask, **kw):
    x = logits.clone().requires_grad_()
    loss, metrics = ck.policy_loss(x, targets, old_logp, advantages, mask, **kw)
    loss.backward()
    return loss.detach(), metrics["n_selected"], x.grad


def _dp_scenarios(rank, world, group):
    hidden, head, targets, old_logp, advantages, mask = make_batch(world)
    rows = slice(rank * B, (rank + 1) * B)
    logits = hidden @ head.T
    out = {}
    cases = [(m, c, "token-mean") for m in METHODS for c in CENTERINGS] + [("kl_cov", "batch", a) for a in AGG_MODES]
    for method, centering, agg in cases:
        kw = dict(method=method, centering=centering, loss_agg_mode=agg, **SELECTIVE)
        g_whole, g_rank = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        whole = _loss_and_grads(logits, targets, old_logp, advantages, mask, generator=g_whole, **kw)
        mine = _loss_and_grads(logits[rows], targets[rows], old_logp[rows], advantages[rows], mask[rows],
                               generator=g_rank, process_group=group, **kw)
        next_draw = (torch.rand(1, generator=g_whole), torch.rand(1, generator=g_rank))
        logp, ent = ck.logprobs_and_entropy(logits, targets)
        sel_kw = dict(method=method, centering=centering, entropy=ent, clip_cov_ratio=0.1, clip_cov_lb=0.02,
                      clip_cov_ub=3.0, kl_cov_ratio=0.1)
        sel_whole = CovSelection.build(logp, old_logp, advantages, mask, generator=torch.Generator().manual_seed(3),
                                       **sel_kw)
        sel_kw["entropy"] = ent[rows]
        sel_rank = CovSelection.build(logp[rows], old_logp[rows], advantages[rows], mask[rows], process_group=group,
                                      generator=torch.Generator().manual_seed(3), **sel_kw)
        out[method, centering, agg] = dict(whole=whole, rank=mine, next_draw=next_draw, sel_whole=sel_whole,
                                           sel_rank=sel_rank)
    return out


def _selection_scenarios(rank, world, group):
    """The public selection functions on crafted scores: many ties across ranks, and every top score on
    one rank (the candidates bound n_max is then what limits the gather)."""
    g = torch.Generator().manual_seed(11)
    n = world * B
    mask = torch.rand(n, T, generator=g) > 0.1
    rows = slice(rank * B, (rank + 1) * B)
    out = {}
    tied = torch.randint(-2, 3, (n, T), generator=g).double()
    top_on_rank0 = torch.randn(n, T, generator=g, dtype=torch.float64)
    top_on_rank0[:B] += 10
    for name, scores in (("tied", tied), ("top_on_rank0", top_on_rank0)):
        for ratio in (0.05, 0.2):
            out[name, "kl", ratio] = (ck.kl_cov_select(scores, mask, ratio=ratio)[rows],
                                      ck.kl_cov_select(scores[rows], mask[rows], ratio=ratio, process_group=group))
            kw = dict(ratio=ratio, lb=-1.5, ub=2.5)
            out[name, "clip", ratio] = (
                ck.clip_cov_select(scores, mask, generator=torch.Generator().manual_seed(5), **kw)[rows],
                ck.clip_cov_select(scores[rows], mask[rows], generator=torch.Generator().manual_seed(5),
                                   process_group=group, **kw))
    logp, adv = torch.randn(2, n, T, generator=g, dtype=torch.float64)
    out["scores"] = (ck.cov_scores(logp, adv, mask)[rows],
                     ck.cov_scores(logp[rows], adv[rows], mask[rows], process_group=group))
    loss_mat = torch.randn(n, T, generator=g, dtype=torch.float64)
    for agg in ["token-mean"] + AGG_MODES:
        mine = ck.agg_loss(loss_mat[rows], mask[rows], agg, process_group=group)
        total = mine.clone()
        dist.all_reduce(total, group=group)
        out["agg", agg] = (ck.agg_loss(loss_mat, mask, agg), total)
    return out


def _micro_batch_scenarios(rank, world, group):
    """Each rank splits its rows into 1, 2 and 4 micro-batches under one CovSelection of the whole
    mini-batch of all ranks; the head's gradient, accumulated and summed over ranks, is recorded."""
    hidden, head, targets, old_logp, advantages, mask = make_batch(world, seed=4)
    rows = slice(rank * B, (rank + 1) * B)
    out = {}
    for method in ("clip_cov", "kl_cov"):
        kw = dict(method=method, **SELECTIVE)
        w = head.clone().requires_grad_()
        loss, _ = ck.policy_loss(hidden @ w.T, targets, old_logp, advantages, mask,
                                 generator=torch.Generator().manual_seed(9), **kw)
        loss.backward()
        out[method, "whole"] = w.grad
        h, t, old, adv, m = hidden[rows], targets[rows], old_logp[rows], advantages[rows], mask[rows]
        for n_micro in (1, 2, 4):
            w = head.clone().requires_grad_()
            with torch.no_grad():  # the selection's log-probs: a no-grad forward at the start of the mini-batch
                logp, _ = ck.logprobs_and_entropy(h @ w.T, t)
            sel = CovSelection.build(logp, old, adv, m, method=method, clip_cov_ratio=0.1, clip_cov_lb=0.02,
                                     clip_cov_ub=3.0, kl_cov_ratio=0.1, process_group=group,
                                     generator=torch.Generator().manual_seed(9))
            size = B // n_micro
            for i, part in zip(range(0, B, size), sel.split(size)):
                mb = slice(i, i + size)
                loss, _ = ck.policy_loss(h[mb] @ w.T, t[mb], old[mb], adv[mb], m[mb], selection=part, **kw)
                loss.backward()
            dist.all_reduce(w.grad, group=group)
            out[method, n_micro] = (w.grad, sel.selected)
    return out


def _vocab_scenarios(rank, world, group):
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits, targets, cuts, g_logp, g_ent = vocab_inputs(world, dtype)
        results = []
        for shard, fn, kw in ((logits, ck.token_stats, {}),
                              (logits[..., cuts[rank]:cuts[rank + 1]], vocab_parallel_token_stats,
                               dict(vocab_start=cuts[rank], vocab_group=group))):
            x = shard.clone().requires_grad_()
            s = fn(x, targets, temperature=0.7, **kw)
            (s.logp * g_logp + s.entropy * g_ent).sum().backward()
            results.append((s, x.grad))
        x = logits[..., cuts[rank]:cuts[rank + 1]].clone()
        pair = vocab_parallel_logprobs_and_entropy(x, targets, vocab_start=cuts[rank], vocab_group=group,
                                                   temperature=0.7)
        out[dtype] = dict(whole=results[0], shard=results[1], pair=pair)
    return out


def _collective_scenarios(rank, world, group):
    """What each call sends: {call: [(collective, dtype, numel), ...]} on this rank."""
    hidden, head, targets, old_logp, advantages, mask = make_batch(world)
    rows = slice(rank * B, (rank + 1) * B)
    logits = (hidden @ head.T)[rows]
    t, old, adv, m = targets[rows], old_logp[rows], advantages[rows], mask[rows]
    logs = {}

    def record(name, fn):
        with count_collectives(logs.setdefault(name, [])):
            fn()

    for method in METHODS:
        record(method, lambda method=method: ck.policy_loss(logits.clone().requires_grad_(), t, old, adv, m,
                                                            method=method, process_group=group,
                                                            **SELECTIVE)[0].backward())
    logp = ck.logprobs_and_entropy(logits, t)[0]
    sel = CovSelection.build(logp, old, adv, m, method="kl_cov", kl_cov_ratio=0.1, process_group=group)
    record("build", lambda: CovSelection.build(logp, old, adv, m, method="kl_cov", kl_cov_ratio=0.1,
                                               process_group=group))
    record("with_selection", lambda: ck.policy_loss(logits.clone().requires_grad_(), t, old, adv, m,
                                                    method="kl_cov", selection=sel)[0].backward())
    record("cov_scores_batch", lambda: ck.cov_scores(logp, adv, m, process_group=group))
    record("cov_scores_state", lambda: ck.cov_scores(logp, adv, m, centering="state", entropy=logp.neg(),
                                                     process_group=group))
    record("kl_cov_select", lambda: ck.kl_cov_select(adv, m, ratio=0.1, process_group=group))
    record("clip_cov_select", lambda: ck.clip_cov_select(adv, m, ratio=0.1, lb=-9.0, process_group=group))
    for agg in ("token-mean", "token-sum"):
        record(agg, lambda agg=agg: ck.agg_loss(adv, m, agg, process_group=group))
    # Vocabulary parallel: every rank holds all rows and the columns [start, stop) of the fp32 logits.
    start, stop = rank * V // world, (rank + 1) * V // world
    x = (hidden @ head.T)[..., start:stop].float().requires_grad_()
    record("vocab_forward", lambda: vocab_parallel_token_stats(x, targets, vocab_start=start, vocab_group=group))
    record("vocab_forward_pair", lambda: vocab_parallel_logprobs_and_entropy(x, targets, vocab_start=start,
                                                                             vocab_group=group))
    s = vocab_parallel_token_stats(x, targets, vocab_start=start, vocab_group=group)
    record("vocab_backward", lambda: (s.logp.sum() + s.entropy.sum()).backward())
    return logs


def _check_scenarios(rank, world, group):
    """Host syncs on the DP paths (none with validate=False), and the errors every rank raises together."""
    hidden, head, targets, old_logp, advantages, mask = make_batch(world)
    rows = slice(rank * B, (rank + 1) * B)
    logits = (hidden @ head.T)[rows]
    out = {}
    for method in METHODS:
        try:
            with NoHostSync():
                x = logits.clone().requires_grad_()
                ck.policy_loss(x, targets[rows], old_logp[rows], advantages[rows], mask[rows], method=method,
                               process_group=group, validate=False, **SELECTIVE)[0].backward()
                start, stop = rank * V // world, (rank + 1) * V // world
                shard = (hidden @ head.T)[..., start:stop].requires_grad_()
                logp, ent = vocab_parallel_logprobs_and_entropy(shard, targets, vocab_start=start, vocab_group=group,
                                                                validate=False)
                (logp + ent).sum().backward()
            out["sync", method] = None
        except AssertionError as e:
            out["sync", method] = str(e)
    extra = slice(0, B + 1) if rank == 0 else rows  # rank 0 holds one row more than the others
    try:
        ck.policy_loss(logits[:1].expand(extra.stop - extra.start, -1, -1), targets[extra], old_logp[extra],
                       advantages[extra], mask[extra], method="kl_cov", process_group=group)
        out["unequal"] = None
    except ValueError as e:
        out["unequal"] = str(e)
    bad = targets.clone()
    bad[0, 0] = world * V + 3  # no shard holds it
    try:
        vocab_parallel_logprobs_and_entropy(hidden @ head.T, bad, vocab_start=rank * V, vocab_group=group)
        out["bad_target"] = None
    except ValueError as e:
        out["bad_target"] = str(e)
    return out


def _worker(rank, world, init_file, outdir):
    torch.set_num_threads(1)  # world processes share two cores
    # A timeout turns a collective that some rank never joins into an error instead of a hang.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        group = dist.new_group(list(range(world)))  # a group other than the default one
        out = {name: fn(rank, world, group) for name, fn in (
            ("dp", _dp_scenarios), ("selection", _selection_scenarios), ("micro", _micro_batch_scenarios),
            ("vocab", _vocab_scenarios), ("collectives", _collective_scenarios), ("checks", _check_scenarios))}
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def spawned(request, tmp_path_factory):
    """[result of rank r] for a gloo group of `world` spawned CPU processes."""
    world = request.param
    outdir = tmp_path_factory.mktemp(f"world{world}")
    saved = os.environ.get("TRITON_INTERPRET")
    # Children inherit the environment, and read it when they import covkernels.
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        mp.spawn(_worker, args=(world, str(outdir / "init"), str(outdir)), nprocs=world)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return world, [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_dp_policy_loss_equals_one_process_holding_the_whole_batch(spawned):
    _, results = spawned
    for case in results[0]["dp"]:
        per_rank = [r["dp"][case] for r in results]
        whole_loss, whole_n, whole_grad = per_rank[0]["whole"]
        # Gradients and selections are exact; the loss is the sum of the ranks' shares (rounding only).
        assert torch.equal(torch.cat([p["rank"][2] for p in per_rank]), whole_grad), case
        assert sum(p["rank"][1] for p in per_rank) == whole_n, case
        assert abs(sum(p["rank"][0] for p in per_rank) - whole_loss) <= 1e-13 * (1 + abs(whole_loss)), case
        sel_whole = per_rank[0]["sel_whole"]
        assert torch.equal(torch.cat([p["sel_rank"].selected for p in per_rank]), sel_whole.selected), case
        assert all(p["sel_rank"].num_tokens == sel_whole.num_tokens for p in per_rank), case
        assert max_err(torch.cat([p["sel_rank"].scores for p in per_rank]), sel_whole.scores) <= 1e-14, case
        # Every rank's generator advanced as the whole batch's did (the keys of all ranks were drawn).
        assert all(torch.equal(*p["next_draw"]) for p in per_rank), case
        assert case[0] == "ppo" or whole_n >= 2, case


def test_dp_selections_span_ranks(spawned):
    """The scenarios do exercise cross-rank selections: some select tokens on two ranks or more."""
    _, results = spawned
    for method in ("clip_cov", "kl_cov"):
        spans = [sum(int(r["dp"][case]["rank"][1] > 0) for r in results) for case in results[0]["dp"]
                 if case[0] == method]
        assert max(spans) >= 2, (method, spans)


def test_dp_selection_functions_break_ties_by_rank_then_position(spawned):
    _, results = spawned
    for key in results[0]["selection"]:
        if key[0] in ("tied", "top_on_rank0"):
            whole = torch.cat([r["selection"][key][0] for r in results])
            mine = torch.cat([r["selection"][key][1] for r in results])
            assert torch.equal(mine, whole), key
            assert whole.any(), key
    assert not any(r["selection"]["top_on_rank0", "kl", 0.05][1].any() for r in results[1:])


def test_dp_scores_and_agg_loss_are_global(spawned):
    _, results = spawned
    whole = torch.cat([r["selection"]["scores"][0] for r in results])
    assert max_err(torch.cat([r["selection"]["scores"][1] for r in results]), whole) <= 1e-14
    for key, (single, total) in results[0]["selection"].items():
        if key[0] == "agg":
            assert abs(total.item() - single.item()) <= 1e-13 * (1 + abs(single.item())), key


def test_micro_batches_and_ranks_accumulate_the_one_batch_gradient(spawned):
    _, results = spawned
    for method in ("clip_cov", "kl_cov"):
        whole = results[0]["micro"][method, "whole"]
        selected = [torch.cat([r["micro"][method, n][1] for r in results]) for n in (1, 2, 4)]
        assert selected[0].sum() >= 2 and all(torch.equal(s, selected[0]) for s in selected)
        for n in (1, 2, 4):
            grad = results[0]["micro"][method, n][0]
            assert max_err(grad, whole) <= 1e-13 * (1 + whole.abs().max().item()), (method, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vocab_parallel_equals_unsharded(spawned, dtype):
    world, results = spawned
    logits, targets, _, g_logp, g_ent = vocab_inputs(world, dtype)
    x64 = logits.double().requires_grad_()
    xlo = logits.clone().requires_grad_()
    truth, lowp = (ref.token_stats(x, targets, temperature=0.7) for x in (x64, xlo))
    grads = [torch.autograd.grad((s.logp * g_logp + s.entropy * g_ent).sum(), x)[0]
             for s, x in ((truth, x64), (lowp, xlo))]
    grad = torch.cat([r["vocab"][dtype]["shard"][1] for r in results], dim=-1)
    whole_stats, whole_grad = results[0]["vocab"][dtype]["whole"]
    for r in results:
        stats = r["vocab"][dtype]["shard"][0]
        for field in ("logp", "entropy", "lse", "p_target", "sum_p2", "sum_p2_logp"):
            got, unsharded = getattr(stats, field), getattr(whole_stats, field)
            assert max_err(got, unsharded) <= FP32_ACC * (1 + unsharded.abs().max().item()), field
            assert_close_to_ref(got, getattr(truth, field), getattr(lowp, field), dtype, "fwd", field)
        # The same numbers up to the order in which gloo adds the ranks' sums (it depends on the buffer size).
        for got, want in zip(r["vocab"][dtype]["pair"], (stats.logp, stats.entropy)):
            assert max_err(got, want) <= 1e-6 * (1 + want.abs().max().item())
    assert_close_to_ref(grad, grads[0], grads[1], dtype, "bwd", "grad")
    bound = (2**-8 if dtype == torch.bfloat16 else 1e-6) * (1 + whole_grad.abs().max().item())
    assert max_err(grad, whole_grad) <= bound
    assert (grad[targets == -100] == 0).all()


def test_collectives_per_call(spawned):
    world, results = spawned
    f64 = "torch.float64"
    n_max = min(B * T, int(0.1 * world * B * T))
    gather = ("all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor", f64, 2 * n_max)
    reduce6 = ("all_reduce", f64, 6)
    expect = {
        "ppo": [reduce6], "clip_cov": [reduce6, gather], "kl_cov": [reduce6, gather], "build": [reduce6, gather],
        "with_selection": [], "cov_scores_batch": [("all_reduce", f64, 3)], "cov_scores_state": [],
        "kl_cov_select": [("all_reduce", f64, 1), gather], "clip_cov_select": [("all_reduce", f64, 1), gather],
        "token-mean": [("all_reduce", f64, 2)], "token-sum": [],
        "vocab_forward": [("all_reduce", "torch.float32", world * B * T),
                          ("all_reduce", "torch.float32", 6 * world * B * T)],
        "vocab_forward_pair": [("all_reduce", "torch.float32", world * B * T),
                               ("all_reduce", "torch.float32", 4 * world * B * T)],
        "vocab_backward": [],
    }
    for r in results:
        assert r["collectives"] == expect


def test_no_host_sync_and_errors_raised_on_every_rank(spawned):
    _, results = spawned
    for r in results:
        assert all(r["checks"]["sync", m] is None for m in METHODS), r["checks"]
        assert "same [B, T] shape" in r["checks"]["unequal"]
        assert "exactly 1" in r["checks"]["bad_target"]


def test_torchrun_example_runs_on_the_cpu():
    """examples/distributed.py under torchrun with two gloo ranks (it checks its own results)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(root, "examples", "distributed.py")]
    # A session of its own, so that a hang kills torchrun's workers too.
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    assert out.count("data parallel:") == 2 and out.count("vocab parallel:") == 2, out[-4000:]
