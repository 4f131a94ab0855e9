"""Where a graph-mode training step's time goes, loop by loop, for keras.layers.RNN and
MemoryEfficientRNN.

    python benchmarks/bench_step_breakdown.py                       # LSTMCell(128), ~3 min
    python benchmarks/bench_step_breakdown.py --configs lstm32,gru128 --budgets 1.0,0.05

The step is bench_speed's (``tape.gradient`` of the summed last output with respect to the
cell's weights, ``layer(x, training=True)`` inside a `tf.function`; T = 1000, batch 32,
32 features). TensorFlow runs it with one inter-op and one intra-op thread, so that no two
ops overlap and the op durations the TF profiler records add up to the step's time: each
loop's share is then the sum of its ops' durations. (With the default threads, ops of
different iterations and loops overlap and a single op's duration says little: the
threaded ratios are bench_speed's.) What is left of the step's wall time after the op
durations is the executor's own work plus the cheap ops the profiler does not record.

Each op is put in one place by its node name (``name:Type`` in the profile):
* keras.layers.RNN: ``forward loop`` and ``backward loop`` (the tape's while-loop gradient);
* MemoryEfficientRNN: ``first sweep`` (the layer's own loop), ``recompute`` (the gradient's
  loops that evaluate steps again), ``backward`` (the gradient's loops that run steps'
  backwards); in the last, ``cell gradient`` are the ops of the cell's gradient graph,
  ``forward ops in backward`` the cell's forward ops a backward recomputes from a compact
  internal state (see `step_program`), ``bookkeeping`` the rest (table reads, store moves,
  sums of the params' gradients).

Times per step divide by T, except ``recompute``, which divides by the recomputed steps.
Writes ``<out-dir>/<stem>.json`` and ``<out-dir>/<stem>.md`` (stem ``step_breakdown``), with
the commit of the code measured.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# Before any op runs: one thread each, so that op durations add up to the step.
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)

import keras  # noqa: E402

from _bench import REPO_ROOT, code_commit, log  # noqa: E402
from bench_speed import make_step, timed  # noqa: E402  (the same training step)
from tf_membptt import MemoryEfficientRNN  # noqa: E402

CONFIGS = {
    "lstm32": ("LSTMCell(32)", lambda: keras.layers.LSTMCell(32)),
    "lstm128": ("LSTMCell(128)", lambda: keras.layers.LSTMCell(128)),
    "lstm512": ("LSTMCell(512)", lambda: keras.layers.LSTMCell(512)),
    "gru128": ("GRUCell(128)", lambda: keras.layers.GRUCell(128)),
}
BATCH, FEATURES = 32, 32
_FRAME = re.compile(r"(?:body|then|else)/_\d+")


def run_once(step, x):
    return timed(step, x)[0]


def op_events(log_dir):
    """``[(node name, op type, duration in seconds)]`` of the ops in one profile."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    (path,) = glob.glob(f"{log_dir}/**/*.xplane.pb", recursive=True)
    space = xplane_pb2.XSpace()
    space.ParseFromString(pathlib.Path(path).read_bytes())
    events = []
    for plane in space.planes:
        if "Host" not in plane.name and "CPU" not in plane.name:
            continue
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                # Op events are "node:Type"; the rest are the runtime's own regions.
                if ":" not in name or "::" in name or name.startswith("EagerLocalExecute"):
                    continue
                node, op_type = name.rsplit(":", 1)
                events.append((node, op_type, event.duration_ps * 1e-12))
    return events


def frame_of(node):
    """The loop body (or branch) a node runs in: its name up to the last body marker."""
    matches = list(_FRAME.finditer(node))
    return node[:matches[-1].end()] if matches else ""


def classify(events, layer_name, is_keras):
    """``{place: {"seconds", "ops", "types": {op type: seconds}}}``."""
    gradient_frames = {frame_of(node) for node, _, _ in events if "/gradients/" in node}
    places = collections.defaultdict(
        lambda: {"seconds": 0.0, "ops": 0, "types": collections.Counter()})
    for node, op_type, seconds in events:
        frame = frame_of(node)
        if not frame:
            place = "outside loops"
        elif is_keras:
            place = "backward loop" if "while_grad" in frame else "forward loop"
        elif re.match(rf"{re.escape(layer_name)}(_\d+)?/", node):
            place = "first sweep"
        elif frame in gradient_frames:
            if "/gradients/" in node:
                place = "backward: cell gradient"
            elif "PartitionedCall/" in node:
                place = "backward: forward ops in backward"
            else:
                place = "backward: bookkeeping"
        elif "PartitionedCall/" in node:
            place = "recompute: cell"
        else:
            place = "recompute: bookkeeping"
        entry = places[place]
        entry["seconds"] += seconds
        entry["ops"] += 1
        entry["types"][op_type] += seconds
    return {place: {"seconds": e["seconds"], "ops": e["ops"],
                    "types": dict(e["types"].most_common(6))}
            for place, e in places.items()}


def profile(step, x, log_dir):
    tf.profiler.experimental.start(log_dir)
    wall = run_once(step, x)
    tf.profiler.experimental.stop()
    return wall, op_events(log_dir)


def run_config(name, budgets, num_steps, rounds):
    label, make_cell = CONFIGS[name]
    cell = make_cell()
    x = tf.random.normal([BATCH, num_steps, FEATURES], seed=1)
    layers = {"keras.layers.RNN": keras.layers.RNN(cell)}
    for budget in budgets:
        layers[f"budget {budget:g}"] = MemoryEfficientRNN(cell, memory_budget=budget)
    steps = {}
    for method, layer in layers.items():
        layer(x[:, :2])
        steps[method] = make_step(layer, cell.trainable_variables, jit=False)
        run_once(steps[method], x)  # trace and warm up
    walls = {method: [] for method in steps}
    methods = list(steps)
    for r in range(rounds):  # alternated, in a rotated order
        for method in methods[r % len(methods):] + methods[:r % len(methods)]:
            walls[method].append(run_once(steps[method], x))
    results = {}
    for method, step in steps.items():
        with tempfile.TemporaryDirectory() as log_dir:
            profiled_wall, events = profile(step, x, log_dir)
        layer = layers[method]
        plan = None if method == "keras.layers.RNN" else layer.last_plan
        places = classify(events, layer.name, plan is None)
        results[method] = {
            "wall_s": walls[method], "median_s": statistics.median(walls[method]),
            "profiled_wall_s": profiled_wall,
            "op_seconds": sum(p["seconds"] for p in places.values()),
            "places": places,
            "recomputed_steps": None if plan is None else plan.forward_evals - num_steps,
            "plan": None if plan is None else plan.describe(),
        }
        log(f"{label} {method}: median {results[method]['median_s'] * 1e3:.0f} ms, profiled "
            f"{profiled_wall * 1e3:.0f} ms, ops {results[method]['op_seconds'] * 1e3:.0f} ms")
    return {"config": name, "label": label, "T": num_steps, "batch": BATCH,
            "features": FEATURES, "methods": results}


def per_step_us(entry, place, num_steps):
    seconds = sum(p["seconds"] for key, p in entry["places"].items()
                  if key == place or key.startswith(place + ":"))
    count = entry["recomputed_steps"] if place.startswith("recompute") else num_steps
    return seconds / count * 1e6 if count else 0.0


def write(results, out_dir, args):
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "date": datetime.date.today().isoformat(),
               "commit": code_commit(),
               "machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpus": os.cpu_count(), "tensorflow": tf.__version__,
                           "keras": keras.__version__, "threads": "1 inter-op, 1 intra-op"},
               "results": results}
    (out_dir / f"{args.stem}.json").write_text(json.dumps(payload, indent=1))
    lines = ["# Where a training step's time goes (graph mode, one thread)", "",
             f"{payload['date']}, code at {payload['commit']}, "
             f"{payload['machine']['platform']}, TensorFlow "
             f"{tf.__version__}, Keras {keras.__version__}; one inter-op and one intra-op "
             "thread, so op durations add up to the step (see the script's docstring). "
             f"Medians of {args.rounds} alternated steps; places from one profiled step.", ""]
    for result in results:
        T = result["T"]
        methods = result["methods"]
        base = methods["keras.layers.RNN"]["median_s"]
        lines += [f"## {result['label']}, T = {T}, batch {result['batch']}", "",
                  "| method | step (ms) | / keras.layers.RNN | op time (ms) | not in op events "
                  "(ms) |", "|---|---:|---:|---:|---:|"]
        for method, entry in methods.items():
            rest = entry["profiled_wall_s"] - entry["op_seconds"]
            lines.append(f"| {method} | {entry['median_s'] * 1e3:.0f} | "
                         f"{entry['median_s'] / base:.2f}x | {entry['op_seconds'] * 1e3:.0f} | "
                         f"{rest * 1e3:.0f} |")
        lines += ["", "| method | place | op time (ms) | per step (us) | ops | largest op "
                  "types (ms) |", "|---|---|---:|---:|---:|---|"]
        for method, entry in methods.items():
            for place, p in sorted(entry["places"].items()):
                count = (entry["recomputed_steps"] if place.startswith("recompute")
                         else T)
                types = ", ".join(f"{t} {s * 1e3:.1f}" for t, s in p["types"].items())
                per_step = f"{p['seconds'] / count * 1e6:.1f}" if count else "-"
                lines.append(f"| {method} | {place} | {p['seconds'] * 1e3:.1f} | {per_step} | "
                             f"{p['ops']} | {types} |")
        keras_entry = methods["keras.layers.RNN"]
        lines += ["", "Per step (op time, us): keras.layers.RNN forward "
                  f"{per_step_us(keras_entry, 'forward loop', T):.0f}, backward "
                  f"{per_step_us(keras_entry, 'backward loop', T):.0f}."]
        for method, entry in methods.items():
            if method == "keras.layers.RNN":
                continue
            text = (f"{method}: first sweep {per_step_us(entry, 'first sweep', T):.0f}, "
                    f"backward {per_step_us(entry, 'backward', T):.0f}")
            if entry["recomputed_steps"]:
                text += (f", recomputed step {per_step_us(entry, 'recompute', T):.0f} "
                         f"({entry['recomputed_steps']} of them)")
            lines.append(text + ".")
        lines.append("")
    (out_dir / f"{args.stem}.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="lstm128",
                        help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--budgets", default="1.0,0.05")
    parser.add_argument("--num-steps", "-T", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--stem", default="step_breakdown",
                        help="file names: <out-dir>/<stem>.json and .md")
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {sorted(CONFIGS)}")
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b]
    except ValueError:
        parser.error(f"--budgets must be comma-separated fractions. Received: "
                     f"--budgets={args.budgets}")
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        parser.error(f"--budgets must be fractions in (0, 1]. Received: --budgets={args.budgets}")
    results = []
    for name in configs:
        results.append(run_config(name, budgets, args.num_steps, args.rounds))
        write(results, pathlib.Path(args.out_dir), args)
    log(f"wrote {args.out_dir}/{args.stem}.md")


if __name__ == "__main__":
    sys.exit(main())
