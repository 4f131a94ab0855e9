"""What the benchmark scripts share. A script sets the environment variables that must
come before TensorFlow (``TF_CPU_ALLOCATOR_USE_BFC`` for CPU memory statistics), then
imports this module:

* `REPO_ROOT`, put first on ``sys.path``, so that a script always measures the checkout
  it belongs to (an installed copy of the package elsewhere would be measured otherwise);
* `log`: a timestamped line, flushed at once (runs last minutes);
* `timed_run`: one synchronous call's wall time and activation memory;
* `reserve_allocator`: a large block allocated and freed, so that later requests are split
  from a large free chunk instead of being rounded up to a whole one;
* `code_commit`: the commit of the package measured;
* `time_variants` and `write_per_step_tables`: alternated rounds of a few hand-written
  loops, and their JSON and markdown table (bench_loop_nesting, bench_xla_store_write).
"""

from __future__ import annotations

import datetime
import json
import pathlib
import statistics
import subprocess
import sys
import time

import tensorflow as tf

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
tf.get_logger().setLevel("ERROR")

MiB = 2 ** 20


def log(message):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def timed_run(fn, device="CPU:0"):
    """Runs ``fn()`` and waits for every tensor it returns: ``(seconds, activation bytes,
    result)``. Activation bytes are the allocator's peak during the call minus the bytes
    in use just before it."""
    before = tf.config.experimental.get_memory_info(device)["current"]
    tf.config.experimental.reset_memory_stats(device)
    t0 = time.perf_counter()
    value = fn()
    for tensor in tf.nest.flatten(value):
        if hasattr(tensor, "numpy"):
            tensor.numpy()
    seconds = time.perf_counter() - t0
    peak = tf.config.experimental.get_memory_info(device)["peak"] - before
    return seconds, int(peak), value


def reserve_allocator(mib):
    """Allocates and frees `mib` MiB (nothing when `mib` is 0)."""
    if mib > 0:  # the block is freed as soon as it is dropped
        tf.raw_ops.Empty(shape=[mib * 2 ** 18], dtype=tf.float32, init=False)


def code_commit():
    """The checkout's short commit, with ``+changes`` when `tf_membptt` differs from it;
    None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "tf_membptt")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if changed else "")


def time_variants(units, loops, xs, rounds, num_steps, calls=1):
    """Alternated rounds of `loops` (each round runs every variant `calls` times, in a
    rotated order), logged: ``{"units", "us_per_step": medians, "samples"}``, in
    microseconds per step, keyed by variant."""
    names = list(loops)
    samples = {v: [] for v in names}
    for r in range(rounds):
        for v in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(calls):
                t0 = time.perf_counter()
                loops[v](xs).numpy()
                samples[v].append((time.perf_counter() - t0) / num_steps * 1e6)
    medians = {v: statistics.median(t) for v, t in samples.items()}
    log(f"units {units}: " + ", ".join(f"{v} {m:.1f} us" for v, m in medians.items()))
    return {"units": units, "us_per_step": medians, "samples": samples}


def write_per_step_tables(out_dir, stem, title, description, machine, args, results,
                          variants, baseline):
    """``<stem>.json`` and ``<stem>.md``: one row per entry of `results` (``units``,
    ``us_per_step``), each variant's time and its ratio to `baseline`'s."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
               "results": results}
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    lines = [f"# {title}", "",
             f"Run {machine['date']} on {machine['cpus']} CPUs ({machine['processor']}), "
             f"TensorFlow {machine['tensorflow']}. {description}", "",
             "| units | " + " | ".join(variants) + " |",
             "|---:|" + "---:|" * len(variants)]
    for r in results:
        base = r["us_per_step"][baseline]
        lines.append(f"| {r['units']} | " + " | ".join(
            f"{r['us_per_step'][v]:.1f} ({r['us_per_step'][v] / base:.2f}x)"
            for v in variants) + " |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
