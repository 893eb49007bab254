"""Reading a compiled XLA program: the FLOPs of its matmuls, counted from the optimized HLO text.

    dot_flops(compiled.as_text())     # 2 * output elements * contracted size, summed over every dot it runs

XLA's own `cost_analysis()` counts elementwise work too and, depending on the version, a loop body once; here
each `dot` (also inside fusions and custom fusions) counts once per execution: a `while` body as many times as
its known trip count (XLA annotates the loops `lax.scan` makes), and a called computation once per call.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) [^\n]*\{\s*$", re.M)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"^[a-z]+\d*\[([\d,]*)\]")
_CALLS = re.compile(r"(?:calls|to_apply|body)=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def _dims(shape: str) -> list[int] | None:
    m = _SHAPE.match(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else None


def _operands(args: str) -> list[str]:
    """The operand names of an instruction's argument text (`%a, %b), attrs...`)."""
    depth, end = 0, len(args)
    for i, ch in enumerate(args):
        depth += ch in "([{"
        if ch in ")]}":
            if depth == 0:
                end = i
                break
            depth -= 1
    return re.findall(r"%([\w.\-]+)", args[:end])


_PARAMETER = re.compile(r"([\w.\-]+): ([a-z]+\d*\[[\d,]*\])")


def _split(text: str) -> tuple[dict[str, list[str]], dict[str, dict[str, str]], str]:
    """{computation: its instruction lines}, {computation: {parameter: shape}}, and the entry computation's name."""
    computations: dict[str, list[str]] = {}
    parameters: dict[str, dict[str, str]] = {}
    entry, current = "", None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line[0].isspace():  # headers start at column 0; instructions are indented
            current = m.group(2)
            computations[current] = []
            parameters[current] = dict(_PARAMETER.findall(line.split(" -> ")[0]))
            entry = current if m.group(1) else entry
        elif line.strip() == "}":
            current = None
        elif current is not None:
            computations[current].append(line)
    return computations, parameters, entry


def dot_flops(text: str) -> float:
    """FLOPs of every dot the optimized HLO module `text` executes (multiply-add = 2)."""
    computations, parameters, entry = _split(text)

    @lru_cache(maxsize=None)
    def flops(name: str) -> float:
        shapes = dict(parameters.get(name, {}))
        total = 0.0
        for line in computations.get(name, ()):
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            inst, shape, op, args = m.groups()
            shapes[inst] = shape
            if op == "dot":
                out, lhs = _dims(shape), _dims(shapes.get(_operands(args)[0], ""))
                contract = _CONTRACT.search(args)
                if out is not None and lhs is not None and contract:
                    k = math.prod(lhs[int(d)] for d in contract.group(1).split(",") if d)
                    total += 2.0 * math.prod(out) * k
            called = _CALLS.findall(args)
            if op == "while":
                trip = _TRIP.search(args)
                body = re.search(r"body=%?([\w.\-]+)", args)
                total += (int(trip.group(1)) if trip else 1) * flops(body.group(1)) if body else 0.0
            elif op in ("fusion", "call", "custom-call", "async-start"):
                total += sum(flops(c) for c in called)
        return total

    return flops(entry)
