"""Koala-style weight diffs: publish fine-tuned weights as a difference from a base others must bring.

    koala weights diff --base B --target T --out D      # D holds no usable weights without B
    koala weights recover --base B --diff D --out T

The difference is taken on the bit patterns (the tensors viewed as unsigned integers, subtracted modulo 2^bits),
so recovery is exact in every dtype: fp32, bf16 and fp16 alike. `koala_diff.json` records each base tensor's
shape, dtype and sha256, and each target tensor's sha256; recovery refuses a base that differs in shape or dtype,
warns about one whose bytes differ, and checks every recovered tensor against the target's hash.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from koala_lib.files import staged_folder

from .checkpoints import TOKENIZER_FILES, safetensor_files

MANIFEST = "koala_diff.json"
# safetensors dtype -> the unsigned integer type of the same width (bit patterns are what a diff works on)
_BITS = {"F64": np.uint64, "F32": np.uint32, "F16": np.uint16, "BF16": np.uint16, "I64": np.uint64,
         "I32": np.uint32, "I16": np.uint16, "I8": np.uint8, "U8": np.uint8, "BOOL": np.uint8}


class BaseMismatch(ValueError):
    """The base checkpoint is not the one the diff was made against."""


# A safetensors file is an 8-byte little-endian header length, a JSON header, then the raw tensor bytes. Reading
# and writing it here (rather than through a framework) keeps every dtype, bf16 included, as exact bit patterns.


def read_raw(path: Path) -> dict[str, tuple[str, list[int], np.ndarray]]:
    """name -> (safetensors dtype, shape, bit patterns as a memory-mapped unsigned array)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    size = int(np.frombuffer(data[:8].tobytes(), dtype="<u8")[0])
    header = json.loads(data[8 : 8 + size].tobytes())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        bits = data[8 + size + start : 8 + size + end].view(_BITS[info["dtype"]])
        out[name] = (info["dtype"], info["shape"], bits)
    return out


def write_raw(path: Path, tensors: dict[str, tuple[str, list[int], np.ndarray]], metadata: dict[str, str]) -> None:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape, bits) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bits.nbytes]}
        offset += bits.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(np.array([len(blob)], dtype="<u8").tobytes() + blob)
        for _, _, bits in tensors.values():
            fh.write(np.ascontiguousarray(bits).tobytes())


def _tensors(folder: Path) -> dict[str, tuple[str, list[int], np.ndarray]]:
    """Every tensor of a Hugging Face folder (single or sharded safetensors), raw."""
    out = {}
    for file in sorted(set(safetensor_files(folder).values())):
        out.update(read_raw(file))
    return out


def _sha(bits: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(bits).tobytes()).hexdigest()


def make_diff(base: Path, target: Path, out: Path) -> Path:
    """Write `out`: diff tensors, the target's config and tokenizer files, and the manifest."""
    base_t, target_t = _tensors(Path(base)), _tensors(Path(target))
    missing = sorted(set(target_t) - set(base_t))
    if missing:
        raise BaseMismatch(f"the base lacks {len(missing)} tensors of the target, e.g. {missing[0]}")
    with staged_folder(Path(out)) as tmp:
        manifest = {"base": {}, "target_sha256": {}}
        diffs = {}
        for name in sorted(target_t):
            (t_dtype, t_shape, t), (b_dtype, b_shape, b) = target_t[name], base_t[name]
            if t_shape != b_shape or t_dtype != b_dtype:
                raise BaseMismatch(f"{name}: base {b_shape} {b_dtype}, target {t_shape} {t_dtype}")
            diffs[name] = (t_dtype, t_shape, t - b)  # unsigned, so it wraps around: exact and reversible
            manifest["base"][name] = {"shape": b_shape, "dtype": b_dtype, "sha256": _sha(b)}
            manifest["target_sha256"][name] = _sha(t)
        write_raw(tmp / "diff.safetensors", diffs, {"format": "koala-diff"})
        for name in ("config.json", *TOKENIZER_FILES):
            if (Path(target) / name).is_file():
                shutil.copy2(Path(target) / name, tmp / name)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return Path(out)


def recover(base: Path, diff: Path, out: Path) -> list[dict]:
    """Write the target to `out` from `base` + `diff`; returns a per-tensor summary (name, shape, dtype, status)."""
    manifest = json.loads((Path(diff) / MANIFEST).read_text())
    base_t = _tensors(Path(base))
    for name, spec in manifest["base"].items():
        if name not in base_t:
            raise BaseMismatch(f"the base has no tensor {name}; is it the model the diff was made against?")
        dtype, shape, _ = base_t[name]
        if shape != spec["shape"] or dtype != spec["dtype"]:
            raise BaseMismatch(f"{name}: the base has {shape} {dtype}, the diff expects {spec['shape']} {spec['dtype']}")
    with staged_folder(Path(out)) as tmp:
        recovered, summary = {}, []
        deltas = read_raw(Path(diff) / "diff.safetensors")
        for name in sorted(manifest["base"]):
            dtype, shape, b = base_t[name]
            t = b + deltas[name][2]
            base_ok = _sha(b) == manifest["base"][name]["sha256"]
            target_ok = _sha(t) == manifest["target_sha256"][name]
            summary.append({"tensor": name, "shape": shape, "dtype": dtype, "base_matches": base_ok, "recovered_matches": target_ok})
            recovered[name] = (dtype, shape, t)
        write_raw(tmp / "model.safetensors", recovered, {"format": "pt"})
        for name in ("config.json", *TOKENIZER_FILES):
            if (Path(diff) / name).is_file():
                shutil.copy2(Path(diff) / name, tmp / name)
    return summary
