"""covkernels.distributed in one process: micro-batch invariance with CovSelection, argument errors, the
Triton path of the vocabulary-parallel op (under the interpreter on the CPU), and groups of one rank."""
import itertools

import pytest
import torch

import covkernels as ck
from covkernels.distributed import CovSelection, vocab_parallel_logprobs_and_entropy, vocab_parallel_token_stats
from covkernels.ops.vocab_parallel import op as vp
from covkernels.ops.vocab_parallel import torch_path as vpt
from covkernels.ops.fused_pass.kernels import fused_fwd, fused_fwd_partials
from bench.tolerances import max_err

SELECTIVE = dict(clip_cov_ratio=0.1, clip_cov_lb=0.02, clip_cov_ub=3.0, kl_cov_ratio=0.1)


def make_minibatch(B=8, T=6, V=31, D=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype)
    head = torch.randn(V, D, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    old_logp = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=dtype), -1)
    old_logp = old_logp.gather(-1, targets[..., None]).squeeze(-1)
    advantages = torch.randn(B, T, generator=g, dtype=dtype) * 1.5
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[2] = False
    return hidden, head, targets, old_logp, advantages, mask


def accumulate(method, centering, n_micro, use_selection, dtype=torch.float64):
    """(head gradient accumulated over n_micro micro-batches, selected [B, T] or None, summed loss)."""
    hidden, head, targets, old_logp, advantages, mask = make_minibatch(dtype=dtype)
    B = hidden.shape[0]
    w = head.clone().requires_grad_()
    kw = dict(method=method, centering=centering, entropy_coef=0.01, **SELECTIVE)
    sel = None
    if use_selection:
        with torch.no_grad():  # the selection's log-probs: one no-grad forward at the start of the mini-batch
            logp, entropy = ck.logprobs_and_entropy(hidden @ w.T, torch.where(mask, targets, -100))
        sel = CovSelection.build(logp, old_logp, advantages, mask, method=method, centering=centering,
                                 entropy=entropy, generator=torch.Generator().manual_seed(1), **SELECTIVE)
    size = B // n_micro
    total, n_selected = 0.0, 0
    for i in range(0, B, size):
        rows = slice(i, i + size)
        extra = dict(selection=sel[rows]) if sel is not None else dict(
            num_tokens=mask.sum(), generator=torch.Generator().manual_seed(1))  # verl: per micro-batch selection
        loss, metrics = ck.policy_loss(hidden[rows] @ w.T, targets[rows], old_logp[rows], advantages[rows],
                                       mask[rows], **kw, **extra)
        loss.backward()
        total += loss.detach()
        n_selected += int(metrics["n_selected"])
    return w.grad, None if sel is None else sel.selected, total, n_selected


@pytest.mark.parametrize("centering", ["batch", "state"])
@pytest.mark.parametrize("method", ["ppo", "clip_cov", "kl_cov"])
def test_micro_batches_give_the_same_selection_and_gradient(method, centering):
    grad1, sel1, loss1, n1 = accumulate(method, centering, 1, True)
    for n_micro in (2, 4):
        grad, sel, loss, n = accumulate(method, centering, n_micro, True)
        assert torch.equal(sel, sel1) and n == n1
        assert max_err(grad, grad1) <= 1e-13 * (1 + grad1.abs().max().item())
        assert abs(loss - loss1) <= 1e-13 * (1 + abs(loss1))
    if method != "ppo":
        assert n1 >= 2


@pytest.mark.parametrize("method", ["clip_cov", "kl_cov"])
def test_one_micro_batch_with_a_selection_is_plain_policy_loss(method):
    """Built from the log-probs policy_loss computes itself, with the same generator: identical results."""
    hidden, head, targets, old_logp, advantages, mask = make_minibatch()
    logits = hidden @ head.T
    kw = dict(method=method, centering="state", **SELECTIVE)
    x = logits.clone().requires_grad_()
    plain, plain_m = ck.policy_loss(x, targets, old_logp, advantages, mask, generator=torch.Generator().manual_seed(2),
                                    **kw)
    (plain_grad,) = torch.autograd.grad(plain, x)
    logp, entropy = ck.logprobs_and_entropy(logits, torch.where(mask, targets, -100))
    sel = CovSelection.build(logp, old_logp, advantages, mask, entropy=entropy,
                             generator=torch.Generator().manual_seed(2), **kw)
    x = logits.clone().requires_grad_()
    loss, metrics = ck.policy_loss(x, targets, old_logp, advantages, mask, selection=sel, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == plain.item() and torch.equal(grad, plain_grad)
    assert all(torch.equal(metrics[k], plain_m[k]) for k in plain_m)


def test_verl_default_changes_with_the_micro_batch_size():
    """What CovSelection fixes: per-micro-batch selection (the default) depends on the split."""
    (grad1, _, _, n1), (grad4, _, _, n4) = (accumulate("kl_cov", "batch", n, False) for n in (1, 4))
    assert n1 != n4 and max_err(grad1, grad4) > 1e-6


def test_selection_slices_and_split():
    hidden, head, targets, old_logp, advantages, mask = make_minibatch()
    logp = ck.logprobs_and_entropy(hidden @ head.T, targets)[0]
    sel = CovSelection.build(logp, old_logp, advantages, mask, method="kl_cov", kl_cov_ratio=0.1)
    parts = sel.split(3)
    assert [p.selected.shape[0] for p in parts] == [3, 3, 2]
    assert torch.equal(torch.cat([p.selected for p in parts]), sel.selected)
    assert all(p.num_tokens == mask.sum() and p.num_seqs == mask.any(-1).sum() for p in parts)
    assert torch.equal(sel[2:5].scores, sel.scores[2:5])


def test_selection_argument_errors():
    hidden, head, targets, old_logp, advantages, mask = make_minibatch()
    logits = hidden @ head.T
    logp = ck.logprobs_and_entropy(logits, targets)[0]
    sel = CovSelection.build(logp, old_logp, advantages, mask, method="kl_cov")
    args = (logits, targets, old_logp, advantages, mask)
    with pytest.raises(ValueError, match="built for method='kl_cov'"):
        ck.policy_loss(*args, method="clip_cov", selection=sel)
    with pytest.raises(ValueError, match="slice it"):
        ck.policy_loss(logits[:2], targets[:2], old_logp[:2], advantages[:2], mask[:2], method="kl_cov", selection=sel)
    with pytest.raises(ValueError, match="process_group to CovSelection.build"):
        ck.token_loss(logp, old_logp, advantages, mask, method="kl_cov", selection=sel, process_group=object())
    with pytest.raises(ValueError, match="entropy must be given"):
        CovSelection.build(logp, old_logp, advantages, mask, method="kl_cov", centering="state")
    with pytest.raises(ValueError, match="method must be one of"):
        CovSelection.build(logp, old_logp, advantages, mask, method="kl")


def shards(dtype, cuts=(0, 11, 12, 40), seed=3):
    """[2, 5, 40] logits with -inf entries, a row whose middle shard (one column) is -inf, ignored rows."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, 5, cuts[-1], generator=g, dtype=torch.float64) * 4).to(dtype)
    logits[0, 1, 11] = float("-inf")
    logits[1, :, 20:25] = float("-inf")
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[1, 2] = 11
    targets[0, 3] = 30
    targets[:, 4] = -100
    return logits, targets, cuts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_partials_and_shard_backward_match_torch(dtype):
    logits, targets, cuts = shards(dtype)
    g_logp, g_ent = torch.randn(2, *targets.shape, generator=torch.Generator().manual_seed(4))
    _, ent, _, _, _, lse2 = fused_fwd(logits, targets, 0.7, -100, False)
    for start, stop in itertools.pairwise(cuts):
        x = logits[..., start:stop]
        got = fused_fwd_partials(x, targets, 0.7, -100, True)
        want = vpt.partials_torch(x, targets, 0.7, -100, True)
        assert torch.equal(got[0], want[0])  # the shard's reference, exactly
        assert max_err(got, want) <= 1e-6 * (1 + want[1:].abs().max().item())
        local_t = vpt.shard_targets(targets, start, stop - start, -100)
        out = torch.empty(x.shape, dtype=dtype)
        got = vp.fused_bwd(logits=x, targets=local_t, lse2=lse2, entropy=ent, grad_logp=g_logp, grad_entropy=g_ent,
                           inv_temp=0.7, ignore_index=-100, out=out, check_target=False)
        want = vpt.bwd_torch(x, local_t, lse2, ent, g_logp, g_ent, 0.7, -100)
        ulp = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
        assert max_err(got, want) <= ulp * (1 + want.abs().max().item())


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_shard_group_equals_token_stats(one_rank, dtype, impl):
    logits, targets, _ = shards(dtype)
    g_logp, g_ent = torch.randn(2, *targets.shape, generator=torch.Generator().manual_seed(5))
    out = []
    for fn, kw in ((ck.token_stats, {}), (vocab_parallel_token_stats, dict(vocab_start=0, vocab_group=one_rank))):
        x = logits.clone().requires_grad_()
        s = fn(x, targets, temperature=0.7, impl=impl, **kw)
        out.append((s, torch.autograd.grad((s.logp * g_logp + s.entropy * g_ent).sum(), x)[0]))
    (want, want_grad), (got, grad) = out
    for field in ("logp", "entropy", "lse", "p_target", "sum_p2", "sum_p2_logp"):
        w = getattr(want, field)
        assert max_err(getattr(got, field), w) <= 2e-6 * (1 + w.abs().max().item()), field
    ulp = 2**-8 if dtype == torch.bfloat16 else 1e-6
    assert max_err(grad, want_grad) <= ulp * (1 + want_grad.abs().max().item())
    logp, entropy = vocab_parallel_logprobs_and_entropy(logits, targets, vocab_start=0, vocab_group=one_rank,
                                                        temperature=0.7, impl=impl)
    assert max_err(logp, got.logp) <= 1e-6 and max_err(entropy, got.entropy) <= 1e-6


def test_vocab_parallel_argument_errors(one_rank):
    logits, targets, _ = shards(torch.float32)
    with pytest.raises(ValueError, match="vocab_start must be >= 0"):
        vocab_parallel_token_stats(logits, targets, vocab_start=-1, vocab_group=one_rank)
    with pytest.raises(TypeError, match="vocab_start must be an int"):
        vocab_parallel_token_stats(logits, targets, vocab_start=1.0, vocab_group=one_rank)
    with pytest.raises(ValueError, match="held by 0 vocabulary shards"):
        vocab_parallel_token_stats(logits, targets, vocab_start=5, vocab_group=one_rank)
    with pytest.raises(ValueError, match="targets must have shape"):
        vocab_parallel_token_stats(logits, targets[0], vocab_start=0, vocab_group=one_rank)


@pytest.mark.parametrize("method", ["ppo", "clip_cov", "kl_cov"])
def test_group_of_one_rank_is_the_local_loss(one_rank, method):
    hidden, head, targets, old_logp, advantages, mask = make_minibatch()
    logits = hidden @ head.T
    out = []
    for group in (None, one_rank):
        x = logits.clone().requires_grad_()
        loss, metrics = ck.policy_loss(x, targets, old_logp, advantages, mask, method=method, process_group=group,
                                       generator=torch.Generator().manual_seed(0), **SELECTIVE)
        out.append((loss, metrics, torch.autograd.grad(loss, x)[0]))
    (l0, m0, g0), (l1, m1, g1) = out
    assert torch.equal(g0, g1) and abs(l0.item() - l1.item()) <= 1e-14 and m0["n_selected"] == m1["n_selected"]


def test_topn_bound_never_below_n():
    """The bound is computed as n is, ratio * (world * numel): (ratio * world) * numel may round lower."""
    from covkernels.selection import topn_bound
    for ratio, world, numel in ((0.3, 3, 70), (0.002, 44, 2875), (0.1, 3, 10), (2e-4, 8, 5000)):
        n = max(1, int(ratio * (world * numel)))
        assert topn_bound(ratio, (numel,), world) >= min(n, numel)
