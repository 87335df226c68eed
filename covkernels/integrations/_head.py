"""The per-token pass both integrations run on a Hugging Face causal LM: covkernels' fused LM head when it
can stand in for the model's head, otherwise one fused pass over the model's own logits."""
import torch
from torch.distributed.tensor import DTensor

from .. import linear_logprobs_and_entropy

# Config fields that scale a model's logits after its head (Cohere, Granite, Falcon-H1, MiniCPM3, ...): 1 or
# None is the identity. Gemma's final_logit_softcapping is another transform, whatever its value.
LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def takes_head(model):
    """True when the model's logits are exactly `model.get_output_embeddings()(last hidden state)` and that
    head is a plain nn.Linear with ordinary parameters, so the fused LM head may replace it. Not with a PEFT
    adapter on the head (its wrapper is no nn.Linear) nor under DeepSpeed ZeRO-3 (partitioned parameters are
    gathered only inside the model's own forward); such models keep their head and covkernels reads their
    logits."""
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    plain = getattr(config, "final_logit_softcapping", None) is None and all(
        getattr(config, name, None) in (None, 1) for name in LOGIT_SCALES)
    return type(head) is torch.nn.Linear and plain and not hasattr(head.weight, "ds_id")


def head_logprobs_and_entropy(hidden, head, targets, *, temperature, impl="auto", fp32=False):
    """(logp, entropy), fp32 of targets' shape, of softmax(head(hidden) / temperature), by covkernels' fused
    LM head: the logits are never held.

    hidden [..., D]; head: an nn.Linear (weight [V, D], optional bias [V]) whose parameters may be FSDP2
    DTensors (gathered, differentiably); targets [...] int, -100 where ignored. The products run in the dtype
    F.linear would use here: fp32 with `fp32` (TRL's cast_lm_head_to_fp32), else the autocast dtype when
    autocast is on, else hidden's.
    """
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    device = hidden.device.type
    if fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = hidden.dtype
    with torch.autocast(device, enabled=False):
        bias = None if bias is None else bias.to(dtype)
        return linear_logprobs_and_entropy(hidden.to(dtype), weight.to(dtype), targets, bias=bias,
                                           temperature=temperature, validate=False, impl=impl)
