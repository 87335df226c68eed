"""verl 0.9.1: covkernels as the actor's fused-kernel backend, and the micro-batch entropy handed to the loss.

verl's FSDP engine (verl/workers/engine/fsdp/transformer_impl.py) has a fused path: with
`actor_rollout_ref.model.use_fused_kernels=True` it calls the model with `temperature=` (and `shift_labels=`,
the rolled labels, without padding) and reads `log_probs` and `entropy` from its output, in place of the
logits it would otherwise read twice (`logprobs_from_logits`, then `compute_entropy_from_logits`). The
backend that answers is named by `fused_kernel_options.impl_backend`; verl installs its own ("triton",
"torch", "liger") and leaves the model alone for any other name.

`CovkernelsFSDPEngine` is verl's FSDPEngineWithLMHead registered in verl's `EngineRegistry` under the vendor
"covkernels" (selected with VERL_ENGINE_VENDOR=covkernels; for other model types the lookup falls back to
verl's engines). It changes two things:
- with impl_backend="covkernels", the model it builds answers verl's fused call with one covkernels pass:
  the fused LM head on the backbone's hidden states (no logits exist), or, where the model's logits are not
  lm_head(hidden) (softcapping, logit scaling, a LoRA head), one fused pass over the model's own logits;
- every loss call sees the micro-batch's entropy (when verl computed it: `actor.calculate_entropy=True` or
  `entropy_coeff != 0`) through `micro_batch_entropy()`, in the layout of verl's padded log-probs: the
  covkernels losses registered as "ck_*_state" use it for per-state centering.
"""
import contextvars
import functools
import types

import torch
from verl.models.transformers.dense_common import CausalLMOutputForPPO
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.utils.padding import no_padding_2_padding

from .. import logprobs_and_entropy
from ._head import head_logprobs_and_entropy, takes_head

BACKEND = "covkernels"
_ENTROPY = contextvars.ContextVar("covkernels_verl_entropy", default=None)


def micro_batch_entropy():
    """The entropy [B, T_response] (padded as verl pads the log-probs it gives a policy loss) of the
    micro-batch whose loss is being computed by CovkernelsFSDPEngine; None elsewhere or when verl did not
    compute it."""
    return _ENTROPY.get()


def add_fused_forward(model, impl="auto"):
    """Makes `model(..., temperature=T, shift_labels=labels)` (verl's fused-kernel call) return verl's
    CausalLMOutputForPPO with log_probs and entropy, [batch, seq] fp32, from one covkernels pass. The labels
    are `shift_labels`, else `labels` or `input_ids` rolled by one (as verl's own fused forwards)."""
    model_forward = model.forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, temperature=1.0, labels=None,
                shift_labels=None, return_dict=True, **kwargs):
        targets = shift_labels
        if targets is None:
            targets = torch.roll(input_ids if labels is None else labels, shifts=-1, dims=-1)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        if takes_head(self):
            hidden = self.base_model(**inputs).last_hidden_state
            logp, entropy = head_logprobs_and_entropy(hidden, self.get_output_embeddings(), targets,
                                                      temperature=temperature, impl=impl)
        else:
            logits = model_forward(**inputs).logits
            logp, entropy = logprobs_and_entropy(logits, targets, temperature=temperature, validate=False,
                                                 impl=impl)
        return CausalLMOutputForPPO(log_probs=logp, entropy=entropy)

    model.forward = types.MethodType(forward, model)


def _with_entropy(loss_function, model_output=None, data=None, **kwargs):
    """Calls verl's loss function with the micro-batch's padded entropy published for the policy loss."""
    entropy = None if model_output is None else model_output.get("entropy")
    token = _ENTROPY.set(None if entropy is None else no_padding_2_padding(entropy, data))
    try:
        return loss_function(model_output=model_output, data=data, **kwargs)
    finally:
        _ENTROPY.reset(token)


@EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device=["cuda", "npu"],
                         vendor=BACKEND)
class CovkernelsFSDPEngine(FSDPEngineWithLMHead):
    """verl's FSDP actor engine with covkernels as the fused-kernel backend (module docstring)."""

    def _build_module(self):
        module = super()._build_module()
        options = self.model_config.fused_kernel_options or {}
        if self.model_config.use_fused_kernels and options.get("impl_backend") == BACKEND:
            add_fused_forward(module)
        return module

    def forward_step(self, micro_batch, loss_function, forward_only):
        if loss_function is not None:
            loss_function = functools.partial(_with_entropy, loss_function)
        return super().forward_step(micro_batch, loss_function, forward_only)
