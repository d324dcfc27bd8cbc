"""Mutations of valid seeds: bit flips, byte insert/delete, truncation, chunk copies, and
splices of extreme u32/u64 values over the fields that look like counts, lengths or offsets.

A mutation is a plain tuple ``(op, a, b)`` of integers so that hypothesis can draw and
shrink it (``tests/test_fuzz.py``) and the campaign runner can draw it from a seeded RNG.
"""

from __future__ import annotations

import copy
import json
import random
import re
import struct
from typing import Any

EXTREME_U64 = (
    0,
    1,
    2,
    3,
    255,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    1 << 32,
    1 << 40,
    1 << 62,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
    (1 << 64) - 2,
)
EXTREME_U32 = (0, 1, 2, 3, 4, 7, 255, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)

OPS = (
    "flip",
    "set_byte",
    "insert",
    "delete",
    "truncate",
    "u64_field",
    "u32_field",
    "u64_any",
    "copy_chunk",
    "zero_range",
)
Op = tuple[int, int, int]


def field_offsets(data: bytes, width: int) -> list[int]:
    """Offsets of little-endian integers of ``width`` bytes with a small non-zero value:
    in binary model formats these are almost always counts, lengths, dims or offsets."""
    fmt = "<Q" if width == 8 else "<I"
    out = []
    for i in range(0, len(data) - width + 1):
        (value,) = struct.unpack_from(fmt, data, i)
        if 0 < value < (1 << 24) and (i == 0 or data[i - 1] != 0 or value > 255):
            out.append(i)
    return out


def apply_op(data: bytearray, op: Op, fields8: list[int], fields4: list[int]) -> bytearray:
    """Apply one mutation in place (returns the buffer)."""
    kind, a, b = op
    name = OPS[kind % len(OPS)]
    n = len(data)
    if name == "truncate":
        del data[(a % (n + 1)) :]
    elif n == 0:
        data.extend(b.to_bytes(8, "little"))
    elif name == "flip":
        data[a % n] ^= 1 << (b % 8)
    elif name == "set_byte":
        data[a % n] = b % 256
    elif name == "insert":
        data[a % (n + 1) : a % (n + 1)] = b.to_bytes(8, "little")[: 1 + b % 8]
    elif name == "delete":
        start = a % n
        del data[start : start + 1 + b % 16]
    elif name in ("u64_field", "u32_field", "u64_any"):
        width = 4 if name == "u32_field" else 8
        candidates = fields8 if name == "u64_field" else fields4 if width == 4 else []
        offsets = [o for o in candidates if o + width <= n]
        pos = offsets[a % len(offsets)] if offsets else a % max(1, n - width + 1)
        table = EXTREME_U32 if width == 4 else EXTREME_U64
        value = table[b % len(table)] if b % 4 else b % (1 << (8 * width))
        data[pos : pos + width] = value.to_bytes(width, "little")[: max(0, n - pos)]
    elif name == "copy_chunk":
        src, length = a % n, 1 + b % 64
        chunk = bytes(data[src : src + length])
        dst = (a >> 16) % n
        data[dst : dst + len(chunk)] = chunk
    elif name == "zero_range":
        start = a % n
        data[start : start + 1 + b % 32] = bytes(len(data[start : start + 1 + b % 32]))
    return data


def mutate(seed: bytes, ops: list[Op]) -> bytes:
    data = bytearray(seed)
    fields8, fields4 = field_offsets(seed, 8), field_offsets(seed, 4)
    for op in ops:
        apply_op(data, op, fields8, fields4)
    return bytes(data)


def random_ops(rng: random.Random, max_ops: int = 4) -> list[Op]:
    return [
        (rng.randrange(len(OPS)), rng.getrandbits(32), rng.getrandbits(64))
        for _ in range(rng.randint(1, max_ops))
    ]


# --- Structured mutation of JSON documents ---------------------------------------------------

_ODD_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1 << 31,
    1 << 63,
    -(1 << 70),
    1.5,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    "x",
    "\x00",
    "\udcff",
    "../../etc/passwd",
    "/abs",
    "a/../b",
    [],
    [1],
    [None],
    ["a"],
    {},
    {"a": 1},
    "é" * 3,
    "layer-0/../../x.bin",
)


def _odd(b: int) -> Any:
    # A fresh copy: the shared constants must never become part of (or cycle in) a document.
    return copy.deepcopy(_ODD_VALUES[b % len(_ODD_VALUES)])


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:50]):
            out.extend(_paths(v, (*prefix, i)))
    return out


def mutate_json_doc(doc: Any, ops: list[Op]) -> Any:
    """Structural mutations: replace a value by an odd one, delete or duplicate an item."""
    doc = json.loads(json.dumps(doc))
    for kind, a, b in ops:
        paths = _paths(doc)
        path = paths[a % len(paths)]
        if not path:
            doc = _odd(b) if kind % 5 == 0 else doc
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = kind % 4
        if action == 0 or action == 3:
            parent[key] = _odd(b)
        elif action == 1:
            del parent[key]
        elif action == 2 and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif action == 2:
            parent[key] = [copy.deepcopy(parent[key]) for _ in range(b % 3)]
        if not isinstance(doc, (dict, list)):
            break
    return doc


def json_bytes(doc: Any) -> bytes:
    """JSON text of ``doc`` the way a hostile writer could produce it (NaN allowed)."""
    return json.dumps(doc).encode("utf-8", "surrogatepass")


_NUMBER = re.compile(rb"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
# Numbers no JSON reader should size anything by: more digits than Python converts, values
# that overflow float, and the float extremes.
_HOSTILE_NUMBERS = (b"9" * 5000, b"1e999", b"-1e999", b"1" + b"0" * 400, b"200000000", b"0")


def hostile_json_text(seed: bytes, ops: list[Op]) -> bytes:
    """Text-level JSON bombs on a JSON seed: nesting deep enough to exhaust recursion (closed
    or not), and numbers spliced in that are too long, too large or zero."""
    _, a, b = ops[0]
    depth = 1000 + a % 200_000
    kind = b % 5
    if kind == 0:
        return b"[" * depth + seed + b"]" * depth
    if kind == 1:
        return b'{"a":' * depth + seed + b"}" * depth
    if kind == 2:
        return b"[" * depth
    numbers = list(_NUMBER.finditer(seed))
    if not numbers:
        return seed + b"[" * depth
    out = seed
    for _, a2, b2 in ops:  # one to four numbers replaced, last first so offsets stay valid
        match = numbers[a2 % len(numbers)]
        value = _HOSTILE_NUMBERS[b2 % len(_HOSTILE_NUMBERS)]
        if out[match.start() : match.end()] == match.group():
            out = out[: match.start()] + value + out[match.end() :]
    return out
