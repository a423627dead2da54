"""What the ONNX importer knows about each tensor of a graph, and how layout operators change it.

The importer never runs the graph. It follows the data flow and describes every tensor *structurally*:

* ``Flow``: a tensor computed from the model's input. Its ``axes`` say what each dimension is (time,
  batch, direction, hidden units, features, or a size-1 axis), its ``parts`` say which recurrent layer's
  results it holds along the direction or feature axis and at which time step, and ``head`` lists the dense
  layers already applied to it. A layout operator (Transpose, Squeeze, Reshape, Slice, Gather, Concat, ...)
  maps a Flow to a Flow when it only rearranges what the canonical model computes, and is refused otherwise.
  The embedding's Flow (a Gather by the token ids) is the ids' axes, then its features. One merge
  is followed although it is not a canonical layout: time and batch merged into one axis of rows, which
  is how a dense head is applied to every step (PyTorch's ``fc(y.view(T * B, H)).view(T, B, -1)``). The
  rows are only ever fed to dense layers and activations (which act on each row alone) and must be split
  back into time and batch before a graph output or a recurrent layer reads them.
* ``Const``: a constant known in full (an initializer, a Constant node, or a fold of small layout ops on them).
* ``Zeros``: an all-zero tensor of a shape computed at run time (PyTorch's zero initial state).
* ``Dims``: a shape computed at run time (``Shape`` and the ops on it), for ``Reshape`` targets; an entry
  may be a ``Product`` of axis sizes (``Mul`` of two of them, e.g. time * batch).
* ``GraphInput`` / ``InputRows``: a graph input (or rows of one) not yet known to be data or initial state.

The functions here are pure: they take values and return new ones, raising ``Refused`` (a construct
fastlstm does not run) or ``Malformed`` (the model contradicts itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..spec import DenseLayer

TIME, BATCH, DIRS, HIDDEN, FEATURES, UNIT = "time", "batch", "directions", "hidden", "features", "size-1"
INPUT_AXIS = "input axis "  # prefix of the axes of the model input before a layer says what they are
# An end index at or beyond this reads "to the end" (exporters write INT32_MAX or INT64_MAX).
_OPEN_END = 2**31 - 1


class Refused(Exception):
    """A construct fastlstm does not run; the message says what and why."""


class Malformed(Exception):
    """The model contradicts itself (sizes, attribute types, indices out of range)."""


@dataclass(frozen=True)
class Axis:
    """One dimension of a Flow: its role and, when known, its size.

    ``merged`` holds the time and batch axes (in memory order) that a reshape merged into this one.
    """

    role: str
    size: int | None = None
    merged: tuple["Axis", ...] = ()

    @property
    def atoms(self) -> tuple["Axis", ...]:
        """The axes this one is made of, outermost first (itself, unless merged)."""
        return self.merged or (self,)

    @property
    def is_unit(self) -> bool:
        """True for an axis of size 1 that carries nothing (a kept or squeezable singleton)."""
        return self.role == UNIT or (self.role == FEATURES and self.size == 1)

    def __str__(self) -> str:
        return self.role if self.size is None else f"{self.role}({self.size})"


UNIT_AXIS = Axis(UNIT, 1)


@dataclass(frozen=True)
class Part:
    """One block along a Flow's direction or feature axis.

    ``kind`` is "x" (the model input, or its embedding), "Y" (a recurrent layer's per-step output), "Y_h" or
    "Y_c" (its final states); ``layer`` and ``direction`` say which cell; ``time`` says which steps of a "Y" it
    holds: "all", "last" (the last time step) or "first".
    """

    kind: str
    layer: int = -1
    direction: int = 0
    time: str = "all"

    def __str__(self) -> str:
        if self.kind == "x":
            return "the input"
        where = f"{self.kind} of recurrent layer {self.layer} direction {self.direction}"
        return where if self.kind != "Y" or self.time == "all" else f"{where} at its {self.time} step"


@dataclass(frozen=True, eq=False)
class Flow:
    """A tensor computed from the model input (see the module docstring)."""

    axes: tuple[Axis, ...]
    parts: tuple[Part, ...]
    part_size: int | None = None
    head: tuple[DenseLayer, ...] = ()

    def roles(self) -> tuple[str, ...]:
        return tuple(a.role for a in self.axes)

    @property
    def feature_size(self) -> int | None:
        """Size of the (canonical, directions-concatenated) feature axis."""
        if self.head:
            return self.head[-1].out_features
        return None if self.part_size is None else self.part_size * len(self.parts)

    def describe(self) -> str:
        return "(" + ", ".join(str(a) for a in self.axes) + ")"


@dataclass(frozen=True, eq=False)
class Const:
    array: np.ndarray


@dataclass(frozen=True)
class Zeros:
    """An all-zero tensor whose shape is only known at run time."""


@dataclass(frozen=True)
class Product:
    """A size computed at run time: ``coefficient`` times the sizes of ``factors`` (two or more axes, or one
    axis with a coefficient other than 1)."""

    factors: tuple[Axis, ...]
    coefficient: int = 1

    def __str__(self) -> str:
        return " * ".join(([str(self.coefficient)] if self.coefficient != 1 else []) + [str(f) for f in self.factors])


@dataclass(frozen=True)
class Dims:
    """A 1-D shape tensor computed at run time: each entry an int, the Axis whose size it is, or a Product."""

    entries: tuple[int | Axis | Product, ...]
    scalar: bool = False


@dataclass(frozen=True)
class GraphInput:
    name: str
    dims: tuple[int | None, ...] | None
    element_type: int | None


@dataclass(frozen=True)
class InputRows:
    """``graph_input[start:stop]`` along ``axis`` (how PyTorch hands each layer its rows of ``h0``)."""

    name: str
    axis: int
    start: int
    stop: int | None
    dims: tuple[int | None, ...] | None


@dataclass(frozen=True)
class Poison:
    """The value of a tensor whose producer was already reported; consumers stay silent about it."""


# ----------------------------------------------------------------------------------------- helpers
def normalize_axis(axis: int, rank: int, what: str) -> int:
    if not -rank <= axis < rank:
        raise Malformed(f"{what}: axis {axis} out of range for rank {rank}")
    return axis % rank


def _without_axis(flow: Flow, i: int) -> Flow:
    """Drop axis ``i``, which must be of size 1; a one-direction axis hands its part to the features."""
    axis = flow.axes[i]
    axes = list(flow.axes)
    del axes[i]
    if axis.role == DIRS and axis.size == 1:
        axes = [Axis(FEATURES, a.size) if a.role == HIDDEN else a for a in axes]
    elif not axis.is_unit:
        raise Refused(f"removes the {axis.role} axis of {flow.describe()}, which is not of size 1"
                      + ("; export with a dynamic batch axis" if axis.role == BATCH else ""))
    return replace(flow, axes=tuple(axes))


def _fold_single_direction(flow: Flow) -> Flow:
    """A direction axis holding one direction is a size-1 axis: its part moves into the features."""
    roles = flow.roles()
    if DIRS in roles and flow.axes[roles.index(DIRS)].size == 1:
        axes = [UNIT_AXIS if a.role == DIRS else Axis(FEATURES, a.size) if a.role == HIDDEN else a
                for a in flow.axes]
        return replace(flow, axes=tuple(axes))
    return flow


def _merge(group: list[Axis], what: str) -> Axis:
    """The one axis a run of axes (atoms: no merged axis among them) becomes when a reshape merges them."""
    if not group:
        return UNIT_AXIS
    if len(group) == 1:
        return group[0]
    if [a.role for a in group] == [DIRS, HIDDEN]:
        # (directions, hidden) row-major is the directions' outputs concatenated, forward first.
        return Axis(FEATURES, group[0].size * group[1].size)
    if len(group) == 2 and {a.role for a in group} == {TIME, BATCH}:
        first, second = group
        size = None if first.size is None or second.size is None else first.size * second.size
        return Axis(f"{first.role}*{second.role}", size, merged=(first, second))
    raise Refused(f"{what} merges the {', '.join(a.role for a in group)} axes; fastlstm follows reshapes "
                  "that merge the direction axis into the features, time and batch into rows for a dense "
                  "head, or add and remove size-1 axes")


def _time_window(start: int, end: int, step: int, steps: int | None, what: str) -> str:
    """Which time steps ``[start:end:step]`` keeps: "all", "last" or "first" (anything else is refused)."""
    if step == 1:
        if steps is not None:
            first, count = _kept(start, end, 1, steps)
            if count == steps:
                return "all"
            if count == 1 and first == steps - 1:
                return "last"
            if count == 1 and first == 0:
                return "first"
        elif end >= _OPEN_END:
            if start == -1:
                return "last"
            if start == 0 or start <= -_OPEN_END:
                return "all"
        elif start == 0 and end == 1:
            return "first"
    unrolled = ("; one step taken at a time is a recurrence unrolled over the steps, as torch.onnx.export's "
                "dynamo exporter writes nn.RNN: export it with dynamo=False, which keeps one RNN node"
                if step == 1 and end - start == 1 else "")
    raise Refused(f"{what} keeps time steps [{start}:{end}:{step}]; fastlstm outputs every step, the last "
                  f"step or the final state{unrolled}")


def _kept(start: int, end: int, step: int, size: int) -> tuple[int, int]:
    """The first index and the number of indices ``[start:end:step]`` keeps of ``size`` (any size: nothing is
    materialised, so a huge declared size costs nothing)."""
    first, stop, step = slice(start, end, step).indices(size)
    count = (stop - first + step - 1) // step if step > 0 else (first - stop - step - 1) // -step
    return first, max(0, count)


def _is_full_range(start: int, end: int, step: int, size: int | None) -> bool:
    if size is not None:
        return step == 1 and _kept(start, end, step, size)[1] == size
    return step == 1 and (start == 0 or start <= -_OPEN_END) and end >= _OPEN_END


def with_time(flow: Flow, which: str, what: str) -> Flow:
    parts = []
    for part in flow.parts:
        if part.kind != "Y" or part.time != "all":
            raise Refused(f"{what} selects a time step of {part}, which has none")
        parts.append(replace(part, time=which))
    return replace(flow, parts=tuple(parts))


def _factors(entry: int | Axis | Product) -> tuple[int, tuple[Axis, ...]]:
    if isinstance(entry, Product):
        return entry.coefficient, entry.factors
    if isinstance(entry, Axis):
        return 1, entry.atoms
    return int(entry), ()


def _size_of(coefficient: int, factors: tuple[Axis, ...]) -> int | Axis | Product:
    """The simplest entry for ``coefficient * prod(factors)``."""
    if not factors:
        return coefficient
    if coefficient == 1 and len(factors) == 1:
        return factors[0]
    return Product(tuple(factors), coefficient)


def multiply_sizes(first: int | Axis | Product, second: int | Axis | Product) -> int | Axis | Product:
    """``first * second`` of two shape entries (what ``Mul`` computes on sizes read with ``Shape``)."""
    (a, fa), (b, fb) = _factors(first), _factors(second)
    return _size_of(a * b, fa + fb)


def divide_sizes(first: int | Axis | Product, second: int | Axis | Product, what: str) -> int | Axis | Product:
    """``first / second`` of two shape entries, when it divides exactly (every factor of ``second`` is one of
    ``first``'s, and the constants divide): what an exporter computes to undo a merge."""
    (a, fa), (b, fb) = _factors(first), _factors(second)
    left = list(fa)
    for factor in fb:
        if factor not in left:
            raise Refused(f"{what} divides a size by {second}, which is not one of its factors")
        left.remove(factor)
    if b <= 0 or a < 0 or a % b:
        raise Refused(f"{what} divides {a} by {b}")
    return _size_of(a // b, tuple(left))


# ----------------------------------------------------------------------------------------- layout ops
def transpose(flow: Flow, perm: list[int] | None, what: str) -> Flow:
    rank = len(flow.axes)
    perm = list(range(rank))[::-1] if perm is None else perm
    if sorted(perm) != list(range(rank)):
        raise Malformed(f"{what}: perm {perm} is not a permutation of the {rank} axes")
    return replace(flow, axes=tuple(flow.axes[p] for p in perm))


def squeeze(flow: Flow, axes: list[int] | None, what: str) -> Flow:
    rank = len(flow.axes)
    if axes is None:  # every dimension of size 1, which must not depend on the batch or the sequence
        fixed = [a for a in flow.axes if a.size == 1 and (a.role in (TIME, BATCH) or a.merged
                                                          or a.role.startswith(INPUT_AXIS))]
        if fixed:
            raise Refused(f"{what} has no axes, so whether it removes the {fixed[0].role} axis depends on the "
                          "batch size or sequence length; give its axes")
        flow = _fold_single_direction(flow)
        axes = [i for i, a in enumerate(flow.axes) if a.is_unit]
        rank = len(flow.axes)
    positions = sorted({normalize_axis(a, rank, what) for a in axes}, reverse=True)
    for i in positions:
        flow = _without_axis(flow, i)
    return flow


def unsqueeze(flow: Flow, axes: list[int], what: str) -> Flow:
    rank = len(flow.axes) + len(axes)
    positions = sorted({normalize_axis(a, rank, what) for a in axes})
    if len(positions) != len(axes):
        raise Malformed(f"{what}: repeated axes {axes}")
    new = list(flow.axes)
    for i in positions:
        new.insert(i, UNIT_AXIS)
    return replace(flow, axes=tuple(new))


def reshape(flow: Flow, target: list[int | Axis], allowzero: bool, what: str) -> Flow:
    """Follow a Reshape that keeps every axis apart from merging (directions, hidden) into the features.

    ``target`` entries are ints (ONNX semantics: 0 copies the input dimension, -1 is inferred) or Axis
    objects (a dimension read from a ``Shape``).
    """
    flow = _fold_single_direction(flow)
    has_directions = DIRS in flow.roles()

    def as_seen_here(axis: Axis) -> Axis:
        """A dimension read from the shape of another tensor, as this flow's axes name it."""
        if axis.role == DIRS and axis.size == 1:
            return UNIT_AXIS
        if axis.role == HIDDEN and not has_directions:
            return Axis(FEATURES, axis.size)
        return axis

    entries: list[int | Axis | Product] = []
    for i, entry in enumerate(target):
        if isinstance(entry, Axis) and not entry.merged:
            entries.append(as_seen_here(entry))
        elif isinstance(entry, (Axis, Product)):
            coefficient, factors = _factors(entry)
            factors = tuple(f for f in map(as_seen_here, factors) if not f.is_unit)
            if all(f.size is not None for f in factors) and (coefficient != 1 or not factors):
                size = coefficient * math.prod(f.size for f in factors)
                if size < 1:
                    raise Refused(f"{what} has shape entry {entry} = {size} (a size-0 or invalid dimension)")
                entries.append(size)
            elif coefficient != 1:
                raise Refused(f"{what} has a shape entry {entry} fastlstm cannot match to the axes of its input")
            else:
                entries.append(_size_of(1, factors))
        elif entry == 0 and not allowzero:
            if i >= len(flow.axes):
                raise Malformed(f"{what}: shape entry {i} copies a dimension the input does not have")
            entries.append(flow.axes[i])
        elif entry == -1 or entry >= 1:
            entries.append(int(entry))
        else:
            raise Refused(f"{what} has shape entry {entry} (a size-0 or invalid dimension)")
    if sum(1 for e in entries if isinstance(e, int) and e == -1) > 1:
        raise Malformed(f"{what}: more than one -1 in the target shape {target}")
    core = [atom for a in flow.axes if not a.is_unit for atom in a.atoms]
    minus = next((n for n, e in enumerate(entries) if isinstance(e, int) and e == -1), None)
    left = entries if minus is None else entries[:minus]
    right = [] if minus is None else entries[minus + 1:]
    lo, hi = 0, len(core)
    out_left: list[Axis] = []
    out_right: list[Axis] = []
    # Each entry is matched with the entry after it in view (-1 for the inferred one; None at the end).
    following_left = left[1:] + ([-1] if minus is not None else [None])
    for entry, following in zip(left, following_left):
        axis, used = _match_dimension(entry, core[lo:hi], True, following, what)
        out_left.append(axis)
        lo += used
    following_right = right[:-1][::-1] + ([-1] if minus is not None else [None])
    for entry, following in zip(reversed(right), following_right):
        axis, used = _match_dimension(entry, core[lo:hi], False, following, what)
        out_right.append(axis)
        hi -= used
    middle: list[Axis] = []
    if minus is not None:
        middle = [_merge(core[lo:hi], what)]
    elif lo != hi:
        raise Refused(f"{what} to {list(target)} does not keep the {', '.join(a.role for a in core[lo:hi])} "
                      f"axes of {flow.describe()} apart")
    return replace(flow, axes=tuple(out_left + middle + out_right[::-1]))


def _match_dimension(entry: int | Axis | Product, available: list[Axis], from_left: bool, following,
                     what: str) -> tuple[Axis, int]:
    """The output axis a target-shape entry stands for, and how many input axes (atoms) it takes.

    ``following`` is the next entry in the direction of matching: a fixed size that takes a time or batch axis
    exported at size 1 along with its neighbour (``view(T * B, H)`` exported with B = 1 reads ``[T, H]``)
    merges the two, unless the next entry is that size-1 axis kept.
    """
    nearest = (available[0] if from_left else available[-1]) if available else None
    if isinstance(entry, Axis) and entry.is_unit:
        return UNIT_AXIS, 0
    if isinstance(entry, (Axis, Product)):  # sizes read from a Shape: match the axes they were read from
        factors = _factors(entry)[1]
        run = available[:len(factors)] if from_left else available[len(available) - len(factors):]
        if len(run) == len(factors) and sorted(a.role for a in run) == sorted(f.role for f in factors):
            return _merge(run, what), len(run)
        names = " * ".join(f.role for f in factors)
        raise Refused(f"{what} moves the {names} axis; fastlstm follows reshapes that keep the axes in order")
    if nearest is not None and nearest.size == entry:
        neighbour = (available[1] if from_left else available[-2]) if len(available) > 1 else None
        if (following != 1 and neighbour is not None and neighbour.size == 1
                and {nearest.role, neighbour.role} == {TIME, BATCH}):
            return _merge([nearest, neighbour] if from_left else [neighbour, nearest], what), 2
        return nearest, 1
    if entry == 1:
        return UNIT_AXIS, 0
    pair = available[:2] if from_left else available[-2:]
    mergeable = len(pair) == 2 and ([a.role for a in pair] == [DIRS, HIDDEN] or {a.role for a in pair} == {TIME, BATCH})
    if mergeable and None not in (pair[0].size, pair[1].size) and pair[0].size * pair[1].size == entry:
        return _merge(pair, what), 2
    if nearest is not None and nearest.size is None:
        dynamo = ("; torch.onnx.export's dynamo exporter writes the example's sequence length there after a "
                  "time-major one-direction nn.LSTM or nn.GRU even when that axis is dynamic: export it batch "
                  "first or with dynamo=False" if nearest.role == TIME else "")
        raise Refused(f"{what} fixes the {nearest.role} axis to {entry}; export with that axis dynamic{dynamo}")
    raise Refused(f"{what} to a dimension of {entry} splits or merges the axes of its input")


def flatten(flow: Flow, axis: int, what: str) -> Flow:
    flow = _fold_single_direction(flow)
    rank = len(flow.axes)
    if not -rank <= axis <= rank:
        raise Malformed(f"{what}: axis {axis} out of range for rank {rank}")
    axis %= rank + 1
    groups = ([atom for a in flow.axes[:axis] if not a.is_unit for atom in a.atoms],
              [atom for a in flow.axes[axis:] if not a.is_unit for atom in a.atoms])
    return replace(flow, axes=(_merge(groups[0], what), _merge(groups[1], what)))


def slice_axis(flow: Flow, i: int, start: int, end: int, step: int, what: str) -> Flow:
    """Follow ``flow[..., start:end:step, ...]`` on axis ``i``."""
    axis = flow.axes[i]
    if step == 0:
        raise Malformed(f"{what}: step 0")
    if axis.role == TIME:
        which = _time_window(start, end, step, axis.size, what)
        if which == "all":
            return flow
        flow = with_time(flow, which, what)
        return replace(flow, axes=flow.axes[:i] + (UNIT_AXIS,) + flow.axes[i + 1:])
    if axis.role == DIRS:
        kept = range(len(flow.parts))[start:end:step]
        if not kept:
            raise Malformed(f"{what} keeps no direction")
        axes = flow.axes[:i] + (Axis(DIRS, len(kept)),) + flow.axes[i + 1:]
        return replace(flow, axes=axes, parts=tuple(flow.parts[k] for k in kept))
    if axis.role == FEATURES and not flow.head and flow.part_size and flow.parts[0].kind != "x":
        kept = range(flow.feature_size)[start:end:step]
        size = flow.part_size
        if _is_full_range(start, end, step, flow.feature_size):
            return flow
        if step == 1 and kept and kept.start % size == 0 and kept.stop % size == 0:
            parts = flow.parts[kept.start // size: kept.stop // size]
            axes = flow.axes[:i] + (Axis(FEATURES, len(parts) * size),) + flow.axes[i + 1:]
            return replace(flow, axes=axes, parts=parts)
        raise Refused(f"{what} keeps features [{start}:{end}:{step}], which do not line up with the "
                      f"directions' outputs ({size} each)")
    if _is_full_range(start, end, step, 1 if axis.is_unit else axis.size):
        return flow
    raise Refused(f"{what} slices the {axis.role} axis [{start}:{end}:{step}]")


def gather(flow: Flow, i: int, indices: np.ndarray, what: str) -> Flow:
    """Follow ``Gather(flow, indices, axis=i)`` for a scalar or one-element (or, on directions, any) index."""
    axis = flow.axes[i]
    values = [int(v) for v in indices.reshape(-1)]
    keep_axis = indices.ndim == 1
    if indices.ndim > 1:
        raise Refused(f"{what} with {indices.ndim}-D indices")
    if axis.role == DIRS:
        count = len(flow.parts)
        if any(not -count <= v < count for v in values):
            raise Malformed(f"{what}: index {values} out of range for {count} direction(s)")
        parts = tuple(flow.parts[v % count] for v in values)
        if not parts:
            raise Malformed(f"{what} keeps no direction")
        if keep_axis:
            axes = flow.axes[:i] + (Axis(DIRS, len(parts)),) + flow.axes[i + 1:]
            return replace(flow, axes=axes, parts=parts)
        flow = replace(flow, parts=parts, axes=flow.axes[:i] + (Axis(DIRS, 1),) + flow.axes[i + 1:])
        return _without_axis(flow, i)
    if len(values) != 1:
        raise Refused(f"{what} gathers {len(values)} entries of the {axis.role} axis")
    value = values[0]
    if axis.role == TIME:
        steps = axis.size
        if value == -1 or (steps is not None and value == steps - 1):
            which = "last"
        elif value == 0:
            which = "first"
        else:
            raise Refused(f"{what} takes time step {value}; fastlstm outputs every step, the last step or "
                          "the final state")
        flow = with_time(flow, which, what)
        if keep_axis:
            return replace(flow, axes=flow.axes[:i] + (UNIT_AXIS,) + flow.axes[i + 1:])
        return replace(flow, axes=flow.axes[:i] + flow.axes[i + 1:])
    if axis.is_unit and value in (0, -1):
        return flow if keep_axis else _without_axis(flow, i)
    raise Refused(f"{what} picks entry {value} of the {axis.role} axis")


def concat(flows: list[Flow], i: int, what: str) -> Flow:
    """Follow a Concat of Flows along the direction or feature axis (directions or layers side by side)."""
    first = flows[0]
    roles = first.roles()
    for flow in flows[1:]:
        if len(flow.axes) != len(first.axes) or any(
                n != i and (a.role != b.role or (a.size is not None and b.size is not None and a.size != b.size))
                for n, (a, b) in enumerate(zip(flow.axes, first.axes))):
            raise Refused(f"{what} joins tensors of layouts {first.describe()} and {flow.describe()}")
    role = roles[i]
    if any(f.axes[i].role != role for f in flows):
        raise Refused(f"{what} joins tensors along different axes")
    if any(f.head for f in flows):
        raise Refused(f"{what} joins tensors after a dense layer or activation was applied to them")
    if role not in (DIRS, FEATURES) or any(f.parts[0].kind == "x" for f in flows):
        raise Refused(f"{what} concatenates along the {role} axis")
    if len({f.part_size for f in flows}) != 1:
        raise Refused(f"{what} joins outputs of layers of different sizes")
    parts = tuple(p for f in flows for p in f.parts)
    size = len(parts) if role == DIRS else len(parts) * first.part_size
    axes = first.axes[:i] + (Axis(role, size),) + first.axes[i + 1:]
    return replace(first, axes=axes, parts=parts)


def canonical_roles(flow: Flow) -> tuple[str, ...]:
    """The roles of the flow's axes, with a last size-1 axis named the features when the features are one wide
    (a reshape cannot tell a one-wide feature axis from any other size-1 axis, so it may have lost the name)."""
    roles = flow.roles()
    if roles[-1:] == (UNIT,) and FEATURES not in roles and flow.feature_size == 1 and flow.parts[0].kind != "x":
        return roles[:-1] + (FEATURES,)
    return roles


def features_last(flow: Flow, what: str) -> None:
    """Refuse unless the flow's last axis is its (canonical) feature axis, as a dense layer needs."""
    if not flow.axes or canonical_roles(flow)[-1] != FEATURES or DIRS in flow.roles():
        raise Refused(f"{what} acts on the last axis of {flow.describe()}, which is not the recurrent "
                      "layers' feature axis with the directions concatenated")
    if flow.parts[0].kind == "x":
        raise Refused(f"{what} is applied to the model input before any recurrent layer")
