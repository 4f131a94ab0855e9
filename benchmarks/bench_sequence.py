"""Memory and time of models with sequence outputs: the layer alone, and a character-level
language model fused and unfused.

    python benchmarks/bench_sequence.py            # T = 1000 and 10,000 (~3 min, 2 cores)
    python benchmarks/bench_sequence.py --quick    # T = 300 only: a smoke run

Part 1, the layer alone: ``MemoryEfficientRNN(LSTMCell(128), 0.05, return_sequences=True)``,
batch 16, 32 features, loss = the sum of the squared outputs (so the output sequence is
kept for the backward and its gradient built, as a head on it would); one training step's
activation memory against the prediction: the plan's stored states + the output sequence
(one copy) + its gradient (one copy) + the weights' gradients (the running sum and one
step's) + one step's working set.

Part 2, the char-LM of `examples/char_language_model.py` (Embedding(V, 32), LSTMCell(128),
Dense(V), sparse cross-entropy from logits, batch 16, the standard library's source), one
training step (forward, backward, Adam update) in three builds from the same weights:

* ``standard``: `keras.layers.RNN(cell, return_sequences=True)` -> `Dense` -> the loss;
* ``unfused``: the same with `MemoryEfficientRNN(cell, 0.05, return_sequences=True)`;
* ``fused``: `MemoryEfficientRNN(cell, 0.05, head=Dense, loss=...)` called with targets.

Their losses over the first `--trajectory-steps` training steps (SGD on the same batches)
must agree: the unfused build's bit for bit (the same ops in the same order), the fused
build's within `LOSS_RTOL` (it sums the per-step losses and the head's gradients over time
in another order). Memory and time are medians of `--rounds` steps. At T = 10,000 the
standard build is measured unless its predicted memory exceeds `--standard-limit-gib`.

Activation memory = the CPU BFC allocator's peak during the step minus the bytes in use just
before it (`TF_CPU_ALLOCATOR_USE_BFC=true` before TensorFlow is imported; a 2 GiB block
allocated and freed first). Writes ``<out-dir>/sequence.{json,md}`` (``sequence_batch<N>``
for another `--batch`).
"""

from __future__ import annotations

import os

os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"  # before TensorFlow is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from _bench import MiB, REPO_ROOT, log, reserve_allocator, timed_run  # noqa: E402
from tf_membptt import MemoryEfficientRNN  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "char_language_model", REPO_ROOT / "examples" / "char_language_model.py")
charlm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(charlm)

UNITS, EMBED, BATCH, FEATURES = 128, 32, 16, 32
def medians(fn, rounds):
    fn()  # warm-up: trace, optimizer slots
    times, peaks, _ = zip(*(timed_run(fn) for _ in range(rounds)))
    return statistics.median(times), int(statistics.median(peaks))


# --------------------------------------------------------------------------------------
# Part 1: the layer alone
# --------------------------------------------------------------------------------------
def layer_alone(num_steps, budget, rounds):
    keras.utils.set_random_seed(0)
    cell = keras.layers.LSTMCell(UNITS)
    layer = MemoryEfficientRNN(cell, budget, return_sequences=True)
    x = tf.constant(np.random.default_rng(0).standard_normal(
        (BATCH, num_steps, FEATURES)).astype(np.float32))
    layer(x[:, :2])

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            # The loss keeps the output sequence for the backward and builds its gradient,
            # as a head on the sequence would.
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, cell.trainable_variables)

    seconds, peak = medians(lambda: step(x), rounds)
    plan = layer.last_plan
    program = next(iter(layer._programs.values()))
    hidden_bytes = program.hidden_bytes(BATCH)
    sequence = BATCH * num_steps * UNITS * 4
    params = sum(int(np.prod(v.shape)) * 4 for v in cell.trainable_variables)
    parts = {"stored states": plan.peak_memory * hidden_bytes,
             "output sequence": sequence, "its gradient": sequence,
             "weights' gradients (sum + one step)": 2 * params,
             "working set (two internal states)": 2 * program.internal_bytes(BATCH)}
    predicted = sum(parts.values())
    log(f"layer alone T={num_steps}: {peak / MiB:.2f} MiB measured, {predicted / MiB:.2f} MiB "
        f"predicted ({100 * (peak / predicted - 1):+.1f}%)")
    return {"T": num_steps, "budget": budget, "activation_bytes": peak, "time_s": seconds,
            "predicted_bytes": predicted, "parts": parts,
            "forward_evals": plan.forward_evals}


# --------------------------------------------------------------------------------------
# Part 2: the char-LM
# --------------------------------------------------------------------------------------
def build(kind, vocab_size, num_steps, budget):
    keras.utils.set_random_seed(0)
    if kind == "fused":
        return charlm.build_fused(vocab_size, num_steps, UNITS, budget)[0]
    if kind == "standard":
        return charlm.build_standard(vocab_size, num_steps, UNITS)
    tokens = keras.Input((num_steps,), dtype="int32")
    hidden = keras.layers.Embedding(vocab_size, EMBED, name="embedding")(tokens)
    hidden = MemoryEfficientRNN(keras.layers.LSTMCell(UNITS), budget, return_sequences=True,
                                name="lm")(hidden)
    return keras.Model(tokens, keras.layers.Dense(vocab_size, name="head")(hidden))


def train_step_fn(model, kind, optimizer):
    variables = model.trainable_variables
    loss_fn = charlm.loss_fn()

    @tf.function
    def step(tokens, targets):
        with tf.GradientTape() as tape:
            if kind == "fused":
                model([tokens, targets], training=True)
                loss = tf.add_n(model.losses)
            else:
                loss = loss_fn(targets, model(tokens, training=True))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    return step


def char_lm(num_steps, budget, rounds, trajectory_steps, standard_limit_gib, data):
    train_ids, vocab_size = data
    rng = np.random.default_rng(0)
    batches = [charlm.windows(train_ids, num_steps, BATCH, rng)
               for _ in range(max(trajectory_steps, 1))]
    initial = build("fused", vocab_size, num_steps, budget).get_weights()
    entry = {"T": num_steps, "budget": budget, "vocabulary": vocab_size, "builds": {}}
    predicted_standard = BATCH * num_steps * 4 * (10 * UNITS + 4 * vocab_size + 2 * EMBED)
    for kind in ("standard", "unfused", "fused"):
        if kind == "standard" and predicted_standard / 2 ** 30 > standard_limit_gib:
            entry["builds"][kind] = {"skipped": f"predicted ~{predicted_standard / 2**30:.1f} "
                                                f"GiB > {standard_limit_gib:g} GiB"}
            log(f"char-LM T={num_steps} {kind}: skipped")
            continue
        model = build(kind, vocab_size, num_steps, budget)
        model.set_weights(initial)
        # The loss trajectory: SGD steps on the same batches.
        sgd = train_step_fn(model, kind, keras.optimizers.SGD(0.5))
        losses = [float(sgd(tf.constant(t), tf.constant(y))) for t, y in
                  batches[:trajectory_steps]]
        model.set_weights(initial)
        adam = train_step_fn(model, kind, keras.optimizers.Adam(1e-3))
        tokens, targets = (tf.constant(a) for a in batches[0])
        seconds, peak = medians(lambda: adam(tokens, targets), rounds)
        result = {"activation_bytes": peak, "time_s": seconds, "losses": losses}
        if kind != "standard":
            layer = model.get_layer("lm")
            result.update(forward_evals=layer.last_plan.forward_evals,
                          alpha=layer.step_alpha)
        entry["builds"][kind] = result
        log(f"char-LM T={num_steps} {kind:8s}: {peak / MiB:8.1f} MiB, {seconds:.2f} s, "
            f"losses {['%.6f' % l for l in losses]}")
        del model
    standard = entry["builds"]["standard"]
    for kind in ("unfused", "fused"):
        build_ = entry["builds"][kind]
        if "activation_bytes" in standard:
            build_["memory_ratio"] = build_["activation_bytes"] / standard["activation_bytes"]
            build_["time_ratio"] = build_["time_s"] / standard["time_s"]
            build_["loss_rel_diff"] = loss_rel_diff(build_["losses"], standard["losses"])
            build_["same_losses"] = build_["loss_rel_diff"] <= LOSS_RTOL
    return entry


# Float32 sums over T x batch per-step terms (the loss, the head's weight gradients) taken
# in another order than the standard model's batched ops differ by rounding: about 1e-5
# relative after two SGD steps at T = 10,000. Bit-identical is asked of nothing but the
# unfused build (the same ops in the same order); beyond LOSS_RTOL the build is reported
# as differing and the run fails.
LOSS_RTOL = 5e-5


def loss_rel_diff(losses, reference):
    return max(abs(float(a) - float(b)) / abs(float(b)) for a, b in zip(losses, reference))


def machine():
    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "cpus": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write(payload, out_dir, quick):
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "sequence" if BATCH == 16 else f"sequence_batch{BATCH}"
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    m = payload["machine"]
    lines = ["# Sequence outputs and language models", "",
             f"Run {m['date']} on {m['cpus']} CPUs, TensorFlow {m['tensorflow']}, Keras "
             f"{m['keras']}. `python benchmarks/bench_sequence.py{' --quick' if quick else ''}"
             f"{'' if BATCH == 16 else f' --batch {BATCH}'}`."
             f" Budget 5%, batch {BATCH}, LSTMCell({UNITS}).", "",
             "## The layer alone, `return_sequences=True`", "",
             "| T | measured | predicted | of which stored states | output + gradient | "
             "difference |", "|---:|---:|---:|---:|---:|---:|"]
    for e in payload["layer_alone"]:
        parts = e["parts"]
        lines.append(
            f"| {e['T']:,} | {e['activation_bytes'] / MiB:.2f} MiB | "
            f"{e['predicted_bytes'] / MiB:.2f} MiB | {parts['stored states'] / MiB:.2f} MiB | "
            f"{(parts['output sequence'] + parts['its gradient']) / MiB:.2f} MiB | "
            f"{100 * (e['activation_bytes'] / e['predicted_bytes'] - 1):+.1f}% |")
    lines += ["", "## Character-level language model, one training step", "",
              "| T | build | memory | vs standard | time | vs standard | losses vs standard "
              "(largest relative difference) |",
              "|---:|---|---:|---:|---:|---:|---|"]
    for e in payload["char_lm"]:
        for kind in ("standard", "unfused", "fused"):
            b = e["builds"][kind]
            if "skipped" in b:
                lines.append(f"| {e['T']:,} | {kind} | not measured: {b['skipped']} | | | | |")
                continue
            ratio = (f"{100 * b['memory_ratio']:.1f}%" if "memory_ratio" in b else
                     ("-" if kind == "standard" else "n/a"))
            tratio = f"{b['time_ratio']:.2f}x" if "time_ratio" in b else "-"
            if "loss_rel_diff" not in b:
                same = "-"
            elif b["loss_rel_diff"] == 0:
                same = "identical"
            else:
                same = (f"{b['loss_rel_diff']:.1e}"
                        + ("" if b["same_losses"] else f" (above {LOSS_RTOL:g}: DIFFERENT)"))
            lines.append(f"| {e['T']:,} | {kind} | {b['activation_bytes'] / MiB:.1f} MiB | "
                         f"{ratio} | {b['time_s']:.2f} s | {tratio} | {same} |")
    lines += ["", "Losses: the first training steps' losses (SGD on the same batches). The "
              "unfused build runs the same ops in the same order as the standard one; the fused "
              "build sums the per-step losses and the head's weight gradients over time, in "
              f"another order, so float32 rounding differs (allowed: {LOSS_RTOL:g} relative)."]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1000,10000")
    parser.add_argument("--batch", type=int, default=BATCH,
                        help=f"batch size (default {BATCH}); results of another batch size go "
                             "to sequence_batch<N>.{json,md}")
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trajectory-steps", type=int, default=3)
    parser.add_argument("--standard-limit-gib", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="T = 300 only")
    parser.add_argument("--reserve-mib", type=int, default=2048)
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    BATCH = args.batch
    lengths = [300] if args.quick else [int(t) for t in args.lengths.split(",")]
    reserve_allocator(args.reserve_mib)
    train_text, _ = charlm.read_corpus(2_000_000, 1000)
    vocab = charlm.Vocabulary(train_text)
    data = (vocab.encode(train_text), len(vocab))
    payload = {"machine": machine(), "args": vars(args), "layer_alone": [], "char_lm": []}
    for num_steps in lengths:
        payload["layer_alone"].append(layer_alone(num_steps, args.budget, args.rounds))
        payload["char_lm"].append(char_lm(num_steps, args.budget, args.rounds,
                                          args.trajectory_steps, args.standard_limit_gib,
                                          data))
        write(payload, pathlib.Path(args.out_dir), args.quick)
    bad = [e["T"] for e in payload["char_lm"] for k, b in e["builds"].items()
           if b.get("same_losses") is False]
    if bad:
        print(f"loss trajectories differ from the standard model's at T = {bad}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
