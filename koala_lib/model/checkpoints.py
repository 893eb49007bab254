"""Checkpoint interop: Hugging Face LLaMA folders ⇄ the Flax model.

    model = load_hf("path/to/hf-folder")        # safetensors, single file or sharded with an index
    save_hf(model, "out/", tokenizer_from="path/to/hf-folder")   # loads as is in transformers and vLLM

Tensors are read one at a time (safetensors `safe_open`) into an abstract model, so peak host memory stays
near one copy of the weights. Only safetensors are read: never a pickle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from koala_lib.files import staged_folder

from .llama import Llama, inv_frequencies
from .presets import LlamaConfig, from_hf_config, preset, to_hf_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "generation_config.json")


def resolve_checkpoint(name: str) -> Path:
    """A local Hugging Face folder for `name`: `default` (the embedded SmolLM2), a folder, or a hub id (downloaded)."""
    if name == "default":
        from .gguf_default import default_model_dir

        return default_model_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
    except Exception as exc:  # offline, gated, or missing: one clear message
        raise FileNotFoundError(f"{name!r} is neither a local folder nor a reachable hub repository ({type(exc).__name__}: {exc})") from None


def model_config(init: str, preset_name: str, base: str, vocab_size: int) -> tuple[LlamaConfig, Path | None]:
    """(architecture, base folder or None) of a model: `init` "random" gives the named preset with the tokenizer's
    vocabulary and no folder; otherwise `base` (as resolve_checkpoint reads it) and its own config.json."""
    if init == "random":
        return preset(preset_name).replace(vocab_size=vocab_size), None
    folder = resolve_checkpoint(base)
    return from_hf_config(json.loads((folder / "config.json").read_text())), folder


def model_kwargs(model_cfg) -> dict:
    """Llama keyword arguments from the config's `model` section (dtypes, attention, remat)."""
    return {
        "dtype": jnp.dtype(model_cfg.dtype),
        "param_dtype": jnp.dtype(model_cfg.param_dtype),
        "attention": None if model_cfg.attention == "auto" else model_cfg.attention,
        "remat": model_cfg.remat,
    }


def load_base(model_cfg, **overrides) -> Llama:
    """The profile's base model: `model.base` resolved to a Hugging Face folder and loaded with its dtypes."""
    return load_hf(resolve_checkpoint(model_cfg.base), **{**model_kwargs(model_cfg), **overrides})


def init_model(model_cfg, seed: int) -> Llama:
    """A randomly initialized model of the config's `model.preset` (the `debug` preset trains from scratch)."""
    from .presets import preset

    return Llama(preset(model_cfg.preset), rngs=nnx.Rngs(seed), **model_kwargs(model_cfg))


def parameter_table(model: Llama) -> Iterator[tuple[str, Callable[[], nnx.Variable], bool]]:
    """(Hugging Face tensor name, the matching nnx Param, transpose?) for every parameter of the model."""
    yield "model.embed_tokens.weight", (lambda: model.embed_tokens.embedding), False
    for i, block in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{prefix}self_attn.{name}.weight", (lambda b=block, n=name: getattr(b.self_attn, n).kernel), True
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield f"{prefix}mlp.{name}.weight", (lambda b=block, n=name: getattr(b.mlp, n).kernel), True
        yield f"{prefix}input_layernorm.weight", (lambda b=block: b.input_layernorm.weight), False
        yield f"{prefix}post_attention_layernorm.weight", (lambda b=block: b.post_attention_layernorm.weight), False
    yield "model.norm.weight", (lambda: model.norm.weight), False
    if model.lm_head is not None:
        yield "lm_head.weight", (lambda: model.lm_head.kernel), True


def param_path(hf_name: str) -> str:
    """The model's parameter path (`layers/3/mlp/up_proj/kernel`) for a Hugging Face tensor name."""
    name = hf_name.removeprefix("model.")
    if name == "embed_tokens.weight":
        return "embed_tokens/embedding"
    leaf = "kernel" if name.endswith("_proj.weight") or name == "lm_head.weight" else "weight"
    return name.rsplit(".", 1)[0].replace(".", "/") + "/" + leaf


def safetensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from `model.safetensors.index.json` or the single `model.safetensors`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors are read)")
    from safetensors import safe_open

    with safe_open(single, framework="numpy") as fh:
        return {name: single for name in fh.keys()}


def abstract_model(cfg: LlamaConfig, **kwargs) -> Llama:
    """A model whose parameters are shapes only (no memory), to be filled by a loader."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), **kwargs))


def load_hf(folder: str | Path, *, sharding: Callable[[str], jax.sharding.Sharding] | None = None, **model_kwargs) -> Llama:
    """Load a Hugging Face LLaMA folder into the Flax model, tensor by tensor.

    `sharding(hf_name)` places each tensor straight onto its devices; without it, the default device.
    `model_kwargs` go to `Llama` (dtype, param_dtype, attention, remat).
    """
    from safetensors import safe_open

    folder = Path(folder)
    cfg = from_hf_config(json.loads((folder / "config.json").read_text()))
    model = abstract_model(cfg, **model_kwargs)
    files = safetensor_files(folder)
    handles: dict[Path, object] = {}
    try:
        for name, param, transpose in parameter_table(model):
            if name not in files:
                raise KeyError(f"{folder}: tensor {name} is missing")
            if files[name] not in handles:
                handles[files[name]] = safe_open(files[name], framework="numpy")
            array = handles[files[name]].get_tensor(name)
            variable = param()
            array = array.T if transpose else array
            expected = variable.get_value()
            if tuple(array.shape) != tuple(expected.shape):
                raise ValueError(f"{name}: shape {array.shape} in the checkpoint, {expected.shape} expected")
            if sharding is None:
                variable.set_value(jnp.asarray(array, dtype=expected.dtype))
            else:  # each device receives only its own slice of the host array
                host = np.asarray(array, dtype=expected.dtype)
                variable.set_value(jax.make_array_from_callback(host.shape, sharding(name), lambda index, h=host: h[index]))
    finally:
        handles.clear()
    model.inv_freq.set_value(inv_frequencies(cfg))
    return model


def model_tensors(model: Llama) -> dict[str, np.ndarray]:
    """The model's parameters under Hugging Face names and layouts, as host numpy arrays."""
    out = {}
    for name, param, transpose in parameter_table(model):
        array = np.asarray(jax.device_get(param().get_value()))
        out[name] = np.ascontiguousarray(array.T) if transpose else array
    return out


def save_hf(model: Llama, out_dir: str | Path, tokenizer_from: str | Path | None = None) -> Path:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer files copied from `tokenizer_from`)."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    with staged_folder(out_dir) as tmp:
        config = to_hf_config(model.cfg)
        config["torch_dtype"] = str(jnp.dtype(model.norm.weight.get_value().dtype))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(model_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_from) / name).is_file():
                    shutil.copy2(Path(tokenizer_from) / name, tmp / name)
    return out_dir
