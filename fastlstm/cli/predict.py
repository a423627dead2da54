"""Run a model on whole sequences read from a file and write its outputs.

Input: ``.npy`` (the array ``x``), ``.npz`` (array ``x``, or its only array, and optionally ``lengths``) or
``.csv`` (one sequence: a row per time step, a column per feature; one column of token ids for a model
that takes them). ``x`` is ``(batch, time, features)`` or one sequence ``(time, features)`` — ``(batch,
time)`` or ``(time,)`` of integer ids for a token model — as ``Model.predict`` takes it. Output: the same
format, chosen by the output file's extension (``.npz`` stores ``y``); without ``-o`` the outputs are
printed as CSV, one line per step (sequences of a batch separated by a blank line).
"""

from __future__ import annotations

import io
import os
import sys
import zipfile

import numpy as np

from ..errors import FastLSTMError
from . import CommandError
from .npy import load_npy

NAME = "predict"
HELP = "run a model on sequences from a .npy, .npz or .csv file"
FORMATS = (".npy", ".npz", ".csv")


def add_arguments(parser) -> None:
    parser.add_argument("model", help="the model file")
    parser.add_argument("input", help="the sequences: .npy, .npz or .csv")
    parser.add_argument("-o", "--out", metavar="OUTPUT",
                        help="where to write the outputs (.npy, .npz or .csv); default: CSV on standard output")
    parser.add_argument("--lengths", metavar="N[,N...]",
                        help="each sequence's length in a padded batch (overrides an .npz's 'lengths')")


def run(args) -> None:
    from . import load_model

    out_format = None if args.out is None else _format(args.out, "output")
    x, lengths = read_input(args.input)
    if args.lengths is not None:
        lengths = _lengths(args.lengths)
    model = load_model(args)
    if args.input.lower().endswith(".csv") and model.takes_token_ids:
        if x.shape[1] != 1:
            raise CommandError(f"input {args.input!r}: this model takes token ids: expected one column (an id per "
                               f"time step), got {x.shape[1]} columns")
        x = x[:, 0]
    y = model.predict(x, lengths=lengths)
    if out_format is None:
        sys.stdout.write(_csv_text(y))
    else:
        write_output(args.out, out_format, y)


def _format(path: str, what: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        raise CommandError(f"{what} {path!r}: expected a file ending in {', '.join(FORMATS)}, got {extension or 'no extension'!r}")
    return extension


def read_input(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(x, lengths)`` from an input file (``lengths`` None unless an ``.npz`` holds them). Nothing in the file
    is executed: NumPy files are read without pickles."""
    extension = _format(path, "input")
    try:
        if extension == ".npy":
            with open(path, "rb") as f:
                return load_npy(f, os.fstat(f.fileno()).st_size, f"input {path!r}"), None
        if extension == ".npz":
            return _read_npz(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2, dtype=np.float64), None
    except (OSError, CommandError, FastLSTMError):
        raise
    except Exception as exc:  # NumPy's readers raise ValueError, EOFError, zipfile.BadZipFile, ...
        raise CommandError(f"input {path!r}: cannot be read as {extension} ({type(exc).__name__}: {exc})") from None


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` (the member named so, or the only one besides ``lengths``) and ``lengths`` of an ``.npz``."""
    with zipfile.ZipFile(path) as archive:
        names = [name.removesuffix(".npy") for name in archive.namelist()]
        if "x" in names:
            x_name = "x"
        elif len([n for n in names if n != "lengths"]) == 1:
            x_name = next(n for n in names if n != "lengths")
        else:
            raise CommandError(f"input {path!r}: expected an array named 'x' (or a single array), found {names}")

        def member(name: str) -> np.ndarray:
            info = archive.getinfo(name + ".npy")
            with archive.open(info) as f:
                return load_npy(f, info.file_size, f"input {path!r} array {name!r}")

        return member(x_name), (member("lengths") if "lengths" in names else None)


def _lengths(text: str) -> np.ndarray:
    try:
        return np.array([int(n) for n in text.split(",")], dtype=np.int64)
    except ValueError:
        raise CommandError(f"--lengths: expected whole numbers separated by commas, got {text!r}") from None


def write_output(path: str, extension: str, y: np.ndarray) -> None:
    if extension == ".npy":
        np.save(path, y)
    elif extension == ".npz":
        np.savez(path, y=y)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(_csv_text(y))


def _csv_text(y: np.ndarray) -> str:
    """``y`` as CSV: a row per step (or per sequence for a last-step output), full float precision; the
    sequences of a 3-D batch separated by a blank line."""
    blocks = y if y.ndim == 3 else [y]
    out = io.StringIO()
    for n, block in enumerate(blocks):
        if n:
            out.write("\n")
        np.savetxt(out, np.atleast_2d(block), delimiter=",", fmt="%.9g" if y.dtype == np.float32 else "%.17g")
    return out.getvalue()
