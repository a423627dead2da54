"""Damaged copies of valid files: byte flips, truncations and splices, on the raw bytes and inside zip members.

A plain seeded random mutator, chosen over the two libraries that could drive it:

* atheris (installable for Python 3.11 and working here) is coverage-guided libFuzzer *in its own
  process*: the code under test runs in the fuzzer, so one crash ends the run and its memory is the
  fuzzer's. This harness must load every damaged file in a separate, memory-limited child that can crash
  or hang without taking the run with it, and must attribute every outcome to one file; coverage feedback
  does not cross that process boundary. It would also add a compiled dependency to ``make test``.
* hypothesis draws values for property tests inside the test process and shrinks failures there; the same
  process boundary applies, and a time-boxed campaign is not what its engine is built for.

A seeded ``random.Random`` gives the same files for the same seed, which is what a repro needs.

Zip-based formats (fastlstm native, PyTorch, TorchScript, ``.keras``) store a CRC-32 per member, so flipped
member bytes mostly stop at the CRC check. ``member`` therefore damages one member's bytes (or, for JSON,
one value of its document) and writes the archive again with correct checksums, to reach the parsers of
the pickles, ``.npy`` headers, JSON and HDF5 inside.
"""

from __future__ import annotations

import io
import json
import random
import zipfile

# Boundary values that make length, count and offset fields overflow, go negative or point nowhere.
INTERESTING_INTEGERS = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 2**31 - 1, 2**31,
                        2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1)
INTERESTING_JSON = (None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, 10**400, -(10**30), 1e308, -1e308, 0.5,
                    "", "x", "nan", "sequence", [], [0], [[]], {}, {"": None}, "\u0000" * 3, [1] * 100)
MAX_GROWTH = 4  # a mutant is at most this many times the size of the largest seed


class Mutator:
    """Makes damaged variants of ``seeds`` (the bytes of valid files of one format)."""

    def __init__(self, seeds: list[bytes], rng: random.Random):
        if not seeds:
            raise ValueError("Mutator needs at least one seed")
        self.seeds = seeds
        self.rng = rng
        self.max_size = MAX_GROWTH * max(len(s) for s in seeds)
        self.operations = {"flip": self.flip, "truncate": self.truncate, "splice": self.splice}
        if any(_is_zip(s) for s in seeds):
            self.operations["member"] = self.member

    def mutate(self) -> tuple[bytes, int, str]:
        """A new mutant: its bytes, the index of the seed it started from, and the operations applied."""
        base = self.rng.randrange(len(self.seeds))
        data = self.seeds[base]
        applied = []
        for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
            name = self.rng.choice(list(self.operations))
            data = self.operations[name](data)[: self.max_size]
            applied.append(name)
        return data, base, "+".join(applied)

    # ------------------------------------------------------------------ raw bytes
    def flip(self, data: bytes) -> bytes:
        """One to eight point edits: a bit flipped, a byte replaced, or an integer field overwritten."""
        if not data:
            return bytes([self.rng.randrange(256)])
        out = bytearray(data)
        for _ in range(self.rng.choice((1, 1, 2, 3, 4, 8))):
            at = self.rng.randrange(len(out))
            kind = self.rng.randrange(4)
            if kind == 0:
                out[at] ^= 1 << self.rng.randrange(8)
            elif kind == 1:
                out[at] = self.rng.randrange(256)
            elif kind == 2:
                out[at] = self.rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF))
            else:
                width = self.rng.choice((1, 2, 4, 8))
                value = self.rng.choice(INTERESTING_INTEGERS) & ((1 << (8 * width)) - 1)
                if self.rng.random() < 0.3:
                    value = (-value) & ((1 << (8 * width)) - 1)
                packed = value.to_bytes(width, self.rng.choice(("little", "big")))
                out[at:at + width] = packed[: len(out) - at]
        return bytes(out)

    def truncate(self, data: bytes) -> bytes:
        """A prefix: the file cut short at a random point."""
        return data[: self.rng.randrange(len(data))] if data else data

    def splice(self, data: bytes) -> bytes:
        """Pieces of two files joined: a prefix of ``data`` then the rest of a seed from some point, a chunk of a
        seed inserted, or a chunk of ``data`` removed or repeated."""
        other = self.rng.choice(self.seeds)
        at = self.rng.randrange(len(data) + 1)
        kind = self.rng.randrange(4)
        if kind == 0:
            return data[:at] + other[self.rng.randrange(len(other) + 1):]
        if kind == 1:
            start = self.rng.randrange(len(other) + 1)
            return data[:at] + other[start:start + self.rng.randrange(1, 256)] + data[at:]
        length = self.rng.randrange(1, 256)
        if kind == 2:
            return data[:at] + data[at + length:]
        return data[:at + length] + data[at:]

    # ------------------------------------------------------------------ inside a zip
    def member(self, data: bytes) -> bytes:
        """One member of a zip archive damaged (its bytes, or one JSON value), the archive rewritten intact."""
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                members = [(info, archive.read(info)) for info in archive.infolist()]
        except Exception:  # an earlier operation broke the archive: damage the raw bytes instead
            return self.flip(data)
        if not members:
            return self.flip(data)
        index = self.rng.randrange(len(members))
        info, content = members[index]
        if info.filename.endswith(".json") and self.rng.random() < 0.6:
            content = self.json_value(content)
        else:
            content = self.rng.choice((self.flip, self.flip, self.truncate, self.splice))(content)
        members[index] = (info, content)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for member_info, member_data in members:
                archive.writestr(member_info, member_data)
        return buffer.getvalue()

    def json_value(self, document: bytes) -> bytes:
        """The JSON ``document`` with one value (anywhere in it) replaced by a boundary value or another value
        of the document, or one key removed."""
        try:
            root = json.loads(document)
        except ValueError:
            return self.flip(document)
        slots = list(_json_slots(root))
        if not slots:
            return self.flip(document)
        parent, key = self.rng.choice(slots)
        choice = self.rng.random()
        if choice < 0.15 and isinstance(parent, dict):
            del parent[key]
        elif choice < 0.35:
            donor_parent, donor_key = self.rng.choice(slots)
            parent[key] = donor_parent[donor_key] if donor_parent is not parent or donor_key != key else None
        else:
            parent[key] = self.rng.choice(INTERESTING_JSON)
        try:
            return json.dumps(root).encode()
        except (ValueError, RecursionError):  # a value moved into itself: keep the document as it was
            return document


def _json_slots(node, depth: int = 0):
    """Every (container, key) pair of a parsed JSON document, containers before their contents."""
    if depth > 200:
        return
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield node, key
        yield from _json_slots(value, depth + 1)


def _is_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"

