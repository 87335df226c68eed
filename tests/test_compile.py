"""torch.compile(fullgraph=True) traces through the fused pass (a torch custom op) without graph breaks."""
import pytest
import torch

import covkernels as ck
from helpers import make_logits, make_targets, upstream


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_compiled_matches_eager(backend, impl):
    logits = make_logits("bt", 8, 300, torch.bfloat16)
    targets = make_targets(logits)
    g_logp, g_ent = upstream(targets.shape)

    def loss(x):
        s = ck.token_stats(x, targets, temperature=0.8, validate=False, impl=impl)
        return (s.logp * g_logp + s.entropy * g_ent).sum() + s.sum_p2.sum(), s

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    results = []
    for fn in (loss, compiled):
        x = logits.clone().requires_grad_()
        value, s = fn(x)
        value.backward()
        results.append((value.detach(), [f.detach() for f in s[:6]], x.grad))
    # The op's outputs and the gradient, bit for bit; the loss around them is inductor's own arithmetic
    # (it may fuse the products into the sum and round once less than eager).
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert torch.equal(results[0][2], results[1][2])
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2**-20, atol=0)


def test_validation_inside_compile_does_not_break_the_graph():
    """validate=True (the default) skips its host-syncing data check while tracing."""
    logits = make_logits("flat", 4, 50, torch.float32)
    targets = make_targets(logits)
    torch._dynamo.reset()
    fn = torch.compile(lambda x: ck.logprobs_and_entropy(x, targets)[0].sum(), fullgraph=True,
                       backend="aot_eager")
    assert torch.isfinite(fn(logits))


def test_double_backward_raises_a_clear_error():
    x = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    logp, _ = ck.logprobs_and_entropy(x, torch.tensor([1, 2, 3]))
    (g,) = torch.autograd.grad(logp.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
