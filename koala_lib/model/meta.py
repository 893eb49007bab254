"""Meta's original LLaMA release (`params.json` + `consolidated.NN.pth`) → a Hugging Face folder.

    koala weights from-meta --meta /data/llama/13B --out /data/llama-13b-hf [--tokenizer DIR]

Model-parallel shards are merged along the axis each tensor was split on (column-parallel projections and the
output head on rows, row-parallel ones and the embedding on columns), and the rows of the query and key
projections are permuted from Meta's interleaved rotary pairs to Hugging Face's split halves. The `.pth`
files are read with `torch.load(..., weights_only=True)`: tensors only, never arbitrary pickled code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from koala_lib.files import staged_folder

from .checkpoints import TOKENIZER_FILES
from .presets import LlamaConfig, to_hf_config

# Meta name (per layer) -> (Hugging Face name, axis the shards are concatenated on; None = replicated)
LAYER_TENSORS = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
TOP_TENSORS = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}


def interleaved_to_halves(weight, n_heads: int):
    """Rows of a Q/K projection from Meta's (pair, 2) order to Hugging Face's (2, pair) order, per head."""
    out_features, in_features = weight.shape
    return weight.reshape(n_heads, out_features // n_heads // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def halves_to_interleaved(weight, n_heads: int):
    """The inverse of `interleaved_to_halves` (Hugging Face → Meta)."""
    out_features, in_features = weight.shape
    return weight.reshape(n_heads, 2, out_features // n_heads // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def convert_meta(meta_dir: str | Path, out_dir: str | Path, tokenizer_from: str | Path | None = None) -> Path:
    """Write a Hugging Face LLaMA folder (config.json, model.safetensors, tokenizer files if given)."""
    try:
        import torch
        from safetensors.torch import save_file
    except ImportError:
        raise FileNotFoundError("reading Meta's .pth shards needs torch: pip install torch") from None
    meta_dir = Path(meta_dir)
    params = json.loads((meta_dir / "params.json").read_text())
    shards = sorted(meta_dir.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{meta_dir}: no consolidated.*.pth shards")
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in shards]

    def merged(name: str, axis: int | None):
        if name not in states[0]:
            raise KeyError(f"{meta_dir}: tensor {name} missing from {shards[0].name}")
        if axis is None or len(states) == 1:
            return states[0][name]
        return torch.cat([s[name] for s in states], dim=axis)

    n_heads = params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    tensors = {hf: merged(meta, axis) for meta, (hf, axis) in TOP_TENSORS.items()}
    for i in range(params["n_layers"]):
        for meta, (hf, axis) in LAYER_TENSORS.items():
            tensor = merged(f"layers.{i}.{meta}", axis)
            if meta == "attention.wq.weight":
                tensor = interleaved_to_halves(tensor, n_heads)
            elif meta == "attention.wk.weight":
                tensor = interleaved_to_halves(tensor, n_kv)
            tensors[f"model.layers.{i}.{hf}"] = tensor.contiguous()
    vocab, dim = tensors["model.embed_tokens.weight"].shape
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=tensors["model.layers.0.mlp.gate_proj.weight"].shape[0],
        num_layers=params["n_layers"], num_heads=n_heads, num_kv_heads=n_kv, rms_norm_eps=params.get("norm_eps", 1e-6),
        rope_theta=float(params.get("rope_theta", 10000.0)), max_position_embeddings=params.get("max_seq_len", 2048),
    )
    with staged_folder(Path(out_dir)) as tmp:
        config = to_hf_config(cfg)
        config["torch_dtype"] = str(tensors["model.norm.weight"].dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in TOKENIZER_FILES:
            if tokenizer_from is not None and (Path(tokenizer_from) / name).is_file():
                shutil.copy2(Path(tokenizer_from) / name, tmp / name)
    return Path(out_dir)
