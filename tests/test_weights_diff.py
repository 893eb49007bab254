"""Koala-style weight diffs: exact recovery in fp32 and bf16, and a base of the wrong shape refused."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import LlamaConfig as HFConfig  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from koala_lib.cli import main  # noqa: E402
from koala_lib.model.weights_diff import BaseMismatch, make_diff, read_raw, recover  # noqa: E402


def save(tmp_path, name, dtype, seed, hidden=32):
    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=100, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diff_then_recover_is_exact(tmp_path, dtype, capsys):
    base, target = save(tmp_path, "base", dtype, 0), save(tmp_path, "target", dtype, 1)
    assert main(["weights", "diff", "--base", str(base), "--target", str(target), "--out", str(tmp_path / "diff")]) == 0
    diff = read_raw(tmp_path / "diff" / "diff.safetensors")
    original = read_raw(target / "model.safetensors")
    assert any(not np.array_equal(diff[n][2], original[n][2]) for n in original)  # the diff is not the weights
    assert main(["weights", "recover", "--base", str(base), "--diff", str(tmp_path / "diff"), "--out", str(tmp_path / "rec")]) == 0
    out = capsys.readouterr().out
    assert f"recovered {len(original)} tensors" in out and "0 differ" in out and "MISMATCH" not in out
    recovered = read_raw(tmp_path / "rec" / "model.safetensors")
    for name, (dt, shape, bits) in original.items():
        assert recovered[name][0] == dt and recovered[name][1] == shape and np.array_equal(recovered[name][2], bits), name
    model = LlamaForCausalLM.from_pretrained(tmp_path / "rec")
    ref = LlamaForCausalLM.from_pretrained(target)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_a_base_of_the_wrong_shape_or_dtype_is_refused(tmp_path, capsys):
    base, target = save(tmp_path, "base", torch.float32, 0), save(tmp_path, "target", torch.float32, 1)
    make_diff(base, target, tmp_path / "diff")
    wrong = save(tmp_path, "wrong", torch.float32, 0, hidden=16)
    with pytest.raises(BaseMismatch, match="the diff expects"):
        recover(wrong, tmp_path / "diff", tmp_path / "rec")
    half = save(tmp_path, "half", torch.bfloat16, 0)
    assert main(["weights", "recover", "--base", str(half), "--diff", str(tmp_path / "diff"), "--out", str(tmp_path / "rec")]) == 2
    assert "BF16, the diff expects" in capsys.readouterr().err
    assert not (tmp_path / "rec").exists()


def test_another_base_of_the_same_shape_is_flagged_tensor_by_tensor(tmp_path, capsys):
    base, target = save(tmp_path, "base", torch.float32, 0), save(tmp_path, "target", torch.float32, 1)
    make_diff(base, target, tmp_path / "diff")
    other = save(tmp_path, "other", torch.float32, 2)
    summary = recover(other, tmp_path / "diff", tmp_path / "rec")
    assert summary and not any(row["base_matches"] for row in summary if "layernorm" not in row["tensor"] and "norm" not in row["tensor"])
    assert main(["weights", "recover", "--base", str(other), "--diff", str(tmp_path / "diff"), "--out", str(tmp_path / "rec2")]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "diff" / "koala_diff.json").read_text())
    assert set(manifest) == {"base", "target_sha256"}
