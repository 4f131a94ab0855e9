"""Step time of MemoryEfficientRNN against keras.layers.RNN for ordinary cell sizes.

    python benchmarks/bench_speed.py                    # the full table (~5 min on 2 cores; ~8 with --rounds 11)
    python benchmarks/bench_speed.py --quick            # T = 200, 3 rounds: a smoke run
    python benchmarks/bench_speed.py --configs lstm128 --modes graph --rounds 7

One training step is ``tape.gradient(sum of the last output, the cell's weights)`` with
``layer(x, training=True)`` inside a `tf.function` (mode ``graph``) or a
`tf.function(jit_compile=True)` (mode ``xla``); T = 1000, batch 32, 32 input features,
float32. Configurations: `LSTMCell(H)` for H = 32, 128, 512, `GRUCell(128)`, and the
README example's model (`LSTMCell(16)`, batch 64, 2 features). Methods, in one process
and on one cell (so on the same weights): `keras.layers.RNN` (standard BPTT), its
forward-only step (no tape: for beta), and `MemoryEfficientRNN` at budgets 100% (nothing
recomputed) and 5%.

Every method's gradients are checked once against standard BPTT's (relative error <
1e-4). Times are medians over `--rounds` alternated rounds (each round runs every method
once, in a rotated order) after one warm-up call each. The prediction for a budget is
``plan.time_ratio(beta)`` with beta, the cost of a backward step in forward steps, measured
in the same run: ``(full step - forward step) / forward step`` of standard BPTT.

Writes ``<out-dir>/speed.json`` and ``<out-dir>/speed.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from _bench import REPO_ROOT, log  # noqa: E402
from tf_membptt import MemoryEfficientRNN  # noqa: E402

CONFIGS = {
    # name: (label, cell factory, batch, features)
    "lstm32": ("LSTMCell(32)", lambda: keras.layers.LSTMCell(32), 32, 32),
    "lstm128": ("LSTMCell(128)", lambda: keras.layers.LSTMCell(128), 32, 32),
    "lstm512": ("LSTMCell(512)", lambda: keras.layers.LSTMCell(512), 32, 32),
    "gru128": ("GRUCell(128)", lambda: keras.layers.GRUCell(128), 32, 32),
    "example": ("README example: LSTMCell(16), batch 64, 2 features",
                lambda: keras.layers.LSTMCell(16), 64, 2),
}
BUDGETS = (1.0, 0.05)
GRAD_RTOL = 1e-4


def make_step(layer, variables, jit, with_tape=True):
    @tf.function(jit_compile=jit)
    def step(x):
        if not with_tape:
            return tf.reduce_sum(layer(x, training=True))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, variables)

    return step


def timed(fn, x):
    t0 = time.perf_counter()
    result = fn(x)
    for value in tf.nest.flatten(result):
        value.numpy()
    return time.perf_counter() - t0, result


def run_config(name, mode, num_steps, rounds):
    label, make_cell, batch, features = CONFIGS[name]
    keras.utils.set_random_seed(0)
    cell = make_cell()
    x = tf.constant(np.random.default_rng(0).standard_normal(
        (batch, num_steps, features)).astype(np.float32))
    jit = mode == "xla"
    reference = keras.layers.RNN(cell)
    reference(x[:, :2])
    variables = list(cell.trainable_variables)
    methods = {"keras.layers.RNN": make_step(reference, variables, jit),
               "keras forward": make_step(reference, variables, jit, with_tape=False)}
    layers = {}
    for budget in BUDGETS:
        layer = MemoryEfficientRNN(cell, budget)
        layers[f"{budget:.0%}"] = layer
        methods[f"budget {budget:.0%}"] = make_step(layer, variables, jit)
    log(f"{label}, {mode}: warm-up")
    warmup, reference_grads = {}, None
    errors = {}
    for method, fn in methods.items():
        seconds, result = timed(fn, x)
        warmup[method] = seconds
        if method == "keras.layers.RNN":
            reference_grads = [g.numpy() for g in result]
        elif method.startswith("budget"):
            errors[method] = max(float(np.linalg.norm(g.numpy() - r) / np.linalg.norm(r))
                                 for g, r in zip(result, reference_grads))
    times = {method: [] for method in methods}
    order = list(methods)
    for r in range(rounds):
        rotated = order[r % len(order):] + order[:r % len(order)]
        for method in rotated:
            times[method].append(timed(methods[method], x)[0])
    medians = {method: statistics.median(values) for method, values in times.items()}
    full, forward = medians["keras.layers.RNN"], medians["keras forward"]
    beta = (full - forward) / forward
    entry = {"config": name, "label": label, "mode": mode, "T": num_steps, "batch": batch,
             "features": features, "rounds": rounds, "times_s": times, "medians_s": medians,
             "warmup_s": warmup, "beta_measured": beta, "budgets": {}}
    for key, layer in layers.items():
        method = f"budget {key}"
        plan = layer.last_plan
        entry["budgets"][key] = {
            "ratio": medians[method] / full,
            "predicted": plan.time_ratio(max(beta, 0.0)),
            "forward_evals": plan.forward_evals,
            "peak_memory_slots": plan.peak_memory,
            "alpha": layer.step_alpha,
            "grad_rel_err": errors[method],
        }
        log(f"  {method}: {medians[method]:.3f} s = {medians[method] / full:.2f}x "
            f"(predicted {plan.time_ratio(max(beta, 0.0)):.2f}x), grad rel err "
            f"{errors[method]:.1e}")
    log(f"  keras.layers.RNN {full:.3f} s, forward {forward:.3f} s, beta {beta:.2f}")
    return entry


def machine():
    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "devices": [d.device_type for d in tf.config.list_physical_devices()],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def split(entry):
    """Where the time goes, from the medians: (backward at budget 100% / keras.layers.RNN's
    backward, a recomputed step / a forward step), each backward being the step minus the
    forward-only step, and a recomputed step's cost (5% step - 100% step) / the recomputed
    evaluations. Differences of noisy medians: read them across runs."""
    m, T = entry["medians_s"], entry["T"]
    keras_backward = m["keras.layers.RNN"] - m["keras forward"]
    backward_ratio = (m["budget 100%"] - m["keras forward"]) / keras_backward
    recomputed = entry["budgets"]["5%"]["forward_evals"] - T
    recompute_ratio = ((m["budget 5%"] - m["budget 100%"]) / recomputed) / (
        m["keras forward"] / T)
    return backward_ratio, recompute_ratio


def per_round(entry, method):
    """``(median, lower quartile, upper quartile)`` of the per-round ratios `method` /
    keras.layers.RNN: each round times every method once, seconds apart, so its ratio is
    not moved by this machine's slow drifts in speed, and the spread of the ratios shows
    how far one run's figure can be trusted."""
    times = entry["times_s"]
    ratios = np.array(times[method]) / np.array(times["keras.layers.RNN"])
    return tuple(float(v) for v in np.percentile(ratios, [50, 25, 75]))


def write(results, out_dir, args, machine_info=None, stem="speed"):
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine_info or machine(), "args": vars(args), "results": results}
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    m = payload["machine"]
    lines = [
        "# Step time: MemoryEfficientRNN / keras.layers.RNN",
        "",
        f"Run {m['date']} on {m['cpus']} CPUs ({m['processor']}), TensorFlow {m['tensorflow']},"
        f" Keras {m['keras']}, devices {', '.join(m['devices'])}. `python "
        f"benchmarks/bench_speed.py{' --quick' if args.quick else ''}`: T = {args.num_steps},"
        f" {args.rounds} alternated rounds, medians; training step with `training=True`.",
        "Predicted: `plan.time_ratio(beta)` with beta measured in the same run. Split: our "
        "backward at 100% over keras.layers.RNN's backward (each: step minus the forward-only "
        "step of keras.layers.RNN), and the cost of one recomputed step ((5% step - 100% step) "
        "/ recomputed evaluations) over one forward step of keras.layers.RNN. Measured: the "
        "ratio of the medians; per round: the median of each round's ratio, with the lower "
        "and upper quartiles.",
        "",
        "| configuration | mode | keras.layers.RNN step | beta | 100%: measured | 100%: per "
        "round | 100%: predicted | 5%: measured | 5%: per round | 5%: predicted | 5%: forward "
        "evals | split: backward | split: recomputed step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def spread(entry, method):
        median, low, high = per_round(entry, method)
        return f"{median:.2f}x ({low:.2f}-{high:.2f})"

    for e in results:
        b = e["budgets"]
        backward_ratio, recompute_ratio = split(e)
        lines.append(
            f"| {e['label']} | {e['mode']} | {e['medians_s']['keras.layers.RNN'] * 1e3:.0f} ms "
            f"| {e['beta_measured']:.2f} | {b['100%']['ratio']:.2f}x | "
            f"{spread(e, 'budget 100%')} | {b['100%']['predicted']:.2f}x | "
            f"{b['5%']['ratio']:.2f}x | {spread(e, 'budget 5%')} | "
            f"{b['5%']['predicted']:.2f}x | {b['5%']['forward_evals']} | "
            f"{backward_ratio:.2f}x | {recompute_ratio:.2f}x |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--modes", default="graph,xla")
    parser.add_argument("--num-steps", "-T", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="T = 200, 3 rounds")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--render", metavar="JSON",
                        help="measure nothing: write the tables of an earlier run's JSON again "
                             "(to --out-dir, named after the JSON)")
    args = parser.parse_args(argv)
    if args.render:
        path = pathlib.Path(args.render)
        payload = json.loads(path.read_text())
        recorded = argparse.Namespace(**payload["args"])
        write(payload["results"], pathlib.Path(args.out_dir), recorded, payload["machine"],
              stem=path.stem)
        return 0
    if args.quick:
        args.num_steps, args.rounds = 200, 3
    results = []
    for mode in args.modes.split(","):
        for name in args.configs.split(","):
            results.append(run_config(name, mode, args.num_steps, args.rounds))
            write(results, pathlib.Path(args.out_dir), args)
    bad = [(e["config"], e["mode"], k) for e in results for k, b in e["budgets"].items()
           if b["grad_rel_err"] > GRAD_RTOL]
    if bad:
        print(f"gradients differ from standard BPTT's: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
