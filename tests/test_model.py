"""The Flax LLaMA against transformers' PyTorch LlamaForCausalLM, packed segments, and HF round trips."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402
from transformers import LlamaConfig as HFConfig  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from koala_lib.model.checkpoints import load_hf, save_hf  # noqa: E402
from koala_lib.model.presets import PRESETS, from_hf_config  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
CONFIGS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
    "gqa-tied": dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
    "gqa-theta5e5": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0),
    "gqa-llama3-rope": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3),
}


def hf_model(name, tmp_path, seed=0):
    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=320, hidden_size=48, intermediate_size=80, num_hidden_layers=3, max_position_embeddings=256, **CONFIGS[name])
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path / name
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", [(1, 7), (3, 37), (2, 96), (1, 150)])  # 150: causal query blocks
def test_logits_parity_with_transformers_on_random_configs(name, shape, tmp_path):
    model, folder = hf_model(name, tmp_path)
    ids = np.random.default_rng(shape[1]).integers(0, 320, size=shape)
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(load_hf(folder)(jnp.asarray(ids)))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-4


def test_config_round_trip_through_hf():
    for name, cfg in PRESETS.items():
        from koala_lib.model.presets import to_hf_config

        assert from_hf_config(json.loads(json.dumps(to_hf_config(cfg)))) == cfg, name


def test_packed_row_gives_each_segment_its_own_logits(tmp_path):
    _, folder = hf_model("gqa-llama3-rope", tmp_path)
    model = load_hf(folder)
    rng = np.random.default_rng(3)
    pieces = [rng.integers(0, 320, size=n) for n in (41, 35, 60)]
    tokens = np.concatenate(pieces + [np.zeros(4, dtype=np.int64)])[None]  # three segments, then padding: 140 tokens,
    # so self-attention runs in causal query blocks of 35 that cut across the segments
    segments = np.concatenate([np.full(len(p), i + 1) for i, p in enumerate(pieces)] + [np.zeros(4)])[None].astype(np.int32)
    positions = np.concatenate([np.arange(len(p)) for p in pieces] + [np.arange(4)])[None].astype(np.int32)
    packed = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))[0]
    start = 0
    for piece in pieces:
        alone = np.asarray(model(jnp.asarray(piece[None])))[0]
        assert np.abs(packed[start : start + len(piece)] - alone).max() < 1e-5
        start += len(piece)


@pytest.mark.parametrize("name", ["mha-untied", "gqa-tied"])
def test_hf_to_params_to_hf_is_bit_exact(name, tmp_path):
    from safetensors.numpy import load_file

    _, folder = hf_model(name, tmp_path)
    out = save_hf(load_hf(folder), tmp_path / "exported")
    original, exported = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    original.pop("lm_head.weight", None) if CONFIGS[name]["tie_word_embeddings"] else None
    assert set(exported) == set(original)
    for key in original:
        assert original[key].dtype == exported[key].dtype and np.array_equal(original[key], exported[key]), key
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, LlamaForCausalLM.from_pretrained(folder).eval()(ids).logits)


@pytest.mark.slow
def test_smollm2_parity_with_transformers():
    """Real weights. SmolLM2's hidden states reach ~2e4, so the order of fp32 sums alone moves its logits by
    ~1e-4: transformers' own fp32 logits are that far from an fp64 run. So the kit is measured against the fp64
    run too: its fp32 error must be of the same order as transformers' (within 3x), with the same top token."""
    from transformers import AutoModelForCausalLM

    from koala_lib.model.gguf_default import default_model_dir

    folder = default_model_dir()
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    exact = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    model = load_hf(folder)
    for shape in [(1, 9), (2, 40), (4, 64)]:
        ids = np.random.default_rng(shape[1]).integers(0, 49152, size=shape)
        with torch.no_grad():
            ref = reference(torch.tensor(ids)).logits.numpy()
            ref64 = exact(torch.tensor(ids)).logits.numpy()
        ours = np.asarray(model(jnp.asarray(ids)))
        ours_error, torch_error = np.abs(ours - ref64).max(), np.abs(ref - ref64).max()
        print(f"{shape}: |kit - transformers| {np.abs(ours - ref).max():.2e}, error vs fp64: kit {ours_error:.2e}, transformers {torch_error:.2e}")
        assert ours_error < 3 * torch_error, shape
        assert np.abs(ours - ref).max() < 5e-4, shape
        assert (ours.argmax(-1) == ref.argmax(-1)).all(), shape


def test_weights_export_cli_writes_a_folder_transformers_loads(tmp_path, capsys):
    from koala_lib.cli import main

    model, folder = hf_model("gqa-theta5e5", tmp_path)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    assert main(["weights", "export", "--checkpoint", str(folder), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"model_max_length": 256}'
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert main(["weights", "export", "--checkpoint", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o2")]) == 2


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_layout_checkpoint_converts_back_to_equal_logits(tmp_path, shards, capsys):
    """A Meta-layout checkpoint made from a random HF model (interleaved rotary rows, model-parallel shards)."""
    from koala_lib.cli import main
    from koala_lib.model.meta import LAYER_TENSORS, TOP_TENSORS, halves_to_interleaved

    model, folder = hf_model("gqa-theta5e5", tmp_path)
    cfg = model.config
    state = {k: v.clone() for k, v in model.state_dict().items()}
    meta = {}
    for name, (hf, axis) in TOP_TENSORS.items():
        meta[name] = (state[hf], axis)
    for i in range(cfg.num_hidden_layers):
        for name, (hf, axis) in LAYER_TENSORS.items():
            tensor = state[f"model.layers.{i}.{hf}"]
            if name == "attention.wq.weight":
                tensor = halves_to_interleaved(tensor, cfg.num_attention_heads)
            if name == "attention.wk.weight":
                tensor = halves_to_interleaved(tensor, cfg.num_key_value_heads)
            meta[f"layers.{i}.{name}"] = (tensor, axis)
    out = tmp_path / "meta"
    out.mkdir()
    for s in range(shards):
        shard = {k: (t if axis is None else torch.chunk(t, shards, dim=axis)[s]).contiguous() for k, (t, axis) in meta.items()}
        torch.save(shard, out / f"consolidated.{s:02d}.pth")
    (out / "params.json").write_text(json.dumps({
        "dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads, "norm_eps": cfg.rms_norm_eps, "rope_theta": 500000.0, "vocab_size": -1,
    }))
    assert main(["weights", "from-meta", "--meta", str(out), "--out", str(tmp_path / "hf")]) == 0
    converted = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, model(ids).logits)
    ours = np.asarray(load_hf(tmp_path / "hf")(jnp.asarray(ids.numpy())))
    with torch.no_grad():
        assert np.abs(ours - model(ids).logits.numpy()).max() < 1e-4


def test_loading_places_each_tensor_on_its_sharding(tmp_path):
    """On 8 virtual CPU devices: tensors go straight to the sharding the caller names, and logits are unchanged."""
    import subprocess
    import sys
    import textwrap

    model, folder = hf_model("gqa-tied", tmp_path)
    ids = np.random.default_rng(0).integers(0, 320, size=(4, 12))
    with torch.no_grad():
        np.save(tmp_path / "ref.npy", model(torch.tensor(ids)).logits.numpy())
    np.save(tmp_path / "ids.npy", ids)
    script = textwrap.dedent(f"""
        import numpy as np, jax, jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from koala_lib.model.checkpoints import load_hf
        assert jax.device_count() == 8
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
        def sharding(name):
            if name.endswith("embed_tokens.weight") or "mlp" in name:
                return NamedSharding(mesh, P("fsdp", None))
            return NamedSharding(mesh, P())
        model = load_hf({str(folder)!r}, sharding=sharding)
        emb = model.embed_tokens.embedding[...]
        assert emb.sharding.spec == P("fsdp", None), emb.sharding
        assert len(emb.addressable_shards) == 8 and emb.addressable_shards[0].data.shape == (80, 48)
        assert model.layers[0].mlp.gate_proj.kernel[...].sharding.spec == P("fsdp", None)
        logits = np.asarray(model(jnp.asarray(np.load({str(tmp_path / 'ids.npy')!r}))))
        assert np.abs(logits - np.load({str(tmp_path / 'ref.npy')!r})).max() < 1e-4
        print("ok")
    """)
    env = {**__import__("os").environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_bf16_compute_stays_close_to_fp32(tmp_path):
    _, folder = hf_model("gqa-tied", tmp_path)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 320, size=(2, 16)))
    fp32 = np.asarray(load_hf(folder)(ids))
    bf16 = load_hf(folder, dtype=jnp.bfloat16)
    assert bf16.norm.weight[...].dtype == jnp.float32  # master weights stay fp32
    out = np.asarray(bf16(ids))
    assert out.dtype == np.float32 and 0 < np.abs(out - fp32).max() < 0.05


def test_profile_model_section_builds_models(tmp_path):
    from koala_lib.config import load
    from koala_lib.model.checkpoints import init_model, load_base, model_kwargs

    cfg = load("smoke", ["model.preset=debug", "model.remat=dots", f"model.base={tmp_path / 'x'}"])
    model = init_model(cfg.model, seed=0)
    assert model.cfg == PRESETS["debug"] and model.remat == "dots"
    logits = model(jnp.ones((2, 5), dtype=jnp.int32))
    assert logits.shape == (2, 5, 512) and np.isfinite(np.asarray(logits)).all()
    assert model_kwargs(load("koala13b").model)["dtype"] == jnp.bfloat16
    _, folder = hf_model("mha-untied", tmp_path)
    assert load_base(load("smoke", [f"model.base={folder}"]).model).cfg.num_layers == 3


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_gradients(policy):
    from flax import nnx

    from koala_lib.model.llama import Llama

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, size=(2, 9)))
    loss = lambda m: m(tokens).mean()
    plain = nnx.grad(loss)(Llama(PRESETS["debug"], rngs=nnx.Rngs(0)))
    remat = nnx.grad(loss)(Llama(PRESETS["debug"], rngs=nnx.Rngs(0), remat=policy))
    import jax

    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), nnx.to_pure_dict(plain), nnx.to_pure_dict(remat))
    assert max(jax.tree_util.tree_leaves(diffs)) < 1e-6
