"""Convert a model file to fastlstm's native file (read back by ``fastlstm.load`` with NumPy alone).

The load options given are applied once, here: the native file records the model as loaded (head,
activations, output mode), so it loads later without them.
"""

from __future__ import annotations

NAME = "convert"
HELP = "write a model as a native .fastlstm file"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="the model file to read")
    parser.add_argument("out", help="the native file to write (conventionally OUT.fastlstm)")


def run(args) -> None:
    from . import load_model

    model = load_model(args)
    model.save(args.out)
    print(f"wrote {args.out}: {model.spec.source or 'model'} as a fastlstm native file")
