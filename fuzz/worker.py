"""The child process that loads damaged files: ``python -m fuzz.worker --memory-limit-mib N [--loader SPEC]``.

It first caps its own address space (``RLIMIT_AS``, inherited by any process a loader starts), imports the
loader and every importer, then reads one JSON request per line on stdin (``{"path": ...}``) and answers
each with one JSON line on its original stdout before reading the next, so the parent always knows which
file a crash or a hang belongs to. File descriptor 1 itself is pointed at stderr, so nothing a library
prints can corrupt the answers. For each file it

1. resets the peak resident set size (``/proc/self/clear_refs``, Linux), so that the peak (``VmHWM``) afterwards is
   this file's peak and not the largest since the worker started (helper processes a loader starts are
   counted too, see ``_try_file``);
2. loads the file with the loader (``fastlstm.load`` unless ``--loader`` names another ``module:function``
   or ``path/to/file.py:function``);
3. if that succeeds, runs the model once (``predict`` on a small random batch): a load that succeeds must
   give a model that runs, or refuses the input with a ``FastLSTMError``;
4. answers with the outcome (after a line ``{"loaded": true}`` between steps 2 and 3, so that a crash or
   a hang is charged to the right step): ``ok``, ``refused`` / ``predict-refused`` (a ``FastLSTMError``, by class),
   ``outside`` (any other exception: its type, message and where it was raised) or ``memory`` (a
   ``MemoryError``: the address-space limit was hit), with the peak RSS and the time taken.

``faulthandler`` is on, so a crash leaves the Python stack on stderr for the parent to quote.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import importlib
import importlib.util
import json
import os
import resource
import sys
import time
import traceback
import warnings

import numpy as np

MESSAGE_CHARS = 600
TRACEBACK_FRAMES = 8


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fuzz.worker")
    parser.add_argument("--memory-limit-mib", type=int, required=True)
    parser.add_argument("--loader", default="fastlstm:load")
    args = parser.parse_args(argv)

    limit = args.memory_limit_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    faulthandler.enable()
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    from fastlstm.errors import FastLSTMError

    _import_importers()
    load = _resolve(args.loader)
    rng = np.random.default_rng(0)
    peak_resettable = _reset_peak_rss()
    answers.write(json.dumps({"ready": True, "peak_per_file": peak_resettable,
                              "baseline_rss_kib": _own_peak_rss_kib()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        answers.write(json.dumps(_try_file(request["path"], load, rng, FastLSTMError, peak_resettable,
                                           loaded=lambda: answers.write('{"loaded": true}\n'))) + "\n")


def _try_file(path: str, load, rng, FastLSTMError, peak_resettable: bool, loaded) -> dict:
    gc.collect()
    if peak_resettable:
        _reset_peak_rss()
    helpers_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    result: dict = {"outcome": "ok"}
    phase = "load"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = load(path)
            phase = "predict"
            loaded()
            if getattr(model, "takes_token_ids", False):
                vocab, padding = model.spec.vocab_size, model.spec.mask_value
                x = rng.integers(0, vocab, (2, 3))
                if padding is not None:  # no padding id mid-sequence, which predict refuses by design
                    x[x == padding] = (int(padding) + 1) % vocab
            else:
                x = rng.standard_normal((2, 3, int(model.input_size))).astype(np.float32)
            model.predict(x)
            del model
        except FastLSTMError as exc:
            result = {"outcome": "refused" if phase == "load" else "predict-refused", "error": type(exc).__name__,
                      "raised_at": _describe(exc)["raised_at"]}
        except MemoryError as exc:
            result = {"outcome": "memory", **_describe(exc)}
        except BaseException as exc:  # noqa: BLE001 - anything else escaping a loader is the finding
            result = {"outcome": "outside", **_describe(exc)}
    result["phase"] = phase
    result["seconds"] = time.perf_counter() - started
    result["warnings"] = sorted({w.category.__name__ for w in caught})
    peak = _own_peak_rss_kib()
    # A helper process the loader started (the HDF5 reader) is counted when its peak beats every earlier
    # helper's (ru_maxrss of children is a running maximum). The count is an upper bound: a child's starts
    # from the worker's own size when it is forked.
    helpers_after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_kib"] = max(peak, helpers_after) if helpers_after > helpers_before else peak
    return result


def _describe(exc: BaseException) -> dict:
    """Type, message and where ``exc`` was raised: the innermost frame, and the innermost in fastlstm."""
    frames = traceback.extract_tb(exc.__traceback__)
    located = [f"{short_path(f.filename)}:{f.lineno}" for f in frames]
    own = [where for where in located if where.startswith("fastlstm/")]
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return {"error": name, "message": str(exc)[:MESSAGE_CHARS],
            "raised_at": located[-1] if located else "?", "fastlstm_frame": own[-1] if own else None,
            "traceback": located[-TRACEBACK_FRAMES:]}


def short_path(filename: str) -> str:
    """``filename`` relative to the import path entry that holds it (``fastlstm/importers/onnx.py``,
    ``zipfile.py``, ``numpy/lib/format.py``), so that reports carry no machine paths."""
    best = ""
    for entry in sys.path:
        entry = os.path.abspath(entry or ".")
        if filename.startswith(entry + os.sep) and len(entry) > len(best):
            best = entry
    return os.path.relpath(filename, best) if best else os.path.basename(filename)


def _own_peak_rss_kib() -> int:
    """This process's peak resident set size since the last reset, in KiB: ``VmHWM`` where Linux has it.

    ``ru_maxrss`` would not do after a reset: it also keeps the peak the process had before its ``exec``,
    which for a worker started from a large process (a test run with torch loaded) is that process's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _import_importers() -> None:
    """Import every importer, and the onnx package the ONNX importer imports on first use, now: a file's peak
    RSS must not be the cost of a first import."""
    for module in ("fastlstm.native", "fastlstm.importers.pytorch", "fastlstm.importers.keras",
                   "fastlstm.importers.onnx"):
        importlib.import_module(module)
    try:
        importlib.import_module("onnx")
    except ImportError:
        pass


def _resolve(spec: str):
    """The function named by ``module:function`` or ``path/to/file.py:function``."""
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


if __name__ == "__main__":
    main()
