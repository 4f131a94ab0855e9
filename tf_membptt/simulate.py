"""Check a `Plan` by running its ops on a toy chain (pure Python + numpy, no TensorFlow).

Two independent checks of a schedule:

* `simulate(plan)` replays the plan's op table on a symbolic chain and raises `ScheduleError` on
  the first op that breaks the rules of the checkpointing game (see the package README,
  "Conventions"): a state used before it exists, a slot index or stack count that does not
  match the stack, a budget overrun, a backward step out of order, a wrong cost.
* `numpy_toy_rnn_gradients(plan, ...)` executes the op table literally on a small numpy RNN
  ``h_i = tanh(W h_{i-1} + U x_i)``: checkpoints hold real arrays, and a backward step can
  only use what the schedule kept. Comparing its gradients with plain BPTT
  (`numpy_toy_rnn_reference_gradients`) shows that the schedule computes exactly the
  gradients of standard BPTT, not just that its bookkeeping is self-consistent.

Both read the op table (`Plan.op_table()`) row by row, as transient `Op` records, so that
checking a plan of millions of ops does not build (and keep) `Plan.ops`.

This module must not import TensorFlow or Keras (a test enforces it).
"""

from __future__ import annotations

import dataclasses
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from tf_membptt.schedule import Op, OpKind, Plan

# Tolerance when comparing memory in (possibly fractional) hidden-state units.
_MEMORY_TOLERANCE = 1e-9


class ScheduleError(ValueError):
    """A plan's ops break the rules of the checkpointing game."""


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """What replaying a plan's ops measured.

    Attributes:
        forward_evals: ADVANCE ops executed (cell evaluations, first sweep included).
        peak_memory: most memory held by stored states at once, in hidden-state units,
            ``h_0`` included (an internal state charged ``a / q`` from ``plan.alpha_units``).
        backward_order: the steps whose backward ran, in the order they ran.
        max_hidden_stored: most hidden states stored at once (``h_0`` included).
        max_internal_stored: most internal states stored at once.
        num_ops: length of the op list.
    """

    forward_evals: int
    peak_memory: float
    backward_order: Tuple[int, ...]
    max_hidden_stored: int
    max_internal_stored: int
    num_ops: int


# A stored state: ("h", step) for a hidden state, ("i", step) for an internal state.
_HIDDEN, _INTERNAL = "h", "i"


def _state_name(kind: str, step: int) -> str:
    return f"{'h' if kind == _HIDDEN else 'I'}_{step}"


def _fail(index: int, op: Op, message: str) -> ScheduleError:
    return ScheduleError(f"op #{index} {op!r}: {message}")


def _op_rows(plan: Plan):
    """The plan's ops as `Op` records made one at a time from its table (kinds as ints)."""
    return map(Op._make, plan.op_table().tolist())


class _Stack(list):
    """The stack of stored states, with a running count of the hidden states below each
    position, so that checking an op's `hidden_below` is O(1) (plans of 10^5 steps)."""

    def __init__(self, items):
        super().__init__()
        self.hidden_prefix = [0]
        for item in items:
            self.append(item)

    def append(self, item):
        super().append(item)
        self.hidden_prefix.append(self.hidden_prefix[-1] + (item[0] == _HIDDEN))

    def pop(self):
        self.hidden_prefix.pop()
        return super().pop()


def _check_stack_position(index: int, op: Op, stack: "_Stack") -> None:
    """`op.hidden_below` / `op.internal_below` must count what lies below `op.slot`."""
    hidden = stack.hidden_prefix[op.slot]
    internal = op.slot - hidden
    if (op.hidden_below, op.internal_below) != (hidden, internal):
        raise _fail(index, op,
                    f"slot {op.slot} has {hidden} hidden and {internal} internal states "
                    f"below it, but the op says hidden_below={op.hidden_below}, "
                    f"internal_below={op.internal_below}")


def simulate(plan: Plan) -> SimulationResult:
    """Replay the plan's ops on a symbolic chain and check every rule of the game.

    Rules checked (any violation raises `ScheduleError` naming the op and the rule):

    * the first sweep (ops before the first backward op) evaluates steps ``1..T`` once
      each, in order (for the ``chen`` baseline, which re-evaluates its last segment before
      the first backward as ``tf.recompute_grad`` does, its first ``T`` evaluations);
    * ADVANCE evaluates the step right after the cursor, never past ``T``;
    * STORE_HIDDEN stores the cursor's hidden state; STORE_INTERNAL stores the internal
      state of the step just evaluated (the cursor has not moved since);
    * RESTORE reads a slot that holds a stored state of that step (hidden or internal);
    * FREE pops the top of the stack, never ``h_0``;
    * BACKWARD_STORED reads a stored internal state of its step; BACKWARD_CURSOR uses the
      internal state of the step just evaluated (its ADVANCE was the last op that moved
      the cursor);
    * backward steps run exactly once each, in order ``T, T-1, ..., 1``;
    * every op's ``slot``, ``hidden_below`` and ``internal_below`` match the stack;
    * memory held (hidden state = 1, internal state = ``a / q`` from ``plan.alpha_units``)
      never exceeds ``plan.memory_slots``, and its peak equals ``plan.peak_memory``;
    * ADVANCE ops counted equal ``plan.forward_evals``;
    * at the end only ``h_0`` is still stored.

    Returns:
        A `SimulationResult` with the measured counts.
    """
    num_steps = plan.num_steps
    units_internal, units_hidden = plan.alpha_units
    if units_internal * 1.0 / units_hidden < plan.alpha - _MEMORY_TOLERANCE:
        raise ScheduleError(
            f"plan.alpha_units={plan.alpha_units} charges an internal state "
            f"{units_internal}/{units_hidden} < alpha={plan.alpha} hidden states")
    # Memory in integer units (a hidden state = q units) so fractional alpha is exact.
    budget_units = plan.memory_slots * units_hidden + _MEMORY_TOLERANCE

    stack = _Stack([(_HIDDEN, 0)])  # h_0, always held
    cursor: Optional[int] = 0  # step whose hidden state the cursor holds
    # Step whose internal state is in the working set: the step just evaluated, as long as
    # the cursor has not moved since (a RESTORE or another ADVANCE replaces it).
    just_evaluated: Optional[int] = None
    next_backward = num_steps
    backward_order: List[int] = []
    first_sweep: List[int] = []
    in_first_sweep = True
    evaluations = 0
    hidden_count, internal_count = 1, 0
    peak_units = units_hidden
    max_hidden, max_internal = 1, 0

    for index, op in enumerate(_op_rows(plan)):
        try:
            kind = OpKind(op.kind)
        except ValueError:
            raise ScheduleError(f"op #{index} has an unknown kind {op.kind!r}") from None
        step = op.step

        if kind == OpKind.ADVANCE:
            if op.slot != -1:
                raise _fail(index, op, "ADVANCE uses no slot (slot must be -1)")
            if cursor is None or step != cursor + 1:
                raise _fail(index, op,
                            f"evaluates step {step} but the cursor holds h_{cursor}: only "
                            f"step {None if cursor is None else cursor + 1} can be evaluated")
            if step > num_steps:
                raise _fail(index, op, f"evaluates past the last step T={num_steps}")
            evaluations += 1
            cursor = step
            just_evaluated = step
            if in_first_sweep:
                first_sweep.append(step)
            continue

        if kind in (OpKind.STORE_HIDDEN, OpKind.STORE_INTERNAL):
            if op.slot != len(stack):
                raise _fail(index, op,
                            f"stores into slot {op.slot} but the next free slot (top of "
                            f"the stack) is {len(stack)}")
            _check_stack_position(index, op, stack)
            if kind == OpKind.STORE_HIDDEN:
                if step != cursor:
                    raise _fail(index, op, f"stores h_{step} but the cursor holds h_{cursor}")
                stack.append((_HIDDEN, step))
                hidden_count += 1
            else:
                if just_evaluated != step:
                    raise _fail(index, op,
                                f"stores I_{step} but the internal state at hand is "
                                f"{'none' if just_evaluated is None else f'I_{just_evaluated}'}"
                                f" (only the step just evaluated has one)")
                stack.append((_INTERNAL, step))
                internal_count += 1
            used_units = hidden_count * units_hidden + internal_count * units_internal
            if used_units > budget_units:
                raise _fail(index, op,
                            f"memory in use {used_units / units_hidden:g} slots exceeds "
                            f"memory_slots={plan.memory_slots:g}")
            peak_units = max(peak_units, used_units)
            max_hidden = max(max_hidden, hidden_count)
            max_internal = max(max_internal, internal_count)
            continue

        if kind == OpKind.RESTORE:
            if not 0 <= op.slot < len(stack):
                raise _fail(index, op, f"restores from slot {op.slot}, which holds nothing "
                                       f"({len(stack)} slots in use)")
            _check_stack_position(index, op, stack)
            held_kind, held_step = stack[op.slot]
            if held_step != step:
                raise _fail(index, op, f"restores h_{step} but slot {op.slot} holds "
                                       f"{_state_name(held_kind, held_step)}")
            cursor = step
            just_evaluated = None
            continue

        if kind == OpKind.FREE:
            if op.slot == 0 or len(stack) == 1:
                raise _fail(index, op, "frees h_0, which is always held")
            if op.slot != len(stack) - 1:
                raise _fail(index, op, f"frees slot {op.slot} but only the top of the stack "
                                       f"(slot {len(stack) - 1}) can be freed")
            _check_stack_position(index, op, stack)
            held_kind, held_step = stack[-1]
            if held_step != step:
                raise _fail(index, op, f"frees a state of step {step} but the top of the "
                                       f"stack holds step {held_step}")
            stack.pop()
            if held_kind == _HIDDEN:
                hidden_count -= 1
            else:
                internal_count -= 1
            continue

        if kind in (OpKind.BACKWARD_STORED, OpKind.BACKWARD_CURSOR):
            in_first_sweep = False
            if step != next_backward:
                raise _fail(index, op,
                            f"runs the backward of step {step} but the next backward step is "
                            f"{next_backward if next_backward else 'none (all done)'}: "
                            f"backward steps run once each, in order T..1")
            if kind == OpKind.BACKWARD_STORED:
                if not 0 <= op.slot < len(stack):
                    raise _fail(index, op, f"reads slot {op.slot}, which holds nothing")
                _check_stack_position(index, op, stack)
                if stack[op.slot] != (_INTERNAL, step):
                    raise _fail(index, op, f"needs I_{step} but slot {op.slot} holds "
                                           f"{_state_name(*stack[op.slot])}")
            else:
                if op.slot != -1:
                    raise _fail(index, op, "BACKWARD_CURSOR uses no slot (slot must be -1)")
                if just_evaluated != step:
                    latest = "no step" if just_evaluated is None else f"step {just_evaluated}"
                    raise _fail(index, op, f"needs I_{step} from the step just evaluated, "
                                           f"but {latest} was just evaluated")
            backward_order.append(step)
            next_backward -= 1
            continue

        raise _fail(index, op, f"unhandled op kind {kind!r}")  # pragma: no cover

    # The first sweep is every op before the first backward op. The `chen` baseline is
    # the one exception: it behaves like `tf.recompute_grad` around each segment, which
    # re-evaluates the last segment (keeping its internal states) before the first
    # backward, so for it only the first T evaluations must be the sweep 1..T.
    sweep = first_sweep[:num_steps] if plan.strategy == "chen" else first_sweep
    if sweep != list(range(1, num_steps + 1)):
        raise ScheduleError(
            f"the first sweep (ops before the first backward op) must evaluate steps "
            f"1..{num_steps} once each in order; it evaluated {_abbreviate(first_sweep)}")
    if next_backward != 0:
        raise ScheduleError(
            f"backward ran for steps {_abbreviate(backward_order)}; steps "
            f"{next_backward}..1 never ran")
    if len(stack) != 1:
        raise ScheduleError(f"states left stored at the end: {stack[1:]}")
    if evaluations != plan.forward_evals:
        raise ScheduleError(f"the ops evaluate {evaluations} steps but "
                            f"plan.forward_evals={plan.forward_evals}")
    peak_memory = peak_units / units_hidden
    if abs(peak_memory - plan.peak_memory) > _MEMORY_TOLERANCE:
        raise ScheduleError(f"the ops hold at most {peak_memory:g} slots but "
                            f"plan.peak_memory={plan.peak_memory:g}")
    return SimulationResult(forward_evals=evaluations, peak_memory=peak_memory,
                            backward_order=tuple(backward_order),
                            max_hidden_stored=max_hidden, max_internal_stored=max_internal,
                            num_ops=len(plan.op_table()))


def _abbreviate(steps: List[int], limit: int = 12) -> str:
    if len(steps) <= limit:
        return str(steps)
    return f"[{', '.join(map(str, steps[:limit]))}, ...] ({len(steps)} in all)"


# --------------------------------------------------------------------------------------
# Numpy toy RNN: run the schedule on real numbers
# --------------------------------------------------------------------------------------
class ToyGradients(NamedTuple):
    """Gradients of the toy loss with respect to the RNN's weights, inputs and h_0."""

    dW: np.ndarray
    dU: np.ndarray
    dxs: np.ndarray
    dh0: np.ndarray


def _toy_step(W, U, h_prev, x):
    return np.tanh(W @ h_prev + U @ x)


def _toy_backward(W, U, x, h_prev, h, dh, grads_W, grads_U):
    """Backward of one step ``h = tanh(W h_prev + U x)``: accumulates dW, dU and returns
    (dx, dh_prev). Needs exactly the step's internal state ``(h_prev, h)`` and ``x``."""
    d_pre = dh * (1.0 - h * h)
    grads_W += np.outer(d_pre, h_prev)
    grads_U += np.outer(d_pre, x)
    return U.T @ d_pre, W.T @ d_pre


def _check_toy_shapes(W, U, xs, h0, output_weights, final_state_grad):
    W, U, xs, h0 = (np.asarray(v, dtype=np.float64) for v in (W, U, xs, h0))
    output_weights = np.asarray(output_weights, dtype=np.float64)
    hidden = h0.shape[0]
    if h0.ndim != 1 or W.shape != (hidden, hidden):
        raise ValueError(f"Argument `W` must have shape ({hidden}, {hidden}) to match h0 of "
                         f"shape {h0.shape}. Received: W.shape={W.shape}")
    if xs.ndim != 2 or U.shape != (hidden, xs.shape[1]):
        raise ValueError(f"Argument `U` must have shape ({hidden}, {xs.shape[-1]}). "
                         f"Received: U.shape={U.shape}")
    if output_weights.shape != (xs.shape[0], hidden):
        raise ValueError(f"Argument `output_weights` must have shape "
                         f"({xs.shape[0]}, {hidden}). Received: "
                         f"output_weights.shape={output_weights.shape}")
    if final_state_grad is None:
        final_state_grad = np.zeros(hidden)
    final_state_grad = np.asarray(final_state_grad, dtype=np.float64)
    if final_state_grad.shape != (hidden,):
        raise ValueError(f"Argument `final_state_grad` must have shape ({hidden},). "
                         f"Received: final_state_grad.shape={final_state_grad.shape}")
    return W, U, xs, h0, output_weights, final_state_grad


def numpy_toy_rnn_reference_gradients(W, U, xs, h0, output_weights,
                                      final_state_grad=None) -> ToyGradients:
    """Plain BPTT gradients of the toy loss (every internal state kept).

    Model: ``h_i = tanh(W h_{i-1} + U x_i)`` for ``i = 1..T``; loss
    ``L = sum_i output_weights[i-1] . h_i + final_state_grad . h_T``, so every step's output
    receives a gradient.
    """
    W, U, xs, h0, output_weights, final_state_grad = _check_toy_shapes(
        W, U, xs, h0, output_weights, final_state_grad)
    states = [h0]
    for x in xs:
        states.append(_toy_step(W, U, states[-1], x))
    dW, dU = np.zeros_like(W), np.zeros_like(U)
    dxs = np.zeros_like(xs)
    carry = final_state_grad.copy()
    for i in range(len(xs), 0, -1):
        dxs[i - 1], carry = _toy_backward(W, U, xs[i - 1], states[i - 1], states[i],
                                          output_weights[i - 1] + carry, dW, dU)
    return ToyGradients(dW, dU, dxs, carry)


def numpy_toy_rnn_gradients(plan: Plan, W, U, xs, h0, output_weights,
                            final_state_grad=None) -> ToyGradients:
    """Gradients of the toy loss computed by following the plan's ops literally.

    Same model and loss as `numpy_toy_rnn_reference_gradients`. The executor holds only
    what the schedule says: a cursor (one hidden state), the internal state
    ``(h_{i-1}, h_i)`` of the step just evaluated, and a stack of slots addressed by
    ``op.slot``: a hidden slot holds ``h_i``, an internal slot holds ``(h_{i-1}, h_i)``
    (all that the backward of step ``i`` needs; ``h_i`` also restarts the chain). Each
    op reads only those, so a wrong schedule gives wrong gradients or an error.

    Raises:
        ScheduleError: when an op reads a slot or working state that does not hold what it
            needs (`simulate` gives the full diagnosis).
    """
    W, U, xs, h0, output_weights, final_state_grad = _check_toy_shapes(
        W, U, xs, h0, output_weights, final_state_grad)
    if xs.shape[0] != plan.num_steps:
        raise ValueError(f"Argument `xs` must have {plan.num_steps} steps (plan.num_steps). "
                         f"Received: xs.shape={xs.shape}")
    # Slots: (step, hidden state) or (step, (h_prev, h)); slot 0 is h_0.
    slots: list = [(0, h0.copy())]
    cursor = h0.copy()
    working = None  # (step, h_prev, h) of the step just evaluated
    dW, dU = np.zeros_like(W), np.zeros_like(U)
    dxs = np.zeros_like(xs)
    carry = final_state_grad.copy()  # dL/dh_i flowing back from steps > i

    def slot_content(index, op):
        if not 0 <= op.slot < len(slots) or slots[op.slot][0] != op.step:
            raise _fail(index, op, f"slot {op.slot} does not hold a state of step {op.step}")
        return slots[op.slot][1]

    for index, op in enumerate(_op_rows(plan)):
        kind = op.kind
        if kind == OpKind.ADVANCE:
            h_prev = cursor
            cursor = _toy_step(W, U, h_prev, xs[op.step - 1])
            working = (op.step, h_prev, cursor)
        elif kind == OpKind.STORE_HIDDEN:
            if op.slot != len(slots):
                raise _fail(index, op, "store does not target the top of the stack")
            slots.append((op.step, cursor.copy()))
        elif kind == OpKind.STORE_INTERNAL:
            if op.slot != len(slots) or working is None or working[0] != op.step:
                raise _fail(index, op, "no internal state of this step at hand to store")
            slots.append((op.step, (working[1].copy(), working[2].copy())))
        elif kind == OpKind.RESTORE:
            content = slot_content(index, op)
            cursor = (content[1] if isinstance(content, tuple) else content).copy()
            working = None
        elif kind == OpKind.FREE:
            if op.slot != len(slots) - 1 or op.slot == 0:
                raise _fail(index, op, "can only free the top of the stack, never h_0")
            slots.pop()
        elif kind in (OpKind.BACKWARD_STORED, OpKind.BACKWARD_CURSOR):
            if kind == OpKind.BACKWARD_STORED:
                content = slot_content(index, op)
                if not isinstance(content, tuple):
                    raise _fail(index, op, f"slot {op.slot} holds a hidden state, not I_{op.step}")
                h_prev, h = content
            else:
                if working is None or working[0] != op.step:
                    raise _fail(index, op, f"step {op.step} was not just evaluated")
                _, h_prev, h = working
            i = op.step
            dxs[i - 1], carry = _toy_backward(W, U, xs[i - 1], h_prev, h,
                                              output_weights[i - 1] + carry, dW, dU)
        else:
            raise _fail(index, op, f"unknown op kind {kind!r}")
    return ToyGradients(dW, dU, dxs, carry)
