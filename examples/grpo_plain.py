"""GRPO in plain PyTorch with covkernels' loss: a tiny random causal LM learns to emit one token.

The model is a 2-layer Llama built from a transformers config (random weights, nothing downloaded); the reward
is the fraction of the response that is token 3. Each step samples GROUP responses per prompt, normalises the
rewards within each group (the GRPO advantage), and takes two optimizer steps on the covkernels loss. The
entropy of the policy on its own samples is printed per step: the curve that entropy control is about.

    python examples/grpo_plain.py --method kl_cov --steps 20
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import covkernels

VOCAB, PROMPT_LEN, RESPONSE_LEN, GROUP, TARGET = 16, 4, 12, 8, 3


@torch.no_grad()
def sample(model, prompts, temperature):
    """Appends RESPONSE_LEN tokens drawn from softmax(logits / temperature)."""
    seqs = prompts
    for _ in range(RESPONSE_LEN):
        probs = torch.softmax(model(seqs).logits[:, -1].float() / temperature, dim=-1)
        seqs = torch.cat([seqs, torch.multinomial(probs, 1)], dim=1)
    return seqs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="kl_cov", choices=["ppo", "clip_cov", "kl_cov"])
    parser.add_argument("--centering", default="batch", choices=["batch", "state"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (GROUP responses each)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    temperature = 1.0
    # covkernels: this loss object, the old log-probs and one loss call per optimizer step below.
    loss_fn = covkernels.PolicyLoss(args.method, centering=args.centering, kl_cov_ratio=0.02,
                                    clip_cov_ratio=0.02, ppo_kl_coef=1.0, temperature=temperature)
    history = []
    for step in range(args.steps):
        prompts = torch.randint(0, VOCAB, (args.prompts, PROMPT_LEN)).repeat_interleave(GROUP, dim=0)
        seqs = sample(model, prompts, temperature)
        responses = seqs[:, PROMPT_LEN:]                                   # [B, T]
        rewards = (responses == TARGET).float().mean(dim=1)                # [B]
        grouped = rewards.view(-1, GROUP)
        advantages = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)
        advantages = advantages.view(-1, 1).expand_as(responses)           # [B, T]: one value per response
        mask = torch.ones_like(responses, dtype=torch.bool)
        with torch.no_grad():                                              # the sampling policy's log-probs
            old_logp, _ = covkernels.logprobs_and_entropy(model(seqs).logits[:, PROMPT_LEN - 1:-1], responses,
                                                          temperature=temperature)
        for _ in range(2):
            logits = model(seqs).logits[:, PROMPT_LEN - 1:-1]              # [B, T, V]: predict the responses
            loss, metrics = loss_fn(logits, responses, old_logp, advantages, mask, step=step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        entropy = metrics["entropy"].item()
        history.append(entropy)
        print(f"step {step:3d}  reward {rewards.mean().item():.3f}  entropy {entropy:.3f}  "
              f"selected {int(metrics['n_selected'])}  {'#' * round(entropy * 10)}")
    return history


if __name__ == "__main__":
    main()
