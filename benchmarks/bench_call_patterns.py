"""Activation memory and time of one training step, by the way the layer is called.

    python benchmarks/bench_call_patterns.py            # T = 1000, LSTMCell(512), 5% (~4 min)
    python benchmarks/bench_call_patterns.py --quick    # T = 200, LSTMCell(64): a smoke run

The model is ``Input((T, 32)) -> RNN -> Dense(1)``, batch 32, MSE loss, SGD. Each call
pattern runs one training step of the same model twice: with `keras.layers.RNN(cell)`
(standard BPTT) and with `MemoryEfficientRNN(cell, memory_budget)`; the weights are the
same. Patterns:

* ``model.fit``: `model.train_on_batch` (the `train_function` that `fit` runs);
* ``loop, training=True``: a custom loop in a `tf.function`, ``model(x, training=True)``
  under a `GradientTape`, gradients applied;
* ``loop, no training``: the same loop written without the `training` argument (as many
  loops are); before the layer took the planned path whatever `training` said, this
  pattern ran standard BPTT;
* ``loop, training=False``: `training=False` under a tape (input saliency style);
* ``outer tape``: a `tf.function` forward differentiated by an eager tape around its call
  (the layer's deferred path: the gradient recomputes the first sweep).

Activation memory = the CPU BFC allocator's peak during the step minus the bytes in use just
before it (`TF_CPU_ALLOCATOR_USE_BFC=true` is set before TensorFlow is imported; a 2 GiB
block is allocated and freed first, so that peaks are not rounded up to whole allocator
chunks). Medians over `--rounds` steps after a warm-up step. Writes
``<out-dir>/call_patterns.{json,md}``.
"""

from __future__ import annotations

import os

os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"  # before TensorFlow is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from _bench import REPO_ROOT, log, reserve_allocator, timed_run  # noqa: E402
from tf_membptt import MemoryEfficientRNN  # noqa: E402

PATTERNS = ("model.fit", "loop, training=True", "loop, no training", "loop, training=False",
            "outer tape")


def make_model(cell, standard, budget, num_steps, features, batch):
    rnn = keras.layers.RNN(cell) if standard else MemoryEfficientRNN(cell, budget)
    model = keras.Sequential([keras.Input((num_steps, features), batch_size=batch), rnn,
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(1e-4), "mse")
    return model, rnn


def step_function(pattern, model, x, y):
    optimizer = model.optimizer
    variables = model.trainable_variables

    def apply(loss, tape):
        grads = tape.gradient(loss, variables)
        optimizer.apply(grads, variables)
        return loss

    if pattern == "model.fit":
        return lambda: model.train_on_batch(x, y, return_dict=False)
    if pattern == "outer tape":
        forward = tf.function(lambda x: model(x, training=True))

        def outer():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(forward(x) - y))
            return apply(loss, tape)

        return outer
    training = {"loop, training=True": True, "loop, training=False": False,
                "loop, no training": None}[pattern]

    @tf.function
    def loop(x, y):
        with tf.GradientTape() as tape:
            prediction = model(x) if training is None else model(x, training=training)
            loss = tf.reduce_mean(tf.square(prediction - y))
        return apply(loss, tape)

    return lambda: loop(x, y)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-steps", "-T", type=int, default=1000)
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="T = 200, LSTMCell(64)")
    parser.add_argument("--reserve-mib", type=int, default=2048)
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.num_steps, args.units = 200, 64
    reserve_allocator(args.reserve_mib)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((args.batch, args.num_steps, args.features))
                    .astype(np.float32))
    y = tf.constant(rng.standard_normal((args.batch, 1)).astype(np.float32))
    results = []
    for pattern in PATTERNS:
        entry = {"pattern": pattern}
        for standard in (True, False):
            keras.utils.set_random_seed(0)
            cell = keras.layers.LSTMCell(args.units)
            model, rnn = make_model(cell, standard, args.budget, args.num_steps,
                                    args.features, args.batch)
            step = step_function(pattern, model, x, y)
            step()  # warm-up: trace, optimizer slots
            times, peaks, _ = zip(*(timed_run(step) for _ in range(args.rounds)))
            key = "keras" if standard else "membptt"
            entry[key] = {"time_s": statistics.median(times),
                          "activation_bytes": int(statistics.median(peaks)),
                          "times_s": list(times), "peaks_bytes": list(peaks)}
            if not standard:
                plan = rnn.last_plan
                entry[key].update(forward_evals=plan.forward_evals,
                                  stored_states_slots=plan.peak_memory,
                                  alpha=rnn.step_alpha)
            log(f"{pattern:24s} {key:8s} {entry[key]['activation_bytes'] / 2**20:8.1f} MiB "
                f"{entry[key]['time_s']:.3f} s")
        entry["memory_ratio"] = (entry["membptt"]["activation_bytes"]
                                 / entry["keras"]["activation_bytes"])
        entry["time_ratio"] = entry["membptt"]["time_s"] / entry["keras"]["time_s"]
        results.append(entry)
    write(results, args)
    return 0


def write(results, args):
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = {"python": platform.python_version(), "tensorflow": tf.__version__,
         "keras": keras.__version__, "cpus": os.cpu_count(),
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (out_dir / "call_patterns.json").write_text(json.dumps(
        {"machine": m, "args": vars(args), "results": results}, indent=1))
    lines = [
        "# One training step by call pattern",
        "",
        f"Run {m['date']} on {m['cpus']} CPUs, TensorFlow {m['tensorflow']}, Keras "
        f"{m['keras']}. `python benchmarks/bench_call_patterns.py"
        f"{' --quick' if args.quick else ''}`: `LSTMCell({args.units})`, T = "
        f"{args.num_steps}, batch {args.batch}, {args.features} features, budget "
        f"{args.budget:g}; medians of {args.rounds} steps after a warm-up.",
        "",
        "| call pattern | keras.layers.RNN: memory | time | MemoryEfficientRNN: memory | "
        "time | memory ratio | time ratio | forward evals |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in results:
        k, me = e["keras"], e["membptt"]
        lines.append(
            f"| {e['pattern']} | {k['activation_bytes'] / 2**20:.1f} MiB | {k['time_s']:.2f} s "
            f"| {me['activation_bytes'] / 2**20:.1f} MiB | {me['time_s']:.2f} s | "
            f"{100 * e['memory_ratio']:.1f}% | {e['time_ratio']:.2f}x | {me['forward_evals']} |")
    (out_dir / "call_patterns.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
