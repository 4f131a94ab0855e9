"""Train an LSTM on a 1000-step task inside 5% of standard BPTT's activation memory.

The task is the adding problem (Hochreiter & Schmidhuber 1997) at T = 1000: every step has
two features, a value and a marker; exactly two steps, anywhere in the sequence, are marked,
and the target, read from the last output only, is the sum of the two marked values. The
network must carry what it saw at a marked step across up to 999 steps. By default the
unmarked steps' values are zero (the "sparse" variant: the marked values are in U[0, 1] and
nothing else is there to add); ``--distractors`` puts U[0, 1] values on every step (the
classic variant, which an LSTM needs thousands of updates to learn at T = 1000, far beyond
this script's time).

Predicting the mean of the target, 1, gives an MSE of Var(u1 + u2) = 2/12 = 0.167 (the
baseline). The task counts as learned when the validation MSE is below 0.05 (``--threshold``);
the script exits with status 1 when it is not.

What it does:

1. measures the peak memory of one training step (forward, backward and optimizer update, in
   a `tf.function`) of the model with `MemoryEfficientRNN` and of the same model with
   `keras.layers.RNN` (standard BPTT) and the same weights, with TensorFlow's CPU BFC
   allocator: ``get_memory_info('CPU:0')['peak']`` after ``reset_memory_stats`` minus the
   bytes in use just before the step; it also checks that both give the same gradients;
2. prints the plan (`layer.last_plan.describe()`);
3. trains with ``model.fit`` until the validation MSE is below ``--stop-at`` (0.01) or the
   epochs run out, and checks the threshold;
4. saves ``model.keras`` and reloads it; exports a SavedModel whose ``serve`` takes any batch
   size and sequence length, reloads it with ``tf.saved_model.load`` and checks that its
   predictions match.

    python examples/train_long_sequence.py [--num-steps 1000] [--budget 0.05] [--epochs 12]
        [--units 16] [--batch-size 64] [--output-dir DIR]

About 3 to 6 minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# The BFC allocator keeps the statistics that tf.config.experimental.get_memory_info reads
# on CPU; it must be chosen before TensorFlow is imported.
os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

try:
    from tf_membptt import MemoryEfficientRNN  # noqa: E402
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tf_membptt import MemoryEfficientRNN  # noqa: E402
from tf_membptt.budget import budget_argument, format_bytes  # noqa: E402

FEATURES = 2  # value, marker


# ----------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------
def adding_problem(num_samples, num_steps, rng, distractors=False):
    """``x``: ``[n, T, 2]`` (value, marker); ``y``: ``[n, 1]``, the sum of the two marked
    values. The two marked steps are distinct and uniformly anywhere in the sequence."""
    x = np.zeros((num_samples, num_steps, FEATURES), np.float32)
    if distractors:
        x[:, :, 0] = rng.uniform(0.0, 1.0, (num_samples, num_steps))
    rows = np.arange(num_samples)
    first = rng.integers(0, num_steps, num_samples)
    second = rng.integers(0, num_steps - 1, num_samples)
    second += second >= first  # distinct from the first
    values = rng.uniform(0.0, 1.0, (num_samples, 2)).astype(np.float32)
    for column, position in enumerate((first, second)):
        x[rows, position, 0] = values[:, column]
        x[rows, position, 1] = 1.0
    y = values.sum(axis=1, keepdims=True)
    return x, y


class AddingBatches(keras.utils.PyDataset):
    """Fresh training batches every epoch (deterministic given the seed)."""

    def __init__(self, num_steps, batch_size, steps_per_epoch, seed, distractors):
        super().__init__()
        self.num_steps, self.batch_size = num_steps, batch_size
        self.steps_per_epoch, self.seed, self.distractors = steps_per_epoch, seed, distractors
        self.epoch = 0

    def __len__(self):
        return self.steps_per_epoch

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return adding_problem(self.batch_size, self.num_steps, rng, self.distractors)

    def on_epoch_end(self):
        self.epoch += 1


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="train_long_sequence")
class ChronoBias(keras.initializers.Initializer):
    """LSTM bias ``[input, forget, cell, output]``: forget-gate bias ``log(U[1, T - 1])``,
    input-gate bias its negative (Tallec & Ollivier, "Can recurrent neural networks warp
    time?", ICLR 2018). Units start with memory time scales up to ``T`` steps instead of the
    ~4 steps of the usual forget bias of 1, so gradients reach back 1000 steps from the
    start of training."""

    def __init__(self, max_steps, seed=0):
        self.max_steps, self.seed = int(max_steps), int(seed)

    def __call__(self, shape, dtype=None):
        units = shape[0] // 4
        rng = np.random.default_rng(self.seed)
        forget = np.log(rng.uniform(1.0, max(self.max_steps - 1, 2), units))
        bias = np.concatenate([-forget, forget, np.zeros(2 * units)])
        return keras.ops.convert_to_tensor(bias, dtype=dtype or "float32")

    def get_config(self):
        return {"max_steps": self.max_steps, "seed": self.seed}


def make_cell(units, num_steps):
    return keras.layers.LSTMCell(units, unit_forget_bias=False,
                                 bias_initializer=ChronoBias(num_steps))


def build_model(num_steps, units, budget, standard=False):
    """``MemoryEfficientRNN(LSTMCell)`` (or ``keras.layers.RNN`` with the same cell config
    when `standard`) followed by ``Dense(1)``. Training needs the static length."""
    cell = make_cell(units, num_steps)
    rnn = (keras.layers.RNN(cell, name="rnn") if standard
           else MemoryEfficientRNN(cell, memory_budget=budget, name="rnn"))
    return keras.Sequential([keras.Input((num_steps, FEATURES)), rnn, keras.layers.Dense(1)],
                            name="adder")


# ----------------------------------------------------------------------------------------
# Measuring one training step
# ----------------------------------------------------------------------------------------
def measure_training_step(model, x, y):
    """Peak bytes of one training step (forward, backward, SGD update) above the bytes in
    use just before it, its time (the fastest of three more steps), and its gradients."""
    optimizer = keras.optimizers.SGD(1e-3)
    optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return grads

    @tf.function
    def grads_only(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        return tape.gradient(loss, model.trainable_variables)

    grads = [g.numpy() for g in grads_only(x, y)]  # before any update
    weights = model.get_weights()
    train_step(x, y)  # trace, and allocate what persists (optimizer slots)
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    train_step(x, y)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    seconds = []
    for _ in range(3):  # the fastest of three: a busy machine only adds time
        start = time.perf_counter()
        train_step(x, y)
        seconds.append(time.perf_counter() - start)
    model.set_weights(weights)
    return peak, min(seconds), grads


# ----------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Train MemoryEfficientRNN(LSTMCell) on the adding problem at T=1000 and "
                    "compare its training-step memory with standard BPTT's.")
    parser.add_argument("--num-steps", "-T", type=int, default=1000,
                        help="sequence length T (default 1000)")
    parser.add_argument("--budget", default="0.05",
                        help="memory_budget: a fraction (0.05), a percentage (5%%), bytes "
                             "(64MiB) or slots:N (default 0.05)")
    parser.add_argument("--epochs", type=int, default=12, help="most epochs (default 12)")
    parser.add_argument("--steps-per-epoch", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--units", type=int, default=16, help="LSTM units (default 16)")
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="validation MSE that counts as learned (default 0.05; "
                             "predicting the mean gives 0.167)")
    parser.add_argument("--stop-at", type=float, default=0.01,
                        help="stop training once the validation MSE is below this "
                             "(default 0.01)")
    parser.add_argument("--distractors", action="store_true",
                        help="classic adding problem: U[0,1] values on every step (learns "
                             "far more slowly)")
    parser.add_argument("--output-dir", default=None,
                        help="where to write model.keras and the SavedModel (default: a new "
                             "temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    budget = budget_argument(args.budget)  # '0.05', '5%', '64MiB', 'slots:N', 'none'
    T = args.num_steps
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="tf_membptt_example_")
    os.makedirs(output_dir, exist_ok=True)
    keras.utils.set_random_seed(args.seed)

    x_val, y_val = adding_problem(512, T, np.random.default_rng([args.seed, 10**6]),
                                  args.distractors)
    baseline = float(np.mean((y_val - y_val.mean()) ** 2))
    variant = "classic (U[0,1] distractors)" if args.distractors else "sparse (zeros elsewhere)"
    print(f"Adding problem, T={T}, {variant}: two marked steps anywhere, target = sum of the "
          f"marked values.")
    print(f"Baseline (predict the mean): validation MSE {baseline:.4f}. Learned means "
          f"validation MSE < {args.threshold}.\n")

    model = build_model(T, args.units, budget)
    layer = model.get_layer("rnn")

    # 1. Memory of one training step, MemoryEfficientRNN vs keras.layers.RNN, same weights.
    x_probe, y_probe = adding_problem(args.batch_size, T, np.random.default_rng(1), False)
    x_probe, y_probe = tf.constant(x_probe), tf.constant(y_probe)
    standard = build_model(T, args.units, budget, standard=True)
    standard.set_weights(model.get_weights())
    peak_std, time_std, grads_std = measure_training_step(standard, x_probe, y_probe)
    peak_me, time_me, grads_me = measure_training_step(model, x_probe, y_probe)
    grad_error = max(float(np.max(np.abs(a - b))) / (float(np.max(np.abs(b))) + 1e-30)
                     for a, b in zip(grads_me, grads_std))
    del standard

    # 2. The plan (made when the training step was traced).
    plan = layer.last_plan
    print(plan.describe())
    hidden_bytes = 2 * args.units * 4 * args.batch_size  # an LSTM state is (h, c)
    print(f"  measured alpha      : {layer.step_alpha:g} (internal state / hidden state)")
    print(f"  stored states       : {format_bytes(plan.peak_memory * hidden_bytes)} at the "
          f"plan's peak (batch {args.batch_size}, float32)")
    print(f"\nPeak memory of one training step (batch {args.batch_size}, measured, TF CPU "
          f"BFC allocator, above the bytes in use before the step):")
    print(f"  keras.layers.RNN (standard BPTT)    : {format_bytes(peak_std):>10}  "
          f"({time_std:.2f} s per step)")
    print(f"  MemoryEfficientRNN, budget {args.budget:<8} : {format_bytes(peak_me):>10}  "
          f"({time_me:.2f} s per step)   = {peak_me / peak_std:.1%} of standard BPTT")
    print(f"  gradients: max |difference| / max |gradient| = {grad_error:.1e}\n")

    # 3. Train.
    target = args.stop_at

    class StopWhenLearned(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs and logs.get("val_loss", np.inf) < target:
                print(f"validation MSE {logs['val_loss']:.4f} < {target:g}: stopping.")
                self.model.stop_training = True

    model.compile(keras.optimizers.Adam(args.learning_rate, clipnorm=1.0), "mse")
    train_start = time.perf_counter()
    model.fit(AddingBatches(T, args.batch_size, args.steps_per_epoch, args.seed,
                            args.distractors),
              epochs=args.epochs, validation_data=(x_val, y_val),
              validation_batch_size=256, callbacks=[StopWhenLearned()], verbose=1)
    train_seconds = time.perf_counter() - train_start
    predictions = model.predict(x_val, batch_size=256, verbose=0)
    val_mse = float(np.mean((predictions - y_val) ** 2))
    within = float(np.mean(np.abs(predictions - y_val) < 0.1))
    print(f"\nValidation MSE {val_mse:.4f} (baseline {baseline:.4f}, threshold "
          f"{args.threshold}); |error| < 0.1 on {within:.1%} of sequences. Training took "
          f"{train_seconds:.0f} s.")

    # 4. Save, export, reload.
    keras_path = os.path.join(output_dir, "model.keras")
    model.save(keras_path)
    reloaded = keras.saving.load_model(keras_path)
    keras_diff = float(np.max(np.abs(reloaded.predict(x_val, batch_size=256, verbose=0)
                                     - predictions)))
    print(f"Saved {keras_path}; reloaded predictions differ by at most {keras_diff:.1e}.")

    export_path = os.path.join(output_dir, "saved_model")
    model.export(export_path, input_signature=[tf.TensorSpec([None, None, FEATURES],
                                                             tf.float32)], verbose=False)
    served = tf.saved_model.load(export_path)
    served_diff = float(np.max(np.abs(served.serve(tf.constant(x_val)).numpy() - predictions)))
    x_short, y_short = adding_problem(7, 50, np.random.default_rng(2), args.distractors)
    short = served.serve(tf.constant(x_short)).numpy()
    print(f"Exported {export_path}; tf.saved_model.load(...).serve matches model.predict to "
          f"{served_diff:.1e}; it also serves other shapes, e.g. [7, 50, 2] -> "
          f"{list(short.shape)}.")

    elapsed = time.perf_counter() - started
    problems = []
    if not val_mse < args.threshold:
        problems.append(f"validation MSE {val_mse:.4f} is not below {args.threshold}")
    if grad_error > 1e-4:
        problems.append(f"gradients differ from standard BPTT's ({grad_error:.1e})")
    if keras_diff > 1e-6:
        problems.append(f".keras round trip changed predictions ({keras_diff:.1e})")
    if served_diff > 1e-4:
        problems.append(f"SavedModel predictions differ ({served_diff:.1e})")
    print(f"\nTotal time {elapsed:.0f} s. Output in {output_dir}.")
    if problems:
        print("FAILED: " + "; ".join(problems))
        return 1
    print(f"OK: learned (MSE {val_mse:.4f} < {args.threshold}) with "
          f"{peak_me / peak_std:.1%} of standard BPTT's training-step memory.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
