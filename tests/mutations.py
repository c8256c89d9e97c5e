"""Hostile versions of valid frames: bytes flipped, inserted or cut, JSON values swapped for other types,
huge numbers, NaN spelled every way, deep nesting. Pure functions of a `random.Random`, so the same
mutator serves hypothesis (`st.randoms()`) and a seeded burst sent over a real socket."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

DEEP = "\x00deep\x00"
"""Stands for a value nested deeper than JSON decoders recurse (msgspec gives up near 1000 levels)."""
DEEP_LEVELS = 1500

HOSTILE_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**64, -(2**63) - 1, 10**400, 1e308, -0.0, 5e-324, float("nan"), float("inf"),
    "", "0", "-1", "NaN", "nan", "Infinity", "-Infinity", "inf", "1e999999", "-1e-999999", "1e-40", "0x10",
    "1_000", " 1", "1,5", "9" * 400, "0." + "0" * 400 + "1", "\u0000", "\ud7ff\ue000", "😀", "a" * 5000,
    "2023-13-45T99:99:99Z", "1970-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999Z",
    [], {}, [1, "2", None], {"a": None}, [[[]]], DEEP,
)  # fmt: skip
"""What a field may hold instead of what the venue documents."""

_JSON_SPECIALS = b'{}[]",:\\-.0eE \x00\xff'


def _paths(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in `document` (the root is the empty path)."""
    paths = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            paths += _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            paths += _paths(value, (*prefix, index))
    return paths


def _parent(document: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        document = document[step]
    return document


def _any_hostile(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(HOSTILE_VALUES))  # a fresh copy: later mutations may edit it in place


def _hostile(rng: random.Random, old: Any) -> Any:
    choice = rng.randrange(4)
    if choice == 0 and isinstance(old, str):
        # The same figure as another JSON type: "67000.5" -> 67000.5, or a digit changed.
        try:
            return float(old) if rng.random() < 0.5 else int(float(old))
        except (ValueError, OverflowError):
            return old[::-1]
    if choice == 1 and isinstance(old, int | float) and not isinstance(old, bool):
        return str(old) if rng.random() < 0.5 else -old
    return _any_hostile(rng)


def mutate_document(document: Any, rng: random.Random) -> Any:
    """`document` with one value replaced, removed, or an unknown key added (the root may be replaced)."""
    path = rng.choice(_paths(document))
    if not path:
        return _any_hostile(rng)
    parent, last = _parent(document, path), path[-1]
    action = rng.randrange(5)
    if action == 0:
        del parent[last]
    elif action == 1 and isinstance(parent, dict):
        parent[rng.choice(["extra", "", "\u0000", str(last).upper()])] = _any_hostile(rng)
    else:
        parent[last] = _hostile(rng, parent[last])
    return document


def dump(document: Any) -> str:
    """JSON text of a mutated document; NaN and Infinity as the bare tokens some encoders emit, the
    `DEEP` marker as arrays nested past any decoder's recursion limit."""
    text = json.dumps(document, allow_nan=True, ensure_ascii=False, separators=(",", ":"))
    return text.replace(json.dumps(DEEP, ensure_ascii=False), "[" * DEEP_LEVELS + "]" * DEEP_LEVELS)


def mutate_text(frame: str, rng: random.Random) -> str:
    """A text frame mutated at the JSON level when it is JSON, else at the character level (still text)."""
    try:
        document = json.loads(frame)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python's json follows (a mutant)
        document = None
    if document is not None and rng.random() < 0.8:
        for _ in range(rng.randint(1, 3)):
            document = mutate_document(document, rng)
        return dump(document)
    at = rng.randrange(len(frame) + 1)
    cut = rng.randint(0, 8)
    return frame[:at] + rng.choice(['"', "{", "}", "[", "]", ",", ":", "\\", "9", "-", "e", ""]) + frame[at + cut :]


def mutate_bytes(frame: bytes, rng: random.Random) -> bytes:
    """A frame with 1-3 byte-level or JSON-level mutations: anything a broken or hostile venue might send."""
    data = bytearray(frame)
    for _ in range(rng.randint(1, 3)):
        action = rng.randrange(7)
        at = rng.randrange(len(data) + 1)
        if action == 0 and data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif action == 1:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif action == 2:
            del data[at : at + rng.randint(1, 16)]
        elif action == 3:
            del data[at:]
        elif action == 4 and data:
            data[min(at, len(data) - 1)] = rng.choice(_JSON_SPECIALS)
        else:
            try:
                text = data.decode()
            except UnicodeDecodeError:
                continue
            data = bytearray(mutate_text(text, rng).encode("utf-8", "surrogatepass"))
    return bytes(data)
