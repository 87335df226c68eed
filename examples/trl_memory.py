"""Peak CPU memory of one GRPO training step: TRL's GRPOTrainer (its chunked LM head) vs FusedGRPOTrainer.

Each trainer runs in a fresh process on the same random 2-layer Llama (hidden 64, vocabulary --vocab) and the
same prepared batch of --batch completions of --tokens tokens (built without any model pass, so nothing
before the step allocates anything of size tokens x vocabulary). The step is the loss of TRL 1.16
(`_compute_loss`, loss_type dapo), its backward and an AdamW step, fp32, covkernels on its PyTorch path (no
TRITON_INTERPRET). Measured: the process's peak resident memory during the step minus its resident memory
just before it, after returning freed memory to the system (malloc_trim).

    python examples/trl_memory.py                      # vocabulary 32768, 8 x 512 completion tokens
    python examples/trl_memory.py --vocab 151936 --tokens 256
"""
import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile

TRAINERS = ("GRPOTrainer", "FusedGRPOTrainer")


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(trainer_name, vocab, batch, tokens, prompt=16):
    """One step of `trainer_name` in this process: {"trainer", "before_mib", "peak_mib", "step_mib"}."""
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from covkernels.integrations.trl import FusedGRPOTrainer

    torch.manual_seed(0)
    words = {f"w{i}": i for i in range(vocab)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w2")),
                                        pad_token="w0", eos_token="w1", unk_token="w2")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=0, eos_token_id=1, tie_word_embeddings=False))
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, num_generations=batch,
                      max_completion_length=tokens, report_to="none", use_cpu=True, bf16=False, seed=0)
    cls = {"GRPOTrainer": GRPOTrainer, "FusedGRPOTrainer": FusedGRPOTrainer}[trainer_name]
    trainer = cls(model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                  train_dataset=Dataset.from_dict({"prompt": ["w3"] * batch}), processing_class=tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    inputs = dict(prompt_ids=torch.randint(3, vocab, (batch, prompt), generator=g),
                  prompt_mask=torch.ones(batch, prompt, dtype=torch.long),
                  completion_ids=torch.randint(3, vocab, (batch, tokens), generator=g), completion_mask=mask,
                  advantages=torch.randn(batch, generator=g), num_items_in_batch=mask.sum().float(),
                  old_per_token_logps=-10 * torch.rand(batch, tokens, generator=g))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss_mib()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"trainer": trainer_name, "before_mib": before, "peak_mib": peak, "step_mib": peak - before}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--one", choices=TRAINERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.vocab, args.batch, args.tokens)))
        return None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results = []
    for name in TRAINERS:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--vocab", str(args.vocab), "--batch",
                              str(args.batch), "--tokens", str(args.tokens)], capture_output=True, text=True,
                             env=env, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    logits_mib = args.batch * args.tokens * args.vocab * 4 / 2**20
    print(f"vocabulary {args.vocab}, {args.batch} x {args.tokens} completion tokens "
          f"(their fp32 logits: {logits_mib:.0f} MiB)")
    for r in results:
        print(f"{r['trainer']:>18}  step peak {r['step_mib']:8.1f} MiB "
              f"above the {r['before_mib']:.0f} MiB before it")
    return results


if __name__ == "__main__":
    main()
