"""Shared helpers for the `MemoryEfficientRNN` layer tests (imported by the test files in
this folder; pytest puts the folder on sys.path)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_membptt import MemoryEfficientRNN, OpKind  # noqa: E402

tf.get_logger().setLevel("ERROR")

# Parity tolerance (float32): the issue asks for 1e-5.
RTOL = ATOL = 1e-5


# --------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="tf_membptt_tests")
class NestedCell(keras.layers.Layer):
    """A custom cell with a nested state, ``state_size = [units, [3, 2]]``, and a
    ``call(inputs, states, training=None)`` signature. Its three state tensors interact,
    so every one of them carries gradient."""

    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = [units, [3, 2]]
        self.output_size = units

    def build(self, input_shape):
        features = input_shape[-1]
        n = self.units + 5
        self.kernel = self.add_weight(shape=(features, n), name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(self.units, n), name="recurrent")
        self.a_kernel = self.add_weight(shape=(3, self.units), name="a_kernel")
        self.b_kernel = self.add_weight(shape=(2, self.units), name="b_kernel")
        self.bias = self.add_weight(shape=(n,), name="bias", initializer="random_normal")

    def get_initial_state(self, batch_size=None):
        return [tf.zeros((batch_size, self.units)),
                [tf.zeros((batch_size, 3)), tf.zeros((batch_size, 2))]]

    def call(self, inputs, states, training=None):
        h, (a, b) = states
        u = self.units
        z = inputs @ self.kernel + h @ self.recurrent_kernel + self.bias
        zh, za, zb = z[:, :u], z[:, u:u + 3], z[:, u + 3:]
        h_new = tf.tanh(zh + tf.sigmoid(a) @ self.a_kernel + b @ self.b_kernel)
        a_new = a * tf.sigmoid(za) + tf.tanh(za)
        b_new = 0.5 * tf.sin(zb) * b + zb
        if training:  # exercises the training argument (a Python bool when traced)
            h_new = h_new * 1.0
        return 2.0 * h_new, [h_new, [a_new, b_new]]

    def get_config(self):
        return {**super().get_config(), "units": self.units}


COUNTER = [0]


def _increment(_):
    COUNTER[0] += 1
    return np.float32(0.0)


class CountingCell(keras.layers.SimpleRNNCell):
    """A SimpleRNNCell that counts its *runtime* evaluations (graph mode, not XLA): a
    stateful `tf.numpy_function` reading the previous state, wired into the output with a
    control dependency. Tracing does not count; running does."""

    def call(self, inputs, states, training=None):
        output, _ = super().call(inputs, states, training=training)
        previous = states[0] if isinstance(states, (list, tuple)) else states
        tick = tf.numpy_function(_increment, [tf.reduce_sum(previous)], tf.float32,
                                 stateful=True)
        with tf.control_dependencies([tick]):
            output = tf.identity(output)
        return output, [output]


CELL_KINDS = ("lstm", "gru", "gru_v1", "simple", "stacked", "list", "nested")


def make_cell(kind, units=5):
    """A fresh cell (or list of cells for ``"list"``) of one kind."""
    if kind == "lstm":
        return keras.layers.LSTMCell(units)
    if kind == "gru":
        return keras.layers.GRUCell(units, reset_after=True)
    if kind == "gru_v1":
        return keras.layers.GRUCell(units, reset_after=False)
    if kind == "simple":
        return keras.layers.SimpleRNNCell(units)
    if kind == "stacked":
        return keras.layers.StackedRNNCells([keras.layers.LSTMCell(units),
                                             keras.layers.GRUCell(3)])
    if kind == "list":
        return [keras.layers.SimpleRNNCell(3), keras.layers.LSTMCell(units)]
    if kind == "nested":
        return NestedCell(units)
    raise ValueError(kind)


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------
def make_mask(kind, batch, num_steps, rng):
    """None, ``"end"`` (padding at the end, lengths >= 1) or ``"middle"`` (holes anywhere,
    including the first step of one row)."""
    if kind is None:
        return None
    mask = np.ones((batch, num_steps), bool)
    if kind == "end":
        for row in range(batch):
            mask[row, rng.integers(1, num_steps + 1):] = False
        mask[0, num_steps // 2 + 1:] = False  # at least one row padded when T > 1
    elif kind == "middle":
        mask = rng.random((batch, num_steps)) > 0.35
        mask[0, 0] = False
        if num_steps > 2:
            mask[1, 1:num_steps - 1] = False
    else:
        raise ValueError(kind)
    return mask


def initial_state_like(layer_ref, batch, rng, values):
    """An explicit initial state with the cell's (possibly nested) structure: zeros or
    random values."""
    structure = layer_ref.get_initial_state(batch)
    return keras.tree.map_structure(
        lambda t: tf.constant(
            np.zeros(t.shape, np.float32) if values == "zeros"
            else rng.standard_normal(tuple(t.shape)).astype(np.float32)),
        structure)


def weighted_loss(result):
    """A loss weighting every output element (and returned state) differently, so every
    step gets a distinct gradient."""
    total = 0.0
    for k, t in enumerate(keras.tree.flatten(result)):
        size = tf.size(t)
        w = tf.sin(tf.cast(tf.range(size), t.dtype) * 0.37 + float(k) + 1.0)
        total = total + tf.reduce_sum(tf.reshape(t, [-1]) * w)
    return total


def compile_fn(fn, mode):
    if mode == "graph":
        return tf.function(fn)
    if mode == "xla":
        return tf.function(fn, jit_compile=True)
    if mode == "eager":
        return fn
    raise ValueError(mode)


def outputs_and_gradients(layer, variables, x, mask, initial_state, mode):
    """(flat outputs, gradients of `weighted_loss` w.r.t. x, the flat initial state and
    `variables`) for a training call of `layer`."""
    flat_init = keras.tree.flatten(initial_state) if initial_state is not None else []

    def fn(x, *flat_init):
        init = (keras.tree.pack_sequence_as(initial_state, list(flat_init))
                if initial_state is not None else None)
        with tf.GradientTape() as tape:
            tape.watch(x)
            tape.watch(list(flat_init))
            kwargs = {} if init is None else {"initial_state": init}
            if mask is not None:
                kwargs["mask"] = tf.constant(mask)
            result = layer(x, training=True, **kwargs)
            loss = weighted_loss(result)
        grads = tape.gradient(loss, [x] + list(flat_init) + list(variables),
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return keras.tree.flatten(result), grads

    return compile_fn(fn, mode)(tf.constant(x), *flat_init)


def assert_all_close(expected, actual, what=""):
    assert len(expected) == len(actual), what
    for i, (e, a) in enumerate(zip(expected, actual)):
        e, a = np.asarray(e), np.asarray(a)
        assert e.shape == a.shape, f"{what}[{i}]: shape {a.shape} != {e.shape}"
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL, err_msg=f"{what}[{i}]")


def parity_layers(cell_kind, budget, strategy="msm", units=5, **layer_kwargs):
    """(reference keras.layers.RNN, MemoryEfficientRNN) sharing one cell."""
    cell = make_cell(cell_kind, units)
    ref = keras.layers.RNN(cell, **layer_kwargs)
    me = MemoryEfficientRNN(cell, memory_budget=budget, strategy=strategy, **layer_kwargs)
    return ref, me


def run_parity(cell_kind, *, num_steps, budget, strategy="msm", mask_kind=None,
               init=None, mode="graph", batch=3, features=4, seed=0, **layer_kwargs):
    """Runs the reference and the layer on the same data; returns (ref results,
    layer results, layer). Results are (flat outputs, gradients)."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    ref, me = parity_layers(cell_kind, budget, strategy, **layer_kwargs)
    x = rng.standard_normal((batch, num_steps, features)).astype(np.float32)
    ref(x[:, :1])  # build the shared cell
    mask = make_mask(mask_kind, batch, num_steps, rng)
    initial_state = None if init is None else initial_state_like(ref, batch, rng, init)
    variables = ref.cell.trainable_variables
    assert variables, "the cell has trainable weights"
    expected = outputs_and_gradients(ref, variables, x, mask, initial_state, mode)
    actual = outputs_and_gradients(me, variables, x, mask, initial_state, mode)
    return expected, actual, me


def restores_h0(plan):
    return any(op.kind == OpKind.RESTORE and op.slot == 0 for op in plan.ops)


def count_ops(plan, kind):
    return sum(1 for op in plan.ops if op.kind == kind)
