"""`MemoryEfficientRNN` under `tf.distribute`: `model.fit` with `MirroredStrategy` over two
logical CPU devices equals single-device training, and `MultiWorkerMirroredStrategy` with
two worker processes on 127.0.0.1 (examples/multi_worker.py) ends with the same weights on
every worker.

Both run in subprocesses: logical devices must be configured before TensorFlow initializes
its devices, and the multi-worker strategy needs one process per worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MIRRORED_CHILD = textwrap.dedent(r"""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from tf_membptt import MemoryEfficientRNN

    T, F, UNITS, GLOBAL_BATCH, STEPS = 16, 3, 6, 8, 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, T, F)).astype("float32")
    y = (x[:, 0, :1] * x[:, -1, 1:2]).astype("float32")

    def build(standard=False):
        keras.utils.set_random_seed(0)
        cell = keras.layers.LSTMCell(UNITS)
        rnn = (keras.layers.RNN(cell) if standard
               else MemoryEfficientRNN(cell, memory_budget=0.25, name="rnn"))
        model = keras.Sequential([keras.Input((T, F)), rnn, keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.1), "mse")
        return model

    def train(model):
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        return model.get_weights()

    single = build()
    initial = single.get_weights()
    single_weights = train(single)
    standard_weights = train(build(standard=True))

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = build()
    mirrored.set_weights(initial)
    mirrored_weights = train(mirrored)

    def diff(a, b):
        return float(max(np.max(np.abs(u - v)) for u, v in zip(a, b)))

    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "plan": mirrored.get_layer("rnn").last_plan is not None,
        "moved": diff(single_weights, initial),
        "mirrored_vs_single": diff(mirrored_weights, single_weights),
        "single_vs_standard_bptt": diff(single_weights, standard_weights),
    }))
""")


def _run(command, timeout):
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            cwd=ROOT)
    assert result.returncode == 0, (
        f"exit status {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
        f"stderr:\n{result.stderr[-3000:]}")
    return result.stdout


def test_mirrored_strategy_fit_matches_single_device():
    out = _run([sys.executable, "-c", MIRRORED_CHILD, ROOT], timeout=300)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert report["plan"]  # the planned gradient ran on the replicas
    assert report["moved"] > 1e-3  # the four steps did train
    assert report["mirrored_vs_single"] < 1e-5, report
    assert report["single_vs_standard_bptt"] < 1e-5, report


def test_multi_worker_mirrored_strategy_workers_agree(tmp_path):
    out = _run([sys.executable, os.path.join(ROOT, "examples", "multi_worker.py"),
                "--num-steps", "20", "--units", "4", "--steps", "3",
                "--global-batch-size", "8", "--budget", "0.1",
                "--output-dir", str(tmp_path), "--timeout", "240"], timeout=300)
    assert "OK: the workers agree on the weights." in out, out
    summaries = [json.loads(line.split(": ", 1)[1]) for line in out.splitlines()
                 if line.startswith("worker ")]
    assert len(summaries) == 2
    for summary in summaries:
        assert summary["replicas"] == 2
        assert summary["plan"] and summary["plan"].startswith("Plan: msm")
        assert summary["weight_change"] > 1e-4
    # All-reduced loss: every worker saw the same global loss at every step.
    assert summaries[0]["losses"] == summaries[1]["losses"]
