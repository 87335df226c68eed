"""The chunked PyTorch path (impl="torch"): the temperature costs no accuracy, big logits run through
torch.compile with the same results and without recompiling for new shapes, and a failing compiler falls
back to the eager code. `compiled` (a fixture) makes every block compile, however small."""
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import covkernels as ck
import python_ref as ref
from covkernels.ops.common import compiled as C
from helpers import LAYOUTS, make_logits, make_targets, upstream
from bench.tolerances import assert_close_to_ref, max_err

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setattr(C, "MIN_ELEMS", 0)
    monkeypatch.setattr(C, "_failed", [])


def check(logits, targets, temperature, clamp_fraction=None, inplace=False):
    """The torch path against python_ref in float64 with the tolerance rule: every field, and the gradient
    of a random combination of logp, entropy (and the clamped entropy)."""
    dtype = logits.dtype
    fields = ("logp", "entropy") + (("clamped_entropy",) if clamp_fraction is not None else ())
    ups = upstream(targets.shape) + upstream(targets.shape, seed=9)[:1]
    out = []
    for fn, x in ((ck.token_stats, logits.clone()), (ref.token_stats, logits.double()),
                  (ref.token_stats, logits.clone())):
        leaf = x.requires_grad_()
        # A non-leaf for the in-place backward (it writes into the storage of its input).
        x = leaf * 1.0 if inplace and fn is ck.token_stats else leaf
        kw = dict(impl="torch") if fn is ck.token_stats else {}
        if inplace and fn is ck.token_stats:
            logp, ent = ck.logprobs_and_entropy(x, targets, temperature=temperature, inplace_backward=True,
                                                impl="torch")
            s = ref.TokenStats(logp, ent, *(torch.zeros_like(logp) for _ in range(4)))
        else:
            s = fn(x, targets, temperature=temperature, clamp_fraction=clamp_fraction, **kw)
        loss = sum((getattr(s, f) * u).sum() for f, u in zip(fields, ups))
        out.append((s, torch.autograd.grad(loss, leaf)[0]))
    (s, grad), (t, g64), (lo, glo) = out
    for f in (fields if inplace else s._fields[:6] + fields[2:]):
        assert_close_to_ref(getattr(s, f), getattr(t, f), getattr(lo, f), dtype, "fwd", f)
    assert_close_to_ref(grad, g64, glo, dtype, "bwd", "grad")
    return s, grad


@pytest.mark.parametrize("clamp_fraction", [None, 0.3])
@pytest.mark.parametrize("use_compile", [False, True], ids=["eager", "compiled"])
def test_temperature_costs_no_accuracy_with_large_logits(use_compile, clamp_fraction, request):
    """fp32 logits ~1e3 (and ~-1e3) at T = 1.388: within the tolerance rule, and more: each logit is scaled
    relative to its row max, so the errors stay at fp32-accumulation level, 1e-6 (1 + max |reference|), as
    for logits near 0. Plain PyTorch's x / T, or a product of the raw logits with fp32(1/T), loses about
    half an ulp of 1e3 / T (3e-5) in every logit and misses that bound by an order of magnitude."""
    if use_compile:
        request.getfixturevalue("compiled")
    g = torch.Generator().manual_seed(0)
    logits = 1e3 + torch.randn(8, 1044, generator=g, dtype=torch.float64) * 4
    logits[1] -= 2e3
    logits = logits.float()
    targets = make_targets(logits, ignore_every=4)
    s, grad = check(logits, targets, 1.388, clamp_fraction)
    x64 = logits.double().requires_grad_()
    want = ref.token_stats(x64, targets, temperature=1.388, clamp_fraction=clamp_fraction)
    fields = ("logp", "entropy") + (("clamped_entropy",) if clamp_fraction is not None else ())
    ups = upstream(targets.shape) + upstream(targets.shape, seed=9)[:1]
    (want_grad,) = torch.autograd.grad(sum((getattr(want, f) * u).sum() for f, u in zip(fields, ups)), x64)
    for name, got, exp in [(f, getattr(s, f), getattr(want, f)) for f in fields] + [("grad", grad, want_grad)]:
        assert max_err(got, exp) <= 1e-6 * (1 + exp.abs().max().item()), name


@given(dtype=st.sampled_from(DTYPES), V=st.integers(2, 400), rows=st.integers(1, 5).map(lambda n: 2 * n),
       layout=st.sampled_from(LAYOUTS), temperature=st.floats(0.2, 4.0), offset=st.sampled_from([0.0, 1e3, -3e3]),
       scale=st.sampled_from([0.1, 3.0, 30.0]), clamp_fraction=st.sampled_from([None, 0.0, 0.4]),
       seed=st.integers(0, 2**16))
def test_torch_path_matches_reference_with_any_temperature(dtype, V, rows, layout, temperature, offset, scale,
                                                           clamp_fraction, seed):
    logits = make_logits(layout, rows, V, dtype, scale=scale, seed=seed)
    logits.add_(offset if dtype == torch.float32 else offset / 100)  # in place: the layout stays
    s, _ = check(logits, make_targets(logits, ignore_every=3, seed=seed), temperature, clamp_fraction)
    assert (s.logp <= 0).all() and (s.entropy >= 0).all()


@pytest.mark.parametrize("layout", ["flat", "sliced", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_blocks_match_reference(compiled, dtype, layout):
    logits = make_logits(layout, 10, 301, dtype, seed=3)
    logits[0, ::7] = float("-inf") if layout == "flat" else logits[0, ::7]
    check(logits, make_targets(logits), 0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_in_place_backward_and_aent(compiled, dtype):
    logits = make_logits("bt", 8, 257, dtype, seed=4)
    targets = make_targets(logits)
    check(logits, targets, 1.3, inplace=True)
    check(logits, targets, 1.3, clamp_fraction=0.4)


def test_compiled_lm_head_matches_reference(compiled):
    from test_linear import check_against_reference, make_head, targets_for
    hidden, weight, bias = make_head("bt", 12, 16, 300, torch.float32)
    check_against_reference(hidden, weight, bias, targets_for(hidden, 300), torch.float32, temperature=1.3,
                            impl="torch")


def test_no_recompile_for_new_shapes_temperatures_or_ignore_index(compiled):
    """After the first call of each kind, new sizes, temperatures and ignore_index values reuse the graphs."""
    counters = torch._dynamo.utils.counters

    def call(N, V, T, ignore_index):
        x = torch.randn(N, V, generator=torch.Generator().manual_seed(N), requires_grad=True)
        t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(V))
        t[::3] = ignore_index
        logp, ent = ck.logprobs_and_entropy(x, t, temperature=T, ignore_index=ignore_index, impl="torch")
        (logp.sum() + ent.sum()).backward()

    call(6, 50, 1.0, -100)
    graphs = counters["stats"]["unique_graphs"]
    for N, V, T, ignore_index in [(9, 300, 0.7, -100), (4, 1031, 1.388, 5), (30, 77, 2.5, -1)]:
        call(N, V, T, ignore_index)
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_failing_compiler_falls_back_to_eager(compiled, monkeypatch):
    def broken(fn):
        def fail(*args):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(C, "_compiled", broken)
    logits = make_logits("flat", 6, 200, torch.float32)
    targets = make_targets(logits)
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        got = ck.token_stats(logits, targets, impl="torch")
    assert C._failed and not C.compiles(10**9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning only
        again = ck.token_stats(logits, targets, impl="torch")
    want = ref.token_stats(logits.double(), targets)
    for f in ("logp", "entropy", "lse"):
        assert torch.equal(getattr(got, f), getattr(again, f))
        assert (getattr(got, f).double() - getattr(want, f)).abs().max() < 1e-5


def test_compiled_blocks_inside_an_outer_torch_compile(compiled):
    logits = make_logits("bt", 8, 130, torch.float32)
    targets = make_targets(logits)

    def loss(x):
        logp, ent = ck.logprobs_and_entropy(x, targets, temperature=0.8, validate=False, impl="torch")
        return (logp - 0.1 * ent).sum()

    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss(x).backward()
    torch._dynamo.reset()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(y).backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-6)


def test_compiled_forward_holds_no_block_of_the_logits():
    """At the default threshold, 256 x 32000 bf16 logits compile: the forward's peak extra resident memory
    (after a first, compiling call) is a small fraction of the logits, far below the 0.35 x of the chunked
    eager blocks it replaces."""
    from bench.timing import peak_extra_rss_bytes
    logits = make_logits("flat", 256, 32000, torch.bfloat16)
    targets = make_targets(logits)
    assert C.compiles(logits.numel())
    ck.logprobs_and_entropy(logits, targets, validate=False, impl="torch")
    peak = peak_extra_rss_bytes(lambda i: ck.logprobs_and_entropy(logits, targets, validate=False, impl="torch"))
    if peak is None:
        pytest.skip("the resident-set high-water mark cannot be reset here")
    assert peak <= 0.05 * logits.numel() * logits.element_size(), peak
