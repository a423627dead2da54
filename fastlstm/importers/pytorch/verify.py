"""Check a translated module against its own ``forward()``.

The module tree shows the modules, not what ``forward()`` does with them: ``torch.softmax(...)``, ``F.relu``,
``out * 2``, ``out[:, -1]`` or ``torch.cat`` leave no trace in it.

* An in-memory module is the user's own object, in their process, so running it is not running code from a
  file: ``forward()`` is called once on a small deterministic probe and its output compared with the
  translated model's. The module is left as found: its train/eval flags, its parameters and buffers and
  torch's random number generator are restored.
* A TorchScript archive is never run: the code of its user classes is read as text and every call that
  computes is accounted for by the translation or listed (``verify_script_code``).
"""

from __future__ import annotations

import os
import re
import sys
import warnings

import numpy as np

from ...errors import UnsupportedModelError
from ...spec import ModelSpec
from . import unpickler
from .modules import is_recurrent_type, torch_type_name
from .options import Options
from .state_dict import MAX_NESTING, under

# float32 agreement with the source framework (the README's contract), relative to the output's magnitude.
TOLERANCE = 1e-5
# A dynamically quantized module quantizes its activations at every step, which the loaded model does not:
# the two differ by that rounding (measured up to 1.6 % of the largest output), so only a gross difference
# (a missing softmax, a wrong output mode) can be told from it.
QUANTIZED_TOLERANCE = 5e-2
PROBE_BATCH, PROBE_STEPS = 2, 5
_PROBE_SEED = 20240611  # a fixed NumPy generator of its own: the global generators are not touched

_HIDDEN_CALLS = ("forward() may apply what the module tree does not show: a functional call (torch.softmax, "
                 "F.relu, torch.sigmoid, ...), arithmetic on the output (out * 2), another choice of time steps "
                 "(out[:, -1], h_n) or a concatenation (torch.cat)")
_OPTIONS_HINT = ("say what it computes with head_input_activation=... (applied to the recurrent output before the "
                 "head), head_activations=[...] (one per Linear layer), output='sequence' | 'last_step' | "
                 "'final_state'; or, knowing the difference, load with verify=False")


def verify_against_forward(module, spec: ModelSpec, opts: Options, source: str, torch) -> None:
    """Run ``module``'s ``forward()`` and ``spec`` on one probe; refuse ``spec`` when they differ.

    Raises ``UnsupportedModelError`` naming the largest difference; warns (``warnings.warn``) instead when
    ``forward()`` cannot be called with the probe or returns something other than a tensor.
    """
    recurrent = _first_recurrent(module, opts, torch)
    if recurrent is None:
        _warn(source, "no nn.LSTM, nn.GRU, nn.RNN or cell was found to shape the probe after")
        return
    if recurrent is module and _is_cell(recurrent, torch):
        return  # a bare cell: its forward() is torch's one step, which the model runs at every step
    dtype = _probe_dtype(recurrent, torch)
    if dtype is None:
        _warn(source, "its recurrent weights are neither float32 nor float64, so forward() computes in another "
                      "precision than the loaded model")
        return
    probe = _probe(spec)
    batch_first = getattr(recurrent, "batch_first", None)  # a traced module bakes it into its code
    layouts = [True, False] if _is_cell(recurrent, torch) or not isinstance(batch_first, bool) else [batch_first]
    tolerance = QUANTIZED_TOLERANCE if _is_quantized(module, torch) else TOLERANCE
    expected = _spec_output(spec, probe)
    differences, not_run = [], []
    for batch_first in layouts:  # a cell's loop may take either layout: the check passes if one agrees
        outcome = _forward_output(module, probe, batch_first, dtype, torch, spec if recurrent is module else None)
        if isinstance(outcome, str):
            not_run.append(outcome)
            continue
        time_first = not batch_first and outcome.ndim == 3 and recurrent is not module  # a bare one's is swapped
        actual = outcome if not time_first else np.swapaxes(outcome, 0, 1)  # (T, B, O) -> (B, T, O)
        if actual.shape != expected.shape:
            differences.append(f"forward() returns shape {tuple(outcome.shape)} for the probe of shape "
                               f"{probe.shape if batch_first else np.swapaxes(probe, 0, 1).shape}, the loaded "
                               f"model (output={spec.output!r}) {expected.shape}")
            continue
        difference = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
        scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
        if np.isfinite(difference) and difference <= tolerance * scale:
            return
        differences.append(f"forward() and the loaded model differ by up to {difference:.3g} on a probe input "
                           f"(tolerance {tolerance * scale:.3g})")
    if not differences:
        _warn(source, not_run[0])
        return
    raise UnsupportedModelError([differences[0], _HIDDEN_CALLS],
                                f"{source}: the loaded model does not compute what the module's forward() "
                                f"computes; {_OPTIONS_HINT}")


def _first_recurrent(module, opts: Options, torch):
    """The recurrent module that takes the input: the first one ``lstm=`` names, else the first registered."""
    if opts.lstm:
        try:
            return module.get_submodule(opts.lstm[0])
        except AttributeError:
            return None
    for child in module.modules():
        if _is_recurrent(child, torch):
            return child
    return None


def _is_recurrent(m, torch) -> bool:
    return is_recurrent_type(torch_type_name(m, torch))


def _is_cell(m, torch) -> bool:
    return _is_recurrent(m, torch) and torch_type_name(m, torch).endswith("Cell")


def _is_quantized(module, torch) -> bool:
    return any(torch_type_name(m, torch).startswith("torch.ao.nn.quantized") for m in module.modules())


def _probe_dtype(recurrent, torch):
    """The dtype forward() computes in, read off the recurrent module's input weights."""
    weights = [p for name, p in recurrent.named_parameters() if name.startswith("weight_ih")]
    if not weights:  # a quantized module keeps packed weights and takes float32
        return torch.float32
    return weights[0].dtype if weights[0].dtype in (torch.float32, torch.float64) else None


def _probe(spec: ModelSpec) -> np.ndarray:
    """``(PROBE_BATCH, PROBE_STEPS, F)`` values of unit scale, or token ids over the whole vocabulary."""
    rng = np.random.default_rng(_PROBE_SEED)
    if spec.takes_token_ids:
        return rng.integers(0, spec.vocab_size, size=(PROBE_BATCH, PROBE_STEPS))
    return rng.standard_normal((PROBE_BATCH, PROBE_STEPS, spec.input_size))


def _spec_output(spec: ModelSpec, probe: np.ndarray) -> np.ndarray:
    """What the loaded model outputs for ``probe``, computed in float64 by the reference backend."""
    from ...model import Model

    return Model(spec, backend="numpy", dtype="float64", weights="float32").predict(probe)


def _forward_output(module, probe: np.ndarray, batch_first: bool, dtype, torch, bare: ModelSpec | None):
    """``module(probe)`` as float64 NumPy (a tuple's first element), in eval mode and without gradients,
    leaving the module and torch's RNG as found; a str saying why when it cannot be had.

    ``bare``: the spec when ``module`` is itself an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``, whose forward() is
    torch's: the output mode then says which of its outputs the model takes (``out``, ``out``'s last step, or
    the last layer's ``h_n``)."""
    x = torch.from_numpy(np.array(probe if batch_first else np.swapaxes(probe, 0, 1)))  # a copy forward() may change
    x = x if probe.dtype.kind in "iu" else x.to(dtype)
    training = [(m, m.training) for m in module.modules()]
    tensors = list(module.parameters()) + list(module.buffers())
    saved = [t.detach().clone() for t in tensors]
    rng_state = torch.random.get_rng_state()
    try:
        module.eval()
        with torch.no_grad():
            output = module(x)
    except Exception as exc:  # forward() takes other arguments or fails on the probe: not a reason to refuse
        return f"forward() raised {type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
        torch.random.set_rng_state(rng_state)
        for m, mode in training:
            m.training = mode
        with torch.no_grad():
            for tensor, copy in zip(tensors, saved):
                if not torch.equal(tensor, copy):
                    tensor.copy_(copy)
    if bare is not None:
        return _bare_output(output, bare, batch_first, torch)
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        return f"forward() returned a {type(output).__name__}, not a tensor (nor a tuple starting with one)"
    if not output.dtype.is_floating_point:
        return f"forward() returned a tensor of {output.dtype}"
    return output.detach().to(torch.float64).numpy()


def _bare_output(output, spec: ModelSpec, batch_first: bool, torch) -> np.ndarray:
    """What a model of output mode ``spec.output`` takes from a recurrent module's ``(out, h_n)`` or
    ``(out, (h_n, c_n))``, batch-first."""
    out, state = output
    if spec.output == "final_state":
        h_n = state[0] if isinstance(state, tuple) else state
        directions = spec.layers[-1].num_directions
        return torch.cat(list(h_n[-directions:]), dim=-1).to(torch.float64).numpy()
    out = out if batch_first else out.transpose(0, 1)
    return (out[:, -1] if spec.output == "last_step" else out).to(torch.float64).numpy()


def _warn(source: str, why: str) -> None:
    warnings.warn(f"{source}: the loaded model could not be checked against the module's forward(): {why}; "
                  "make sure what forward() computes is said with the options (head_input_activation=, "
                  "head_activations=, output=)", stacklevel=_outside_fastlstm())


def _outside_fastlstm() -> int:
    """The ``stacklevel`` of the first caller outside the fastlstm package (the user's ``fastlstm.load``)."""
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    frame, level = sys._getframe(1), 1  # level 1: the function calling warnings.warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


# ----------------------------------------------------------------------------------------- TorchScript archives
# A TorchScript archive holds forward()'s code as text (code/__torch__/....py); it is read, never run. The
# classes of torch's own modules (nn.LSTM, nn.Linear, nn.Sequential ...) run torch's known code; the user's
# classes are scanned for calls that change values in ways the module tree does not show.

# Calls that change no value the model outputs: shapes and types looked at, errors raised, dropout (a no-op
# in eval mode), zeros for an initial state (the loaded model's default).
_NEUTRAL_CALLS = frozenset({
    "torch.size", "torch.dim", "torch.len", "torch.eq", "torch.ne", "torch.lt", "torch.le", "torch.gt", "torch.ge",
    "torch.__is__", "torch.__isnot__", "torch.__not__", "torch.__contains__", "torch.format", "torch.warn",
    "torch.device", "torch.zeros", "torch.zeros_like", "torch.new_zeros", "torch.contiguous", "torch.detach",
    "torch.dropout",
    "torch.feature_dropout", "torch.alpha_dropout", "torch.nn.functional.dropout", "ops.prim.NumToTensor",
    "ops.prim.RaiseException", "ops.prim.dtype", "ops.prim.device", "ops.prim.unchecked_unwrap_optional",
})
# Functional activations -> the fastlstm activation computing them (by name: their settings are not read).
_FUNCTIONAL_ACTIVATIONS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "softmax": "softmax",
                           "softsign": "softsign", "hardsigmoid": "hard_sigmoid", "leaky_relu": "leaky_relu",
                           "elu": "elu", "softplus": "softplus"}
_TIME_STEP_CALLS = ("torch.select", "torch.slice")
# What a loop calling a cell once per step does besides: its outputs collected and stacked.
_CELL_LOOP_CALLS = frozenset({"torch.append", "torch.stack", *_TIME_STEP_CALLS})
_FULL_SLICE_ARGUMENTS = ((), ("0",), ("0", "0"), ("0", "0", "9223372036854775807"),
                         ("0", "0", "9223372036854775807", "1"))
_CALL = re.compile(r"(?<![\w.)\]])((?:__torch__\.)?(?:torch|ops)(?:\.\w+)+)\(")
_USER_FUNCTION_CALL = re.compile(r"(?<![\w.])(__torch__\.(?!torch\.)[\w.]+)\(")


def verify_script_code(root, tree_activations: list[str], cell_loop: bool, spec: ModelSpec, opts: Options,
                       source: str) -> None:
    """Read the forward() code of the user's classes in a TorchScript archive and refuse ``spec`` when it
    calls what ``spec`` does not account for.

    ``root``: the archive's root ``ScriptObject``; ``tree_activations``: the fastlstm names of the activation
    modules in the tree (each accounts for one of the activations ``spec`` runs; a functional call needs one
    more). A functional activation is accounted for by an activation of its name that ``spec`` runs; a choice
    of time steps (``out[:, -1]``) by ``output='last_step'`` or ``'final_state'``; anything else that computes
    (``torch.mul``, ``torch.cat``, ``torch.log_softmax`` ...) never. ``cell_loop``: the model runs a cell
    (``nn.LSTMCell`` ...), which forward() calls in a loop over the steps, selecting, collecting and stacking
    them: those calls are taken as the loop's, and a warning says the steps output were not checked. A branch
    on a recorded bool attribute (``if self.last_step:``) is read as taken or not. Warns when the code cannot
    be read.
    """
    blocks, unreadable = _user_code(root, opts)
    if cell_loop and blocks:
        _warn(source, "its recurrent cell runs in a loop whose choice of time steps is not read from its code")
    if unreadable:
        _warn(source, f"the code of {', '.join(unreadable)} is absent from the archive or too large to read")
    if not blocks:
        return
    run = [a.name for a in (*(layer.activation for layer in spec.head), spec.head_input_activation)
           if a.name != "identity"]
    for name in tree_activations:
        if name in run:
            run.remove(name)
    found, step_choices = [], []
    for where, text in blocks:
        for call, arguments in _calls(text):
            call = call.removeprefix("__torch__.")  # torch's own scripted functions: torch.nn.functional.relu
            namespace, _, short = call.rpartition(".")
            short = short.rstrip("_")  # in-place variants: relu_
            is_torch_function = namespace in ("torch", "torch.nn.functional")
            if call in _NEUTRAL_CALLS or (cell_loop and call in _CELL_LOOP_CALLS):
                continue
            if call in _TIME_STEP_CALLS:
                if call == "torch.slice" and tuple(arguments[1:]) in _FULL_SLICE_ARGUMENTS:
                    continue  # out[:] of a dimension: every step
                step_choices.append(f"{where}: {call}({', '.join(arguments)}) (a choice of time steps, as "
                                    "out[:, -1])")
                continue
            if is_torch_function and short in _FUNCTIONAL_ACTIVATIONS:
                activation = _FUNCTIONAL_ACTIVATIONS[short]
                if activation in run:
                    run.remove(activation)
                    continue
                found.append(f"{where}: {call} (an activation the loaded model does not run: "
                             f"head_activations=[...] or head_input_activation=... say where it applies)")
                continue
            found.append(f"{where}: {call} (fastlstm cannot run it)")
    scanned = "\n".join(text for _, text in blocks)
    for where, text in blocks:  # functions of the user's other code files: their code is not read here
        found += [f"{where}: {name} (a function whose code is in another file, not read)"
                  for name in dict.fromkeys(_USER_FUNCTION_CALL.findall(text))
                  if f"def {name.rpartition('.')[2]}(" not in scanned]
    if cell_loop:
        pass  # the loop's selections and stacking are its nature, not a choice of steps
    elif spec.output == "sequence":
        found += [f"{choice}; the loaded model outputs every step (output='sequence')" for choice in step_choices]
    elif not step_choices:
        found.append(f"output={spec.output!r}, but the forward() code chooses no time step (out[:, -1], h_n[-1]): "
                     "it outputs every step")
    if found:
        raise UnsupportedModelError(found, f"{source}: forward()'s code computes what the loaded model does not; "
                                           f"{_OPTIONS_HINT}")


def _user_code(root, opts: Options) -> tuple[list[tuple[str, str]], list[str]]:
    """``(where, code)`` of every user class in the module tree (its class block; the functions beside it
    in its file, which its code may call), and the classes whose code cannot be read."""
    blocks, unreadable, seen_classes = [], [], set()
    stack = [("", root, 0)]
    while stack:
        path, obj, depth = stack.pop()
        if path and any(under(path, p) for p in opts.ignore):
            continue
        cls = type(obj)
        if cls not in seen_classes and not obj.type_name.startswith("torch."):
            seen_classes.add(cls)
            where = f"{obj.type_name.rpartition('.')[2]} ({path!r})" if path else obj.type_name.rpartition(".")[2]
            code = _class_code(cls.code_lines, cls.qualified_name.rpartition(".")[2], obj.attributes)
            if code is None:
                unreadable.append(where)
            else:
                blocks.append((where, code))
        if depth < MAX_NESTING:
            stack += [(f"{path}.{name}" if path else name, value, depth + 1)
                      for name, value in obj.attributes.items() if isinstance(value, unpickler.ScriptObject)]
    return blocks, unreadable


def _class_code(lines: list[str] | None, class_name: str, attributes: dict) -> str | None:
    """The block of ``class <class_name>(Module):`` and the file's top-level functions, without the branches
    a bool attribute of the object rules out; None if not found."""
    if not lines:
        return None
    header = f"class {class_name}(Module):"
    if header not in lines:
        return None
    kept, keeping = [], False
    for line in lines:
        if line and not line[0].isspace():
            keeping = line == header or line.startswith("def ")
        if keeping:
            kept.append(line)
    return "\n".join(_taken_branches(kept, attributes))


_BOOL_READ = re.compile(r"^\s*(\w+) = self\.(\w+)$")
_IF = re.compile(r"^(\s*)if (\w+):$")


def _taken_branches(lines: list[str], attributes: dict) -> list[str]:
    """``lines`` without the branch not taken of each ``if <local>:`` whose local reads a bool attribute
    (TorchScript writes ``if self.last_step:`` as ``last_step = self.last_step`` then ``if last_step:``)."""
    bools = {}  # local name -> the attribute's recorded value
    kept, skip_indent, position = [], None, 0
    while position < len(lines):
        line = lines[position]
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if line.strip() and indent <= skip_indent:
                skip_indent = None
            else:
                position += 1
                continue
        read = _BOOL_READ.match(line)
        if read and isinstance(attributes.get(read.group(2)), bool):
            bools[read.group(1)] = attributes[read.group(2)]
        branch = _IF.match(line)
        if branch and branch.group(2) in bools:
            taken = bools[branch.group(2)]
            end = _block_end(lines, position + 1, indent)
            body = lines[position + 1:end]
            other = []
            if end < len(lines) and lines[end] == " " * indent + "else:":
                other_end = _block_end(lines, end + 1, indent)
                other, end = lines[end + 1:other_end], other_end
            kept += body if taken else other
            position = end
            continue
        kept.append(line)
        position += 1
    return kept


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """The index of the first line from ``start`` indented no deeper than ``indent`` (blank lines belong)."""
    end = start
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    return end


def _calls(text: str):
    """Each ``torch.*`` / ``ops.*`` call in ``text``: its dotted name and its top-level arguments as text."""
    for match in _CALL.finditer(text):
        depth, start, arguments = 1, match.end(), []
        position = start
        while position < len(text) and depth:
            char = text[position]
            if char in "([{":
                depth += 1
            elif char in ")]}":
                depth -= 1
            if (char == "," and depth == 1) or depth == 0:
                arguments.append(text[start:position].strip())
                start = position + 1
            position += 1
        yield match.group(1), [a for a in arguments if a]
