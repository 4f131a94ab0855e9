"""What an internal state holds, and that the backward and restarts work from it.

For the built-in gated cells an internal state stores the carry ``h_{i-1}`` and what the
gates follow from elementwise (the *compact* layout): the recurrent matrix product (under
XLA, and for small tensors), or the gate activations (outside XLA, for tensors of at least
`step_program.NEAREST_CUT_MIN_BYTES`); ``c_i`` and ``h_i`` are recomputed elementwise.
Where that is not smaller (SimpleRNNCell), ``h_i`` and the residuals are stored. Either
way the gradients equal standard BPTT's, including plans that restart the forward from a
stored internal state."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from layer_helpers import COUNTER, _increment, assert_all_close, run_parity
from tf_membptt import MemoryEfficientRNN
from tf_membptt import segments as seg
from tf_membptt.executor import step_program


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


def _internal_shapes(layer):
    return [tuple(s.shape) for s in _program(layer).internal_specs]


@pytest.mark.parametrize("mode", ["graph", "eager", "xla"])
def test_large_cells_store_gate_activations_outside_xla(mode):
    """Outside XLA, components of at least `NEAREST_CUT_MIN_BYTES` per step: the smallest
    set of tensors nearest the outputs (the four gate activations beside ``h_{i-1}`` and
    ``c_{i-1}``); under XLA the walk's frontier (the pre-activation of the four gates).
    Same bytes, so the same alpha and plan; the gradients are standard BPTT's."""
    units, batch = 64, 32  # 64 * 32 * 4 bytes = 8 KiB per gate
    assert units * batch * 4 >= step_program.NEAREST_CUT_MIN_BYTES
    expected, actual, layer = run_parity("lstm", num_steps=60, budget=0.08, mode=mode,
                                         units=units, batch=batch, features=3, seed=4)
    assert layer.step_alpha == 3.0 and _program(layer).compact
    if mode == "xla":
        assert _internal_shapes(layer) == [(batch, units)] * 2 + [(batch, 4 * units)]
    else:
        assert _internal_shapes(layer) == [(batch, units)] * 6
    assert _restarts_from_internal(layer.last_plan) > 0
    if mode == "xla":
        # At this size XLA fuses the two programs' sums differently: gradients agree to
        # float32 rounding of sums over 32 x 60 terms (2.4e-5 relative, the same before
        # the graph-mode layout existed), not to the suite's 1e-5.
        for e, a in zip(expected[0] + expected[1], actual[0] + actual[1]):
            np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)
        return
    assert_all_close(expected[0], actual[0], "outputs")
    assert_all_close(expected[1], actual[1], "gradients")


def test_small_components_keep_the_frontier(monkeypatch):
    """Below `NEAREST_CUT_MIN_BYTES` per component on average (or with no static batch
    size) the frontier is kept: more, smaller components would cost more store moves than
    the backward's recomputation they save."""
    _, _, layer = run_parity("lstm", num_steps=12, budget=0.3, units=6, batch=2)
    assert _internal_shapes(layer) == [(2, 6), (2, 6), (2, 24)]
    monkeypatch.setattr(step_program, "NEAREST_CUT_MIN_BYTES", 0)
    _, _, layer = run_parity("lstm", num_steps=12, budget=0.3, units=6, batch=2)
    assert _internal_shapes(layer) == [(2, 6)] * 6


def test_unknown_batch_size_keeps_the_frontier():
    """Without a static batch size a component's bytes per step are unknown: the frontier
    is kept, whatever the cell's width."""
    layer = MemoryEfficientRNN(keras.layers.LSTMCell(64), memory_budget=0.3)

    @tf.function(input_signature=[tf.TensorSpec([None, 12, 3], tf.float32)])
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, layer.trainable_variables)

    step(tf.random.normal([32, 12, 3]))
    assert _internal_shapes(layer) == [(None, 64), (None, 64), (None, 256)]


@pytest.mark.parametrize("cell_kind,components,frontier_alpha", [
    # One vector of units each. GRU: h_{i-1}, the update and reset gates, the candidate's
    # part of h_{i-1} @ U and the masked output (carried when masking) instead of h_{i-1},
    # the carried output and all of h_{i-1} @ U (the same bytes); reset_after=False: the
    # candidate's tanh instead of two parts of the product.
    ("gru", 5, 2.5),
    ("gru_v1", 5, 2.5),
    # The walk's frontier stops at the first cheap op of each path; a minimum cut can sit
    # later, where fewer bytes cross (alpha measured with the frontier in the test).
    ("stacked", None, None),
    ("nested", None, None),
])
def test_nearest_cut_gives_standard_gradients(monkeypatch, cell_kind, components,
                                              frontier_alpha):
    """The cut nearest the outputs for every component size (threshold 0), with restarts
    from internal states: gradients equal standard BPTT's; alpha no larger than the walk's
    frontier gives (smaller for some cells)."""
    if frontier_alpha is None:
        _, _, frontier_layer = run_parity(cell_kind, num_steps=30, budget=0.1, units=5,
                                          seed=2, mask_kind="middle")
    monkeypatch.setattr(step_program, "NEAREST_CUT_MIN_BYTES", 0)
    expected, actual, layer = run_parity(cell_kind, num_steps=30, budget=0.1, units=5,
                                         seed=2, mask_kind="middle")
    if frontier_alpha is None:
        assert layer.step_alpha < frontier_layer.step_alpha
    else:
        assert layer.step_alpha == frontier_alpha
        assert len(_program(layer).internal_specs) == components
    assert_all_close(expected[0], actual[0], "outputs")
    assert_all_close(expected[1], actual[1], "gradients")
