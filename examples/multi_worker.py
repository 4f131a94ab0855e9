"""Multi-worker training of a `MemoryEfficientRNN` model with
`tf.distribute.MultiWorkerMirroredStrategy`, two worker processes on this machine.

    python examples/multi_worker.py [--workers 2] [--num-steps 100] [--units 16]
        [--steps 5] [--global-batch-size 16] [--output-dir DIR]

Without ``--worker-index`` the script is the launcher: it finds free ports on 127.0.0.1,
starts one process per worker with its ``TF_CONFIG``
(``{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": i}}``), waits for them,
and checks that every worker ends with the same weights (synchronous data-parallel training
all-reduces the gradients, so the replicas must agree) and that training changed them. It
exits non-zero otherwise. Each worker trains the model on its shard of every global batch
(a custom training loop with ``strategy.run``: Keras 3.15's ``model.fit`` fails under this
strategy for any model) and writes its final weights to ``DIR/worker_<i>.npz``.

On a real cluster, run the worker part (``--worker-index i``) on every machine with
``TF_CONFIG`` set to the cluster's addresses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def free_ports(count):
    """Ports that were free a moment ago (bound to port 0, then released)."""
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--num-steps", "-T", type=int, default=100, help="sequence length")
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--budget", default="0.05")
    parser.add_argument("--steps", type=int, default=5, help="training steps")
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds the launcher waits for the workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker-index", type=int, default=None,
                        help="(internal) run as this worker; TF_CONFIG must be set")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------
def worker(args):
    import numpy as np
    import tensorflow as tf
    import keras

    try:
        from tf_membptt import MemoryEfficientRNN
    except ImportError:  # run from a checkout without installing
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tf_membptt import MemoryEfficientRNN

    # The strategy must exist before any other TensorFlow op runs.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    from tf_membptt.budget import budget_argument

    budget = budget_argument(args.budget)  # '0.05', '5%', '64MiB', 'slots:N', 'none'

    keras.utils.set_random_seed(args.seed)  # the same initial weights on every worker
    features = 3
    rng = np.random.default_rng(args.seed)  # the same global data on every worker
    n = args.global_batch_size * args.steps
    x = rng.normal(size=(n, args.num_steps, features)).astype("float32")
    y = (x[:, 0, :1] * x[:, -1, 1:2]).astype("float32")  # needs the first and last steps
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(
        args.global_batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = \
        tf.data.experimental.AutoShardPolicy.DATA  # each worker takes its part of a batch
    dataset = dataset.with_options(options)

    with strategy.scope():
        layer = MemoryEfficientRNN(keras.layers.LSTMCell(args.units), memory_budget=budget,
                                   name="rnn")
        model = keras.Sequential([keras.Input((args.num_steps, features)), layer,
                                  keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.05)
        optimizer.build(model.trainable_variables)
    initial = [w.copy() for w in model.get_weights()]

    # A custom training loop: Keras 3.15's `model.fit` does not run under
    # MultiWorkerMirroredStrategy for any model (it reduces the first (x, y) batch with
    # strategy.reduce, which the collective strategy rejects for a tuple; working around
    # that, the reduction of the logs fails next). MirroredStrategy + model.fit works (see
    # tests/test_distributed.py).
    @tf.function
    def train_step(iterator):
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(x, training=True) - y)) / \
                    args.global_batch_size  # mean over the global batch
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        losses = strategy.run(step, args=next(iterator))
        return strategy.reduce("SUM", losses, axis=None)

    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    losses = [float(train_step(iterator)) for _ in range(args.steps)]
    weights = model.get_weights()
    np.savez(os.path.join(args.output_dir, f"worker_{task['index']}.npz"),
             *weights, initial_0=initial[0])
    summary = {
        "worker": task["index"],
        "replicas": strategy.num_replicas_in_sync,
        "losses": [round(v, 6) for v in losses],
        "plan": None if layer.last_plan is None else layer.last_plan.describe().splitlines()[0],
        "weight_change": float(max(np.max(np.abs(a - b)) for a, b in zip(weights, initial))),
    }
    print(json.dumps(summary), flush=True)
    return 0


# ----------------------------------------------------------------------------------------
def launcher(args):
    import numpy as np

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="tf_membptt_multi_worker_")
    os.makedirs(output_dir, exist_ok=True)
    ports = free_ports(args.workers)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    print(f"Cluster: {cluster['worker']}; output in {output_dir}", flush=True)
    processes = []
    started = time.perf_counter()
    for index in range(args.workers):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps({"cluster": cluster,
                                       "task": {"type": "worker", "index": index}})
        command = [sys.executable, os.path.abspath(__file__), "--worker-index", str(index),
                   "--num-steps", str(args.num_steps), "--units", str(args.units),
                   "--budget", str(args.budget), "--steps", str(args.steps),
                   "--global-batch-size", str(args.global_batch_size),
                   "--output-dir", output_dir, "--seed", str(args.seed)]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs, failed = [], False
    deadline = time.monotonic() + args.timeout
    for index, process in enumerate(processes):
        try:
            out, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in processes:  # a worker alone waits forever in its collectives
                p.kill()
            out, _ = process.communicate()
            print(f"worker {index} timed out after {args.timeout:.0f} s")
            failed = True
        outputs.append(out)
        if process.returncode != 0:
            failed = True
    summaries = []
    for index, out in enumerate(outputs):
        lines = [line for line in out.splitlines() if line.startswith("{\"worker\"")]
        if lines:
            summaries.append(json.loads(lines[-1]))
            print(f"worker {index}: {lines[-1]}")
        else:
            failed = True
            # (Tensor values in error messages are left out.)
            text = [line for line in out.splitlines()
                    if not re.fullmatch(r"[\s\[\]\-+0-9.,e]*", line)]
            print(f"worker {index} failed (exit status {processes[index].returncode}); its "
                  f"output ends with:\n" + "\n".join(text[-40:]))
    if failed:
        return 1
    weights = []
    for index in range(args.workers):
        with np.load(os.path.join(output_dir, f"worker_{index}.npz")) as data:
            weights.append([data[k] for k in sorted(
                (k for k in data.files if k.startswith("arr_")), key=lambda k: int(k[4:]))])
    disagreement = max(float(np.max(np.abs(a - b)))
                       for other in weights[1:] for a, b in zip(weights[0], other))
    change = min(s["weight_change"] for s in summaries)
    replicas = {s["replicas"] for s in summaries}
    print(f"{args.workers} workers, {replicas} replicas in sync, {args.steps} steps in "
          f"{time.perf_counter() - started:.0f} s: largest weight difference between workers "
          f"{disagreement:.2e}; weights moved by up to {change:.2e}.")
    if replicas != {args.workers}:
        print(f"FAILED: expected {args.workers} replicas in sync, got {replicas}")
        return 1
    if not disagreement <= 1e-6:
        print("FAILED: the workers' weights differ")
        return 1
    if not change > 1e-4:
        print("FAILED: training did not change the weights")
        return 1
    print("OK: the workers agree on the weights.")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.worker_index is not None:
        return worker(args)
    return launcher(args)


if __name__ == "__main__":
    sys.exit(main())
