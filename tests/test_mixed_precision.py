"""`MemoryEfficientRNN` with the `mixed_float16` and `mixed_bfloat16` dtype policies: it
trains with `model.fit` (loss scaling for float16), its states are stored in the compute
dtype (a bytes budget buys twice the slots of float32), and its gradients are close to the
float32 ones and to keras.layers.RNN's under the same policy."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_membptt import MemoryEfficientRNN  # noqa: E402

T, F, UNITS, BATCH = 16, 3, 8, 8
POLICIES = ["mixed_float16", "mixed_bfloat16"]


@pytest.fixture(autouse=True)
def restore_policy():
    yield
    keras.config.set_dtype_policy("float32")


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, T, F)).astype("float32")
    y = (x[:, 0, :1] * x[:, -1, 1:2]).astype("float32")
    return x, y


def _model(policy, budget=0.25, standard=False, seed=0):
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(seed)
    cell = keras.layers.LSTMCell(UNITS)
    rnn = (keras.layers.RNN(cell, name="rnn") if standard
           else MemoryEfficientRNN(cell, memory_budget=budget, name="rnn"))
    # The output layer in float32, as the mixed precision guide recommends.
    return keras.Sequential([keras.Input((T, F), batch_size=BATCH), rnn,
                             keras.layers.Dense(1, dtype="float32")])


def _gradients(model, x, y):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(tf.cast(model(x, training=True), tf.float32) - y))
    return [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)]


def _relative_errors(actual, expected):
    return [float(np.linalg.norm(a - e) / np.linalg.norm(e)) for a, e in zip(actual, expected)]


@pytest.mark.parametrize("policy", POLICIES)
def test_fit_trains_under_mixed_precision(policy):
    model = _model(policy)
    layer = model.get_layer("rnn")
    assert layer.compute_dtype == policy.split("_")[1]
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    model.compile(keras.optimizers.Adam(2e-2), "mse")
    if policy == "mixed_float16":  # compile adds loss scaling for float16
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = _data()
    before = model.evaluate(x, y, verbose=0, batch_size=BATCH)
    history = model.fit(x, y, batch_size=BATCH, epochs=4, verbose=0)
    after = model.evaluate(x, y, verbose=0, batch_size=BATCH)
    assert np.all(np.isfinite(history.history["loss"]))
    assert after < before
    assert layer.last_plan is not None and layer.last_plan.num_steps == T
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


@pytest.mark.parametrize("policy", POLICIES + ["float32"])
def test_bytes_budget_uses_the_compute_dtype_itemsize(policy):
    """A bytes budget is converted with the compute dtype's itemsize: a float16/bfloat16
    hidden state of an LSTM is 2 * units * 2 bytes per row, so the same bytes buy twice the
    slots of float32."""
    itemsize = 4 if policy == "float32" else 2
    hidden_bytes = 2 * UNITS * BATCH * 2  # (h, c), batch rows, 2 bytes
    budget = 24 * hidden_bytes  # 24 slots at 2 bytes per element, 12 at 4
    model = _model(policy, budget=budget)
    layer = model.get_layer("rnn")
    x, y = _data()
    _gradients(model, x, y)
    assert layer.last_plan is not None
    assert layer.last_plan.memory_slots == pytest.approx(24 * 2 / itemsize)
    assert layer.last_plan.peak_memory <= 24 * 2 / itemsize
    program = next(iter(layer._programs.values()))
    assert {s.dtype.size for s in program.signature.carry_specs} == {itemsize}


@pytest.mark.parametrize("policy, rtol", [("mixed_float16", 1e-2), ("mixed_bfloat16", 3e-2)])
def test_gradients_close_to_float32_and_to_keras_rnn(policy, rtol):
    x, y = _data(seed=1)
    reference = _model("float32")
    expected = _gradients(reference, x, y)

    model = _model(policy)
    model.set_weights(reference.get_weights())
    got = _gradients(model, x, y)
    errors = _relative_errors(got, expected)
    assert max(errors) < rtol, errors

    # Under the same policy, standard BPTT (keras.layers.RNN) is as close to float32, and
    # the two mixed-precision gradients agree with each other at least as well.
    standard = _model(policy, standard=True)
    standard.set_weights(reference.get_weights())
    standard_got = _gradients(standard, x, y)
    assert max(_relative_errors(standard_got, expected)) < rtol
    assert max(_relative_errors(got, standard_got)) < rtol
