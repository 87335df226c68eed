"""FusedGRPOTrainer: TRL's GRPOTrainer, its per-token log-probs and entropies from covkernels, its loss TRL's.

Written against TRL 1.16 (transformers >= 5). GRPOTrainer gets every per-token log-prob (the loss, the old
and the reference ones) from `_get_per_token_logps_and_entropies`, which calls the model as
`model(..., labels=labels, fused_lm_head=True)`: a forward TRL's `add_fused_lm_head` patched onto the model.
FusedGRPOTrainer wraps that patched forward once more (`add_fused_pass`) and, while its own
`_get_per_token_logps_and_entropies` runs, answers those calls with covkernels:
- a model whose logits are exactly lm_head(hidden) (`_head.takes_head`): the backbone, then the fused LM head
  on the hidden states of the K completion positions only: the [B, K, V] logits never exist;
- any other model (final-logit softcapping, logit scaling, a PEFT adapter or ZeRO-3 on the head), and AEnt's
  clamped entropy (which needs whole rows): the model's own forward for the K + 1 last positions, then one
  fused pass over those logits.
Everything else is TRL's, untouched: the batching and vision inputs of `_get_per_token_logps_and_entropies`,
every loss type and GRPOConfig option of `_compute_loss`, the MoE auxiliary loss (computed here from the
backbone's router logits as TRL computes it).
"""
import contextlib
import contextvars
import functools
import types
from dataclasses import dataclass, field

from accelerate.utils import is_peft_model
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from trl import GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from .. import logprobs_and_entropy, token_stats
from .._validation import IMPLS, check_choice
from ._head import head_logprobs_and_entropy, takes_head

IGNORE_INDEX = -100


@dataclass
class PassSpec:
    """One `_get_per_token_logps_and_entropies` call as the patched forward sees it.

    window: K, the completion tokens scored (the last K labels). temperature: TRL's. fp32_head: TRL's
    cast_lm_head_to_fp32. impl: covkernels' implementation ("auto", "triton", "torch"). clamp_fraction: AEnt's
    p, or None; then the forward appends each chunk's clamped entropy [b, K] to `clamped`.
    """

    window: int
    temperature: float
    fp32_head: bool
    impl: str
    clamp_fraction: float | None = None
    clamped: list = field(default_factory=list)


# The pass in progress in this thread (or task); None outside FusedGRPOTrainer's calls.
_PASS = contextvars.ContextVar("covkernels_trl_pass", default=None)


@contextlib.contextmanager
def running(spec):
    """Makes the patched forwards answer TRL's fused_lm_head calls with `spec` inside the block."""
    token = _PASS.set(spec)
    try:
        yield spec
    finally:
        _PASS.reset(token)


def _aux_loss(model, router_logits, attention_mask):
    """The MoE load-balancing loss of the model's own forward (transformers' Mixtral function, as TRL)."""
    config = model.config.get_text_config()
    return load_balancing_loss_func(router_logits, config.num_experts, config.num_experts_per_tok,
                                    attention_mask)


def add_fused_pass(model):
    """Wraps `model.forward` (already patched by TRL's add_fused_lm_head) so that, while a pass is `running`,
    `model(..., labels=labels, fused_lm_head=True)` returns TRL's FusedCausalLMOutput with log_probs,
    entropy and label_mask [B, K] of the last K labels (K = the pass's window; TRL reads [:, -K:]) computed by
    covkernels, and aux_loss. Every other call (generation, no pass running, shift_labels) goes to TRL's."""
    trl_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        spec = _PASS.get()
        if not fused_lm_head or spec is None or shift_labels is not None:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        k = spec.window
        targets = labels[:, -k:]
        kwargs["use_cache"] = False
        if getattr(self.config.get_text_config(), "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        if spec.clamp_fraction is None and takes_head(self):
            out = self.base_model(*args, **kwargs)
            # Hidden states at positions -K-1 .. -2 predict the K completion tokens.
            logp, entropy = head_logprobs_and_entropy(out.last_hidden_state[:, -k - 1:-1],
                                                      self.get_output_embeddings(), targets,
                                                      temperature=spec.temperature, impl=spec.impl,
                                                      fp32=spec.fp32_head)
            aux_loss = (_aux_loss(self, out.router_logits, kwargs.get("attention_mask"))
                        if kwargs.get("output_router_logits") else None)
        else:
            # The model's own forward and head (softcapping, scaling, adapters), for the K + 1 last positions.
            out = trl_forward(*args, logits_to_keep=k + 1, **kwargs)
            logits = out.logits[:, :-1]
            if spec.clamp_fraction is None:
                logp, entropy = logprobs_and_entropy(logits, targets, temperature=spec.temperature,
                                                     validate=False, impl=spec.impl)
            else:
                stats = token_stats(logits, targets, temperature=spec.temperature,
                                    clamp_fraction=spec.clamp_fraction, validate=False, impl=spec.impl)
                logp, entropy = stats.logp, stats.entropy
                spec.clamped.append(stats.clamped_entropy)
            aux_loss = getattr(out, "aux_loss", None)
        return FusedCausalLMOutput(log_probs=logp, entropy=entropy, label_mask=targets != IGNORE_INDEX,
                                   aux_loss=aux_loss)

    model.forward = types.MethodType(forward, model)


class FusedGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose per-token log-probs and entropies come from covkernels' fused pass.

    Takes GRPOTrainer's arguments and `impl` (covkernels' "auto", "triton" or "torch"). The loss is TRL's
    own for every GRPOConfig setting; only where the log-probs and entropies come from changes (module
    docstring). With the fused LM head, the completion logits [B, K, V] are never held in the forward nor
    in the backward.

    Example:
        >>> trainer = FusedGRPOTrainer(model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=data)
        >>> trainer.train()
    """

    def __init__(self, *args, impl="auto", **kwargs):
        check_choice("impl", impl, IMPLS)
        self.covkernels_impl = impl
        super().__init__(*args, **kwargs)
        # The models TRL patched: the policy (its base model under PEFT) and the reference model, which
        # DeepSpeed, FSDP or device placement may have wrapped since.
        add_fused_pass(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        if self.ref_model is not None:
            add_fused_pass(self.accelerator.unwrap_model(self.ref_model))

    def _pass_spec(self, logits_to_keep):
        """The PassSpec of one `_get_per_token_logps_and_entropies` call."""
        return PassSpec(window=logits_to_keep, temperature=self.temperature,
                        fp32_head=self.args.cast_lm_head_to_fp32, impl=self.covkernels_impl)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args,
                                           **kwargs):
        """TRL's method (its batching, vision inputs, aux loss) with covkernels answering the model calls:
        (log-probs [B, K], entropies [B, K] or None, aux loss or None); 0 where the completion is padding."""
        with running(self._pass_spec(logits_to_keep)):
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
                                                              logits_to_keep, *args, **kwargs)
