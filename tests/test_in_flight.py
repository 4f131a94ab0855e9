"""How many backward steps run at once (`sweeps.in_flight_backwards`): each one in flight
holds a copy of the params' gradients, so the extra copies stay within a twentieth of the
stored states' bytes, or within a quarter of them when they total at most 1 MiB; small
cells (short steps) get the most concurrency, large ones little."""

import keras
import pytest
import tensorflow as tf

from tf_membptt import MemoryEfficientRNN
from tf_membptt.executor import run, sweeps

MiB = 2 ** 20


@pytest.mark.parametrize("param_bytes,stored_bytes,expected", [
    (0, 10 * MiB, 10),                  # no params' gradient to copy
    (33e3, 1.6 * MiB, 10),              # LSTMCell(32) at 5%: the limit
    (330e3, 4.7 * MiB, 4),              # LSTMCell(128) at 5%: a quarter of the states
    (330e3, 64 * MiB, 10),              # ... at 100%: a twentieth of the states
    (330e3, 16 * MiB, 4),               # ... at 25%: 1 MiB of copies
    (4.26 * MiB, 37.2 * MiB, 1),        # LSTMCell(512) at 10%: one step at a time
    (4.26 * MiB, 375 * MiB, 5),         # ... at 100%: a twentieth of the states
    (1e6, 0, 1),                        # nothing stored: never below one
])
def test_in_flight_backwards(param_bytes, stored_bytes, expected):
    assert sweeps.in_flight_backwards(param_bytes, stored_bytes) == expected


def test_extra_copies_within_both_bounds():
    for param_bytes in (1e3, 1e4, 1e5, 3e5, 1e6, 4e6):
        for stored_bytes in (0, 1e5, 1e6, 1e7, 1e8):
            n = sweeps.in_flight_backwards(param_bytes, stored_bytes)
            assert 1 <= n <= 10
            if n > 1:
                extra = (n - 1) * param_bytes
                assert (extra <= stored_bytes / 20
                        or (extra <= stored_bytes / 4 and extra <= MiB)), (
                    param_bytes, stored_bytes, n)


@pytest.mark.parametrize("units,expected", [(4, 10), (512, 1)])
def test_layer_plans_use_the_rule(units, expected):
    """The layer's own numbers: the params' gradient bytes of the cell against the plan's
    stored states."""
    cell = keras.layers.LSTMCell(units)
    layer = MemoryEfficientRNN(cell, memory_budget=0.5)
    x = tf.zeros([8, 200, 16])
    layer(x[:, :2])

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, cell.trainable_variables)

    step.get_concrete_function(x)
    (program,) = layer._programs.values()
    assert run.in_flight(program, layer.last_plan) == expected
