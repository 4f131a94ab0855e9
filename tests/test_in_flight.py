"""How many backward steps run at once (`sweeps.in_flight_backwards`): each one in flight
holds a copy of the params' gradients, so the extra copies stay within a twentieth of the
stored states' bytes, or within a quarter of them when they total at most 1 MiB; small
cells (short steps) get the most concurrency, large ones little."""

import keras
import numpy as np
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


@pytest.mark.parametrize("in_flight,internal_bytes,stored_bytes,expected", [
    (1, 1e3, 10 * MiB, False),          # one backward at a time: nothing to overlap
    (10, 24576, 1.2 * MiB, True),       # LSTMCell(32) at 5%: 9 states, 216 KiB of 300
    (4, 98304, 4.7 * MiB, True),        # LSTMCell(128) at 5%: 288 KiB of 1 MiB
    (10, 200e3, 1.2 * MiB, False),      # 1.8 MB of states held: over the allowance
    (5, 393216, 375 * MiB, True),       # LSTMCell(512) at 100%: a twentieth of the states
])
def test_segments_overlap(in_flight, internal_bytes, stored_bytes, expected):
    assert sweeps.segments_overlap(in_flight, internal_bytes, stored_bytes) == expected


def test_overlapping_segments_hold_within_the_allowance():
    for in_flight in range(1, 11):
        for internal_bytes in (1e3, 1e4, 1e5, 1e6):
            for stored_bytes in (0, 1e5, 1e6, 1e7, 1e8):
                if sweeps.segments_overlap(in_flight, internal_bytes, stored_bytes):
                    held = (in_flight - 1) * internal_bytes
                    assert in_flight > 1
                    assert (held <= stored_bytes / 20
                            or (held <= stored_bytes / 4 and held <= MiB)), (
                        in_flight, internal_bytes, stored_bytes)


def _segment_loop_parallel_iterations(concrete):
    """`parallel_iterations` of every while loop in the step's graph whose body runs a nested
    loop (the gradient's segment loop is the only one)."""
    graph = concrete.graph.as_graph_def()
    library = {f.signature.name: f for f in graph.library.function}
    loops = ("While", "StatelessWhile")

    def nested(body_name):
        return any(n.op in loops for n in library[body_name].node_def)

    nodes = list(graph.node) + [n for f in library.values() for n in f.node_def]
    return sorted(n.attr["parallel_iterations"].i for n in nodes
                  if n.op in loops and nested(n.attr["body"].func.name))


@pytest.mark.parametrize("overlap", [True, False])
def test_overlapping_segments_keep_keras_gradients(overlap, monkeypatch):
    """With a small cell the rule lets the next segment start before the last backwards of
    a segment finish (two segment iterations in flight); either way the gradients are
    keras.layers.RNN's."""
    if not overlap:
        monkeypatch.setattr(sweeps, "segments_overlap", lambda *args: False)
    keras.utils.set_random_seed(3)
    cell = keras.layers.LSTMCell(6)
    x = tf.random.normal([4, 120, 3], seed=5)
    reference = keras.layers.RNN(cell)
    layer = MemoryEfficientRNN(cell, memory_budget=0.1)
    reference(x[:, :2])

    def step(rnn):
        @tf.function
        def run(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(rnn(x, training=True) ** 2)
            return tape.gradient(loss, cell.trainable_variables)
        return run

    ours, theirs = step(layer), step(reference)
    concrete = ours.get_concrete_function(x)
    (program,) = layer._programs.values()
    plan = layer.last_plan
    assert run.in_flight(program, plan) > 1
    assert run.overlap_segments(program, plan, run.in_flight(program, plan)) == overlap
    assert _segment_loop_parallel_iterations(concrete) == [2 if overlap else 1]
    for g, r in zip(ours(x), theirs(x)):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-5, atol=1e-6)
