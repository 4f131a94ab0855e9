"""Dropout and recurrent dropout in training: the masks are drawn once per call (by
keras.layers.RNN.call) and the recomputed steps read the same masks as the first sweep.
So under the same seed the gradients equal standard BPTT's (`strategy="full"`) and
keras.layers.RNN's, whatever the budget; a recomputation drawing fresh masks would not."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from layer_helpers import assert_all_close, weighted_loss
from tf_membptt import MemoryEfficientRNN

T, BATCH, FEATURES = 16, 3, 4


def _make_cell(kind):
    if kind == "lstm":
        return keras.layers.LSTMCell(5, dropout=0.3, recurrent_dropout=0.4)
    return keras.layers.GRUCell(5, dropout=0.3, recurrent_dropout=0.4, reset_after=True)


def _run(kind, budget=None, strategy="msm", reference=False, mode="graph"):
    """Builds an identical layer under a fixed seed and returns (outputs, gradients,
    inference outputs, layer)."""
    keras.utils.set_random_seed(1234)
    cell = _make_cell(kind)
    if reference:
        layer = keras.layers.RNN(cell, return_sequences=True)
    else:
        layer = MemoryEfficientRNN(cell, budget, strategy=strategy, return_sequences=True)
    x = tf.constant(np.random.default_rng(5).standard_normal((BATCH, T, FEATURES)),
                    tf.float32)
    layer.build(x.shape)

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = weighted_loss(y)
        return y, tape.gradient(loss, [x] + cell.trainable_variables)

    fn = tf.function(step) if mode == "graph" else step
    y, grads = fn(x)
    return y, grads, layer(x, training=False), layer


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropout_gradients_equal_full_bptt(kind):
    y_full, g_full, y_infer, _ = _run(kind, strategy="full")
    # Dropout is really active in training (else the test below could not fail).
    assert np.abs(np.asarray(y_full) - np.asarray(y_infer)).max() > 1e-2
    y_ref, g_ref, _, _ = _run(kind, reference=True)
    assert_all_close([y_ref], [y_full], "outputs vs keras.layers.RNN")
    assert_all_close(g_ref, g_full, "gradients vs keras.layers.RNN")
    for strategy, budget in [("msm", "slots:2"), ("msm", 0.1), ("hsm", 0.15), ("ism", 0.5)]:
        y, grads, _, layer = _run(kind, budget, strategy)
        assert layer.last_plan.forward_evals > T  # steps were recomputed
        assert_all_close([y_full], [y], f"outputs {strategy} {budget}")
        assert_all_close(g_full, grads, f"gradients {strategy} {budget}")


def test_dropout_gradients_equal_full_bptt_eager():
    _, g_full, _, _ = _run("lstm", strategy="full", mode="eager")
    _, grads, _, layer = _run("lstm", "slots:3", mode="eager")
    assert layer.last_plan.forward_evals > T
    assert_all_close(g_full, grads, "gradients")


def test_dropout_masks_differ_between_calls():
    """Each training call draws new masks (the seed advances): the equality above is not
    an artefact of dropout being constant."""
    keras.utils.set_random_seed(3)
    layer = MemoryEfficientRNN(_make_cell("lstm"), 0.2, return_sequences=True)
    x = tf.constant(np.random.default_rng(0).standard_normal((BATCH, T, FEATURES)),
                    tf.float32)
    first, second = layer(x, training=True), layer(x, training=True)
    assert np.abs(np.asarray(first) - np.asarray(second)).max() > 1e-3
