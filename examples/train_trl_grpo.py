"""GRPO with TRL's GRPOTrainer, covkernels' fused pass and Clip-Cov / KL-Cov / AEnt, runnable on a laptop CPU.

Nothing is downloaded: a word-level tokenizer over ten letters and a random 2-layer Llama are built and saved
to a temporary directory, the prompts are four random letters, and the reward is the fraction of "a" in the
completion. `--model` takes a Hub id or a local path instead (its own tokenizer is used).

    python examples/train_trl_grpo.py --method kl_cov --steps 10
    python examples/train_trl_grpo.py --method clip_cov --centering state --loss-type cispo
    python examples/train_trl_grpo.py --method none --aent     # TRL's loss with AEnt's clamped-entropy bonus
"""
import argparse
import math
import os
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig

from covkernels import AEntController
from covkernels.integrations.trl import CovGRPOTrainer, CovLossConfig, FusedGRPOTrainer

LETTERS = list("abcdefghij")


def build_tiny_model(path):
    """Saves a word-level tokenizer and a randomly initialised 2-layer Llama to `path`; returns `path`."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *LETTERS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def toy_dataset(n=64):
    """n prompts of four random letters."""
    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"prompt": [" ".join(LETTERS[i] for i in torch.randint(0, 10, (4,), generator=g))
                                         for _ in range(n)]})


def reward_a(completions, **kwargs):
    """The fraction of "a" among the words of each completion."""
    return [c.split().count("a") / max(len(c.split()), 1) for c in completions]


def make_trainer(model, output_dir, cov_config=None, steps=5, impl="auto", **grpo_kwargs):
    """On the toy task, a CovGRPOTrainer with `cov_config`, or a FusedGRPOTrainer without one: 8 completions
    per step in groups of 4, two optimizer steps per generation (num_iterations=2, so the old log-probs
    differ from the current ones), fp32."""
    args = GRPOConfig(output_dir=output_dir, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=8, num_iterations=2, learning_rate=1e-2, max_steps=steps,
                      logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                      bf16=False, use_cpu=not torch.cuda.is_available(), **grpo_kwargs)
    common = dict(reward_funcs=reward_a, args=args, train_dataset=toy_dataset(), impl=impl,
                  processing_class=AutoTokenizer.from_pretrained(model))
    if cov_config is None:
        return FusedGRPOTrainer(model, **common)
    return CovGRPOTrainer(model, cov_config=cov_config, **common)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="kl_cov", choices=["none", "clip_cov", "kl_cov"])
    parser.add_argument("--centering", default="batch", choices=["batch", "state"])
    parser.add_argument("--ratio", type=float, default=0.02,
                        help="fraction of tokens Clip-Cov / KL-Cov select (toy batches are small; the papers "
                             "use 2e-4 to 2e-3 on large ones)")
    parser.add_argument("--loss-type", default="dapo",
                        choices=["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
    parser.add_argument("--sequence-level", action="store_true",
                        help="GSPO: importance_sampling_level='sequence'")
    parser.add_argument("--aent", action="store_true", help="add AEnt's clamped-entropy bonus (controller)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", default=None, help="Hub id or local path (default: a tiny local model)")
    args = parser.parse_args(argv)

    method = None if args.method == "none" else args.method
    cov_config = CovLossConfig(method=method, centering=args.centering, clip_cov_ratio=args.ratio,
                               kl_cov_ratio=args.ratio,
                               aent_coef=AEntController(warmup=0) if args.aent else 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_model(os.path.join(tmp, "tiny-llama"))
        trainer = make_trainer(model, tmp, cov_config, steps=args.steps, loss_type=args.loss_type,
                               importance_sampling_level="sequence" if args.sequence_level else "token")
        trainer.train()
    rows = [h for h in trainer.state.log_history if "loss" in h]
    print(f"{'step':>4} {'loss':>9} {'reward':>7} {'entropy':>8} {'n_selected':>10} {'clamped H':>9}")
    for h in rows:
        selected, clamped = h.get("covkernels/n_selected", 0), h.get("covkernels/clamped_entropy", math.nan)
        print(f"{h['step']:>4} {h['loss']:>9.4f} {h.get('reward', math.nan):>7.3f} {h['entropy']:>8.4f} "
              f"{selected:>10.1f} {clamped:>9.4f}")
    if not all(math.isfinite(h["loss"]) for h in rows):
        raise SystemExit("non-finite loss")
    return trainer


if __name__ == "__main__":
    main()
