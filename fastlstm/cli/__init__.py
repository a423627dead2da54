"""The ``fastlstm`` command (also ``python -m fastlstm``): look at, convert, run, measure and serve a model.

    fastlstm info MODEL [load options]
    fastlstm convert MODEL OUT.fastlstm [load options]
    fastlstm predict MODEL INPUT [-o OUTPUT] [--lengths 50,30] [load options]
    fastlstm bench MODEL [load options]
    fastlstm serve MODEL [--host 127.0.0.1] [--port 8000] [--max-batch N] [--max-delay-us N] [--capacity N]
                         [--idle-timeout S] [load options]

Every load option of ``fastlstm.load`` is a flag (``--head-activations relu,softmax``, ``--output last_step``,
``--backend numba``, ...); only the flags given reach the importer, so a format that takes no options (Keras,
ONNX, native files) refuses any it is given. An error prints one line, the library's message, on stderr and
exits with status 1 (2 for a malformed command line), never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import FastLSTMError


class CommandError(Exception):
    """A problem the command reports as its one-line error (a file it cannot read or write, a bad flag value)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a malformed command line reported on one line like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """The flags that become keywords of ``fastlstm.load`` (see ``load_keywords``)."""
    run = parser.add_argument_group("how the model runs")
    run.add_argument("--backend", choices=("auto", "cython", "numba", "numpy"), default="auto",
                     help="the kernels that run the model (default: auto, the fastest available)")
    run.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                     help="the precision of the computation (default: float32)")
    run.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                     help="the most threads one call may use (default: the cores available)")
    run.add_argument("--weights", choices=("float32", "bfloat16", "int8"), default=None,
                     help="how the recurrent gate weights are stored (default: int8 for a model imported "
                          "already quantized, else float32)")
    read = parser.add_argument_group(
        "what a PyTorch file cannot say (Keras, ONNX and native files take none of these)")
    read.add_argument("--lstm", metavar="PREFIX[,PREFIX...]",
                      help="the recurrent module(s) that run, in order ('' for a bare nn.LSTM)")
    read.add_argument("--embedding", metavar="PREFIX", help="the nn.Embedding in front ('' for none)")
    read.add_argument("--rnn-nonlinearity", choices=("tanh", "relu"), help="nn.RNN's nonlinearity")
    read.add_argument("--head", metavar="NAME[,NAME...]",
                      help="the Linear layers forming the head, in order ('' for none)")
    read.add_argument("--head-activations", metavar="ACT[,ACT...]",
                      help="one activation per head layer, e.g. relu,softmax ('identity' for none)")
    read.add_argument("--head-input-activation", metavar="ACT",
                      help="an elementwise activation applied to the recurrent output before the head")
    read.add_argument("--output", choices=("sequence", "last_step", "final_state"),
                      help="which steps the model outputs (default: sequence, every step)")
    read.add_argument("--ignore", metavar="NAME[,NAME...]", help="tensors or modules that are not part of the network")
    read.add_argument("--state-dict-key", metavar="KEY", help="which state_dict of a checkpoint (nested keys joined by '.')")


def load_keywords(args: argparse.Namespace) -> dict:
    """The keywords of ``fastlstm.load`` the command line gave: the run options always, importer options only
    when given (a format that takes none refuses any)."""
    keywords = {"backend": args.backend, "dtype": args.dtype, "num_threads": args.threads, "weights": args.weights}
    if args.lstm is not None:
        keywords["lstm"] = args.lstm if "," not in args.lstm else _names(args.lstm)
    for name in ("embedding", "rnn_nonlinearity", "head_input_activation", "output", "state_dict_key"):
        if getattr(args, name) is not None:
            keywords[name] = getattr(args, name)
    for name in ("head", "head_activations", "ignore"):
        if getattr(args, name) is not None:
            keywords[name] = _names(getattr(args, name))
    return keywords


def load_model(args: argparse.Namespace):
    """``fastlstm.load`` of ``args.model`` with the options the command line gave."""
    from .. import load

    try:
        return load(args.model, **load_keywords(args))
    except TypeError as exc:  # an option the model's format does not take: the importer's message says which
        raise CommandError(str(exc)) from None


def _names(text: str) -> list[str]:
    """A comma-separated list; the empty string is the empty list."""
    return [] if text == "" else [name.strip() for name in text.split(",")]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import bench, convert, info, predict, serve

    parser = _Parser(prog="fastlstm", allow_abbrev=False,
                     description="Look at, convert, run, measure and serve recurrent network models "
                                 "(PyTorch, Keras, ONNX and fastlstm files).")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"fastlstm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    for module in (info, convert, predict, bench, serve):
        sub = commands.add_parser(module.NAME, help=module.HELP, description=module.__doc__.strip().split("\n\n")[0],
                                  allow_abbrev=False)
        module.add_arguments(sub)
        add_load_options(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status (0 on success, 1 on an error, 2 on a malformed command line)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (FastLSTMError, CommandError, OSError) as exc:
        _report(exc, args.command)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _report(exc: BaseException, command: str) -> None:
    """The error's message on one line of stderr (a multi-line list of problems joined with '; ')."""
    if isinstance(exc, OSError) and exc.filename is not None:
        message = f"{exc.strerror or exc}: {exc.filename}"
    else:
        lines = [line.strip().removeprefix("- ") for line in str(exc).splitlines() if line.strip()]
        message = lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "") if lines else type(exc).__name__
    sys.stderr.write(f"fastlstm {command}: error: {message}\n")
