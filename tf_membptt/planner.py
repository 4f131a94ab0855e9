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

Solving the recurrences
-----------------------
The tables are filled one segment length ``n`` at a time, vectorized over the budgets
``b`` below saturation (``b < q + a (n - 1)``: above it ``n`` evaluations suffice) and over
the moves. For each move the split ``y`` minimizes ``h(y) = f(y) + g(n - y)``, ``f`` the left
part at budget ``b`` and ``g`` the right part at a smaller one. Rather than trying all
``n - 1`` splits (``O(T^2 B)`` in all), the solver tries a window of 4 splits around the
previous row's best and *certifies* it: ``h`` cannot go below its value at the window's
right end if every later increment of ``f`` is at least every earlier increment of ``g``
(symmetrically on the left). The columns are nearly convex in ``n`` (HSM and ISM exactly;
MSM increments dither by one where they step up), so the certificate uses exact running
statistics of the computed columns: prefix maxima of the increments, and minima of the next
`_RUN` increments, valid wherever the checked invariant "no increment is below the
smallest of the `_RUN` before it" holds. Cells whose certificate fails are retried on
windows of 64, 512 and 2048 splits, and finally on every split, so the result is exactly
that of the full search (checked against it). Most cells take the first window: ``T = 1000``
takes about a second or less at any budget.

Above `_EXACT_WORK_LIMIT` cells (memory: about 34 bytes a cell), `plan` switches to the
*approximate* method: the same windows, but cells whose certificate still fails after the
widest window keep the best split found there instead of a full search. It is a valid
schedule whose cost is an upper bound on the optimum (``method="approximate"``); where both
can be computed it stays within a fraction of a percent of the exact cost (benchmarks).
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
# Above this many (n, b) cells the exact DP is replaced by the approximate one (memory:
# about 34 bytes a cell for msm).
_EXACT_WORK_LIMIT = 2e7
# Widths of the successive windows of split points tried around the last argmin.
_WINDOWS = (4, 64, 512, 2048)
# Run length of the verified invariant on increments used by the certificates.
_RUN = 4

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
    """Fill the Q and D tables for segments of up to ``T`` steps and budgets up to ``B``.

    Returns ``(tables, method)``. See the module docstring ("Solving the recurrences").
    """
    width = min(B, _saturation(T, a, q, strategy)) + 1
    # Work (and memory) of the DP: the number of (n, b) cells searched.
    ns = np.arange(1, T + 1, dtype=np.float64)
    work = float(np.sum(np.minimum(width, q + a * ns)))
    exact = work <= _EXACT_WORK_LIMIT
    return _Solver(T, a, q, strategy, width, certify=exact).run(), (
        "exact" if exact else "approximate")


class _Solver:
    """The DP of `_solve`, one row ``n`` at a time, vectorized over budgets and moves.

    For a move with left part ``f(y)`` (``y`` plus the cost of steps ``1..y`` or ``1..y-1``
    at budget ``b``) and right part ``g(n - y)`` (the cost of the rest at a smaller budget),
    it evaluates ``h(y) = f(y) + g(n - y)`` on a window of ``y`` around the previous row's
    argmin, then proves that no ``y`` outside the window does better: ``h`` cannot decrease
    to the right of the window if every later increment of ``f`` is at least every earlier
    increment of ``g`` (and symmetrically on the left). The bounds used are exact running
    statistics of the already computed columns (prefix maxima of the increments; suffix
    minima of the next `_RUN` increments, valid where the verified invariant "no increment
    is below the smallest of the `_RUN` before it" holds from there on). Cells whose
    certificate fails are retried on wider windows, and finally searched over every ``y``,
    so the exact tables are those of the plain ``O(T^2 B)`` search. In the approximate
    method the last, full search is skipped: the best split found in the windows is kept.
    """

    def __init__(self, T, a, q, strategy, width, certify):
        self.T, self.a, self.q, self.W = T, a, q, width
        self.strategy, self.certify = strategy, certify
        self.nt = nt = 2 if strategy == "msm" else 1  # HSM and ISM: D == Q
        if T * (T + 1) // 2 < (1 << 28):
            self.dt, self.inf = np.int32, 1 << 29
        else:
            self.dt, self.inf = np.int64, 1 << 52
        # Increments along n are at most T + 1; keep their statistics compact.
        self.sdt = np.int16 if T + 2 < 32000 else np.int32
        self.scap = int(np.iinfo(self.sdt).max) - 1
        N1, W = T + 1, width
        # Costs are kept twice: row-major [t, n, b] for the narrow first windows (neighbouring
        # budgets read neighbouring cells) and budget-major [t, b, n] for the wide windows
        # and full searches (one column, consecutive n).
        self.C = np.full((nt, N1, W), self.inf, self.dt)
        self.C[:, 0, :] = 0
        self.CT = np.full((nt, W, N1), self.inf, self.dt)
        self.CT[:, :, 0] = 0
        self.P = np.zeros((nt, N1, W), self.sdt)  # P[k] = max of increments 0..k
        self.M = np.full((nt, N1, W), self.scap, self.sdt)  # min of increments k..k+_RUN-1
        self.viol = np.full((nt, W), -1, np.int64)  # last row breaking the run invariant
        self.choice = np.zeros((nt, N1, W), np.int8)
        self.split = np.zeros((nt, N1, W), np.int32)
        self.Cf, self.CTf = self.C.reshape(-1), self.CT.reshape(-1)
        self.Pf, self.Mf = self.P.reshape(-1), self.M.reshape(-1)
        self.violf = self.viol.reshape(-1)
        hidden = (0, 0, nt - 1, q, 2 * q, _STORE_HIDDEN)  # (tf, sf, tg, off, lo, code)
        internal = (0, 1, 0, a, q + a, _STORE_INTERNAL)
        moves = []
        if strategy in ("ism", "msm"):
            moves.append(internal + (0,))
            if nt == 2:
                moves.append((1,) + internal[1:] + (1,))
        if strategy in ("hsm", "msm"):
            moves.append(hidden + (0,))
            if nt == 2:
                moves.append((1,) + hidden[1:] + (1,))
        self.moves = moves  # (f table, shift, g table, budget offset, lowest b, code, out)
        self.prev = np.ones(len(moves) * W, np.int64)  # last argmin per move and budget
        self._tasks_cols = None

    # -- task arrays: one entry per (move, budget) searched in a row ------------------
    def _tasks(self, cols):
        """Per task: f and g column offsets (row-major, budget-major), the shift of f,
        the statistics index of the f and g columns, and the `prev` index."""
        if self._tasks_cols == cols:
            return self._task_arrays
        W, N1 = self.W, self.T + 1
        TS = W * N1
        parts, segs, start = [], [], 0
        for index, (tf, sf, tg, off, lo, code, out) in enumerate(self.moves):
            if lo >= cols:
                continue
            bs = np.arange(lo, cols, dtype=np.int64)
            parts.append((tf * TS + bs, tg * TS + bs - off,
                          tf * TS + bs * N1, tg * TS + (bs - off) * N1,
                          np.full(bs.size, sf, np.int64),
                          tf * W + bs, tg * W + bs - off, index * W + bs))
            segs.append((start, start + bs.size, lo, code, out))
            start += bs.size
        arrays = tuple(np.concatenate(column) for column in zip(*parts)) if parts else None
        self._tasks_cols, self._task_arrays = cols, (arrays, segs)
        return arrays, segs

    def _full(self, n, tasks):
        """Exact min over every split ``y = 1..n-1``, in chunks of tasks."""
        CTf = self.CTf
        fcolT, gcolT, sf = tasks[2], tasks[3], tasks[4]
        ys = np.arange(1, n, dtype=np.int64)
        val = np.empty(sf.size, np.int64)
        arg = np.empty(sf.size, np.int64)
        chunk = max(1, (1 << 21) // max(1, n))
        for s in range(0, sf.size, chunk):
            sl = slice(s, s + chunk)
            cand = (ys + CTf[(fcolT[sl] - sf[sl])[:, None] + ys]
                    + CTf[(gcolT[sl] + n)[:, None] - ys])
            j = np.argmin(cand, axis=1)
            val[sl] = cand[np.arange(j.size), j]
            arg[sl] = j + 1
        return val, arg

    def _window(self, n, tasks, center, left, w):
        """Min over a window of ``w`` splits, and whether it is certified global."""
        fcol, gcol, fcolT, gcolT, sf, fst, gst = tasks[:7]
        Cf, Pf, Mf, W = self.Cf, self.Pf, self.Mf, self.W
        start = np.clip(center - left, 1, n - w)
        if w <= _WINDOWS[0]:
            steps = np.arange(w) * W
            h = (Cf[(fcol + (start - sf) * W)[:, None] + steps]
                 + Cf[(gcol + (n - start) * W)[:, None] - steps])
        else:
            steps = np.arange(w)
            h = (self.CTf[(fcolT + start - sf)[:, None] + steps]
                 + self.CTf[(gcolT + n - start)[:, None] - steps])
        h += np.arange(w, dtype=h.dtype)
        j = np.argmin(h, axis=1)
        y = start + j
        val = h[np.arange(j.size), j] + start
        # Right of the window: h(y+1) - h(y) = df(y) - dg(n-y-1) >= 0 for every y >= yr,
        # where df(y) = 1 + (increment of the f column at y - sf). Its increments from
        # j0 on are >= M[j0] (the run invariant holds from j0 on), and the g increments
        # at n-y-1 <= n-yr-1 are <= P[n-yr-1].
        yr = start + (w - 1)
        j0 = yr - sf
        ok = (1 + Mf[fcol + j0 * W] >= Pf[gcol + (n - yr - 1) * W]) & (self.violf[fst] < j0 + _RUN)
        ok |= yr >= n - 1
        # Left of the window: df(y) - dg(n-y-1) <= 0 for every y < yl (increments of f up
        # to yl-1-sf are <= P, those of g from n-yl on are >= M).
        yl = start
        g0 = n - yl
        ok_l = ((1 + Pf[fcol + np.maximum(yl - 1 - sf, 0) * W] <= Mf[gcol + g0 * W])
                & (self.violf[gst] < g0 + _RUN))
        ok &= ok_l | (yl <= 1)
        return val, y, ok

    def _search(self, n, tasks):
        pvi = tasks[7]
        if n - 1 <= _WINDOWS[0]:
            val, y = self._full(n, tasks)
            self.prev[pvi] = y
            return val, y
        val, y, ok = self._window(n, tasks, self.prev[pvi], 1, _WINDOWS[0])
        stages = _WINDOWS[1:] + ((None,) if self.certify else ())
        for w in stages:
            if ok.all():
                break
            bad = np.nonzero(~ok)[0]
            sub = tuple(column[bad] for column in tasks)
            if w is None or n - 1 <= w:
                v2, y2 = self._full(n, sub)
                ok2 = True
            else:
                v2, y2, ok2 = self._window(n, sub, y[bad], w // 2, w)
            better = v2 < val[bad]
            val[bad] = np.where(better, v2, val[bad])
            y[bad] = np.where(better, y2, y[bad])
            ok[bad] = ok2
        self.prev[pvi] = y
        return val, y

    # -- the row loop ---------------------------------------------------------------
    def run(self) -> "_Tables":
        T, a, q, W, nt = self.T, self.a, self.q, self.W, self.nt
        C, CT, P, M = self.C, self.CT, self.P, self.M
        choice, split = self.choice, self.split
        use_free = self.strategy == "msm"
        for n in range(1, T + 1):
            top = min(W - 1, _saturation(n, a, q, self.strategy))
            cols = top + 1
            best = np.full((nt, cols), self.inf, np.int64)
            best[:, q:] = n * (n + 1) // 2  # triangle: recompute from the start every time
            ch = np.zeros((nt, cols), np.int8)
            sp = np.zeros((nt, cols), np.int32)
            if n > 1:
                tasks, segs = self._tasks(cols)
                if tasks is not None:
                    val, y = self._search(n, tasks)
                    for s0, s1, lo, code, out in segs:
                        v = val[s0:s1]
                        better = v < best[out, lo:]
                        best[out, lo:] = np.where(better, v, best[out, lo:])
                        ch[out, lo:][better] = code
                        sp[out, lo:] = np.where(better, y[s0:s1], sp[out, lo:])
                if use_free and a <= top:
                    lo = max(a, q)
                    cand = 1 + C[0, n - 1, lo - a + q:cols - a + q]  # 1 + Q(n-1, b-a+1)
                    better = cand < best[1, lo:]
                    best[1, lo:] = np.where(better, cand, best[1, lo:])
                    ch[1, lo:][better] = _FREE_START
                    sp[1, lo:][better] = 1
            for table, row in ((C, best), (choice, ch), (split, sp)):
                table[:, n, :cols] = row
                if cols < W:
                    table[:, n, cols:] = row[:, -1:]
            CT[:, :, n] = C[:, n]
            # Running statistics of the increments C[n] - C[n-1] of every column.
            delta = np.minimum(C[:, n].astype(np.int64) - C[:, n - 1], self.scap)
            if n - 1 - _RUN >= 0:
                self.viol[delta < M[:, n - 1 - _RUN]] = n - 1
            M[:, n - 1] = delta
            first = max(0, n - _RUN)
            if first < n - 1:
                np.minimum(M[:, first:n - 1], delta[:, None, :].astype(self.sdt),
                           out=M[:, first:n - 1])
            if n == 1:
                P[:, 0] = delta
            else:
                np.maximum(P[:, n - 2], delta, out=P[:, n - 1])
        d = nt - 1
        return _Tables(C[0], C[d], choice[0], choice[d], split[0], split[d])


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
