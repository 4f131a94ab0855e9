"""What one store write costs an evaluation under XLA on the CPU.

    python benchmarks/bench_xla_store_write.py            # ~2 min on 2 cores
    python benchmarks/bench_xla_store_write.py --units 32,128 --rounds 9

A loop of T = 1000 hand-written LSTM steps (batch 32, 32 input features) compiled with
`tf.function(jit_compile=True)`, with nothing but the cell in the loop body, then with one
write per step of what `StackStore` writes for an `LSTMCell` (the internal state: previous
hidden and cell state and the gates' pre-activations, ``[32, 6 * units]``) into a flat
loop-carried buffer at an offset read from a table, and with each part of it on its own.
Variants:

* ``no write``: the cell only;
* ``internal state``: ``concat(h_prev, c_prev, z)`` at one offset (the layer's write);
* ``carry only`` / ``pre-activations only``: ``concat(h_prev, c_prev)`` / ``z`` alone;
* ``time-major buffers``: the two parts into two ``[slots, batch, width]`` buffers at
  ``[slot, 0, 0]`` (the layout of TensorFlow's own while-loop gradient);
* ``no write, 4 steps an iteration`` / ``internal state, 4 steps an iteration``: the loop
  body unrolled, four steps (and, in the second, four writes) per iteration: whether the
  cost is the write's or the loop iteration's.

XLA reads its flags once per process, so a comparison across XLA flags (the README quotes
one) takes two runs of this script with different ``XLA_FLAGS``.

Times are medians over alternated rounds (each round runs every variant 3 times), in
microseconds per step. Writes ``<out-dir>/xla_store_write.json`` and ``.md``.
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

BATCH, FEATURES, SLOTS = 32, 32, 64
VARIANTS = ("no write", "internal state", "carry only", "pre-activations only",
            "time-major buffers", "no write, 4 steps an iteration",
            "internal state, 4 steps an iteration")
UNROLLED = " steps an iteration"


def make_loop(units, variant, num_steps):
    from tensorflow.compiler.tf2xla.python import xla

    unroll = 1
    if variant.endswith(UNROLLED):
        variant, unroll = variant[:-len(UNROLLED)].rsplit(", ", 1)
        unroll = int(unroll)
        assert num_steps % unroll == 0, (num_steps, unroll)

    rng = np.random.default_rng(0)
    kernel = tf.constant(rng.standard_normal((FEATURES, 4 * units)) * 0.1, tf.float32)
    recurrent = tf.constant(rng.standard_normal((units, 4 * units)) * 0.1, tf.float32)
    bias = tf.zeros([4 * units])
    slot = tf.constant(rng.integers(0, SLOTS, num_steps).astype(np.int32))
    width = 6 * units

    def cell(x, h, c):
        z = x @ kernel + h @ recurrent + bias
        i, f, g, o = tf.split(z, 4, axis=1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        return tf.sigmoid(o) * tf.tanh(c), c, z

    def buffers():
        if variant == "no write":
            return (tf.zeros([1]),)
        if variant == "time-major buffers":
            return (tf.zeros([SLOTS, BATCH, 2 * units]), tf.zeros([SLOTS, BATCH, 4 * units]))
        return (tf.zeros([BATCH, (SLOTS + 1) * width]),)

    def write(buffer, t, h_prev, c_prev, z):
        def at(value, begin):
            return xla.dynamic_update_slice(buffer[0], value, tf.stack(begin))

        if variant == "internal state":
            return (at(tf.concat([h_prev, c_prev, z], 1), [0, slot[t] * width]),)
        if variant == "carry only":
            return (at(tf.concat([h_prev, c_prev], 1), [0, slot[t] * width]),)
        if variant == "pre-activations only":
            return (at(z, [0, slot[t] * width]),)
        if variant == "time-major buffers":
            carry = xla.dynamic_update_slice(buffer[0], tf.concat([h_prev, c_prev], 1)[None],
                                             tf.stack([slot[t], 0, 0]))
            gates = xla.dynamic_update_slice(buffer[1], z[None], tf.stack([slot[t], 0, 0]))
            return carry, gates
        return buffer

    @tf.function(jit_compile=True)
    def loop(xs):
        def body(t, buffer, h, c):
            for j in range(unroll):
                h_new, c_new, z = cell(tf.gather(xs, t + j, axis=1), h, c)
                buffer = write(buffer, t + j, h, c, z)
                h, c = h_new, c_new
            return t + unroll, buffer, h, c

        h = c = tf.zeros([BATCH, units])
        _, buffer, h, _ = tf.while_loop(lambda t, *_: t < num_steps, body,
                                        (0, buffers(), h, c),
                                        maximum_iterations=num_steps // unroll)
        return h + sum(tf.reduce_sum(b) for b in buffer)

    return loop


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", default="32,128")
    parser.add_argument("--num-steps", "-T", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out-dir", type=pathlib.Path,
                        default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    results = []
    for units in [int(u) for u in args.units.split(",")]:
        xs = tf.random.normal([BATCH, args.num_steps, FEATURES])
        loops = {v: make_loop(units, v, args.num_steps) for v in VARIANTS}
        for loop in loops.values():
            loop(xs).numpy()  # compile
        results.append(time_variants(units, loops, xs, args.rounds, args.num_steps, calls=3))
    write_per_step_tables(
        args.out_dir, "xla_store_write", "One store write per evaluation under XLA on the CPU",
        f"`python benchmarks/bench_xla_store_write.py`: T = {args.num_steps}, batch {BATCH}, "
        f"{FEATURES} features, {args.rounds} alternated rounds of 3 calls, medians, "
        "microseconds per step (see the script's docstring for the variants).",
        machine(), args, results, VARIANTS, "no write")


if __name__ == "__main__":
    main()
