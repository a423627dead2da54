"""The formats the fuzzer covers and the valid seed files each one starts from.

Seeds are written at the start of every run from small models built here with the real frameworks (torch,
Keras on its torch backend, ONNX through ``torch.onnx.export``) and with fastlstm's own ``Model.save``;
nothing binary is kept in the repository. The models are tiny (3 inputs, 4 hidden units) so that most of a
file's bytes are structure (zip directories, pickles, JSON, HDF5 headers, protobuf) rather than weights,
and there are two per format, one plain and one using more features, for splices to mix.

``python -m fuzz.seeds DIR [FORMAT ...]`` writes them; the harness runs that in a child process
(``write_seeds_in_child``), so the frameworks never load into the process that drives the fuzzing.

Adding a format is one entry in ``FORMATS``: its name, the suffix its files need, and a function writing
one seed model to a path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Format:
    """A file format fastlstm loads: ``write(net, path)`` saves the seed network ``net`` (a ``SeedNet``) there."""

    name: str
    suffix: str  # fastlstm recognises ONNX by its suffix only; the others by their leading bytes
    write: Callable[["SeedNet", str], None]
    # Whether the text network is a seed: a safetensors file does not record its embedding (a load option
    # would have to name it), so that format's seeds are the feature networks only.
    text_seed: bool = True


class SeedNet:
    """One small network, built in torch and in Keras with the same layout, saved in whichever format asks."""

    def __init__(self, torch_module, keras_model, example_input, is_text: bool = False):
        self.torch = torch_module
        self.keras = keras_model
        self.example_input = example_input
        self.is_text = is_text  # takes token ids


def _torch_save(net: SeedNet, path: str, zip_layout: bool) -> None:
    import torch

    torch.save(net.torch.state_dict(), path, _use_new_zipfile_serialization=zip_layout)


def _torchscript(net: SeedNet, path: str) -> None:
    """Traced, except the text network: a traced embedding does not record its ``max_norm``, so fastlstm
    refuses it unless told (a scripted archive records it)."""
    import torch

    module = torch.jit.script(net.torch) if net.is_text else torch.jit.trace(net.torch, net.example_input)
    torch.jit.save(module, path)


def _onnx(net: SeedNet, path: str) -> None:
    import torch

    torch.onnx.export(net.torch, (net.example_input,), path, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch", 1: "time"}})


def _safetensors(net: SeedNet, path: str) -> None:
    """The state_dict as the safetensors specification lays it out (8-byte header size, JSON header, data),
    written here so that no ``safetensors`` package is needed."""
    header, chunks, offset = {}, [], 0
    for name, tensor in sorted(net.torch.state_dict().items()):
        raw = tensor.detach().contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks))


def _native(net: SeedNet, path: str) -> None:
    import fastlstm

    fastlstm.load(net.torch, backend="numpy").save(path)


FORMATS = (
    Format("native", ".fastlstm", _native),
    Format("torch-zip", ".pt", lambda net, path: _torch_save(net, path, zip_layout=True)),
    Format("torch-legacy", ".pt", lambda net, path: _torch_save(net, path, zip_layout=False)),
    Format("torchscript", ".pt", _torchscript),
    Format("keras", ".keras", lambda net, path: net.keras.save(path)),
    Format("keras-h5", ".h5", lambda net, path: net.keras.save(path)),
    Format("onnx", ".onnx", _onnx),
    Format("safetensors", ".safetensors", _safetensors, text_seed=False),
)
FORMAT_NAMES = tuple(f.name for f in FORMATS)


def format_named(name: str) -> Format:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise ValueError(f"unknown format {name!r}; known: {', '.join(FORMAT_NAMES)}")


def seed_nets() -> list[SeedNet]:
    """A plain network (LSTM -> Linear), a richer one (two bidirectional layers; a second LSTM and a softmax
    head in Keras) and a text one (token ids -> embedding -> GRU -> a recurrent layer of another kind and size
    -> Linear), with fixed weights. No projection (``proj_size``): ONNX cannot express it."""
    os.environ.setdefault("KERAS_BACKEND", "torch")  # read when keras is first imported, just below
    import keras
    import torch
    from torch import nn

    class LSTMWithHead(nn.Module):
        def __init__(self, lstm: nn.LSTM, head_inputs: int):
            super().__init__()
            self.lstm = lstm
            self.fc = nn.Linear(head_inputs, 2)

        def forward(self, x):
            return self.fc(self.lstm(x)[0])

    torch.manual_seed(0)
    keras.utils.set_random_seed(0)
    example = torch.zeros(1, 5, 3)
    plain = LSTMWithHead(nn.LSTM(3, 4, batch_first=True), 4).eval()
    rich = LSTMWithHead(nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True), 8).eval()
    plain_keras = keras.Sequential([keras.Input((None, 3)), keras.layers.LSTM(4, return_sequences=True),
                                    keras.layers.Dense(2)])
    rich_keras = keras.Sequential([keras.Input((None, 3)),
                                   keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True)),
                                   keras.layers.LSTM(4), keras.layers.Dense(2, activation="softmax")])
    class TextNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 3)
            self.gru = nn.GRU(3, 4, batch_first=True)
            self.rnn = nn.RNN(4, 5, batch_first=True)
            self.fc = nn.Linear(5, 2)

        def forward(self, ids):
            return self.fc(self.rnn(self.gru(self.embed(ids))[0])[0])

    text_keras = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(7, 3, mask_zero=True),
                                   keras.layers.GRU(4, return_sequences=True),
                                   keras.layers.SimpleRNN(5, return_sequences=True), keras.layers.Dense(2)])
    text = SeedNet(TextNet().eval(), text_keras, torch.zeros(1, 5, dtype=torch.long), is_text=True)
    return [SeedNet(plain, plain_keras, example), SeedNet(rich, rich_keras, example), text]


def write_seeds(directory: str | os.PathLike, names=FORMAT_NAMES) -> dict[str, list[str]]:
    """Write every seed of the formats ``names`` into ``directory``; their paths, by format."""
    import warnings

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    nets = seed_nets()
    written: dict[str, list[str]] = {}
    for name in names:
        fmt = format_named(name)
        for n, net in enumerate(nets):
            if net.is_text and not fmt.text_seed:
                continue
            path = str(directory / f"{fmt.name}-{n}{fmt.suffix}")
            with warnings.catch_warnings():  # the frameworks' deprecation notes (legacy .h5, TorchScript, ...)
                warnings.simplefilter("ignore")
                fmt.write(net, path)
            written.setdefault(fmt.name, []).append(path)
    return written


def write_seeds_in_child(directory: str | os.PathLike, names=FORMAT_NAMES) -> dict[str, list[str]]:
    """``write_seeds`` run in a child process, so that the frameworks never load into the calling one."""
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "fuzz.seeds", os.fspath(directory), *names], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"writing the seed files failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(write_seeds(sys.argv[1], sys.argv[2:] or FORMAT_NAMES)))
