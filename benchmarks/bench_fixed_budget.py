"""A fixed byte budget from T = 1000 to T = 10,000: stored-state memory stays flat.

In one process, alternating: standard BPTT (`keras.layers.RNN(LSTMCell(512))`) and
`MemoryEfficientRNN(LSTMCell(512), memory_budget="32MiB")`, batch 32, 32 features, float32,
loss on the last output, graph mode (`tf.function`). For each T: activation memory (CPU BFC
allocator peak during one training step minus bytes in use before it), median step time over
`--rounds` alternated rounds after a warm-up, and the plan's predicted time ratio.

    python3 benchmarks/bench_fixed_budget.py [--lengths 1000 10000] [--rounds 2]

Writes benchmarks/results/fixed_budget.json and fixed_budget.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from tf_membptt import MemoryEfficientRNN  # noqa: E402

UNITS, BATCH, FEATURES, BUDGET = 512, 32, 32, "32MiB"


def make_step(layer, cell):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, cell.trainable_variables)

    return step


def run_once(step, x):
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    start = time.perf_counter()
    grads = step(x)
    _ = [g.numpy() for g in grads]
    seconds = time.perf_counter() - start
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    return peak, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    results = []
    for num_steps in args.lengths:
        x = tf.constant(rng.standard_normal((BATCH, num_steps, FEATURES)), tf.float32)
        methods = {}
        for name in ("bptt", "msm " + BUDGET):
            keras.utils.set_random_seed(0)
            cell = keras.layers.LSTMCell(UNITS)
            layer = (keras.layers.RNN(cell) if name == "bptt"
                     else MemoryEfficientRNN(cell, memory_budget=BUDGET))
            layer(x[:, :2])
            step = make_step(layer, cell)
            run_once(step, x)  # warm-up: trace and plan
            methods[name] = (layer, step, [], [])
            print(f"T={num_steps} {name}: warmed up", flush=True)
        for _ in range(args.rounds):
            for name, (layer, step, peaks, times) in methods.items():
                peak, seconds = run_once(step, x)
                peaks.append(peak)
                times.append(seconds)
        bptt_peak = statistics.median(methods["bptt"][2])
        bptt_time = statistics.median(methods["bptt"][3])
        for name, (layer, step, peaks, times) in methods.items():
            plan = getattr(layer, "last_plan", None)
            row = {
                "T": num_steps, "method": name,
                "activation_mib": statistics.median(peaks) / 2 ** 20,
                "memory_vs_bptt": statistics.median(peaks) / bptt_peak,
                "step_s": statistics.median(times),
                "time_vs_bptt": statistics.median(times) / bptt_time,
            }
            if plan is not None:
                hidden_bytes = 2 * UNITS * BATCH * 4
                row.update(plan_slots=plan.memory_slots, plan_peak=plan.peak_memory,
                           predicted_states_mib=plan.peak_memory * hidden_bytes / 2 ** 20,
                           predicted_time_ratio=plan.time_ratio(),
                           forward_evals_per_step=plan.forward_evals_per_step,
                           method_label=plan.method)
            results.append(row)
            print(json.dumps(row), flush=True)
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
               "tensorflow": tf.__version__, "keras": keras.__version__,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fixed_budget.json"), "w") as f:
        json.dump({"machine": machine, "budget": BUDGET, "rounds": args.rounds,
                   "results": results}, f, indent=2)
    lines = [f"# A fixed byte budget ({BUDGET}) as T grows",
             "", f"`python3 benchmarks/bench_fixed_budget.py`; LSTMCell({UNITS}), batch {BATCH}, "
             f"{FEATURES} features, graph mode, {args.rounds} alternated rounds after a warm-up; "
             f"{machine['cpu_count']} CPUs, TensorFlow {tf.__version__}, {machine['date']}.", "",
             "| T | method | activation MiB | vs BPTT | step s | time vs BPTT | predicted time "
             "| plan slots (peak) | predicted states MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['T']} | {r['method']} | {r['activation_mib']:.1f} | "
            f"{100 * r['memory_vs_bptt']:.1f}% | {r['step_s']:.2f} | {r['time_vs_bptt']:.3f}x | "
            + (f"{r['predicted_time_ratio']:.3f}x | {r['plan_slots']:.4g} ({r['plan_peak']:.4g})"
               f" | {r['predicted_states_mib']:.1f} |" if "plan_slots" in r else "- | - | - |"))
    with open(os.path.join(args.out, "fixed_budget.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", os.path.join(args.out, "fixed_budget.md"))


if __name__ == "__main__":
    main()
