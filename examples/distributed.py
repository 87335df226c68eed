"""covkernels across processes: a KL-Cov step over data-parallel ranks and micro-batches, then log-probs
and entropy from vocabulary-sharded logits.

    torchrun --nproc_per_node=2 examples/distributed.py      # CPU (gloo) or one GPU per rank (nccl)

Part 1 (data parallel): each rank holds B sequences of a mini-batch of world * B. One CovSelection,
built from a no-grad forward at the start of the mini-batch, fixes the KL-Cov tokens over all ranks;
the micro-batch losses then accumulate, and DDP averages, exactly the gradient of one process holding
the whole mini-batch (checked on every rank). Part 2 (tensor parallel): the same ranks split the
vocabulary of the output head; log-probs and entropy of the sharded logits equal the unsharded ones.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist

import covkernels as ck
from covkernels.distributed import CovSelection, vocab_parallel_logprobs_and_entropy

B, T, D, V = 4, 16, 32, 1000  # sequences per rank, tokens, hidden size, vocabulary
MICRO_BATCH = 2
KL_COV = dict(method="kl_cov", kl_cov_ratio=0.05, ppo_kl_coef=1.0, loss_agg_mode="token-mean")


def whole_batch(world, device):
    """The mini-batch of every rank, drawn identically on all of them from one seed (a stand-in for
    rollouts: hidden states, sampled tokens, old log-probs, advantages, response mask)."""
    g = torch.Generator().manual_seed(0)
    n = world * B
    hidden = torch.randn(n, T, D, generator=g)
    targets = torch.randint(0, V, (n, T), generator=g)
    old_logp = -torch.rand(n, T, generator=g) * 8
    advantages = torch.randn(n, T, generator=g)
    mask = torch.rand(n, T, generator=g) > 0.1
    return [x.to(device) for x in (hidden, targets, old_logp, advantages, mask)]


def data_parallel_step(rank, world, device):
    torch.manual_seed(0)
    head = torch.nn.Linear(D, V, bias=False).to(device)
    reference = torch.nn.Linear(D, V, bias=False).to(device)
    reference.load_state_dict(head.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(head)
    hidden, targets, old_logp, advantages, mask = whole_batch(world, device)
    rows = slice(rank * B, (rank + 1) * B)
    h, t, old, adv, m = hidden[rows], targets[rows], old_logp[rows], advantages[rows], mask[rows]

    # The selection of the whole mini-batch of all ranks: one all-reduce and one small all-gather.
    with torch.no_grad():
        logp, _ = ck.logprobs_and_entropy(ddp(h), torch.where(m, t, -100))
    selection = CovSelection.build(logp, old, adv, m, method="kl_cov", kl_cov_ratio=KL_COV["kl_cov_ratio"],
                                   process_group=dist.group.WORLD)
    n_selected = selection.selected.sum()
    dist.all_reduce(n_selected)

    # Micro-batches: no collective in the loss; DDP averages the gradient over ranks, so each rank's
    # share of the whole-batch loss is scaled by the world size.
    for i in range(0, B, MICRO_BATCH):
        mb = slice(i, i + MICRO_BATCH)
        last = i + MICRO_BATCH >= B  # DDP all-reduces the accumulated gradient after the last one
        with contextlib.nullcontext() if last else ddp.no_sync():
            loss, _ = ck.policy_loss(ddp(h[mb]), t[mb], old[mb], adv[mb], m[mb], selection=selection[mb], **KL_COV)
            (loss * world).backward()

    # One process holding the whole mini-batch, with verl's per-call selection over all of it.
    loss, metrics = ck.policy_loss(reference(hidden), targets, old_logp, advantages, mask, **KL_COV)
    loss.backward()
    err = (head.weight.grad - reference.weight.grad).abs().max().item()
    print(f"[rank {rank}] data parallel: {int(n_selected)} tokens selected over {world} ranks "
          f"(one process: {int(metrics['n_selected'])}), max gradient difference {err:.2e}")
    assert int(n_selected) == int(metrics["n_selected"]) and err < 1e-5


def vocab_parallel_step(rank, world, device):
    torch.manual_seed(1)
    hidden, targets, _, _, _ = whole_batch(world, device)
    weight = torch.randn(V, D, device=device) / D**0.5  # the full head; rank r keeps rows [start, stop)
    start, stop = rank * V // world, (rank + 1) * V // world
    shard = (hidden @ weight[start:stop].T).requires_grad_()  # [world B, T, V / world]
    logp, entropy = vocab_parallel_logprobs_and_entropy(shard, targets, vocab_start=start,
                                                        vocab_group=dist.group.WORLD, temperature=0.7)
    (logp.mean() + 0.01 * entropy.mean()).backward()  # gradient of this shard only, no collective

    full = (hidden @ weight.T).requires_grad_()
    want_logp, want_entropy = ck.logprobs_and_entropy(full, targets, temperature=0.7)
    (want_logp.mean() + 0.01 * want_entropy.mean()).backward()
    errs = [(logp - want_logp).abs().max(), (entropy - want_entropy).abs().max(),
            (shard.grad - full.grad[..., start:stop]).abs().max()]
    print(f"[rank {rank}] vocab parallel: columns [{start}, {stop}) of {V}; max difference to unsharded: "
          f"logp {errs[0]:.1e}, entropy {errs[1]:.1e}, gradient {errs[2]:.1e}")
    assert max(errs) < 1e-4


def main():
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=2))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if backend == "nccl" else torch.device("cpu")
    try:
        data_parallel_step(rank, world, device)
        vocab_parallel_step(rank, world, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
