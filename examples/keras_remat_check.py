"""Does `keras.remat` / `keras.RematScope` help an RNN trained with `model.fit` on TensorFlow?

Runs one LSTM model six ways and prints, for each: whether `model.fit` runs, whether the
gradients equal standard BPTT's, and the measured peak memory of one training step (TF's CPU
BFC allocator: peak bytes minus bytes in use just before the step):

* ``keras.layers.RNN``                       standard BPTT (the reference);
* ``RematScope(mode="full")`` around the cell: `tf.recompute_grad` around every step;
* ``RematScope(mode="full")`` around the layer only: `tf.recompute_grad` around the loop;
* ``RematScope(mode="full")`` around both;
* a cell whose step is wrapped in ``keras.remat`` by hand (positional arguments only);
* ``MemoryEfficientRNN(cell, memory_budget=0.05)``.

    python examples/keras_remat_check.py [--num-steps 500] [--units 64] [--batch 64]
"""

import argparse
import os
import re
import sys

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")  # before TensorFlow is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

try:
    from tf_membptt import MemoryEfficientRNN  # noqa: E402
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tf_membptt import MemoryEfficientRNN  # noqa: E402


class RematLSTMCell(keras.layers.LSTMCell):
    """An LSTMCell whose step is wrapped in `keras.remat` by hand, called with positional
    arguments only."""

    def call(self, inputs, states, training=None):
        def step(x, h, c):
            output, (h, c) = keras.layers.LSTMCell.call(self, x, [h, c], training=training)
            return output, h, c

        output, h, c = keras.remat(step)(inputs, states[0], states[1])
        return output, [h, c]


def _message(error):
    """The innermost message of a Keras error (Keras puts it in bold)."""
    text = str(error)
    match = re.search(r"\x1b\[1m(.*?)\x1b\[0m", text, re.S)
    text = match.group(1) if match else text.strip().splitlines()[0]
    return f"{type(error).__name__}: {' '.join(text.split())[:160]}"


def build(kind, num_steps, units, features, seed=0):
    keras.utils.set_random_seed(seed)
    if kind == "rnn":
        layer = keras.layers.RNN(keras.layers.LSTMCell(units))
    elif kind == "remat cell":
        with keras.RematScope(mode="full"):
            cell = keras.layers.LSTMCell(units)
        layer = keras.layers.RNN(cell)
    elif kind == "remat layer":
        cell = keras.layers.LSTMCell(units)
        with keras.RematScope(mode="full"):
            layer = keras.layers.RNN(cell)
    elif kind == "remat both":
        with keras.RematScope(mode="full"):
            layer = keras.layers.RNN(keras.layers.LSTMCell(units))
    elif kind == "keras.remat(step)":
        layer = keras.layers.RNN(RematLSTMCell(units))
    elif kind == "MemoryEfficientRNN 5%":
        layer = MemoryEfficientRNN(keras.layers.LSTMCell(units), memory_budget=0.05)
    else:
        raise ValueError(kind)
    model = keras.Sequential([keras.Input((num_steps, features)), layer,
                              keras.layers.Dense(1)])
    return model


def gradients_and_peak(model, x, y):
    @tf.function
    def grads(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        return tape.gradient(loss, model.trainable_variables)

    grads(x, y)  # trace and warm up
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    result = grads(x, y)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    return [g.numpy() for g in result], peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-steps", type=int, default=500)
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    features = 8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.num_steps, features)).astype("float32")
    y = rng.normal(size=(args.batch, 1)).astype("float32")
    reference = None
    print(f"T={args.num_steps}, units={args.units}, batch={args.batch}; TensorFlow "
          f"{tf.__version__}, Keras {keras.__version__}")
    for kind in ("rnn", "remat cell", "remat layer", "remat both", "keras.remat(step)",
                 "MemoryEfficientRNN 5%"):
        model = build(kind, args.num_steps, args.units, features)
        model.compile(keras.optimizers.SGD(1e-3), "mse")
        try:
            model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
            fit = "model.fit runs"
        except Exception as error:  # report, and go on with the other variants
            fit = f"model.fit FAILS: {_message(error)}"
        model = build(kind, args.num_steps, args.units, features)  # fresh, same weights
        try:
            grads, peak = gradients_and_peak(model, tf.constant(x), tf.constant(y))
        except Exception as error:
            print(f"{kind:24s} {fit}; tape gradient in a tf.function FAILS: "
                  f"{_message(error)}")
            continue
        if reference is None:
            reference = (grads, peak)
        diff = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
                   for a, b in zip(grads, reference[0]))
        print(f"{kind:24s} {fit}; max |grad - BPTT grad| / max|BPTT grad| = {diff:.1e}; "
              f"peak {peak / 2**20:8.2f} MiB ({peak / reference[1]:.0%} of keras.layers.RNN)")


if __name__ == "__main__":
    main()
