"""Check a translated in-memory module against its own ``forward()``.

The module tree shows the modules, not what ``forward()`` does with them: ``torch.softmax(...)``, ``F.relu``,
``out * 2``, ``out[:, -1]`` or ``torch.cat`` leave no trace in it. The module is the user's own object, in
their process, so running it is not running code from a file: ``forward()`` is called once on a small
deterministic probe and its output compared with the translated model's. The module is left as found: its
train/eval flags, its parameters and buffers and torch's random number generator are restored.
"""

from __future__ import annotations

import warnings

import numpy as np

from ...errors import UnsupportedModelError
from ...spec import ModelSpec
from .options import Options

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
    if recurrent is None or recurrent is module and _is_cell(recurrent, torch):
        return  # a bare cell: its forward() is torch's one step, which the model runs at every step
    dtype = _probe_dtype(recurrent, torch)
    if dtype is None:
        _warn(source, "its recurrent weights are neither float32 nor float64, so forward() computes in another "
                      "precision than the loaded model")
        return
    probe = _probe(spec)
    layouts = [True, False] if _is_cell(recurrent, torch) else [bool(getattr(recurrent, "batch_first", False))]
    tolerance = QUANTIZED_TOLERANCE if _is_quantized(module) else TOLERANCE
    expected = _spec_output(spec, probe)
    failure = None
    for batch_first in layouts:  # a cell's loop may take either layout: the check passes if one agrees
        outcome = _forward_output(module, probe, batch_first, dtype, torch, spec if recurrent is module else None)
        if isinstance(outcome, str):
            failure = failure or ("could not run", outcome)
            continue
        time_first = not batch_first and outcome.ndim == 3 and recurrent is not module  # a bare one's is swapped
        actual = outcome if not time_first else np.swapaxes(outcome, 0, 1)  # (T, B, O) -> (B, T, O)
        if actual.shape != expected.shape:
            failure = ("differs", f"forward() returns shape {tuple(outcome.shape)} for the probe of shape "
                                  f"{probe.shape if batch_first else np.swapaxes(probe, 0, 1).shape}, the loaded "
                                  f"model (output={spec.output!r}) {expected.shape}")
            continue
        difference = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
        scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
        if np.isfinite(difference) and difference <= tolerance * scale:
            return
        failure = ("differs", f"forward() and the loaded model differ by up to {difference:.3g} on a probe input "
                              f"(tolerance {tolerance * scale:.3g})")
    kind, why = failure
    if kind == "could not run":
        _warn(source, why)
        return
    raise UnsupportedModelError([why, _HIDDEN_CALLS], f"{source}: the loaded model does not compute what the "
                                                      f"module's forward() computes; {_OPTIONS_HINT}")


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
    if isinstance(m, (torch.nn.RNNBase, torch.nn.RNNCellBase)):
        return True
    return type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") and type(m).__name__ in ("LSTM", "GRU")


def _is_cell(m, torch) -> bool:
    return isinstance(m, torch.nn.RNNCellBase)


def _is_quantized(module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in module.modules())


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
    x = torch.from_numpy(probe if batch_first else np.ascontiguousarray(np.swapaxes(probe, 0, 1)))
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
                  "head_activations=, output=)", stacklevel=5)
