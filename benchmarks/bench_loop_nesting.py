"""What a step costs in a loop nested inside another loop, in graph mode.

    python benchmarks/bench_loop_nesting.py             # ~1 min on 2 cores
    python benchmarks/bench_loop_nesting.py --units 32 --rounds 101

The gradient of a plan runs every recomputed step in a loop nested in the loop over the
plan's segments (`sweeps._segment_loop`), while keras.layers.RNN's forward, which the plan's
time prediction counts a recomputed step as, is one top-level loop. This script measures
that difference alone, on a hand-written LSTM step (batch 32, 32 input features, no store,
no gradient) in a `tf.function` without XLA, T = 26 x 38 = 988 steps: the shape of the
gradient of a 5% plan at T = 1000 (26 segments of about 38 recomputed steps). Variants:

* ``one loop``: T iterations of one `tf.while_loop`;
* ``nested``: 26 iterations of an outer loop (``parallel_iterations=1``, as the segment
  loop) each running an inner loop of 38 steps (TensorFlow's default
  ``parallel_iterations=10``, as the advance loop);
* ``nested, inner parallel_iterations=1``;
* ``one loop, 10 more loop variables``: 10 small tensors passed through unchanged (the
  executor's loops carry more variables than keras.layers.RNN's).

Times are medians over alternated rounds (each round runs every variant once, in a rotated
order), in microseconds per step. Writes ``<out-dir>/loop_nesting.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from _bench import REPO_ROOT, time_variants, write_per_step_tables  # noqa: E402
from bench_speed import machine  # noqa: E402

BATCH, FEATURES, OUTER, INNER = 32, 32, 26, 38
NUM_STEPS = OUTER * INNER
VARIANTS = ("one loop", "nested", "nested, inner parallel_iterations=1",
            "one loop, 10 more loop variables")


def make_loop(units, variant):
    rng = np.random.default_rng(0)
    kernel = tf.constant(rng.standard_normal((FEATURES, 4 * units)) * 0.1, tf.float32)
    recurrent = tf.constant(rng.standard_normal((units, 4 * units)) * 0.1, tf.float32)
    bias = tf.zeros([4 * units])
    extra = tuple(tf.zeros([8]) for _ in range(10)) if variant.endswith("variables") else ()

    def step(t, h, c, xs):
        z = tf.nn.bias_add(tf.gather(xs, t, axis=1) @ kernel + h @ recurrent, bias)
        i, f, g, o = tf.split(z, 4, axis=1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        return tf.sigmoid(o) * tf.tanh(c), c

    @tf.function
    def loop(xs):
        h = c = tf.zeros([BATCH, units])
        if not variant.startswith("nested"):
            def body(t, h, c, *passed):
                return (t + 1,) + step(t, h, c, xs) + passed

            result = tf.while_loop(lambda t, *_: t < NUM_STEPS, body, (0, h, c) + extra,
                                   maximum_iterations=NUM_STEPS)
            return result[1]
        inner_parallel = 1 if variant.endswith("=1") else 10

        def outer(k, h, c):
            def inner(t, h, c):
                return (t + 1,) + step(t, h, c, xs)

            _, h, c = tf.while_loop(lambda t, *_: t < (k + 1) * INNER, inner,
                                    (k * INNER, h, c), maximum_iterations=INNER,
                                    parallel_iterations=inner_parallel)
            return k + 1, h, c

        _, h, _ = tf.while_loop(lambda k, *_: k < OUTER, outer, (0, h, c),
                                maximum_iterations=OUTER, parallel_iterations=1)
        return h

    return loop


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", default="32,128")
    parser.add_argument("--rounds", type=int, default=61)
    parser.add_argument("--out-dir", type=pathlib.Path,
                        default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    results = []
    for units in [int(u) for u in args.units.split(",")]:
        xs = tf.random.normal([BATCH, NUM_STEPS, FEATURES])
        loops = {v: make_loop(units, v) for v in VARIANTS}
        outputs = {v: loop(xs).numpy() for v, loop in loops.items()}  # trace, warm up
        for v in VARIANTS[1:]:  # the same steps in every variant
            np.testing.assert_array_equal(outputs[v], outputs["one loop"])
        results.append(time_variants(units, loops, xs, args.rounds, NUM_STEPS))
    write_per_step_tables(
        args.out_dir, "loop_nesting", "A step in a nested loop (graph mode)",
        f"`python benchmarks/bench_loop_nesting.py`: T = {NUM_STEPS} ({OUTER} x {INNER}), "
        f"batch {BATCH}, {FEATURES} features, {args.rounds} alternated rounds, medians, "
        "microseconds per step (see the script's docstring for the variants).",
        machine(), args, results, VARIANTS, "one loop")


if __name__ == "__main__":
    main()
