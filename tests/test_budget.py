"""The compute and memory budget: GPU peaks, the allocator's share, MFU's useful work, and the memory estimate's parts."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from koala_lib.config import ConfigError, LoRAConfig, ModelConfig, TrainConfig, load
from koala_lib.model.llama import Llama, stack_layers, unstack_layers
from koala_lib.model.presets import preset
from koala_lib.model.sharding import LLAMA_RULES, P, match_rules
from koala_lib.train import budget
from koala_lib.train import residuals as budget_residuals
from koala_lib.train.step import target_weights, work

GIB = 2**30
LLAMA_13B = preset("llama-13b")


@pytest.mark.parametrize("kind, tflops, bandwidth", [
    ("NVIDIA H100 80GB HBM3", 989.0, 3350.0),
    ("NVIDIA H100 PCIe", 756.0, 2000.0),
    ("NVIDIA H100 NVL", 835.0, 3900.0),
    ("NVIDIA H200", 989.0, 4800.0),
    ("NVIDIA H200 NVL", 835.0, 4800.0),
    ("NVIDIA A100-SXM4-40GB", 312.0, 1555.0),
    ("NVIDIA A100-SXM4-80GB", 312.0, 2039.0),
    ("NVIDIA L40", 181.0, 864.0),  # not L4's row
    ("NVIDIA L40S", 362.0, 864.0),
    ("NVIDIA L4", 121.0, 300.0),
    ("NVIDIA A10", 125.0, 600.0),  # not A100's
])
def test_each_gpu_gets_its_own_data_sheet_row(kind, tflops, bandwidth):
    known = budget.known_gpu(kind)
    assert known[:2] == (tflops, bandwidth) and "data sheet" in known[2]
    peak, source = budget.peak_flops(SimpleNamespace(platform="gpu", device_kind=kind), "bfloat16")
    assert peak == tflops * 1e12 and kind in source


def test_a_gpu_without_bf16_tensor_cores_is_measured_not_given_a_peak():
    v100 = SimpleNamespace(platform="gpu", device_kind="Tesla V100-SXM2-32GB")
    assert budget.known_gpu(v100.device_kind)[0] is None
    peak, source = budget.peak_flops(v100, "bfloat16")
    assert source.startswith("measured") and peak == budget.measure_matmul_flops("bfloat16")


def test_the_device_limit_is_the_allocators_share_and_the_message_says_so(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)
    limit, source = budget.device_memory(40)
    assert limit == 30 * GIB and "75%" in source and "XLA_PYTHON_CLIENT_MEM_FRACTION" in source
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert budget.device_memory(40)[0] == pytest.approx(36 * GIB)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
    assert budget.device_memory(40)[0] == 40 * GIB
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    model = ModelConfig(dtype="bfloat16", remat="none", attention="cudnn")
    message = budget.fit_message(LLAMA_13B, model, TrainConfig(batch_size=8), (1, 8, 1), 2048, 30 * GIB, "a 40 GB card")
    assert "the check allows 27.0 GiB: 90% of 30.0 GiB (a 40 GB card)" in message and "model.remat=full" in message
    full = budget.fit_message(LLAMA_13B, ModelConfig(dtype="bfloat16", remat="full", attention="cudnn"), TrainConfig(batch_size=8),
                              (1, 8, 1), 2048, 30 * GIB, "a 40 GB card")
    assert "try XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 in the environment (34.2 GiB allowed)" in full  # 90% of 0.95 x 40


def _estimate(**changes):
    model = dict(dtype="bfloat16", remat="full", attention="xla")
    train = dict(batch_size=8, grad_accum=1)
    model.update({k: v for k, v in changes.items() if k in model})
    train.update({k: v for k, v in changes.items() if k in train})
    return budget.estimate_memory(LLAMA_13B, ModelConfig(**model), TrainConfig(**train), (1, 8, 1), 2048)


def test_remat_dots_keeps_every_layers_fp32_attention_logits():
    dots, no_batch = _estimate(remat="dots"), _estimate(remat="dots_no_batch")
    # 40 layers x 40 heads x 2048 queries x 1280 keys (4 causal blocks) x 4 bytes: about 15.6 GiB per device
    logits = 40 * 40 * 2048 * 2048 * 10 / 16 * 4
    assert dots.activations - no_batch.activations == pytest.approx(logits, rel=0.05)
    assert _estimate(remat="dots", attention="cudnn").activations < dots.activations - 0.9 * logits  # the fused kernel keeps none


def test_gradient_accumulation_holds_two_gradients():
    one, two = _estimate(grad_accum=1), _estimate(grad_accum=2, batch_size=16)
    assert one.grads == pytest.approx(LLAMA_13B.params_count() * 4 / 8)
    assert two.grads == 2 * one.grads
    assert two.activations == one.activations  # the same rows per micro-batch


def test_mfu_counts_causal_pairs_within_each_packed_example_and_no_padding():
    segments = np.array([[1, 1, 1, 2, 2, 0, 0, 0]])  # examples of 3 and 2 tokens, then 3 of padding
    positions = np.array([[0, 1, 2, 0, 1, 0, 0, 0]])
    batch = {"segment_ids": jnp.asarray(segments), "positions": jnp.asarray(positions)}
    counted = {k: float(v) for k, v in work(batch).items()}
    assert counted == {"tokens": 5.0, "attention_pairs": 3 * 4 / 2 + 2 * 3 / 2}
    cfg = preset("debug")
    useful = budget.useful_flops(cfg, counted["tokens"], counted["attention_pairs"])
    assert useful == 6 * budget.matmul_params(cfg) * 5 + 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * 9
    assert useful < budget.flops_per_token(cfg, 8) * 8  # one example filling the row
    assert float(target_weights({**batch, "loss_mask": jnp.ones((1, 8), jnp.int32), "tokens": jnp.zeros((1, 8), jnp.int32)}).sum()) == 3


def test_scanned_layers_stack_and_unstack_and_keep_the_layer_axis_whole():
    cfg = preset("debug")
    unrolled = nnx.to_pure_dict(nnx.split(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[1])
    scanned = nnx.to_pure_dict(nnx.split(Llama(cfg, rngs=nnx.Rngs(0), scan_layers=True), nnx.Param, ...)[1])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), stack_layers(unrolled), scanned))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), unstack_layers(scanned), unrolled))
    specs = match_rules(LLAMA_RULES, scanned)
    assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["input_layernorm"]["weight"] == P(None)
    assert match_rules(LLAMA_RULES, unrolled)["layers"][1]["mlp"]["down_proj"]["kernel"] == P("tensor", "fsdp")


@pytest.mark.parametrize("remat", ["none", "full", "dots_no_batch"])
def test_scanned_layers_compute_what_unrolled_layers_do(remat):
    cfg = preset("debug")
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, cfg.vocab_size)
    segments = jnp.array([[1] * 25 + [2] * 15, [1] * 40])
    models = [Llama(cfg, rngs=nnx.Rngs(0), remat=remat, scan_layers=scan) for scan in (False, True)]
    logits = [m(tokens, segment_ids=segments) for m in models]
    np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-5)

    def grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        g = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens, segment_ids=segments) ** 2))(params)
        return nnx.to_pure_dict(g)

    unrolled, scanned = grads(models[0]), grads(models[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), stack_layers(unrolled), scanned)
    with pytest.raises(ValueError, match="unrolled layers"):
        models[1].extend(tokens[:, :1], jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 8), bool), None, 0)


# ----------------------------------------------------------------------------- LoRA

LAYER_ADAPTERS_13B = 16 * (4 * (5120 + 5120) + 3 * (5120 + 13824))  # rank 16 on q, k, v, o, gate, up, down: 1,564,672
ADAPTERS_13B = 40 * LAYER_ADAPTERS_13B  # 62,586,880


def _lora(**changes):
    train = dict(method="lora", lora=LoRAConfig(rank=16, alpha=32.0), batch_size=8, grad_accum=1)
    train.update(changes)
    return TrainConfig(**train)


def test_koala13b_lora_fits_one_80gb_card_where_the_full_fine_tune_does_not(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)
    cfg = load("koala13b_lora")
    assert cfg.train.method == "lora" and cfg.model.init == "pretrained" and cfg.train.mesh == "1,1,1"
    assert budget_residuals.lora_adapters(LLAMA_13B, 16, cfg.train.lora.targets).count == ADAPTERS_13B
    est = budget.estimate_memory(LLAMA_13B, cfg.model, cfg.train, (1, 1, 1), cfg.conditioning.seq_len)
    assert est.params == LLAMA_13B.params_count() * 2 + ADAPTERS_13B * 4  # the bf16 base (13.0e9 x 2 bytes) + fp32 adapters
    assert est.optimizer == ADAPTERS_13B * 8  # two fp32 moments of the adapters alone
    assert est.grads == ADAPTERS_13B * 8  # grad_accum 8: the running sum and a micro-batch's
    assert est.total / GIB == pytest.approx(42.07, rel=0.02)  # the figure params/koala13b_lora.yaml's comment gives
    limit, source = budget.device_memory(80)
    assert budget.fit_message(LLAMA_13B, cfg.model, cfg.train, (1, 1, 1), 2048, limit, source) is None
    full = replace(cfg.train, method="full")
    assert budget.estimate_memory(LLAMA_13B, cfg.model, full, (1, 1, 1), 2048).total / GIB == pytest.approx(254.1, rel=0.02)
    message = budget.fit_message(LLAMA_13B, cfg.model, full, (1, 1, 1), 2048, limit, source)
    assert message and "train.method=lora (42.1 GiB)" in message
    with pytest.raises(ConfigError, match="model.init is random"):
        load("koala13b_lora", ["model.init=random"])


@pytest.mark.parametrize("remat", ["none", "full"])
def test_a_lora_layer_keeps_what_a_fully_trained_layer_keeps_without_its_weight_casts(remat):
    adapted = budget_residuals.lora_adapters(LLAMA_13B, 16, LoRAConfig().targets).layers[0]
    assert adapted == ("mlp/down_proj", "mlp/gate_proj", "mlp/up_proj", "self_attn/k_proj", "self_attn/o_proj",
                       "self_attn/q_proj", "self_attn/v_proj")
    full = budget_residuals.layer_residual_bytes(LLAMA_13B, "bfloat16", remat, 1, 2048, "xla")
    lora = budget_residuals.layer_residual_bytes(LLAMA_13B, "bfloat16", remat, 1, 2048, "xla", lora=(16, adapted))
    assert lora[0] == pytest.approx(full[0], rel=0.03)  # the same activations (less the norms' inputs their weights' gradients read)
    if remat == "none":  # the backward reads each weight: full fine-tuning keeps bf16 casts of the fp32 weights, LoRA of its adapters alone
        assert full[1] == pytest.approx(2 * budget.layer_params(LLAMA_13B), rel=1e-4)
        assert lora[1] == 2 * LAYER_ADAPTERS_13B
    else:
        assert full[1] == lora[1] == 0


def test_a_dots_policy_keeps_both_paths_of_an_adapted_projection_feeding_a_nonlinearity():
    """Under `dots_no_batch` a LoRA layer keeps the base and low-rank outputs of q, k, v (rotary, attention), o (the
    residual's norm), gate and up (SwiGLU) separately, since their sum is no matmul output, plus the [tokens, r]
    intermediates; down_proj's output goes only into the residual sum, which the backward never reads."""
    adapted = budget_residuals.lora_adapters(LLAMA_13B, 16, LoRAConfig().targets).layers[0]
    full = budget_residuals.layer_residual_bytes(LLAMA_13B, "bfloat16", "dots_no_batch", 1, 2048, "xla")[0]
    lora = budget_residuals.layer_residual_bytes(LLAMA_13B, "bfloat16", "dots_no_batch", 1, 2048, "xla", lora=(16, adapted))[0]
    assert lora - full == 2 * 2048 * (4 * 5120 + 2 * 13824 + 7 * 16)


def test_frozen_weights_have_no_gradient_at_the_peaks():
    """On 8 FSDP devices: a LoRA layer's backward gathers its bf16 weights and holds no gradient of them, and the
    loss holds no gradient of the head; the gradients and moments are the replicated adapters'."""
    model = ModelConfig(dtype="bfloat16", remat="full", attention="xla")
    full = budget.estimate_memory(LLAMA_13B, model, TrainConfig(batch_size=8), (1, 8, 1), 2048)
    lora = budget.estimate_memory(LLAMA_13B, model, _lora(), (1, 8, 1), 2048)
    adapted = budget_residuals.lora_adapters(LLAMA_13B, 16, LoRAConfig().targets).layers[0]
    recomputed = budget_residuals.layer_residual_bytes(LLAMA_13B, "bfloat16", "none", 1, 2048, "xla", lora=(16, adapted))[0]
    per_layer, head, logits = budget.layer_params(LLAMA_13B), 32000 * 5120, 4 * 2048 * 32000
    assert lora.layer == pytest.approx(per_layer * 2 + LAYER_ADAPTERS_13B * 4 + budget.RECOMPUTED_SHARE * recomputed)
    assert full.layer - budget.RECOMPUTED_SHARE * budget_residuals.layer_residual_bytes(LLAMA_13B, "bfloat16", "none", 1, 2048, "xla")[0] \
        == pytest.approx(per_layer * (4 + 2 + 4))  # fp32 gathered, its bf16 cast, its fp32 gradient
    assert lora.logits == head * 2 + 2 * logits
    assert full.logits == head * (4 + 2) + logits + 4 * head  # the head's gradient outgrows the logits' own
    assert lora.grads == ADAPTERS_13B * 4 and lora.optimizer == ADAPTERS_13B * 8  # not divided: replicated
    assert lora.params == pytest.approx(LLAMA_13B.params_count() * 2 / 8 + ADAPTERS_13B * 4)
    assert lora.activations == pytest.approx(full.activations, rel=0.01)  # remat full: each layer's input alone


def test_layers_below_the_lowest_adapter_keep_nothing_for_the_backward():
    cfg = preset("debug")  # 2 layers
    upper = budget_residuals.lora_adapters(cfg, 4, (r"layers/1/mlp/up_proj",))
    assert upper.layers == (None, ("mlp/up_proj",)) and upper.layer_params == (0, 4 * (64 + 128)) and upper.other == 0
    lower = budget_residuals.lora_adapters(cfg, 4, (r"layers/0/mlp/up_proj",))
    assert lower.layers == (("mlp/up_proj",), ())  # layer 1 is frozen but the gradient passes through it
    model = ModelConfig(dtype="float32", remat="none", attention="xla")
    train = lambda targets: _lora(lora=LoRAConfig(rank=4, alpha=8.0, targets=targets), batch_size=2)
    one = budget.estimate_memory(cfg, model, train((r"layers/1/mlp/up_proj",)), (1, 1, 1), 64)
    two = budget.estimate_memory(cfg, model, train((r"layers/0/mlp/up_proj",)), (1, 1, 1), 64)
    assert one.activations == pytest.approx(two.activations / 2, rel=0.05)
    head = budget.estimate_memory(cfg, model, train((r"lm_head",)), (1, 1, 1), 64)
    assert head.activations == head.layer == 0 and head.optimizer == 2 * 4 * 4 * (64 + 512)


def test_lora_runs_no_matmul_for_the_frozen_weights_gradients():
    model = ModelConfig(dtype="bfloat16", remat="none", attention="xla")
    tokens = 8 * 2048
    full = budget.executed_dot_flops(LLAMA_13B, model, 8, 2048, (1, 8, 1))
    assert budget.executed_dot_flops(LLAMA_13B, model, 8, 2048, (1, 8, 1), TrainConfig()) == full
    lora = budget.executed_dot_flops(LLAMA_13B, model, 8, 2048, (1, 8, 1), _lora())
    assert lora == full - 2 * budget.matmul_params(LLAMA_13B) * tokens + 6 * ADAPTERS_13B * tokens
