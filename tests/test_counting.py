"""The layer evaluates the cell exactly as often as its plan says: `forward_evals` in one
training step (forward + gradient), exactly T times in inference, and stored internal
states are reused by the backward rather than recomputed. Counted at runtime (a stateful
`tf.numpy_function` in the cell), in graph mode; tracing is not counted."""

import numpy as np
import pytest
import tensorflow as tf

from layer_helpers import COUNTER, CountingCell, count_ops
from tf_membptt import MemoryEfficientRNN, OpKind

T = 20


def _count_runs(strategy, budget, num_steps=T):
    cell = CountingCell(4)
    layer = MemoryEfficientRNN(cell, budget, strategy=strategy, return_sequences=True)
    x = tf.constant(np.random.default_rng(0).standard_normal((2, num_steps, 3)), tf.float32)

    @tf.function
    def train_step(x):
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, layer.trainable_variables)

    @tf.function
    def infer(x):
        return layer(x, training=False)

    counts = {}
    train_step.get_concrete_function(x)
    infer.get_concrete_function(x)
    COUNTER[0] = 0  # tracing above ran nothing; from here on only runtime calls count
    grads = train_step(x)
    counts["train"] = COUNTER[0]
    assert all(np.all(np.isfinite(g)) for g in grads)
    COUNTER[0] = 0
    train_step(x)
    counts["train_again"] = COUNTER[0]
    COUNTER[0] = 0
    infer(x)
    counts["inference"] = COUNTER[0]
    return counts, layer.last_plan


@pytest.mark.parametrize("strategy,budget", [
    ("msm", "slots:1"), ("msm", "slots:4"), ("msm", 0.2), ("hsm", 0.2), ("hsm", "slots:3"),
    ("ism", 0.3), ("full", None), ("msm", None),
])
def test_cell_evaluations_equal_plan(strategy, budget):
    counts, plan = _count_runs(strategy, budget)
    assert plan.num_steps == T
    assert counts["train"] == plan.forward_evals, (counts, plan.describe())
    assert counts["train_again"] == plan.forward_evals
    assert counts["inference"] == T
    # The plan's own count: one evaluation per ADVANCE op.
    assert count_ops(plan, OpKind.ADVANCE) == plan.forward_evals
    if budget == "slots:1":
        assert counts["train"] == T * (T + 1) // 2
    if budget is None:
        assert counts["train"] == T  # no limit: nothing recomputed


def test_cell_evaluations_equal_plan_chen():
    counts, plan = _count_runs("chen", None)
    assert counts["inference"] == T
    assert counts["train"] == plan.forward_evals, (counts, plan.forward_evals)


def test_internal_states_are_stored_and_reused():
    """A plan that stores internal states: the backward of those steps reads them. If every
    BACKWARD_STORED re-evaluated its step, the count would exceed forward_evals."""
    counts, plan = _count_runs("ism", 0.5)
    stored_backwards = count_ops(plan, OpKind.BACKWARD_STORED)
    assert count_ops(plan, OpKind.STORE_INTERNAL) > 0 and stored_backwards > 0
    assert counts["train"] == plan.forward_evals
    assert counts["train"] < plan.forward_evals + stored_backwards
    # More memory, fewer evaluations: storing internal states does save recomputation.
    tighter, tight_plan = _count_runs("ism", 0.2)
    assert tighter["train"] == tight_plan.forward_evals > counts["train"]
