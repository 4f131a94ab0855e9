"""Argument validation and its messages, config / `.keras` round trips, and how the
budget forms turn into plan sizes."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from layer_helpers import NestedCell
from tf_membptt import MemoryEfficientRNN

T, BATCH, FEATURES = 10, 4, 3


def _x(batch=BATCH, num_steps=T):
    return tf.constant(np.random.default_rng(0).standard_normal((batch, num_steps, FEATURES)),
                       tf.float32)


def _train_step(layer, x):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, layer.trainable_variables)

    return step(x)


# --------------------------------------------------------------------------------------
# memory_budget
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, -1, 1.5, -0.5, 0.0, float("nan"), float("inf"),
                                    "abc", "12XB", True, False, "slots:0", "slots:-2",
                                    "0%", "150%", "", [0.1]])
def test_invalid_memory_budget(budget):
    with pytest.raises(ValueError) as info:
        MemoryEfficientRNN(keras.layers.LSTMCell(4), budget)
    message = str(info.value)
    assert "memory_budget" in message
    assert f"memory_budget={budget!r}" in message


def test_bytes_budget_below_minimum_names_the_least_budget():
    # LSTMCell(5): a hidden state is h and c, 10 float32 per row: 160 bytes for 4 rows.
    layer = MemoryEfficientRNN(keras.layers.LSTMCell(5), 100)
    with pytest.raises(ValueError) as info:
        _train_step(layer, _x())
    message = str(info.value)
    assert "memory_budget" in message and "memory_budget=100" in message
    assert "160 bytes" in message  # the least feasible budget for this batch
    # The same bytes suffice for a batch of 2 (80 bytes a hidden state).
    layer = MemoryEfficientRNN(keras.layers.LSTMCell(5), 100)
    _train_step(layer, _x(batch=2))
    assert layer.last_plan.memory_slots == pytest.approx(100 / 80)


def test_fraction_below_minimum_names_the_least_fraction():
    layer = MemoryEfficientRNN(keras.layers.SimpleRNNCell(4), 0.01)
    with pytest.raises(ValueError) as info:
        _train_step(layer, _x())
    message = str(info.value)
    assert "memory_budget=0.01" in message
    alpha = layer.step_alpha
    assert f"memory_budget={1 / (alpha * T):.6g} (a fraction)" in message


def test_slots_below_minimum_for_full_strategy():
    layer = MemoryEfficientRNN(keras.layers.SimpleRNNCell(4), "slots:5", strategy="full")
    with pytest.raises(ValueError) as info:
        _train_step(layer, _x())
    message = str(info.value)
    minimum = 1 + layer.step_alpha * T
    assert "memory_budget='slots:5'" in message
    assert f"'slots:{minimum:g}'" in message


def test_unroll_not_implemented():
    with pytest.raises(NotImplementedError, match=r"keras\.layers\.RNN"):
        MemoryEfficientRNN(keras.layers.LSTMCell(4), unroll=True)


@pytest.mark.parametrize("strategy", ["foo", "MSM", None, 3, ""])
def test_bad_strategy(strategy):
    with pytest.raises(ValueError) as info:
        MemoryEfficientRNN(keras.layers.LSTMCell(4), strategy=strategy)
    assert f"strategy={strategy!r}" in str(info.value)
    assert "msm" in str(info.value)


@pytest.mark.parametrize("alpha", [0.5, 0, -2, float("nan"), float("inf"), True, "3", [2]])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError) as info:
        MemoryEfficientRNN(keras.layers.LSTMCell(4), alpha=alpha)
    assert "alpha" in str(info.value) and f"alpha={alpha!r}" in str(info.value)


def test_alpha_below_measured():
    layer = MemoryEfficientRNN(keras.layers.LSTMCell(4), 0.2, alpha=1.0)
    with pytest.raises(ValueError) as info:
        _train_step(layer, _x())
    assert "alpha=1.0" in str(info.value) and f"{layer.step_alpha:g}" in str(info.value)


def test_training_with_unknown_time_dimension():
    layer = MemoryEfficientRNN(keras.layers.GRUCell(4), 0.2, return_sequences=True)
    # Built outside the failing trace (a Keras layer first built inside a tf.function trace
    # that raises keeps broken variable initialisers, keras.layers.RNN included).
    layer.build((None, None, FEATURES))

    @tf.function(input_signature=[tf.TensorSpec([None, None, FEATURES], tf.float32)])
    def train(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, layer.trainable_variables)

    @tf.function(input_signature=[tf.TensorSpec([None, None, FEATURES], tf.float32)])
    def infer(x):
        return layer(x, training=False)

    x = _x()
    with pytest.raises(ValueError, match="static number of timesteps") as info:
        train(x)
    assert "keras.Input(shape=(T, features))" in str(info.value)
    # Inference accepts any length, and matches keras.layers.RNN on the same cell.
    reference = keras.layers.RNN(layer.cell, return_sequences=True)
    for num_steps in (3, 17):
        x = _x(num_steps=num_steps)
        np.testing.assert_allclose(infer(x), reference(x), rtol=1e-5, atol=1e-5)


def test_bytes_budget_with_unknown_batch():
    layer = MemoryEfficientRNN(keras.layers.LSTMCell(4), "64KiB")
    layer.build((None, T, FEATURES))  # outside the failing trace (see above)

    @tf.function(input_signature=[tf.TensorSpec([None, T, FEATURES], tf.float32)])
    def train(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, layer.trainable_variables)

    with pytest.raises(ValueError) as info:
        train(_x())
    message = str(info.value)
    assert "memory_budget" in message and "batch size" in message
    assert "memory_budget='64KiB'" in message
    # A fraction does not need the batch size.
    layer2 = MemoryEfficientRNN(layer.cell, 0.3)

    @tf.function(input_signature=[tf.TensorSpec([None, T, FEATURES], tf.float32)])
    def train2(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer2(x, training=True))
        return tape.gradient(loss, layer2.trainable_variables)

    train2(_x())
    assert layer2.last_plan.num_steps == T


# --------------------------------------------------------------------------------------
# Plan sizes from the budget
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget,alpha", [(0.05, None), (0.3, None), (1.0, None),
                                          ("25%", None), (0.2, 7.5)])
def test_fraction_budget_slots(budget, alpha):
    layer = MemoryEfficientRNN(keras.layers.LSTMCell(5), budget, alpha=alpha)
    num_steps = 40
    _train_step(layer, _x(num_steps=num_steps))
    fraction = float(budget.rstrip("%")) / 100 if isinstance(budget, str) else budget
    used_alpha = layer.step_alpha if alpha is None else alpha
    plan = layer.last_plan
    assert plan.alpha == pytest.approx(used_alpha)
    assert plan.memory_slots == math.floor(fraction * used_alpha * num_steps + 1e-9)
    assert plan.peak_memory <= plan.memory_slots + 1e-9
    if fraction == 1.0:
        assert plan.forward_evals == num_steps  # standard BPTT's memory: no recomputation


@pytest.mark.parametrize("slots", [1, 2, 7, 2.5])
def test_slots_budget(slots):
    layer = MemoryEfficientRNN(keras.layers.GRUCell(5), f"slots:{slots}")
    _train_step(layer, _x())
    assert layer.last_plan.memory_slots == slots
    assert layer.last_plan.peak_memory <= slots + 1e-9


@pytest.mark.parametrize("budget,expected_bytes", [(1120, 1120), ("1KiB", 1024),
                                                   ("1.5kB", 1500), ("0.002MB", 2000)])
def test_bytes_budget_slots(budget, expected_bytes):
    layer = MemoryEfficientRNN(keras.layers.LSTMCell(5), budget)
    _train_step(layer, _x())
    hidden_bytes = 10 * 4 * BATCH  # (h, c) x float32 x batch
    assert layer.last_plan.memory_slots == pytest.approx(expected_bytes / hidden_bytes)
    assert layer.last_plan.peak_memory <= layer.last_plan.memory_slots + 1e-9


def test_unlimited_budget_stores_everything():
    for cell in (keras.layers.LSTMCell(5),
                 keras.layers.StackedRNNCells([keras.layers.LSTMCell(5),
                                               keras.layers.GRUCell(3)])):
        for strategy in ("msm", "full"):
            layer = MemoryEfficientRNN(cell, None, strategy=strategy)
            _train_step(layer, _x())
            plan = layer.last_plan
            assert plan.forward_evals == T
            assert plan.peak_memory <= plan.memory_slots + 1e-9


# --------------------------------------------------------------------------------------
# Config and saving
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0.05, 1.0, "5%", 123456, "64MiB", "1.5GB", "slots:3",
                                    "slots:2.5", None])
def test_config_round_trip(budget):
    layer = MemoryEfficientRNN(keras.layers.GRUCell(6, reset_after=False), budget,
                               strategy="hsm", alpha=6.5, return_sequences=True,
                               return_state=True, go_backwards=True, stateful=True,
                               zero_output_for_mask=True, name="my_rnn")
    config = layer.get_config()
    assert "unroll" not in config
    for restored in (MemoryEfficientRNN.from_config(config),
                     keras.layers.deserialize(keras.layers.serialize(layer))):
        assert type(restored) is MemoryEfficientRNN
        assert restored.memory_budget == budget
        assert restored.strategy == "hsm" and restored.alpha == 6.5
        assert restored.return_sequences and restored.return_state and restored.go_backwards
        assert restored.stateful and restored.zero_output_for_mask
        assert restored.name == "my_rnn"
        assert type(restored.cell) is keras.layers.GRUCell
        assert restored.cell.units == 6 and restored.cell.reset_after is False
        assert restored.get_config() == config


def test_config_round_trip_defaults_and_custom_cells():
    layer = MemoryEfficientRNN([keras.layers.LSTMCell(3), NestedCell(4)])
    config = layer.get_config()
    restored = MemoryEfficientRNN.from_config(config)
    assert restored.memory_budget == 0.05 and restored.strategy == "msm"
    assert restored.alpha is None and not restored.return_sequences
    assert not restored.return_state and not restored.go_backwards
    assert not restored.stateful and not restored.zero_output_for_mask
    cells = restored.cell.cells
    assert [type(c) for c in cells] == [keras.layers.LSTMCell, NestedCell]
    assert cells[0].units == 3 and cells[1].units == 4
    for original, copy in zip(layer.cell.cells, cells):
        assert copy.get_config() == original.get_config()


def test_keras_save_load_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((T, FEATURES)),
        MemoryEfficientRNN(keras.layers.LSTMCell(6), "slots:3", strategy="hsm",
                           return_sequences=True, name="me"),
        MemoryEfficientRNN(NestedCell(4), 0.3, name="me_nested"),
        keras.layers.Dense(2),
    ])
    x = _x(batch=5)
    model.compile("adam", "mse")
    model.fit(x, np.zeros((5, 2), np.float32), epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    me = loaded.get_layer("me")
    assert isinstance(me, MemoryEfficientRNN)
    assert me.memory_budget == "slots:3" and me.strategy == "hsm"
    assert isinstance(loaded.get_layer("me_nested").cell, NestedCell)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def _xla_train_step(layer):
    @tf.function(jit_compile=True)
    def train_step(inputs):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(inputs, training=True))
        return tape.gradient(loss, layer.trainable_variables)

    return train_step


def test_xla_scratch_state_comes_out_of_the_budget():
    """Under XLA the executor's flat buffer keeps one state-sized scratch area: the layer
    plans with that much less, and a budget too small for it names the reservation."""
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 10, 3)).astype("float32"))
    layer = MemoryEfficientRNN(keras.layers.LSTMCell(4), memory_budget="slots:3")
    layer(x)
    with pytest.raises(ValueError, match=r"memory_budget.*XLA executor's scratch state"):
        _xla_train_step(layer)(x)

    roomy = MemoryEfficientRNN(keras.layers.LSTMCell(4), memory_budget="slots:8")
    roomy(x)
    _xla_train_step(roomy)(x)
    alpha = roomy.step_alpha
    assert roomy.last_plan.memory_slots == pytest.approx(8 - alpha)
    assert roomy.last_plan.peak_memory + alpha <= 8 + 1e-9
