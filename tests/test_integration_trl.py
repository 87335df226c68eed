"""FusedGRPOTrainer against TRL's own GRPOTrainer: same batch, same weights, every loss setting of GRPOConfig.

The loss is TRL's in both; what differs is where the per-token log-probs and entropies come from (TRL's
chunked LM head, covkernels' fused LM head or fused pass). The full grid runs on the loss computation
(`_compute_loss` + backward on a prepared batch) with covkernels' PyTorch path, which is fast on a CPU;
a slice of it runs the Triton kernels (the interpreter here, compiled on a GPU). fp32 throughout, so
"equal" means equal up to fp32 rounding; tests/test_integration_trl_cov.py trains end to end.
"""
import itertools

import pytest
import torch

pytest.importorskip("trl")
from transformers import (AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, MixtralConfig,  # noqa: E402
                          MixtralForCausalLM)
from trl import GRPOTrainer  # noqa: E402

from covkernels.integrations._head import takes_head  # noqa: E402
from covkernels.integrations.trl import FusedGRPOTrainer  # noqa: E402
from op_log import OpLog  # noqa: E402
from trl_batch import (B, K, check_margins, configure, load_example, loss_and_grads, make_batch,  # noqa: E402
                       make_trainer)

V = 13
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
# TRL 1.16 accepts every loss type at both levels (it only warns for luspo at "token", vespo at "sequence").
GRID = list(itertools.product(LOSS_TYPES, ["token", "sequence"], [1.0, 0.2], [0.0, 0.01], [False, True]))
EXTRA = [(loss_type, option) for loss_type in LOSS_TYPES
         for option in ("delta", "off_policy_mask", "beta_bias_corrected", "vllm_is")]
# What TRL logs from the loss; covkernels' pass must give the same numbers.
METRICS = ["entropy", "kl", "policy_loss", "entropy_coef", "aux_loss", "clip_ratio/low_mean",
           "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio", "vespo/phi_seq_mean"]


def grid_id(case):
    loss_type, level, quantile, coef, adaptive = case
    return f"{loss_type}-{level}-q{quantile}-coef{coef}-{'adaptive' if adaptive else 'static'}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return load_example().build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def trainers(model_dir, tmp_path_factory):
    """TRL's trainer, FusedGRPOTrainer on covkernels' PyTorch path and on its Triton kernels (same
    weights)."""
    out = str(tmp_path_factory.mktemp("out"))
    return (make_trainer(GRPOTrainer, model_dir, out),
            make_trainer(FusedGRPOTrainer, model_dir, out, impl="torch"),
            make_trainer(FusedGRPOTrainer, model_dir, out, impl="auto"))


@pytest.fixture(scope="module")
def batch(trainers):
    inputs, entropy, logp = make_batch(trainers[0])
    return inputs, check_margins(inputs, entropy, logp)


def assert_same_loss(monkeypatch, plain, fused, inputs, **settings):
    configure(monkeypatch, plain, **settings)
    configure(monkeypatch, fused, **settings)
    loss, grads, logged = loss_and_grads(fused, inputs)
    ref_loss, ref_grads, ref_logged = loss_and_grads(plain, inputs)
    assert loss != 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert logged.keys() == ref_logged.keys()
    for name in set(METRICS) & logged.keys():
        assert logged[name] == pytest.approx(ref_logged[name], rel=1e-5, abs=1e-7), name
    # The adaptive controller saw the same entropy and moved the same way.
    assert fused.entropy_coef == pytest.approx(plain.entropy_coef, rel=1e-6)


@pytest.mark.parametrize("case", GRID, ids=grid_id)
def test_loss_and_gradients_equal_trls(trainers, batch, monkeypatch, case):
    loss_type, level, quantile, coef, adaptive = case
    plain, fused, _ = trainers
    assert_same_loss(monkeypatch, plain, fused, batch[0], loss_type=loss_type,
                     importance_sampling_level=level, top_entropy_quantile=quantile, entropy_coef=coef,
                     use_adaptive_entropy=adaptive)


@pytest.mark.parametrize("loss_type, option", EXTRA, ids=lambda x: x)
def test_clipping_masks_kl_and_is_weights_equal_trls(trainers, batch, monkeypatch, loss_type, option):
    """delta (two-sided clipping), the off-policy sequence mask, the reference KL with its importance
    correction, and vLLM importance weights, on every loss type."""
    plain, fused, _ = trainers
    inputs, off_policy_threshold = batch
    settings = {"delta": dict(delta=1.1),
                "off_policy_mask": dict(off_policy_mask_threshold=off_policy_threshold),
                "beta_bias_corrected": dict(beta=0.04, use_bias_correction_kl=True),
                "vllm_is": dict(use_vllm=True, vllm_importance_sampling_correction=True)}[option]
    assert_same_loss(monkeypatch, plain, fused, inputs, loss_type=loss_type, **settings)


@pytest.mark.parametrize("case", [GRID[16 * i + 5 * i % 16] for i in range(len(LOSS_TYPES))], ids=grid_id)
def test_triton_kernels_equal_trls(trainers, batch, monkeypatch, case):
    """A slice of the grid on the Triton kernels: every loss type, each with other settings."""
    loss_type, level, quantile, coef, adaptive = case
    plain, _, fused = trainers
    assert_same_loss(monkeypatch, plain, fused, batch[0], loss_type=loss_type,
                     importance_sampling_level=level, top_entropy_quantile=quantile, entropy_coef=coef,
                     use_adaptive_entropy=adaptive)


@pytest.mark.parametrize("index", [1, 2], ids=["torch", "triton"])
def test_one_fused_pass_each_way_and_no_logits(trainers, batch, index):
    """The loss reads the LM head once forward and once backward (one fused op each), and no tensor with a
    vocabulary dimension exists; TRL's own path, watched the same way, holds its logits tiles."""
    plain, fused = trainers[0], trainers[index]
    assert takes_head(fused.model)
    for trainer in (fused, plain):
        trainer.model.zero_grad()
        with OpLog() as log:
            trainer._compute_loss(trainer.model, batch[0]).backward()
        with_vocab = [s for s in log.shapes if len(s) >= 2 and s[-1] == V]
        if trainer is fused:
            assert log.covkernels == ["linear_fwd", "linear_bwd"] and with_vocab == []
        else:
            assert log.covkernels == [] and with_vocab


def tiny_model(model_dir, tmp_path, cls, config_cls, **config):
    """A random tiny model of another architecture, saved with the example's tokenizer."""
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                  bos_token_id=None)
    cls(config_cls(**common, **config)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path)
    return str(tmp_path)


def test_moe_auxiliary_loss_equals_trls(model_dir, tmp_path, monkeypatch):
    """A Mixture-of-Experts model: TRL adds its load-balancing loss; the fused head gives the same total."""
    path = tiny_model(model_dir, tmp_path, MixtralForCausalLM, MixtralConfig, num_local_experts=4,
                      num_experts_per_tok=2, router_aux_loss_coef=0.05, tie_word_embeddings=False)
    plain = make_trainer(GRPOTrainer, path, str(tmp_path))
    fused = make_trainer(FusedGRPOTrainer, path, str(tmp_path), impl="torch")
    assert plain.aux_loss_enabled and takes_head(fused.model)
    inputs, _, _ = make_batch(plain)
    assert_same_loss(monkeypatch, plain, fused, inputs, loss_type="grpo")


def test_softcapped_logits_take_the_logits_path(model_dir, tmp_path, monkeypatch):
    """Gemma-2's final-logit softcapping is no plain LM head: covkernels reads the model's own logits."""
    path = tiny_model(model_dir, tmp_path, Gemma2ForCausalLM, Gemma2Config, head_dim=8,
                      final_logit_softcapping=2.0, tie_word_embeddings=False)
    plain = make_trainer(GRPOTrainer, path, str(tmp_path))
    fused = make_trainer(FusedGRPOTrainer, path, str(tmp_path), impl="torch")
    assert not takes_head(fused.model)
    inputs, _, _ = make_batch(plain)
    for loss_type in ("bnpo", "cispo"):
        assert_same_loss(monkeypatch, plain, fused, inputs, loss_type=loss_type, entropy_coef=0.01)


def test_bf16_head_is_no_less_accurate_than_trls(model_dir, tmp_path, batch):
    """Under bf16 autocast both heads multiply bf16 hidden states and weights; covkernels keeps the logits in
    fp32, TRL rounds them to bf16. Against float64 on the same bf16 operands, covkernels' error is at most
    TRL's (and within fp32 accumulation)."""
    plain = make_trainer(GRPOTrainer, model_dir, str(tmp_path), bf16=True)
    fused = make_trainer(FusedGRPOTrainer, model_dir, str(tmp_path), bf16=True, impl="torch")
    inputs = batch[0]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    valid = inputs["completion_mask"].bool()
    with torch.no_grad():
        with fused.accelerator.autocast():
            hidden = fused.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        weight = fused.model.lm_head.weight
        logits = hidden[:, -K - 1:-1].bfloat16().double() @ weight.bfloat16().double().T / fused.temperature
        ref = torch.log_softmax(logits, -1)
        ref_logp = ref.gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)
        ref_entropy = -(ref.exp() * ref).sum(-1)
        ours = fused._get_per_token_logps_and_entropies(fused.model, ids, mask, K, compute_entropy=True)
        trls = plain._get_per_token_logps_and_entropies(plain.model, ids, mask, K, compute_entropy=True)
    for out, trl_out, reference in zip(ours, trls, (ref_logp, ref_entropy)):
        err = (out.double() - reference)[valid].abs().max().item()
        trl_err = (trl_out.double() - reference)[valid].abs().max().item()
        assert err <= trl_err and err < 1e-5, (err, trl_err)
    assert B * K > valid.sum()  # padding present; its outputs are 0
    assert torch.all(ours[0][~valid] == 0) and torch.all(ours[1][~valid] == 0)


def test_fp32_head_under_bf16_autocast_equals_trls(model_dir, tmp_path, batch, monkeypatch):
    """cast_lm_head_to_fp32: the backbone in bf16 autocast, the head in fp32 in both trainers."""
    plain = make_trainer(GRPOTrainer, model_dir, str(tmp_path), bf16=True, cast_lm_head_to_fp32=True)
    fused = make_trainer(FusedGRPOTrainer, model_dir, str(tmp_path), bf16=True, cast_lm_head_to_fp32=True,
                         impl="torch")
    assert fused.model.lm_head.weight.dtype == torch.float32
    assert_same_loss(monkeypatch, plain, fused, batch[0], loss_type="grpo", entropy_coef=0.01)
