"""`MemoryEfficientRNN` against `keras.layers.RNN(cell)` on the same cell: outputs and the
gradients of inputs, initial state and every trainable weight agree within 1e-5 (float32),
for every cell kind, mask, direction, output mode and strategy, any T and budget."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layer_helpers import CELL_KINDS, assert_all_close, restores_h0, run_parity

_LENGTHS = st.one_of(st.integers(1, 6), st.integers(7, 24), st.integers(1, 12),
                     st.integers(25, 300))
_BUDGETS = st.one_of(st.sampled_from(["slots:1", "slots:2", "slots:3", "slots:5", "slots:9"]),
                     st.floats(0.02, 1.0), st.just(1.0), st.just(0.05))


@st.composite
def _cases(draw):
    strategy = draw(st.sampled_from(["msm", "msm", "hsm", "ism", "full", "chen"]))
    budget = None if strategy in ("full", "chen") else draw(_BUDGETS)
    init = draw(st.sampled_from([None, "zeros", "random"]))
    return dict(
        cell_kind=draw(st.sampled_from(CELL_KINDS)),
        num_steps=draw(_LENGTHS),
        budget=budget,
        strategy=strategy,
        mask_kind=draw(st.sampled_from([None, "end", "middle"])),
        init=init,
        go_backwards=draw(st.booleans()),
        return_sequences=draw(st.booleans()),
        return_state=draw(st.booleans()),
        zero_output_for_mask=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 16)),
    )


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=_cases())
def test_parity_property_graph(case):
    num_steps, budget = case["num_steps"], case["budget"]
    try:
        expected, actual, layer = run_parity(mode="graph", **case)
    except ValueError as error:
        # Only a fraction that floors below one slot may be refused (the budget never
        # rounds up); the message names the argument and the value.
        assert isinstance(budget, float), error
        assert "memory_budget" in str(error) and repr(budget) in str(error), error
        assert "minimum is 1 slots" in str(error), error
        return
    plan = layer.last_plan
    if budget is not None and isinstance(budget, float):
        assert plan.memory_slots == np.floor(budget * layer.step_alpha * num_steps + 1e-9)
    assert plan.num_steps == num_steps
    assert plan.peak_memory <= plan.memory_slots + 1e-9
    assert_all_close(expected[0], actual[0], "outputs")
    assert_all_close(expected[1], actual[1], "gradients")


# --------------------------------------------------------------------------------------
# Fixed cases: every cell kind and option once in graph mode, plus eager and XLA.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell_kind", CELL_KINDS)
def test_parity_each_cell_masked_graph(cell_kind):
    expected, actual, layer = run_parity(cell_kind, num_steps=9, budget="slots:3",
                                         mask_kind="middle", init="zeros",
                                         return_sequences=True, return_state=True)
    assert layer.last_plan.forward_evals > 9  # something was recomputed
    assert_all_close(expected[0], actual[0], "outputs")
    assert_all_close(expected[1], actual[1], "gradients")


@pytest.mark.parametrize("strategy,budget", [("msm", "slots:2"), ("hsm", 0.2),
                                             ("ism", 0.5), ("chen", None)])
def test_parity_strategies_long_sequence(strategy, budget):
    expected, actual, layer = run_parity("lstm", num_steps=300, budget=budget,
                                         strategy=strategy, mask_kind="end",
                                         go_backwards=True, batch=2)
    assert layer.last_plan.num_steps == 300
    assert_all_close(expected[0], actual[0], "outputs")
    assert_all_close(expected[1], actual[1], "gradients")


@pytest.mark.parametrize("case", [
    dict(cell_kind="lstm", num_steps=7, budget="slots:3", mask_kind="end",
         return_sequences=True),
    dict(cell_kind="gru", num_steps=5, budget=0.4, mask_kind="middle", go_backwards=True,
         return_state=True, init="zeros"),
    dict(cell_kind="nested", num_steps=6, budget="slots:2", strategy="hsm",
         return_sequences=True, zero_output_for_mask=True, mask_kind="middle"),
    dict(cell_kind="stacked", num_steps=4, budget=None, strategy="full", init="random"),
])
def test_parity_eager(case):
    expected, actual, _ = run_parity(mode="eager", **case)
    assert_all_close(expected[0], actual[0], "outputs")
    assert_all_close(expected[1], actual[1], "gradients")


@pytest.mark.parametrize("case", [
    # Under XLA one state-sized scratch area comes out of the budget (executor.StackStore):
    # 'slots:8' leaves the LSTM 8 - alpha slots to plan.
    dict(cell_kind="lstm", num_steps=12, budget="slots:8", mask_kind="middle",
         return_sequences=True),
    # Restarts from compact internal states, the input read backwards from the batch-major
    # sequence, and its gradient.
    dict(cell_kind="gru", num_steps=40, budget=0.1, strategy="ism", mask_kind="end",
         go_backwards=True, return_state=True, init="random"),
    dict(cell_kind="nested", num_steps=6, budget="slots:4", strategy="hsm", init="zeros",
         mask_kind="end", zero_output_for_mask=True),
])
def test_parity_xla(case):
    expected, actual, _ = run_parity(mode="xla", **case)
    assert_all_close(expected[0], actual[0], "outputs")
    assert_all_close(expected[1], actual[1], "gradients")


# --------------------------------------------------------------------------------------
# Recomputation from a nonzero h_0, and the minimum budget.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,budget", [("msm", "slots:3"), ("hsm", "slots:3"),
                                             ("ism", "slots:3"), ("chen", None)])
def test_nonzero_initial_state_with_recomputation(strategy, budget):
    """Plans that restore h_0 must restore the layer's initial state, not zeros."""
    expected, actual, layer = run_parity("simple", num_steps=6, budget=budget,
                                         strategy=strategy, init="random",
                                         return_sequences=True)
    assert restores_h0(layer.last_plan)
    assert_all_close(expected[0], actual[0], "outputs")
    assert_all_close(expected[1], actual[1], "gradients")


@pytest.mark.parametrize("num_steps", [1, 5])
def test_minimum_budget_slots_1(num_steps):
    """'slots:1' holds h_0 only: every step is recomputed from h_0 (T (T + 1) / 2
    evaluations), from a nonzero initial state."""
    expected, actual, layer = run_parity("lstm", num_steps=num_steps, budget="slots:1",
                                         return_sequences=True, return_state=True,
                                         init="random")
    plan = layer.last_plan
    assert plan.memory_slots == 1 and plan.peak_memory == 1
    assert plan.forward_evals == num_steps * (num_steps + 1) // 2
    assert_all_close(expected[0], actual[0], "outputs")
    assert_all_close(expected[1], actual[1], "gradients")
