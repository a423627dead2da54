"""PyTorch importer: ``torch.save`` state_dicts and checkpoints, TorchScript archives, safetensors files and
in-memory modules -> ``ModelSpec``.

Every source is reduced to one thing, a flat state_dict (``{"lstm.weight_ih_l0": array, ...}``), and one
function, ``state_dict.translate``, translates it:

* **The LSTM** is found by its parameter names anywhere in the dict (``weight_ih_l{k}``, ``weight_hh_l{k}``,
  ``bias_ih_l{k}``, ``bias_hh_l{k}``, ``weight_hr_l{k}``, each optionally ``_reverse``, under any prefix; or
  an ``nn.LSTMCell``'s ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``: one forward layer). Layers,
  direction, hidden and projection sizes come from the names and shapes; ``bias = b_ih + b_hh`` (zeros for
  ``bias=False``). PyTorch's gate order is fastlstm's, so no permutation.
* **The head** is the chain of ``nn.Linear`` layers (``<prefix>.weight`` 2-D, optional ``<prefix>.bias``) that
  come after the LSTM in the dict's order (its modules' registration order), when their shapes chain from the
  LSTM's output size. A state_dict records no activations: they are identity unless ``head_activations`` and
  ``head_input_activation`` say otherwise (a module's structure supplies them when it can, see below).
* **Everything else** in the dict is refused (``UnsupportedModelError``, listing it): an embedding, a
  LayerNorm, a GRU would otherwise be silently dropped. ``ignore=`` names what is genuinely not on the path
  from input to output (an unused branch).

PyTorch's dynamically quantized modules (``torch.ao.quantization.quantize_dynamic``: packed LSTM cells and
Linear weights instead of the names above) are first rewritten into those names by ``quantized``: the LSTM's
8-bit weights keep their per-row scales, float16 weights and the Linear layers' weights become float32.

A checkpoint (``{"epoch": 3, "model_state": state_dict, "optimizer_state": ...}``) is reduced to its one dict
of tensors holding LSTM parameters; ``state_dict_key`` chooses when there are several. A safetensors file is a
flat state_dict whose order is not the modules' order, so only a single Linear layer is taken as the head
without ``head=``.

For modules (in memory, or TorchScript archives read without torch) the module tree is looked at first:
``Linear`` and activation modules registered after the LSTM, in order (an ``nn.Sequential`` is in execution
order by definition), give the head and its activations (an activation module before the first Linear layer
is applied to the LSTM's output); modules fastlstm cannot run (``nn.GRU``, ``nn.LayerNorm``, a custom module,
...) are listed and refused, and every activation module must be accounted for by an activation the loaded
model runs, also when the options name the head. What ``forward()`` does with functional calls (``F.relu``,
``out * 2``, ``out[:, -1]``) is invisible in the tree, so the translation is then checked against
``forward()`` itself (``verify``): an in-memory module is run once on a small probe and compared with the
loaded model; a TorchScript archive's ``forward()`` code is read as text (never run) for calls the loaded
model does not account for. A difference is refused naming it; a check that cannot be made warns.

Options (keywords of ``fastlstm.load``), all optional:

* ``lstm``: the prefix of the LSTM's parameters (``"encoder.rnn"``; ``""`` for a bare ``nn.LSTM``), needed
  when the dict holds several LSTMs.
* ``head``: the prefixes of the Linear layers in the order they run (``["fc1", "fc2"]``), or ``[]`` for none.
* ``head_activations``: one activation per head layer: a name from ``fastlstm.activations``
  (``"relu"``, ``"tanh"``, ``"softmax"``, ...), an ``Activation``, or ``None`` for identity.
* ``head_input_activation``: an elementwise activation applied to the LSTM's output before the head
  (``fc(relu(out))``), the same kinds of values.
* ``output``: ``"sequence"`` (default), ``"last_step"`` (a ``fc(out[:, -1])`` model) or ``"final_state"``.
* ``ignore``: prefixes (or full names) of tensors or modules that are not part of the network to run.
* ``state_dict_key``: the checkpoint entry holding the state_dict (nested keys joined by ``.``).
* ``verify``: ``False`` skips the check against ``forward()`` of modules and TorchScript archives (for a user
  who knows the loaded model computes what they need); default ``True``.

Files are read by ``unpickler`` (torch.save, TorchScript) and ``safetensors``, never importing torch; torch
itself is imported only for in-memory objects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from ...errors import ModelFormatError
from ...spec import ModelSpec
from . import quantized, safetensors, unpickler
from .modules import (activation_module_names, has_cell, numpy_state, spec_from_tree, tree_from_script_object,
                      tree_from_torch_module)
from .options import OPTION_NAMES, Options
from .state_dict import checkpoint_state_dict, flatten_state, is_entry, translate, under
from .verify import verify_against_forward, verify_script_code

__all__ = ["OPTION_NAMES", "spec_from_file", "spec_from_module", "spec_from_safetensors", "spec_from_state_dict"]


# ----------------------------------------------------------------------------------------- entry points
def spec_from_file(path, **options) -> ModelSpec:
    """The ``ModelSpec`` of a ``torch.save`` file (zip or legacy) or a ``torch.jit.save`` archive.

    Never imports torch; nothing from the file is executed (see ``unpickler``).
    """
    opts = Options.parse(options)
    path = os.fspath(path)
    name = os.path.basename(path)
    contents = unpickler.read_torch_file(path)
    if contents.is_torchscript:
        _no_checkpoint_key(opts, "a TorchScript archive")
    with unpickler.file_errors(name):
        return _spec_from_contents(contents, opts, name)


def _spec_from_contents(contents: unpickler.TorchFile, opts: Options, name: str) -> ModelSpec:
    if contents.is_torchscript:
        tree, state = tree_from_script_object(contents.root, name)
        spec = spec_from_tree(tree, state, f"TorchScript {name}", opts)
        if opts.verify:
            verify_script_code(contents.root, activation_module_names(tree, opts), has_cell(tree), spec, opts,
                               f"TorchScript {name}")
        return spec
    if not isinstance(contents.root, dict):
        raise ModelFormatError(f"{name}: expected a state_dict (a dict of tensors), found a "
                               f"{type(contents.root).__name__}")
    root = quantized.dequantized_checkpoint(contents.root, f"PyTorch state_dict {name}")
    state_dict, entry = checkpoint_state_dict(root, opts.state_dict_key, opts.ignore, name)
    state = flatten_state(state_dict, name)
    if entry:  # ignore= may name the checkpoint's other entries ("optimizer"): they are left out already
        kept = tuple(p for p in opts.ignore if not is_entry(root, p) or under(p, entry))
        opts = replace(opts, ignore=kept)
    return translate(state, opts, f"PyTorch state_dict {name}" + (f" (checkpoint entry {entry!r})" if entry else ""))


def spec_from_safetensors(path, **options) -> ModelSpec:
    """The ``ModelSpec`` of a ``.safetensors`` file: a flat state_dict, translated like a ``torch.save`` one
    except that its order is not the modules' order (see ``translate``)."""
    opts = Options.parse(options)
    _no_checkpoint_key(opts, "a safetensors file (one flat state_dict)")
    path = os.fspath(path)
    name = os.path.basename(path)
    with unpickler.file_errors(name):
        state, _metadata = safetensors.read_safetensors(path)  # metadata holds strings only ({"format": "pt"})
        return translate(state, opts, f"safetensors {name}", ordered=False)


def spec_from_module(module, **options) -> ModelSpec:
    """The ``ModelSpec`` of an in-memory ``nn.Module`` holding an ``nn.LSTM`` (scripted modules included),
    or of an in-memory state_dict of tensors."""
    opts = Options.parse(options)
    _no_checkpoint_key(opts, "an in-memory module or state_dict")
    try:
        import torch
    except ImportError:  # pragma: no cover - only reachable when handed a torch object without torch
        raise ImportError("loading an in-memory PyTorch object needs torch (pip install 'fastlstm[torch]'); "
                          "files saved with torch.save or torch.jit.save load without it") from None
    if isinstance(module, Mapping):
        state, unusable = numpy_state(module.items(), torch)
        return spec_from_tree(None, state, "PyTorch state_dict (in memory)", opts, unusable)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module or a state_dict, got {type(module).__module__}."
                        f"{type(module).__qualname__}")
    tree = tree_from_torch_module(module, torch)
    state, unusable = numpy_state(module.state_dict().items(), torch)
    source = f"torch module {type(module).__name__}"
    spec = spec_from_tree(tree, state, source, opts, unusable)
    if opts.verify:
        verify_against_forward(module, spec, opts, source, torch)
    return spec


def spec_from_state_dict(state_dict: dict[str, np.ndarray], *, source: str, **options) -> ModelSpec:
    """Translate a flat state_dict of NumPy arrays (names as ``nn.Module.state_dict()`` gives them).

    ``source`` names the model in messages and in ``ModelSpec.source``; ``options`` are described in the
    module docstring. Raises ``TypeError`` for unknown options (``ValueError`` for bad values),
    ``ModelFormatError`` when the dict is ambiguous (several LSTMs, Linear layers that do not chain),
    ``InvalidModelError`` (a ``ModelFormatError``) naming every missing or mis-shaped tensor, and
    ``UnsupportedModelError`` listing every tensor that is neither the LSTM nor its head.
    """
    opts = Options.parse(options)
    _no_checkpoint_key(opts, "a state_dict")
    return translate(dict(state_dict), opts, source)


def _no_checkpoint_key(opts: Options, what: str) -> None:
    if opts.state_dict_key is not None:
        raise TypeError(f"state_dict_key chooses among the state_dicts of a torch.save checkpoint; it does not apply "
                        f"to {what}")


