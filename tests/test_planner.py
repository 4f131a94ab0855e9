"""Tests of the planner against ground truth: the shared exhaustive-search tables, an
exhaustive search written here, Revolve's closed form, the paper's headline, and the
simulator / numpy toy RNN that run every plan's ops.

Conventions (the checkpointing game) are those of shared/checkpointing-game.md; the tables
below are copied from it as literals (CI has no shared/ folder beside the repository).
"""

import collections
import dataclasses
import importlib.util
import math
import pathlib
import pickle
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tf_membptt.planner as planner_module
from tf_membptt import Op, OpKind, plan
from tf_membptt.planner import minimum_memory_slots
from tf_membptt.simulate import (ScheduleError, numpy_toy_rnn_gradients,
                                 numpy_toy_rnn_reference_gradients, simulate)

# --------------------------------------------------------------------------------------
# Ground truth copied from shared/checkpointing-game.md: optimal cost (forward evaluations)
# by exhaustive search; rows t = 1..8, columns m = 1..8.
# --------------------------------------------------------------------------------------
SHARED_TABLES = {
    ("hsm", 2): [
        [1, 1, 1, 1, 1, 1, 1, 1],  # t=1
        [3, 3, 3, 3, 3, 3, 3, 3],  # t=2
        [6, 5, 5, 5, 5, 5, 5, 5],  # t=3
        [10, 8, 7, 7, 7, 7, 7, 7],  # t=4
        [15, 11, 10, 9, 9, 9, 9, 9],  # t=5
        [21, 14, 13, 12, 11, 11, 11, 11],  # t=6
        [28, 18, 16, 15, 14, 13, 13, 13],  # t=7
        [36, 22, 19, 18, 17, 16, 15, 15],  # t=8
    ],
    ("ism", 2): [
        [1, 1, 1, 1, 1, 1, 1, 1],  # t=1
        [3, 3, 2, 2, 2, 2, 2, 2],  # t=2
        [6, 6, 4, 4, 3, 3, 3, 3],  # t=3
        [10, 10, 6, 6, 5, 5, 4, 4],  # t=4
        [15, 15, 8, 8, 7, 7, 6, 6],  # t=5
        [21, 21, 11, 11, 9, 9, 8, 8],  # t=6
        [28, 28, 14, 14, 11, 11, 10, 10],  # t=7
        [36, 36, 17, 17, 13, 13, 12, 12],  # t=8
    ],
    ("msm", 2): [
        [1, 1, 1, 1, 1, 1, 1, 1],  # t=1
        [3, 3, 2, 2, 2, 2, 2, 2],  # t=2
        [6, 5, 4, 4, 3, 3, 3, 3],  # t=3
        [10, 8, 6, 6, 5, 5, 4, 4],  # t=4
        [15, 11, 8, 8, 7, 7, 6, 6],  # t=5
        [21, 14, 11, 10, 9, 9, 8, 8],  # t=6
        [28, 18, 14, 12, 11, 11, 10, 10],  # t=7
        [36, 22, 17, 15, 13, 13, 12, 12],  # t=8
    ],
    ("hsm", 3): [
        [1, 1, 1, 1, 1, 1, 1, 1],  # t=1
        [3, 3, 3, 3, 3, 3, 3, 3],  # t=2
        [6, 5, 5, 5, 5, 5, 5, 5],  # t=3
        [10, 8, 7, 7, 7, 7, 7, 7],  # t=4
        [15, 11, 10, 9, 9, 9, 9, 9],  # t=5
        [21, 14, 13, 12, 11, 11, 11, 11],  # t=6
        [28, 18, 16, 15, 14, 13, 13, 13],  # t=7
        [36, 22, 19, 18, 17, 16, 15, 15],  # t=8
    ],
    ("ism", 3): [
        [1, 1, 1, 1, 1, 1, 1, 1],  # t=1
        [3, 3, 3, 2, 2, 2, 2, 2],  # t=2
        [6, 6, 6, 4, 4, 4, 3, 3],  # t=3
        [10, 10, 10, 6, 6, 6, 5, 5],  # t=4
        [15, 15, 15, 8, 8, 8, 7, 7],  # t=5
        [21, 21, 21, 11, 11, 11, 9, 9],  # t=6
        [28, 28, 28, 14, 14, 14, 11, 11],  # t=7
        [36, 36, 36, 17, 17, 17, 13, 13],  # t=8
    ],
    ("msm", 3): [
        [1, 1, 1, 1, 1, 1, 1, 1],  # t=1
        [3, 3, 3, 2, 2, 2, 2, 2],  # t=2
        [6, 5, 5, 4, 4, 4, 3, 3],  # t=3
        [10, 8, 7, 6, 6, 6, 5, 5],  # t=4
        [15, 11, 10, 8, 8, 8, 7, 7],  # t=5
        [21, 14, 13, 11, 10, 10, 9, 9],  # t=6
        [28, 18, 16, 13, 12, 12, 11, 11],  # t=7
        [36, 22, 19, 16, 15, 14, 13, 13],  # t=8
    ],
}

TABLE_CASES = [(strategy, alpha, t, m, row[m - 1])
               for (strategy, alpha), rows in SHARED_TABLES.items()
               for t, row in enumerate(rows, start=1)
               for m in range(1, len(row) + 1)]


# --------------------------------------------------------------------------------------
# Exhaustive search over all move sequences of the game
# --------------------------------------------------------------------------------------
def optimal_cost_by_search(num_steps, memory_slots, strategy, alpha):
    """Least number of forward evaluations over all move sequences of the game.

    A 0-1 breadth-first search (evaluations cost 1, every other move 0) over states
    ``(cursor, next_backward, stored hidden states, stored internal states)``; the stored
    sets are bitmasks over steps (bit j = h_j or I_j; h_0 is always held and not in them).

    Moves, as in shared/checkpointing-game.md:
      * evaluate the step after the cursor (cost 1), then optionally store its h or its I
        if the memory fits, or run its backward right away if it is the next backward step;
      * restore the cursor from h_0 or any stored state (an I_j restores h_j too);
      * free any stored state (never h_0);
      * run the next backward step k from a stored I_k.
    Memory: 1 (h_0) + stored hidden states + alpha * stored internal states <= m.

    Two reductions keep the search small without losing optimality: states that can never be
    used again are freed (h_j, j >= k, and I_j, j > k, once backward steps above k are done:
    they only lead to steps whose backward already ran), and evaluating a step beyond the
    next backward step is not generated (its result can never be used).
    """
    store_hidden = strategy in ("hsm", "msm")
    store_internal = strategy in ("ism", "msm")
    limit = memory_slots + 1e-9
    unreachable = 1 << 60

    def memory(hidden_mask, internal_mask):
        return 1 + bin(hidden_mask).count("1") + alpha * bin(internal_mask).count("1")

    def after_backward(cursor, next_backward, hidden_mask, internal_mask):
        hidden_mask &= (1 << next_backward) - 1  # keep h_j for j < next_backward
        internal_mask &= (1 << (next_backward + 1)) - 1  # keep I_j for j <= next_backward
        if cursor >= next_backward:
            cursor = -1  # no use: the cursor must be restored before it is useful again
        return cursor, next_backward, hidden_mask, internal_mask

    start = (0, num_steps, 0, 0)
    best = {start: 0}
    queue = collections.deque([(0, start)])
    while queue:
        cost, state = queue.popleft()
        if best.get(state, unreachable) < cost:
            continue
        cursor, next_backward, hidden_mask, internal_mask = state
        if next_backward == 0:
            return cost
        used = memory(hidden_mask, internal_mask)
        free_moves, evaluation_moves = [], []
        if 0 <= cursor < next_backward:
            step = cursor + 1
            evaluation_moves.append((step, next_backward, hidden_mask, internal_mask))
            if store_hidden and used + 1 <= limit:
                evaluation_moves.append(
                    (step, next_backward, hidden_mask | 1 << step, internal_mask))
            if store_internal and used + alpha <= limit:
                evaluation_moves.append(
                    (step, next_backward, hidden_mask, internal_mask | 1 << step))
            if step == next_backward:
                evaluation_moves.append(
                    after_backward(step, next_backward - 1, hidden_mask, internal_mask))
        if internal_mask >> next_backward & 1:
            free_moves.append(after_backward(cursor, next_backward - 1, hidden_mask,
                                             internal_mask & ~(1 << next_backward)))
        free_moves.append((0, next_backward, hidden_mask, internal_mask))  # restore h_0
        for step in range(1, next_backward + 1):
            if hidden_mask >> step & 1:
                free_moves.append((step, next_backward, hidden_mask, internal_mask))
                free_moves.append(
                    (cursor, next_backward, hidden_mask & ~(1 << step), internal_mask))
            if internal_mask >> step & 1:
                free_moves.append((step, next_backward, hidden_mask, internal_mask))
                free_moves.append(
                    (cursor, next_backward, hidden_mask, internal_mask & ~(1 << step)))
        for successor in free_moves:
            if cost < best.get(successor, unreachable):
                best[successor] = cost
                queue.appendleft((cost, successor))
        for successor in evaluation_moves:
            if cost + 1 < best.get(successor, unreachable):
                best[successor] = cost + 1
                queue.append((cost + 1, successor))
    raise AssertionError(f"no schedule for t={num_steps}, m={memory_slots}")


def test_search_reproduces_every_shared_table_entry():
    # Self-check of the search: it must agree with the independent search behind the
    # shared tables before it can be trusted as ground truth for other alphas.
    mismatches = [(s, a, t, m, expected, optimal_cost_by_search(t, m, s, a))
                  for s, a, t, m, expected in TABLE_CASES
                  if optimal_cost_by_search(t, m, s, a) != expected]
    assert mismatches == []


@pytest.mark.parametrize("strategy,alpha,t,m,expected", TABLE_CASES)
def test_plan_matches_shared_tables(strategy, alpha, t, m, expected):
    assert plan(t, m, strategy=strategy, alpha=alpha).forward_evals == expected


@pytest.mark.parametrize("strategy", ["hsm", "ism", "msm"])
@pytest.mark.parametrize("alpha", [1, 1.5, 2.5, 4])
def test_plan_is_optimal_against_exhaustive_search(strategy, alpha):
    mismatches = []
    for t in range(1, 8):
        for m in [1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8]:
            expected = optimal_cost_by_search(t, m, strategy, alpha)
            got = plan(t, m, strategy=strategy, alpha=alpha).forward_evals
            if got != expected:
                mismatches.append((t, m, got, expected))
    assert mismatches == []


def test_paper_recurrence_gap_case():
    # The paper's MSM recurrence gives 14 here; freeing a segment's start after its last
    # restore gives 13 (shared doc, "Checks that anchor the numbers").
    result = plan(7, 4, strategy="msm", alpha=3)
    assert result.forward_evals == 13
    assert optimal_cost_by_search(7, 4, "msm", 3) == 13
    simulate(result)


# --------------------------------------------------------------------------------------
# HSM = Revolve (Griewank's binomial checkpointing)
# --------------------------------------------------------------------------------------
def revolve_cost(num_steps, memory_slots):
    """Shared doc: s = m checkpoints (h_0 is one of them), r = min{r : C(s+r, s) >= t},
    advances = r*t - C(s+r, s+1), HSM cost = advances + t."""
    s = memory_slots
    r = 0
    while math.comb(s + r, s) < num_steps:
        r += 1
    return r * num_steps - math.comb(s + r, s + 1) + num_steps


def test_revolve_formula_matches_shared_hsm_table():
    # Checks the formula as written (s = m, h_0 counted) before using it as a reference.
    for t, row in enumerate(SHARED_TABLES[("hsm", 2)], start=1):
        assert [revolve_cost(t, m) for m in range(1, 9)] == row


def test_hsm_equals_revolve_small_sequences_all_budgets():
    mismatches = [(t, m) for t in range(1, 31) for m in range(1, 51)
                  if plan(t, m, strategy="hsm").forward_evals != revolve_cost(t, m)]
    assert mismatches == []


def test_hsm_equals_revolve_long_sequences_sampled():
    rng = random.Random(2016)
    cases = [(2000, m) for m in (2, 3, 4, 5, 7, 10, 15, 22, 33, 50)]
    cases += [(rng.randint(31, 2000), rng.randint(2, 50)) for _ in range(15)]
    mismatches = [(t, m) for t, m in cases
                  if plan(t, m, strategy="hsm").forward_evals != revolve_cost(t, m)]
    assert mismatches == []


def _hsm_revolve_mismatches(cases):
    return [(t, m) for t, m in cases
            if plan(t, m, strategy="hsm").forward_evals != revolve_cost(t, m)]


def test_hsm_equals_revolve_every_budget_and_a_seventh_of_the_grid():
    # Every budget at t = 2000 and, for t = 31..150 and m = 1..50, the (t, m) with
    # t + m divisible by 7 (every t with 7 or 8 budgets, every m with 17 or 18 lengths), and
    # both of hsm's routes below t = 150 are taken (store every hidden state: 30 cases; the
    # DP: 827). About 25 s on 2 cores; the whole grid is the `slow` test below (85 s).
    cases = [(2000, m) for m in range(1, 51)]
    cases += [(t, m) for t in range(31, 151) for m in range(1, 51) if (t + m) % 7 == 0]
    assert _hsm_revolve_mismatches(cases) == []


@pytest.mark.slow
def test_hsm_equals_revolve_full_grid():
    # Every (t, m) for t = 31..150, m = 1..50.
    cases = [(t, m) for t in range(31, 151) for m in range(1, 51)]
    assert _hsm_revolve_mismatches(cases) == []


# --------------------------------------------------------------------------------------
# The paper's headline: 95% of memory saved for one third more time
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [2, 3, 4])
def test_headline_five_percent_budget(alpha):
    result = plan(1000, math.floor(0.05 * alpha * 1000), strategy="msm", alpha=alpha)
    assert result.forward_evals_per_step <= 1.950
    assert result.time_ratio() <= 1.317
    assert result.peak_memory <= 0.05 * alpha * 1000
    simulate(result)


# --------------------------------------------------------------------------------------
# Properties over random problems: every plan runs, gives BPTT's gradients, and the
# strategies and budgets compare as they must
# --------------------------------------------------------------------------------------
ALPHAS = [1, 1.5, 2, 2.5, 3, 4]
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, strategies=("msm", "hsm", "ism", "full", "chen")):
    strategy = draw(st.sampled_from(strategies))
    alpha = draw(st.sampled_from(ALPHAS))
    num_steps = draw(st.integers(1, 40))
    minimum = minimum_memory_slots(num_steps, strategy, alpha)
    # Budgets in quarter slots from the minimum up to past standard BPTT's memory.
    extra_quarters = draw(st.integers(0, int(4 * (alpha * num_steps + 2))))
    return strategy, alpha, num_steps, minimum + extra_quarters / 4


def toy_problem(num_steps, seed):
    rng = np.random.default_rng(seed)
    hidden, inputs = 4, 3
    return dict(W=rng.normal(scale=0.6, size=(hidden, hidden)),
                U=rng.normal(size=(hidden, inputs)),
                xs=rng.normal(size=(num_steps, inputs)),
                h0=rng.normal(size=hidden),
                output_weights=rng.normal(size=(num_steps, hidden)),
                final_state_grad=rng.normal(size=hidden))


def assert_same_gradients(got, expected):
    for name, a, b in zip(got._fields, got, expected):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10, err_msg=name)


@PROPERTY_SETTINGS
@given(problems())
def test_every_plan_simulates_and_gives_bptt_gradients(problem):
    strategy, alpha, num_steps, memory_slots = problem
    result = plan(num_steps, memory_slots, strategy=strategy, alpha=alpha)
    simulation = simulate(result)
    assert simulation.forward_evals == result.forward_evals
    assert simulation.backward_order == tuple(range(num_steps, 0, -1))
    # The plan's own counts (from its table's stores) agree with the replay.
    assert (result.max_hidden_stored, result.max_internal_stored) == (
        simulation.max_hidden_stored, simulation.max_internal_stored)
    assert result.peak_memory <= memory_slots + 1e-9
    toy = toy_problem(num_steps, seed=num_steps)
    assert_same_gradients(numpy_toy_rnn_gradients(result, **toy),
                          numpy_toy_rnn_reference_gradients(**toy))


@PROPERTY_SETTINGS
@given(problems(strategies=("msm",)))
def test_msm_never_worse_than_hsm_or_ism(problem):
    _, alpha, num_steps, memory_slots = problem
    costs = {s: plan(num_steps, memory_slots, strategy=s, alpha=alpha).forward_evals
             for s in ("msm", "hsm", "ism")}
    assert costs["msm"] <= min(costs["hsm"], costs["ism"])


@PROPERTY_SETTINGS
@given(problems(strategies=("msm", "hsm", "ism")), st.integers(1, 8))
def test_cost_nonincreasing_in_budget(problem, extra_quarters):
    strategy, alpha, num_steps, memory_slots = problem
    smaller = plan(num_steps, memory_slots, strategy=strategy, alpha=alpha)
    larger = plan(num_steps, memory_slots + extra_quarters / 4, strategy=strategy, alpha=alpha)
    assert larger.forward_evals <= smaller.forward_evals


def test_long_plan_gives_bptt_gradients():
    # A longer sequence than the property tests, at the headline's 5% budget.
    result = plan(300, 30, strategy="msm", alpha=2)
    simulate(result)
    toy = toy_problem(300, seed=7)
    assert_same_gradients(numpy_toy_rnn_gradients(result, **toy),
                          numpy_toy_rnn_reference_gradients(**toy))


def test_approximate_dp_gives_valid_upper_bound(monkeypatch):
    # Force the approximate DP (used when the exact one is too much work) on a sequence
    # long enough that it skips split points; it must still be a valid schedule.
    exact = plan(300, 40, strategy="msm", alpha=2.5)
    planner_module._cached_plan.cache_clear()
    monkeypatch.setattr(planner_module, "_EXACT_WORK_LIMIT", 0)
    try:
        approximate = plan(300, 40, strategy="msm", alpha=2.5)
    finally:
        planner_module._cached_plan.cache_clear()
    bound = planner_module._lower_bound(300, 80, 5, 2, "msm")  # alpha 2.5 = 5/2 units
    assert approximate.method == ("exact" if approximate.forward_evals == bound
                                  else "approximate")
    assert exact.method == "exact"
    assert approximate.forward_evals >= exact.forward_evals
    simulate(approximate)


def test_full_plan_fits_its_minimum_budget_for_unrepresentable_alpha():
    result = plan(3, minimum_memory_slots(3, "full", 1.3), strategy="full", alpha=1.3)
    assert result.peak_memory <= result.memory_slots
    simulate(result)


# --------------------------------------------------------------------------------------
# The simulator and the toy executor catch broken schedules
# --------------------------------------------------------------------------------------
@pytest.fixture
def valid_plan():
    # msm at a budget where it stores hidden and internal states and frees segment starts.
    result = plan(7, 4, strategy="msm", alpha=3)
    kinds = {op.kind for op in result.ops}
    assert {OpKind.STORE_HIDDEN, OpKind.STORE_INTERNAL, OpKind.RESTORE, OpKind.FREE,
            OpKind.BACKWARD_STORED, OpKind.BACKWARD_CURSOR} <= kinds
    return result


def with_ops(result, ops, **changes):
    return dataclasses.replace(result, table=ops, **changes)


def first_index(ops, kind):
    return next(i for i, op in enumerate(ops) if op.kind == kind)


def test_simulate_counts_valid_plan(valid_plan):
    simulation = simulate(valid_plan)
    assert simulation.forward_evals == 13
    assert simulation.backward_order == (7, 6, 5, 4, 3, 2, 1)
    assert simulation.peak_memory == valid_plan.peak_memory <= 4


def test_simulate_rejects_missing_store(valid_plan):
    ops = list(valid_plan.ops)
    del ops[first_index(ops, OpKind.STORE_INTERNAL)]
    with pytest.raises(ScheduleError):
        simulate(with_ops(valid_plan, ops))


def test_simulate_rejects_backward_out_of_order():
    result = plan(3, 10, strategy="full", alpha=2)
    ops = list(result.ops)
    backward = [i for i, op in enumerate(ops) if op.kind == OpKind.BACKWARD_STORED]
    ops[backward[0]], ops[backward[1]] = ops[backward[1]], ops[backward[0]]
    with pytest.raises(ScheduleError, match="next backward step is 3"):
        simulate(with_ops(result, ops))


def test_simulate_rejects_memory_overrun(valid_plan):
    with pytest.raises(ScheduleError, match="exceeds memory_slots=3"):
        simulate(dataclasses.replace(valid_plan, memory_slots=3))


def test_simulate_rejects_freeing_h0():
    result = plan(2, 1, strategy="msm")
    ops = list(result.ops) + [Op(OpKind.FREE, 0, 0, 0, 0)]
    with pytest.raises(ScheduleError, match="h_0"):
        simulate(with_ops(result, ops))


def test_simulate_rejects_backward_cursor_after_restore():
    # Triangle plan (m = 1): restore h_0, advance, backward. Dropping the last ADVANCE
    # leaves a backward with no just-evaluated internal state.
    result = plan(2, 1, strategy="msm")
    ops = list(result.ops)
    last_advance = max(i for i, op in enumerate(ops) if op.kind == OpKind.ADVANCE)
    del ops[last_advance]
    with pytest.raises(ScheduleError, match="just evaluated"):
        simulate(with_ops(result, ops, forward_evals=result.forward_evals - 1))


def test_simulate_rejects_wrong_stack_counts(valid_plan):
    ops = list(valid_plan.ops)
    index = first_index(ops, OpKind.STORE_INTERNAL)
    ops[index] = ops[index]._replace(hidden_below=ops[index].hidden_below + 1)
    with pytest.raises(ScheduleError, match="hidden_below"):
        simulate(with_ops(valid_plan, ops))


def test_simulate_rejects_wrong_cost(valid_plan):
    with pytest.raises(ScheduleError, match="forward_evals=12"):
        simulate(dataclasses.replace(valid_plan, forward_evals=12))


def test_simulate_rejects_repeated_first_sweep():
    # Re-evaluating a step before the first backward breaks the first-sweep rule.
    result = plan(2, 10, strategy="full", alpha=2)
    ops = list(result.ops)
    start = first_index(ops, OpKind.BACKWARD_STORED)
    extra = [Op(OpKind.RESTORE, 0, 0, 0, 0), Op(OpKind.ADVANCE, 1)]
    with pytest.raises(ScheduleError, match="first sweep"):
        simulate(with_ops(result, ops[:start] + extra + ops[start:],
                          forward_evals=result.forward_evals + 1))


def test_toy_gradients_detect_reordered_backward():
    # The toy executor does not trust the schedule: swapping two backward steps gives
    # different (wrong) gradients.
    # Full BPTT ops end with: backward(I3) free(I3) backward(I2) free(I2) backward(I1)
    # free(I1). Running backward(I2) first reads only slots that hold what they claim.
    result = plan(3, 10, strategy="full", alpha=2)
    ops = list(result.ops)
    first = first_index(ops, OpKind.BACKWARD_STORED)
    backward_3, free_3, backward_2, free_2 = ops[first:first + 4]
    assert (backward_3.step, backward_2.step) == (3, 2)
    ops[first:first + 4] = [backward_2, backward_3, free_3, free_2]
    reordered = with_ops(result, ops)
    with pytest.raises(ScheduleError, match="next backward step is 3"):
        simulate(reordered)
    toy = toy_problem(3, seed=0)
    wrong = numpy_toy_rnn_gradients(reordered, **toy)
    reference = numpy_toy_rnn_reference_gradients(**toy)
    assert not np.allclose(wrong.dW, reference.dW, atol=1e-6)
    assert_same_gradients(numpy_toy_rnn_gradients(result, **toy), reference)


# --------------------------------------------------------------------------------------
# Input validation and the Plan value
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,pattern", [
    (dict(num_steps=0), r"`num_steps`.*Received: num_steps=0"),
    (dict(num_steps=True), r"`num_steps`.*Received: num_steps=True"),
    (dict(num_steps=2.5), r"`num_steps`.*Received: num_steps=2\.5"),
    (dict(memory_slots=float("nan")), r"`memory_slots`.*Received: memory_slots=nan"),
    (dict(memory_slots=float("inf")), r"`memory_slots`.*Received: memory_slots=inf"),
    (dict(memory_slots=0.5), r"`memory_slots`.*minimum.*Received: memory_slots=0\.5"),
    (dict(alpha=0.9), r"`alpha`.*Received: alpha=0\.9"),
    (dict(strategy="foo"), r"`strategy`.*Received: strategy='foo'"),
])
def test_invalid_arguments_are_named(kwargs, pattern):
    arguments = dict(num_steps=10, memory_slots=5, strategy="msm", alpha=2)
    arguments.update(kwargs)
    num_steps = arguments.pop("num_steps")
    memory_slots = arguments.pop("memory_slots")
    with pytest.raises(ValueError, match=pattern):
        plan(num_steps, memory_slots, **arguments)


def test_full_below_minimum_names_the_minimum():
    with pytest.raises(ValueError, match=r"memory_slots=21\b.*Received: memory_slots=20"):
        plan(10, 20, strategy="full", alpha=2)
    assert plan(10, 21, strategy="full", alpha=2).forward_evals == 10


def test_plan_is_hashable_immutable_and_cached():
    first = plan(50, 12, strategy="msm", alpha=2)
    assert plan(50, 12, strategy="msm", alpha=2) is first
    assert len({first, plan(50, 12, strategy="msm", alpha=2), plan(50, 13)}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.forward_evals = 0


def test_plan_holds_a_read_only_op_table():
    first = plan(50, 12, strategy="msm", alpha=2)
    table = first.op_table()
    assert table is first.table and table is first.op_table()  # no copy
    assert table.dtype == np.int32 and table.shape == (len(first.ops), 5)
    assert not table.flags.writeable
    with pytest.raises(ValueError):
        table[0, 1] = 7
    # `ops` is made from the table once, and says the same.
    assert first.ops is first.ops
    assert all(isinstance(op.kind, OpKind) for op in first.ops)
    assert np.array_equal(np.asarray(first.ops, np.int32), table)
    assert "table" not in repr(first) and "[[" not in repr(first)


def test_plans_compare_by_value_including_the_table():
    first = plan(50, 12, strategy="msm", alpha=2)
    rebuilt = dataclasses.replace(first, table=list(first.ops))  # from Op records
    assert rebuilt is not first and rebuilt == first and hash(rebuilt) == hash(first)
    assert rebuilt.table.flags.writeable is False
    changed = first.op_table().copy()
    changed[-1, 1] += 1
    assert dataclasses.replace(first, table=changed) != first
    assert dataclasses.replace(first, method="approximate") != first
    assert first != "a plan"
    copied = pickle.loads(pickle.dumps(first))
    assert copied == first and not copied.table.flags.writeable
    with pytest.raises(ValueError, match=r"shape \(num_ops, 5\)"):
        dataclasses.replace(first, table=np.zeros((3, 4), np.int32))


def test_describe_contains_key_numbers():
    result = plan(1000, 100, strategy="msm", alpha=2)
    text = result.describe()
    assert 99 <= result.peak_memory <= 100
    for expected in ("msm", "T=1000", "memory_slots=100", "alpha=2", "1950",
                     "1.950 per step", f"{100 * result.peak_memory / 2000:.2f}%", "1.317"):
        assert expected in text, expected


def test_planner_modules_do_not_import_tensorflow():
    code = textwrap.dedent("""
        import sys
        import tf_membptt.planner, tf_membptt.simulate, tf_membptt.schedule
        heavy = sorted(name for name in sys.modules
                       if name.split(".")[0] in ("tensorflow", "keras"))
        print(heavy)
    """)
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert output.strip() == "[]"


def test_direct_lower_bound_schedules_equal_the_dp_optimum():
    """Where `plan` builds the O(T) schedule that meets the lower bound, its cost is the
    exact DP's optimum, and the schedule is valid (small cases, against `_solve`)."""
    checked = 0
    for strategy in ("msm", "ism"):
        for alpha in (1.0, 2.0, 2.5):
            a, q = planner_module.alpha_units(alpha)
            for T in range(2, 21):
                for m in range(2, 26):
                    budget = m * q
                    if planner_module._boundary_chunks(T, budget, a, q, strategy) is None:
                        continue
                    result = plan(T, m, strategy=strategy, alpha=alpha)
                    tables, _ = planner_module._solve(T, budget, a, q, strategy)
                    optimum = int(tables.cost["Q"][T, min(budget, tables.width - 1)])
                    assert result.forward_evals == optimum, (strategy, alpha, T, m)
                    assert result.forward_evals == planner_module._lower_bound(
                        T, budget, a, q, strategy)
                    simulate(result)
                    checked += 1
    assert checked > 500


# --------------------------------------------------------------------------------------
# Frozen plans: faster emission must not change a single op or cost
# --------------------------------------------------------------------------------------
# Written by tests/data/make_frozen_plans.py (see its docstring for the grid), which also
# plans each case here as it did there (`plan_case`).
FROZEN_PLANS = pathlib.Path(__file__).parent / "data" / "frozen_plans.npz"
_spec = importlib.util.spec_from_file_location("make_frozen_plans",
                                               FROZEN_PLANS.with_name("make_frozen_plans.py"))
frozen_plans = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(frozen_plans)


@pytest.fixture(scope="module")
def frozen():
    with np.load(FROZEN_PLANS) as data:
        return {name: data[name] for name in data.files}


def _frozen_case(row):
    T, memory_slots, strategy, alpha = row[:4]
    return int(T), float(memory_slots), frozen_plans.STRATEGIES[int(strategy)], float(alpha)


def _same_costs(result, forward_evals, peak_memory, method):
    return (result.forward_evals, result.peak_memory, result.method) == (
        int(forward_evals), peak_memory, frozen_plans.METHODS[int(method)])


@pytest.mark.parametrize("runs", ["runs_from_32_steps", "every_run"])
@pytest.mark.parametrize("mode", [0, 1, 2],
                         ids=["default_routes", "chained", "chained_saturated"])
def test_op_tables_equal_the_frozen_ones(frozen, mode, runs, monkeypatch):
    if runs == "every_run":
        # The emitter builds runs as numpy blocks from `_RUN_ROWS` steps on, and op by op
        # below: both must give the frozen ops (every third default case, for time).
        monkeypatch.setattr(planner_module, "_RUN_ROWS", 1)
    cases, costs, offsets = frozen["cases"], frozen["costs"], frozen["offsets"]
    rows = frozen["columns"].T
    checked = 0
    indices = np.flatnonzero(cases[:, 4] == mode)
    if runs == "every_run" and mode == 0:
        indices = indices[::3]
    for index in indices:
        case = _frozen_case(cases[index])
        result = frozen_plans.plan_case(*case, mode)
        expected = rows[offsets[index]:offsets[index + 1]]
        table = result.op_table()
        if not (table.shape == expected.shape and np.array_equal(table, expected)):
            differ = np.flatnonzero((table[:len(expected)] != expected[:len(table)]).any(1))
            first = int(differ[0]) if differ.size else min(len(table), len(expected))
            pytest.fail(f"{case}: {len(table)} ops vs {len(expected)} frozen; first "
                        f"difference at op #{first}")
        assert _same_costs(result, *costs[index]), case
        checked += 1
    assert checked > {0: 4000 if runs == "runs_from_32_steps" else 1300, 1: 100, 2: 40}[mode]


def _digest_params():
    with np.load(FROZEN_PLANS) as data:
        cases = data["digest_cases"]
    return [pytest.param(index, id="T={}-m={:g}-{}-alpha={:g}".format(*_frozen_case(row)),
                         marks=[pytest.mark.slow] if row[4] else [])
            for index, row in enumerate(cases)]


@pytest.mark.parametrize("index", _digest_params())
def test_long_op_tables_equal_the_frozen_digests(frozen, index):
    row = frozen["digest_cases"][index]
    case = _frozen_case(row)
    result = frozen_plans.plan_case(*case)
    assert frozen_plans.table_digest(result.op_table()) == frozen["digests"][index], case
    assert _same_costs(result, *row[5:8]), case
