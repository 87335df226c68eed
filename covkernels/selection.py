"""Covariance scores and the Clip-Cov / KL-Cov token selections (docs/selection.md), free of host syncs.

All work is on [B, T] vectors in torch: the counts and n stay tensors, and a selection is "rank < n",
where ranks come from stable sorts, so no `.item()`, `nonzero` or boolean indexing is ever needed and
the same code runs eagerly, under torch.compile and under CUDA graphs. The rules match python_ref bit
for bit: same random keys, same tie-breaking (lower row-major index first).

With `process_group` (torch.distributed, data parallel) the statistics are those of the whole batch
held by all ranks together, rank r holding rows [r B, (r + 1) B) of a [world B, T] batch: every rank
must pass the same [B, T] shape (pad with masked rows). Means and N_valid come from one all-reduce of a
few float64 sums; the top-n from one all-gather of each rank's local top-n_max candidates, where
n_max = min(B T, max(1, floor(ratio world B T))) is known from the shapes alone, so nothing waits for
the host beyond the collectives themselves.

A ratio of 0 selects nothing (n = 0), so a schedule can anneal Clip-Cov / KL-Cov to exactly the plain
loss; n = max(1, floor(ratio N_valid)) holds for ratio > 0 only. verl asserts ratio > 0.
"""
import torch
import torch.distributed as dist

from ._validation import check_choice, check_nonnegative

CENTERINGS = ("batch", "state")


def _check_shape(name, x, ref_name, ref):
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def masked_sum(x, valid):
    return torch.where(valid, x, torch.zeros_like(x)).sum()


def masked_mean(x, valid):
    """Mean of x over valid entries as a 0-dim tensor; 0 when nothing is valid."""
    total = masked_sum(x, valid)
    return total / valid.sum().clamp(min=1).to(total.dtype)


def n_select(ratio, valid=None, *, count=None):
    """n = max(1, floor(ratio * N_valid)) as a 0-dim int64 tensor, in float64 like Python's int(r * n);
    n = 0 when ratio == 0 (a Python number, so the choice costs no sync). N_valid = valid.sum(), or
    `count` (a 0-dim tensor, e.g. the count over all ranks)."""
    count = valid.sum() if count is None else count
    return torch.floor(ratio * count.to(torch.float64)).clamp(min=1 if ratio > 0 else 0).to(torch.int64)


def _ranks(keys, eligible, descending):
    """Rank of each entry (0 = first) when eligible entries come first, ordered by key, ties by index."""
    flat = keys.reshape(-1)
    order = torch.sort(flat, descending=descending, stable=True).indices
    # A second stable sort moves ineligible entries behind every eligible one and keeps the key order.
    order = order[torch.sort((~eligible.reshape(-1))[order].to(torch.uint8), stable=True).indices]
    # The inverse permutation of `order`: ranks[order[i]] = i.
    ranks = torch.zeros_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return ranks.view(keys.shape), order


def sum_over_ranks(parts, group):
    """The 0-dim local values `parts` summed over the ranks of `group`: one all-reduce of a float64
    [len(parts)] buffer (float64 keeps token counts exact up to 2^53)."""
    buf = torch.stack([torch.as_tensor(p).to(torch.float64) for p in parts])
    dist.all_reduce(buf, group=group)
    return buf


def topn_bound(ratio, shape, world):
    """n_max: no rank can own more than this many of the n = max(1, floor(ratio N_valid)) selected tokens,
    since N_valid <= world * numel (equal shapes on every rank). A Python int, from shapes only; at
    least 1 even for ratio 0 (n = 0 then), so every call makes the same collectives whatever the ratio."""
    numel = torch.Size(shape).numel()
    # The same product as n_select, ratio * (world * numel): (ratio * world) * numel can round one lower.
    return min(numel, max(1, int(ratio * (world * numel))))


def _all_gather(out, inp, group):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def topn_over_ranks(keys, eligible, n, *, descending, n_max, group):
    """This rank's part of the n first eligible entries of all ranks (bool, keys' shape).

    Order: by key (largest first when `descending`), equal keys by (rank, flat index), ineligible last.
    Each rank sends its n_max first entries in that order as a float64 [2, n_max] buffer (key, 1 for an
    ineligible entry): one all-gather. A stable sort of the gathered keys, which arrive in (rank, local
    order), reproduces the order of the whole batch exactly, so every rank agrees on the cut.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    flat_elig = eligible.reshape(-1)
    if flat_elig.numel() == 0:
        return torch.zeros_like(eligible, dtype=torch.bool)
    _, order = _ranks(keys, eligible, descending)
    top = order[:n_max]
    mine = torch.stack([keys.reshape(-1)[top].to(torch.float64), (~flat_elig[top]).to(torch.float64)])
    everyone = mine.new_zeros((world * 2, top.numel()))  # concatenated along dim 0
    _all_gather(everyone, mine, group)
    everyone = everyone.view(world, 2, -1)
    g_ineligible = everyone[:, 1].reshape(-1) != 0
    g_ranks, _ = _ranks(everyone[:, 0].reshape(-1), ~g_ineligible, descending)
    chosen = ((g_ranks < n) & ~g_ineligible).view(world, -1)[rank]
    selected = torch.zeros_like(flat_elig).scatter_(0, top, chosen)
    return (selected & flat_elig).view(eligible.shape)


def scores_from_means(logp, adv, valid, centering, entropy, means):
    """C [B, T] from detached inputs; `means` = (mean l, mean A) for centering="batch"."""
    if centering == "batch":
        cov = (logp - means[0]) * (adv - means[1])
    else:
        cov = (logp + entropy) * adv
    return torch.where(valid, cov, torch.zeros_like(cov))


def means_from_sums(sums, dtype):
    """(mean l, mean A) from float64 [sum l, sum A, N_valid, ...] over all ranks."""
    count = sums[2].clamp(min=1)
    return (sums[0] / count).to(dtype), (sums[1] / count).to(dtype)


def cov_scores(logp, advantages, response_mask, *, centering="batch", entropy=None, process_group=None):
    """Per-token covariance score C [B, T] (detached; 0 at invalid tokens).

    centering="batch" (verl-compatible): C_i = (l_i - mean l)(A_i - mean A), masked means over the valid
        tokens of this call, or of all ranks of `process_group`. centering="state" (Baehr & Lei):
        C_i = (l_i + H_i) A_i, which needs `entropy` and no global statistic.
    logp, advantages, entropy: [B, T] float; response_mask: [B, T] bool or 0/1.
    Collectives with process_group: batch centering, one all-reduce of 3 float64; state, none.
    """
    check_choice("centering", centering, CENTERINGS)
    _check_shape("advantages", advantages, "logp", logp)
    _check_shape("response_mask", response_mask, "logp", logp)
    valid = response_mask != 0
    logp, adv = logp.detach(), advantages.detach()
    means = None
    if centering == "batch":
        if process_group is None:
            means = masked_mean(logp, valid), masked_mean(adv, valid)
        else:
            f64 = torch.float64
            sums = sum_over_ranks([masked_sum(logp.to(f64), valid), masked_sum(adv.to(f64), valid), valid.sum()],
                                  process_group)
            means = means_from_sums(sums, torch.promote_types(logp.dtype, adv.dtype))
    else:
        if entropy is None:
            raise ValueError("entropy must be given for centering='state', got None")
        _check_shape("entropy", entropy, "logp", logp)
        entropy = entropy.detach()
    return scores_from_means(logp, adv, valid, centering, entropy, means)


def clip_cov_keys(shape, generator, device, group=None):
    """The Clip-Cov random keys of this call: torch.rand(shape, float32) from `generator`. With a group,
    every rank draws the keys of the whole [world * B, T] batch, torch.rand((world, B, T)) (the numbers
    torch.rand((world * B, T)) gives one process), and keeps slice [rank]; the generator advances as one
    process's would. Seeded alike on every rank, the subset is the one-process subset; seeded apart it is
    still a uniform subset that all ranks agree on (each rank's keys travel in the gather)."""
    if group is None:
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    world = dist.get_world_size(group)
    keys = torch.rand((world, *shape), generator=generator, device=device, dtype=torch.float32)
    return keys[dist.get_rank(group)]


def clip_cov_candidates(scores, valid, clipped, lb, ub):
    candidates = valid & (scores > lb) & (scores < ub)
    if clipped is not None:
        candidates = candidates & ~clipped.bool()
    return candidates


def select_top(keys, eligible, n, *, descending, ratio, group):
    """The n first eligible entries by key, ties by flat index: of this call, or of all ranks of group."""
    if group is None:
        return eligible & (_ranks(keys, eligible, descending)[0] < n)
    n_max = topn_bound(ratio, keys.shape, dist.get_world_size(group))
    return topn_over_ranks(keys, eligible, n, descending=descending, n_max=n_max, group=group)


def _n_valid(valid, group):
    return valid.sum() if group is None else sum_over_ranks([valid.sum()], group)[0]


def clip_cov_select(scores, response_mask, *, ratio=2e-4, lb=1.0, ub=5.0, clipped=None, generator=None,
                    process_group=None):
    """Clip-Cov: bool [B, T], the tokens whose loss and gradient are dropped.

    Candidates: valid, not PPO-clipped (`clipped`, bool [B, T]) and lb < C < ub (strict). Of them, the
    n = max(1, floor(ratio * N_valid)) with the smallest keys (none at ratio 0)
    `torch.rand(response_mask.shape, generator=generator, device=scores.device, dtype=torch.float32)`
    (drawn once per call, always), equal keys by lower flat index; all candidates if fewer than n.
    With process_group: N_valid and the n are over all ranks, and the keys are those of the whole
    [world B, T] batch (see `clip_cov_keys`); one all-reduce of 1 float64 and one all-gather of
    2 * n_max float64 per rank (`topn_bound`).
    """
    _check_shape("response_mask", response_mask, "scores", scores)
    check_nonnegative("clip_cov_ratio", ratio)
    if not lb < ub:
        raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got clip_cov_lb={lb}, clip_cov_ub={ub}")
    if clipped is not None:
        _check_shape("clipped", clipped, "scores", scores)
    keys = clip_cov_keys(response_mask.shape, generator, scores.device, process_group)
    valid = response_mask != 0
    candidates = clip_cov_candidates(scores, valid, clipped, lb, ub)
    n = n_select(ratio, count=_n_valid(valid, process_group))
    return select_top(keys, candidates, n, descending=False, ratio=ratio, group=process_group)


def kl_cov_select(scores, response_mask, *, ratio=2e-4, process_group=None):
    """KL-Cov: bool [B, T], the n = max(1, floor(ratio * N_valid)) valid tokens with the largest signed
    score, equal scores at the cut by lower flat index; nothing when no token is valid or ratio is 0.
    With process_group: over all ranks, ties by (rank, flat index); one all-reduce of 1 float64 and one
    all-gather of 2 * n_max float64 per rank (`topn_bound`)."""
    _check_shape("response_mask", response_mask, "scores", scores)
    check_nonnegative("kl_cov_ratio", ratio)
    valid = response_mask != 0
    n = n_select(ratio, count=_n_valid(valid, process_group))
    return select_top(scores, valid, n, descending=True, ratio=ratio, group=process_group)


def loss_selection(logp, advantages, entropy, valid, clipped, config, *, generator, process_group):
    """(scores, selected, counts) of a loss call (covkernels.losses), sharing one all-reduce among the means,
    N_valid and the aggregation denominators. logp, advantages, entropy: [B, T] in the loss dtype;
    clipped: the PPO-clipped tokens; config: the call's LossConfig (method, centering, the Clip-Cov and
    KL-Cov fields, validate). counts: None, or with a process group the float64
    [sum l, sum A, N_valid, N_seqs, numel, numel^2] over all ranks."""
    method, centering = config.method, config.centering
    counts = None
    if process_group is None:
        scores = cov_scores(logp, advantages, valid, centering=centering, entropy=entropy)
        n_valid = valid.sum()
    else:
        logp, adv = logp.detach(), advantages.detach()
        numel = torch.tensor(float(valid.numel()), dtype=torch.float64, device=valid.device)
        f64 = torch.float64
        counts = sum_over_ranks([masked_sum(logp.to(f64), valid), masked_sum(adv.to(f64), valid), valid.sum(),
                                 valid.any(-1).sum(), numel, numel * numel], process_group)
        if config.validate and not torch.compiler.is_compiling():
            # Equal [B, T] on every rank iff world * sum(numel^2) == sum(numel)^2; every rank sees the same
            # sums, so all raise together (one host sync, validate only).
            world = dist.get_world_size(process_group)
            if bool(world * counts[5] != counts[4] * counts[4]):
                raise ValueError("with process_group every rank must pass per-token inputs of the same [B, T] "
                                 "shape (pad with masked rows)")
        means = means_from_sums(counts, logp.dtype) if centering == "batch" else None
        scores = scores_from_means(logp, adv, valid, centering,
                                   None if entropy is None else entropy.detach(), means)
        n_valid = counts[2]
    if method == "kl_cov":
        ratio = config.kl_cov_ratio
        n = n_select(ratio, count=n_valid)
        selected = select_top(scores, valid, n, descending=True, ratio=ratio, group=process_group)
    elif method == "clip_cov":
        ratio = config.clip_cov_ratio
        keys = clip_cov_keys(valid.shape, generator, scores.device, process_group)
        candidates = clip_cov_candidates(scores, valid, clipped, config.clip_cov_lb, config.clip_cov_ub)
        n = n_select(ratio, count=n_valid)
        selected = select_top(keys, candidates, n, descending=False, ratio=ratio, group=process_group)
    else:
        selected = torch.zeros_like(valid)
    return scores, selected, counts
