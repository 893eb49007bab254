"""A device mesh written as text: `data,fsdp,tensor` sizes, e.g. `1,8,1`, or `1,-1,1` where -1 takes the devices
left. Parsed here without JAX, so a config can be checked when it is loaded, before any device exists."""

from __future__ import annotations


def parse_mesh(spec: str) -> list[int]:
    """'1,-1,1' -> [1, -1, 1]; ValueError naming what is wrong otherwise."""
    try:
        sizes = [int(x) for x in str(spec).split(",")]
    except ValueError:
        raise ValueError(f"mesh {spec!r}: expected three integers 'data,fsdp,tensor', e.g. '1,-1,1'") from None
    if len(sizes) != 3 or sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {spec!r}: expected three sizes 'data,fsdp,tensor', each >= 1 or one of them -1")
    return sizes
