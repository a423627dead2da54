"""The child process of ``_keras_hdf5``: everything that touches an HDF5 file runs here, behind limits.

Started as ``python -I`` (no working directory, no user site, no ``PYTHON*`` variables on its import path)
running this file by path with two arguments: the file to read (``-``: its image arrives on stdin) and the
address-space limit in bytes it applies to itself before importing h5py. It imports nothing from fastlstm.

The conversation, every message framed as 8 little-endian bytes giving the length of a JSON header, the
header, then ``header["data_bytes"]`` bytes of data:

1. (image only) the parent sends the image: the framed header ``{"data_bytes": n}`` and the n bytes.
2. The child checks the file for the HDF5 library's one known endless loop, opens it, refuses anything that
   reaches outside it (external links, datasets stored in other files, virtual datasets, filters other than
   deflate and shuffle) and describes it, reading no dataset::

       {"attributes": {"/": {...}, "/group/path": {"name": value}},
        "datasets": {"/path/to/dataset": [dtype, shape]}}

3. The parent sends ``{"read": [paths], "data_bytes": 0}``: the datasets the model needs, after checking
   their declared shapes against the ones it expects.
4. The child answers ``{"arrays": {path: [dtype, shape, offset]}}`` and the arrays' bytes, then exits.

On any error it writes one line to stderr and exits with ``FORMAT_ERROR_EXIT``.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import sys
import zlib

FORMAT_ERROR_EXIT = 3
LENGTH_BYTES = 8
# Datasets are read as these (float) types only; others are described but never read.
READ_DTYPES = ("<f2", "<f4", "<f8", ">f2", ">f4", ">f8")
# DEFLATE expands data at most ~1032:1; a dataset may declare at most this multiple of the file's size.
MAX_COMPRESSED_EXPANSION = 1100
# Attributes with more values than this are not read (Keras writes a few names per layer).
MAX_ATTRIBUTE_VALUES = 100_000
_DEFLATE, _SHUFFLE = 1, 2


class Refused(Exception):
    """The file is damaged, or reaches outside itself: the message names the object."""


# ----------------------------------------------------------------------------------------- framing
def frame(header: dict, data_bytes: int) -> bytes:
    """The start of a message: the header's length, then the header, which says how much data follows."""
    encoded = json.dumps(dict(header, data_bytes=data_bytes)).encode("utf-8")
    return len(encoded).to_bytes(LENGTH_BYTES, "little") + encoded


def write_message(out, header: dict, data: list = ()) -> None:
    """Send ``header`` and the bytes of ``data`` (anything with the buffer protocol, e.g. arrays)."""
    out.write(frame(header, sum(memoryview(part).nbytes for part in data)))
    for part in data:
        out.write(memoryview(part).cast("B"))
    out.flush()


def read_message(source) -> tuple[dict, bytes]:
    header = json.loads(_read_exactly(source, int.from_bytes(_read_exactly(source, LENGTH_BYTES), "little")))
    return header, _read_exactly(source, header["data_bytes"])


def _read_exactly(source, count: int) -> bytes:
    data = source.read(count)
    if len(data) != count:
        raise Refused("the parent process closed the conversation")
    return data


# ----------------------------------------------------------------------------------------- the file
def refuse_endless_global_heap(image) -> None:
    """Fail at once, rather than at the time limit, on the one endless loop of the HDF5 library we know.

    Variable-length strings (Keras' ``model_config``, ``layer_names``, ``weight_names``) live in global heap
    collections. HDF5 walks a collection from object to object by each object's declared size, and an object
    of index 0 and size 0 does not advance the walk. Layout (HDF5 file format, "Global Heap"): "GCOL",
    version 1, 3 reserved bytes, the collection size; then objects of index (2 bytes), reference count (2),
    reserved (4), size, data padded to 8 bytes. Sizes are the superblock's "size of lengths" bytes long.
    The search resumes after each collection it walked, so every byte is looked at a bounded number of times.
    """
    if len(image) < 16 or image[:8] != b"\x89HDF\r\n\x1a\n":
        return
    length_size = image[14] if image[8] < 2 else image[10]  # superblock versions 0-1 / 2-3
    if length_size not in (2, 4, 8):
        return  # the library refuses such a superblock itself
    object_header_size = 8 + length_size
    start = image.find(b"GCOL\x01\x00\x00\x00")
    while start != -1:
        end = min(start + int.from_bytes(image[start + 8:start + 8 + length_size], "little"), len(image))
        position = start + 8 + length_size
        while position + object_header_size <= end:
            index = int.from_bytes(image[position:position + 2], "little")
            size = int.from_bytes(image[position + 8:position + 8 + length_size], "little")
            step = object_header_size + -(-size // 8) * 8 if index else size
            if step == 0:
                raise Refused(f"damaged HDF5 global heap at byte {position} (an empty entry the HDF5 library "
                              "would loop on forever)")
            position += step
        start = image.find(b"GCOL\x01\x00\x00\x00", max(start + 4, min(position, end)))


def describe(h5file, file_size: int) -> tuple[dict, dict]:
    """The description sent to the parent, and the datasets by path (opened, not read)."""
    import h5py

    attributes = {"/": _plain_attributes(h5file, "/", file_size)}
    descriptions, datasets = {}, {}

    def outside_link(relative_path, link):  # a non-None answer stops the walk
        return None if isinstance(link, (h5py.HardLink, h5py.SoftLink)) else (relative_path, link)

    found = h5file.visititems_links(outside_link)
    if found is not None:
        raise Refused(f"/{found[0]} is a link to another file ({type(found[1]).__name__}); fastlstm reads only "
                      "the file it is given")
    objects = []  # each object once, through hard links only (collected first: h5py's walk must not raise)
    h5file.visititems(lambda relative_path, obj: objects.append(("/" + relative_path, obj)))
    for path, obj in objects:
        attributes[path] = _plain_attributes(obj, path, file_size)
        if isinstance(obj, h5py.Dataset):
            _refuse_outside_storage(obj, path)
            descriptions[path] = [obj.dtype.str if obj.dtype.str in READ_DTYPES else str(obj.dtype),
                                  list(obj.shape) if obj.shape is not None else None]
            datasets[path] = obj
    return {"attributes": attributes, "datasets": descriptions}, datasets


def _refuse_outside_storage(dataset, path: str) -> None:
    """Refuse a dataset whose values live in another file or pass through a filter outside the file's own."""
    import h5py

    plist = dataset.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        raise Refused(f"dataset {path} is a virtual dataset (its values live in other files); fastlstm reads "
                      "only the file it is given")
    if plist.get_external_count():
        first = plist.get_external(0)[0].decode("utf-8", "replace")
        raise Refused(f"dataset {path} stores its values in {plist.get_external_count()} external file(s) "
                      f"({first!r}, ...); fastlstm reads only the file it is given")
    for n in range(plist.get_nfilters()):
        code, _, _, declared_name = plist.get_filter(n)
        if code not in (_DEFLATE, _SHUFFLE):
            raise Refused(f"dataset {path} uses HDF5 filter {code} "
                          f"({declared_name.decode('utf-8', 'replace')[:40]!r}); fastlstm reads uncompressed, "
                          "deflate and shuffle datasets only")


def _plain_attributes(obj, path: str, file_size: int) -> dict:
    """An object's attributes as JSON values: text, lists of text, numbers (others are left out)."""
    values = {}
    for key in obj.attrs.keys():
        attribute = obj.attrs.get_id(key)
        count = 1
        for n in attribute.shape or ():
            count *= n
        if count > MAX_ATTRIBUTE_VALUES:
            continue
        try:
            stored_bytes = attribute.get_storage_size()
        except RuntimeError:  # h5py reports an empty attribute's size of 0 as an error
            stored_bytes = 0
        if stored_bytes > file_size:
            raise Refused(f"attribute {key!r} of {path} declares {stored_bytes} bytes, more than the "
                          f"{file_size}-byte file holds")
        value = _plain(obj.attrs[key])
        if value is not None:
            values[key] = value
    return values


def _plain(value):
    import numpy as np

    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OSU":
            items = [_plain(item) for item in value.ravel().tolist()]
            return items if all(isinstance(item, str) for item in items) else None
        if value.dtype.kind in "biuf":
            return value.tolist()
    return None


def read_datasets(datasets: dict, paths: list, file_size: int) -> tuple[dict, list]:
    """The arrays at ``paths`` (each a float dataset the description listed), checked before reading."""
    import numpy as np

    described, data, offset = {}, [], 0
    for path in paths:
        dataset = datasets.get(path) if isinstance(path, str) else None
        if dataset is None or dataset.dtype.str not in READ_DTYPES or dataset.shape is None:
            raise Refused(f"{path!r} is not a floating-point dataset of the file")
        compressed = dataset.id.get_create_plist().get_nfilters() > 0
        if dataset.nbytes > file_size * (MAX_COMPRESSED_EXPANSION if compressed else 1):
            raise Refused(f"dataset {path} declares shape {dataset.shape}, more data than the {file_size}-byte "
                          "file holds")
        if dataset.chunks is not None:
            chunk_bytes = int(np.prod(dataset.chunks)) * dataset.dtype.itemsize
            if chunk_bytes > max(dataset.nbytes, 1 << 20):
                raise Refused(f"dataset {path} declares chunks {dataset.chunks} larger than its shape {dataset.shape}")
        array = _read_filtered(dataset, path) if compressed else np.ascontiguousarray(dataset[()])
        if array.dtype.str != dataset.dtype.str or array.shape != dataset.shape:
            raise Refused(f"dataset {path} read back as {array.dtype} {array.shape}")
        described[path] = [array.dtype.str, list(array.shape), offset]
        data.append(array)
        offset += array.nbytes
    return {"arrays": described}, data


def _read_filtered(dataset, path: str):
    """A compressed dataset, decompressed chunk by chunk here: the HDF5 library's deflate filter grows its
    buffer for as long as the stream inflates, so a small chunk could fill memory; here each chunk may inflate
    to its declared size and no further."""
    import numpy as np

    plist = dataset.id.get_create_plist()
    filters = [plist.get_filter(n)[0] for n in range(plist.get_nfilters())]
    chunk_shape, dtype, shape = dataset.chunks, dataset.dtype, dataset.shape
    chunk_bytes = int(np.prod(chunk_shape)) * dtype.itemsize
    array = np.full(shape, dataset.fillvalue, dtype=dtype)
    chunks = []
    if hasattr(dataset.id, "chunk_iter"):  # HDF5 1.14+: one pass over the chunk index
        dataset.id.chunk_iter(chunks.append)
    else:
        chunks = [dataset.id.get_chunk_info(n) for n in range(dataset.id.get_num_chunks())]
    for info in chunks:
        if any(o >= s or o % c for o, s, c in zip(info.chunk_offset, shape, chunk_shape)):
            raise Refused(f"dataset {path} has a chunk at {info.chunk_offset}, outside its shape {shape}")
        _, raw = dataset.id.read_direct_chunk(info.chunk_offset)
        for n in reversed(range(len(filters))):
            if info.filter_mask & (1 << n):
                continue
            raw = _inflate(raw, chunk_bytes, path) if filters[n] == _DEFLATE else _unshuffle(raw, dtype.itemsize)
        if len(raw) != chunk_bytes:
            raise Refused(f"dataset {path}: a chunk holds {len(raw)} bytes, not {chunk_bytes}")
        chunk = np.frombuffer(raw, dtype).reshape(chunk_shape)
        region = tuple(slice(o, min(o + c, s)) for o, c, s in zip(info.chunk_offset, chunk_shape, shape))
        array[region] = chunk[tuple(slice(0, r.stop - r.start) for r in region)]
    return array


def _inflate(raw: bytes, limit: int, path: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise Refused(f"dataset {path}: a chunk does not decompress: {exc}") from None
    if len(data) > limit or not inflater.eof:
        raise Refused(f"dataset {path}: a chunk inflates to more than its declared {limit} bytes, or is cut short")
    return data


def _unshuffle(raw: bytes, itemsize: int) -> bytes:
    """Undo HDF5's shuffle filter: byte k of every element was stored together, then the leftover bytes."""
    import numpy as np

    count = len(raw) // itemsize
    if itemsize == 1 or count < 2:
        return raw
    grouped = np.frombuffer(raw, np.uint8, count * itemsize).reshape(itemsize, count)
    return grouped.T.tobytes() + raw[count * itemsize:]


# ----------------------------------------------------------------------------------------- the process
def _limit_memory(limit: int) -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def converse(target: str, memory_limit: int, inbox, outbox) -> None:
    _limit_memory(memory_limit)
    import h5py

    if target == "-":
        image = read_message(inbox)[1]
        refuse_endless_global_heap(image)
        source, file_size, driver = io.BytesIO(image), len(image), None
    else:
        file_size = os.path.getsize(target)
        with open(target, "rb") as f:
            if file_size:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as image:
                    refuse_endless_global_heap(image)
        source, driver = target, "sec2"
    with h5py.File(source, "r", driver=driver) as h5file:
        description, datasets = describe(h5file, file_size)
        write_message(outbox, description)
        request, _ = read_message(inbox)
        paths = request.get("read")
        if not isinstance(paths, list):
            raise Refused("malformed request")
        # Room for the arrays requested (checked against their declared shapes above), twice over.
        _limit_memory(memory_limit + 2 * sum(datasets[p].nbytes for p in paths if p in datasets))
        header, data = read_datasets(datasets, paths, file_size)
        write_message(outbox, header, data)


def main(target: str, memory_limit: str) -> int:
    try:
        converse(target, int(memory_limit), sys.stdin.buffer, sys.stdout.buffer)
    except Exception as exc:  # everything h5py raises on a damaged file, MemoryError past the limit
        sys.stderr.write(" ".join(f"{type(exc).__name__}: {exc}".split()) + "\n")
        return FORMAT_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[-2:]))
