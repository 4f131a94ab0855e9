"""What an internal state holds, and that the backward and restarts work from it.

For the built-in gated cells an internal state stores the carry ``h_{i-1}`` and the
recurrent matrix product (the *compact* layout): the gates, ``c_i`` and ``h_i`` are
recomputed elementwise. Where that is not smaller (SimpleRNNCell), ``h_i`` and the
residuals are stored. Either way the gradients equal standard BPTT's, including plans that
restart the forward from a stored internal state."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from layer_helpers import COUNTER, _increment, assert_all_close, run_parity
from tf_membptt import MemoryEfficientRNN
from tf_membptt import segments as seg


def _program(layer):
    (program,) = layer._programs.values()
    return program


def _train_once(layer, x):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True))
    return tape.gradient(loss, layer.trainable_variables)


@pytest.mark.parametrize("make_cell,alpha,compact", [
    # LSTM: h_{i-1}, c_{i-1} and h_{i-1} @ U (4 gates) = 6 vectors of size units = 3 (h, c).
    (lambda: keras.layers.LSTMCell(6), 3.0, True),
    # GRU: h_{i-1} and h_{i-1} @ U (3 gates): 4 units of h.
    (lambda: keras.layers.GRUCell(6), 4.0, True),
    (lambda: keras.layers.GRUCell(6, reset_after=False), 4.0, True),
    # SimpleRNN: the compact layout (h_{i-1}, h_{i-1} @ U) is no smaller than h_i + h_{i-1}.
    (lambda: keras.layers.SimpleRNNCell(6), 2.0, False),
])
def test_measured_alpha_per_cell(make_cell, alpha, compact):
    layer = MemoryEfficientRNN(make_cell(), memory_budget=0.5)
    x = tf.random.normal([2, 12, 3])
    _train_once(layer, x)
    assert layer.step_alpha == alpha
    assert _program(layer).compact is compact
    assert layer.last_plan.alpha == alpha


def _restarts_from_internal(plan) -> int:
    """How many segments of the plan restart the cursor from a stored internal state."""
    return int(np.sum(seg.compile_plan(plan).segments[1:, 0] == seg.FROM_INTERNAL))


@pytest.mark.parametrize("mode", ["graph", "eager", "xla"])
@pytest.mark.parametrize("cell_kind,strategy", [("lstm", "msm"), ("gru", "ism"),
                                                 ("gru_v1", "msm")])
def test_restarts_from_compact_internal_states_match_bptt(mode, cell_kind, strategy):
    expected, actual, layer = run_parity(cell_kind, num_steps=60, budget=0.08,
                                         strategy=strategy, mode=mode, mask_kind="middle",
                                         seed=3)
    program, plan = _program(layer), layer.last_plan
    assert program.compact
    assert _restarts_from_internal(plan) > 0, plan.describe()
    assert_all_close(expected[0], actual[0], "outputs")
    assert_all_close(expected[1], actual[1], "gradients")


class CountingGatedCell(keras.layers.Layer):
    """An LSTM-like cell that counts its recurrent matrix products at runtime (a stateful
    `tf.numpy_function` wired to the product with a control dependency). In the compact
    layout the product is stored, so restarts and backwards from an internal state must
    not run it again: evaluations stay equal to the plan's forward evaluations."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = [units, units]
        self.output_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 4 * self.units), name="kernel")
        self.recurrent = self.add_weight(shape=(self.units, 4 * self.units), name="recurrent")

    def call(self, inputs, states):
        h, c = states
        tick = tf.numpy_function(_increment, [tf.reduce_sum(h)], tf.float32, stateful=True)
        with tf.control_dependencies([tick]):
            recurrent = tf.matmul(h, self.recurrent)
        z = tf.matmul(inputs, self.kernel) + recurrent
        i, f, g, o = tf.split(z, 4, axis=-1)
        c_new = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        h_new = tf.sigmoid(o) * tf.tanh(c_new)
        return h_new, [h_new, c_new]


@pytest.mark.parametrize("strategy,budget", [("msm", 0.08), ("ism", 0.05), ("msm", 0.3)])
def test_compact_states_are_not_reevaluated(strategy, budget):
    cell = CountingGatedCell(4)
    layer = MemoryEfficientRNN(cell, memory_budget=budget, strategy=strategy)
    reference = keras.layers.RNN(cell)
    x = tf.constant(np.random.default_rng(1).standard_normal((2, 40, 3)), tf.float32)

    @tf.function
    def step(layer):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sin(layer(x, training=True)))
        return tape.gradient(loss, cell.trainable_variables)

    expected = step(reference)
    step(layer)  # traces and runs once
    assert _program(layer).compact and _program(layer).alpha == 3.0
    COUNTER[0] = 0
    actual = step(layer)
    plan = layer.last_plan
    assert _restarts_from_internal(plan) > 0
    assert COUNTER[0] == plan.forward_evals
    assert_all_close(expected, actual, "gradients")


class StatelessInputCell(keras.layers.Layer):
    """A cell whose new state ignores the previous one. Its gradient builds the (zero)
    gradient of the carry with `zeros_like(h_{i-1})`, a read of h_{i-1}'s shape only: it is
    fed from the static shape, so nothing of step i depends on h_{i-1} and the internal
    state is h_i alone (one hidden state)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units
        self.output_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")

    def call(self, inputs, states):
        h = tf.tanh(tf.matmul(inputs, self.kernel))
        return h, [h]


@pytest.mark.parametrize("strategy", ["msm", "ism"])
def test_cell_ignoring_its_state(strategy):
    cell = StatelessInputCell(4)
    layer = MemoryEfficientRNN(cell, memory_budget=0.3, strategy=strategy,
                               return_sequences=True)
    reference = keras.layers.RNN(cell, return_sequences=True)
    x = tf.constant(np.random.default_rng(2).standard_normal((2, 30, 3)), tf.float32)

    def grads(rnn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(rnn(x, training=True)))
        return tape.gradient(loss, [x] + cell.trainable_variables)

    expected = grads(reference)
    actual = grads(layer)
    program = _program(layer)
    assert not program.compact and layer.step_alpha == 1.0
    assert [tuple(s.shape) for s in program.internal_specs] == [(2, 4)]  # h_i
    assert_all_close(expected, actual, "gradients")
