"""Trace + compile time of one MemoryEfficientRNN training step, against sequence length.

For T = 100, 1000, 10000 and eager / graph (tf.function) / XLA (tf.function with
jit_compile=True): LSTMCell(64), batch 8, 16 features, memory_budget=0.05, a training step
computing the loss and the gradients of every weight. Reported separately:

* ``first_call_s``: wall time of the first call, which traces the step (graph/XLA),
  plans, compiles (XLA) and runs it once;
* ``step_s``: steady-state time of one step (median of the following calls);
* ``overhead_s = first_call_s - step_s``: tracing + planning + compilation;
* ``plan_s``: the planner alone for this T and budget (cold cache), for reference.

The executor runs the plan's op table in `tf.while_loop`s, so the graph, and the trace
and compile time, do not grow with T (planning does). Eager has no trace of the user's step;
the layer runs its two sweeps as traced functions cached per plan, so the first eager step
includes tracing those. Eager runs estimated to take longer than `--eager-limit` seconds
are skipped with the reason.

Each configuration runs in a fresh subprocess (cold caches). Results go to
``benchmarks/results/trace.json`` and ``trace.md``.

    python3 benchmarks/bench_trace.py [--lengths 100 1000 10000] [--steps 3]
        [--trace-lengths 100000 1000000]

Lengths in ``--trace-lengths`` are planned and traced but not run (a step at T = 10^6 would
take minutes here): that is the cost a user pays at trace time for a very long sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
UNITS, BATCH, FEATURES, BUDGET = 64, 8, 16, 0.05


def _training_step(num_steps: int):
    """Runs in the subprocess: the layer and a training step (loss and the gradients of
    every weight), built but not traced."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, ROOT)
    import keras
    import tensorflow as tf

    from tf_membptt import MemoryEfficientRNN

    tf.get_logger().setLevel("ERROR")
    keras.utils.set_random_seed(0)
    layer = MemoryEfficientRNN(keras.layers.LSTMCell(UNITS), BUDGET)
    head = keras.layers.Dense(1)
    layer.build((BATCH, num_steps, FEATURES))
    head.build((BATCH, UNITS))
    variables = layer.trainable_variables + head.trainable_variables

    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((head(layer(x, training=True)) - y) ** 2)
        return loss, tape.gradient(loss, variables)

    return layer, train_step


def _one(mode: str, num_steps: int, steps: int) -> dict:
    """Runs in the subprocess: times one configuration."""
    layer, train_step = _training_step(num_steps)
    import numpy as np
    import tensorflow as tf

    from tf_membptt import planner

    x = tf.constant(np.random.default_rng(0).standard_normal((BATCH, num_steps, FEATURES)),
                    tf.float32)
    y = tf.constant(np.random.default_rng(1).standard_normal((BATCH, 1)), tf.float32)

    fn = {"eager": train_step, "graph": tf.function(train_step),
          "xla": tf.function(train_step, jit_compile=True)}[mode]
    planner._cached_plan.cache_clear()
    start = time.perf_counter()
    loss, grads = fn(x, y)
    float(loss)
    [g.numpy() for g in grads]
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss, grads = fn(x, y)
        float(loss)
        [g.numpy() for g in grads]
        times.append(time.perf_counter() - start)
    plan = layer.last_plan
    planner._cached_plan.cache_clear()
    start = time.perf_counter()
    planner.plan(num_steps, plan.memory_slots, strategy=plan.strategy, alpha=plan.alpha)
    plan_s = time.perf_counter() - start
    step = float(np.median(times)) if times else None
    return dict(mode=mode, T=num_steps, first_call_s=first, step_s=step,
                overhead_s=None if step is None else first - step, plan_s=plan_s,
                forward_evals=plan.forward_evals, memory_slots=plan.memory_slots,
                peak_memory=plan.peak_memory, alpha=plan.alpha, plan_method=plan.method,
                steps_timed=len(times), skipped=None)


def _node_count(graph_def) -> int:
    """Nodes of the step's graph, the loop bodies and gradient functions in its library
    included: the measure that must not grow with T."""
    return len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)


def _trace_only(mode: str, num_steps: int) -> dict:
    """Runs in the subprocess: plans and traces a training step at a length too long to run
    here (T = 100,000 or 1,000,000), without running it. ``trace_s`` is the wall time of
    `get_concrete_function` with a cold plan cache: planning, the cell's analysis, and the
    graph of the step (forward sweep, gradient function) built. XLA compiles on the first
    run, which this does not time."""
    layer, train_step = _training_step(num_steps)
    import tensorflow as tf

    from tf_membptt import planner

    fn = tf.function(train_step, jit_compile=(mode == "xla"))
    planner._cached_plan.cache_clear()
    start = time.perf_counter()
    concrete = fn.get_concrete_function(tf.TensorSpec((BATCH, num_steps, FEATURES)),
                                        tf.TensorSpec((BATCH, 1)))
    trace_s = time.perf_counter() - start
    plan = layer.last_plan
    planner._cached_plan.cache_clear()
    start = time.perf_counter()
    planner.plan(num_steps, plan.memory_slots, strategy=plan.strategy, alpha=plan.alpha)
    plan_s = time.perf_counter() - start
    return dict(mode=mode, T=num_steps, trace_s=trace_s, plan_s=plan_s,
                graph_nodes=_node_count(concrete.graph.as_graph_def()),
                forward_evals=plan.forward_evals, memory_slots=plan.memory_slots,
                peak_memory=plan.peak_memory, plan_method=plan.method)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--modes", nargs="+", default=["eager", "graph", "xla"])
    parser.add_argument("--steps", type=int, default=3, help="steady-state steps timed")
    parser.add_argument("--eager-steps", type=int, default=1,
                        help="steady-state steps timed in eager (slow)")
    parser.add_argument("--eager-limit", type=float, default=120.0,
                        help="skip eager runs whose first step is estimated above this (s)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--trace-lengths", type=int, nargs="*", default=[100_000, 1_000_000],
                        help="lengths only planned and traced (graph and XLA), not run")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--one-trace", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], int(args.one[1]), args.steps)))
        return
    if args.one_trace:
        print(json.dumps(_trace_only(args.one_trace[0], int(args.one_trace[1]))))
        return

    rows = []
    for mode in args.modes:
        previous = None
        for num_steps in sorted(args.lengths):
            if mode == "eager" and previous is not None:
                # Eager time is linear in T: extrapolate from the last length measured.
                estimate = previous["first_call_s"] * num_steps / previous["T"] * (
                    1 + args.eager_steps)
                if estimate > args.eager_limit:
                    reason = (f"eager runs the op table from Python, linear in T: estimated "
                              f"{estimate:.0f} s for the first call and {args.eager_steps} "
                              f"step(s) "
                              f"(from T={previous['T']}), above --eager-limit "
                              f"{args.eager_limit:g} s")
                    rows.append(dict(mode=mode, T=num_steps, skipped=reason))
                    print(f"{mode:5s} T={num_steps:6d} skipped: {reason}", flush=True)
                    continue
            steps = args.eager_steps if mode == "eager" else args.steps
            result = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--one", mode, str(num_steps),
                 "--steps", str(steps)], capture_output=True, text=True, cwd=ROOT)
            if result.returncode != 0:
                raise RuntimeError(f"{mode} T={num_steps} failed:\n{result.stderr[-3000:]}")
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            previous = row
            print(f"{mode:5s} T={num_steps:6d} first={row['first_call_s']:.2f}s "
                  f"step={row['step_s']:.3f}s overhead={row['overhead_s']:.2f}s "
                  f"plan={row['plan_s']:.3f}s evals/T={row['forward_evals'] / num_steps:.3f}",
                  flush=True)

    trace_rows = []
    for mode in [m for m in args.modes if m != "eager"]:
        for num_steps in sorted(args.trace_lengths):
            result = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--one-trace", mode,
                 str(num_steps)], capture_output=True, text=True, cwd=ROOT)
            if result.returncode != 0:
                raise RuntimeError(f"trace {mode} T={num_steps} failed:\n"
                                   f"{result.stderr[-3000:]}")
            row = json.loads(result.stdout.strip().splitlines()[-1])
            trace_rows.append(row)
            print(f"{mode:5s} T={num_steps:7d} planned and traced in {row['trace_s']:.2f}s "
                  f"(plan {row['plan_s']:.2f}s, {row['graph_nodes']} graph nodes)", flush=True)

    import tensorflow as tf

    meta = dict(cell=f"LSTMCell({UNITS})", batch=BATCH, features=FEATURES,
                memory_budget=BUDGET, steady_steps=args.steps, eager_steps=args.eager_steps,
                tensorflow=tf.__version__, python=platform.python_version(),
                machine=platform.machine(), cpus=os.cpu_count(),
                note="first_call_s includes tracing, planning, XLA compilation and one run; "
                     "overhead_s = first_call_s - step_s. Eager has no tracing: its first "
                     "call is a plain first step.")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "trace.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, trace_only=trace_rows), f, indent=2)
    with open(os.path.join(args.out, "trace.md"), "w") as f:
        f.write(_markdown(meta, rows, trace_rows))


def _markdown(meta, rows, trace_rows=()):
    lines = [
        "# Trace + compile time of one training step",
        "",
        f"`MemoryEfficientRNN({meta['cell']}, memory_budget={meta['memory_budget']})`, batch "
        f"{meta['batch']}, {meta['features']} features, loss + gradients of every weight. "
        f"TensorFlow {meta['tensorflow']}, {meta['cpus']} CPUs. Generated by "
        "`python3 benchmarks/bench_trace.py`.",
        "",
        "- **first call**: trace + plan + compile (XLA) + one run;",
        f"- **step**: steady-state step (median of {meta['steady_steps']}; eager: "
        f"{meta['eager_steps']});",
        "- **overhead** = first call - step: what tracing, planning and compiling cost;",
        "- **plan**: the planner alone (cold cache), included in the first call.",
        "",
        "| mode | T | first call (s) | step (s) | overhead (s) | plan (s) | evals / T | "
        "memory slots | peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['mode']} | {r['T']} | skipped: {r['skipped']} |  |  |  |  |"
                         "  |  |")
            continue
        lines.append(
            f"| {r['mode']} | {r['T']} | {r['first_call_s']:.2f} | {r['step_s']:.3f} | "
            f"{r['overhead_s']:.2f} | {r['plan_s']:.3f} | "
            f"{r['forward_evals'] / r['T']:.3f} | {r['memory_slots']:g} | "
            f"{r['peak_memory']:g} |")
    if trace_rows:
        lines += ["", "**Planned and traced, not run** (`get_concrete_function` of the training "
                  "step with a cold plan cache: planning, the cell's analysis and the step's "
                  "graph, forward and gradient; XLA compiles later, on the first run):", "",
                  "| mode | T | plan + trace (s) | of which planning (s) | graph nodes | "
                  "evals / T | memory slots | plan |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in trace_rows:
            lines.append(f"| {r['mode']} | {r['T']:,} | {r['trace_s']:.2f} | {r['plan_s']:.2f} "
                         f"| {r['graph_nodes']} | {r['forward_evals'] / r['T']:.3f} | "
                         f"{r['memory_slots']:g} | {r['plan_method']} |")
    lines += ["", "Eager has no trace of the user's step: its \"first call\" is the first "
              "step, which traces the layer's two sweeps (cached per plan) and runs them; "
              "its overhead column is that tracing plus first-step warm-up.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
