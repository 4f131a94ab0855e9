"""A zoo of RNN cells for the contract tests: built-ins, stacked and nested states, custom
math, randomness, side effects, mixed dtypes, tied weights, data-dependent control flow,
and cells the layer must refuse. Every factory returns a fresh cell (or list of cells)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from layer_helpers import NestedCell


class _Simple(keras.layers.Layer):
    """Base for the small custom cells: ``state_size = units``, a kernel and a recurrent
    kernel."""

    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units
        self.output_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.recurrent = self.add_weight(shape=(self.units, self.units), name="recurrent",
                                         initializer="orthogonal")

    def pre(self, x, h):
        return tf.matmul(x, self.kernel) + tf.matmul(h, self.recurrent)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class PeepholeCell(keras.layers.Layer):
    """An LSTM with peephole connections written out by hand (custom math, two states)."""

    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = [units, units]
        self.output_size = units

    def build(self, input_shape):
        u = self.units
        self.kernel = self.add_weight(shape=(input_shape[-1], 4 * u), name="kernel")
        self.recurrent = self.add_weight(shape=(u, 4 * u), name="recurrent")
        self.peephole = self.add_weight(shape=(3, u), name="peephole")
        self.bias = self.add_weight(shape=(4 * u,), name="bias", initializer="random_normal")

    def call(self, x, states, training=None):
        h, c = states
        z = tf.matmul(x, self.kernel) + tf.matmul(h, self.recurrent) + self.bias
        zi, zf, zg, zo = tf.split(z, 4, axis=-1)
        i = tf.sigmoid(zi + self.peephole[0] * c)
        f = tf.sigmoid(zf + self.peephole[1] * c)
        c_new = f * c + i * tf.tanh(zg)
        o = tf.sigmoid(zo + self.peephole[2] * c_new)
        h_new = o * tf.tanh(c_new)
        return h_new, [h_new, c_new]


class NoiseCell(_Simple):
    """Gaussian noise from `keras.random` with the cell's own `SeedGenerator` (training)."""

    def __init__(self, units=4, **kwargs):
        super().__init__(units, **kwargs)
        self.seed_generator = keras.random.SeedGenerator(1234)

    def call(self, x, states, training=None):
        h = states[0]
        z = self.pre(x, h)
        if training:
            z = z + keras.random.normal(tf.shape(z), stddev=0.5, seed=self.seed_generator)
        h = tf.tanh(z)
        return h, [h]


class DropoutSublayerCell(_Simple):
    """Zoneout-like: a `keras.layers.Dropout` sublayer on the recurrent input."""

    def __init__(self, units=4, **kwargs):
        super().__init__(units, **kwargs)
        self.dropout = keras.layers.Dropout(0.4, seed=99)

    def call(self, x, states, training=None):
        h = states[0]
        h = tf.tanh(tf.matmul(x, self.kernel)
                    + tf.matmul(self.dropout(h, training=training), self.recurrent))
        return h, [h]


class GaussianNoiseCell(_Simple):
    """A `keras.layers.GaussianNoise` sublayer on the step's input."""

    def __init__(self, units=4, **kwargs):
        super().__init__(units, **kwargs)
        self.noise = keras.layers.GaussianNoise(0.3, seed=5)

    def call(self, x, states, training=None):
        h = states[0]
        h = tf.tanh(self.pre(self.noise(x, training=training), h))
        return h, [h]


class CounterCell(_Simple):
    """Counts its calls in a non-trainable variable and keeps a running mean of its
    output (two variables assigned in `call`)."""

    def build(self, input_shape):
        super().build(input_shape)
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                     name="calls")
        self.mean = self.add_weight(shape=(self.units,), initializer="zeros",
                                    trainable=False, name="mean")

    def call(self, x, states, training=None):
        h = tf.tanh(self.pre(x, states[0]))
        self.calls.assign_add(1.0)
        self.mean.assign(0.9 * self.mean + 0.1 * tf.reduce_mean(h, axis=0))
        return h, [h]


class MixedDtypeCell(keras.layers.Layer):
    """States of two dtypes (a float32 state and an int32 per-row step count), a float64
    intermediate, and an int32 cast of a carry-dependent value kept for the backward."""

    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = [units, 1]
        self.output_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.recurrent = self.add_weight(shape=(self.units, self.units), name="recurrent")

    def get_initial_state(self, batch_size=None):
        return [tf.zeros((batch_size, self.units)), tf.zeros((batch_size, 1), tf.int32)]

    def call(self, x, states, training=None):
        h, count = states
        z64 = tf.cast(tf.matmul(x, self.kernel) + tf.matmul(h, self.recurrent), tf.float64)
        scale = tf.cast(1.0 + 0.1 * tf.cast(count, tf.float64), tf.float64)
        h_new = tf.cast(tf.tanh(z64 / scale), tf.float32)
        return h_new, [h_new, count + 1]


class TiedCell(_Simple):
    """Reads a recurrent matrix it does not own (weight tying across layers)."""

    def __init__(self, shared, **kwargs):
        super().__init__(int(shared.shape[0]), **kwargs)
        self.shared = shared

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")

    def call(self, x, states, training=None):
        h = states[0]
        h = tf.tanh(tf.matmul(x, self.kernel) + tf.matmul(h, self.shared.value))
        return h, [h]


class CondCell(_Simple):
    """A data-dependent `tf.cond` on the state (a different nonlinearity per branch)."""

    def call(self, x, states, training=None):
        h = states[0]
        z = self.pre(x, h)
        h = tf.cond(tf.reduce_sum(h) > 0.0, lambda: tf.tanh(z), lambda: 0.5 * tf.sin(z))
        return h, [h]


class ArgmaxGatherCell(_Simple):
    """`argmax` of the state, then a `gather` of an embedding: a carry-dependent integer
    tensor that the backward reads."""

    def build(self, input_shape):
        super().build(input_shape)
        self.embedding = self.add_weight(shape=(self.units, self.units), name="embedding")

    def call(self, x, states, training=None):
        h = states[0]
        picked = tf.gather(self.embedding, tf.argmax(h, axis=-1))
        h = tf.tanh(self.pre(x, h) + picked * h)
        return h, [h]


class StatefulRandomCell(_Simple):
    """TensorFlow's stateful `tf.random.uniform`: cannot be replayed, refused."""

    def call(self, x, states, training=None):
        h = states[0]
        h = tf.tanh(self.pre(x, h) + 0.1 * tf.random.uniform(tf.shape(h)))
        return h, [h]


class AddLossCell(_Simple):
    """Adds an activity loss inside `call`: refused."""

    def call(self, x, states, training=None):
        h = tf.tanh(self.pre(x, states[0]))
        self.add_loss(0.01 * tf.reduce_sum(h * h))
        return h, [h]


_SHARED = {}


def shared_matrix(units=4):
    """The matrix the tied cells read (one per process, like a tied embedding)."""
    if units not in _SHARED:
        _SHARED[units] = keras.Variable(
            np.random.default_rng(11).standard_normal((units, units)).astype("float32") * 0.4,
            name="shared_recurrent")
    return _SHARED[units]


# name -> (factory, what a training gradient through MemoryEfficientRNN does:
#          None = equal to keras.layers.RNN, or (error type, message fragment)).
ZOO = {
    "lstm": (lambda: keras.layers.LSTMCell(4), None),
    "gru": (lambda: keras.layers.GRUCell(4), None),
    "gru_v1": (lambda: keras.layers.GRUCell(4, reset_after=False), None),
    "simple": (lambda: keras.layers.SimpleRNNCell(4), None),
    "lstm_dropout": (lambda: keras.layers.LSTMCell(4, dropout=0.3, recurrent_dropout=0.3,
                                                   seed=3), None),
    "stacked": (lambda: keras.layers.StackedRNNCells([keras.layers.LSTMCell(4),
                                                      keras.layers.GRUCell(3)]), None),
    "list": (lambda: [keras.layers.SimpleRNNCell(3), keras.layers.GRUCell(4)], None),
    "nested": (lambda: NestedCell(4), None),
    "peephole": (lambda: PeepholeCell(4), None),
    "noise": (lambda: NoiseCell(4), None),
    "dropout_sublayer": (lambda: DropoutSublayerCell(4), None),
    "gaussian_noise": (lambda: GaussianNoiseCell(4), None),
    "counter": (lambda: CounterCell(4), None),
    "mixed_dtype": (lambda: MixedDtypeCell(4), None),
    "tied": (lambda: TiedCell(shared_matrix(4)), None),
    "cond": (lambda: CondCell(4), None),
    "argmax_gather": (lambda: ArgmaxGatherCell(4), None),
    "stateful_random": (lambda: StatefulRandomCell(4),
                        (NotImplementedError, "stateful random op")),
    "add_loss": (lambda: AddLossCell(4), (NotImplementedError, "add_loss")),
}
