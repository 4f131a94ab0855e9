"""`segments.compile_plan`: the tables the executor's loops read.

A numpy executor (`_run_tables`) follows the tables literally on a toy RNN, with the two
stores' semantics: entries indexed by step (graph and eager mode), or a flat buffer at the
plan's stack offsets with a scratch area (XLA). Its gradients must equal plain BPTT's, its
evaluations the plan's count, the states it holds never more than the plan's peak, and in
the flat buffer no live state may be overwritten."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tf_membptt import plan as make_plan
from tf_membptt import segments as seg
from tf_membptt.planner import minimum_memory_slots
from tf_membptt.simulate import (_toy_backward, _toy_step,
                                 numpy_toy_rnn_reference_gradients)


class _Buffer:
    """A flat buffer of memory units (a hidden state = q units, an internal state = a):
    each unit remembers which state wrote it, so a read of a state some other write has
    overwritten fails."""

    def __init__(self, q, a):
        self.q, self.a = q, a
        self.cells = {}

    def offset(self, hidden_below, internal_below):
        return hidden_below * self.q + internal_below * self.a

    def write(self, offset, tag, width):
        for k in range(offset, offset + width):
            self.cells[k] = tag

    def check(self, offset, tag, size):
        for k in range(offset, offset + size):
            assert self.cells.get(k) == tag, (offset, tag, self.cells.get(k))


def _run_tables(plan, W, U, xs, h0, output_weights):
    """Gradients of the toy loss from `compile_plan(plan)`, with both stores' semantics."""
    s = seg.compile_plan(plan)
    a, q = plan.alpha_units
    num_steps = plan.num_steps
    buffer = _Buffer(q, a)
    width = max(a, q)
    peak_units = int(round(plan.peak_memory * q))
    scratch = peak_units  # XLA: the scratch area starts at the stack's peak
    entries = {("h", 0): h0.copy()}  # graph/eager: what the lists hold, by (kind, step)
    buffer.write(0, ("h", 0), q)
    evaluations = 0
    held_max = 0

    def held():
        return sum(q if kind == "h" else a for kind, _ in entries)

    def evaluate(step, cursor, store_kind, hidden_below, internal_below):
        nonlocal evaluations, held_max
        evaluations += 1
        h = _toy_step(W, U, cursor, xs[step - 1])
        if store_kind == seg.HIDDEN:
            entries[("h", step)] = h
            buffer.write(buffer.offset(hidden_below, internal_below), ("h", step), width)
        elif store_kind in (seg.INTERNAL, seg.WORKING):
            entries[("i", step)] = (cursor, h)
            offset = (buffer.offset(hidden_below, internal_below)
                      if store_kind == seg.INTERNAL else scratch)
            buffer.write(offset, ("i", step), width)
        else:
            buffer.write(scratch, ("nothing", step), width)
        # The working state (kind WORKING) is the game's free working set.
        counted = held() - (a if store_kind == seg.WORKING else 0)
        held_max = max(held_max, counted)
        return h

    cursor = h0.copy()
    for step in range(1, num_steps + 1):
        kind, hb, ib = s.first_sweep[step - 1]
        cursor = evaluate(step, cursor, kind, hb, ib)

    dW, dU = np.zeros_like(W), np.zeros_like(U)
    dxs = np.zeros_like(xs)
    carry = np.zeros_like(h0)

    def backward(row):
        nonlocal carry
        step, source, hb, ib = row
        h_prev, h = entries.pop(("i", step))
        buffer.check(buffer.offset(hb, ib) if source == seg.STORED else scratch,
                     ("i", step), a)
        dxs[step - 1], carry = _toy_backward(W, U, xs[step - 1], h_prev, h,
                                             output_weights[step - 1] + carry, dW, dU)

    order = []
    for k, row in enumerate(s.segments):
        kind, step, hb, ib, frees, a0, a1, b0, b1 = row
        if k == 0:
            assert kind == seg.NO_RESTORE and a1 == a0
        elif kind == seg.FROM_HIDDEN:
            cursor = entries[("h", step)]
            buffer.check(buffer.offset(hb, ib), ("h", step), q)
            if frees:
                del entries[("h", step)]
        else:
            assert kind == seg.FROM_INTERNAL and not frees
            cursor = entries[("i", step)][1]
            buffer.check(buffer.offset(hb, ib), ("i", step), a)
        for adv in s.advances[a0:a1]:
            cursor = evaluate(*([adv[0], cursor] + list(adv[1:])))
        for row_ in s.backwards[b0:b1]:
            order.append(int(row_[0]))
            backward(row_)
    assert order == list(range(num_steps, 0, -1))
    assert set(entries) == {("h", 0)}, entries  # everything but h_0 was freed
    assert evaluations == plan.forward_evals
    assert held_max <= peak_units, (held_max, peak_units)
    return dW, dU, dxs, carry


def _check(plan, seed=0):
    rng = np.random.default_rng(seed)
    hidden, features = 3, 2
    W = rng.standard_normal((hidden, hidden)) * 0.5
    U = rng.standard_normal((hidden, features))
    xs = rng.standard_normal((plan.num_steps, features))
    h0 = rng.standard_normal(hidden)
    output_weights = rng.standard_normal((plan.num_steps, hidden))
    expected = numpy_toy_rnn_reference_gradients(W, U, xs, h0, output_weights)
    dW, dU, dxs, dh0 = _run_tables(plan, W, U, xs, h0, output_weights)
    for got, want in ((dW, expected.dW), (dU, expected.dU), (dxs, expected.dxs),
                      (dh0, expected.dh0)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["msm", "hsm", "ism"])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 13, 40])
@pytest.mark.parametrize("slots", [1, 2, 3, 5, 9, 30, 200])
@pytest.mark.parametrize("alpha", [1.0, 2.5, 3.0])
def test_tables_give_bptt_gradients_within_the_plan(strategy, num_steps, slots, alpha):
    _check(make_plan(num_steps, slots, strategy=strategy, alpha=alpha))


@pytest.mark.parametrize("strategy", ["full", "chen"])
@pytest.mark.parametrize("num_steps", [1, 2, 5, 17, 50])
def test_tables_of_the_baselines(strategy, num_steps):
    alpha = 3.0
    _check(make_plan(num_steps, minimum_memory_slots(num_steps, strategy, alpha),
                     strategy=strategy, alpha=alpha))


@settings(max_examples=60, deadline=None)
@given(num_steps=st.integers(1, 120), fraction=st.floats(0.0, 1.2),
       strategy=st.sampled_from(["msm", "hsm", "ism"]),
       alpha=st.sampled_from([1.0, 1.5, 2.0, 3.0, 4.5]), seed=st.integers(0, 100))
def test_tables_property(num_steps, fraction, strategy, alpha, seed):
    slots = max(1.0, np.floor(fraction * alpha * num_steps))
    _check(make_plan(num_steps, slots, strategy=strategy, alpha=alpha), seed)


def test_segments_of_the_lower_bound_schedule():
    """At 5% (T = 1000, alpha 3: 150 slots) the optimal schedule stores 49 internal states
    in the first sweep as chunk boundaries and recomputes each chunk once, storing its
    internal states: 950 recomputed steps in chunks of 50, 49, ..., 26 (the last 24
    boundaries are adjacent, their chunks empty). So segment 0 runs the backwards of step T
    and of those 24 boundaries plus the next one; then one segment per chunk, restarting
    from the boundary below it (an internal state; h_0 for the first chunk)."""
    the_plan = make_plan(1000, 150, strategy="msm", alpha=3.0)
    s = seg.compile_plan(the_plan)
    assert the_plan.forward_evals == 1950
    assert np.sum(s.first_sweep[:, 0] == seg.INTERNAL) == 49
    assert len(s.segments) == 26
    assert s.segments[0, 8] - s.segments[0, 7] == 26
    assert s.segments[1:-1, 0].tolist() == [seg.FROM_INTERNAL] * 24
    assert s.segments[-1, 0] == seg.FROM_HIDDEN and s.segments[-1, 1] == 0
    runs = (s.segments[1:, 6] - s.segments[1:, 5]).tolist()
    assert sorted(runs) == list(range(26, 51))
    assert len(s.advances) == 950 and s.max_advances == 50
    # Every later evaluation stores its internal state (the chunk's last one as working).
    assert set(s.advances[:, 1]) == {seg.INTERNAL, seg.WORKING}
    _check(the_plan)


def test_a_state_stored_and_never_read_is_not_stored():
    """hsm with memory for every hidden state stores h_1..h_{T-1}, but h_{T-1} is never
    restored (step T is evaluated in the first sweep): the tables do not store it."""
    the_plan = make_plan(5, 20, strategy="hsm", alpha=2.0)
    s = seg.compile_plan(the_plan)
    assert s.first_sweep[:, 0].tolist() == [seg.HIDDEN] * 3 + [seg.NOTHING, seg.WORKING]
    _check(the_plan)
