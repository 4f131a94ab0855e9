"""How the layer is called decides nothing but what Keras decides: any gradient taken
through it runs the plan (counted evaluations equal the plan's), inference runs no analysis
and stores nothing, random numbers and variable updates are those of keras.layers.RNN, and
what cannot be done exactly is refused where it is asked for."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cell_zoo import AddLossCell, CounterCell, NoiseCell, StatefulRandomCell
from layer_helpers import COUNTER, CountingCell, weighted_loss
from tf_membptt import MemoryEfficientRNN
from tf_membptt.executor import SECOND_ORDER_MESSAGE

T, BATCH, FEATURES = 16, 3, 4


def _x(num_steps=T, seed=0):
    return tf.constant(np.random.default_rng(seed).standard_normal(
        (BATCH, num_steps, FEATURES)).astype(np.float32))


def _counting_layer(budget="slots:3", **kwargs):
    layer = MemoryEfficientRNN(CountingCell(4), budget, **kwargs)
    layer.build((BATCH, T, FEATURES))
    return layer


def _count(fn, *args):
    fn(*args)  # trace (and a first run)
    COUNTER[0] = 0
    result = fn(*args)
    return COUNTER[0], result


# --------------------------------------------------------------------------------------
# Every gradient runs the plan
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", ["absent", False, True])
def test_custom_loop_gradient_runs_the_plan_whatever_training_says(training):
    """A custom loop written without `training=True` (or with `training=False`, e.g. for
    input saliency) still gets the planned gradient: the cell is evaluated exactly as
    often as the plan says, more than T times (it recomputes), and never stores T
    internal states."""
    layer = _counting_layer()
    x = _x()

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x) if training == "absent" else layer(x, training=training)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x] + layer.trainable_variables)

    count, grads = _count(step, x)
    plan = layer.last_plan
    assert plan is not None and plan.forward_evals > T
    assert count == plan.forward_evals
    assert grads[0] is not None and all(np.all(np.isfinite(g)) for g in grads)


def test_graph_mode_tf_gradients_without_a_tape():
    """Graph-mode `tf.gradients` (no tape): the forward stores nothing, the gradient runs
    the first sweep again with the plan's stores and then the plan: forward_evals + T
    evaluations. The input gradient (and so every upstream layer's) is returned."""
    layer = _counting_layer()
    reference = keras.layers.RNN(layer.cell)
    x = _x()

    def gradients(rnn):
        @tf.function
        def step(x):
            loss = weighted_loss(rnn(x, training=True))
            return tf.gradients(loss, [x] + rnn.trainable_variables)
        return step

    count, grads = _count(gradients(layer), x)
    assert count == layer.last_plan.forward_evals + T
    expected = gradients(reference)(x)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_function_differentiated_by_an_outer_tape():
    """`tf.function` around the layer, differentiated by an eager tape around the call:
    the input gradient is there and equals keras.layers.RNN's."""
    layer = MemoryEfficientRNN(keras.layers.GRUCell(4), "slots:3", return_sequences=True)
    reference = keras.layers.RNN(layer.cell, return_sequences=True)
    x = _x()
    results = []
    for rnn in (reference, layer):
        forward = tf.function(lambda x, rnn=rnn: rnn(x, training=True))
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = weighted_loss(forward(x))
        results.append(tape.gradient(loss, [x] + rnn.trainable_variables))
    assert results[1][0] is not None
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert layer.last_plan.forward_evals > T


# --------------------------------------------------------------------------------------
# Inference stores nothing and analyses nothing
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["predict", "eager", "dynamic_length"])
def test_inference_runs_no_analysis(mode):
    """No gradient: no step analysis, no plan, exactly T evaluations (no stores)."""
    cell = CountingCell(4)
    layer = MemoryEfficientRNN(cell, 0.3, return_sequences=True)
    model = keras.Sequential([keras.Input((None if mode == "dynamic_length" else T,
                                           FEATURES)), layer])
    x = _x()
    if mode == "eager":
        COUNTER[0] = 0
        y = layer(x, training=True)  # eagerly, no tape: keras.layers.RNN's own loop
        # keras.layers.RNN evaluates the cell once more before its loop (the output's
        # shape), eagerly too.
        assert COUNTER[0] == T + 1
    else:
        model.predict(x, verbose=0)
        COUNTER[0] = 0
        y = model.predict(x, verbose=0)
        assert COUNTER[0] == T
    assert layer._programs == {} and layer.last_plan is None
    np.testing.assert_allclose(y, keras.layers.RNN(cell, return_sequences=True)(x),
                               rtol=1e-5, atol=1e-6)


def test_gradient_with_a_dynamic_length_is_refused_at_the_call():
    layer = MemoryEfficientRNN(keras.layers.GRUCell(4), 0.3)
    layer.build((None, None, FEATURES))

    @tf.function(input_signature=[tf.TensorSpec([None, None, FEATURES], tf.float32)])
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x))
        return tape.gradient(loss, layer.trainable_variables)

    with pytest.raises(ValueError, match="static number of timesteps") as info:
        step(_x())
    assert "keras.Input(shape=(T, features))" in str(info.value)


# --------------------------------------------------------------------------------------
# Randomness and side effects
# --------------------------------------------------------------------------------------
def test_keras_randomness_is_fresh_per_step_and_call_and_replayed_exactly():
    """`keras.random` with the cell's seed generator: new numbers at every step and call
    (as keras.layers.RNN draws them), and every recomputed step sees the numbers of the
    first sweep: the gradient at the tightest budget equals standard BPTT's
    (`strategy="full"`) bit for bit, and keras.layers.RNN's."""
    keras.utils.set_random_seed(0)
    cell = NoiseCell(4)
    x = _x()
    cell_variables = None

    def run(rnn):
        nonlocal cell_variables
        if cell_variables is None:
            rnn.build(x.shape)
            cell_variables = [v.numpy() for v in cell.variables]
        for v, value in zip(cell.variables, cell_variables):
            v.assign(value)

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                y = rnn(x, training=True)
                loss = weighted_loss(y)
            return y, tape.gradient(loss, cell.trainable_variables)

        return step(x)

    y_full, g_full = run(MemoryEfficientRNN(cell, None, strategy="full",
                                            return_sequences=True))
    y_tight, g_tight = run(MemoryEfficientRNN(cell, "slots:1", return_sequences=True))
    y_keras, g_keras = run(keras.layers.RNN(cell, return_sequences=True))
    for a, b in [(y_full, y_tight), (y_full, y_keras)] + list(zip(g_full, g_tight)) + list(
            zip(g_full, g_keras)):
        np.testing.assert_array_equal(a, b)
    # Noise is really drawn, per step: without it the output would follow from the input.
    y_quiet = keras.layers.RNN(cell, return_sequences=True)(x, training=False)
    assert np.abs(np.asarray(y_full) - np.asarray(y_quiet)).max() > 0.05
    # And per call: the seed generator moved on.
    y_again = keras.layers.RNN(cell, return_sequences=True)(x, training=True)
    assert np.abs(np.asarray(y_again) - np.asarray(y_full)).max() > 0.05


def test_variable_updates_as_keras_leaves_them():
    """A cell that counts its calls and keeps a running mean: after one training call the
    variables hold what keras.layers.RNN leaves (T steps plus its time-zero call), never
    the recomputations' extra updates."""
    cell = CounterCell(4)
    layer = MemoryEfficientRNN(cell, "slots:2")
    x = _x()
    layer.build(x.shape)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, cell.trainable_variables)

    step(x)
    assert layer.last_plan.forward_evals > 2 * T
    assert cell.calls.numpy() == T + 1
    mean_after_one = cell.mean.numpy()
    step(x)
    assert cell.calls.numpy() == 2 * (T + 1)
    # The same two calls through keras.layers.RNN leave the same running mean.
    reference = CounterCell(4)
    rnn = keras.layers.RNN(reference)
    rnn.build(x.shape)
    reference.set_weights([w for w in cell.get_weights()])
    reference.calls.assign(0.0)
    reference.mean.assign(np.zeros(4, np.float32))
    rnn(x, training=True)
    np.testing.assert_allclose(reference.mean.numpy(), mean_after_one, rtol=1e-6, atol=1e-7)


def test_stateful_random_ops_are_refused_with_the_fix():
    layer = MemoryEfficientRNN(StatefulRandomCell(4), 0.3)
    x = _x()
    layer.build(x.shape)
    layer(x)  # inference: keras.layers.RNN's loop, fine
    with pytest.raises(NotImplementedError) as info:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        tape.gradient(loss, layer.trainable_variables)
    message = str(info.value)
    for fragment in ("RandomUniform", "keras.random", "SeedGenerator",
                     "tf.random.stateless_", "keras.layers.RNN"):
        assert fragment in message, fragment


def test_add_loss_in_the_cell_is_refused():
    layer = MemoryEfficientRNN(AddLossCell(4), 0.3)
    model = keras.Sequential([keras.Input((T, FEATURES)), layer, keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with pytest.raises(NotImplementedError, match="add_loss"):
        model.fit(_x(), np.zeros((BATCH, 1), np.float32), verbose=0)


# --------------------------------------------------------------------------------------
# Second-order gradients
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eager", "graph", "tf_gradients"])
def test_second_order_gradient_is_refused_where_it_is_asked_for(mode):
    """A gradient penalty differentiates the gradient: refused with NotImplementedError at
    the outer gradient (the first-order gradient itself works)."""
    layer = MemoryEfficientRNN(keras.layers.LSTMCell(4), 0.3)
    x = _x()
    layer.build(x.shape)

    def penalty_gradient():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(layer(x, training=True))
            input_gradient = inner.gradient(loss, x)
            penalty = tf.reduce_sum(input_gradient ** 2)
        return input_gradient, outer.gradient(penalty, layer.trainable_variables)

    @tf.function
    def penalty_gradient_without_tapes():
        loss = tf.reduce_sum(layer(x, training=True))
        input_gradient = tf.gradients(loss, x)[0]
        penalty = tf.reduce_sum(input_gradient ** 2)
        return input_gradient, tf.gradients(penalty, layer.trainable_variables)

    fn = {"eager": penalty_gradient, "graph": tf.function(penalty_gradient),
          "tf_gradients": penalty_gradient_without_tapes}[mode]
    with pytest.raises(NotImplementedError) as info:
        fn()
    assert SECOND_ORDER_MESSAGE in str(info.value)


# --------------------------------------------------------------------------------------
# Small cells in model.fit
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_cell", [
    lambda: keras.layers.SimpleRNNCell(1),
    lambda: [keras.layers.LSTMCell(1), keras.layers.LSTMCell(1)],
    lambda: [keras.layers.GRUCell(1), keras.layers.GRUCell(4)],
], ids=["simple1", "lstm1_lstm1", "gru1_gru4"])
def test_tiny_cells_train_in_fit_like_keras(make_cell):
    """Units 1-2 with few features: the weight gradients keep their static shapes through
    the loops; training follows keras.layers.RNN's step for step."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, T, 2)).astype(np.float32)
    y = rng.standard_normal((8, 1)).astype(np.float32)
    weights = []
    for make_layer in (lambda c: keras.layers.RNN(c), lambda c: MemoryEfficientRNN(c, 0.3)):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((T, 2)), make_layer(make_cell()),
                                  keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.05), "mse")
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for got, want in zip(weights[1], weights[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
