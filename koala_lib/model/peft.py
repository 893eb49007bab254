"""LoRA adapters in Hugging Face PEFT's folder layout, read and written without peft.

    save_adapter(adapters, "out/adapter", rank=8, alpha=16, base_model="path/to/hf-folder")
    adapters, rank, alpha = load_adapter("out/adapter")          # the kit's unrolled pure dict, fp32
    merge_folder("path/to/hf-folder", "out/adapter", "out/merged")   # W + (alpha / r) A B, a Hugging Face folder

A folder holds `adapter_config.json` and `adapter_model.safetensors`, as `PeftModel.save_pretrained` writes them
for a LlamaForCausalLM (task_type CAUSAL_LM): each tensor is named after its torch module,
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`, and stored like a torch Linear weight [out, in],
so PEFT's A is [r, in] and B [out, r]: the transposes of the kit's A [in, r] and B [r, out]. The update is
(lora_alpha / r) A B in both, so `peft.PeftModel.from_pretrained(base, folder)` computes what the kit trained.

`target_modules` is written as short names (`["q_proj", "v_proj"]`) when the adapters pick the same projections
in every layer of the base, and otherwise as full module names (`model.layers.3.self_attn.q_proj`), so PEFT
adapts exactly the modules the file holds. Variants the kit cannot compute (DoRA, rsLoRA, per-module ranks or
alphas, fully trained `modules_to_save`, ...) are refused with the config field that asks for them. A PEFT folder
that adapts lm_head may also hold `lm_head.base_layer.weight`, PEFT's copy of the base weight: it is skipped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from koala_lib.files import staged_folder

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
_MODULE = r"lm_head|model\.layers\.(?P<layer>\d+)\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
_KEY = re.compile(rf"{re.escape(PREFIX)}(?P<module>{_MODULE})\.lora_(?P<half>[AB])\.weight")
_SKIPPED = {PREFIX + "lm_head.base_layer.weight"}
# adapter_config.json fields that ask for something other than plain LoRA: field -> what it is
UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)", "use_rslora": "rank-stabilised LoRA (scale alpha / sqrt(r))",
    "rank_pattern": "a rank per module", "alpha_pattern": "an alpha per module",
    "modules_to_save": "fully trained modules beside the adapters", "lora_bias": "a bias on lora_B",
    "layer_replication": "replicated layers", "target_parameters": "LoRA on parameters rather than modules",
    "trainable_token_indices": "trained token embeddings",
}


class AdapterError(ValueError):
    """An adapter folder the kit cannot read or apply; the message names the file and the key."""


# ----------------------------------------------------------------------------- names


def _modules(adapters: dict) -> dict[str, dict]:
    """The kit's adapters (a nested pure dict) -> {Hugging Face module name: {"lora_a", "lora_b"}}."""
    out = {}

    def walk(node, path):
        if isinstance(node, dict) and "lora_a" in node:
            name = ".".join(str(p) for p in path)
            name = "model." + name if path[:1] == ("layers",) else name
            if not re.fullmatch(_MODULE, name):
                raise AdapterError(f"adapters: {'/'.join(map(str, path))} is not a projection PEFT adapts in LlamaForCausalLM")
            out[name] = node
        elif isinstance(node, dict):
            for key in sorted(node, key=lambda k: (isinstance(k, str), k)):  # layers in numeric order
                walk(node[key], (*path, key))
        else:
            raise AdapterError(f"adapters: {'/'.join(map(str, path))} holds no lora_a/lora_b pair")

    walk(adapters, ())
    return out


def _path(module: str) -> tuple:
    """`model.layers.3.self_attn.q_proj` -> ("layers", 3, "self_attn", "q_proj"); `lm_head` -> ("lm_head",)."""
    return tuple(int(p) if p.isdigit() else p for p in module.removeprefix("model.").split("."))


def _nest(pairs: dict[str, dict]) -> dict:
    out: dict = {}
    for module, pair in pairs.items():
        *parents, leaf = _path(module)
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = pair
    return out


def target_modules(modules: list[str], num_layers: int | None) -> list[str]:
    """PEFT's `target_modules` for exactly these modules: the short names when every one of the base's
    `num_layers` layers adapts the same projections (None: unknown, so never), else the full module names."""
    per_layer: dict[int, set[str]] = {}
    for name in modules:
        if name != "lm_head":
            per_layer.setdefault(_path(name)[1], set()).add(name.rsplit(".", 1)[1])
    chosen = list(per_layer.values())
    uniform = not per_layer or (sorted(per_layer) == list(range(num_layers or 0)) and all(c == chosen[0] for c in chosen))
    if not uniform:
        return list(modules)
    return sorted(set().union(*chosen) | ({"lm_head"} & set(modules)))


def _layer_count(base_model: str) -> int | None:
    config = Path(base_model).expanduser() / "config.json"
    return json.loads(config.read_text()).get("num_hidden_layers") if config.is_file() else None


# ----------------------------------------------------------------------------- writing


def save_adapter(adapters: dict, out_dir: str | Path, *, rank: int, alpha: float, base_model: str,
                 num_layers: int | None = None) -> Path:
    """Write the kit's adapters (pure dict, unrolled or scanned layout) as a PEFT LoRA folder.

    `base_model` goes to `base_model_name_or_path`. `num_layers` (default: read from `base_model`'s config.json
    when it is a local folder) lets `target_modules` be short names when every layer is adapted alike.
    """
    from safetensors.numpy import save_file

    if adapters.get("layers") and not all(isinstance(k, int) for k in adapters["layers"]):
        from .llama import unstack_layers  # scanned: [L, ...] arrays under one block

        adapters = unstack_layers(adapters)
    modules = _modules(adapters)
    if not modules:
        raise AdapterError("adapters: empty (no lora_a/lora_b pair to save)")
    tensors = {}
    for name, pair in modules.items():
        a, b = (np.asarray(pair[k], dtype=np.float32) for k in ("lora_a", "lora_b"))
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
            raise AdapterError(f"adapters: {name} has A {a.shape} and B {b.shape}; [in, {rank}] and [{rank}, out] expected for rank {rank}")
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)  # [r, in]
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)  # [out, r]
    layers = num_layers if num_layers is not None else _layer_count(str(base_model))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model), "revision": None,
        "inference_mode": True, "r": int(rank), "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": 0.0, "target_modules": target_modules(list(modules), layers), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False, "lora_bias": False,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "exclude_modules": None,
    }
    out_dir = Path(out_dir)
    with staged_folder(out_dir) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    return out_dir


# ----------------------------------------------------------------------------- reading


def read_config(folder: Path) -> dict:
    """adapter_config.json, checked: a plain LoRA with r and lora_alpha."""
    path = folder / CONFIG
    if not path.is_file():
        raise AdapterError(f"{path}: missing (a PEFT adapter folder holds {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise AdapterError(f"{path}: {key} is {'missing' if value is None else repr(value)}; a positive number is needed")
    if int(config["r"]) != config["r"]:
        raise AdapterError(f"{path}: r is {config['r']!r}; an integer is needed")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{path}: {key} = {json.dumps(config[key])}: {what} is not supported")
    return config


def load_adapter(folder: str | Path) -> tuple[dict, int, float]:
    """A PEFT LoRA folder -> (the kit's unrolled adapters as a pure dict of fp32 numpy arrays, rank, alpha)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for adapters saved in bf16)
    from safetensors import safe_open

    folder = Path(folder)
    config = read_config(folder)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    path = folder / WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{path}: missing (only safetensors adapters are read, never adapter_model.bin)")
    halves: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(path), framework="numpy") as fh:
        for key in fh.keys():
            if key in _SKIPPED:
                continue
            match = _KEY.fullmatch(key)
            if match is None:
                raise AdapterError(f"{path}: {key} is not the lora_A/lora_B weight of a LlamaForCausalLM projection")
            array = np.asarray(fh.get_tensor(key), dtype=np.float32)
            side = 0 if match["half"] == "A" else 1
            if array.ndim != 2 or array.shape[side] != rank:
                want = f"[{rank}, in]" if side == 0 else f"[out, {rank}]"
                raise AdapterError(f"{path}: {key} has shape {list(array.shape)}; {want} expected with r = {rank}")
            halves.setdefault(match["module"], {})[match["half"]] = array
    if not halves:
        raise AdapterError(f"{path}: holds no LoRA weights")
    pairs = {}
    for module, pair in halves.items():
        for have, lack in (("A", "B"), ("B", "A")):
            if lack not in pair:
                raise AdapterError(f"{path}: {PREFIX}{module}.lora_{have}.weight has no lora_{lack}.weight beside it")
        pairs[module] = {"lora_a": np.ascontiguousarray(pair["A"].T), "lora_b": np.ascontiguousarray(pair["B"].T)}
    order = sorted(pairs, key=lambda m: (m == "lm_head", _path(m)))  # layers in numeric order, lm_head last
    return _nest({m: pairs[m] for m in order}), rank, alpha


# ----------------------------------------------------------------------------- merging


def _base_dtype(folder: Path):
    """The parameter dtype a Hugging Face folder declares (`torch_dtype`, or transformers 5's `dtype`); fp32 by default."""
    import jax.numpy as jnp

    config = json.loads((folder / "config.json").read_text())
    declared = config.get("torch_dtype") or config.get("dtype")
    return jnp.dtype(declared) if declared in ("float32", "bfloat16", "float16") else jnp.dtype(jnp.float32)


def merge_folder(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Base Hugging Face folder + PEFT LoRA folder -> a merged Hugging Face folder in the base's dtype (each
    adapted kernel W + (alpha / r) A B computed in fp32), with the base's tokenizer files."""
    from flax import nnx

    from .checkpoints import load_hf, save_hf
    from .lora import merge_adapters

    base, adapter = Path(base), Path(adapter)
    adapters, rank, alpha = load_adapter(adapter)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base}: no config.json (the base must be a Hugging Face folder)")
    model = load_hf(base, param_dtype=_base_dtype(base))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)
    for module, pair in _modules(adapters).items():
        node = pure
        try:
            for p in _path(module):
                node = node[p]
            kernel = node["kernel"]
        except (KeyError, TypeError):
            reason = "its lm_head is tied to the embeddings" if module == "lm_head" else f"it has {model.cfg.num_layers} layers"
            raise AdapterError(f"{adapter / WEIGHTS}: adapts {module}, which the base {base} lacks ({reason})") from None
        (fan_in, fan_out), a, b = kernel.shape, pair["lora_a"].shape, pair["lora_b"].shape
        if a[0] != fan_in or b[1] != fan_out:
            raise AdapterError(f"{adapter / WEIGHTS}: {module}'s lora_A {[a[1], a[0]]} and lora_B {[b[1], b[0]]} do not fit "
                               f"the base's weight [{fan_out}, {fan_in}] (lora_A [r, {fan_in}], lora_B [{fan_out}, r] expected)")
    nnx.replace_by_pure_dict(params, merge_adapters(pure, adapters, alpha / rank))
    return save_hf(nnx.merge(graphdef, params, rest), out, tokenizer_from=base)
