"""Options of the PyTorch importer (keywords of ``fastlstm.load``), parsed once into ``Options``."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...activations import ACTIVATION_PARAMS, ELEMENTWISE, IDENTITY, Activation
from ...errors import InvalidInputError
from ...spec import OUTPUT_MODES

OPTION_NAMES = ("lstm", "head", "head_activations", "head_input_activation", "output", "ignore", "state_dict_key",
                "embedding", "rnn_nonlinearity", "verify")
RNN_NONLINEARITIES = ("tanh", "relu")


@dataclass(frozen=True)
class Options:
    # The recurrent modules' prefixes in the order they run (nn.LSTM, nn.GRU, nn.RNN and their cells);
    # None: every one found, in registration order.
    lstm: tuple[str, ...] | None = None
    # The nn.Embedding in front: its prefix, "" for none; None: inferred.
    embedding: str | None = None
    # nn.RNN's nonlinearity, which a state_dict does not record: per RNN prefix (read off modules), or for all.
    rnn_nonlinearity: str | None = None
    rnn_nonlinearities: tuple[tuple[str, str], ...] = ()
    head: tuple[str, ...] | None = None
    head_activations: tuple[Activation, ...] | None = None
    head_input_activation: Activation | None = None
    output: str = "sequence"
    ignore: tuple[str, ...] = ()
    state_dict_key: str | None = None
    # Check the translation against what forward() computes (an in-memory module's forward() run on a probe,
    # a TorchScript archive's forward() code read); False: the user vouches for the options.
    verify: bool = True

    @classmethod
    def parse(cls, options: dict) -> "Options":
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)} for a PyTorch model; accepted: "
                            f"{', '.join(OPTION_NAMES)}")
        lstm = options.get("lstm")
        if isinstance(lstm, str):
            lstm = (lstm,)
        elif lstm is not None:
            lstm = _str_sequence(lstm, "lstm")
            if not lstm:
                raise InvalidInputError("lstm: expected at least one recurrent module's prefix")
        embedding = options.get("embedding")
        if embedding is not None and not isinstance(embedding, str):
            raise TypeError(f"embedding: expected the nn.Embedding's prefix as a str ('' for none), got {embedding!r}")
        nonlinearity = options.get("rnn_nonlinearity")
        if nonlinearity is not None and nonlinearity not in RNN_NONLINEARITIES:
            raise InvalidInputError(f"rnn_nonlinearity: expected one of {RNN_NONLINEARITIES} (nn.RNN's nonlinearity), "
                                    f"got {nonlinearity!r}")
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
                raise InvalidInputError(f"head_input_activation: {head_input.name} is not elementwise; softmax runs "
                                        "in the head's last layer only")
        output = options.get("output", "sequence")
        if output not in OUTPUT_MODES:
            raise InvalidInputError(f"output: expected one of {OUTPUT_MODES}, got {output!r}")
        ignore = _str_sequence(options.get("ignore"), "ignore") or ()
        if "" in ignore:
            raise InvalidInputError("ignore: an empty name would ignore everything")
        state_dict_key = options.get("state_dict_key")
        if state_dict_key is not None and not isinstance(state_dict_key, str):
            raise TypeError(f"state_dict_key: expected the checkpoint entry holding the state_dict as a str "
                            f"(nested keys joined by '.'), got {state_dict_key!r}")
        verify = options.get("verify", True)
        if not isinstance(verify, bool):
            raise TypeError(f"verify: expected True or False, got {verify!r}")
        return cls(lstm=None if lstm is None else tuple(p.strip(".") for p in lstm),
                   embedding=None if embedding is None else embedding.strip("."), rnn_nonlinearity=nonlinearity,
                   head=head, head_activations=activations,
                   head_input_activation=head_input, output=output, ignore=ignore, state_dict_key=state_dict_key,
                   verify=verify)

    def with_inferred(self, head, head_activations, head_input_activation, embedding=None,
                      rnn_nonlinearities=()) -> "Options":
        """These options with what a module's structure says: the head, the embedding, nn.RNN nonlinearities."""
        return replace(self, head=head, head_activations=head_activations,
                       head_input_activation=head_input_activation,
                       embedding=self.embedding if self.embedding is not None else embedding,
                       rnn_nonlinearities=tuple(rnn_nonlinearities))


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
            raise InvalidInputError(f"{where}: unknown activation {value.name!r}")
        return value
    if isinstance(value, str):
        if value not in ACTIVATION_PARAMS:
            raise InvalidInputError(f"{where}: unknown activation {value!r}; known: {', '.join(ACTIVATION_PARAMS)}")
        return Activation.of(value)
    raise TypeError(f"{where}: expected an activation name, an Activation or None, got {value!r}")


