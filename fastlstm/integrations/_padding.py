"""Ragged sequences to a padded batch and back, shared by the engine integrations.

Rows arrive one per time step, each tagged with its sequence (``0..B-1``) and its position in it; the
batch is ``(B, T, F)`` (``(B, T)`` token ids for a model that takes them) with ``T`` the longest sequence,
zeros past each sequence's end, scored by ``Model.predict`` with ``lengths=``.
"""

from __future__ import annotations

import numpy as np

from .._arrays import as_real_array
from ..errors import InvalidInputError
from ..limits import check_allocation
from ..model import Model


def padded_batch(model: Model, rows: np.ndarray, sequence: np.ndarray, position: np.ndarray,
                 lengths: np.ndarray, what: str) -> np.ndarray:
    """The padded input batch holding ``rows[i]`` at ``[sequence[i], position[i]]`` (``what`` names the
    data in messages)."""
    batch, steps = len(lengths), int(lengths.max())
    rows = as_real_array(rows, what)
    if model.takes_token_ids:
        if rows.ndim != 1:
            raise InvalidInputError(f"{what}: this model takes one token id per time step, got rows of shape "
                                    f"{rows.shape[1:]}")
        shape, dtype = (batch, steps), np.int64
    else:
        if rows.ndim != 2 or rows.shape[1] != model.input_size:
            raise InvalidInputError(f"{what}: expected {model.input_size} features per time step, got rows of "
                                    f"shape {rows.shape[1:]}")
        shape, dtype = (batch, steps, model.input_size), model.dtype
    check_allocation(int(np.prod(shape)) * np.dtype(dtype).itemsize,
                     f"{what}: padding {batch} sequences to the longest ({steps} steps)")
    x = np.zeros(shape, dtype)
    if model.takes_token_ids and rows.dtype.kind not in "iu" and not np.array_equal(rows, np.round(rows)):
        raise InvalidInputError(f"{what}: token ids must be whole numbers, got {rows[:5].tolist()}")
    x[sequence, position] = rows  # ids out of the vocabulary are refused by predict
    return x


def sequences_to_rows(sequences, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A list of per-sequence arrays (``(T_i, F)`` or ``(T_i,)`` ids) as stacked rows, each row's sequence
    and position, and the lengths."""
    arrays = [np.asarray(s) for s in sequences]
    if not arrays:
        raise InvalidInputError(f"{what}: expected at least one sequence")
    lengths = np.array([len(a) if a.ndim else 0 for a in arrays], np.int64)
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise InvalidInputError(f"{what}: sequence {int(empty[0])} has no time steps")
    try:
        rows = np.concatenate(arrays)
    except ValueError as exc:
        raise InvalidInputError(f"{what}: sequences have different feature shapes: {exc}") from None
    sequence = np.repeat(np.arange(len(arrays)), lengths)
    position = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, sequence, position, lengths
