"""The schedule value: op records and the immutable `Plan` (pure Python + numpy).

A plan is the explicit op list between the solver (`planner.py`) and the runtime
(`executor.py`), in the conventions of the checkpointing game (see the package README):

* step ``i`` (1-based) maps ``h_{i-1}`` to ``h_i``; ``h_0`` is the layer's initial state;
* a stored hidden state costs 1 memory unit, a stored internal state ``I_i`` (all that the
  backward of step ``i`` needs, ``h_i`` included) costs ``alpha``; ``h_0`` is always held and
  counts 1;
* the cursor (the working hidden state) and the internal state of the step just evaluated
  are free: they are the executor's constant working set.

Stored states form a stack: every plan the planner emits allocates and frees in LIFO order,
so a state's position in memory is fixed by what lies below it (``hidden_below`` and
``internal_below`` on each op). The executor uses this to pack all checkpoints into one flat
buffer whose size is the plan's peak, never more.

The canonical form of the op list is an integer table (`Plan.table`, a read-only ``int32``
array of shape ``(n, 5)``: kind, step, slot, hidden_below, internal_below), which is what the
planner writes and the executor reads. Plans of long sequences have millions of ops (T =
1,000,000 at a 5% budget: 4.9 million), so the `Op` records of `Plan.ops` are made only when
first asked for, and the counts that `describe` prints are computed from the table with numpy,
once.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import NamedTuple, Tuple

import numpy as np


class OpKind(enum.IntEnum):
    """What one op does. The integer values are the executor's op-table codes."""

    ADVANCE = 0  # evaluate the step after the cursor (one forward evaluation)
    STORE_HIDDEN = 1  # push the cursor's hidden state
    STORE_INTERNAL = 2  # push the internal state of the step just evaluated
    RESTORE = 3  # cursor <- hidden state held in a slot (a hidden or internal slot)
    FREE = 4  # pop a slot
    BACKWARD_STORED = 5  # backward of `step` from its stored internal state
    BACKWARD_CURSOR = 6  # backward of `step`, the step just evaluated


class Op(NamedTuple):
    """One schedule op.

    Attributes:
        kind: an `OpKind`.
        step: the step the op concerns: for ADVANCE the step evaluated; for stores,
            restores and frees the step whose state the slot holds (0 is ``h_0``); for
            backward ops the step whose backward runs.
        slot: stack position of the slot used (0 holds ``h_0``), or -1 for ADVANCE and
            BACKWARD_CURSOR.
        hidden_below: number of hidden states stored below `slot` (``h_0`` included).
        internal_below: number of internal states stored below `slot`.
    """

    kind: OpKind
    step: int
    slot: int = -1
    hidden_below: int = 0
    internal_below: int = 0

    def __repr__(self) -> str:
        name = OpKind(self.kind).name.lower()
        if self.kind in (OpKind.ADVANCE, OpKind.BACKWARD_CURSOR):
            return f"{name}({self.step})"
        state = "h" if self.kind in (OpKind.STORE_HIDDEN,) else "s"
        if self.kind in (OpKind.STORE_INTERNAL, OpKind.BACKWARD_STORED):
            state = "I"
        return f"{name}({state}{self.step}@{self.slot})"


STRATEGIES = ("msm", "hsm", "ism", "full", "chen")

# `OpKind` by code, for building `Op` records from table rows (a code outside `OpKind` stays
# a plain int, so that a checker can still report it).
_KIND_BY_CODE = {int(kind): kind for kind in OpKind}
_TABLE_COLUMNS = len(Op._fields)


def as_op_table(ops) -> np.ndarray:
    """The op table of `ops`: a read-only ``int32`` array of shape ``(n, 5)``.

    `ops` is an op table already (returned as is when it is a read-only ``int32`` array of
    that shape, else copied) or any sequence of `Op` records or 5-integer rows.
    """
    if (isinstance(ops, np.ndarray) and ops.dtype == np.int32 and ops.ndim == 2
            and ops.shape[1] == _TABLE_COLUMNS and not ops.flags.writeable):
        return ops
    table = np.array(ops, dtype=np.int32)
    if table.size == 0:
        table = table.reshape(0, _TABLE_COLUMNS)
    if table.ndim != 2 or table.shape[1] != _TABLE_COLUMNS:
        raise ValueError(
            f"An op table must have shape (num_ops, {_TABLE_COLUMNS}) (kind, step, slot, "
            f"hidden_below, internal_below). Received: shape={table.shape}")
    table.flags.writeable = False
    return table


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """An immutable checkpointing schedule with its costs.

    Attributes:
        num_steps: sequence length ``T``.
        memory_slots: the budget, in hidden-state units, ``h_0`` included.
        strategy: ``"msm"``, ``"hsm"``, ``"ism"``, ``"full"`` or ``"chen"``.
        alpha: size of an internal state in hidden-state units, as requested.
        forward_evals: cell evaluations in one training step (first sweep included).
        peak_memory: most memory ever held by stored states, in hidden-state units
            (``h_0`` included); never above `memory_slots`.
        table: the schedule as an op table (see `op_table`); given as a sequence of `Op`
            records or rows, it is converted.
        method: ``"exact"`` (optimal in the game) or ``"approximate"`` (see
            `planner.plan`), or ``"fixed"`` for the ``full`` and ``chen`` baselines.
        alpha_units: how the planner represented alpha: ``(a, q)`` means an internal state
            was charged ``a / q`` hidden states (``>= alpha``; equal whenever ``alpha`` is a
            multiple of ``1 / q``).

    Equal plans have equal fields and equal tables. The derived values (`ops`,
    `num_forward_ops`, `max_hidden_stored`, `max_internal_stored`) are computed on first use
    and kept.
    """

    num_steps: int
    memory_slots: float
    strategy: str
    alpha: float
    forward_evals: int
    peak_memory: float
    table: np.ndarray = dataclasses.field(repr=False)
    method: str = "exact"
    alpha_units: Tuple[int, int] = (2, 1)

    def __post_init__(self):
        object.__setattr__(self, "table", as_op_table(self.table))

    def _fields_key(self):
        return (self.num_steps, self.memory_slots, self.strategy, self.alpha,
                self.forward_evals, self.peak_memory, self.method, tuple(self.alpha_units))

    def __eq__(self, other):
        if self is other:
            return True
        if not isinstance(other, Plan):
            return NotImplemented
        return (self._fields_key() == other._fields_key()
                and np.array_equal(self.table, other.table))

    def __hash__(self) -> int:
        # Equal plans have equal keys; hashing the (long) op table is not needed.
        return hash((self.num_steps, self.memory_slots, self.strategy, self.alpha,
                     self.forward_evals, self.method, len(self.table)))

    def __getstate__(self):
        # Only the fields: the derived values (`ops` can be millions of records) are
        # rebuilt on demand after unpickling.
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def __setstate__(self, state):
        for name, value in state.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "table", as_op_table(self.table))  # read-only again

    # -- the op list ----------------------------------------------------------------------
    def op_table(self) -> np.ndarray:
        """The ops as an ``int32`` array of shape ``(len(ops), 5)``: kind, step, slot,
        hidden_below, internal_below. This is what the executor loads into its loop. It is
        `table` itself, not a copy, and read-only."""
        return self.table

    @functools.cached_property
    def ops(self) -> Tuple[Op, ...]:
        """The schedule as a tuple of `Op` records (made from `table` on first use)."""
        kinds = _KIND_BY_CODE
        return tuple(Op(kinds.get(kind, kind), step, slot, hidden, internal)
                     for kind, step, slot, hidden, internal in self.table.tolist())

    # -- derived quantities -------------------------------------------------------------
    @property
    def forward_evals_per_step(self) -> float:
        return self.forward_evals / self.num_steps

    @property
    def recomputations(self) -> int:
        """Forward evaluations beyond the first sweep."""
        return self.forward_evals - self.num_steps

    @property
    def standard_bptt_memory(self) -> float:
        """Memory of standard BPTT for this sequence: ``alpha * T`` (the reference)."""
        return self.alpha * self.num_steps

    @property
    def memory_fraction(self) -> float:
        """`peak_memory` as a fraction of standard BPTT's memory."""
        return self.peak_memory / self.standard_bptt_memory

    @functools.cached_property
    def max_hidden_stored(self) -> int:
        """Most hidden states stored at once (``h_0`` included)."""
        # Stores push onto the stack and `hidden_below` counts the hidden states under the
        # new slot, so the count right after a hidden store is hidden_below + 1, and the
        # count only grows at hidden stores.
        stores = self.table[self.table[:, 0] == OpKind.STORE_HIDDEN]
        return int(max(1, stores[:, 3].max(initial=0) + 1))

    @functools.cached_property
    def max_internal_stored(self) -> int:
        """Most internal states stored at once."""
        stores = self.table[self.table[:, 0] == OpKind.STORE_INTERNAL]
        return int(stores[:, 4].max(initial=-1) + 1)

    def time_ratio(self, beta: float = 2.0) -> float:
        """Predicted time per training step relative to standard BPTT.

        A backward step costs `beta` forward steps; standard BPTT costs ``(1 + beta) * T``.
        """
        beta = float(beta)
        if not beta >= 0.0:
            raise ValueError(f"Argument `beta` must be >= 0. Received: beta={beta!r}")
        return (self.forward_evals + beta * self.num_steps) / ((1.0 + beta) * self.num_steps)

    @functools.cached_property
    def num_forward_ops(self) -> int:
        """Ops of the first sweep: up to the first evaluation of step ``T`` and the stores
        right after it. The executor runs them in the forward pass (which must produce every
        output) and the rest in the gradient. (Not simply "before the first backward op":
        the ``chen`` baseline recomputes its last segment before its first backward.)"""
        kind = self.table[:, 0]
        last = np.flatnonzero((kind == OpKind.ADVANCE) & (self.table[:, 1] == self.num_steps))
        if not last.size:
            raise AssertionError("a plan evaluates its last step")
        index = int(last[0]) + 1
        while index < len(kind) and kind[index] in (OpKind.STORE_HIDDEN,
                                                    OpKind.STORE_INTERNAL):
            index += 1
        return index

    def describe(self) -> str:
        """A readable summary of the plan."""
        a, q = self.alpha_units
        lines = [
            f"Plan: {self.strategy} ({self.method}), T={self.num_steps}, "
            f"memory_slots={_fmt(self.memory_slots)}, alpha={_fmt(self.alpha)}",
            f"  forward evaluations : {self.forward_evals} "
            f"({self.forward_evals_per_step:.3f} per step; {self.recomputations} recomputed)",
            f"  peak memory         : {_fmt(self.peak_memory)} slots "
            f"({100.0 * self.memory_fraction:.2f}% of standard BPTT's "
            f"{_fmt(self.standard_bptt_memory)})",
            f"  stored at most      : {self.max_hidden_stored} hidden states "
            f"(h_0 included), {self.max_internal_stored} internal states",
            f"  predicted time      : {self.time_ratio():.3f}x standard BPTT "
            f"(backward step = 2 forward steps)",
        ]
        if a != round(self.alpha * q):
            lines.append(f"  alpha charged as    : {a}/{q} = {a / q:g} hidden states")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def _fmt(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"
