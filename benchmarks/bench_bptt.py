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
  is reported. It includes everything the step allocates: the returned weight gradients
  (the step watches the variables only: no input gradient is built), the working set.
  Before any measurement a 2 GiB block is allocated and freed (``--reserve-mib``): the
  allocator hands out a whole free chunk when it is less than twice a request and grows
  in power-of-two regions, so without a large free chunk to split from, a peak can include
  tens of MiB of rounding that depend on what ran before in the process (measured: XLA,
  T = 1000, msm 10%: 68.3 MiB without, 46.8 MiB with, predicted 46.1 MiB).
* step time: median over ``rounds`` alternated runs after one warm-up step per method
  (each round runs every method once, in a rotated order).
* both as ratios to standard BPTT from the same run, next to the plan's predictions:
  predicted memory = ``plan.peak_memory`` x hidden-state bytes (the stored states) +
  estimated constant overheads (weight gradients, one step's working set; listed under
  each table), predicted time = ``plan.time_ratio(beta)``.
* beta, the cost of a backward step in forward steps, measured in the same run: a
  forward-only step of standard BPTT's layer (``tf.reduce_sum(layer(x, training=True))``
  in a ``tf.function`` of the same mode, no tape) is timed in the same alternated rounds;
  ``beta = (median full step - median forward) / median forward``. Predicted times are
  reported with ``beta = 2`` (the paper's convention) and with the measured beta (the
  recompute baseline: ``(2 + beta) / (1 + beta)``, 4/3 at beta = 2).

Time budget: the default run must fit in 30 minutes on 2 cores. The script measures the
warm-up step of standard BPTT first and estimates every method's cost from it (a guessed
time ratio); methods (lowest priority first) and whole configurations are skipped with a
recorded reason when they would exceed ``--time-budget``. Long sequences (``T >= 5000``)
run only ``bptt``, ``msm`` at 5% and ``recompute`` (in that order), with
``--long-rounds`` rounds. The long configurations of the first mode (graph) run right
after the first (cheap, calibrating) configuration, before the other modes' and shorter
ones, so that they get the time they need; the tables list the configurations in the
usual order. A configuration whose standard BPTT would not fit in the available RAM
(estimated from the BPTT memory measured at a shorter length in the same mode) is
skipped.

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
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from _bench import REPO_ROOT, code_commit, log, reserve_allocator, timed_run  # noqa: E402
from tf_membptt import MemoryEfficientRNN  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
GRAD_RTOL = 1e-4
LONG_T = 5000           # from this length on, only the core methods run
ALPHA_FALLBACK = 3.0    # LSTM's compact internal state, in hidden states (h, c), until a
                        # MemoryEfficientRNN layer has measured it (`layer.step_alpha`)
# Guesses for the time budget (the measured steps replace them as they come):
EST_RATIO = {            # step time / standard BPTT's, per mode and strategy
    "graph": {"msm": 1.35, "hsm": 1.6, "ism": 1.5},
    "xla": {"msm": 1.8, "hsm": 2.0, "ism": 1.8},
}
FORWARD_RATIO_GUESS = 0.45          # forward-only step / standard BPTT step
TRACE_PER_SEGMENT = {"graph": 0.6, "xla": 1.2}   # s to trace one recompute segment
XLA_BPTT_STATES_PER_STEP = 40.0     # XLA's BPTT keeps ~35 hidden states per step (seen)
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
        return timed_run(lambda: [g.numpy() for g in self.step(x)])


class ForwardOnly:
    """The forward pass of standard BPTT's layer alone (no tape), in the same mode: with
    the full step it gives beta, the cost of a backward step in forward steps."""

    name = "bptt forward"

    def __init__(self, layer, mode):
        @tf.function(jit_compile=(mode == "xla"))
        def forward(xt):
            return tf.reduce_sum(layer(xt, training=True))

        self.step = forward
        self.times, self.peaks = [], []
        self.warmup_s = None

    def run(self, x):
        return timed_run(lambda: self.step(x).numpy())


def grad_rel_err(grads, ref):
    return max(float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))
               for g, r in zip(grads, ref))


# --------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------
def hidden_bytes(args):
    return 2 * args.units * args.batch * 4          # LSTM: h and c, float32


def overheads(args, alpha):
    """Estimated constant (budget- and length-independent) parts of a step's activation
    memory, in bytes. The executor reads each step's input from the batch-major input (no
    time-major copy), and the benchmark's step watches the variables only (no input
    gradient), so neither appears."""
    u, f = args.units, args.features
    params = 4 * u * (f + u) + 4 * u                # kernel, recurrent kernel, bias
    return {
        # The backward loop runs one iteration at a time: the running sum of the weight
        # gradients (returned at the end) plus the gradient of the step being processed.
        "weight_gradients": 2 * params * 4,
        # One step's tensors: its internal state (alpha hidden states, recomputed or
        # restored) and the backward step's temporaries of about the same size (the
        # gradients of the gates and of h, c).
        "working_set": int(round(2 * alpha * hidden_bytes(args))),
    }


def predicted_time_ratio(method, beta=2.0):
    """Predicted step time / standard BPTT's, a backward step costing `beta` forward ones."""
    beta = max(float(beta), 0.0)
    if method.name == "bptt":
        return 1.0
    if method.name.startswith("recompute"):
        # 2T forward evaluations + T backward steps, vs T forward + T backward.
        return (2.0 + beta) / (1.0 + beta)
    return method.layer.last_plan.time_ratio(beta)


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


def bptt_bytes_estimate(args, mode, num_steps, known_alpha, bytes_per_step):
    """Standard BPTT's activation bytes at this length: from the bytes per step measured at
    a shorter length in this mode when there is one, else a guess."""
    if bytes_per_step:
        return bytes_per_step * num_steps * 1.1
    states = (XLA_BPTT_STATES_PER_STEP if mode == "xla"
              else 2.0 * (known_alpha or ALPHA_FALLBACK))        # keras RNN keeps more
    return states * num_steps * hidden_bytes(args)


def ram_skip_reason(args, mode, num_steps, known_alpha, bytes_per_step):
    need = bptt_bytes_estimate(args, mode, num_steps, known_alpha, bytes_per_step)
    ram = available_ram_bytes()
    if ram is not None and need > 0.6 * ram:
        how = "measured per step at a shorter length" if bytes_per_step else "guessed"
        return (f"standard BPTT would need ~{need / 2**30:.1f} GiB ({how}); "
                f"{ram / 2**30:.1f} GiB available")
    return None


def config_need_s(args, mode, num_steps, rate, core=True, recompute=True):
    """Estimated seconds for a configuration: standard BPTT and its forward-only step,
    plus (core) msm 5% and (recompute) the recompute baseline; each warm-up + rounds
    steps, + trace/compile times."""
    rounds = args.long_rounds if num_steps >= LONG_T else args.rounds
    trace_one = 2.0 if mode == "graph" else 6.0
    ratio = 1.0 + FORWARD_RATIO_GUESS
    trace = 2 * trace_one
    if core:
        ratio += EST_RATIO[mode]["msm"]
        trace += trace_one
        if recompute:
            ratio += 4.0 / 3.0
            trace += trace_one + TRACE_PER_SEGMENT[mode] * recompute_segments(num_steps)
    return rate * num_steps * ratio * (rounds + 1) + trace


def run_config(args, mode, num_steps, rounds, clock, reserve_s, known_alpha,
               bytes_per_step=None):
    """Runs one (mode, T); returns its result dict. `reserve_s`: seconds to keep for the
    later configurations, or a function of this mode's measured BPTT seconds per timestep
    returning them (when no rate was known before this configuration)."""
    result = {"mode": mode, "T": num_steps, "rounds": rounds, "methods": [], "skipped": []}
    rng = np.random.default_rng(args.seed)
    x = tf.constant(rng.standard_normal((args.batch, num_steps, args.features),
                                        dtype=np.float32))
    hb = hidden_bytes(args)
    reason = ram_skip_reason(args, mode, num_steps, known_alpha, bytes_per_step)
    if reason:
        result["skip_reason"] = reason
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
    result["bptt_bytes_estimate"] = peak
    log(f"  bptt step {t_ref:.3f} s (trace/compile {compile_s:.1f} s)")
    if callable(reserve_s):
        reserve_s = reserve_s(t_ref / num_steps)
        log(f"  {reserve_s:.0f} s kept for later configurations")

    # The forward-only step of the same layer (for beta): always run with bptt.
    fwd = ForwardOnly(ref.layer, mode)
    t0 = time.perf_counter()
    fwd.run(x)
    fwd.warmup_s = time.perf_counter() - t0
    fwd_est = min(fwd.warmup_s, t_ref)      # the warm-up includes the trace
    log(f"  warm-up bptt forward: {fwd.warmup_s:.2f} s")

    # Choose the methods that fit. Before a method's warm-up its cost is estimated from
    # the BPTT step (x a guessed time ratio) plus a trace/compile time learned so far;
    # after it, from its measured warm-up step. Either estimate too large: skipped.
    def left():
        return clock.left() - reserve_s

    trace_s = max(compile_s, 2.0)
    slow = None                             # (seen / predicted step time, its budget)
    methods = [ref]
    # Timed steps still to run for the accepted methods (bptt: its first is done).
    committed = t_ref * (rounds - 1) + fwd_est * rounds
    for name, strategy, budget in specs[1:]:
        recompute = name.startswith("recompute")
        est_ratio = 4.0 / 3.0 if recompute else EST_RATIO[mode][strategy]
        est_step = t_ref * est_ratio
        if not recompute and slow is not None:
            # Seen slower than predicted: scale by what was seen, and by the budget when
            # that slowdown is large (time growing with the store size).
            factor, seen_budget = slow
            est_step *= factor * (max(1.0, budget / seen_budget) if factor > 2 else 1.0)
        if est_step > args.max_step_s:
            result["skipped"].append({"method": name, "reason": (
                f"a step would take ~{est_step:.0f} s (estimated from the steps seen), "
                f"over --max-step-s {args.max_step_s:g}")})
            log(f"  skip {name}: {result['skipped'][-1]['reason']}")
            continue
        est_trace = (TRACE_PER_SEGMENT[mode] * recompute_segments(num_steps) + trace_s
                     if recompute else trace_s)
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

    # Alternated rounds (rotated order, the forward-only step of bptt among them),
    # memory measured on every step.
    rotation = methods[:1] + [fwd] + methods[1:]
    for r in range(rounds):
        k = r % len(rotation)
        order = rotation[k:] + rotation[:k]
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
    fwd_time = statistics.median(fwd.times)
    beta = (bptt_time - fwd_time) / fwd_time
    result["bptt_forward"] = {
        "warmup_s": fwd.warmup_s, "times_s": fwd.times, "peaks_bytes": fwd.peaks,
        "median_time_s": fwd_time, "activation_bytes": int(statistics.median(fwd.peaks))}
    result["beta_measured"] = beta
    if beta < 0:
        log(f"  measured beta {beta:.3f} < 0 (noise): predictions use beta = 0")
    log(f"  beta (backward step / forward step) measured: {beta:.3f}")
    a = known_alpha or ALPHA_FALLBACK
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
        entry["predicted_time_ratio"] = predicted_time_ratio(m)               # beta = 2
        entry["predicted_time_ratio_measured_beta"] = predicted_time_ratio(m, beta)
        entry["time_vs_predicted_measured_beta"] = (
            entry["time_ratio"] / entry["predicted_time_ratio_measured_beta"])
        entry["stored_states_vs_bptt"] = None
        if isinstance(m.layer, MemoryEfficientRNN):
            plan = m.layer.last_plan
            entry.update(
                plan=plan.describe(), plan_memory_slots=plan.memory_slots,
                plan_peak_slots=plan.peak_memory, plan_alpha=plan.alpha,
                step_alpha=m.layer.step_alpha, forward_evals=plan.forward_evals,
                forward_evals_per_step=plan.forward_evals_per_step,
                predicted_state_bytes=int(round(plan.peak_memory * hb)),
                predicted_memory_fraction=plan.memory_fraction)
            # The plan's stored states against the activation memory BPTT measured.
            entry["stored_states_vs_bptt"] = entry["predicted_state_bytes"] / bptt_mem
        elif m.name.startswith("recompute"):
            segs = recompute_segments(num_steps)
            seg_len = math.ceil(num_steps / segs)
            entry.update(segments=segs, predicted_state_bytes=int(round(
                (segs + a * seg_len) * hb)))
        else:
            entry.update(predicted_state_bytes=int(round(a * num_steps * hb)))
        result["methods"].append(entry)
    ov = overheads(args, a)
    result["overheads_estimate_bytes"] = ov
    result["alpha"] = a
    result["hidden_state_bytes"] = hb
    for e in result["methods"]:
        e["predicted_total_bytes"] = e["predicted_state_bytes"] + sum(ov.values())
        e["measured_vs_predicted_total"] = e["activation_bytes"] / e["predicted_total_bytes"]
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
    commit = code_commit() or ""
    ram = available_ram_bytes()
    return {"cpu": cpu, "cores": cores, "tensorflow": tf.__version__,
            "keras": keras.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "commit": commit,
            "ram_available_gib": round(ram / 2**30, 1) if ram else None,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def mib(b):
    return f"{b / 2**20:.1f}" if abs(b) >= 10 * 2**20 else f"{b / 2**20:.2f}"


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
        f"timed steps; {a.get('reserve_mib', 0)} MiB allocated and freed before any "
        "measurement, so that requests are split from a large free chunk rather than "
        "rounded up to a whole one). Time: median over alternated rounds after one warm-up step per "
        "method. Ratios are to standard BPTT measured in the same run. Predicted states = "
        "plan peak (hidden-state slots) x hidden-state bytes; *stored states vs BPTT* = "
        "those bytes / the activation memory BPTT measured; predicted total = predicted "
        "states + the estimated constant overheads listed under each table (weight "
        "gradients, one step's working set). Predicted time = `plan.time_ratio(beta)`, "
        "a backward step costing beta forward steps: beta = 2 (the paper's convention) and "
        "beta measured in the same run, (median BPTT step - median forward-only step) / "
        "median forward-only step, the forward-only step (`reduce_sum(layer(x))` of the "
        "BPTT layer without a tape, same mode) timed in the same alternated rounds; the "
        "recompute baseline is predicted at (2 + beta) / (1 + beta).",
        ""]
    for cfg in data["configs"]:
        lines.append(f"## {cfg['mode']}, T = {cfg['T']}")
        lines.append("")
        if cfg.get("skip_reason"):
            lines += [f"Skipped: {cfg['skip_reason']}.", ""]
            continue
        hb = cfg["hidden_state_bytes"]
        fwd = cfg.get("bptt_forward") or {}
        beta = cfg.get("beta_measured")
        lines.append(f"{cfg['rounds']} rounds; standard BPTT step "
                     f"{next(e for e in cfg['methods'] if e['method'] == 'bptt')['median_time_s']:.3f} s"
                     + (f", its forward-only step {fwd['median_time_s']:.3f} s: measured "
                        f"beta {beta:.2f}" if fwd and beta is not None else "")
                     + f"; hidden state {hb / 1024:.3g} KiB, alpha {cfg['alpha']:.3g}.")
        lines.append("")
        lines.append("| method | plan slots (peak / budget) | predicted states MiB | "
                     "stored states vs BPTT | predicted total MiB | measured MiB | "
                     "measured / predicted total | memory vs BPTT | "
                     "measured - predicted states MiB | predicted time (beta=2) | "
                     "predicted time (measured beta) | measured time | step s | "
                     "grad rel err |")
        lines.append("|---" * 14 + "|")
        for e in cfg["methods"]:
            slots = (f"{e['plan_peak_slots']:g} / {e['plan_memory_slots']:g}"
                     if "plan_peak_slots" in e else
                     (f"{e['segments']} segments" if "segments" in e else "-"))
            stored = (f"{100 * e['stored_states_vs_bptt']:.1f}%"
                      if e.get("stored_states_vs_bptt") is not None else "-")
            pred_mb = (f"{e['predicted_time_ratio_measured_beta']:.3f}x"
                       if e.get("predicted_time_ratio_measured_beta") is not None else "-")
            lines.append(
                f"| {e['method']} | {slots} | {mib(e['predicted_state_bytes'])} | "
                f"{stored} | {mib(e['predicted_total_bytes'])} | "
                f"{mib(e['activation_bytes'])} | "
                f"{e['activation_bytes'] / e['predicted_total_bytes']:.3f} | "
                f"{100 * e['memory_ratio']:.1f}% | "
                f"{mib(e['measured_minus_predicted_states_bytes'])} | "
                f"{e['predicted_time_ratio']:.3f}x | {pred_mb} | {e['time_ratio']:.3f}x | "
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
    p.add_argument("--reserve-mib", type=int, default=2048,
                   help="allocate and free a block of this size first (default 2048; 0: "
                        "off). "
                        "The BFC allocator hands out a whole free chunk when it is less than "
                        "twice a request, and grows in power-of-two regions, so a measured "
                        "peak can include that rounding; with a large free chunk reserved "
                        "up front, requests are split from it and the peak is close to the "
                        "bytes requested")
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


def run_order(args):
    """The configurations in running order, and the set of priority ones.

    The usual order is by length, then mode. The long configurations (``T >= LONG_T``) of
    the first mode (graph when it runs) are the priority: they run right after the first
    configuration (short, it calibrates the per-step rates), before the other modes' and
    the shorter ones, which then share what time is left."""
    natural = [(mode, t) for t in args.lengths for mode in args.modes]
    first_mode = "graph" if "graph" in args.modes else args.modes[0]
    priority = [c for c in natural if c[0] == first_mode and c[1] >= LONG_T]
    if not priority or natural[0] in priority:
        return natural, set(priority)
    rest = [c for c in natural[1:] if c not in priority]
    return [natural[0]] + priority + rest, set(priority)


def reserve_for_later(args, later, priority, current_is_priority, rate_of, clock,
                      known_alpha, bytes_per_step, own_need=0.0):
    """Seconds to keep for the later configurations while running the current one:

    * a later priority configuration: its core methods, always (x 1.1);
    * another one, in order: its core methods (only bptt and its forward-only step while
      a priority configuration runs) when the current configuration keeps `own_need`
      (its own core methods), else nothing.

    Configurations predicted to be skipped for RAM get nothing. Returns (reserve, hard)."""
    reserve = hard = 0.0
    for later_mode, later_t in later:
        rate = rate_of(later_mode)
        if rate is None or ram_skip_reason(args, later_mode, later_t, known_alpha,
                                           bytes_per_step.get(later_mode)):
            continue
        if (later_mode, later_t) in priority:
            need = 1.1 * config_need_s(args, later_mode, later_t, rate)
            hard += need
            reserve += need
            continue
        need = config_need_s(args, later_mode, later_t, rate, core=not current_is_priority)
        if reserve + need <= clock.left() - own_need:
            reserve += need
    return reserve, hard


def main(argv=None):
    args = parse_args(argv)
    reserve_allocator(args.reserve_mib)
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.time_budget)
    data = {"command": "python benchmarks/bench_bptt.py " + " ".join(sys.argv[1:]),
            "machine": machine(), "configs": [],
            "args": {k: v for k, v in vars(args).items()}}
    log(f"machine: {data['machine']}")
    configs, priority = run_order(args)
    natural = [(mode, t) for t in args.lengths for mode in args.modes]
    data["run_order"] = [f"{mode} T={t}" for mode, t in configs]
    known_alpha = None
    bptt_per_step = {}          # mode -> seconds per timestep (from the measured bptt)
    bytes_per_step = {}         # mode -> BPTT activation bytes per timestep (measured)

    def rate_of(mode):
        return bptt_per_step.get(mode) or (max(bptt_per_step.values())
                                           if bptt_per_step else None)

    def save():
        data["configs"].sort(key=lambda c: natural.index((c["mode"], c["T"])))
        (out / "bptt.json").write_text(json.dumps(data, indent=1))

    for i, (mode, num_steps) in enumerate(configs):
        rounds = args.long_rounds if num_steps >= LONG_T else args.rounds
        is_priority = (mode, num_steps) in priority
        rate = rate_of(mode)
        own = (config_need_s(args, mode, num_steps, rate, core=not is_priority)
               if rate is not None else 0.0)
        reserve, hard = reserve_for_later(args, configs[i + 1:], priority, is_priority,
                                          rate_of, clock, known_alpha, bytes_per_step, own)
        skip = ram_skip_reason(args, mode, num_steps, known_alpha,
                               bytes_per_step.get(mode))
        if skip:
            pass
        elif clock.left() <= 0:
            skip = "time budget exhausted"
        elif rate is not None:
            # Run when bptt, its forward-only step and msm 5% fit (a priority
            # configuration: bptt and its forward-only step) besides the time kept for
            # later priority configurations; the methods are then chosen by their own
            # estimates.
            est = config_need_s(args, mode, num_steps, rate, core=not is_priority,
                                recompute=False)
            if est > clock.left() - hard:
                what = ("bptt and its forward-only step" if is_priority else
                        "bptt, its forward-only step and msm 5%")
                skip = (f"time budget: {what} need ~{est:.0f} s (estimated from the "
                        f"measured BPTT step), {clock.left():.0f} s left"
                        + (f", {hard:.0f} s of them kept for the long configurations"
                           if hard else ""))
        if skip:
            data["configs"].append({"mode": mode, "T": num_steps, "rounds": rounds,
                                    "methods": [], "skipped": [], "skip_reason": skip})
            log(f"skip {mode} T={num_steps}: {skip}")
            save()
            continue
        if rate is None:
            # No rate yet (first configuration): the reserve is computed from this one's
            # BPTT step, once it is measured.
            def reserve(measured_rate, i=i, mode=mode, num_steps=num_steps,
                        is_priority=is_priority):
                def rate_now(m):
                    return rate_of(m) or measured_rate
                own_need = config_need_s(args, mode, num_steps, measured_rate,
                                         core=not is_priority)
                return reserve_for_later(args, configs[i + 1:], priority, is_priority,
                                         rate_now, clock, known_alpha, bytes_per_step,
                                         own_need)[0]
            log(f"{mode} T={num_steps}: {clock.left():.0f} s left")
        else:
            log(f"{mode} T={num_steps}: {clock.left():.0f} s left, {reserve:.0f} s kept "
                "for later configurations")
        cfg = run_config(args, mode, num_steps, rounds, clock, reserve, known_alpha,
                         bytes_per_step.get(mode))
        cfg["run_index"] = i
        data["configs"].append(cfg)
        if cfg.get("alpha"):
            known_alpha = cfg["alpha"]
        if cfg.get("bptt_step_estimate_s"):
            bptt_per_step[mode] = cfg["bptt_step_estimate_s"] / num_steps
        if cfg.get("bptt_bytes_estimate"):
            bytes_per_step[mode] = max(bytes_per_step.get(mode, 0),
                                       cfg["bptt_bytes_estimate"] / num_steps)
        if cfg.get("skip_reason"):
            log(f"skip {mode} T={num_steps}: {cfg['skip_reason']}")
        save()                  # checkpoint after every configuration
    data["total_s"] = time.perf_counter() - clock.start
    save()
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
