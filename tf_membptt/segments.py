"""A plan as the executor runs it: the first sweep's stores and the gradient's segments.

Pure Python + numpy (no TensorFlow): `compile_plan` turns a `Plan`'s op table into integer
tables that the executor's loops read, one row per unit of work, so that the loops never
dispatch on an op kind.

What the op list looks like
---------------------------
A plan's ops after the first sweep always come in *segments*: restore the cursor from a
stored state (a hidden state ``h_s``, or an internal state ``I_s`` used as a restart point),
evaluate the next steps (each possibly storing its hidden or internal state), run the
backward of the step just evaluated (``BACKWARD_CURSOR``), then the backwards of the steps
below it whose internal states are stored (``BACKWARD_STORED``). Segment 0 is the exception:
it continues from the first sweep, so it has no restore and no evaluations. The executor
runs the gradient as one loop over segments, each an inner loop of evaluations and an inner
loop of backwards (`segments`, `advances`, `backwards` below): dispatch per segment, not per
op, with the store kind of every evaluation in a table instead of a branch.

Two rewrites make every backward read its internal state from the store:

* *working states*: the evaluation right before a ``BACKWARD_CURSOR`` writes the internal
  state it produced to the store (kind `WORKING`), where the backward reads it. That state
  is the game's free working set, so this costs no memory beyond what the plan counts: a
  store that keeps tensors by reference (`ListStore` in the executor) holds it until its
  backward, and a flat buffer keeps a scratch area for it.
* *frees at the last read*: a ``FREE`` op releases its state right after the last read of
  that state (the last ``RESTORE`` of a hidden state, the ``BACKWARD_STORED`` of an internal
  state), never later than the plan does, so memory held is never above the plan's at any
  point. A flat buffer, which frees by overwriting, ignores frees.

Invariants checked while compiling (an `AssertionError` names the op): the first sweep only
evaluates and stores; after it, every evaluation follows a restore or another evaluation in
the same segment and precedes the segment's backwards; every segment after the first
evaluates at least one step and runs at least one backward; a backward reads its own step's
internal state; every freed state was read after it was stored.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tf_membptt.schedule import OpKind, Plan

# What an evaluation does with what it produced (`first_sweep` and `advances` column 1).
NOTHING, HIDDEN, INTERNAL, WORKING = 0, 1, 2, 3
# Where a backward reads its internal state (`backwards` column 1).
STORED = INTERNAL
# How a segment restores the cursor (`segments` column 0).
NO_RESTORE, FROM_HIDDEN, FROM_INTERNAL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Segments:
    """The integer tables of a compiled plan (all ``int32``; steps are 1-based).

    A state's stack position is ``(hidden_below, internal_below)``: the hidden and internal
    states stored below it (``h_0`` counts as hidden). A store with a flat buffer turns it
    into an offset; a store that keeps one entry per step ignores it.

    Attributes:
        num_steps: ``T``.
        first_sweep: ``[T, 3]``, row ``i`` for step ``i + 1``: what its evaluation stores
            (`NOTHING`, `HIDDEN`, `INTERNAL` or `WORKING`), hidden_below, internal_below.
        segments: ``[S, 9]``, in execution order (row 0 is segment 0): restore kind
            (`NO_RESTORE` for row 0, else `FROM_HIDDEN` or `FROM_INTERNAL`), restore step,
            its hidden_below, internal_below, whether the restore is the state's last read
            (then it frees it: 1, else 0), ``[advance_begin, advance_end)`` rows of
            `advances`, ``[backward_begin, backward_end)`` rows of `backwards`.
        advances: ``[A, 4]``, every evaluation after the first sweep in order: step, what
            it stores, hidden_below, internal_below.
        backwards: ``[T, 4]``, the backward steps ``T, ..., 1`` in order: step, where its
            internal state is (`STORED` or `WORKING`), hidden_below, internal_below.
    """

    num_steps: int
    first_sweep: np.ndarray
    segments: np.ndarray
    advances: np.ndarray
    backwards: np.ndarray

    @property
    def max_advances(self) -> int:
        """Most evaluations in one segment (a loop bound)."""
        runs = self.segments[:, 6] - self.segments[:, 5]
        return int(runs.max()) if len(runs) else 0

    @property
    def max_backwards(self) -> int:
        """Most backwards in one segment (a loop bound)."""
        runs = self.segments[:, 8] - self.segments[:, 7]
        return int(runs.max()) if len(runs) else 0

    def stores(self, kind: int) -> bool:
        """Whether any evaluation (first sweep or later) stores `kind`."""
        return bool(np.any(self.first_sweep[:, 0] == kind)
                    or np.any(self.advances[:, 1] == kind))

    def restores(self, kind: int) -> bool:
        return bool(np.any(self.segments[1:, 0] == kind))


def compile_plan(plan: Plan) -> Segments:
    """The tables of `plan` (vectorized: plans at ``T = 10^6`` have millions of ops)."""
    table = np.asarray(plan.op_table(), np.int64)
    num_steps = plan.num_steps
    num_forward = plan.num_forward_ops
    kind, step, slot = table[:, 0], table[:, 1], table[:, 2]
    index = np.arange(len(table))

    # --- what each slot holds when an op reads it: the last store into it before --------
    is_store = (kind == OpKind.STORE_HIDDEN) | (kind == OpKind.STORE_INTERNAL)
    content_row = _last_store_into_slot(index, slot, is_store,
                                        (kind == OpKind.RESTORE)
                                        | (kind == OpKind.BACKWARD_STORED)
                                        | (kind == OpKind.FREE))

    # A state stored and never read (e.g. h_{T-1} when hsm stores every hidden state) is
    # not stored at all: nothing changes but the memory, which only goes down.
    read_rows = index[(kind == OpKind.RESTORE) | (kind == OpKind.BACKWARD_STORED)]
    is_store &= np.isin(index, content_row[read_rows])

    # --- the first sweep ------------------------------------------------------------------
    forward = slice(0, num_forward)
    first_kinds = kind[forward]
    if not np.all(np.isin(first_kinds, [OpKind.ADVANCE, OpKind.STORE_HIDDEN,
                                        OpKind.STORE_INTERNAL])):
        raise AssertionError("the first sweep only evaluates and stores")
    first_sweep = np.zeros((num_steps, 3), np.int64)
    _mark_stores(first_sweep, table[forward], np.nonzero(is_store[forward])[0])

    # --- the gradient: segments ------------------------------------------------------------
    rest = index[num_forward:]
    rest_kind = kind[rest]
    is_restore = rest_kind == OpKind.RESTORE
    segment_of = np.cumsum(is_restore)  # segment 0: before the first restore
    num_segments = int(segment_of[-1]) + 1 if len(rest) else 1

    advance_rows = rest[rest_kind == OpKind.ADVANCE]
    advances = np.zeros((len(advance_rows), 4), np.int64)
    advances[:, 0] = step[advance_rows]
    # A store follows the evaluation whose state it keeps.
    store_rows = rest[is_store[rest]]
    if len(store_rows):
        previous = store_rows - 1
        if not (np.all(kind[previous] == OpKind.ADVANCE)
                and np.all(step[previous] == step[store_rows])):
            raise AssertionError("a store follows the evaluation of its step")
        position = np.searchsorted(advance_rows, previous)
        advances[position, 1] = np.where(kind[store_rows] == OpKind.STORE_HIDDEN,
                                         HIDDEN, INTERNAL)
        advances[position, 2] = table[store_rows, 3]
        advances[position, 3] = table[store_rows, 4]

    backward_mask = np.isin(rest_kind, [OpKind.BACKWARD_CURSOR, OpKind.BACKWARD_STORED])
    backward_rows = rest[backward_mask]
    if not np.array_equal(step[backward_rows], np.arange(num_steps, 0, -1)):
        raise AssertionError("the gradient runs each step's backward once, T down to 1")
    backwards = np.zeros((num_steps, 4), np.int64)
    backwards[:, 0] = step[backward_rows]
    stored = kind[backward_rows] == OpKind.BACKWARD_STORED
    if np.any(stored):
        source = content_row[backward_rows[stored]]
        if not (np.all(source >= 0) and np.all(kind[source] == OpKind.STORE_INTERNAL)
                and np.all(step[source] == step[backward_rows[stored]])):
            raise AssertionError("a stored backward reads its own step's internal state")
    backwards[:, 1] = np.where(stored, STORED, WORKING)
    backwards[:, 2] = np.where(stored, table[backward_rows, 3], 0)
    backwards[:, 3] = np.where(stored, table[backward_rows, 4], 0)

    # A cursor backward reads the working state written by the evaluation right before it:
    # the last evaluation of its segment, or step T of the first sweep in segment 0.
    cursor_rows = backward_rows[~stored]
    evaluated_before = np.searchsorted(advance_rows, cursor_rows) - 1
    from_first_sweep = evaluated_before < 0
    if np.any(from_first_sweep):
        first = cursor_rows[from_first_sweep]
        if not (len(first) == 1 and step[first[0]] == num_steps
                and segment_of[first[0] - num_forward] == 0):
            raise AssertionError("only step T's cursor backward follows the first sweep")
        if first_sweep[num_steps - 1, 0] != NOTHING:
            raise AssertionError("step T's cursor backward: its state is not also stored")
        first_sweep[num_steps - 1, 0] = WORKING
    later = evaluated_before[~from_first_sweep]
    if len(later):
        owner = advance_rows[later]
        if not (np.all(step[owner] == step[cursor_rows[~from_first_sweep]])
                and np.all(segment_of[owner - num_forward]
                           == segment_of[cursor_rows[~from_first_sweep] - num_forward])):
            raise AssertionError("a cursor backward follows the evaluation of its step")
        if np.any(advances[later, 1] != NOTHING):
            raise AssertionError("a cursor backward's state is not also stored")
        advances[later, 1] = WORKING

    segments = np.zeros((num_segments, 9), np.int64)
    advance_segment = segment_of[advance_rows - num_forward]
    backward_segment = segment_of[backward_rows - num_forward]
    counts = np.bincount(advance_segment, minlength=num_segments)
    segments[:, 6] = np.cumsum(counts)
    segments[:, 5] = segments[:, 6] - counts
    counts = np.bincount(backward_segment, minlength=num_segments)
    segments[:, 8] = np.cumsum(counts)
    segments[:, 7] = segments[:, 8] - counts
    if np.any(segments[0, 6] > segments[0, 5]):
        raise AssertionError("segment 0 continues from the first sweep: no evaluations")
    # Within a segment every evaluation comes before every backward.
    if len(advance_rows) and len(backward_rows):
        last_advance = np.full(num_segments, -1)
        np.maximum.at(last_advance, advance_segment, advance_rows)
        first_backward = np.full(num_segments, len(table))
        np.minimum.at(first_backward, backward_segment, backward_rows)
        if np.any(last_advance > first_backward):
            raise AssertionError("a segment evaluates after a backward without a restore")
    restore_rows = rest[is_restore]
    if len(restore_rows):
        restored = content_row[restore_rows]
        segments[1:, 0] = np.where(
            (restored >= 0) & (kind[np.maximum(restored, 0)] == OpKind.STORE_INTERNAL),
            FROM_INTERNAL, FROM_HIDDEN)
        segments[1:, 1] = step[restore_rows]
        segments[1:, 2] = table[restore_rows, 3]
        segments[1:, 3] = table[restore_rows, 4]
        has_advances = segments[1:, 6] > segments[1:, 5]
        if not np.all(has_advances):
            raise AssertionError("every restore is followed by evaluations")
        if not np.all(segments[1:, 8] > segments[1:, 7]):
            raise AssertionError("every segment after the first runs a backward")

    # --- frees at the last read ------------------------------------------------------------
    free_rows = rest[rest_kind == OpKind.FREE]
    freed_store = content_row[free_rows]
    if np.any(freed_store < 0):
        raise AssertionError("h_0 is never freed")
    kept = is_store[freed_store]  # the frees of states never stored (see above) vanish
    free_rows, freed_store = free_rows[kept], freed_store[kept]
    hidden = kind[freed_store] == OpKind.STORE_HIDDEN
    # An internal state is freed by its stored backward (checked above to read it); a
    # hidden state by its last restore, which must exist.
    if len(restore_rows) and np.any(hidden):
        restore_content = content_row[restore_rows]
        last_restore = _last_read(restore_rows, restore_content, free_rows[hidden],
                                  freed_store[hidden])
        if np.any(last_restore < 0):
            raise AssertionError("a hidden state is freed without being restored")
        segments[1 + last_restore, 4] = 1
    elif np.any(hidden):
        raise AssertionError("a hidden state is freed without being restored")
    internal_freed = freed_store[~hidden]
    if len(internal_freed):
        read_by_backward = np.isin(internal_freed, content_row[backward_rows[stored]])
        if not np.all(read_by_backward):
            raise AssertionError("an internal state is freed without its stored backward")

    return Segments(num_steps=num_steps,
                    first_sweep=first_sweep.astype(np.int32),
                    segments=segments.astype(np.int32),
                    advances=advances.astype(np.int32),
                    backwards=backwards.astype(np.int32))


def _mark_stores(target, rows_table, store_positions):
    """Marks the first sweep's stores (rows of `rows_table` at `store_positions`) in
    `target`, one row per step."""
    if not len(store_positions):
        return
    rows = rows_table[store_positions]
    previous = store_positions - 1
    if np.any(previous < 0) or not np.all(rows_table[previous, 0] == OpKind.ADVANCE):
        raise AssertionError("a store follows the evaluation of its step")
    steps = rows_table[previous, 1]
    if not np.array_equal(steps, rows[:, 1]):
        raise AssertionError("a store keeps the state of the step just evaluated")
    if len(np.unique(steps)) != len(steps):
        raise AssertionError("the first sweep stores at most one state per step")
    target_rows = steps - 1
    target[target_rows, 0] = np.where(rows[:, 0] == OpKind.STORE_HIDDEN, HIDDEN, INTERNAL)
    target[target_rows, 1] = rows[:, 3]
    target[target_rows, 2] = rows[:, 4]


def _last_store_into_slot(index, slot, is_store, is_query):
    """For every op (meaningful where `is_query`): the row of the last store into its slot
    before it, or -1 (slot 0 before any store holds h_0)."""
    result = np.full(len(index), -1, np.int64)
    stores = index[is_store]
    queries = index[is_query]
    if not len(queries) or not len(stores):
        return result
    # Sort stores by (slot, row); a query finds the last store of its slot before it.
    order = np.lexsort((stores, slot[stores]))
    keys = slot[stores][order] * (len(index) + 1) + stores[order]
    query_keys = slot[queries] * (len(index) + 1) + queries
    position = np.searchsorted(keys, query_keys) - 1
    valid = position >= 0
    found = stores[order][np.maximum(position, 0)]
    valid &= slot[found] == slot[queries]
    result[queries] = np.where(valid, found, -1)
    return result


def _last_read(read_rows, read_content, free_rows, freed_content):
    """Position (in `read_rows`) of the last read of each freed state before its free,
    or -1."""
    order = np.lexsort((read_rows, read_content))
    span = max(int(read_rows.max(initial=0)), int(free_rows.max(initial=0))) + 1
    keys = read_content[order] * span + read_rows[order]
    query = freed_content * span + free_rows
    position = np.searchsorted(keys, query) - 1
    found = order[np.maximum(position, 0)]
    valid = (position >= 0) & (read_content[found] == freed_content)
    return np.where(valid, found, -1)
