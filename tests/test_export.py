"""Saving, exporting and serving `MemoryEfficientRNN` models: `.keras` round trips,
SavedModel export (`model.export`, `keras.export.ExportArchive`), serving any batch size and
length, fine-tuning a reloaded SavedModel, and `keras.layers.Bidirectional`."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_membptt import MemoryEfficientRNN  # noqa: E402

T, F, UNITS, BATCH = 12, 3, 5, 4


def _data(batch=BATCH, steps=T, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, steps, F)).astype("float32")
    y = rng.normal(size=(batch, 1)).astype("float32")
    return x, y


def _model(steps=T, budget=0.3, standard=False, seed=0):
    keras.utils.set_random_seed(seed)
    cell = keras.layers.LSTMCell(UNITS)
    rnn = (keras.layers.RNN(cell, name="rnn") if standard
           else MemoryEfficientRNN(cell, memory_budget=budget, name="rnn"))
    return keras.Sequential([keras.Input((steps, F)), rnn, keras.layers.Dense(1)])


_TRAINED = {}


def _trained_model():
    """A model trained (once per module) with a fixed T: a fresh copy of its weights."""
    if "weights" not in _TRAINED:
        model = _model()
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        x, y = _data()
        model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
        assert model.get_layer("rnn").last_plan is not None  # the planned gradient ran
        _TRAINED["weights"] = model.get_weights()
    model = _model()
    model.set_weights(_TRAINED["weights"])
    return model


def _gradients(model, x, y, variables=None):
    variables = model.trainable_variables if variables is None else variables
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
    return [g.numpy() for g in tape.gradient(loss, variables)]


def _assert_all_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------
# SavedModel export and serving
# ----------------------------------------------------------------------------------------
def test_model_export_default_signature(tmp_path):
    model = _trained_model()
    model.export(str(tmp_path / "sm"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "sm"))
    x, _ = _data(batch=3, seed=1)
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(),
                               model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_exported_serve_accepts_any_batch_and_length(tmp_path):
    """A model trained with a fixed T, exported with a [None, None, F] signature, serves
    any batch size and any length, and agrees with keras.layers.RNN with the same weights."""
    model = _trained_model()
    path = str(tmp_path / "sm")
    model.export(path, input_signature=[tf.TensorSpec([None, None, F], tf.float32)],
                 verbose=False)
    served = tf.saved_model.load(path)
    spec = list(served.signatures["serve"].structured_input_signature[1].values())[0]
    assert spec.shape.as_list() == [None, None, F]

    reference = _model(steps=None, standard=True)
    reference.set_weights(model.get_weights())
    for batch, steps in [(BATCH, T), (1, 1), (7, 3), (2, 3 * T + 1)]:
        x, _ = _data(batch=batch, steps=steps, seed=batch + steps)
        got = served.serve(tf.constant(x)).numpy()
        assert got.shape == (batch, 1)
        np.testing.assert_allclose(got, reference.predict(x, verbose=0), rtol=1e-5,
                                   atol=1e-6)
        # The signature (what TF Serving calls) too.
        out = served.signatures["serve"](tf.constant(x))
        np.testing.assert_allclose(list(out.values())[0].numpy(), got, rtol=1e-6, atol=1e-7)


def _export_with_training_endpoints(model, path, custom_gradients):
    """An ExportArchive with `serve` (inference, any shape), `train_call` (the model in
    training mode, static T) and `loss_and_gradients` (the planned backward traced into
    the SavedModel)."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda x: model(x, training=False),
                         input_signature=[tf.TensorSpec([None, None, F], tf.float32)])
    archive.add_endpoint("train_call", lambda x: model(x, training=True),
                         input_signature=[tf.TensorSpec([None, T, F], tf.float32)])

    def loss_and_gradients(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        return [loss] + tape.gradient(loss, model.trainable_variables)

    archive.add_endpoint("loss_and_gradients", loss_and_gradients,
                         input_signature=[tf.TensorSpec([None, T, F], tf.float32),
                                          tf.TensorSpec([None, 1], tf.float32)])
    archive.add_variable_collection("trainable_variables", model.trainable_variables)
    archive.write_out(path, verbose=False, options=tf.saved_model.SaveOptions(
        experimental_custom_gradients=custom_gradients))


def test_reloaded_saved_model_fine_tunes_with_the_planned_gradient(tmp_path):
    """Fine-tuning a reloaded SavedModel: an exported gradient endpoint (the planned
    backward is traced into the SavedModel) gives the original model's gradients, and
    applying them to the restored variables trains it like the original."""
    model = _trained_model()
    path = str(tmp_path / "sm")
    # The gradient graph is explicit in `loss_and_gradients`: it needs no saved custom
    # gradient (the test below saves it too).
    _export_with_training_endpoints(model, path, custom_gradients=False)
    restored = tf.saved_model.load(path)
    x, y = _data(seed=3)
    expected = _gradients(model, x, y)
    result = restored.loss_and_gradients(tf.constant(x), tf.constant(y))
    _assert_all_close([g.numpy() for g in result[1:]], expected)
    # Same as standard BPTT, too.
    standard = _model(standard=True)
    standard.set_weights(model.get_weights())
    _assert_all_close(expected, _gradients(standard, x, y))

    # A few SGD steps on the restored variables = the same steps on the original model.
    original_optimizer = keras.optimizers.SGD(0.1)
    restored_variables = list(restored.trainable_variables)
    assert [tuple(v.shape) for v in restored_variables] == \
        [tuple(v.shape) for v in model.trainable_variables]
    for step in range(3):
        x, y = _data(seed=10 + step)
        grads = restored.loss_and_gradients(tf.constant(x), tf.constant(y))[1:]
        for variable, grad in zip(restored_variables, grads):
            variable.assign_sub(0.1 * grad)
        original_optimizer.apply(
            [tf.constant(g) for g in _gradients(model, x, y)], model.trainable_variables)
    _assert_all_close([v.numpy() for v in restored_variables],
                      [v.numpy() for v in model.trainable_variables], rtol=1e-5, atol=1e-6)
    x, _ = _data(batch=2, steps=5, seed=20)
    np.testing.assert_allclose(restored.serve(tf.constant(x)).numpy(),
                               model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_tape_gradient_through_reloaded_training_function(tmp_path):
    """With `experimental_custom_gradients=True` (TensorFlow's default) the layer's custom
    gradient is saved with the model: a tape through a reloaded training endpoint gets the
    planned gradient (the saved one recomputes the first sweep: it may not capture the
    stored states), equal to the original model's."""
    model = _model()
    path = str(tmp_path / "sm")
    _export_with_training_endpoints(model, path, custom_gradients=True)
    restored = tf.saved_model.load(path)
    x, y = _data(seed=3)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(restored.train_call(tf.constant(x)) - y))
    grads = tape.gradient(loss, list(restored.trainable_variables))
    _assert_all_close([g.numpy() for g in grads], _gradients(model, x, y))


# ----------------------------------------------------------------------------------------
# .keras
# ----------------------------------------------------------------------------------------
def test_keras_file_round_trip_is_exact(tmp_path):
    model = _model(budget="slots:9")
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)

    layer, loaded_layer = model.get_layer("rnn"), loaded.get_layer("rnn")
    assert type(loaded_layer) is MemoryEfficientRNN
    # (JSON-normalized: a saved shape tuple comes back as a list.)
    assert json.loads(json.dumps(loaded_layer.get_config())) == \
        json.loads(json.dumps(layer.get_config()))
    assert loaded_layer.memory_budget == "slots:9" and loaded_layer.strategy == "msm"
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # The optimizer state is restored too: the next fit step is identical.
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    _assert_all_close(_gradients(loaded, x, y), _gradients(model, x, y), rtol=0, atol=0)
    assert loaded_layer.last_plan == layer.last_plan
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("budget", [0.05, "25%", "64KiB", None])
def test_keras_round_trip_keeps_every_budget_form(tmp_path, budget):
    layer = MemoryEfficientRNN(keras.layers.GRUCell(3), memory_budget=budget,
                               strategy="hsm", return_sequences=True, alpha=4)
    model = keras.Sequential([keras.Input((T, F), batch_size=BATCH), layer])
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path).layers[0]
    assert type(loaded) is MemoryEfficientRNN
    assert (loaded.memory_budget, loaded.strategy, loaded.alpha, loaded.return_sequences) == \
        (budget, "hsm", 4, True)


# ----------------------------------------------------------------------------------------
# Bidirectional
# ----------------------------------------------------------------------------------------
def _bidirectional(standard, return_sequences, seed=0):
    keras.utils.set_random_seed(seed)

    def rnn():
        cell = keras.layers.LSTMCell(UNITS)
        if standard:
            return keras.layers.RNN(cell, return_sequences=return_sequences)
        return MemoryEfficientRNN(cell, memory_budget=0.3, return_sequences=return_sequences)

    head = [keras.layers.GlobalAveragePooling1D()] if return_sequences else []
    return keras.Sequential([keras.Input((T, F)), keras.layers.Bidirectional(rnn(),
                                                                             name="bi")]
                            + head + [keras.layers.Dense(1)])


@pytest.mark.parametrize("return_sequences", [False, True])
def test_bidirectional_gradients_equal_keras_rnn(return_sequences):
    model = _bidirectional(False, return_sequences)
    standard = _bidirectional(True, return_sequences, seed=1)
    standard.set_weights(model.get_weights())
    x, y = _data(seed=5)
    np.testing.assert_allclose(model(x, training=True).numpy(),
                               standard(x, training=True).numpy(), rtol=1e-5, atol=1e-6)
    _assert_all_close(_gradients(model, x, y), _gradients(standard, x, y))
    bi = model.get_layer("bi")
    assert type(bi.forward_layer) is MemoryEfficientRNN
    assert type(bi.backward_layer) is MemoryEfficientRNN and bi.backward_layer.go_backwards
    # Both directions ran their plans.
    assert bi.forward_layer.last_plan is not None and bi.backward_layer.last_plan is not None
    assert bi.forward_layer.last_plan.num_steps == T


def test_bidirectional_trains_and_round_trips(tmp_path):
    model = _bidirectional(False, True)
    model.compile(keras.optimizers.Adam(3e-2), "mse")
    x, y = _data(batch=16, seed=6)
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=16, epochs=4, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    assert np.isfinite(after) and after < before
    path = str(tmp_path / "bi.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    bi = loaded.get_layer("bi")
    assert type(bi.forward_layer) is MemoryEfficientRNN
    assert type(bi.backward_layer) is MemoryEfficientRNN and bi.backward_layer.go_backwards
    assert bi.forward_layer.memory_budget == 0.3
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    _assert_all_close(_gradients(loaded, x, y), _gradients(model, x, y), rtol=0, atol=0)
