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
the pickles, ``.npy`` headers, JSON and HDF5 inside. For the same reason ``field`` changes one field of a
protobuf message (ONNX) and writes the enclosing lengths again.
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
        if all(_protobuf_fields(s) for s in seeds):
            self.operations["field"] = self.protobuf_field

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
        members = zip_members(data)
        if not members:  # an earlier operation broke the archive: damage the raw bytes instead
            return self.flip(data)
        documents = [i for i, (info, _) in enumerate(members) if info.filename.endswith(".json")]
        # The JSON documents describe the model; the other members are mostly weights: damage them as often.
        if documents and self.rng.random() < 0.5:
            index = self.rng.choice(documents)
        else:
            index = self.rng.randrange(len(members))
        info, content = members[index]
        if info.filename.endswith(".json") and self.rng.random() < 0.6:
            content = self.json_value(content)
        else:
            content = self.rng.choice((self.flip, self.flip, self.truncate, self.splice))(content)
        members[index] = (info, content)
        return zip_archive(members)

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

    # ------------------------------------------------------------------ inside a protobuf message (ONNX)
    def protobuf_field(self, data: bytes) -> bytes:
        """One field of a protobuf message, at any depth, changed, removed or repeated, every enclosing length
        written again, so that the ONNX reader gets past the wire format to the model's contents."""
        fields = _protobuf_fields(data)
        if not fields:
            return self.flip(data)
        slots = list(_protobuf_slots(fields))
        siblings, index = self.rng.choice(slots)
        number, wire_type, value = siblings[index]
        choice = self.rng.random()
        if isinstance(value, list):  # a nested message: drop it or repeat it (its fields get their own turn)
            choice *= 0.25
        if choice < 0.15:
            del siblings[index]
        elif choice < 0.25:
            siblings.insert(index, siblings[index])
        elif wire_type == 0:
            value = self.rng.choice(INTERESTING_INTEGERS)
            siblings[index] = (number, 0, value if self.rng.random() < 0.7 else (-value) % 2**64)
        elif wire_type == 2:
            siblings[index] = (number, 2, self.rng.choice((self.flip, self.truncate, self.splice))(value))
        elif wire_type in (1, 5):
            siblings[index] = (number, wire_type, self.flip(value))
        return _encode_protobuf(fields)


def _protobuf_fields(data: bytes, depth: int = 0):
    """``data`` parsed as protobuf wire format: a list of (field number, wire type, value), where a
    length-delimited value that itself parses as a message is a nested list; ``None`` if it does not parse."""
    fields, at = [], 0
    try:
        while at < len(data):
            key, at = _read_varint(data, at)
            number, wire_type = key >> 3, key & 7
            if number == 0:
                return None
            if wire_type == 0:
                value, at = _read_varint(data, at)
            elif wire_type in (1, 5):
                width = 8 if wire_type == 1 else 4
                if at + width > len(data):
                    return None
                value, at = data[at:at + width], at + width
            elif wire_type == 2:
                length, at = _read_varint(data, at)
                if at + length > len(data):
                    return None
                value, at = data[at:at + length], at + length
                nested = _protobuf_fields(value, depth + 1) if value and depth < 20 else None
                value = nested if nested else value
            else:
                return None
            fields.append((number, wire_type, value))
    except IndexError:
        return None
    return fields


def _protobuf_slots(fields):
    for index, (_, _, value) in enumerate(fields):
        yield fields, index
        if isinstance(value, list):
            yield from _protobuf_slots(value)


def _encode_protobuf(fields) -> bytes:
    out = bytearray()
    for number, wire_type, value in fields:
        out += _varint(number << 3 | wire_type)
        if wire_type == 0:
            out += _varint(value)
        elif wire_type == 2:
            payload = _encode_protobuf(value) if isinstance(value, list) else value
            out += _varint(len(payload)) + payload
        else:
            out += value
    return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def zip_members(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]] | None:
    """The members of the zip archive ``data`` with their contents; ``None`` if it is not a readable archive
    or claims to expand far beyond its size (the file may be damaged, and this runs in the parent)."""
    if not _is_zip(data):
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            if sum(info.file_size for info in infos) > MAX_GROWTH * 16 * len(data):
                return None
            return [(info, archive.read(info)) for info in infos]
    except Exception:  # BadZipFile, a CRC error, zlib.error, NotImplementedError, ...
        return None


def zip_archive(members: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    """A zip archive of ``members`` (names, order and compression as given), its checksums correct."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, content in members:
            archive.writestr(info, content)
    return buffer.getvalue()


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

