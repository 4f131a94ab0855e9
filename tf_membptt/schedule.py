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
"""

from __future__ import annotations

import dataclasses
import enum
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


@dataclasses.dataclass(frozen=True, eq=True)
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
        ops: the schedule, a tuple of `Op`.
        method: ``"exact"`` (optimal in the game) or ``"approximate"`` (see
            `planner.plan`), or ``"fixed"`` for the ``full`` and ``chen`` baselines.
        alpha_units: how the planner represented alpha: ``(a, q)`` means an internal state
            was charged ``a / q`` hidden states (``>= alpha``; equal whenever ``alpha`` is a
            multiple of ``1 / q``).
    """

    num_steps: int
    memory_slots: float
    strategy: str
    alpha: float
    forward_evals: int
    peak_memory: float
    ops: Tuple[Op, ...] = dataclasses.field(repr=False)
    method: str = "exact"
    alpha_units: Tuple[int, int] = (2, 1)

    def __hash__(self) -> int:
        # Equal plans have equal keys; hashing the (long) op tuple is not needed.
        return hash((self.num_steps, self.memory_slots, self.strategy, self.alpha,
                     self.forward_evals, self.method, len(self.ops)))

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

    @property
    def max_hidden_stored(self) -> int:
        return int(self._stack_extremes()[0])

    @property
    def max_internal_stored(self) -> int:
        return int(self._stack_extremes()[1])

    def _stack_extremes(self):
        hidden, internal = 1, 0
        max_hidden, max_internal = 1, 0
        for op in self.ops:
            if op.kind == OpKind.STORE_HIDDEN:
                hidden += 1
            elif op.kind == OpKind.STORE_INTERNAL:
                internal += 1
            elif op.kind == OpKind.FREE:
                # Only the top of the stack is ever freed: it held a hidden state exactly
                # when the hidden count below it is one less than the hidden count now.
                if op.hidden_below == hidden - 1:
                    hidden -= 1
                else:
                    internal -= 1
            max_hidden = max(max_hidden, hidden)
            max_internal = max(max_internal, internal)
        return max_hidden, max_internal

    def time_ratio(self, beta: float = 2.0) -> float:
        """Predicted time per training step relative to standard BPTT.

        A backward step costs `beta` forward steps; standard BPTT costs ``(1 + beta) * T``.
        """
        beta = float(beta)
        if not beta >= 0.0:
            raise ValueError(f"Argument `beta` must be >= 0. Received: beta={beta!r}")
        return (self.forward_evals + beta * self.num_steps) / ((1.0 + beta) * self.num_steps)

    def op_table(self) -> np.ndarray:
        """The ops as an ``int32`` array of shape ``(len(ops), 5)``: kind, step, slot,
        hidden_below, internal_below. This is what the executor loads into its loop."""
        if not self.ops:
            return np.zeros((0, 5), np.int32)
        return np.asarray(self.ops, dtype=np.int32).reshape(len(self.ops), 5)

    @property
    def num_forward_ops(self) -> int:
        """Ops of the first sweep: up to the first evaluation of step ``T`` and the stores
        right after it. The executor runs them in the forward pass (which must produce every
        output) and the rest in the gradient. (Not simply "before the first backward op":
        the ``chen`` baseline recomputes its last segment before its first backward.)"""
        for index, op in enumerate(self.ops):
            if op.kind == OpKind.ADVANCE and op.step == self.num_steps:
                index += 1
                while index < len(self.ops) and self.ops[index].kind in (
                        OpKind.STORE_HIDDEN, OpKind.STORE_INTERNAL):
                    index += 1
                return index
        raise AssertionError("a plan evaluates its last step")

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
