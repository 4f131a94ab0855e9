"""What the benchmark scripts share. A script sets the environment variables that must
come before TensorFlow (``TF_CPU_ALLOCATOR_USE_BFC`` for CPU memory statistics), then
imports this module:

* `REPO_ROOT`, put first on ``sys.path``, so that a script always measures the checkout
  it belongs to (an installed copy of the package elsewhere would be measured otherwise);
* `log`: a timestamped line, flushed at once (runs last minutes);
* `timed_run`: one synchronous call's wall time and activation memory;
* `reserve_allocator`: a large block allocated and freed, so that later requests are split
  from a large free chunk instead of being rounded up to a whole one;
* `code_commit`: the commit of the package measured.
"""

from __future__ import annotations

import datetime
import pathlib
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
