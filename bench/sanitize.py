"""One small launch of every Triton kernel, for `compute-sanitizer --tool memcheck python -m bench.sanitize`
(bench/gpu_session.sh): forward (plain, statistics, split rows), backward (new buffer and in place), AEnt's
passes, the fused LM head (forward, backward) and the vocabulary-parallel partials. Shapes are small but
not multiples of the blocks, rows are strided, some targets ignored; prints one line per kernel family."""
import torch

import covkernels as ck
from covkernels.ops.fused_pass.kernels import fused_bwd, fused_fwd, fused_fwd_partials


def main():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    V = 5003
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(3, 10, V + 7, device=dev, generator=g).to(dtype)[:, :, :V]  # strided rows
        t = torch.randint(0, V, (3, 10), device=dev, generator=g)
        t[:, ::4] = -100
        for stats in (False, True):
            for splits in (1, 3):
                fused_fwd(x, t, 1 / 0.7, -100, stats, splits=splits)
        out = fused_fwd(x, t, 1 / 0.7, -100, False)
        g_logp = torch.randn(3, 10, device=dev, generator=g)
        fused_bwd(x, t, out[5], out[1], g_logp, g_logp, 1 / 0.7, -100, torch.empty_like(x))
        fused_bwd(x.clone(), t, out[5], out[1], g_logp, g_logp, 1 / 0.7, -100, x.clone())
        fused_fwd_partials(x[..., :1000], t, 1 / 0.7, -100, True)
        print(dtype, "fused pass: forward (plain, statistics, split), backward (new, in place), partials: ok")
        z = x.detach().clone().requires_grad_()
        s = ck.token_stats(z, t, temperature=0.7, clamp_fraction=0.3, impl="triton")
        (s.logp.sum() + s.clamped_entropy.sum()).backward()
        print(dtype, "AEnt: radix select, sums, backward: ok")
        h = torch.randn(3, 10, 64, device=dev, generator=g).to(dtype).requires_grad_()
        w = torch.randn(V, 64, device=dev, generator=g).to(dtype).requires_grad_()
        logp, ent = ck.linear_logprobs_and_entropy(h, w, t, temperature=0.7, impl="triton")
        (logp.sum() + ent.sum()).backward()
        print(dtype, "LM head: forward, combine, dz, accumulating product: ok")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
