"""A fixed byte budget from T = 1000 to T = 10,000: stored-state memory stays flat.

In one process, alternating: standard BPTT (`keras.layers.RNN(LSTMCell(512))`) and
`MemoryEfficientRNN(LSTMCell(512), memory_budget="32MiB")`, batch 32, 32 features, float32,
loss on the last output, graph mode (`tf.function`). For each T: activation memory (CPU BFC
allocator peak during one training step minus bytes in use before it), median step time over
`--rounds` alternated rounds after a warm-up, and the plan's predicted time ratio.

The predicted time ratio is `plan.time_ratio(beta)`, a backward step costing `beta` forward
steps: with beta = 2 (the paper's convention) and with beta measured in the same run. For
that, a forward-only step of the BPTT layer (`tf.reduce_sum(layer(x, training=True))` in a
`tf.function`, no tape) is timed in the same alternated rounds, and
``beta = (median BPTT step - median forward-only step) / median forward-only step``.
"within 10%" reports ``|measured / predicted - 1|`` for the measured-beta prediction.

    python3 benchmarks/bench_fixed_budget.py [--lengths 1000 10000] [--rounds 2]
    python3 benchmarks/bench_fixed_budget.py --lengths 50 200 --units 32 --batch 4 \
        --budget 16KiB --out /tmp/fixed                                   # smoke run

Writes benchmarks/results/fixed_budget.json and fixed_budget.md (or under `--out`).
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
from _bench import timed_run  # noqa: E402  (this folder is on sys.path when run)
from tf_membptt import MemoryEfficientRNN  # noqa: E402

UNITS, BATCH, FEATURES, BUDGET = 512, 32, 32, "32MiB"


def make_step(layer, cell):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, cell.trainable_variables)

    return step


def make_forward(layer):
    """The forward pass of the layer alone, no tape (for beta)."""
    @tf.function
    def forward(x):
        return tf.reduce_sum(layer(x, training=True))

    return forward


def run_once(step, x):
    """(activation bytes, seconds) of one synchronous call, measured as bench_bptt does."""
    seconds, peak, _ = timed_run(lambda: tf.nest.map_structure(lambda t: t.numpy(), step(x)))
    return peak, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--units", type=int, default=UNITS)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--features", type=int, default=FEATURES)
    parser.add_argument("--budget", default=BUDGET,
                        help=f"MemoryEfficientRNN memory_budget (default {BUDGET})")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    units, batch, features, budget = args.units, args.batch, args.features, args.budget
    rng = np.random.default_rng(0)
    results, betas = [], []
    for num_steps in args.lengths:
        x = tf.constant(rng.standard_normal((batch, num_steps, features)), tf.float32)
        methods = {}
        for name in ("bptt", "msm " + budget):
            keras.utils.set_random_seed(0)
            cell = keras.layers.LSTMCell(units)
            layer = (keras.layers.RNN(cell) if name == "bptt"
                     else MemoryEfficientRNN(cell, memory_budget=budget))
            layer(x[:, :2])
            step = make_step(layer, cell)
            run_once(step, x)  # warm-up: trace and plan
            methods[name] = (layer, step, [], [])
            print(f"T={num_steps} {name}: warmed up", flush=True)
            if name == "bptt":
                # The forward-only step of the BPTT layer, timed in the same rounds.
                forward = make_forward(layer)
                run_once(forward, x)  # warm-up: trace
                methods["bptt forward"] = (layer, forward, [], [])
                print(f"T={num_steps} bptt forward: warmed up", flush=True)
        names = list(methods)
        for r in range(args.rounds):
            k = r % len(names)                      # rotated order
            for name in names[k:] + names[:k]:
                layer, step, peaks, times = methods[name]
                peak, seconds = run_once(step, x)
                peaks.append(peak)
                times.append(seconds)
        bptt_peak = statistics.median(methods["bptt"][2])
        bptt_time = statistics.median(methods["bptt"][3])
        forward_time = statistics.median(methods.pop("bptt forward")[3])
        beta = (bptt_time - forward_time) / forward_time
        betas.append({"T": num_steps, "bptt_step_s": bptt_time,
                      "forward_step_s": forward_time, "beta_measured": beta})
        print(f"T={num_steps}: forward-only step {forward_time:.3f} s, measured beta "
              f"{beta:.3f}", flush=True)
        for name, (layer, step, peaks, times) in methods.items():
            plan = getattr(layer, "last_plan", None)
            row = {
                "T": num_steps, "method": name,
                "activation_mib": statistics.median(peaks) / 2 ** 20,
                "memory_vs_bptt": statistics.median(peaks) / bptt_peak,
                "step_s": statistics.median(times),
                "time_vs_bptt": statistics.median(times) / bptt_time,
                "beta_measured": beta,
            }
            if plan is not None:
                hidden_bytes = 2 * units * batch * 4
                predicted = plan.time_ratio(max(beta, 0.0))
                row.update(plan_slots=plan.memory_slots, plan_peak=plan.peak_memory,
                           predicted_states_mib=plan.peak_memory * hidden_bytes / 2 ** 20,
                           predicted_time_ratio=plan.time_ratio(),          # beta = 2
                           predicted_time_ratio_measured_beta=predicted,
                           time_error_measured_beta=abs(row["time_vs_bptt"] / predicted - 1),
                           forward_evals_per_step=plan.forward_evals_per_step,
                           method_label=plan.method)
                row["within_10pct_measured_beta"] = row["time_error_measured_beta"] <= 0.10
            results.append(row)
            print(json.dumps(row), flush=True)
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
               "tensorflow": tf.__version__, "keras": keras.__version__,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fixed_budget.json"), "w") as f:
        json.dump({"machine": machine, "budget": budget, "rounds": args.rounds,
                   "units": units, "batch": batch, "features": features,
                   "beta": betas, "results": results}, f, indent=2)
    command = "python3 benchmarks/bench_fixed_budget.py" + "".join(
        " " + a for a in (sys.argv[1:] if argv is None else argv))
    lines = [f"# A fixed byte budget ({budget}) as T grows",
             "", f"`{command}`; LSTMCell({units}), batch {batch}, "
             f"{features} features, graph mode, {args.rounds} alternated rounds after a warm-up; "
             f"{machine['cpu_count']} CPUs, TensorFlow {tf.__version__}, {machine['date']}.", "",
             "Predicted time = `plan.time_ratio(beta)`, a backward step costing beta forward "
             "steps: beta = 2 (the paper's convention) and beta measured in the same run, "
             "(median BPTT step - median forward-only step) / median forward-only step, the "
             "forward-only step (`reduce_sum(layer(x))` of the BPTT layer, no tape) timed in "
             "the same alternated rounds. *Within 10%*: |measured / predicted - 1| for the "
             "measured-beta prediction.", "",
             "| T | method | activation MiB | vs BPTT | step s | time vs BPTT | predicted time "
             "(beta=2) | measured beta | predicted time (measured beta) | within 10% "
             "| plan slots (peak) | predicted states MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['T']} | {r['method']} | {r['activation_mib']:.1f} | "
            f"{100 * r['memory_vs_bptt']:.1f}% | {r['step_s']:.2f} | {r['time_vs_bptt']:.3f}x | "
            + (f"{r['predicted_time_ratio']:.3f}x | {r['beta_measured']:.2f} | "
               f"{r['predicted_time_ratio_measured_beta']:.3f}x | "
               f"{100 * r['time_error_measured_beta']:.1f}% "
               f"({'yes' if r['within_10pct_measured_beta'] else 'no'}) | "
               f"{r['plan_slots']:.4g} ({r['plan_peak']:.4g})"
               f" | {r['predicted_states_mib']:.1f} |" if "plan_slots" in r else
               f"- | {r['beta_measured']:.2f} | - | - | - | - |"))
    with open(os.path.join(args.out, "fixed_budget.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", os.path.join(args.out, "fixed_budget.md"))


if __name__ == "__main__":
    main()
