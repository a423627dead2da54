"""Scoring Dask collections with a fastlstm model (``pip install fastlstm[dask]``).

``predict_array`` scores a Dask array of sequences ``(N, T, F)`` chunked along ``N``; ``predict_dataframe``
scores a Dask DataFrame of ragged sequences in long format (one row per time step: a sequence id, a column
that orders the steps, the feature columns). Both return lazy Dask collections with the outputs in the
input's order, and work the same on a ``LocalCluster`` or on a cluster of many machines.

The model travels as one graph key holding its native bytes and load options as plain data (Dask's
scheduler unpickles task graphs and must not prepare models): the workers that need it fetch it and
prepare the model once per process, however many partitions they score (``fastlstm.model.restore_model``).
"""

from __future__ import annotations

import logging

import numpy as np

try:
    import dask
    import dask.array as da
    import dask.dataframe as dd
    import pandas as pd
except ImportError as exc:
    raise ImportError("fastlstm.integrations.dask needs Dask's arrays and dataframes: "
                      "pip install 'fastlstm[dask]'") from exc

from ..errors import InvalidInputError
from ..model import Model, restore_model
from ._padding import padded_batch

logger = logging.getLogger("fastlstm")

__all__ = ["predict_array", "predict_dataframe"]


# ------------------------------------------------------------------ arrays
def predict_array(model: Model, x: "da.Array", *, lengths: "da.Array | None" = None) -> "da.Array":
    """``model.predict`` over a Dask array ``x`` of sequences ``(N, T, F)`` (``(N, T)`` token ids for a model
    that takes them), one task per chunk of ``N``.

    Each task needs whole sequences, so ``x`` is rechunked to one chunk on every axis but ``N`` when it is
    split along time or features (logged at INFO; choose the ``N`` chunks so one chunk fits a worker's
    memory). ``lengths`` is an optional Dask array ``(N,)`` of per-sequence lengths, rechunked to ``x``'s
    ``N`` chunks. Returns a Dask array ``(N, T, O)``, or ``(N, O)`` for a model that outputs its last step
    or final state, in the model's dtype, with ``x``'s chunks along ``N``.
    """
    _check_model(model)
    x = da.asarray(x)
    expected_ndim = 2 if model.takes_token_ids else 3
    if x.ndim != expected_ndim:
        shape = "(N, T) token ids" if model.takes_token_ids else f"(N, T, {model.input_size})"
        raise InvalidInputError(f"x: expected a Dask array of shape {shape}, got shape {x.shape}")
    if any(len(chunks) > 1 for chunks in x.chunks[1:]):
        logger.info("predict_array: rechunking x from %s to whole sequences per chunk", x.chunks)
        x = x.rechunk({axis: -1 for axis in range(1, x.ndim)})
    # Block indices: n sequences, t time steps, f features, o outputs (t and f are single chunks now).
    in_index = "nt" if model.takes_token_ids else "ntf"
    out_index = "nto" if model.spec.output == "sequence" else "no"
    arguments = [x, in_index]
    if lengths is not None:
        lengths = da.asarray(lengths)
        if lengths.shape != (x.shape[0],):
            raise InvalidInputError(f"lengths: expected a Dask array of shape ({x.shape[0]},), one length per "
                                    f"sequence, got shape {lengths.shape}")
        arguments += [lengths.rechunk((x.chunks[0],)), "n"]
    return da.blockwise(_predict_block, out_index, _shipped(model), None, *arguments,
                        new_axes={"o": model.output_size}, concatenate=True, dtype=model.dtype,
                        meta=np.empty((0,) * len(out_index), model.dtype))


def _predict_block(model: "_ShippedModel", x: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    return model.prepared().predict(x, lengths=lengths)


# ------------------------------------------------------------------ dataframes
def predict_dataframe(model: Model, df: "dd.DataFrame", *, id_column: str, time_column: str,
                      feature_columns: list[str], output_columns: list[str] | None = None,
                      check_partitioning: bool = True) -> "dd.DataFrame":
    """Score the ragged sequences of a long-format Dask DataFrame: one row per time step, ``id_column`` (a
    column or the index) naming its sequence, ``time_column`` ordering the steps of a sequence (any sortable
    values, each once per sequence), ``feature_columns`` its features (one column of token ids for a model
    that takes them).

    Every sequence must lie whole in one partition: each partition's sequences are padded to its longest
    and scored together with ``lengths=``. A frame indexed by the sequence id with known divisions (after
    ``df.set_index(id_column)``) guarantees it. Otherwise, with ``check_partitioning`` (the default), the
    unique ids of every partition are gathered in one task before scoring, and a sequence id found in two
    partitions fails the computation with ``InvalidInputError`` (regroup with ``df.shuffle(id_column)``);
    this reads the id column once more and holds all ids in that task's memory, so turn it off only for
    data partitioned by id by construction. Within a partition, steps are sorted by ``time_column``; a time
    value repeated within a sequence is refused.

    Returns a Dask DataFrame of the model's outputs in ``output_columns`` (default ``output_0``, ...):
    for a model that outputs every step, one row per input row with the input's index and row order, the
    id column (unless the id is the index) and the time column; for a model that outputs its last step or
    final state, one row per sequence, indexed by the sequence id, in the order of each sequence's first
    row.
    """
    _check_model(model)
    if not isinstance(df, dd.DataFrame):
        raise InvalidInputError(f"df: expected a Dask DataFrame, got {type(df).__name__}")
    id_in_index = id_column not in df.columns and df.index.name == id_column
    missing = sorted({time_column, *feature_columns} - set(df.columns)
                     | (set() if id_in_index or id_column in df.columns else {id_column}))
    if missing:
        raise InvalidInputError(f"df: no column(s) {missing}; it has columns {list(df.columns)} and index "
                                f"{df.index.name!r}")
    feature_columns = list(feature_columns)
    if model.takes_token_ids and len(feature_columns) != 1:
        raise InvalidInputError(f"feature_columns: this model takes one column of token ids, got {feature_columns}")
    if not model.takes_token_ids and len(feature_columns) != model.input_size:
        raise InvalidInputError(f"feature_columns: the model takes {model.input_size} features per step, got "
                                f"{len(feature_columns)} columns")
    if output_columns is None:
        output_columns = [f"output_{i}" for i in range(model.output_size)]
    output_columns = list(output_columns)
    if len(output_columns) != model.output_size:
        raise InvalidInputError(f"output_columns: the model has {model.output_size} outputs, got "
                                f"{len(output_columns)} names")

    per_step = model.spec.output == "sequence"
    ids_meta = df._meta.index.to_series() if id_in_index else df._meta[id_column]
    out = pd.DataFrame({name: np.empty(0, model.dtype) for name in output_columns})
    if per_step:
        meta = _partition_frame(df._meta, ids_meta.to_numpy(), None, out.to_numpy(), id_column, time_column,
                                output_columns, id_in_index, per_step)
    else:
        meta = out.set_axis(pd.Index(ids_meta.to_numpy(), name=id_column), axis=0)
    split_ids = None
    if check_partitioning and not (id_in_index and df.known_divisions):
        ids = df.index.to_series() if id_in_index else df[id_column]
        split_ids = dask.delayed(_ids_in_several_partitions, pure=True)(
            ids.map_partitions(lambda s: s.drop_duplicates(), meta=ids._meta))
    scored = df.map_partitions(
        _predict_partition, _shipped(model), split_ids, id_column=id_column,
        time_column=time_column, feature_columns=feature_columns, output_columns=output_columns,
        id_in_index=id_in_index, meta=meta, align_dataframes=False,
        # The outputs keep the input's index (per-step outputs, or per-sequence outputs of a frame indexed by
        # id: each id in one partition, in sorted order), so the divisions still hold; otherwise they go.
        clear_divisions=not (per_step or id_in_index))
    return scored


def _ids_in_several_partitions(unique_ids_per_partition: "pd.Series") -> list:
    """Up to 5 ids that occur in more than one partition (each partition's ids come once)."""
    repeated = unique_ids_per_partition[unique_ids_per_partition.duplicated()]
    return repeated.drop_duplicates().head(5).tolist()


def _predict_partition(part: "pd.DataFrame", shipped: "_ShippedModel", split_ids, *, id_column: str, time_column: str,
                       feature_columns: list[str], output_columns: list[str], id_in_index: bool) -> "pd.DataFrame":
    """One partition's sequences padded into one batch and scored; the outputs in the partition's order."""
    if split_ids:
        raise InvalidInputError(
            f"df: sequence id(s) {split_ids} occur in more than one partition; every sequence must lie whole in "
            f"one partition: df.shuffle({id_column!r}) or df.set_index({id_column!r}) first")
    model = shipped.prepared()
    ids = part.index.to_numpy() if id_in_index else part[id_column].to_numpy()
    codes, uniques = pd.factorize(ids, sort=False)  # sequence number by first appearance
    per_step = model.spec.output == "sequence"
    if len(part) == 0:
        return _partition_frame(part, ids, uniques, np.empty((0, model.output_size), model.dtype), id_column,
                                time_column, output_columns, id_in_index, per_step)
    if np.any(codes < 0):
        raise InvalidInputError(f"df: column {id_column!r} has missing sequence ids")
    times = part[time_column].to_numpy()
    order = np.lexsort((times, codes))  # by sequence, then by time
    sorted_codes, sorted_times = codes[order], times[order]
    repeated = (sorted_codes[1:] == sorted_codes[:-1]) & (sorted_times[1:] == sorted_times[:-1])
    if np.any(repeated):
        at = int(np.flatnonzero(repeated)[0]) + 1
        raise InvalidInputError(f"df: sequence {uniques[sorted_codes[at]]} has two rows at {time_column} = "
                                f"{part[time_column].iloc[order[at]]}")
    lengths = np.bincount(codes, minlength=len(uniques)).astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    position = np.arange(len(order)) - starts[sorted_codes]
    rows = part[feature_columns].to_numpy()[order]
    if model.takes_token_ids:
        rows = rows[:, 0]
    x = padded_batch(model, rows, sorted_codes, position, lengths, f"df partition ({len(part)} rows)")
    y = model.predict(x, lengths=lengths)
    if per_step:
        outputs = np.empty((len(part), model.output_size), model.dtype)
        outputs[order] = y[sorted_codes, position]
    else:
        outputs = y
    return _partition_frame(part, ids, uniques, outputs, id_column, time_column, output_columns, id_in_index,
                            per_step)


def _partition_frame(part, ids, uniques, outputs, id_column, time_column, output_columns, id_in_index, per_step):
    """The outputs of one partition as a frame: per input row (with its index, id and time) or per sequence."""
    frame = pd.DataFrame(outputs, columns=output_columns)
    if per_step:
        frame.index = part.index
        frame.insert(0, time_column, part[time_column].to_numpy())
        if not id_in_index:
            frame.insert(0, id_column, ids)
    else:
        frame.index = pd.Index(uniques, name=id_column)
    return frame


class _ShippedModel:
    """A model as it travels in a task graph: its native bytes and load options, prepared on first use in
    each worker process (cached there by ``restore_model``)."""

    __slots__ = ("data", "options")

    def __init__(self, data: bytes, options: dict):
        self.data = data
        self.options = options

    def prepared(self) -> Model:
        return restore_model(self.data, self.options)

    def __reduce__(self):
        return _ShippedModel, (self.data, self.options)


def _shipped(model: Model):
    """One graph key holding ``model`` for every task that uses it."""
    return dask.delayed(_ShippedModel(*model.native_bytes_and_options()), pure=True)


def _check_model(model) -> None:
    if not isinstance(model, Model):
        raise InvalidInputError(f"model: expected a fastlstm.Model (fastlstm.load(...)), got {type(model).__name__}")
