"""Scoring Ray Data datasets with a fastlstm model (``pip install fastlstm[ray]``).

``Predictor`` is the callable class ``ray.data.Dataset.map_batches`` runs in a pool of actors::

    dataset.map_batches(Predictor, fn_constructor_kwargs={"model": model},
                        compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1, batch_size=256)

``model`` is a ``fastlstm.Model`` (Ray pickles it as its native file's bytes and load options) or the bytes
of a native file (``Model.save``), with ``backend``, ``dtype`` and ``num_threads`` given beside them. Each
actor process prepares it once (``fastlstm.model.restore_model``) and warms it up in the constructor; a
corrupt model fails the actor's constructor, before any data is read, which Ray reports as the actor's
death (``RayActorError``) carrying fastlstm's ``ModelFormatError`` and its message. This module does not import Ray: the
class is plain Python, so it is defined and tested without a cluster, and Ray is needed only to run it.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError
from ..model import Model, restore_model
from ._padding import padded_batch, sequences_to_rows

__all__ = ["Predictor"]


class Predictor:
    """Adds ``model``'s outputs for ``batch[input_column]`` to each batch as ``batch[output_column]``.

    The input column holds one sequence per row: ``(T, F)`` features (``(T,)`` token ids for a model that
    takes them). Rows of one length arrive as one array ``(B, T, F)`` and are scored as they are; rows of
    different lengths (a ragged column) are padded to the longest of the batch and scored with
    ``lengths=``. The output column holds, per row, the model's output for that sequence: ``(T_i, O)`` for
    a model that outputs every step (only the sequence's own steps), ``(O,)`` for one that outputs its last
    step or final state. Batches in NumPy format (``batch_format="numpy"``, Ray's default) and pandas
    format are accepted.
    """

    def __init__(self, model: Model | bytes, *, input_column: str = "x", output_column: str = "y",
                 backend: str = "auto", dtype="float32", num_threads: int | None = None):
        if isinstance(model, Model):
            if (backend, dtype, num_threads) != ("auto", "float32", None):
                raise InvalidInputError("Predictor: backend, dtype and num_threads are the model's own when a Model "
                                        "is given; give them with the bytes of a native file instead")
            self.model = model
        elif isinstance(model, (bytes, bytearray, memoryview)):
            self.model = restore_model(model, {"backend": backend, "dtype": dtype, "num_threads": num_threads})
        else:
            raise InvalidInputError(f"model: expected a fastlstm.Model or the bytes of a native file, got "
                                    f"{type(model).__name__}")
        self.model.warmup()  # kernels loaded in the actor's constructor, not in its first batch
        self.input_column = input_column
        self.output_column = output_column

    def __call__(self, batch):
        if self.input_column not in batch:
            columns = list(batch.columns if hasattr(batch, "columns") else batch)
            raise InvalidInputError(f"batch: no column {self.input_column!r}; it has {columns}")
        column = batch[self.input_column]
        column = column.to_numpy() if hasattr(column, "to_numpy") else column
        if len(column) == 0:
            outputs = np.empty(0, object)
        elif isinstance(column, np.ndarray) and column.dtype != object:
            outputs = self.model.predict(column)
        else:
            outputs = self._predict_ragged(column)
        if hasattr(batch, "assign"):  # pandas
            return batch.assign(**{self.output_column: list(outputs)})
        return {**batch, self.output_column: outputs}

    def _predict_ragged(self, column) -> np.ndarray:
        """Sequences of different lengths: padded, scored together, each output cut to its own length."""
        what = f"batch column {self.input_column!r}"
        rows, sequence, position, lengths = sequences_to_rows(column, what)
        y = self.model.predict(padded_batch(self.model, rows, sequence, position, lengths, what), lengths=lengths)
        outputs = np.empty(len(lengths), object)
        if self.model.spec.output == "sequence":
            for i, length in enumerate(lengths):
                outputs[i] = y[i, :length]
        else:
            outputs[:] = list(y)
        return outputs
