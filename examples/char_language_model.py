"""A character-level language model on Python source, trained at T = 10,000 characters per
sequence in a small fraction of standard BPTT's memory.

The text is the Python standard library's own source code, read from the running
interpreter's installation (no download). Every character is a token; the model is

    Embedding(V, 32) -> MemoryEfficientRNN(LSTMCell(128), head=Dense(V),
                                           loss=SparseCategoricalCrossentropy(from_logits=True))

trained with `model.fit` on ``[tokens, targets]`` (the targets are the next characters):
the per-step head and loss run inside the recurrence, so no ``(batch, T, 128)`` output and
no ``(batch, T, V)`` logits are ever built, and the hidden states are checkpointed within
the budget. What it prints:

1. the plan of one training step;
2. the measured memory of one training step of this model and of the same model built the
   standard way (`keras.layers.RNN(LSTMCell(128), return_sequences=True)`, then
   `Dense(V)`, then the loss over the sequence), with the same weights and the same loss
   (or why the standard model is not measured: more than `--standard-limit-gib` predicted);
3. the held-out bits per character after training, against the unigram baseline (the
   entropy of the character frequencies: what a model that ignores context achieves);
4. a few hundred characters sampled from the model (the inference path: the layer without
   `targets` returns the head's logits, one step at a time with `return_state`).

    python examples/char_language_model.py                 # T = 10,000 (a few minutes)
    python examples/char_language_model.py --num-steps 1000 --train-steps 150   # quicker

Exits with status 1 when the held-out bits per character are not below
``--threshold`` times the unigram baseline (default 0.8).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import sysconfig
import time

# The BFC allocator keeps the statistics that tf.config.experimental.get_memory_info reads
# on CPU; it must be chosen before TensorFlow is imported.
os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

try:
    from tf_membptt import MemoryEfficientRNN  # noqa: E402
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tf_membptt import MemoryEfficientRNN  # noqa: E402
from tf_membptt.budget import budget_argument, format_bytes  # noqa: E402

UNKNOWN = "\x00"  # stands for every character outside the vocabulary


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def read_corpus(max_chars: int, held_out_chars: int):
    """(training text, held-out text) from the standard library's .py files, in a fixed
    order: every 20th file is held out (until `held_out_chars`), the rest is training text
    (until `max_chars`). Tests and the codec tables of `encodings` (generated data, not
    code) are left out."""
    root = sysconfig.get_paths()["stdlib"]
    train, held_out = [], []
    train_chars = held_chars = 0
    paths = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    for index, path in enumerate(paths):
        parts = os.path.relpath(path, root).split(os.sep)
        if "site-packages" in parts or "test" in parts or "tests" in parts or \
                parts[0] == "encodings":
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        if index % 20 == 0 and held_chars < held_out_chars:
            held_out.append(text)
            held_chars += len(text)
        elif train_chars < max_chars:
            train.append(text)
            train_chars += len(text)
        if train_chars >= max_chars and held_chars >= held_out_chars:
            break
    if not train or not held_out:
        raise RuntimeError(f"not enough Python source found under {root}")
    return "".join(train)[:max_chars], "".join(held_out)[:held_out_chars]


class Vocabulary:
    """Characters seen at least `min_count` times in the training text; the rest map to
    one unknown token."""

    def __init__(self, text: str, min_count: int = 20):
        chars, counts = np.unique(np.frombuffer(text.encode("utf-32-le"), np.uint32),
                                  return_counts=True)
        kept = [chr(c) for c, n in zip(chars, counts) if n >= min_count and chr(c) != UNKNOWN]
        self.chars = [UNKNOWN] + kept
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        table = np.zeros(max(codes.max(), max(map(ord, self.chars))) + 1, np.int32)
        for c, i in self.index.items():
            table[ord(c)] = i
        return table[codes]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] if i else "?" for i in ids)


def unigram_bits(train_ids: np.ndarray, held_out_ids: np.ndarray, vocab_size: int) -> float:
    """Held-out bits per character of the training text's character frequencies
    (add-one smoothing)."""
    counts = np.bincount(train_ids, minlength=vocab_size) + 1.0
    p = counts / counts.sum()
    return float(-np.mean(np.log2(p[held_out_ids])))


def windows(ids: np.ndarray, num_steps: int, batch: int, rng) -> tuple:
    """A batch of random windows: tokens and next-character targets, (batch, T) each."""
    starts = rng.integers(0, len(ids) - num_steps - 1, batch)
    tokens = np.stack([ids[s:s + num_steps] for s in starts])
    targets = np.stack([ids[s + 1:s + num_steps + 1] for s in starts])
    return tokens.astype(np.int32), targets.astype(np.int32)


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
def loss_fn():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def build_fused(vocab_size, num_steps, units, budget, seed=0):
    """Embedding -> MemoryEfficientRNN with the head and the loss inside; the model's
    output is the loss per sequence, and the layer adds the mean to the model's losses."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((num_steps,), dtype="int32", name="tokens")
    targets = keras.Input((num_steps,), dtype="int32", name="targets")
    hidden = keras.layers.Embedding(vocab_size, 32, name="embedding")(tokens)
    lm = MemoryEfficientRNN(keras.layers.LSTMCell(units), memory_budget=budget,
                            head=keras.layers.Dense(vocab_size, name="head"),
                            loss=loss_fn(), name="lm")
    return keras.Model([tokens, targets], lm(hidden, targets=targets)), lm


def build_standard(vocab_size, num_steps, units, seed=0):
    """The same model the standard way: the whole output sequence, then the head, then the
    loss over the sequence (same weights, same loss)."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((num_steps,), dtype="int32")
    hidden = keras.layers.Embedding(vocab_size, 32, name="embedding")(tokens)
    hidden = keras.layers.RNN(keras.layers.LSTMCell(units), return_sequences=True,
                              name="lm")(hidden)
    return keras.Model(tokens, keras.layers.Dense(vocab_size, name="head")(hidden))


def step_memory(model, tokens, targets, fused):
    """(activation bytes, seconds) of one training step (forward, backward and optimizer
    update in a tf.function), measured with the CPU BFC allocator; the second call is
    measured (the first traces and creates the optimizer's slots)."""
    optimizer = keras.optimizers.Adam(1e-3)
    variables = model.trainable_variables

    @tf.function
    def train_step(tokens, targets):
        with tf.GradientTape() as tape:
            if fused:
                model([tokens, targets], training=True)
                loss = tf.add_n(model.losses)
            else:
                loss = loss_fn()(targets, model(tokens, training=True))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    first_loss = train_step(tokens, targets).numpy()  # before any update
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    t0 = time.perf_counter()
    train_step(tokens, targets).numpy()
    seconds = time.perf_counter() - t0
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    return peak, seconds, float(first_loss)


def held_out_bits(model, ids, num_steps, batch):
    """Bits per character of the held-out text: the fused model's loss (no gradient: the
    layer stores nothing) over consecutive windows."""
    evaluate = tf.function(lambda tokens, targets: model([tokens, targets], training=False))
    total, count = 0.0, 0
    usable = (len(ids) - 1) // num_steps * num_steps
    starts = np.arange(0, usable, num_steps)
    for k in range(0, len(starts), batch):
        chunk = starts[k:k + batch]
        tokens = np.stack([ids[s:s + num_steps] for s in chunk]).astype(np.int32)
        targets = np.stack([ids[s + 1:s + num_steps + 1] for s in chunk]).astype(np.int32)
        per_sequence = evaluate(tf.constant(tokens), tf.constant(targets))
        total += float(np.sum(per_sequence)) * num_steps
        count += len(chunk) * num_steps
    return total / count / math.log(2.0)


def sample(lm, embedding, vocab: Vocabulary, prompt: str, length: int, temperature: float,
           seed: int) -> str:
    """Characters drawn one at a time: the layer without targets returns the head's logits;
    its states carry over from step to step (`initial_state`, `return_state`)."""
    rng = np.random.default_rng(seed)
    sampler = MemoryEfficientRNN(lm.cell, head=lm.head, return_state=True)

    @tf.function
    def step(token, h, c):
        logits, h, c = sampler(embedding(token), initial_state=[h, c])
        return logits, h, c

    units = lm.cell.units
    h, c = tf.zeros([1, units]), tf.zeros([1, units])
    ids = list(vocab.encode(prompt))
    for i in ids[:-1]:
        _, h, c = step(tf.constant([[i]], tf.int32), h, c)
    out = []
    token = ids[-1]
    for _ in range(length):
        logits, h, c = step(tf.constant([[token]], tf.int32), h, c)
        p = tf.nn.softmax(logits[0] / temperature).numpy().astype(np.float64)
        token = int(rng.choice(len(p), p=p / p.sum()))
        out.append(token)
    return prompt + vocab.decode(out)


# --------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-steps", "-T", type=int, default=10_000,
                        help="characters per training sequence (default 10000)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--budget", default="0.05", help="memory_budget (default 0.05)")
    parser.add_argument("--train-steps", type=int, default=40,
                        help="training steps (batches) (default 40)")
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--corpus-chars", type=int, default=4_000_000,
                        help="training text, characters (default 4,000,000)")
    parser.add_argument("--held-out-chars", type=int, default=200_000)
    parser.add_argument("--standard-limit-gib", type=float, default=6.0,
                        help="skip measuring the standard model when its step is predicted "
                             "to need more (default 6 GiB)")
    parser.add_argument("--sample-chars", type=int, default=300)
    parser.add_argument("--threshold", type=float, default=0.8,
                        help="fail unless held-out bits/char < threshold x unigram's")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    budget = budget_argument(args.budget)  # '0.05', '5%', '64MiB', 'slots:N', 'none'
    train_text, held_out_text = read_corpus(args.corpus_chars, args.held_out_chars)
    vocab = Vocabulary(train_text)
    train_ids, held_out_ids = vocab.encode(train_text), vocab.encode(held_out_text)
    baseline = unigram_bits(train_ids, held_out_ids, len(vocab))
    print(f"Corpus: the standard library's source ({sysconfig.get_paths()['stdlib']}): "
          f"{len(train_text):,} characters to train on, {len(held_out_text):,} held out "
          f"(every 20th file); vocabulary {len(vocab)}. Unigram baseline: {baseline:.3f} "
          f"bits per character.")

    T, B = args.num_steps, args.batch_size
    rng = np.random.default_rng(args.seed)
    model, lm = build_fused(len(vocab), T, args.units, budget, args.seed)
    tokens, targets = windows(train_ids, T, B, rng)

    # 1-2. The plan, and one training step's memory against the standard model's.
    initial_weights = model.get_weights()
    peak, seconds, loss = step_memory(model, tokens, targets, fused=True)
    print()
    print(lm.last_plan.describe())
    print(f"  alpha (measured)    : {lm.step_alpha:.3g} hidden states per internal state "
          f"(the head's softmax gradient included)")
    print()
    print(f"One training step (batch {B}, T = {T:,}, measured, TF CPU BFC allocator):")
    print(f"  fused MemoryEfficientRNN, budget {args.budget:<6}: "
          f"{format_bytes(peak):>10}  ({seconds:.2f} s)")
    # Standard BPTT keeps, per step, about the LSTM's internal state and the step's logits
    # and their softmax: a rough prediction decides whether to measure it here.
    predicted = B * T * 4 * (10 * args.units + 4 * len(vocab) + 2 * 32)
    if predicted / 2 ** 30 > args.standard_limit_gib:
        print(f"  standard keras.layers.RNN + Dense : not measured: predicted "
              f"~{format_bytes(predicted)}, over --standard-limit-gib "
              f"{args.standard_limit_gib:g}")
    else:
        standard = build_standard(len(vocab), T, args.units, args.seed)
        standard.set_weights(initial_weights)
        standard_peak, standard_seconds, standard_loss = step_memory(standard, tokens, targets,
                                                                     fused=False)
        print(f"  standard keras.layers.RNN + Dense : {format_bytes(standard_peak):>10}  "
              f"({standard_seconds:.2f} s)   fused = {100 * peak / standard_peak:.1f}% of it")
        print(f"  the same loss from the same weights: fused {loss:.6f}, standard "
              f"{standard_loss:.6f}")
        del standard

    # 3. Training, then the held-out bits per character.
    model, lm = build_fused(len(vocab), T, args.units, budget, args.seed)
    model.compile(keras.optimizers.Adam(args.learning_rate, clipnorm=1.0))
    eval_model, _ = build_fused(len(vocab), min(T, 2000), args.units, budget, args.seed)

    class Report(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % max(1, args.train_steps // 8) == 0:
                print(f"  step {batch + 1:4d}: mean training loss so far "
                      f"{logs['loss'] / math.log(2):.3f} bits/char "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)

    def batches():
        while True:
            tokens, targets = windows(train_ids, T, B, rng)
            yield (tokens, targets),

    print()
    print(f"Training {args.train_steps} steps of {B} x {T:,} characters (Adam "
          f"{args.learning_rate:g}):")
    dataset = tf.data.Dataset.from_generator(
        batches, output_signature=((tf.TensorSpec((B, T), tf.int32),
                                    tf.TensorSpec((B, T), tf.int32)),))
    model.fit(dataset, steps_per_epoch=args.train_steps, epochs=1, verbose=0, shuffle=False,
              callbacks=[Report()])
    eval_model.set_weights(model.get_weights())
    bits = held_out_bits(eval_model, held_out_ids, min(T, 2000), 16)
    print()
    print(f"Held-out: {bits:.3f} bits per character (unigram baseline {baseline:.3f}; "
          f"{100 * bits / baseline:.0f}% of it).")

    # 4. Sampling, one character at a time.
    print()
    print(f"Sampled ({args.sample_chars} characters, temperature 0.7):")
    print(sample(lm, model.get_layer("embedding"), vocab, "def ", args.sample_chars, 0.7,
                 args.seed))
    print()
    print(f"Done in {time.perf_counter() - started:.0f} s.")
    if not bits < args.threshold * baseline:
        print(f"FAILED: held-out bits per character {bits:.3f} not below "
              f"{args.threshold:g} x the unigram baseline {baseline:.3f}.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
