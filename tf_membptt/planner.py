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

Which method `plan` uses
------------------------
In this order: a budget that can store every state the strategy stores gets the closed-form
optimum (`_store_everything_ops`); a budget where a schedule meeting the lower bound exists
gets it, built in O(T) ("Budgets where the bound is reachable directly" below); otherwise
``plan`` runs the exact DP when its work (the ``(n, b)`` cells searched, `_dp_work`) is at
most `_EXACT_WORK_LIMIT` = 4e6 cells: a few seconds and at most ~300 MB of tables (T=1000
at any budget, T=10,000 at budgets up to ~2%). Above it, the tables would grow as
``T x B`` (T=100,000 at 5%: ~1e9 cells, tens of GB), so it switches to the approximate
method below (``method="approximate"``). The exact method stays available: raising
``tf_membptt.planner._EXACT_WORK_LIMIT`` makes `plan` use it wherever memory allows.

Long sequences: the approximate method (`_chain_ops`)
----------------------------------------------------
The top level of any plan is a *chain*: the first sweep stores boundaries at
``s_1 < ... < s_k`` and the backward pass processes the tail ``(s_k, T]`` and then the
chunks between boundaries, last first, each with the budget left by the boundaries to its
left (its own right boundary is freed by then). With internal-state boundaries (``I_s``:
``a`` units, step ``s`` is never evaluated again) chunk ``j`` has ``b_j = B - (j-1) a``;
with hidden boundaries (``q`` units, a freeable start: table D) ``b_j = B - (j-1) q``.
The cost is ``T + sum_j X(len_j, b_j) + X(tail, b_tail) - tail``, ``X`` the segment cost.

The method solves the chunks *exactly*: one exact DP (the one above) for segments of up to
``nmax`` steps (`_chunk_rows`: the most rows within `_CHUNK_WORK_LIMIT` = 1.5e6 cells of
work and `_CHUNK_CELL_LIMIT` cells of tables, but at least `_CHUNK_SLACK` times what the
chain needs to cover ``T``), extended to longer segments that the budget runs *saturated*
(every state stored: ``n`` evaluations, hsm ``2n - 1``) by the closed form (`_ChunkTables`).
Then, for each boundary type the strategy allows and each ``k``, the best chunk lengths
take the ``T - ...`` smallest cost increments over all chunk columns: exact when the
columns are convex (HSM, ISM), and bracketed for MSM by running the search on an upper
(prefix maxima) and a lower (suffix minima) convex envelope of its increments and keeping
the better chain after costing both exactly (`_ChainSearch`; histograms of increments make
every ``k`` cost ``O(V)``). The chain is emitted through the same `_Emitter` and work
loop as the exact plan, so it is a valid LIFO schedule within the budget.

Where it is used: only where no lower-bound schedule exists (msm/ism budgets below about
``sqrt(2T)`` internal states; any hsm budget) and the exact DP is above its limit. For msm
and ism with alpha 2 that is T = 20,000 at 0.5-1% of standard BPTT's memory, T = 100,000 at
0.02-0.45% and T = 1,000,000 below 0.14% (alpha 3 alike; T = 10,000 only at 1.34-1.39%);
for hsm most budgets from T = 10,000 on.

Quality: it is not always optimal. Chunks longer than ``nmax`` rows can only run
saturated, so where the optimum makes a chunk longer than the tables, the chain costs more.
Measured against the exact DP (tests/test_planner_large.py, "(d)"): with the limits scaled
down so that T = 1000..2000 are routed and chunked as longer sequences are, msm costs 0 to
1.19% more (alpha 4, T = 1000, 33 slots: 2881 vs 2847), ism 0 to 1.00% (T = 2000, 25
slots, alpha 2: 7397 vs 7324; with tables of 1231 rows instead of 308 it is 7324), hsm
nothing (Revolve); at the default limits T = 10,000 hsm at 5% and T = 20,000 msm/ism at
0.7% cost 0 to 4 evaluations (0.01%) more. A chained plan that meets the lower bound
(`_lower_bound`) is proven optimal and labelled ``method="exact"``; otherwise it is
``"approximate"``.

Op tables
---------
Plans are emitted as op tables (``int32`` rows: kind, step, slot, hidden_below,
internal_below; see `schedule.py`), never as per-op records: the O(T) schedules (lower
bound, store everything, ``full``) in closed form with numpy, and the DP's and the chain's
schedules by `_Emitter`, which appends five integers per op and builds long regular runs
(advances, triangles, saturated chunk runs) as numpy blocks. With `_count` and the plan's
counts vectorized, msm at 5% plans T = 100,000 in about 0.1 s and T = 1,000,000 in about
1 s, and `op_table()` and `describe()` add under 0.1 s (benchmarks/results/planner.md;
with a list of `Op` records they took 1.3 s and 14 s to plan, and about as long again each
for `op_table()` and `describe()`).

Budgets where the bound is reachable directly
---------------------------------------------
Before any table, `plan` checks whether a schedule meeting the lower bound can be built
outright (`_boundary_chunks`): the first sweep stores all k internal states that fit, as
chunk boundaries ending at step T - 1, and each chunk between two boundaries is recomputed
once, storing its own internal states, after the boundary above it is freed. That fits when
the T - 1 - k other steps number at most (k + 1)(k + 2) / 2 - 1 (roughly k >= sqrt(2T):
from about 1.5% of standard BPTT's memory at T = 1000, alpha 2). Such plans cost exactly the
bound, so they are optimal, and take O(T) to build (one numpy construction, no loop over
ops). Tests check them against the DP on thousands of small cases.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import List, Tuple

import numpy as np

from tf_membptt.schedule import STRATEGIES, OpKind, Plan

_INF = np.int64(1) << 52
_MAX_UNITS_PER_SLOT = 8
# Above this many (n, b) cells of DP work, `plan` uses the chained approximate method
# instead of the exact DP (about 1.4 us and at most ~70 bytes of table a cell: ~5 s and
# ~300 MB at the limit on one core).
_EXACT_WORK_LIMIT = 4e6
# The approximate method's exact chunk tables: at most this many cells of DP work ...
_CHUNK_WORK_LIMIT = 1.5e6
# ... and at most this many cells in their (rows x budgets) rectangle (~34 bytes a cell).
_CHUNK_CELL_LIMIT = 8e6
# ... with at least this many times the rows that the chain's chunks need to cover T
# (where that takes more cells, less slack, and at most the hard limit: ~850 MB).
_CHUNK_SLACK = 8
_CHUNK_CELL_HARD_LIMIT = 2.5e7
# Widths of the successive windows of split points tried around the last argmin.
_WINDOWS = (4, 64, 512, 2048)
# Run length of the verified invariant on increments used by the certificates.
_RUN = 4
# The emitter builds runs of at least this many steps (advances, triangles, saturated
# stores) as numpy blocks, shorter ones op by op.
_RUN_ROWS = 32

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
        # Internal states are charged alpha rounded up to a multiple of 1/q (alpha_units).
        a, q = alpha_units(alpha)
        return 1.0 + a / q * num_steps
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
        table, method, units = _full_ops(num_steps), "fixed", alpha_units(alpha)
    elif strategy == "chen":
        table, method, units = _chen_ops(num_steps), "fixed", alpha_units(alpha)
    else:
        a, q = units = alpha_units(alpha)
        budget = int(math.floor(memory_slots * q + 1e-9))
        if budget >= _saturation(num_steps, a, q, strategy):
            # Enough memory to store every state the strategy can store: the optimum is
            # known in closed form (T evaluations; 2T - 1 for hsm), no table needed.
            table, method = _store_everything_ops(num_steps, strategy), "exact"
        elif _boundary_chunks(num_steps, budget, a, q, strategy) is not None:
            # A schedule that meets the lower bound exists and is built in O(T): optimal.
            table, method = _lower_bound_ops(num_steps, budget, a, q, strategy), "exact"
        elif _dp_work(num_steps, budget, a, q, strategy)[0] <= _EXACT_WORK_LIMIT:
            tables, method = _solve(num_steps, budget, a, q, strategy)
            table = _emit(tables, num_steps, budget, a, q)
        else:
            table, method = _chain_ops(num_steps, budget, a, q, strategy), "approximate"
    forward_evals, peak_units = _count(table, *units)
    if method == "approximate" and forward_evals == _lower_bound(num_steps, budget, a, q,
                                                                   strategy):
        method = "exact"  # it meets a lower bound on every schedule: proven optimal
    return Plan(num_steps=num_steps, memory_slots=memory_slots, strategy=strategy,
                alpha=alpha, forward_evals=forward_evals, peak_memory=peak_units / units[1],
                table=table, method=method, alpha_units=units)


def _lower_bound(T: int, budget: int, a: int, q: int, strategy: str) -> int:
    """A lower bound on forward evaluations (msm/ism; 0 otherwise, i.e. no claim).

    Every step is evaluated in the first sweep; each step but T is evaluated again before
    its backward unless its internal state was stored in the first sweep, and all of those
    are still held when step T's backward runs, next to h_0: at most (budget - q) // a.
    """
    if strategy not in ("msm", "ism"):
        return 0
    return 2 * T - 1 - min(T - 1, (budget - q) // a)


def _boundary_chunks(T: int, budget: int, a: int, q: int, strategy: str):
    """Chunk lengths of `_lower_bound_ops`, or None where it cannot meet the lower bound.

    The first sweep stores k = (budget - q) // a internal states, at boundaries
    p_1 < ... < p_k = T - 1; every other step but T is recomputed exactly once, in the chunk
    between two boundaries, so the cost is 2T - 1 - k, the lower bound. Chunk j (between
    p_{j-1} and p_j, p_0 = 0) is recomputed after p_j's backward, while p_1..p_{j-1} are
    still held: it can keep j - 1 + (L_j - 1) <= k internal states, so L_j <= k - j + 2.
    That covers the T - 1 - k recomputed steps when they number at most
    sum_j (k - j + 2) = (k + 1)(k + 2) / 2 - 1.
    """
    if strategy not in ("msm", "ism"):
        return None
    k = (budget - q) // a
    if k < 1 or k >= T - 1:
        return None
    remaining = T - 1 - k
    if remaining > (k + 1) * (k + 2) // 2 - 1:
        return None
    lengths = []
    for j in range(1, k + 1):  # the earliest chunks, recomputed last, may be the longest
        length = min(k - j + 2, remaining)
        lengths.append(length)
        remaining -= length
    return lengths


def _lower_bound_ops(T: int, budget: int, a: int, q: int, strategy: str) -> np.ndarray:
    """The op table of `_boundary_chunks`' schedule: optimal, since it meets `_lower_bound`.

    Built in closed form with numpy (it is the schedule of most budgets of a few percent and
    up, where plans of long sequences have millions of ops).
    """
    # int32 throughout, as in the table: the per-row temporaries below are millions long.
    lengths = np.asarray(_boundary_chunks(T, budget, a, q, strategy), np.int32)
    k = lengths.size
    chunk = np.arange(1, k + 1, dtype=np.int32)  # chunk j: between p_{j-1} and p_j
    ends = np.cumsum(lengths + 1, dtype=np.int32)  # p_j; p_0 = 0 is h_0
    starts = ends - lengths - 1
    assert ends[-1] == T - 1
    # Backward, chunks j = k..1, each as one block of rows at offsets r = 0, 1, ...:
    #   r = 0, 1: backward of p_j from slot j, and its free;
    #   (if the chunk recomputes L >= 1 steps) r = 2: restore p_{j-1} (slot j - 1);
    #   r = 3 .. 2L: advance and store I of steps p_{j-1} + 1 .. p_j - 2 (slots j, j + 1, ..);
    #   r = 2L + 1, 2L + 2: advance step p_j - 1 and run its backward at the cursor;
    #   r = 2L + 3 .. 4L: backward and free of the stored steps, last first.
    sizes = 2 + np.where(lengths > 0, 4 * lengths - 1, 0)[::-1]
    sweep_rows = T - 1 + k
    table = np.empty((sweep_rows + 2 + int(sizes.sum()), 5), np.int32)
    # First sweep: steps 1..T-1, each boundary's internal state stored right after its
    # evaluation (in slot j, above h_0 and the j - 1 boundaries before it); then step T.
    sweep = table[:sweep_rows]
    is_store = np.zeros(sweep_rows, bool)
    is_store[ends + chunk - 1] = True  # after p_j advances and j - 1 stores
    sweep[~is_store] = _rows(OpKind.ADVANCE, np.arange(1, T))
    sweep[is_store] = _rows(OpKind.STORE_INTERNAL, ends, chunk, 1, chunk - 1)
    table[sweep_rows:sweep_rows + 2] = _rows([OpKind.ADVANCE, OpKind.BACKWARD_CURSOR], T)
    owner = np.repeat(np.arange(k, dtype=np.int32)[::-1], sizes)  # j - 1 of each row
    r = np.arange(len(owner), dtype=np.int32) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    j, length = chunk[owner], lengths[owner]
    start, end = starts[owner], ends[owner]
    odd = r % 2 == 1  # an advance (or a backward) in the two runs; even: its store (free)
    forward = (r - 3) // 2  # the run's i-th stored step is p_{j-1} + 1 + i, in slot j + i
    backward = length - 2 - (r - 2 * length - 3) // 2
    stored = np.where(r < 2 * length + 1, forward, backward)
    regions = [r == 0, r == 1, r == 2, r < 2 * length + 1, r == 2 * length + 1,
               r == 2 * length + 2, r > 2 * length + 2]
    chunks = table[sweep_rows + 2:]
    chunks[:, 0] = np.select(regions, [
        OpKind.BACKWARD_STORED, OpKind.FREE, OpKind.RESTORE,
        np.where(odd, OpKind.ADVANCE, OpKind.STORE_INTERNAL), OpKind.ADVANCE,
        OpKind.BACKWARD_CURSOR, np.where(odd, OpKind.BACKWARD_STORED, OpKind.FREE)])
    chunks[:, 1] = np.select(regions, [end, end, start, start + 1 + stored, end - 1, end - 1,
                                       start + 1 + stored])
    chunks[:, 2] = np.select(regions, [j, j, j - 1, np.where(odd, -1, j + stored), -1, -1,
                                       j + stored])
    chunks[:, 3] = np.select(regions, [1, 1, j > 1, np.where(odd, 0, 1), 0, 0, 1])
    chunks[:, 4] = np.select(regions, [j - 1, j - 1, np.maximum(j - 2, 0),
                                       np.where(odd, 0, j - 1 + stored), 0, 0, j - 1 + stored])
    table.flags.writeable = False
    return table


def _store_everything_ops(T: int, strategy: str) -> np.ndarray:
    """The optimal schedule at a saturated budget: msm/ism store every internal state but
    the last step's (T evaluations); hsm stores every hidden state (2T - 1)."""
    steps = np.arange(1, T)  # stored in the first sweep
    back = steps[::-1]
    last = _rows([OpKind.ADVANCE, OpKind.BACKWARD_CURSOR], T)
    if strategy == "hsm":
        sweep = _interleave(_rows(OpKind.ADVANCE, steps),
                            _rows(OpKind.STORE_HIDDEN, steps, steps, steps))
        # h_step is not needed once step + 1 is done; step is recomputed from h_{step-1}.
        backward = _interleave(_rows(OpKind.FREE, back, back, back),
                               _rows(OpKind.RESTORE, back - 1, back - 1, back - 1),
                               _rows(OpKind.ADVANCE, back), _rows(OpKind.BACKWARD_CURSOR, back))
    else:
        sweep = _interleave(_rows(OpKind.ADVANCE, steps),
                            _rows(OpKind.STORE_INTERNAL, steps, steps, 1, steps - 1))
        backward = _interleave(_rows(OpKind.BACKWARD_STORED, back, back, 1, back - 1),
                               _rows(OpKind.FREE, back, back, 1, back - 1))
    return _table(sweep, last, backward)


def _count(table: np.ndarray, a: int, q: int) -> Tuple[int, int]:
    """Forward evaluations and peak stored memory (in units) of an op table."""
    kind = table[:, 0]
    evals = int(np.count_nonzero(kind == OpKind.ADVANCE))
    # Memory grows only at stores: right after one it is what lies below the new slot plus
    # the new state.
    below = table[:, 3].astype(np.int64) * q + table[:, 4].astype(np.int64) * a
    peak = q
    for code, size in ((OpKind.STORE_HIDDEN, q), (OpKind.STORE_INTERNAL, a)):
        stores = below[kind == code]
        if stores.size:
            peak = max(peak, int(stores.max()) + size)
    return evals, peak


# --------------------------------------------------------------------------------------
# Op tables
# --------------------------------------------------------------------------------------
def _rows(kind, step, slot=-1, hidden=0, internal=0) -> np.ndarray:
    """Op-table rows from their columns (arrays or scalars, broadcast together)."""
    columns = np.broadcast_arrays(kind, step, slot, hidden, internal)
    return np.stack(columns, axis=1).astype(np.int32).reshape(-1, 5)


def _interleave(*blocks: np.ndarray) -> np.ndarray:
    """Equally long blocks of rows, merged row by row: row i of each block in turn."""
    return np.stack(blocks, axis=1).reshape(-1, 5)


def _table(*blocks: np.ndarray) -> np.ndarray:
    """The read-only ``int32`` op table of blocks of rows, in order."""
    table = np.concatenate(blocks).astype(np.int32, copy=False)
    table.flags.writeable = False
    return table


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


def _dp_work(T: int, B: int, a: int, q: int, strategy: str) -> Tuple[float, int]:
    """``(work, width)`` of the exact DP for ``T`` steps: the number of ``(n, b)`` cells it
    searches, and the number of budget columns of its tables."""
    width = min(B, _saturation(T, a, q, strategy)) + 1
    # Rows n below width / a are cut at saturation (a closed form; no float rounding).
    n_cut = min(T, max(0, (width - q) // a))  # rows with q + a * n < width
    work = q * n_cut + a * n_cut * (n_cut + 1) // 2 + (T - n_cut) * width
    return float(work), width


def _solve(T: int, B: int, a: int, q: int, strategy: str):
    """Fill the exact Q and D tables for segments of up to ``T`` steps and budgets up to
    ``B``. Returns ``(tables, "exact")``. See the module docstring ("Solving the
    recurrences"); `_cached_plan` only calls it below `_EXACT_WORK_LIMIT`.
    """
    width = _dp_work(T, B, a, q, strategy)[1]
    return _Solver(T, a, q, strategy, width, certify=True).run(), "exact"


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
    """Turns DP choices into op-table rows, tracking the cursor and the stack of stored
    states.

    Invariant: while a segment is processed its start is the top of the stack, so every
    allocation is LIFO and a slot's position is its stack index. The number of hidden
    states on the stack is kept as a running count (plans of 10^5 steps hold thousands of
    states: recounting the stack at every op would be quadratic).

    Single ops are appended to a flat list of integers (five per op: cheaper than a record
    or a numpy row each); long runs of a regular shape (`_RUN_ROWS` steps or more: a long
    advance, a triangle, a saturated run of stores) are built as numpy blocks.
    """

    def __init__(self):
        self.rows: List[int] = []  # the ops since the last block, five integers each
        self.blocks: List[np.ndarray] = []
        self.stack: List[Tuple[str, int]] = [("h", 0)]  # (kind, step); h_0 is never freed
        self.hidden = 1  # hidden states on the stack
        self.cursor = 0

    def table(self) -> np.ndarray:
        """The op table of everything emitted."""
        self._flush()
        return _table(np.zeros((0, 5), np.int32), *self.blocks)

    def _flush(self):
        if self.rows:
            self.blocks.append(np.asarray(self.rows, np.int32).reshape(-1, 5))
            self.rows = []

    def _block(self, block: np.ndarray):
        self._flush()
        self.blocks.append(block)

    def _below(self):
        return self.hidden, len(self.stack) - self.hidden

    def _below_top(self):
        """Hidden and internal states strictly below the top of the stack."""
        hidden = self.hidden - (self.stack[-1][0] == "h")
        return hidden, len(self.stack) - 1 - hidden

    def restore_to(self, start: int):
        if self.cursor == start:
            return
        kind, step = self.stack[-1]
        assert step == start, "segment start must be the top of the stack"
        hidden, internal = self._below_top()
        self.rows.extend((OpKind.RESTORE, start, len(self.stack) - 1, hidden, internal))
        self.cursor = start

    def advance(self, count: int):
        cursor = self.cursor
        if count >= _RUN_ROWS:
            self._block(_rows(OpKind.ADVANCE, np.arange(cursor + 1, cursor + count + 1)))
        else:
            extend = self.rows.extend
            for step in range(cursor + 1, cursor + count + 1):
                extend((OpKind.ADVANCE, step, -1, 0, 0))
        self.cursor = cursor + count

    def store(self, kind: str):
        hidden, internal = self._below()
        code = OpKind.STORE_HIDDEN if kind == "h" else OpKind.STORE_INTERNAL
        self.rows.extend((code, self.cursor, len(self.stack), hidden, internal))
        self.stack.append((kind, self.cursor))
        self.hidden += kind == "h"

    def free_top(self):
        kind, step = self.stack.pop()
        self.hidden -= kind == "h"
        hidden, internal = self._below()
        self.rows.extend((OpKind.FREE, step, len(self.stack), hidden, internal))

    def backward_stored_and_free(self, step: int):
        """Backward of `step` from its internal state on top of the stack, which is then
        not needed any more: every schedule frees it right away."""
        kind, top_step = self.stack[-1]
        assert kind == "i" and top_step == step
        hidden, internal = self._below_top()
        slot = len(self.stack) - 1
        self.rows.extend((OpKind.BACKWARD_STORED, step, slot, hidden, internal,
                          OpKind.FREE, step, slot, hidden, internal))
        self.stack.pop()

    def backward_cursor(self):
        self.rows.extend((OpKind.BACKWARD_CURSOR, self.cursor, -1, 0, 0))

    # -- runs: the ops of several calls above at once -------------------------------------
    def store_run(self, kind: str, count: int):
        """`count` times: advance one step and store it (``kind`` "h" or "i")."""
        if count < _RUN_ROWS:
            for _ in range(count):
                self.advance(1)
                self.store(kind)
            return
        steps = np.arange(self.cursor + 1, self.cursor + count + 1)
        slots = len(self.stack) + np.arange(count)
        if kind == "h":
            hidden = self.hidden + np.arange(count)
            stores = _rows(OpKind.STORE_HIDDEN, steps, slots, hidden, slots - hidden)
        else:
            stores = _rows(OpKind.STORE_INTERNAL, steps, slots, self.hidden,
                           slots - self.hidden)
        self._block(_interleave(_rows(OpKind.ADVANCE, steps), stores))
        self.stack.extend(zip([kind] * count, range(self.cursor + 1, self.cursor + count + 1)))
        self.hidden += count if kind == "h" else 0
        self.cursor += count

    def backward_stored_run(self, count: int):
        """`backward_stored_and_free` of the `count` internal states on top of the stack,
        which hold consecutive steps (the top one last evaluated)."""
        if count < _RUN_ROWS:
            for _ in range(count):
                self.backward_stored_and_free(self.stack[-1][1])
            return
        top = self.stack[-1][1]
        assert self.stack[-1] == ("i", top) and self.stack[-count] == ("i", top - count + 1)
        steps = top - np.arange(count)
        slots = len(self.stack) - 1 - np.arange(count)
        rows = _rows(OpKind.BACKWARD_STORED, steps, slots, self.hidden, slots - self.hidden)
        frees = rows.copy()
        frees[:, 0] = OpKind.FREE
        self._block(_interleave(rows, frees))
        del self.stack[-count:]

    def hidden_backward_run(self, start: int, count: int):
        """The backward of steps ``start + count .. start + 1`` when ``h_start .. h_{start +
        count}`` top the stack (a saturated hsm run): for each step, last first, free its
        hidden state, restore the one before, evaluate the step and run its backward."""
        if count < _RUN_ROWS:
            for step in range(start + count, start, -1):
                self.free_top()
                self.restore_to(step - 1)
                self.advance(1)
                self.backward_cursor()
            return
        assert self.stack[-1] == ("h", start + count) and self.stack[-count - 1] == ("h", start)
        steps = start + count - np.arange(count)
        slots = len(self.stack) - 1 - np.arange(count)  # of h_step, freed
        hidden = self.hidden - 1 - np.arange(count)  # hidden states below it
        internal = len(self.stack) - self.hidden
        block = _interleave(_rows(OpKind.FREE, steps, slots, hidden, internal),
                            _rows(OpKind.RESTORE, steps - 1, slots - 1, hidden - 1, internal),
                            _rows(OpKind.ADVANCE, steps),
                            _rows(OpKind.BACKWARD_CURSOR, steps))
        if self.cursor == start + count - 1:  # already there: no first restore
            block = np.delete(block, 1, axis=0)
        self._block(block)
        del self.stack[-count:]
        self.hidden -= count
        self.cursor = start + 1

    def triangle(self, start: int, n: int):
        """Backward of the ``n`` steps after `start` (the top of the stack) with nothing
        stored: for each step, last first, restore `start` and evaluate up to it."""
        if n < _RUN_ROWS:
            for last in range(n, 0, -1):
                self.restore_to(start)
                self.advance(last)
                self.backward_cursor()
            return
        # One group per step `start + last`: restore, `last` advances, backward.
        lasts = np.arange(n, 0, -1)
        sizes = lasts + 2
        group = np.repeat(np.arange(n), sizes)
        offset = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        last = lasts[group]
        hidden, internal = self._below_top()
        kind = np.select([offset == 0, offset <= last],
                         [OpKind.RESTORE, OpKind.ADVANCE], OpKind.BACKWARD_CURSOR)
        step = np.where(offset == 0, start, start + np.minimum(offset, last))
        restore = offset == 0
        block = _rows(kind, step, np.where(restore, len(self.stack) - 1, -1),
                      np.where(restore, hidden, 0), np.where(restore, internal, 0))
        if self.cursor == start:  # restore_to emits nothing when already there
            block = block[1:]
        self._block(block)
        self.cursor = start + 1


def _emit(tables: _Tables, T: int, B: int, a: int, q: int) -> np.ndarray:
    emitter = _Emitter()
    _run_work(emitter, tables, [("seg", "Q", 0, T, B)], a, q)
    return emitter.table()


def _run_work(emitter: _Emitter, tables, work: list, a: int, q: int) -> None:
    """Emit the ops of a list of work items (a stack: the last item is processed first),
    following the choices of ``tables.lookup(kind, n, b)``. Work items:

    * ``("seg", kind, start, n, b)``: a segment, its start at the top of the stack;
    * ``("free_h", step)``: free ``h_step`` unless a FREE_START already did;
    * ``("bwd_free", step)``: backward of ``step`` from its stored ``I``, then free it;
    * ``("bwd_run", count)``: ``bwd_free`` of the `count` internal states on top;
    * ``("hidden_run", start, count)``: the backward of a saturated hsm run (see
      `_saturated_run`).
    """
    saturated = getattr(tables, "saturated_run", None)
    while work:
        item = work.pop()
        if item[0] == "free_h":
            if emitter.stack[-1] == ("h", item[1]):
                emitter.free_top()
            continue
        if item[0] == "bwd_free":
            emitter.backward_stored_and_free(item[1])
            continue
        if item[0] == "bwd_run":
            emitter.backward_stored_run(item[1])
            continue
        if item[0] == "hidden_run":
            emitter.hidden_backward_run(item[1], item[2])
            continue
        _, kind, start, n, b = item
        if n == 0:
            continue
        if saturated is not None and saturated(kind, n):
            _saturated_run(emitter, tables, work, kind, start, n, b, a, q)
            continue
        choice, y = tables.lookup(kind, n, b)
        if choice == _TRIANGLE:
            emitter.triangle(start, n)
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


def _saturated_run(emitter: _Emitter, chunks: "_ChunkTables", work: list, kind: str,
                   start: int, n: int, b: int, a: int, q: int) -> None:
    """The steps of a segment beyond the exact chunk tables (``n > nmax``), which the
    budget runs saturated: what `_run_work` would emit one step at a time from
    `_ChunkTables.lookup` (store the first step, continue with the rest), as runs.

    hsm: each step's hidden state is stored, and later freed after the rest's backward,
    followed by the step's own one-step triangle (a restore, an advance, a backward).
    msm and ism from a start that is kept: each step's internal state is stored, and later
    runs its backward and is freed. The remaining ``nmax`` steps follow the exact table.
    """
    assert n <= _saturated_length(kind, b, a, q, chunks.strategy)
    count = n - chunks.nmax
    emitter.restore_to(start)
    if chunks.strategy == "hsm":
        emitter.store_run("h", count)
        work.append(("hidden_run", start, count))
        work.append(("seg", "D", start + count, n - count, b - count * q))
    else:
        emitter.store_run("i", count)
        work.append(("bwd_run", count))
        work.append(("seg", "Q", start + count, n - count, b - count * a))


# --------------------------------------------------------------------------------------
# The approximate method for long sequences: a chain of chunks solved by exact tables
# --------------------------------------------------------------------------------------
def _saturated_length(kind: str, b: int, a: int, q: int, strategy: str) -> int:
    """Longest segment that budget ``b`` (units, start included) runs at its lowest cost:
    ``n`` evaluations (msm, ism: every internal state stored) or ``2n - 1`` (hsm: every
    hidden state). -1 when ``b`` cannot even hold the start."""
    if b < q:
        return -1
    if strategy == "hsm":
        return b // q + 1  # h_0 .. h_{n-2} stored: b >= q (n - 1)
    if kind == "D" and strategy == "msm":
        return b // a + 1  # free the start, store I_1 .. I_{n-1}: b >= a (n - 1)
    return (b - q) // a + 1  # start kept, I_1 .. I_{n-1} stored: b >= q + a (n - 1)


class _ChunkTables:
    """Exact tables for segments of up to ``nmax`` steps, extended to longer *saturated*
    segments (budget enough to run them at their lowest cost) by the closed form."""

    def __init__(self, tables: _Tables, nmax: int, a: int, q: int, strategy: str):
        self.tables, self.nmax, self.a, self.q = tables, nmax, a, q
        self.strategy = strategy
        self.low = 2 if strategy == "hsm" else 1  # cost of a saturated step

    def cost(self, kind: str, n: int, b: int) -> int:
        if n <= self.nmax:
            return int(self.tables.cost[kind][n, min(b, self.tables.width - 1)])
        if n > _saturated_length(kind, b, self.a, self.q, self.strategy):
            return int(_INF)
        return self.low * n - (self.low - 1)

    def saturated_run(self, kind: str, n: int) -> bool:
        """Whether `lookup` would store the segment's first step and leave the rest
        saturated too, step after step down to ``nmax`` (`_saturated_run` emits that run at
        once). An msm segment from a freeable start frees it first: one step, then a run."""
        return n > self.nmax and not (kind == "D" and self.strategy == "msm")

    def lookup(self, kind: str, n: int, b: int) -> Tuple[int, int]:
        if n <= self.nmax:
            return self.tables.lookup(kind, n, b)
        assert n <= _saturated_length(kind, b, self.a, self.q, self.strategy)
        # A saturated segment: its first step is stored (hsm: h_1 after a triangle of one
        # step; msm D: the start is freed and I_1 stored; else I_1), the rest is saturated.
        if self.strategy == "hsm":
            return _STORE_HIDDEN, 1
        if kind == "D" and self.strategy == "msm":
            return _FREE_START, 1
        return _STORE_INTERNAL, 1


def _chunk_rows(T: int, B: int, a: int, q: int, strategy: str) -> int:
    """Rows of the exact chunk tables: the most ``n <= T`` within `_CHUNK_WORK_LIMIT`
    (work) and `_CHUNK_CELL_LIMIT` (rectangle cells), but at least `_CHUNK_SLACK` times
    what the longest chain's chunks need to cover ``T`` (then the cells are about
    ``_CHUNK_SLACK * q * T``: small budgets make narrow tables)."""
    def fits(n, limit, cells):
        work, width = _dp_work(n, B, a, q, strategy)
        return work <= limit and (n + 1) * width <= cells
    lo, hi = 1, T
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid, _CHUNK_WORK_LIMIT, _CHUNK_CELL_LIMIT):
            lo = mid
        else:
            hi = mid - 1
    size = q if strategy in ("msm", "hsm") else a  # the smallest boundary
    chunks = max(1, (B - q) // size + 1)
    # Less slack, then more cells (up to ~850 MB of tables), before giving up on it.
    for slack, cells in ((_CHUNK_SLACK, _CHUNK_CELL_LIMIT), (2, _CHUNK_CELL_LIMIT),
                         (1, _CHUNK_CELL_LIMIT), (1, _CHUNK_CELL_HARD_LIMIT)):
        floor = min(T, -(-slack * T // chunks))
        if lo >= floor:
            break
        if fits(floor, math.inf, cells):
            lo = floor
            break
    return lo


class _ChainSearch:
    """Best chain of one boundary type (see the module docstring, "Long sequences").

    A chain with ``k`` boundaries splits the sequence into chunks ``1..k`` (left to right)
    and a tail. Chunk ``j`` is processed with budget ``b_j = B - (j - 1) c`` (``c``: the
    boundary's size), the tail with ``B - k c``. The cost is ``base + sum`` of increments:
    each chunk (and the tail) contributes the increments of its cost in its length, and
    for a fixed ``k`` the best lengths take the ``N`` smallest increments overall (exact
    for convex columns; MSM's columns dither, so each is replaced by a nondecreasing
    envelope of its increments, ``envelope="upper"`` (prefix maxima) or ``"lower"``
    (suffix minima), and the chosen lengths are re-costed exactly afterwards).
    Increments are counted in histograms, so trying every ``k`` costs ``O(V)`` each.
    """

    def __init__(self, chunks: _ChunkTables, T: int, B: int, a: int, q: int, strategy: str,
                 boundary: str, envelope: str):
        self.chunks, self.T, self.B, self.a, self.q = chunks, T, B, a, q
        self.strategy, self.boundary = strategy, boundary
        self.size = a if boundary == "i" else q
        # Chunk kinds: a chunk starts at h_0 (Q), at an internal state (Q) or at a stored
        # hidden state (D); the tail likewise.
        self.next_kind = "Q" if boundary == "i" else "D"
        # Least chunk / tail length: a hidden boundary needs >= 1 step on each side.
        self.lmin = 0 if boundary == "i" else 1
        tables = chunks.tables
        self.width = tables.width
        self.hist = {}
        self.vmax = 0
        for kind in {"Q", self.next_kind}:
            cost = tables.cost[kind].astype(np.int64)
            inc = np.diff(cost[self.lmin:], axis=0)  # rows lmin+1..nmax
            if envelope == "upper":  # prefix maxima: a convex upper bound of the column
                inc = np.maximum.accumulate(inc, axis=0)
            else:  # suffix minima: a convex lower bound
                inc = np.minimum.accumulate(inc[::-1], axis=0)[::-1]
            self.hist[kind] = np.ascontiguousarray(inc)  # per budget column, nondecreasing
            if inc.size and self.width > q:  # columns below q (no start) are never used
                self.vmax = max(self.vmax, int(inc[:, q:].max()))
        self.V = max(self.vmax, 2) + 2
        self.counted = {}  # (kind, column, shift) -> (increments, their histogram)

    def _column(self, kind: str, b: int, shift: int):
        """Sorted increments of the column ``(kind, b)``, lowered by ``shift``: the table
        part as a histogram over 0..V-1 and as sorted values, and the saturated run beyond
        the table: ``(histogram, table_part, run_value, run_count)``. The histogram leaves
        the run out (add ``run_count`` at ``run_value``) and is shared: do not modify it."""
        chunks = self.chunks
        col = min(b, self.width - 1)
        key = (kind, col, shift)
        if key not in self.counted:
            # Budgets past the table's width share its last column: at long sequences
            # nearly every chunk does, so each column is counted once.
            part = self.hist[kind][:, col] - shift
            self.counted[key] = (np.bincount(part, minlength=self.V)[:self.V]
                                 .astype(np.int64), part)
        counts, part = self.counted[key]
        run = max(0, _saturated_length(kind, b, self.a, self.q, self.strategy)
                  - chunks.nmax)
        return counts, part, chunks.low - shift, run

    def _chunk_spec(self, j: int):
        b = self.B - (j - 1) * self.size
        return ("Q" if j == 1 else self.next_kind), b

    def _tail_spec(self, k: int):
        return ("Q" if k == 0 else self.next_kind), self.B - k * self.size

    def _free(self, k: int) -> int:
        """Increments to take: steps beyond the chunks' and tail's least lengths."""
        return self.T - k * (1 if self.boundary == "i" else 0) - (k + 1) * self.lmin

    def _base(self, k: int) -> int:
        # Sweep T, plus each chunk's and the tail's cost at its least length (hidden: a
        # one-step chunk costs 1 more evaluation; a one-step tail is its own sweep).
        return self.T + (k if self.boundary == "h" else 0)

    def best(self):
        """``(model_cost, k, lengths, tail)`` of the best chain, or None."""
        k_max = (self.B - self.q) // self.size
        k_max = min(k_max, self.T if self.boundary == "i" else self.T - 1)
        if self.boundary == "h" and self.B < 2 * self.q:
            k_max = 0
        values = np.arange(self.V, dtype=np.int64)
        chunk_hist = np.zeros(self.V, np.int64)
        best = None
        for k in range(0, k_max + 1):
            if k:
                counts, _, value, run = self._column(*self._chunk_spec(k), 0)
                chunk_hist += counts
                chunk_hist[value] += run
            N = self._free(k)
            if N < 0:
                break
            counts, _, value, run = self._column(*self._tail_spec(k), 1)
            hist = chunk_hist + counts
            hist[value] += run
            cum = np.cumsum(hist)
            if cum[-1] < N:
                continue
            lam = int(np.searchsorted(cum, N))
            below = int(cum[lam - 1]) if lam else 0
            weighted = int(np.dot(values[:lam], hist[:lam])) if lam else 0
            cost = self._base(k) + weighted + lam * (N - below)
            if best is None or cost < best[0]:
                best = (cost, k, lam)
        if best is None:
            return None
        return self._allocate(*best)

    def _allocate(self, model_cost: int, k: int, lam: int):
        specs = [self._chunk_spec(j) + (0,) for j in range(1, k + 1)]
        specs.append(self._tail_spec(k) + (1,))
        less, equal = [], []
        for kind, b, shift in specs:
            _, part, value, run = self._column(kind, b, shift)
            lo = int(np.searchsorted(part, lam, "left"))
            hi = int(np.searchsorted(part, lam, "right"))
            r_less = run if value < lam else 0
            r_equal = run if value == lam else 0
            less.append(lo + r_less)
            equal.append(hi - lo + r_equal)
        remaining = self._free(k) - sum(less)
        lengths = []
        for count, extra in zip(less, equal):
            take = min(extra, remaining)
            remaining -= take
            lengths.append(self.lmin + count + take)
        assert remaining == 0
        return k, lengths[:-1], lengths[-1], specs

    def cost(self, k, lengths, tail, specs) -> int:
        """Exact cost of a chain (what its emitted plan evaluates)."""
        chunks = self.chunks
        total = self.T
        for (kind, b, _), length in zip(specs, lengths):
            total += chunks.cost(kind, length, b)
        kind, b, _ = specs[-1]
        return total + chunks.cost(kind, tail, b) - tail


def _chain_ops(T: int, B: int, a: int, q: int, strategy: str) -> np.ndarray:
    """The approximate plan for long sequences (module docstring, "Long sequences")."""
    nmax = _chunk_rows(T, B, a, q, strategy)
    width = _dp_work(nmax, B, a, q, strategy)[1]
    chunks = _ChunkTables(_Solver(nmax, a, q, strategy, width, certify=True).run(), nmax,
                          a, q, strategy)
    boundaries = {"msm": ("i", "h"), "ism": ("i",), "hsm": ("h",)}[strategy]
    best = None
    for boundary in boundaries:
        for envelope in ("upper", "lower"):
            search = _ChainSearch(chunks, T, B, a, q, strategy, boundary, envelope)
            found = search.best()
            if found is None:
                continue
            cost = search.cost(*found)
            if best is None or cost < best[0]:
                best = (cost, boundary, found)
    if best is None:
        raise ValueError(
            f"Cannot plan num_steps={T} within memory_slots={B / q:g}: the approximate "
            f"planner's tables would exceed its memory limit at so small a budget. Use a "
            f"larger budget or a shorter sequence.")
    _, boundary, (k, lengths, tail, specs) = best
    emitter = _Emitter()
    work = []
    start = 0
    for (kind, b, _), length in zip(specs, lengths):
        # First sweep: the chunk, then its right boundary (for an internal boundary, the
        # step after the chunk, whose internal state is stored).
        step = length + (1 if boundary == "i" else 0)
        emitter.advance(step)
        emitter.store(boundary)
        work.append(("seg", kind, start, length, b))
        start += step
        work.append(("bwd_free", start) if boundary == "i" else ("free_h", start))
    kind, b, _ = specs[-1]
    assert start + tail == T
    work.append(("seg", kind, start, tail, b))
    _run_work(emitter, chunks, work, a, q)
    return emitter.table()


# --------------------------------------------------------------------------------------
# Fixed baselines
# --------------------------------------------------------------------------------------
def _full_ops(T: int) -> np.ndarray:
    """Standard BPTT: store every internal state, then run every backward from memory."""
    steps = np.arange(1, T + 1)
    back = steps[::-1]
    return _table(
        _interleave(_rows(OpKind.ADVANCE, steps),
                    _rows(OpKind.STORE_INTERNAL, steps, steps, 1, steps - 1)),
        _interleave(_rows(OpKind.BACKWARD_STORED, back, back, 1, back - 1),
                    _rows(OpKind.FREE, back, back, 1, back - 1)))


def _chen_segments(T: int) -> List[Tuple[int, int]]:
    count = max(1, int(round(math.sqrt(T))))
    length = int(math.ceil(T / count))
    return [(s, min(length, T - s)) for s in range(0, T, length)]


def _chen_peak(T: int, alpha: float) -> float:
    a, q = alpha_units(alpha)
    return _count(_chen_ops(T), a, q)[1] / q


def _chen_ops(T: int) -> np.ndarray:
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
        emitter.store_run("i", length)
        emitter.backward_stored_run(length)
        if start > 0:
            emitter.free_top()
    return emitter.table()
