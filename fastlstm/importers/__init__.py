"""Importers: turn a file or an in-memory framework object into a ``ModelSpec``.

``read_model`` recognises the source (a file's leading bytes and contents, never its extension alone; an
object's type, without importing the framework it comes from) and hands it to the importer for that
format. Each importer only translates into the canonical description; none knows about backends.
"""

from __future__ import annotations

import os
import zipfile

from ..errors import ModelFormatError
from ..spec import ModelSpec

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_2_PLUS = b"\x80"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

SUPPORTED_FORMATS = (
    "fastlstm native files (Model.save)",
    "PyTorch state_dict files (torch.save, zip and legacy formats)",
    "TorchScript files (torch.jit.save)",
    "safetensors files of a PyTorch state_dict",
    "Keras 3 .keras files and legacy Keras .h5 model files",
    "ONNX files (.onnx)",
)


def read_model(source, **options) -> ModelSpec:
    """The validated ``ModelSpec`` of ``source`` (a path, a ``ModelSpec`` or a framework object)."""
    if isinstance(source, ModelSpec):
        _no_options(options, "a ModelSpec")
        return source.validate()
    if isinstance(source, (str, os.PathLike)):
        return _read_file(os.fspath(source), options)
    module = type(source).__module__ or ""
    # Keras first: on Keras' torch backend a keras.Model is also a torch.nn.Module.
    if module.split(".")[0] == "keras" or _has_base_from(source, "keras"):
        from . import keras

        return keras.spec_from_keras_model(source, **options)
    if module.split(".")[0] == "torch" or _has_base_from(source, "torch") or _is_torch_state_dict(source):
        from . import pytorch

        return pytorch.spec_from_module(source, **options)
    if module.split(".")[0] == "onnx" and type(source).__name__ == "ModelProto":
        from . import onnx

        return onnx.spec_from_model_proto(source, name="ModelProto", **options)
    raise TypeError(
        f"cannot load a {type(source).__module__}.{type(source).__qualname__}: expected a file path, "
        "a fastlstm ModelSpec, a torch.nn.Module containing an nn.LSTM, a keras.Model or an onnx.ModelProto"
    )


def _read_file(path: str, options: dict) -> ModelSpec:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such model file: {path!r}")
    if os.path.isdir(path):
        raise ModelFormatError(f"{path!r} is a directory, not a model file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_ZIP_MAGIC):
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as exc:
            raise ModelFormatError(f"{path!r} looks like a zip archive but cannot be opened: {exc}") from None
        with archive:
            names = archive.namelist()
            from .. import native

            if native.is_native_zip(archive):
                _no_options(options, "a fastlstm native file")
                return native.load_native(archive, path)
            if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                from . import pytorch

                return pytorch.spec_from_file(path, **options)
            if "config.json" in names:
                from . import keras

                return keras.spec_from_file(path, **options)
        raise ModelFormatError(f"{path!r} is a zip archive but not a model fastlstm reads; supported: "
                               + "; ".join(SUPPORTED_FORMATS))
    if head.startswith(_PICKLE_PROTOCOL_2_PLUS):
        from . import pytorch

        return pytorch.spec_from_file(path, **options)
    if head.startswith(_HDF5_MAGIC):
        from . import keras

        return keras.spec_from_file(path, **options)
    from .pytorch.safetensors import looks_like_safetensors

    if looks_like_safetensors(path):
        from . import pytorch

        return pytorch.spec_from_safetensors(path, **options)
    if path.lower().endswith(".onnx"):  # protobuf has no magic number: the extension is the only sign
        from . import onnx

        return onnx.spec_from_file(path, **options)
    raise ModelFormatError(
        f"{path!r} is not a model file fastlstm recognises (leading bytes {head!r}); supported: "
        + "; ".join(SUPPORTED_FORMATS)
    )


def _is_torch_state_dict(obj) -> bool:
    """A mapping of names to torch tensors, as ``module.state_dict()`` returns."""
    return (isinstance(obj, dict) and bool(obj)
            and all((type(v).__module__ or "").split(".")[0] == "torch" for v in obj.values()))


def _has_base_from(obj, package: str) -> bool:
    """True if ``obj``'s class derives from a class defined in ``package`` (without importing it)."""
    return any((cls.__module__ or "").split(".")[0] == package for cls in type(obj).__mro__)


def _no_options(options: dict, what: str) -> None:
    if options:
        raise TypeError(f"options {sorted(options)} do not apply to {what}")
