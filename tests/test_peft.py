"""PEFT LoRA adapter folders: the kit's adapters loaded by PEFT itself, merged folders in transformers, errors."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import LlamaForCausalLM

from koala_lib.cli import main
from koala_lib.model import lora
from koala_lib.model.checkpoints import load_hf, save_hf
from koala_lib.model.llama import Llama, stack_layers
from koala_lib.model.peft import AdapterError, load_adapter, merge_folder, save_adapter
from koala_lib.model.presets import preset

RANK, ALPHA = 4, 8
EVERY = (*lora.TARGETS, r"lm_head")  # all seven projections of both layers, and lm_head
SOME = (r"layers/0/self_attn/q_proj", r"layers/1/mlp/down_proj")  # one projection in one layer each
IDS = np.random.default_rng(0).integers(0, 512, size=(2, 9))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The random `debug` model (2 layers, untied) as a Hugging Face folder, with a generation_config.json."""
    folder = save_hf(Llama(preset("debug"), rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("base") / "hf")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


def trained_adapters(base_dir, targets, seed=2):
    """The kit's adapters on the base as LoRA training leaves them: A as initialised, B random (0.05 scale)."""
    model = load_hf(base_dir)
    lora.add_adapters(model, rank=RANK, alpha=ALPHA, targets=targets, key=jax.random.key(1))
    adapters = nnx.to_pure_dict(nnx.split(model, nnx.LoRAParam, ...)[1])
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree.map_with_path(
        lambda path, x: 0.05 * jax.random.normal(next(keys), x.shape) if path[-1].key == "lora_b" else x, adapters)


def kit_logits(base_dir, adapters=None):
    """The kit's fp32 logits on IDS for the base, with the adapters merged into its kernels when given."""
    model = load_hf(base_dir)
    if adapters is not None:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        nnx.replace_by_pure_dict(params, lora.merge_adapters(nnx.to_pure_dict(params), adapters, ALPHA / RANK))
        model = nnx.merge(graphdef, params, rest)
    return np.asarray(model(jnp.asarray(IDS)))


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def peft_model(base_dir, adapter_dir):
    """PeftModel.from_pretrained on CPU in fp32, failing on any warning about keys it did not load."""
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    assert not [str(w.message) for w in caught if "keys" in str(w.message)]
    return model


def adapted_modules(model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, module in model.named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer)}


EXPECTED = {
    EVERY: ({f"model.layers.{i}.{m}" for i in (0, 1) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj")} | {"lm_head"},
        ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]),
    SOME: ({"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"},
           ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("targets", [EVERY, SOME], ids=["every-short-names", "some-full-names"])
def test_peft_computes_the_kit_merged_logits(base_dir, tmp_path, targets):
    adapters = trained_adapters(base_dir, targets)
    out = save_adapter(adapters, tmp_path / "adapter", rank=RANK, alpha=ALPHA, base_model=str(base_dir))
    modules, written_targets = EXPECTED[targets]
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == written_targets
    model = peft_model(base_dir, out)
    assert adapted_modules(model) == modules  # PEFT adapted exactly the modules the kit did
    ours, base = kit_logits(base_dir, adapters), kit_logits(base_dir)
    assert np.abs(ours - base).max() > 1e-2  # the adapters matter
    assert np.abs(torch_logits(model) - ours).max() < 1e-4


def test_short_names_need_the_layer_count(base_dir, tmp_path):
    adapters = trained_adapters(base_dir, lora.TARGETS)
    unknown = save_adapter(adapters, tmp_path / "a", rank=RANK, alpha=ALPHA, base_model="some/hub-id")
    config = json.loads((unknown / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == EXPECTED[EVERY][0] - {"lm_head"}  # full names: PEFT must not guess
    given = save_adapter(adapters, tmp_path / "b", rank=RANK, alpha=ALPHA, base_model="some/hub-id", num_layers=2)
    assert json.loads((given / "adapter_config.json").read_text())["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    longer = save_adapter(adapters, tmp_path / "c", rank=RANK, alpha=ALPHA, base_model="some/hub-id", num_layers=3)
    assert len(json.loads((longer / "adapter_config.json").read_text())["target_modules"]) == 14


def test_save_load_round_trip_is_exact_in_both_layouts(base_dir, tmp_path):
    adapters = trained_adapters(base_dir, EVERY)
    folder = save_adapter(adapters, tmp_path / "adapter", rank=RANK, alpha=ALPHA, base_model=str(base_dir))
    tensors = load_file(folder / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (RANK, 128) and b.shape == (64, RANK) and a.dtype == b.dtype == np.float32
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (512, RANK)
    loaded, rank, alpha = load_adapter(folder)
    assert (rank, alpha) == (RANK, ALPHA) and list(loaded["layers"]) == [0, 1]
    assert jax.tree.structure(loaded) == jax.tree.structure(adapters)
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapters)):
        assert x.dtype == np.float32 and np.array_equal(x, np.asarray(y))
    scanned = {"layers": stack_layers(adapters)["layers"], "lm_head": adapters["lm_head"]}  # as a scanned model holds them
    again = save_adapter(scanned, tmp_path / "scanned", rank=RANK, alpha=ALPHA, base_model=str(base_dir))
    again = load_file(again / "adapter_model.safetensors")
    assert again.keys() == tensors.keys() and all(np.array_equal(again[k], tensors[k]) for k in tensors)


@pytest.mark.slow
def test_merged_folder_loads_in_transformers_with_the_same_logits(base_dir, tmp_path):
    adapters = trained_adapters(base_dir, EVERY)
    adapter = save_adapter(adapters, tmp_path / "adapter", rank=RANK, alpha=ALPHA, base_model=str(base_dir))
    out = merge_folder(base_dir, adapter, tmp_path / "merged")
    assert (out / "generation_config.json").is_file()  # the base's files beside the weights
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    merged = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert np.abs(torch_logits(merged) - kit_logits(base_dir, adapters)).max() < 1e-4


def test_merge_keeps_a_bf16_base_in_bf16(base_dir, tmp_path):
    bf16 = save_hf(load_hf(base_dir, param_dtype=jnp.bfloat16), tmp_path / "bf16")
    adapters = trained_adapters(base_dir, SOME)
    adapter = save_adapter(adapters, tmp_path / "adapter", rank=RANK, alpha=ALPHA, base_model=str(bf16))
    out = merge_folder(bf16, adapter, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    before, after = load_file(bf16 / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(t.dtype == jnp.bfloat16 for t in after.values())
    name = "model.layers.1.mlp.down_proj.weight"  # adapted: W + 2 A B in fp32, rounded to bf16
    pair = adapters["layers"][1]["mlp"]["down_proj"]
    want = (before[name].astype(np.float32).T + ALPHA / RANK * np.asarray(pair["lora_a"]) @ np.asarray(pair["lora_b"])).T
    assert np.abs(want - before[name].astype(np.float32)).max() > 1e-2  # the update is far above bf16 rounding
    np.testing.assert_allclose(after[name].astype(np.float32), want, rtol=2**-8, atol=0)
    untouched = "model.layers.0.mlp.down_proj.weight"
    assert np.array_equal(after[untouched], before[untouched])


def test_cli_merge_writes_the_folder(base_dir, tmp_path, capsys):
    adapter = save_adapter(trained_adapters(base_dir, SOME), tmp_path / "adapter", rank=RANK, alpha=ALPHA, base_model=str(base_dir))
    out = tmp_path / "merged"
    assert main(["weights", "merge", "--base", str(base_dir), "--adapter", str(adapter), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


# ----------------------------------------------------------------------------- broken adapters

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def edit_tensors(change):
    def edit(folder):
        path = folder / "adapter_model.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
    return edit


def edit_config(**changes):
    def edit(folder):
        path = folder / "adapter_config.json"
        config = {**json.loads(path.read_text()), **changes}
        path.write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))
    return edit


def rename(tensors):
    tensors[KEY_A.replace("q_proj", "qq_proj")] = tensors.pop(KEY_A)


BROKEN = {
    "renamed key": (edit_tensors(rename), r"layers\.0\.self_attn\.qq_proj\.lora_A\.weight is not the lora_A/lora_B weight"),
    "wrong shape": (edit_tensors(lambda t: t.update({KEY_B: t[KEY_B][:, :3]})),
                    r"q_proj\.lora_B\.weight has shape \[64, 3\]; \[out, 4\] expected"),
    "A without B": (edit_tensors(lambda t: t.pop(KEY_B)), r"q_proj\.lora_A\.weight has no lora_B\.weight"),
    "embedding": (edit_tensors(lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": t[KEY_A]})),
                  r"embed_tokens\.lora_embedding_A is not"),
    "no weights": (lambda f: (f / "adapter_model.safetensors").unlink(), r"adapter_model\.safetensors: missing"),
    "no config": (lambda f: (f / "adapter_config.json").unlink(), r"adapter_config\.json: missing"),
    "not LoRA": (edit_config(peft_type="IA3"), r"peft_type is 'IA3'; only LORA"),
    "DoRA": (edit_config(use_dora=True), r"use_dora = true: DoRA .* is not supported"),
    "rsLoRA": (edit_config(use_rslora=True), r"use_rslora = true: rank-stabilised LoRA .* is not supported"),
    "rank pattern": (edit_config(rank_pattern={"q_proj": 8}), r"rank_pattern = .*: a rank per module is not supported"),
    "alpha pattern": (edit_config(alpha_pattern={"q_proj": 8}), r"alpha_pattern = .*: an alpha per module is not supported"),
    "no alpha": (edit_config(lora_alpha=...), r"lora_alpha is missing"),
    "no r": (edit_config(r=...), r"adapter_config\.json: r is missing"),
}


@pytest.fixture(scope="module")
def good_adapter(base_dir, tmp_path_factory):
    return save_adapter(trained_adapters(base_dir, SOME), tmp_path_factory.mktemp("good") / "adapter", rank=RANK,
                        alpha=ALPHA, base_model=str(base_dir))


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_adapter_is_refused_with_what_is_wrong(good_adapter, tmp_path, case):
    import shutil

    folder = shutil.copytree(good_adapter, tmp_path / "adapter")
    edit, message = BROKEN[case]
    edit(folder)
    with pytest.raises(AdapterError, match=message):
        load_adapter(folder)


def test_peft_saved_lm_head_copy_is_skipped(good_adapter, tmp_path):
    import shutil

    folder = shutil.copytree(good_adapter, tmp_path / "adapter")
    edit_tensors(lambda t: t.update({"base_model.model.lm_head.base_layer.weight": np.zeros((512, 64), np.float32)}))(folder)
    adapters, _, _ = load_adapter(folder)
    assert "lm_head" not in adapters and set(adapters["layers"]) == {0, 1}


def test_cli_reports_a_broken_adapter_in_one_line(base_dir, good_adapter, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(good_adapter, tmp_path / "adapter")
    edit_tensors(rename)(folder)
    argv = ["weights", "merge", "--base", str(base_dir), "--adapter", str(folder), "--out", str(tmp_path / "merged")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("koala: error: ") and "qq_proj.lora_A.weight" in err and err.count("\n") == 1
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_an_adapter_that_does_not_fit_the_base(base_dir, tmp_path):
    narrow = Llama(preset("debug").replace(intermediate_size=96), rngs=nnx.Rngs(0))
    other = save_hf(narrow, tmp_path / "other")  # same layers, a narrower MLP
    adapter = save_adapter(trained_adapters(base_dir, SOME), tmp_path / "adapter", rank=RANK, alpha=ALPHA, base_model=str(base_dir))
    wrong = r"model\.layers\.1\.mlp\.down_proj's lora_A \[4, 128\] .* do not fit the base's weight \[64, 96\]"
    with pytest.raises(AdapterError, match=wrong):
        merge_folder(other, adapter, tmp_path / "merged")
    deep = save_hf(Llama(preset("debug").replace(num_layers=3), rngs=nnx.Rngs(0)), tmp_path / "deep")
    deeper = trained_adapters(deep, [r"layers/2/mlp/up_proj"])  # an adapter for a third layer
    adapter = save_adapter(deeper, tmp_path / "adapter3", rank=RANK, alpha=ALPHA, base_model="x")
    with pytest.raises(AdapterError, match=r"adapts model\.layers\.2\.mlp\.up_proj, which the base .* lacks \(it has 2 layers\)"):
        merge_folder(base_dir, adapter, tmp_path / "merged")
