"""Optimal checkpointing plans for backpropagation through time (pure Python + numpy).

This module never imports TensorFlow or Keras (a test enforces it).

The game (see the package README, "Conventions"): a sequence of ``T`` steps, a budget of
``m`` memory units counting ``h_0``; a stored hidden state costs 1, a stored internal state
``alpha``. Cost = forward evaluations in one training step, the first sweep included.

The dynamic program
-------------------
Gruslys et al. (2016) give, for a segment of ``n`` steps whose start state is held and a
budget ``m`` that counts that start::

    HSM:  C(n, m) = min_y  y + C(n - y, m - 1) + C(y, m)          (store h_y)
    ISM:  Q(n, m) = min_y  y + Q(n - y, m - alpha) + Q(y - 1, m)  (store I_y)
    MSM:  the min of both moves, with C(n, 1) = n (n + 1) / 2.

These recurrences are feasible but not always optimal in the game, because a segment whose
start is a *stored hidden state* (any start but ``h_0``) may free that slot once it has been
restored for the last time. We therefore keep two tables:

* ``Q(n, b)``: the start cannot be freed (``h_0``, or an internal state ``I_s`` whose own
  backward is still pending);
* ``D(n, b)``: the start is a stored hidden state, freeable after its last restore.

``Q`` has the paper's moves (storing ``h_y`` opens a ``D`` segment on the right, storing
``I_y`` a ``Q`` segment). ``D`` has the same moves, its left part staying a ``D`` segment,
plus one more: restore the start for the last time, free it, evaluate step 1 and store
``I_1`` in its place::

    D(n, b) = min( ..., 1 + Q(n - 1, b - alpha + 1) )

This move is what the paper's recurrence misses (msm, alpha = 3, T = 7, m = 4: paper 14,
exact 13). Under HSM it is unavailable (no internal states), so HSM stays Griewank's
binomial Revolve; under ISM every start is an internal state, so ISM is the paper's.
The tables match exhaustive search over all move sequences (tests).

Memory is counted in integer units: a hidden state is ``q`` units, an internal state ``a``
units, with ``a / q = alpha`` exactly when alpha is a multiple of ``1 / q`` for some
``q <= 8``; otherwise alpha is rounded *up* to the next multiple of 1/8, so a plan may
reserve slightly more than an internal state needs but never exceeds the budget.

Cost: ``O(T^2 * B)`` time for ``B`` budget units (vectorized over ``y`` and ``b``), only
over budgets below saturation (``b < q + a (n - 1)``, where ``n`` evaluations suffice).
When that work would be too large, `plan` switches to an approximate DP that tries only a
strided subset of split points ``y`` (all small ``y`` and at most `_APPROX_CANDIDATES`
others); its result is a valid schedule whose cost is an upper bound on the optimum,
reported as ``method="approximate"`` (benchmarks compare it to the exact DP).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import List, Optional, Tuple

import numpy as np

from tf_membptt.schedule import STRATEGIES, Op, OpKind, Plan

_INF = np.int64(1) << 52
_MAX_UNITS_PER_SLOT = 8
# Above this many (n, y, b) cells the exact DP is replaced by the approximate one.
_EXACT_WORK_LIMIT = 1.5e9
_APPROX_CANDIDATES = 96

# Choice codes in the DP tables.
_TRIANGLE, _STORE_HIDDEN, _STORE_INTERNAL, _FREE_START = 0, 1, 2, 3


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------
def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"Argument `{name}` must be an integer. Received: {name}={value!r}")
    return int(value)


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"Argument `{name}` must be a real number. Received: {name}={value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Argument `{name}` must be finite. Received: {name}={value!r}")
    return value


def alpha_units(alpha: float) -> Tuple[int, int]:
    """``(a, q)``: an internal state is charged ``a / q >= alpha`` hidden states."""
    for q in range(1, _MAX_UNITS_PER_SLOT + 1):
        a = round(alpha * q)
        if abs(a - alpha * q) < 1e-9:
            return int(a), q
    q = _MAX_UNITS_PER_SLOT
    return int(math.ceil(alpha * q - 1e-9)), q


def minimum_memory_slots(num_steps: int, strategy: str = "msm", alpha: float = 2.0) -> float:
    """The least `memory_slots` for which `plan` finds a schedule."""
    num_steps = _check_count("num_steps", num_steps)
    if strategy in ("msm", "hsm", "ism"):
        return 1.0  # h_0 alone: recompute every step from h_0
    if strategy == "full":
        return 1.0 + alpha * num_steps
    if strategy == "chen":
        return _chen_peak(num_steps, alpha)
    raise ValueError(
        f"Argument `strategy` must be one of {STRATEGIES}. Received: strategy={strategy!r}")


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------
def plan(num_steps, memory_slots, *, strategy: str = "msm", alpha=2.0) -> Plan:
    """Plan backpropagation through `num_steps` steps within `memory_slots`.

    Args:
        num_steps: sequence length, an integer >= 1.
        memory_slots: the budget in hidden-state units, ``h_0`` included (a real >= 1).
        strategy: ``"msm"`` (hidden and internal states, the default and never worse),
            ``"hsm"`` (hidden states only: Revolve), ``"ism"`` (internal states only),
            ``"full"`` (standard BPTT: store every internal state) or ``"chen"``
            (``sqrt(T)`` segments, each recomputed once with its internal states kept:
            the usual hand-written ``recompute_grad`` baseline).
        alpha: size of an internal state in hidden-state units, a real >= 1.

    Returns:
        A `Plan`. Identical calls return the same cached object.

    Raises:
        ValueError: on a bad argument, or when `memory_slots` is below the least
            feasible budget for `strategy` (the message names it).
    """
    num_steps = _check_count("num_steps", num_steps)
    if num_steps < 1:
        raise ValueError(f"Argument `num_steps` must be >= 1. Received: num_steps={num_steps}")
    memory_slots = _check_real("memory_slots", memory_slots)
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(
            f"Argument `strategy` must be one of {STRATEGIES}. Received: strategy={strategy!r}")
    alpha = _check_real("alpha", alpha)
    if alpha < 1.0:
        raise ValueError(f"Argument `alpha` must be >= 1. Received: alpha={alpha!r}")
    minimum = minimum_memory_slots(num_steps, strategy, alpha)
    if memory_slots < minimum - 1e-9:
        raise ValueError(
            f"Argument `memory_slots` is below the least feasible budget for "
            f"strategy={strategy!r} with num_steps={num_steps}, alpha={alpha:g}: the minimum "
            f"is memory_slots={minimum:g}. Received: memory_slots={memory_slots:g}")
    return _cached_plan(num_steps, memory_slots, strategy, alpha)


@functools.lru_cache(maxsize=64)
def _cached_plan(num_steps: int, memory_slots: float, strategy: str, alpha: float) -> Plan:
    if strategy == "full":
        ops, method, units = _full_ops(num_steps), "fixed", alpha_units(alpha)
    elif strategy == "chen":
        ops, method, units = _chen_ops(num_steps), "fixed", alpha_units(alpha)
    else:
        a, q = units = alpha_units(alpha)
        budget = int(math.floor(memory_slots * q + 1e-9))
        tables, method = _solve(num_steps, budget, a, q, strategy)
        ops = _emit(tables, num_steps, budget, a, q)
    forward_evals, peak_units = _count(ops, *units)
    return Plan(num_steps=num_steps, memory_slots=memory_slots, strategy=strategy,
                alpha=alpha, forward_evals=forward_evals, peak_memory=peak_units / units[1],
                ops=tuple(ops), method=method, alpha_units=units)


def _count(ops: List[Op], a: int, q: int) -> Tuple[int, int]:
    """Forward evaluations and peak stored memory (in units) of an op list."""
    evals = sum(1 for op in ops if op.kind == OpKind.ADVANCE)
    peak = q
    for op in ops:
        if op.kind == OpKind.STORE_HIDDEN:
            peak = max(peak, (op.hidden_below + 1) * q + op.internal_below * a)
        elif op.kind == OpKind.STORE_INTERNAL:
            peak = max(peak, op.hidden_below * q + (op.internal_below + 1) * a)
    return evals, peak


# --------------------------------------------------------------------------------------
# The dynamic program
# --------------------------------------------------------------------------------------
class _Tables:
    """Cost and choice tables, indexed ``[n, b]`` (b in units, clipped to the width)."""

    def __init__(self, cost_q, cost_d, choice_q, choice_d, split_q, split_d):
        self.cost = {"Q": cost_q, "D": cost_d}
        self.choice = {"Q": choice_q, "D": choice_d}
        self.split = {"Q": split_q, "D": split_d}
        self.width = cost_q.shape[1]

    def lookup(self, kind: str, n: int, b: int) -> Tuple[int, int]:
        b = min(b, self.width - 1)
        return int(self.choice[kind][n, b]), int(self.split[kind][n, b])


def _saturation(n: int, a: int, q: int, strategy: str) -> int:
    """Least budget (units) at which a segment of n steps reaches its lowest cost."""
    if strategy == "hsm":
        return q * n  # every hidden state stored: 2n - 1 evaluations
    return q + a * (n - 1)  # every internal state stored: n evaluations


def _solve(T: int, B: int, a: int, q: int, strategy: str):
    width = min(B, _saturation(T, a, q, strategy)) + 1
    use_hidden = strategy in ("hsm", "msm")
    use_internal = strategy in ("ism", "msm")
    use_free = strategy == "msm"
    # Work estimate of the exact DP: sum_n n * min(width, saturation(n)).
    ns = np.arange(1, T + 1, dtype=np.float64)
    work = float(np.sum(ns * np.minimum(width, q + a * ns)))
    exact = work <= _EXACT_WORK_LIMIT
    cost_q = np.full((T + 1, width), _INF, dtype=np.int64)
    cost_d = np.full((T + 1, width), _INF, dtype=np.int64)
    choice_q = np.zeros((T + 1, width), dtype=np.int8)
    choice_d = np.zeros((T + 1, width), dtype=np.int8)
    split_q = np.zeros((T + 1, width), dtype=np.int32)
    split_d = np.zeros((T + 1, width), dtype=np.int32)
    cost_q[0, :] = 0
    cost_d[0, :] = 0
    for n in range(1, T + 1):
        # Only budgets below saturation need the search; above it, copy the saturated column.
        top = min(width - 1, _saturation(n, a, q, strategy))
        cols = top + 1
        best_q = np.full(cols, _INF, np.int64)
        best_q[q:] = n * (n + 1) // 2  # triangle: recompute from the start for every step
        best_d = best_q.copy()
        ch_q = np.zeros(cols, np.int8)
        ch_d = np.zeros(cols, np.int8)
        sp_q = np.zeros(cols, np.int32)
        sp_d = np.zeros(cols, np.int32)
        if n > 1:
            if exact or n - 1 <= _APPROX_CANDIDATES:
                ys = np.arange(1, n, dtype=np.int64)
            else:
                ys = _candidate_splits(n)
            y_col = ys[:, None]

            def consider(cand, best, ch, sp, code, lo):
                index = np.argmin(cand, axis=0)
                value = cand[index, np.arange(cand.shape[1])]
                better = value < best[lo:]
                best[lo:] = np.where(better, value, best[lo:])
                ch[lo:] = np.where(better, code, ch[lo:])
                sp[lo:] = np.where(better, ys[index], sp[lo:])

            if use_internal and cols > q + a - 1 and q + a <= top:
                lo = q + a
                right = cost_q[n - ys][:, lo - a:cols - a]  # Q(n - y, b - a)
                consider(y_col + right + cost_q[ys - 1][:, lo:cols],
                         best_q, ch_q, sp_q, _STORE_INTERNAL, lo)
                consider(y_col + right + cost_d[ys - 1][:, lo:cols],
                         best_d, ch_d, sp_d, _STORE_INTERNAL, lo)
            if use_hidden and 2 * q <= top:
                lo = 2 * q
                right = cost_d[n - ys][:, lo - q:cols - q]  # D(n - y, b - 1)
                consider(y_col + right + cost_q[ys][:, lo:cols],
                         best_q, ch_q, sp_q, _STORE_HIDDEN, lo)
                consider(y_col + right + cost_d[ys][:, lo:cols],
                         best_d, ch_d, sp_d, _STORE_HIDDEN, lo)
            if use_free and a <= top:
                lo = max(a, q)
                cand = 1 + cost_q[n - 1, lo - a + q:cols - a + q]  # 1 + Q(n - 1, b - a + 1)
                better = cand < best_d[lo:]
                best_d[lo:] = np.where(better, cand, best_d[lo:])
                ch_d[lo:] = np.where(better, _FREE_START, ch_d[lo:])
                sp_d[lo:] = np.where(better, 1, sp_d[lo:])
        if strategy == "hsm":
            best_d, ch_d, sp_d = best_q, ch_q, sp_q
        cost_q[n, :cols], cost_d[n, :cols] = best_q, best_d
        choice_q[n, :cols], choice_d[n, :cols] = ch_q, ch_d
        split_q[n, :cols], split_d[n, :cols] = sp_q, sp_d
        if cols < width:
            for table in (cost_q, cost_d, choice_q, choice_d, split_q, split_d):
                table[n, cols:] = table[n, top]
    tables = _Tables(cost_q, cost_d, choice_q, choice_d, split_q, split_d)
    return tables, ("exact" if exact else "approximate")


def _candidate_splits(n: int) -> np.ndarray:
    """Split points tried by the approximate DP: small ones densely, the rest strided."""
    dense = np.arange(1, min(n, 17), dtype=np.int64)
    strided = np.unique(np.linspace(1, n - 1, _APPROX_CANDIDATES).round().astype(np.int64))
    tail = np.arange(max(1, n - 16), n, dtype=np.int64)
    return np.unique(np.concatenate([dense, strided, tail]))


# --------------------------------------------------------------------------------------
# From tables to ops
# --------------------------------------------------------------------------------------
class _Emitter:
    """Turns DP choices into ops, tracking the cursor and the stack of stored states.

    Invariant: while a segment is processed its start is the top of the stack, so every
    allocation is LIFO and a slot's position is its stack index.
    """

    def __init__(self):
        self.ops: List[Op] = []
        self.stack: List[Tuple[str, int]] = [("h", 0)]  # (kind, step); h_0 is never freed
        self.cursor = 0

    def _below(self):
        hidden = sum(1 for kind, _ in self.stack if kind == "h")
        return hidden, len(self.stack) - hidden

    def restore_to(self, start: int):
        if self.cursor == start:
            return
        kind, step = self.stack[-1]
        assert step == start, "segment start must be the top of the stack"
        hidden = sum(1 for k, _ in self.stack[:-1] if k == "h")
        self.ops.append(Op(OpKind.RESTORE, start, len(self.stack) - 1, hidden,
                           len(self.stack) - 1 - hidden))
        self.cursor = start

    def advance(self, count: int):
        for _ in range(count):
            self.cursor += 1
            self.ops.append(Op(OpKind.ADVANCE, self.cursor))

    def store(self, kind: str):
        hidden, internal = self._below()
        code = OpKind.STORE_HIDDEN if kind == "h" else OpKind.STORE_INTERNAL
        self.ops.append(Op(code, self.cursor, len(self.stack), hidden, internal))
        self.stack.append((kind, self.cursor))

    def free_top(self):
        kind, step = self.stack.pop()
        hidden, internal = self._below()
        self.ops.append(Op(OpKind.FREE, step, len(self.stack), hidden, internal))

    def backward_stored(self, step: int):
        kind, top_step = self.stack[-1]
        assert kind == "i" and top_step == step
        hidden = sum(1 for k, _ in self.stack[:-1] if k == "h")
        self.ops.append(Op(OpKind.BACKWARD_STORED, step, len(self.stack) - 1, hidden,
                           len(self.stack) - 1 - hidden))

    def backward_cursor(self):
        self.ops.append(Op(OpKind.BACKWARD_CURSOR, self.cursor))


def _emit(tables: _Tables, T: int, B: int, a: int, q: int) -> List[Op]:
    emitter = _Emitter()
    # Work items, processed last-in first-out:
    #   ("seg", kind, start, n, b)   a segment, start at the top of the stack
    #   ("free_h", step)             free h_step unless a FREE_START already did
    #   ("bwd_free", step)           backward of step from its stored I, then free it
    work = [("seg", "Q", 0, T, B)]
    while work:
        item = work.pop()
        if item[0] == "free_h":
            if emitter.stack[-1] == ("h", item[1]):
                emitter.free_top()
            continue
        if item[0] == "bwd_free":
            emitter.backward_stored(item[1])
            emitter.free_top()
            continue
        _, kind, start, n, b = item
        if n == 0:
            continue
        choice, y = tables.lookup(kind, n, b)
        if choice == _TRIANGLE:
            for last in range(n, 0, -1):
                emitter.restore_to(start)
                emitter.advance(last)
                emitter.backward_cursor()
        elif choice == _STORE_HIDDEN:
            emitter.restore_to(start)
            emitter.advance(y)
            emitter.store("h")
            work.append(("seg", kind, start, y, b))
            work.append(("free_h", start + y))
            work.append(("seg", "D", start + y, n - y, b - q))
        elif choice == _STORE_INTERNAL:
            emitter.restore_to(start)
            emitter.advance(y)
            emitter.store("i")
            work.append(("seg", kind, start, y - 1, b))
            work.append(("bwd_free", start + y))
            work.append(("seg", "Q", start + y, n - y, b - a))
        elif choice == _FREE_START:
            emitter.restore_to(start)
            emitter.free_top()  # the cursor still holds h_start: it is never needed again
            emitter.advance(1)
            emitter.store("i")
            work.append(("bwd_free", start + 1))
            work.append(("seg", "Q", start + 1, n - 1, b - a + q))
        else:  # pragma: no cover - the tables hold only the codes above
            raise AssertionError(f"unknown choice {choice}")
    return emitter.ops


# --------------------------------------------------------------------------------------
# Fixed baselines
# --------------------------------------------------------------------------------------
def _full_ops(T: int) -> List[Op]:
    """Standard BPTT: store every internal state, then run every backward from memory."""
    emitter = _Emitter()
    for _ in range(T):
        emitter.advance(1)
        emitter.store("i")
    for step in range(T, 0, -1):
        emitter.backward_stored(step)
        emitter.free_top()
    return emitter.ops


def _chen_segments(T: int) -> List[Tuple[int, int]]:
    count = max(1, int(round(math.sqrt(T))))
    length = int(math.ceil(T / count))
    return [(s, min(length, T - s)) for s in range(0, T, length)]


def _chen_peak(T: int, alpha: float) -> float:
    a, q = alpha_units(alpha)
    return _count(_chen_ops(T), a, q)[1] / q


def _chen_ops(T: int) -> List[Op]:
    """sqrt(T) segments, as ``tf.recompute_grad`` around each segment behaves: the first
    sweep keeps only each segment's start; each segment is recomputed once, keeping all of
    its internal states, and then run backward."""
    emitter = _Emitter()
    segments = _chen_segments(T)
    for start, length in segments:
        if start > 0:
            emitter.store("h")
        emitter.advance(length)
    for start, length in reversed(segments):
        emitter.cursor = -1  # the start is always restored: force the op
        emitter.restore_to(start)
        for _ in range(length):
            emitter.advance(1)
            emitter.store("i")
        for step in range(start + length, start, -1):
            emitter.backward_stored(step)
            emitter.free_top()
        if start > 0:
            emitter.free_top()
    return emitter.ops
