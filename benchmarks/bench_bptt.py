"""Training-step benchmark: memory and time of MemoryEfficientRNN vs standard BPTT.

    python benchmarks/bench_bptt.py                       # default run (< 30 min, 2 cores)
    python benchmarks/bench_bptt.py --quick               # T=100 and 1000, 3 rounds
    python benchmarks/bench_bptt.py --modes graph --lengths 100,1000 --rounds 7
    python benchmarks/bench_bptt.py --quick --units 128 --out-dir /tmp/bptt   # smoke run

For an ``LSTMCell(units)`` (default 512), batch 32, 32 input features, float32, loss =
sum of the last output (``return_sequences=False``), one *training step* is
``tape.gradient(loss, cell weights)`` inside a ``tf.function`` (mode ``graph``) or a
``tf.function(jit_compile=True)`` (mode ``xla``). Methods, measured in one process:

* ``bptt``: standard BPTT, ``keras.layers.RNN(keras.layers.LSTMCell(units))``;
* ``recompute``: what a user writes today, ``sqrt(T)`` segments each wrapped in
  ``tf.recompute_grad`` (`RecomputeSegmentsRNN` below);
* ``msm`` at budgets 5%, 10%, 20%, 50%, 100%, and ``hsm`` / ``ism`` at 5% and 20%:
  ``tf_membptt.MemoryEfficientRNN(cell, memory_budget=b, strategy=s)``.

All methods start from the same weights; each method's gradients are compared once (the
warm-up step) with standard BPTT's (max over variables of ``|g - g_ref| / |g_ref|``,
tolerance 1e-4; a failure is reported and makes the exit status 1).

Metrics, per (mode, T):

* activation memory: the CPU BFC allocator's peak during one step minus the bytes in use
  just before it (``TF_CPU_ALLOCATOR_USE_BFC=true`` is set before TensorFlow is imported;
  ``reset_memory_stats`` just before the step). Measured on every timed step; the median
  is reported. It includes everything the step allocates: the returned weight gradients,
  the time-major copy of the input, the input-gradient buffer, the working set.
* step time: median over ``rounds`` alternated runs after one warm-up step per method
  (each round runs every method once, in a rotated order).
* both as ratios to standard BPTT from the same run, next to the plan's predictions:
  predicted memory = ``plan.peak_memory`` x hidden-state bytes (+ estimated constant
  overheads, reported separately), predicted time = ``plan.time_ratio()``.

Time budget: the default run must fit in 30 minutes on 2 cores. The script measures the
warm-up step of standard BPTT first and estimates every method's cost from it (the plan's
predicted time ratio); methods (lowest priority first) and whole configurations are
skipped with a recorded reason when they would exceed ``--time-budget``. Long sequences
(``T >= 5000``) run only ``bptt``, ``recompute`` and ``msm`` at 5%, with
``--long-rounds`` rounds; a configuration whose standard BPTT would not fit in the
available RAM is skipped.

Writes ``<out-dir>/bptt.json`` (all numbers), ``<out-dir>/bptt.png`` (memory-time plane,
one panel per mode and length) and ``<out-dir>/bptt.md`` (tables, machine description).
"""

from __future__ import annotations

import os

os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"  # before TensorFlow is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

tf.get_logger().setLevel("ERROR")   # retracing warnings: every method has its own function

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
try:
    import tf_membptt  # noqa: E402
except ImportError:  # run from a checkout without installing: use the checkout
    sys.path.insert(0, str(REPO_ROOT))
    import tf_membptt  # noqa: E402
from tf_membptt import MemoryEfficientRNN  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
GRAD_RTOL = 1e-4
LONG_T = 5000           # from this length on, only the core methods run
PAPER_HEADLINE = (5.0, 1.33)   # Gruslys et al. 2016: 5% of BPTT's memory, 1.33x time


# --------------------------------------------------------------------------------------
# The baseline users write today
# --------------------------------------------------------------------------------------
class RecomputeSegmentsRNN(keras.layers.Layer):
    """What a user writes today: sqrt(T) segments, each wrapped in `tf.recompute_grad`.

    Written as a user would: a Keras layer that wraps `keras.layers.RNN(cell,
    return_state=True)` and chains the states through segments. The time axis is split into ``ceil(sqrt(T))`` segments of (nearly) equal length. Each
    segment runs ``keras.layers.RNN(cell, return_state=True)`` from the previous
    segment's final states, inside a function decorated with `tf.recompute_grad`: the
    forward pass keeps only the states at segment boundaries, and the backward pass
    recomputes each segment (storing its per-step tensors, one segment at a time) when its
    gradient is needed. Memory ~ (sqrt(T) boundary states + one segment's internal states),
    time ~ two forward evaluations per step (predicted 4/3 of standard BPTT with a backward
    step costing two forward steps). Returns the last output (``return_sequences=False``).

    `tf.recompute_grad` gets the cell's variables through the tape (it passes
    ``variables=`` to its gradient), so the weight gradients are those of standard BPTT.
    """

    def __init__(self, cell, num_segments=None, **kwargs):
        super().__init__(**kwargs)
        self.cell = cell
        self.num_segments = num_segments
        self.rnn = keras.layers.RNN(cell, return_sequences=False, return_state=True)

    def build(self, input_shape):
        self.rnn.build((input_shape[0], None, input_shape[-1]))

    def _boundaries(self, num_steps):
        segments = self.num_segments or max(1, math.ceil(math.sqrt(num_steps)))
        length = math.ceil(num_steps / segments)
        return [(s, min(s + length, num_steps)) for s in range(0, num_steps, length)]

    def call(self, x, training=None):
        num_steps = x.shape[1]
        batch = tf.shape(x)[0]
        sizes = self.cell.state_size
        sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
        states = [tf.zeros(tf.stack([batch, s]), x.dtype) for s in sizes]
        rnn = self.rnn

        @tf.recompute_grad
        def segment(xs, *states):
            output, *new_states = rnn(xs, initial_state=list(states), training=training)
            # The states come first: in graph mode `tf.recompute_grad` delays the
            # recomputation until the gradient of its *first* output arrives. With the
            # segment's last output first (unused, so its gradient is zeros and available
            # at once), every segment is recomputed right away and all of them keep their
            # per-step tensors together: the memory of standard BPTT.
            return (*new_states, output)

        output = None
        for start, stop in self._boundaries(num_steps):
            result = segment(x[:, start:stop], *states)
            states, output = list(result[:-1]), result[-1]
        return output


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------
def method_list(num_steps):
    """(name, strategy, budget) in priority order (the first ones are kept when the time
    budget forces skipping)."""
    core = [("bptt", None, None), ("msm 5%", "msm", 0.05), ("recompute sqrt(T)", None, None)]
    if num_steps >= LONG_T:
        return core
    return core + [("msm 20%", "msm", 0.2), ("hsm 5%", "hsm", 0.05),
                   ("ism 5%", "ism", 0.05), ("msm 10%", "msm", 0.1),
                   ("msm 50%", "msm", 0.5), ("hsm 20%", "hsm", 0.2),
                   ("ism 20%", "ism", 0.2), ("msm 100%", "msm", 1.0)]


def recompute_segments(num_steps):
    return max(1, math.ceil(math.sqrt(num_steps)))


class Method:
    def __init__(self, name, strategy, budget, args, num_steps, mode, x, ref_weights):
        self.name, self.strategy, self.budget = name, strategy, budget
        cell = keras.layers.LSTMCell(args.units)
        if name == "bptt":
            layer = keras.layers.RNN(cell, return_sequences=False)
        elif name.startswith("recompute"):
            layer = RecomputeSegmentsRNN(cell)
        else:
            layer = MemoryEfficientRNN(cell, memory_budget=budget, strategy=strategy)
        layer(x[:, :2])                 # build (inference path: plans nothing)
        if ref_weights is not None:
            cell.set_weights(ref_weights)
        self.cell, self.layer = cell, layer
        variables = cell.trainable_variables

        @tf.function(jit_compile=(mode == "xla"))
        def step(xt):
            with tf.GradientTape() as tape:
                y = layer(xt, training=True)
                loss = tf.reduce_sum(y)
            return tape.gradient(loss, variables)

        self.step = step
        self.times, self.peaks = [], []
        self.warmup_s = None
        self.grad_rel_err = None

    def run(self, x):
        """One synchronous training step: (seconds, activation bytes, gradients)."""
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
        t0 = time.perf_counter()
        grads = self.step(x)
        grads = [g.numpy() for g in grads]
        seconds = time.perf_counter() - t0
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
        return seconds, int(peak), grads


def grad_rel_err(grads, ref):
    return max(float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))
               for g, r in zip(grads, ref))


# --------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------
def hidden_bytes(args):
    return 2 * args.units * args.batch * 4          # LSTM: h and c, float32


def overheads(args, num_steps, alpha):
    """Estimated constant (budget-independent) parts of a step's activation memory."""
    u, b, f = args.units, args.batch, args.features
    params = 4 * u * (f + u) + 4 * u                # kernel, recurrent kernel, bias
    return {
        "time_major_input": b * num_steps * f * 4,  # tf.transpose of the input
        "input_gradient": b * num_steps * f * 4,    # d(inputs), time-major
        "weight_gradients": 2 * params * 4,         # accumulator in the loop + result
        "working_set": int(round(3 * alpha * hidden_bytes(args))),  # ~3 steps' tensors
    }


def predicted_time_ratio(method):
    layer = method.layer
    if method.name == "bptt":
        return 1.0
    if method.name.startswith("recompute"):
        return 4.0 / 3.0                             # 2T forward evals + 2T backward
    return layer.last_plan.time_ratio()


# --------------------------------------------------------------------------------------
# Running one configuration
# --------------------------------------------------------------------------------------
def available_ram_bytes():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Clock:
    def __init__(self, budget_s):
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def left(self):
        return self.budget_s - (time.perf_counter() - self.start)


def log(msg):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def run_config(args, mode, num_steps, rounds, clock, reserve_s, known_alpha):
    """Runs one (mode, T); returns its result dict."""
    result = {"mode": mode, "T": num_steps, "rounds": rounds, "methods": [], "skipped": []}
    rng = np.random.default_rng(args.seed)
    x = tf.constant(rng.standard_normal((args.batch, num_steps, args.features),
                                        dtype=np.float32))
    hb = hidden_bytes(args)
    alpha_guess = known_alpha or 4.5
    bptt_bytes_guess = alpha_guess * num_steps * hb * 2.0   # keras RNN keeps more
    ram = available_ram_bytes()
    if ram is not None and bptt_bytes_guess > 0.6 * ram:
        result["skip_reason"] = (f"standard BPTT would need ~{bptt_bytes_guess / 2**30:.1f} "
                                 f"GiB; {ram / 2**30:.1f} GiB available")
        return result

    specs = method_list(num_steps)
    if args.methods:
        specs = [specs[0]] + [s for s in specs[1:] if s[0] in args.methods]
    ref = Method(*specs[0], args, num_steps, mode, x, None)
    ref_weights = ref.cell.get_weights()
    log(f"{mode} T={num_steps}: warm-up bptt")
    t0 = time.perf_counter()
    _, _, ref_grads = ref.run(x)
    ref.warmup_s = time.perf_counter() - t0
    ref.grad_rel_err = 0.0
    # One more step tells the steady step time apart from the trace/compile time.
    sec, peak, _ = ref.run(x)
    ref.times.append(sec)
    ref.peaks.append(peak)
    t_ref = sec
    compile_s = max(ref.warmup_s - sec, 0.0)
    result["bptt_step_estimate_s"] = t_ref
    log(f"  bptt step {t_ref:.3f} s (trace/compile {compile_s:.1f} s)")

    # Choose the methods that fit. Before a method's warm-up its cost is estimated from
    # the BPTT step (x a guessed time ratio) plus a trace/compile time learned so far;
    # after it, from its measured warm-up step. Either estimate too large: skipped.
    def left():
        return clock.left() - reserve_s

    trace_s = max(compile_s, 2.0)
    trace_per_segment = 2.0 if mode == "graph" else 3.0   # tracing one keras RNN
    slow = None                             # (seen / predicted step time, its budget)
    methods = [ref]
    committed = t_ref * (rounds - 1)        # timed steps still to run, accepted methods
    for name, strategy, budget in specs[1:]:
        recompute = name.startswith("recompute")
        est_ratio = 4.0 / 3.0 if recompute else {"msm": 1.35, "hsm": 1.6, "ism": 1.5}[strategy]
        est_step = t_ref * est_ratio
        if not recompute and slow is not None:
            # Seen slower than predicted (e.g. under XLA): scale by what was seen, and by
            # the budget when that slowdown is large (time growing with the store size).
            factor, seen_budget = slow
            est_step *= factor * (max(1.0, budget / seen_budget) if factor > 2 else 1.0)
        if est_step > args.max_step_s:
            result["skipped"].append({"method": name, "reason": (
                f"a step would take ~{est_step:.0f} s (estimated from the steps seen), "
                f"over --max-step-s {args.max_step_s:g}")})
            log(f"  skip {name}: {result['skipped'][-1]['reason']}")
            continue
        est_trace = trace_per_segment * recompute_segments(num_steps) if recompute \
            else trace_s
        need = est_trace + est_step * (rounds + 1)
        if committed + need > left():
            result["skipped"].append({"method": name, "reason": (
                f"time budget: ~{need:.0f} s needed (estimated), "
                f"{left() - committed:.0f} s left for this configuration")})
            log(f"  skip {name}: {result['skipped'][-1]['reason']}")
            continue
        try:
            m = Method(name, strategy, budget, args, num_steps, mode, x, ref_weights)
            t0 = time.perf_counter()
            _, _, grads = m.run(x)
            m.warmup_s = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
            result["skipped"].append({"method": name, "reason": "error: " + repr(exc)[-600:]})
            log(f"  {name}: ERROR {exc!r}"[:300])
            continue
        m.grad_rel_err = grad_rel_err(grads, ref_grads)
        log(f"  warm-up {name}: {m.warmup_s:.2f} s, grad rel err {m.grad_rel_err:.2e}")
        step_est = max(m.warmup_s - est_trace, 0.5 * m.warmup_s)
        if not recompute:
            trace_s = max(trace_s, min(m.warmup_s - t_ref * est_ratio, 30.0))
            seen = step_est / (t_ref * est_ratio)
            if slow is None or seen > slow[0]:
                slow = (seen, budget)
        if committed + step_est * rounds > left():
            result["skipped"].append({"method": name, "grad_rel_err": m.grad_rel_err,
                                      "warmup_s": m.warmup_s, "reason": (
                f"time budget: warm-up step took {m.warmup_s:.1f} s; {rounds} rounds "
                f"(~{step_est * rounds:.0f} s) do not fit in the "
                f"{left() - committed:.0f} s left for this configuration")})
            log(f"  drop {name}: {result['skipped'][-1]['reason']}")
            continue
        committed += step_est * rounds
        methods.append(m)

    # Alternated rounds (rotated order), memory measured on every step.
    for r in range(rounds):
        k = r % len(methods)
        order = methods[k:] + methods[:k]
        for m in order:
            if m is ref and r == 0:
                continue            # its second step above is its first timed run
            sec, peak, _ = m.run(x)
            m.times.append(sec)
            m.peaks.append(peak)
        log(f"  round {r + 1}/{rounds} done ({clock.left():.0f} s left)")

    for m in methods:
        if isinstance(m.layer, MemoryEfficientRNN) and m.layer.step_alpha:
            known_alpha = m.layer.step_alpha
            break
    bptt_time = statistics.median(ref.times)
    bptt_mem = statistics.median(ref.peaks)
    for m in methods:
        entry = {
            "method": m.name, "strategy": m.strategy, "budget": m.budget,
            "warmup_s": m.warmup_s, "times_s": m.times, "peaks_bytes": m.peaks,
            "median_time_s": statistics.median(m.times),
            "activation_bytes": int(statistics.median(m.peaks)),
            "grad_rel_err": m.grad_rel_err,
            "grad_ok": m.grad_rel_err <= GRAD_RTOL,
        }
        entry["time_ratio"] = entry["median_time_s"] / bptt_time
        entry["memory_ratio"] = entry["activation_bytes"] / bptt_mem
        entry["predicted_time_ratio"] = predicted_time_ratio(m)
        if isinstance(m.layer, MemoryEfficientRNN):
            plan = m.layer.last_plan
            alpha = m.layer.step_alpha
            entry.update(
                plan=plan.describe(), plan_memory_slots=plan.memory_slots,
                plan_peak_slots=plan.peak_memory, plan_alpha=plan.alpha,
                step_alpha=alpha, forward_evals=plan.forward_evals,
                forward_evals_per_step=plan.forward_evals_per_step,
                predicted_state_bytes=int(round(plan.peak_memory * hb)),
                predicted_memory_fraction=plan.memory_fraction)
        elif m.name.startswith("recompute"):
            segs = recompute_segments(num_steps)
            seg_len = math.ceil(num_steps / segs)
            a = known_alpha or 4.5
            entry.update(segments=segs, predicted_state_bytes=int(round(
                (segs + a * seg_len) * hb)))
        else:
            a = known_alpha or 4.5
            entry.update(predicted_state_bytes=int(round(a * num_steps * hb)))
        result["methods"].append(entry)
    a = known_alpha or 4.5
    ov = overheads(args, num_steps, a)
    result["overheads_estimate_bytes"] = ov
    result["alpha"] = a
    result["hidden_state_bytes"] = hb
    for e in result["methods"]:
        e["predicted_total_bytes"] = e["predicted_state_bytes"] + sum(ov.values())
        e["measured_minus_predicted_states_bytes"] = (e["activation_bytes"]
                                                      - e["predicted_state_bytes"])
    return result


# --------------------------------------------------------------------------------------
# Machine description, outputs
# --------------------------------------------------------------------------------------
def machine():
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = ""
    ram = available_ram_bytes()
    return {"cpu": cpu, "cores": cores, "tensorflow": tf.__version__,
            "keras": keras.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "commit": commit,
            "ram_available_gib": round(ram / 2**30, 1) if ram else None,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def mib(b):
    return f"{b / 2**20:.1f}"


def write_markdown(path, data):
    m, a = data["machine"], data["args"]
    lines = [
        "# Training-step benchmark: MemoryEfficientRNN vs standard BPTT", "",
        f"`{data['command']}`", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, TensorFlow {m['tensorflow']}, "
        f"Keras {m['keras']}, Python {m['python']} ({m['date']}, commit {m['commit']}).", "",
        f"`LSTMCell({a['units']})`, batch {a['batch']}, {a['features']} features, float32, "
        "loss = sum of the last output; one step = loss + gradients of the cell weights in "
        "a `tf.function` (graph) or `tf.function(jit_compile=True)` (xla). Memory: CPU BFC "
        "allocator peak during the step minus bytes in use before it (median over the "
        "timed steps). Time: median over alternated rounds after one warm-up step per "
        "method. Ratios are to standard BPTT measured in the same run. Predicted memory = "
        "plan peak (hidden-state slots) x hidden-state bytes; the constant overheads "
        "(estimated) are listed under each table. Predicted time = `plan.time_ratio()` "
        "(a backward step = 2 forward steps); the recompute baseline is predicted at 4/3.",
        ""]
    for cfg in data["configs"]:
        lines.append(f"## {cfg['mode']}, T = {cfg['T']}")
        lines.append("")
        if cfg.get("skip_reason"):
            lines += [f"Skipped: {cfg['skip_reason']}.", ""]
            continue
        hb = cfg["hidden_state_bytes"]
        lines.append(f"{cfg['rounds']} rounds; standard BPTT step "
                     f"{next(e for e in cfg['methods'] if e['method'] == 'bptt')['median_time_s']:.3f} s; "
                     f"hidden state {hb / 1024:.0f} KiB, alpha {cfg['alpha']:.3g}.")
        lines.append("")
        lines.append("| method | plan slots (peak / budget) | predicted states MiB | "
                     "measured MiB | memory vs BPTT | measured - predicted states MiB | "
                     "predicted time | measured time | step s | grad rel err |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for e in cfg["methods"]:
            slots = (f"{e['plan_peak_slots']:g} / {e['plan_memory_slots']:g}"
                     if "plan_peak_slots" in e else
                     (f"{e['segments']} segments" if "segments" in e else "-"))
            lines.append(
                f"| {e['method']} | {slots} | {mib(e['predicted_state_bytes'])} | "
                f"{mib(e['activation_bytes'])} | {100 * e['memory_ratio']:.1f}% | "
                f"{mib(e['measured_minus_predicted_states_bytes'])} | "
                f"{e['predicted_time_ratio']:.3f}x | {e['time_ratio']:.3f}x | "
                f"{e['median_time_s']:.3f} | {e['grad_rel_err']:.1e}"
                f"{'' if e['grad_ok'] else ' FAIL'} |")
        ov = cfg["overheads_estimate_bytes"]
        lines.append("")
        lines.append("Estimated constant overheads (in every method's measurement): "
                     + ", ".join(f"{k.replace('_', ' ')} {mib(v)} MiB" for k, v in ov.items())
                     + f"; total {mib(sum(ov.values()))} MiB.")
        for s in cfg["skipped"]:
            lines.append(f"- skipped {s['method']}: {s['reason']}")
        lines.append("")
    lines.append("![memory-time plane](bptt.png)")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path, data):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot (pip install matplotlib)")
        return False
    configs = [c for c in data["configs"] if c["methods"]]
    if not configs:
        return False
    cols = min(3, len(configs))
    rows = math.ceil(len(configs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows), squeeze=False)
    colors = {"msm": "tab:blue", "hsm": "tab:orange", "ism": "tab:green"}
    for ax, cfg in zip(axes.flat, configs):
        by = {e["method"]: e for e in cfg["methods"]}
        for strategy, color in colors.items():
            es = sorted((e for e in cfg["methods"] if e["strategy"] == strategy),
                        key=lambda e: e["budget"])
            if not es:
                continue
            ax.plot([100 * e["memory_ratio"] for e in es], [e["time_ratio"] for e in es],
                    "o-", color=color, label=f"{strategy} (measured)")
            ax.plot([100 * e["predicted_memory_fraction"] for e in es],
                    [e["predicted_time_ratio"] for e in es], "x--", color=color, alpha=0.5,
                    label=f"{strategy} (plan: peak / (alpha T))")
            for e in es:
                ax.annotate(f"{100 * e['budget']:g}%",
                            (100 * e["memory_ratio"], e["time_ratio"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=color)
        if "recompute sqrt(T)" in by:
            e = by["recompute sqrt(T)"]
            ax.plot(100 * e["memory_ratio"], e["time_ratio"], "s", color="tab:red",
                    label="recompute_grad, sqrt(T) segments")
        if "bptt" in by:
            ax.plot(100, 1.0, "D", color="black", label="standard BPTT")
        ax.plot(*PAPER_HEADLINE, "*", color="gold", markersize=15, markeredgecolor="k",
                label="paper: 5% memory, 1.33x")
        ax.set_xscale("log")
        if max(e["time_ratio"] for e in cfg["methods"]) > 5:
            ax.set_yscale("log")
        ax.set_xlabel("activation memory, % of standard BPTT")
        ax.set_ylabel("time per step / standard BPTT")
        ax.set_title(f"{cfg['mode']}, T={cfg['T']}")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(configs):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    seen = {}
    for ax in list(axes.flat)[:len(configs)]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(l, h)
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center",
               ncol=min(4, len(seen)), fontsize=8)
    m, a = data["machine"], data["args"]
    fig.suptitle(f"LSTMCell({a['units']}), batch {a['batch']}: {m['cpu']}, {m['cores']} "
                 f"cores, TF {m['tensorflow']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if rows == 1 else 0.05, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="T=100 and 1000 only, 3 rounds")
    p.add_argument("--modes", default="graph,xla", help="comma-separated: graph,xla")
    p.add_argument("--lengths", default=None,
                   help="comma-separated sequence lengths (default 100,1000,10000)")
    p.add_argument("--rounds", type=int, default=None,
                   help="alternated timed rounds per configuration (default 5; 3 quick)")
    p.add_argument("--long-rounds", type=int, default=3,
                   help=f"rounds for T >= {LONG_T} (default 3)")
    p.add_argument("--max-step-s", type=float, default=120.0,
                   help="skip a method whose step would take longer (default 120)")
    p.add_argument("--units", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--methods", default=None,
                   help="comma-separated subset, e.g. 'msm 5%%,recompute sqrt(T)' "
                        "(bptt always runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=1560.0,
                   help="seconds for all measurements (default 1560 = 26 min)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    if args.methods:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in ("graph", "xla"):
            p.error(f"unknown mode {m!r} (graph, xla)")
    if args.lengths is None:
        args.lengths = "100,1000" if args.quick else "100,1000,10000"
    args.lengths = sorted(int(t) for t in args.lengths.split(","))
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    return args


def main(argv=None):
    args = parse_args(argv)
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.time_budget)
    data = {"command": "python benchmarks/bench_bptt.py " + " ".join(sys.argv[1:]),
            "machine": machine(), "configs": [],
            "args": {k: v for k, v in vars(args).items()}}
    log(f"machine: {data['machine']}")
    configs = [(mode, t) for t in args.lengths for mode in args.modes]
    known_alpha = None
    bptt_per_step = {}          # mode -> seconds per timestep (from the measured bptt)
    for i, (mode, num_steps) in enumerate(configs):
        rounds = args.long_rounds if num_steps >= LONG_T else args.rounds
        # Reserve time for the core methods of the later configurations that can fit.
        rate = bptt_per_step.get(mode) or (max(bptt_per_step.values())
                                           if bptt_per_step else None)
        reserve = 0.0
        if rate is not None:
            for later_mode, later_t in configs[i + 1:]:
                lr = bptt_per_step.get(later_mode, rate)
                r = args.long_rounds if later_t >= LONG_T else args.rounds
                need = (lr * later_t * (1 + 1.35 + 4 / 3) * (r + 2)
                        + 3.0 * recompute_segments(later_t))
                if reserve + need < clock.left() * 0.5:
                    reserve += need
            est = (rate * num_steps * (1 + 1.35 + 4 / 3) * (rounds + 2)
                   + 3.0 * recompute_segments(num_steps))
            if est > clock.left():
                data["configs"].append({
                    "mode": mode, "T": num_steps, "rounds": rounds, "methods": [],
                    "skipped": [], "skip_reason": (
                        f"time budget: the core methods (bptt, msm 5%, recompute) need "
                        f"~{est:.0f} s (estimated from the measured BPTT step), "
                        f"{clock.left():.0f} s left")})
                log(f"skip {mode} T={num_steps}: {data['configs'][-1]['skip_reason']}")
                continue
        if clock.left() <= 0:
            data["configs"].append({"mode": mode, "T": num_steps, "rounds": rounds,
                                    "methods": [], "skipped": [],
                                    "skip_reason": "time budget exhausted"})
            continue
        cfg = run_config(args, mode, num_steps, rounds, clock, reserve, known_alpha)
        data["configs"].append(cfg)
        if cfg.get("alpha"):
            known_alpha = cfg["alpha"]
        if cfg.get("bptt_step_estimate_s"):
            bptt_per_step[mode] = cfg["bptt_step_estimate_s"] / num_steps
        if cfg.get("skip_reason"):
            log(f"skip {mode} T={num_steps}: {cfg['skip_reason']}")
        # Checkpoint after every configuration.
        (out / "bptt.json").write_text(json.dumps(data, indent=1))
    data["total_s"] = time.perf_counter() - clock.start
    (out / "bptt.json").write_text(json.dumps(data, indent=1))
    write_markdown(out / "bptt.md", data)
    plotted = write_plot(out / "bptt.png", data)
    log(f"wrote {out / 'bptt.json'}, {out / 'bptt.md'}"
        + (f", {out / 'bptt.png'}" if plotted else "")
        + f" in {data['total_s']:.0f} s")
    bad = [(c["mode"], c["T"], e["method"], e["grad_rel_err"]) for c in data["configs"]
           for e in c["methods"] + c["skipped"]
           if e.get("grad_rel_err") is not None and not e["grad_rel_err"] <= GRAD_RTOL]
    for b in bad:
        log(f"GRADIENT MISMATCH {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
