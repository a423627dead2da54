"""Options of the PyTorch importer (keywords of ``fastlstm.load``), parsed once into ``Options``."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...activations import ACTIVATION_PARAMS, ELEMENTWISE, IDENTITY, Activation
from ...spec import OUTPUT_MODES

OPTION_NAMES = ("lstm", "head", "head_activations", "head_input_activation", "output", "ignore", "state_dict_key")


@dataclass(frozen=True)
class Options:
    lstm: str | None = None
    head: tuple[str, ...] | None = None
    head_activations: tuple[Activation, ...] | None = None
    head_input_activation: Activation | None = None
    output: str = "sequence"
    ignore: tuple[str, ...] = ()
    state_dict_key: str | None = None

    @classmethod
    def parse(cls, options: dict) -> "Options":
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)} for a PyTorch model; accepted: "
                            f"{', '.join(OPTION_NAMES)}")
        lstm = options.get("lstm")
        if lstm is not None and not isinstance(lstm, str):
            raise TypeError(f"lstm: expected the prefix of the LSTM's parameters as a str, got {lstm!r}")
        head = _str_sequence(options.get("head"), "head")
        activations = options.get("head_activations")
        if activations is not None:
            if isinstance(activations, (str, Activation)) or not isinstance(activations, (list, tuple)):
                raise TypeError(f"head_activations: expected a list with one activation per head layer, "
                                f"got {activations!r}")
            activations = tuple(_activation_option(a, f"head_activations[{n}]") for n, a in enumerate(activations))
        head_input = options.get("head_input_activation")
        if head_input is not None:
            head_input = _activation_option(head_input, "head_input_activation")
            if head_input.name not in ELEMENTWISE:
                raise ValueError(f"head_input_activation: {head_input.name} is not elementwise; softmax runs in the "
                                 "head's last layer only")
        output = options.get("output", "sequence")
        if output not in OUTPUT_MODES:
            raise ValueError(f"output: expected one of {OUTPUT_MODES}, got {output!r}")
        ignore = _str_sequence(options.get("ignore"), "ignore") or ()
        if "" in ignore:
            raise ValueError("ignore: an empty name would ignore everything")
        state_dict_key = options.get("state_dict_key")
        if state_dict_key is not None and not isinstance(state_dict_key, str):
            raise TypeError(f"state_dict_key: expected the checkpoint entry holding the state_dict as a str "
                            f"(nested keys joined by '.'), got {state_dict_key!r}")
        return cls(lstm=None if lstm is None else lstm.strip("."), head=head, head_activations=activations,
                   head_input_activation=head_input, output=output, ignore=ignore, state_dict_key=state_dict_key)

    def with_inferred(self, head, head_activations, head_input_activation) -> "Options":
        return replace(self, head=head, head_activations=head_activations,
                       head_input_activation=head_input_activation)


def _str_sequence(value, option: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{option}: expected a list of names (str), got {value!r}")
    return tuple(v.strip(".") for v in value)


def _activation_option(value, where: str) -> Activation:
    if value is None:
        return IDENTITY
    if isinstance(value, Activation):
        if value.name not in ACTIVATION_PARAMS:
            raise ValueError(f"{where}: unknown activation {value.name!r}")
        return value
    if isinstance(value, str):
        if value not in ACTIVATION_PARAMS:
            raise ValueError(f"{where}: unknown activation {value!r}; known: {', '.join(ACTIVATION_PARAMS)}")
        return Activation.of(value)
    raise TypeError(f"{where}: expected an activation name, an Activation or None, got {value!r}")


