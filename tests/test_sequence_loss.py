"""A head and a loss at every step, inside the recurrence (`head=`, `loss=`, `targets=`):
the loss and its gradients equal those of the unfused model built from the same layers
(`keras.layers.RNN(cell, return_sequences=True)`, then the head, then the Keras loss over
the output sequence), in every mode and with masks; `model.fit` trains on it step for step
like the unfused model; the layer round-trips through `.keras`; without targets it returns
the head's outputs (logits for sampling)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_membptt import MemoryEfficientRNN

VOCAB, EMBED, UNITS, T, BATCH = 11, 6, 8, 15, 4


def _data(seed=0, batch=BATCH):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, VOCAB, (batch, T)).astype("int32"),
            rng.integers(0, VOCAB, (batch, T)).astype("int32"))


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _layers(seed=0):
    keras.utils.set_random_seed(seed)
    embedding = keras.layers.Embedding(VOCAB, EMBED)
    cell = keras.layers.LSTMCell(UNITS)
    head = keras.layers.Dense(VOCAB)
    return embedding, cell, head


def _unfused_gradients(embedding, cell, head, tokens, targets, mask=None, go_backwards=False):
    rnn = keras.layers.RNN(cell, return_sequences=True, go_backwards=go_backwards)
    with tf.GradientTape() as tape:
        logits = head(rnn(embedding(tokens), mask=mask))
        if go_backwards:  # the outputs are in processing order
            logits = tf.reverse(logits, [1])
        # The loss of every step, averaged over the unmasked ones (the loss function, not
        # a Loss object: Keras would also apply the mask it attaches to the RNN's output,
        # which keeps the input order when the outputs are reversed).
        per_step = keras.losses.sparse_categorical_crossentropy(targets, logits,
                                                                from_logits=True)
        weights = tf.ones_like(per_step) if mask is None else tf.cast(mask, tf.float32)
        loss = tf.reduce_sum(per_step * weights) / tf.reduce_sum(weights)
    variables = (embedding.trainable_variables + cell.trainable_variables
                 + head.trainable_variables)
    return loss, tape.gradient(loss, variables)


def _fused_gradients(layer, embedding, tokens, targets, mode, mask=None):
    variables = (embedding.trainable_variables + layer.cell.trainable_variables
                 + layer.head.trainable_variables)

    def step():
        with tf.GradientTape() as tape:
            per_sample = layer(embedding(tokens), targets=targets, mask=mask)
            loss = tf.add_n(layer.losses)
        return loss, per_sample, tape.gradient(loss, variables)

    fn = {"eager": step, "graph": tf.function(step),
          "xla": tf.function(step, jit_compile=True)}[mode]
    return fn()


def _assert_close(expected, actual, rtol=1e-5, atol=1e-6):
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(np.asarray(tf.convert_to_tensor(a)),
                                   np.asarray(tf.convert_to_tensor(e)), rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode,budget", [("graph", "slots:2"), ("graph", 0.5),
                                         ("graph", 1.0), ("eager", "slots:3"),
                                         ("xla", 0.6)])
def test_fused_loss_equals_the_unfused_model(mode, budget):
    embedding, cell, head = _layers()
    tokens, targets = _data()
    expected_loss, expected = _unfused_gradients(embedding, cell, head, tokens, targets)
    layer = MemoryEfficientRNN(cell, budget, head=head, loss=_loss())
    loss, per_sample, actual = _fused_gradients(layer, embedding, tokens, targets, mode)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    assert per_sample.shape == (BATCH,)
    np.testing.assert_allclose(np.mean(per_sample), expected_loss, rtol=1e-6)
    _assert_close(expected, actual)
    if budget != 1.0:
        assert layer.last_plan.forward_evals > T  # the head was recomputed too


@pytest.mark.parametrize("go_backwards", [False, True])
def test_fused_loss_with_a_mask(go_backwards):
    """Masked steps add no loss: the mean is over the unmasked steps, as a Keras loss
    weighted by the mask averages them."""
    embedding, cell, head = _layers(1)
    tokens, targets = _data(1)
    mask = tf.constant(np.random.default_rng(2).random((BATCH, T)) > 0.35)
    expected_loss, expected = _unfused_gradients(embedding, cell, head, tokens, targets,
                                                 mask, go_backwards)
    layer = MemoryEfficientRNN(cell, "slots:3", head=head, loss=_loss(),
                               go_backwards=go_backwards)
    loss, per_sample, actual = _fused_gradients(layer, embedding, tokens, targets, "graph",
                                                mask)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    _assert_close(expected, actual)


def _models(budget=0.3):
    keras.utils.set_random_seed(0)
    tokens = keras.Input((T,), dtype="int32")
    hidden = keras.layers.Embedding(VOCAB, EMBED)(tokens)
    hidden = keras.layers.RNN(keras.layers.LSTMCell(UNITS), return_sequences=True)(hidden)
    unfused = keras.Model(tokens, keras.layers.Dense(VOCAB)(hidden))
    unfused.compile(keras.optimizers.SGD(0.5), _loss())

    keras.utils.set_random_seed(0)
    tokens = keras.Input((T,), dtype="int32")
    targets = keras.Input((T,), dtype="int32")
    hidden = keras.layers.Embedding(VOCAB, EMBED)(tokens)
    layer = MemoryEfficientRNN(keras.layers.LSTMCell(UNITS), budget,
                               head=keras.layers.Dense(VOCAB), loss=_loss(), name="lm")
    fused = keras.Model([tokens, targets], layer(hidden, targets=targets))
    fused.compile(keras.optimizers.SGD(0.5))  # the layer adds its loss
    return unfused, fused


def test_fit_follows_the_unfused_model_and_round_trips(tmp_path):
    unfused, fused = _models()
    tokens, targets = _data(3, batch=16)
    expected = unfused.fit(tokens, targets, batch_size=BATCH, epochs=3, shuffle=False,
                           verbose=0).history["loss"]
    actual = fused.fit([tokens, targets], batch_size=BATCH, epochs=3, shuffle=False,
                       verbose=0).history["loss"]
    np.testing.assert_allclose(actual, expected, rtol=1e-5)
    _assert_close(unfused.get_weights(), fused.get_weights())
    assert fused.get_layer("lm").last_plan.forward_evals > T

    path = str(tmp_path / "lm.keras")
    fused.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("lm")
    assert isinstance(layer.head, keras.layers.Dense) and layer.head.units == VOCAB
    assert isinstance(layer.loss, keras.losses.SparseCategoricalCrossentropy)
    np.testing.assert_allclose(loaded.evaluate([tokens, targets], batch_size=BATCH, verbose=0),
                               fused.evaluate([tokens, targets], batch_size=BATCH, verbose=0),
                               rtol=1e-6)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_without_targets_the_layer_returns_the_heads_outputs(mode):
    """The second path, for inference: per-step logits (e.g. for sampling), as the unfused
    model computes them."""
    embedding, cell, head = _layers()
    tokens, _ = _data()
    layer = MemoryEfficientRNN(cell, 0.3, head=head, loss=_loss(), return_sequences=True,
                               return_state=True)
    call = (lambda x: layer(x)) if mode == "eager" else tf.function(lambda x: layer(x))
    logits, h, c = call(embedding(tokens))
    reference = keras.layers.RNN(cell, return_sequences=True, return_state=True)
    outputs, h_ref, c_ref = reference(embedding(tokens))
    assert logits.shape == (BATCH, T, VOCAB)
    _assert_close([head(outputs), h_ref, c_ref], [logits, h, c])
    assert layer.compute_output_shape((BATCH, T, EMBED))[0] == (BATCH, T, VOCAB)
    assert layer.compute_output_shape((BATCH, T, EMBED), targets_shape=(BATCH, T))[0] == \
        (BATCH,)


def test_head_after_zero_output_for_mask_as_unfused():
    """A masked step's output is zeroed before the head (as keras.layers.RNN zeroes it and
    the head follows): the head's output there is the head of zeros."""
    embedding, cell, head = _layers()
    tokens, _ = _data()
    mask = tf.constant(np.random.default_rng(4).random((BATCH, T)) > 0.4)
    layer = MemoryEfficientRNN(cell, 0.3, head=head, return_sequences=True,
                               zero_output_for_mask=True)
    reference = keras.layers.RNN(cell, return_sequences=True, zero_output_for_mask=True)
    x = embedding(tokens)
    expected = head(reference(x, mask=mask))
    actual = tf.function(lambda x: layer(x, mask=mask))(x)
    _assert_close([expected], [actual])


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="head="):
        MemoryEfficientRNN(keras.layers.LSTMCell(3), head="dense")
    with pytest.raises(ValueError, match="loss="):
        MemoryEfficientRNN(keras.layers.LSTMCell(3), loss="no such loss")
    layer = MemoryEfficientRNN(keras.layers.LSTMCell(3))
    with pytest.raises(ValueError, match="targets"):
        layer(tf.zeros([2, 4, 3]), targets=tf.zeros([2, 4], tf.int32))
