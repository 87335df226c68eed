"""GRPO with TRL's GRPOTrainer and covkernels' loss (Clip-Cov, KL-Cov or PPO-clip), runnable on a laptop CPU.

Nothing is downloaded: a word-level tokenizer over ten letters and a random 2-layer Llama are built and saved
to a temporary directory, the prompts are four random letters, and the reward is the fraction of "a" in the
completion. `--model` takes a Hub id or a local path instead (its own tokenizer is used).

    python examples/train_trl_grpo.py --method kl_cov --steps 10
    python examples/train_trl_grpo.py --method clip_cov --centering state --loss-type grpo
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

from covkernels.integrations.trl import CovGRPOTrainer, CovLossConfig

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


def make_trainer(model, output_dir, cov_config, steps=5, **grpo_kwargs):
    """A CovGRPOTrainer on the toy task: 8 completions per step in groups of 4, two optimizer steps per
    generation (num_iterations=2, so the old log-probs differ from the current ones)."""
    args = GRPOConfig(output_dir=output_dir, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=8, num_iterations=2, learning_rate=1e-2, max_steps=steps,
                      logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                      use_cpu=not torch.cuda.is_available(), **grpo_kwargs)
    return CovGRPOTrainer(model, reward_funcs=reward_a, args=args, train_dataset=toy_dataset(),
                          processing_class=AutoTokenizer.from_pretrained(model), cov_config=cov_config)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="kl_cov", choices=["ppo", "clip_cov", "kl_cov"])
    parser.add_argument("--centering", default="batch", choices=["batch", "state"])
    parser.add_argument("--ratio", type=float, default=0.02,
                        help="fraction of tokens Clip-Cov / KL-Cov select (toy batches are small; the papers "
                             "use 2e-4 to 2e-3 on large ones)")
    parser.add_argument("--loss-type", default="dapo", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", default=None, help="Hub id or local path (default: a tiny local model)")
    args = parser.parse_args(argv)

    cov_config = CovLossConfig(method=args.method, centering=args.centering, clip_cov_ratio=args.ratio,
                               kl_cov_ratio=args.ratio)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_model(os.path.join(tmp, "tiny-llama"))
        trainer = make_trainer(model, tmp, cov_config, steps=args.steps, loss_type=args.loss_type)
        trainer.train()
    rows = [h for h in trainer.state.log_history if "covkernels/entropy" in h]
    print(f"{'step':>4} {'loss':>9} {'entropy':>8} {'n_selected':>10} {'pg_clipfrac':>11}")
    for h in rows:
        print(f"{h['step']:>4} {h['loss']:>9.4f} {h['covkernels/entropy']:>8.4f} "
              f"{h['covkernels/n_selected']:>10.1f} {h['covkernels/pg_clipfrac']:>11.4f}")
    if not all(math.isfinite(h["loss"]) for h in rows):
        raise SystemExit("non-finite loss")
    return trainer


if __name__ == "__main__":
    main()
