"""Where stored states live during a training step: one interface, two back ends.

The sweeps (`sweeps.py`) move states with five calls and never ask which back end they
use: `after_evaluation` (what an evaluation stores), `read_hidden`, `read_internal`,
`free_hidden`, `free_internal`. Each back end also turns the plan's `Segments` into the
location tables the sweeps index (`locations`), so that a loop iteration reads one row and
calls the store, with no branch on the op kind.

* `ListStore` (graph and eager mode): one TensorArray per state component, indexed by step
  (``0..T``; index ``T + 1`` is a scratch entry). A store keeps the tensors by reference (no
  copy), a free replaces the entry with an empty tensor, so what is held is exactly the
  plan's stored states plus the step just evaluated. Every evaluation writes
  unconditionally: to its step's entry when the plan stores it, else to the scratch entry,
  which only ever holds the working set.
* `StackStore` (XLA): one flat buffer per (dtype, batched) group of components, each state
  at the element offset fixed by what the plan's stack holds below it, plus a scratch area
  for writes that store nothing and for the working state. XLA updates a loop-carried
  buffer in place only when each iteration writes it once, unconditionally, and reads it
  only before writing (otherwise it copies the whole buffer every iteration; measured), so
  an evaluation writes one padded value per buffer: the hidden or the internal state, or
  anything to the scratch area. The scratch area is one internal state, which the layer
  keeps out of the plan's budget under XLA (`scratch_slots`).
"""

from __future__ import annotations

import dataclasses
from typing import List

import numpy as np
import tensorflow as tf

from tf_membptt import segments as seg

# Columns of the location tables (see `Locations`).
FIRST_HIDDEN, FIRST_INTERNAL, FIRST_KIND = 0, 1, 2
ADV_STEP, ADV_HIDDEN, ADV_INTERNAL, ADV_KIND = 0, 1, 2, 3
SEG_RESTORE_KIND, SEG_RESTORE_STEP, SEG_RESTORE_AT, SEG_FREE_AT = 0, 1, 2, 3
SEG_ADVANCE_BEGIN, SEG_ADVANCE_END, SEG_BACKWARD_BEGIN, SEG_BACKWARD_END = 4, 5, 6, 7
BWD_STEP, BWD_AT = 0, 1


@dataclasses.dataclass(frozen=True)
class Locations:
    """The plan's tables with this store's locations (numpy ``int32``).

    Attributes:
        first_sweep: ``[T, 3]``: where step ``t + 1``'s hidden state and internal state are
            written, and what it stores (a `segments` kind).
        advances: ``[A, 4]``: step, hidden and internal write locations, kind.
        segments: ``[S, 8]``: restore kind, restored step, its location, where the restore
            frees (a scratch location when it does not), advance range, backward range.
        backwards: ``[T, 2]``: step, where its internal state is read.
    """

    first_sweep: np.ndarray
    advances: np.ndarray
    segments: np.ndarray
    backwards: np.ndarray


def _kinds(segments_: seg.Segments):
    """What the plan's evaluations write, per loop: (first sweep, later evaluations)."""
    first = set(np.unique(segments_.first_sweep[:, 0]).tolist())
    later = set(np.unique(segments_.advances[:, 1]).tolist()) if len(segments_.advances) \
        else set()
    return first, later


class ListStore:
    """Stored states as TensorArrays indexed by step (graph and eager mode)."""

    xla = False

    def __init__(self, segments_: seg.Segments, hidden_specs, hidden_batched, internal_specs,
                 internal_batched, batch_size):
        self.num_steps = segments_.num_steps
        self.scratch = self.num_steps + 1
        self.hidden_specs, self.internal_specs = list(hidden_specs), list(internal_specs)
        self.hidden_batched, self.internal_batched = list(hidden_batched), list(internal_batched)
        self._first_kinds, self._later_kinds = _kinds(segments_)
        self.locations = self._locations(segments_)

    def _locations(self, s: seg.Segments) -> Locations:
        steps = np.arange(1, self.num_steps + 1)
        scratch = self.scratch

        def write_at(step, kind):
            hidden = np.where(kind == seg.HIDDEN, step, scratch)
            internal = np.where((kind == seg.INTERNAL) | (kind == seg.WORKING), step, scratch)
            return hidden, internal

        fk = s.first_sweep[:, 0]
        first = np.stack(write_at(steps, fk) + (fk,), axis=1)
        ak = s.advances[:, 1]
        advances = np.stack((s.advances[:, 0],) + write_at(s.advances[:, 0], ak) + (ak,),
                            axis=1) if len(ak) else np.zeros((0, 4), np.int64)
        sg = s.segments
        segments_ = np.stack([sg[:, 0], sg[:, 1], sg[:, 1],
                              np.where(sg[:, 4] == 1, sg[:, 1], scratch),
                              sg[:, 5], sg[:, 6], sg[:, 7], sg[:, 8]], axis=1)
        backwards = np.stack([s.backwards[:, 0], s.backwards[:, 0]], axis=1)
        return Locations(*(a.astype(np.int32) for a in (first, advances, segments_,
                                                         backwards)))

    # -- state ---------------------------------------------------------------------------
    def _list(self, spec, batched, flow=None):
        # A batched entry may hold any number of rows (a free leaves none); an unbatched
        # one any shape.
        element_shape = (tf.TensorShape([None] + spec.shape.as_list()[1:]) if batched
                         else tf.TensorShape(None))
        if flow is not None:
            return tf.TensorArray(spec.dtype, flow=flow, clear_after_read=False,
                                  infer_shape=False)
        return tf.TensorArray(spec.dtype, size=self.num_steps + 2, clear_after_read=False,
                              infer_shape=False, element_shape=element_shape)

    def empty(self, carry0, batch):
        """The store holding ``h_0`` (entry 0) and nothing else."""
        hidden = [self._list(s, b).write(0, c) for s, b, c in
                  zip(self.hidden_specs, self.hidden_batched, carry0)]
        return hidden, [self._list(s, b) for s, b in zip(self.internal_specs,
                                                         self.internal_batched)]

    def flows(self, state):
        """The store as plain tensors (to pass between functions)."""
        hidden, internal = state
        return [ta.flow for ta in hidden], [ta.flow for ta in internal]

    def from_flows(self, flows):
        hidden, internal = flows
        return ([self._list(s, b, f) for s, b, f in zip(self.hidden_specs,
                                                        self.hidden_batched, hidden)],
                [self._list(s, b, f) for s, b, f in zip(self.internal_specs,
                                                        self.internal_batched, internal)])

    # -- moves ---------------------------------------------------------------------------
    def after_evaluation(self, state, row, carry, internal, first_sweep: bool):
        """Writes what an evaluation stores: its hidden state at `row`'s hidden location
        and its internal state at the internal one (the scratch entry when the plan keeps
        neither). Only the kinds this loop ever stores are written."""
        hidden, internal_lists = state
        kinds = self._first_kinds if first_sweep else self._later_kinds
        h_at, i_at = ((row[FIRST_HIDDEN], row[FIRST_INTERNAL]) if first_sweep
                      else (row[ADV_HIDDEN], row[ADV_INTERNAL]))
        if seg.HIDDEN in kinds:
            hidden = [ta.write(h_at, c) for ta, c in zip(hidden, carry)]
        if kinds & {seg.INTERNAL, seg.WORKING}:
            internal_lists = [ta.write(i_at, c) for ta, c in zip(internal_lists, internal)]
        return hidden, internal_lists

    def finish_first_sweep(self, state):
        """Empties the scratch entries, so that nothing but the plan's states stays held
        until the gradient runs."""
        return self.free_hidden(self.free_internal(state, self.scratch), self.scratch)

    def writes(self, first_sweep=False, later=False, frees_hidden=False,
               frees_internal=False):
        """(hidden, internal): which parts a loop that does these moves changes."""
        kinds = (self._first_kinds if first_sweep else set()) | (
            self._later_kinds if later else set())
        return (seg.HIDDEN in kinds or frees_hidden,
                bool(kinds & {seg.INTERNAL, seg.WORKING}) or frees_internal)

    def split(self, state, changed):
        """``(varying, join)``: the parts of `state` a loop changes (its loop variables; the
        rest stays outside the loop) and how to rebuild the whole from new values. Fewer
        loop variables, fewer nodes per iteration for TensorFlow's executor."""
        parts = list(state)
        keep = [k for k, c in enumerate(changed) if c]

        def join(varying):
            whole = list(parts)
            for k, value in zip(keep, varying):
                whole[k] = value
            return tuple(whole)

        return [parts[k] for k in keep], join

    def read_internal_and_free(self, state, at):
        """The internal state at `at`, and the store without it. The free waits for the
        read: then it is the list's last user and updates it in place (a write while a read
        still holds the list copies all T + 2 entries)."""
        values = self.read_internal(state, at)
        with tf.control_dependencies(values):
            return values, self.free_internal(state, at)

    def read_hidden(self, state, at) -> List[tf.Tensor]:
        return [_read(ta, at, s) for ta, s in zip(state[0], self.hidden_specs)]

    def read_internal(self, state, at) -> List[tf.Tensor]:
        return [_read(ta, at, s) for ta, s in zip(state[1], self.internal_specs)]

    def restore(self, state, kind, at, restart, kinds):
        """The cursor restored from the state at `at`: a hidden state, or (`restart`) the
        hidden state recomputed from an internal one. `kinds` are the restore kinds the plan
        uses; an entry only holds one kind, so the other is not read."""
        from_hidden = lambda: self.read_hidden(state, at)  # noqa: E731
        from_internal = lambda: restart(self.read_internal(state, at))  # noqa: E731
        if kinds == {seg.FROM_HIDDEN}:
            return from_hidden()
        if kinds == {seg.FROM_INTERNAL}:
            return from_internal()
        return list(tf.cond(tf.equal(kind, seg.FROM_HIDDEN), from_hidden, from_internal))

    def free_hidden(self, state, at):
        hidden, internal = state
        return [ta.write(at, _empty(s, b)) for ta, s, b in
                zip(hidden, self.hidden_specs, self.hidden_batched)], internal

    def free_internal(self, state, at):
        hidden, internal = state
        return hidden, [ta.write(at, _empty(s, b)) for ta, s, b in
                        zip(internal, self.internal_specs, self.internal_batched)]


def _read(ta, at, spec):
    value = ta.read(at)
    if not tf.executing_eagerly():
        value.set_shape(spec.shape)
    return value


def _empty(spec, batched):
    """What a freed entry holds: no rows (batched) or no elements."""
    if batched:
        return tf.zeros([0] + spec.shape.as_list()[1:], spec.dtype)
    return tf.zeros([0], spec.dtype)


# --------------------------------------------------------------------------------------
# XLA
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Group:
    """Components of one dtype that share a flat buffer (batched or not)."""

    dtype: tf.DType
    batched: bool
    hidden: tuple  # positions in the hidden state's components
    internal: tuple  # positions in the internal state's components
    hidden_size: int  # elements per row (batched) or in all (unbatched)
    internal_size: int


class StackStore:
    """Stored states in flat buffers at the plan's stack offsets (XLA)."""

    xla = True

    def __init__(self, segments_: seg.Segments, hidden_specs, hidden_batched, internal_specs,
                 internal_batched, batch_size):
        self.num_steps = segments_.num_steps
        self.hidden_specs, self.internal_specs = list(hidden_specs), list(internal_specs)
        self.batch_size = batch_size
        self._first_kinds, self._later_kinds = _kinds(segments_)
        writes_internal = bool((self._first_kinds | self._later_kinds)
                               & {seg.INTERNAL, seg.WORKING})
        keys = []
        for spec, batched in list(zip(hidden_specs, hidden_batched)) + list(
                zip(internal_specs, internal_batched)):
            if (spec.dtype, batched) not in keys:
                keys.append((spec.dtype, batched))
        self.groups = []
        for dtype, batched in keys:
            hidden = tuple(k for k, (s, b) in enumerate(zip(hidden_specs, hidden_batched))
                           if s.dtype == dtype and b == batched)
            internal = tuple(k for k, (s, b) in enumerate(zip(internal_specs, internal_batched))
                             if s.dtype == dtype and b == batched)
            self.groups.append(_Group(
                dtype, batched, hidden, internal,
                sum(_elements(hidden_specs[k], batched) for k in hidden),
                sum(_elements(internal_specs[k], batched) for k in internal)))
        # Per group: the stack's peak in elements, and the width of one write (the scratch
        # area): an internal state when the plan writes any, else a hidden state.
        self.width = [max(g.hidden_size, g.internal_size) if writes_internal else g.hidden_size
                      for g in self.groups]
        self.capacity = [self._peak(segments_, g) for g in self.groups]
        self.locations = self._locations(segments_)

    @staticmethod
    def _offsets(group: _Group, hidden_below, internal_below):
        return hidden_below * group.hidden_size + internal_below * group.internal_size

    def _peak(self, s: seg.Segments, g: _Group) -> int:
        """The stack's peak for this group, in elements (``h_0`` included)."""
        peak = g.hidden_size
        for kinds, hb, ib in ((s.first_sweep[:, 0], s.first_sweep[:, 1], s.first_sweep[:, 2]),
                              (s.advances[:, 1], s.advances[:, 2], s.advances[:, 3])):
            offsets = self._offsets(g, hb.astype(np.int64), ib.astype(np.int64))
            ends = np.where(kinds == seg.HIDDEN, offsets + g.hidden_size,
                            np.where(kinds == seg.INTERNAL, offsets + g.internal_size, 0))
            peak = max(peak, int(ends.max(initial=0)))
        return peak

    def _locations(self, s: seg.Segments) -> Locations:
        """Locations are group 0's offsets; the other groups' follow from the same stack
        position, so the tables hold the position (hidden_below, internal_below) packed
        as ``hidden_below * (T + 2) + internal_below`` and each group computes its own
        offset (one multiply-add per group)."""
        span = self.num_steps + 2
        scratch = -1  # decoded as each group's scratch offset

        def position(kind, hb, ib, stored_kinds):
            return np.where(np.isin(kind, stored_kinds), hb * span + ib, scratch)

        fs = s.first_sweep
        first = np.stack([position(fs[:, 0], fs[:, 1], fs[:, 2], [seg.HIDDEN]),
                          position(fs[:, 0], fs[:, 1], fs[:, 2], [seg.INTERNAL]),
                          fs[:, 0]], axis=1)
        ad = s.advances
        advances = np.stack([ad[:, 0], position(ad[:, 1], ad[:, 2], ad[:, 3], [seg.HIDDEN]),
                             position(ad[:, 1], ad[:, 2], ad[:, 3], [seg.INTERNAL]),
                             ad[:, 1]], axis=1) if len(ad) else np.zeros((0, 4), np.int64)
        sg = s.segments
        segments_ = np.stack([sg[:, 0], sg[:, 1], sg[:, 2] * span + sg[:, 3],
                              np.full(len(sg), scratch), sg[:, 5], sg[:, 6], sg[:, 7],
                              sg[:, 8]], axis=1)
        bw = s.backwards
        backwards = np.stack([bw[:, 0], np.where(bw[:, 1] == seg.STORED,
                                                 bw[:, 2] * span + bw[:, 3], scratch)], axis=1)
        return Locations(*(a.astype(np.int32) for a in (first, advances, segments_,
                                                         backwards)))

    def _offset(self, k: int, at):
        g, span = self.groups[k], self.num_steps + 2
        return tf.where(at < 0, self.capacity[k],
                        (at // span) * g.hidden_size + (at % span) * g.internal_size)

    # -- state ---------------------------------------------------------------------------
    def empty(self, carry0, batch):
        """The buffers holding ``h_0`` (offset 0) and nothing else."""
        buffers = []
        for k, g in enumerate(self.groups):
            size = self.capacity[k] + self.width[k]
            buffer = tf.zeros(tf.stack([batch, size]) if g.batched else [size], g.dtype)
            if g.hidden:
                buffer = self._write(buffer, k, tf.constant(0), _pack(
                    [carry0[i] for i in g.hidden], g.batched, g.dtype))
            buffers.append(buffer)
        return buffers

    def flows(self, state):
        return state

    def from_flows(self, flows):
        return list(flows)

    def _write(self, buffer, k, offset, value):
        from tensorflow.compiler.tf2xla.python import xla

        begin = [tf.constant(0, tf.int32), tf.cast(offset, tf.int32)] \
            if self.groups[k].batched else [tf.cast(offset, tf.int32)]
        return xla.dynamic_update_slice(buffer, tf.cast(value, self.groups[k].dtype),
                                        tf.stack(begin))

    def _read(self, buffer, k, offset, size):
        # Every size is explicit: a size of -1 with a dynamic offset is lowered by tf2xla as
        # a pad of the whole buffer (then a slice), which XLA materializes when two slices
        # read it (measured: 15-35x the time of standard BPTT).
        g = self.groups[k]
        if g.batched:
            begin = tf.stack([tf.constant(0, tf.int32), tf.cast(offset, tf.int32)])
            value = tf.slice(buffer, begin, tf.stack([tf.shape(buffer)[0], size]))
            if not tf.executing_eagerly():
                value.set_shape([self.batch_size, size])
            return value
        return tf.slice(buffer, tf.reshape(tf.cast(offset, tf.int32), [1]), [size])

    # -- moves ---------------------------------------------------------------------------
    def after_evaluation(self, state, row, carry, internal, first_sweep: bool):
        kinds = self._first_kinds if first_sweep else self._later_kinds
        h_at, i_at, kind = ((row[FIRST_HIDDEN], row[FIRST_INTERNAL], row[FIRST_KIND])
                            if first_sweep else
                            (row[ADV_HIDDEN], row[ADV_INTERNAL], row[ADV_KIND]))
        writes_hidden = seg.HIDDEN in kinds
        writes_internal = bool(kinds & {seg.INTERNAL, seg.WORKING})
        if not (writes_hidden or writes_internal):
            return state
        buffers = []
        for k, (g, buffer) in enumerate(zip(self.groups, state)):
            width = self.width[k]
            values, hits, ats = [], [], []
            if writes_hidden and g.hidden:
                values.append(_pad(_pack([carry[i] for i in g.hidden], g.batched, g.dtype),
                                   width, g.batched))
                hits.append(tf.equal(kind, seg.HIDDEN))
                ats.append(h_at)
            if writes_internal and g.internal:
                values.append(_pad(_pack([internal[i] for i in g.internal], g.batched,
                                         g.dtype), width, g.batched))
                hits.append(tf.logical_or(tf.equal(kind, seg.INTERNAL),
                                          tf.equal(kind, seg.WORKING)))
                ats.append(i_at)
            if not values:
                buffers.append(buffer)
                continue
            if len(values) == 1:
                value, at = values[0], tf.where(hits[0], ats[0], -1)
            else:  # one write per buffer per iteration (see the module docstring)
                value = tf.where(hits[0], values[0], values[1])
                at = tf.where(hits[0], ats[0], tf.where(hits[1], ats[1], -1))
            buffers.append(self._write(buffer, k, self._offset(k, at), value))
        return buffers

    def finish_first_sweep(self, state):
        return state

    def writes(self, first_sweep=False, later=False, frees_hidden=False,
               frees_internal=False):
        """Per buffer: whether a loop that does these moves writes it (frees write
        nothing: the stack's next push overwrites)."""
        kinds = (self._first_kinds if first_sweep else set()) | (
            self._later_kinds if later else set())
        hidden = seg.HIDDEN in kinds
        internal = bool(kinds & {seg.INTERNAL, seg.WORKING})
        return tuple((hidden and bool(g.hidden)) or (internal and bool(g.internal))
                     for g in self.groups)

    split = ListStore.split

    def read_internal_and_free(self, state, at):
        return self.read_internal(state, at), state

    def restore(self, state, kind, at, restart, kinds):
        """As `ListStore.restore`; both reads happen before any choice (a buffer that
        enters a conditional is copied by XLA), and the choice is a select."""
        if kinds == {seg.FROM_HIDDEN}:
            return self.read_hidden(state, at)
        if kinds == {seg.FROM_INTERNAL}:
            return restart(self.read_internal(state, at))
        hidden = self.read_hidden(state, at)
        restarted = restart(self.read_internal(state, at))
        is_hidden = tf.equal(kind, seg.FROM_HIDDEN)
        return [tf.where(is_hidden, a, b) for a, b in zip(hidden, restarted)]

    def read_hidden(self, state, at) -> List[tf.Tensor]:
        parts = [None] * len(self.hidden_specs)
        for k, (g, buffer) in enumerate(zip(self.groups, state)):
            if g.hidden:
                flat = self._read(buffer, k, self._offset(k, at), g.hidden_size)
                for i, value in zip(g.hidden, _unpack(flat, [self.hidden_specs[i]
                                                             for i in g.hidden], g.batched)):
                    parts[i] = value
        return parts

    def read_internal(self, state, at) -> List[tf.Tensor]:
        parts = [None] * len(self.internal_specs)
        for k, (g, buffer) in enumerate(zip(self.groups, state)):
            if g.internal:
                flat = self._read(buffer, k, self._offset(k, at), g.internal_size)
                for i, value in zip(g.internal, _unpack(flat, [self.internal_specs[i]
                                                               for i in g.internal],
                                                        g.batched)):
                    parts[i] = value
        return parts

    def free_hidden(self, state, at):
        return state  # the stack's next push overwrites it

    def free_internal(self, state, at):
        return state


def _elements(spec, batched) -> int:
    dims = spec.shape.as_list()[1:] if batched else spec.shape.as_list()
    return int(np.prod(dims)) if dims else 1


def _pack(tensors, batched, dtype):
    if batched:
        flat = [tf.reshape(tf.cast(t, dtype), [tf.shape(t)[0], -1]) for t in tensors]
        return flat[0] if len(flat) == 1 else tf.concat(flat, axis=1)
    flat = [tf.reshape(tf.cast(t, dtype), [-1]) for t in tensors]
    return flat[0] if len(flat) == 1 else tf.concat(flat, axis=0)


def _pad(flat, width, batched):
    size = flat.shape[-1]
    if size == width:
        return flat
    return tf.pad(flat, [[0, 0], [0, width - size]] if batched else [[0, width - size]])


def _unpack(flat, specs, batched):
    sizes = [_elements(s, batched) for s in specs]
    parts = tf.split(flat, sizes, axis=1 if batched else 0) if len(sizes) > 1 else [flat]
    out = []
    for part, spec in zip(parts, specs):
        shape = ([-1] + spec.shape.as_list()[1:]) if batched else spec.shape.as_list()
        out.append(tf.reshape(part, shape))
    return out


def scratch_slots(alpha: float) -> float:
    """Memory (hidden-state units) of `StackStore`'s scratch area, which the layer keeps out
    of the plan's budget under XLA: one internal state (the working state of the step whose
    backward comes next lives there, whatever the strategy)."""
    return float(alpha)
