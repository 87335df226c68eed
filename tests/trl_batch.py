"""What the TRL integration tests share: tiny local models, trainers, one prepared GRPO batch, settings.

Nothing is downloaded: the model, tokenizer and data come from examples/train_trl_grpo.py (vocabulary 13,
hidden 32). The batch is built by hand, as GRPOTrainer._generate_and_score_completions would hand it to the
loss, so that every case is cheap and its settings are controlled: old log-probs off the current ones (so
PPO clips on both sides), ragged completions, left-padded prompts, and statistics (the entropy quantile,
the per-sequence KL) kept away from the thresholds a float error could flip.
"""
import importlib.util
import pathlib

import torch
from transformers import AutoTokenizer
from trl import GRPOConfig

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_trl_grpo.py"
B, P, K = 8, 4, 6  # sequences, prompt length, completion length (P + K differs from the vocabulary, 13)


def load_example():
    spec = importlib.util.spec_from_file_location("train_trl_grpo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_trainer(cls, model, output_dir, **kwargs):
    """`cls` (GRPOTrainer or a subclass) on the example's task, fp32, temperature 0.7, one process, gradient
    accumulation 1; kwargs beyond GRPOConfig's fields go to the trainer."""
    example = load_example()
    fields = set(GRPOConfig.__dataclass_fields__)
    config = {k: v for k, v in kwargs.items() if k in fields}
    extra = {k: v for k, v in kwargs.items() if k not in fields}
    args = GRPOConfig(output_dir=output_dir, per_device_train_batch_size=B, num_generations=4,
                      max_completion_length=K, num_iterations=2, max_steps=1, report_to="none", seed=0,
                      save_strategy="no", disable_tqdm=True, use_cpu=True,
                      **{"bf16": False, "temperature": 0.7, **config})
    trainer = cls(model, reward_funcs=example.reward_a, args=args, train_dataset=example.toy_dataset(),
                  processing_class=AutoTokenizer.from_pretrained(model), **extra)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); the loss reads it
    return trainer


def make_batch(trainer, seed=0):
    """The inputs of GRPOTrainer._compute_loss for B sequences; old, sampling and reference log-probs are the
    trainer's current ones moved by noise."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, 13, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[:2, :2] = 0
    completion_ids = torch.randint(3, 13, (B, K), generator=g)
    lengths = torch.tensor([6, 5, 1, 6, 3, 4, 6, 2])
    completion_mask = (torch.arange(K)[None] < lengths[:, None]).long()
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        logp, entropy, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, K,
                                                                      compute_entropy=True)
    old = (logp + 0.3 * torch.randn(B, K, generator=g)).clamp(max=0) * completion_mask
    sampling = (old + 0.05 * torch.randn(B, K, generator=g)).clamp(max=0) * completion_mask
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.randn(B, generator=g),
                  old_per_token_logps=old, sampling_per_token_logps=sampling,
                  ref_per_token_logps=(logp - 0.2 * torch.rand(B, K, generator=g)),
                  importance_sampling_ratio=0.5 + torch.rand(B, K, generator=g),
                  # As if the generation batch held more completions: dapo's normaliser is not bnpo's.
                  num_items_in_batch=completion_mask.sum().float() + 7)
    return inputs, entropy, logp


def check_margins(inputs, entropy, logp, quantile=0.2, margin=1e-5):
    """The off-policy threshold between two sequences' KLs, after checking that TRL's entropy quantile and
    that threshold are each more than `margin` from every value they are compared with."""
    valid = inputs["completion_mask"].bool()
    values = entropy[valid].double()
    threshold = torch.quantile(values, 1 - quantile)
    assert (values - threshold).abs().min() > margin, "an entropy sits on the top_entropy_quantile threshold"
    kl = ((inputs["sampling_per_token_logps"] - logp) * valid).sum(1) / valid.sum(1)
    ordered = kl.sort().values
    threshold = ((ordered[B // 2 - 1] + ordered[B // 2]) / 2).item()
    assert (kl - threshold).abs().min() > margin
    return threshold


def configure(monkeypatch, trainer, **settings):
    """GRPOConfig settings on a built trainer: each field of trainer.args, plus the attribute of the same name
    GRPOTrainer.__init__ copies it to, and the entropy-bonus switch __init__ derives."""
    for name, value in settings.items():
        monkeypatch.setattr(trainer.args, name, value)
        if hasattr(trainer, name):
            monkeypatch.setattr(trainer, name, value)
    enabled = trainer.entropy_coef != 0.0 or trainer.use_adaptive_entropy
    monkeypatch.setattr(trainer, "_entropy_bonus_enabled", enabled)
    # Adaptive entropy applies its coefficient once the previous step's entropy is below the target.
    monkeypatch.setattr(trainer, "_last_world_entropy", 0.1)
    monkeypatch.setattr(trainer, "_entropy_window_stats", None)


def loss_and_grads(trainer, inputs):
    """(loss, parameter gradients, the last value of each metric the call logged)."""
    trainer.model.zero_grad()
    before = {k: len(v) for k, v in trainer._metrics["train"].items()}
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if len(v) > before.get(k, 0)}
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()], logged
