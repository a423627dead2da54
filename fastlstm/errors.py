"""The exceptions fastlstm raises.

Every error is a ``ValueError`` so that callers who already guard model loading or inference with
``except ValueError`` keep working; the subclasses let them tell the causes apart.
A missing path raises the built-in ``FileNotFoundError`` instead.
"""

from __future__ import annotations


class FastLSTMError(ValueError):
    """Base class of every error fastlstm raises on purpose."""


class ModelFormatError(FastLSTMError):
    """A file or object could not be read as a model: unreadable, corrupt, truncated, or not a model."""


class InvalidModelError(ModelFormatError):
    """A model description is inconsistent (a tensor has the wrong shape, a size disagrees, ...).

    ``problems`` lists every problem found, each naming the field, what was seen and what was expected.
    """

    def __init__(self, problems: list[str], context: str = "model"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {context} ({len(self.problems)} problem(s)):\n{lines}")


class UnsupportedModelError(FastLSTMError):
    """A readable model uses features fastlstm does not implement.

    ``unsupported`` lists everything unsupported that was found, not only the first.
    """

    def __init__(self, unsupported: list[str], hint: str = ""):
        self.unsupported = list(unsupported)
        lines = "\n".join(f"  - {u}" for u in self.unsupported)
        tail = f"\n{hint}" if hint else ""
        super().__init__(f"model uses {len(self.unsupported)} unsupported feature(s):\n{lines}{tail}")


class InvalidInputError(FastLSTMError):
    """An input array or state has the wrong shape, dtype or value; the message names what was expected."""
