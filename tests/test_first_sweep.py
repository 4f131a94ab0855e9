"""The first sweep has two shapes (`sweeps.forward_sweep`): one loop that writes the store
at every step, and, under XLA when the plan stores after few steps, runs of steps that touch
no store between the storing ones (graph mode can run them too; the layer does not, for
memory). Both evaluate the same steps in the same order, so outputs, final
states and gradients are the same bits, in graph mode and under XLA (before the step's sums
were kept apart, `step_program._keep_sums_in_order`, they differed by up to 7e-7 on the
nested cell), and each agrees with keras.layers.RNN; the shape must follow the plan's
stores and the mode."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from layer_helpers import ATOL, RTOL, NestedCell
from tf_membptt import MemoryEfficientRNN
from tf_membptt.executor import sweeps


def _step(layer, weights, jit):
    @tf.function(jit_compile=jit)
    def step(x, mask):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x, mask=mask, training=True)
            outputs = tf.nest.flatten(outputs)
            # Position-dependent weights: every output element's gradient differs. Divided
            # by the 60 steps, so that the gradients are of order 1 like the parity tests'
            # (summed over 60 steps they reached 25, where float32 rounding alone can
            # exceed the absolute tolerance on an element that cancels).
            loss = sum(tf.reduce_sum(o * tf.reshape(
                tf.cast(tf.range(1, tf.size(o) + 1), o.dtype) / tf.cast(tf.size(o), o.dtype),
                tf.shape(o))) for o in outputs) / 60.0
        return outputs, tape.gradient(loss, [x] + weights)

    return step


def _run(monkeypatch, cell_factory, jit, sparse, **layer_kwargs):
    """Outputs and gradients with the first sweep forced into one shape (None: that of
    keras.layers.RNN), and the shapes the layer took."""
    taken = []
    real = sweeps._runs_pay_off

    def spy(num_storing, num_steps, xla):
        taken.append(real(num_storing, num_steps, xla))
        return sparse

    monkeypatch.setattr(sweeps, "_runs_pay_off", spy)
    keras.utils.set_random_seed(3)
    cell = cell_factory()
    if sparse is None:
        layer_kwargs = {k: v for k, v in layer_kwargs.items()
                        if k not in ("memory_budget", "strategy")}
        layer = keras.layers.RNN(cell, **layer_kwargs)
    else:
        layer = MemoryEfficientRNN(cell, **layer_kwargs)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((3, 60, 5)), tf.float32)
    mask = tf.constant(rng.random((3, 60)) > 0.2)
    layer(x[:, :2])
    outputs, grads = _step(layer, cell.trainable_variables, jit)(x, mask)
    return [o.numpy() for o in outputs], [g.numpy() for g in grads], taken


CASES = [
    ("lstm_msm_5", lambda: keras.layers.LSTMCell(6),
     dict(memory_budget=0.05, return_sequences=True)),
    ("gru_hsm_10_backwards", lambda: keras.layers.GRUCell(5),
     dict(memory_budget=0.1, strategy="hsm", go_backwards=True, return_state=True)),
    ("nested_ism_20", lambda: NestedCell(4),
     dict(memory_budget=0.2, strategy="ism", return_sequences=True, return_state=True)),
]


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("name,cell_factory,kwargs", CASES, ids=[c[0] for c in CASES])
def test_runs_and_every_step_agree(monkeypatch, name, cell_factory, kwargs, jit):
    out_runs, grads_runs, taken = _run(monkeypatch, cell_factory, jit, True, **kwargs)
    # A budget this low stores after few first-sweep steps: runs under XLA only.
    assert taken and all(t == jit for t in taken), taken
    out_every, grads_every, _ = _run(monkeypatch, cell_factory, jit, False, **kwargs)
    out_keras, grads_keras, _ = _run(monkeypatch, cell_factory, jit, None, **kwargs)
    assert len(out_runs) == len(out_every) == len(out_keras)
    for a, b, k in zip(out_runs + grads_runs, out_every + grads_every,
                       out_keras + grads_keras):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, k, rtol=RTOL, atol=ATOL)


def test_full_budget_writes_every_step(monkeypatch):
    """At 100% every step stores, so runs would only add loop starts."""
    _, _, taken = _run(monkeypatch, lambda: keras.layers.LSTMCell(4), True, False,
                       memory_budget=1.0)
    assert taken == [False]


@pytest.mark.parametrize("num_storing,num_steps,runs", [
    (0, 10, True), (1, 4, True), (2, 4, False), (25, 100, True), (26, 100, False),
    (100, 100, False),
])
def test_runs_threshold(num_storing, num_steps, runs):
    assert sweeps._runs_pay_off(num_storing, num_steps, xla=True) is runs
    assert sweeps._runs_pay_off(num_storing, num_steps, xla=False) is False
