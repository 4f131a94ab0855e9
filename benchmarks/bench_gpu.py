"""GPU benchmark: MemoryEfficientRNN against keras.layers.RNN and cuDNN's LSTM, by memory
and time, in graph mode and under XLA.

    python benchmarks/bench_gpu.py            # on a CUDA machine: the full run (< 8 min)
    python benchmarks/bench_gpu.py --smoke    # anywhere, CPU included: tiny sizes (CI-like)

One training step is ``tape.gradient(sum of the last output, the trainable weights)`` with
``layer(x, training=True)`` in a `tf.function` (mode ``graph``) or a
`tf.function(jit_compile=True)` (mode ``xla``). Full run: `LSTMCell(1024)`, batch 64, 64
input features, T = 1000 and 10,000; methods, on the same weights:

* ``keras.layers.RNN``: `keras.layers.RNN(LSTMCell(1024))` (standard BPTT);
* ``cuDNN``: `keras.layers.LSTM(1024)` (its cuDNN kernel on a GPU in graph mode; XLA and
  CPU run its generic loop);
* ``budget 5%`` / ``20%`` / ``100%``: `MemoryEfficientRNN(LSTMCell(1024), b)`.

Peak memory: `tf.config.experimental.get_memory_info(device)["peak"]` after
`reset_memory_stats`, minus the bytes in use before the step (on CPU the BFC allocator is
asked for with ``TF_CPU_ALLOCATOR_USE_BFC``). Times: medians of `--rounds` alternated
rounds after a warm-up step. A configuration whose standard BPTT is predicted not to fit
in device memory (from its measured bytes per step at T = 1000, x 1.2) is skipped with
the reason recorded; so is a method that runs out of memory, and anything past
`--time-budget`. Writes ``<out-dir>/gpu.json`` and ``<out-dir>/gpu.md`` with the device's
name.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")  # for CPU memory statistics
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from _bench import MiB, REPO_ROOT, log, timed_run  # noqa: E402
from tf_membptt import MemoryEfficientRNN  # noqa: E402

def device():
    """('GPU:0', name) on a CUDA machine, else ('CPU:0', processor)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return "GPU:0", details.get("device_name", "GPU")
    return "CPU:0", platform.processor() or platform.machine()


def make_layer(method, units, budget_for):
    if method == "keras.layers.RNN":
        return keras.layers.RNN(keras.layers.LSTMCell(units))
    if method == "cuDNN":
        return keras.layers.LSTM(units)
    return MemoryEfficientRNN(keras.layers.LSTMCell(units), budget_for[method])


def make_step(layer, jit_compile):
    """One training step as a user writes it. The layer and its variables are closed over:
    passed as default arguments, tf.function would turn the variables into inputs and the
    tape would return None for every gradient."""
    variables = layer.trainable_variables

    @tf.function(jit_compile=jit_compile)
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, variables)

    return step


def run_config(mode, num_steps, args, dev, budget_for, clock):
    entry = {"mode": mode, "T": num_steps, "methods": {}, "skipped": {}}
    x = tf.constant(np.random.default_rng(0).standard_normal(
        (args.batch, num_steps, args.features)).astype(np.float32))
    steps, reference = {}, None
    for method in ["keras.layers.RNN", "cuDNN"] + list(budget_for):
        if clock() > args.time_budget:
            entry["skipped"][method] = f"time budget ({args.time_budget:g} s) spent"
            continue
        keras.utils.set_random_seed(0)
        layer = make_layer(method, args.units, budget_for)
        layer(x[:, :2])
        if reference is None:
            reference = layer
        else:
            layer.set_weights(reference.get_weights())  # the same weights in every method
        step = make_step(layer, jit_compile=(mode == "xla"))
        try:
            t0 = time.perf_counter()
            grads = [g.numpy() for g in step(x)]
            entry["methods"][method] = {"warmup_s": time.perf_counter() - t0,
                                        "times_s": [], "peaks_bytes": []}
        except (tf.errors.ResourceExhaustedError, tf.errors.InternalError) as error:
            entry["skipped"][method] = f"{type(error).__name__}: {str(error)[:200]}"
            log(f"  {mode} T={num_steps} {method}: {entry['skipped'][method]}")
            continue
        if method == "keras.layers.RNN":
            reference_grads = grads
        else:
            entry["methods"][method]["grad_rel_err"] = max(
                float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))
                for g, r in zip(grads, reference_grads))
        if isinstance(layer, MemoryEfficientRNN):
            plan = layer.last_plan
            entry["methods"][method].update(forward_evals=plan.forward_evals,
                                            stored_slots=plan.peak_memory)
        steps[method] = step
    for r in range(args.rounds):
        order = list(steps)
        for method in order[r % len(order):] + order[:r % len(order)]:
            seconds, peak, _ = timed_run(lambda: steps[method](x), dev)
            entry["methods"][method]["times_s"].append(seconds)
            entry["methods"][method]["peaks_bytes"].append(int(peak))
    base = entry["methods"].get("keras.layers.RNN")
    for method, m in entry["methods"].items():
        if not m["times_s"]:
            continue
        m["median_s"] = statistics.median(m["times_s"])
        m["activation_bytes"] = int(statistics.median(m["peaks_bytes"]))
        if base and base.get("times_s"):
            m["time_ratio"] = m["median_s"] / statistics.median(base["times_s"])
            m["memory_ratio"] = m["activation_bytes"] / statistics.median(base["peaks_bytes"])
        log(f"  {mode} T={num_steps} {method:18s} {m['median_s']:.4f} s "
            f"{m['activation_bytes'] / MiB:9.1f} MiB")
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes by default (LSTMCell(16), batch 4, T = 30 and 60, 2 rounds)")
    parser.add_argument("--units", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--lengths", default="1000,10000")
    parser.add_argument("--modes", default="graph,xla")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="seconds; later methods and configurations are skipped")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    if parser.parse_args(argv).smoke:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(units=16, batch=4, features=8, lengths="30,60", rounds=2)
    args = parser.parse_args(argv)
    dev, name = device()
    started = time.perf_counter()
    clock = lambda: time.perf_counter() - started  # noqa: E731
    log(f"device {dev}: {name}")
    budget_for = {"budget 5%": 0.05, "budget 20%": 0.2, "budget 100%": 1.0}
    total_memory = None
    if dev.startswith("GPU"):
        details = tf.config.experimental.get_device_details(
            tf.config.list_physical_devices("GPU")[0])
        total_memory = details.get("memory_limit")
    results, per_step = [], {}
    for mode in args.modes.split(","):
        for num_steps in (int(t) for t in args.lengths.split(",")):
            bytes_per_step = per_step.get(mode)
            if total_memory and bytes_per_step and bytes_per_step * num_steps * 1.2 > \
                    total_memory:
                results.append({"mode": mode, "T": num_steps, "skip_reason": (
                    f"standard BPTT predicted to need "
                    f"{bytes_per_step * num_steps * 1.2 / 2**30:.0f} GiB (from T="
                    f"{per_step[mode + '_T']}), more than the device's "
                    f"{total_memory / 2**30:.0f} GiB")})
                continue
            if clock() > args.time_budget:
                results.append({"mode": mode, "T": num_steps,
                                "skip_reason": f"time budget ({args.time_budget:g} s) spent"})
                continue
            entry = run_config(mode, num_steps, args, dev, budget_for, clock)
            results.append(entry)
            base = entry["methods"].get("keras.layers.RNN", {})
            if base.get("activation_bytes") and mode not in per_step:
                per_step[mode] = base["activation_bytes"] / num_steps
                per_step[mode + "_T"] = num_steps
    write(results, args, dev, name)
    return 0


def write(results, args, dev, name):
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_smoke" if args.smoke else "gpu"
    meta = {"device": dev, "device_name": name, "tensorflow": tf.__version__,
            "keras": keras.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "args": vars(args)}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# {'Smoke run' if args.smoke else 'GPU benchmark'}: {name} ({dev})", "",
             f"Run {meta['date']}, TensorFlow {meta['tensorflow']}, Keras {meta['keras']}: "
             f"`LSTMCell({args.units})`, batch {args.batch}, {args.features} features, "
             f"medians of {args.rounds} rounds.", "",
             "| mode | T | method | step time | vs keras.layers.RNN | activation memory | "
             "vs keras.layers.RNN | forward evals |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for e in results:
        if "skip_reason" in e:
            lines.append(f"| {e['mode']} | {e['T']:,} | (skipped: {e['skip_reason']}) "
                         f"| | | | | |")
            continue
        for method, m in e["methods"].items():
            if "median_s" not in m:
                continue
            lines.append(
                f"| {e['mode']} | {e['T']:,} | {method} | {m['median_s']:.4f} s | "
                f"{m.get('time_ratio', float('nan')):.2f}x | "
                f"{m['activation_bytes'] / MiB:.1f} MiB | "
                f"{100 * m.get('memory_ratio', float('nan')):.1f}% | "
                f"{m.get('forward_evals', '-')} |")
        for method, reason in e.get("skipped", {}).items():
            lines.append(f"| {e['mode']} | {e['T']:,} | {method} (skipped: {reason}) "
                         f"| | | | | |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
