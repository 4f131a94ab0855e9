"""The two sweeps of a planned training step, on any store.

`forward_sweep` is the first sweep: it evaluates steps ``1..T`` and stores what the plan
says (one row of `Locations.first_sweep` per step). `backward_sweep` is the gradient: one
loop over the plan's segments, each restoring the cursor, evaluating the steps it must
recompute (an inner loop over `Locations.advances`, storing as the rows say) and running
its backwards (an inner loop over `Locations.backwards`). No loop dispatches on an op
kind: every evaluation writes where its row says (see `store.py`), every backward reads its
internal state from the store, so an iteration is the cell's own work plus a few table
reads and store moves.

Invariants:
* at the top of a segment iteration, the store holds exactly the states the plan holds
  before that segment's restore;
* in the advance loop, `cursor` is the hidden state after the last evaluated step;
* in the backward loop, `d_carry` is the gradient of the loss with respect to the hidden
  state after the step whose backward runs next, and `d_params` the sum of the params'
  gradients over the backwards already run (one step's gradient is added at a time).

Graph size and trace time do not depend on ``T``: the tables are constants.
"""

from __future__ import annotations

import dataclasses
from typing import List

import numpy as np
import tensorflow as tf

from tf_membptt import segments as seg
from tf_membptt.executor import store as st


@dataclasses.dataclass
class StepInputs:
    """What every evaluation and backward reads besides the carry.

    Attributes:
        xs: the input sequence, batch-major ``[batch, T, ...]`` (one step is gathered per
            evaluation: a time-major copy would double the input's memory).
        sides: the side inputs' sequences, time-major ``[T, batch, ...]`` in processing
            order (small: a mask's bits, a loss's targets).
        params: the cell's variable values; constants: tensors the step captures.
        go_backwards: whether processing runs from the last input to the first.
        batch: the batch size (a scalar tensor).
    """

    xs: tf.Tensor
    sides: List[tf.Tensor]
    params: List[tf.Tensor]
    constants: List[tf.Tensor]
    go_backwards: bool
    batch: tf.Tensor

    def column(self, position):
        """The input's column (time index) of the step at processing `position`."""
        num_steps = self.xs.shape[1] if self.xs.shape[1] is not None else tf.shape(self.xs)[1]
        return num_steps - 1 - position if self.go_backwards else position

    def at(self, position):
        """Input and side inputs of the step at processing `position` (0-based)."""
        x = tf.gather(self.xs, self.column(position), axis=1)
        return x, [tf.gather(side, position) for side in self.sides]


class OutputSequence:
    """The outputs of every step, batch-major ``[batch, T, ...]``, written in place one
    step at a time: the layer's output sequence is one copy, never a time-major stack and
    a transpose (two copies at the peak; measured, T = 1000, [32, 512] outputs: 125 MiB
    against 63 MiB).

    Under XLA a dynamic-update-slice is in place. Elsewhere the buffer is a fresh
    ``[batch * T, ...]`` tensor (`Empty`, never a constant) updated with `InplaceUpdate`,
    which writes rows in place: safe here because the loop is the buffer's only user.
    (`tf.tensor_scatter_nd_update` copies the buffer at every step: 10 s instead of 74 ms.)"""

    def __init__(self, spec: tf.TensorSpec, batch, num_steps, xla: bool):
        self.spec, self.batch, self.num_steps, self.xla = spec, batch, num_steps, xla
        self.tail = spec.shape.as_list()[1:]

    def empty(self):
        if self.xla:
            return tf.zeros(tf.concat([[self.batch, self.num_steps], self.tail], 0),
                            self.spec.dtype)
        return tf.raw_ops.Empty(
            shape=tf.concat([[self.batch * self.num_steps], self.tail], 0),
            dtype=self.spec.dtype, init=True)

    def write(self, buffer, position, value):
        if self.xla:
            from tensorflow.compiler.tf2xla.python import xla

            begin = tf.stack([0, position] + [0] * len(self.tail))
            return xla.dynamic_update_slice(buffer, tf.expand_dims(value, 1), begin)
        rows = tf.range(self.batch) * self.num_steps + position
        return tf.raw_ops.InplaceUpdate(x=buffer, i=rows, v=value)

    def finish(self, buffer):
        if self.xla:
            return buffer
        return tf.reshape(buffer, tf.concat([[self.batch, self.num_steps], self.tail], 0))


def forward_sweep(program, store, locations: st.Locations, inputs: StepInputs, carry0,
                  return_sequences: bool, num_steps: int):
    """The first sweep: ``(last_output, outputs, final_carry, store_state)``; `outputs`
    is batch-major, in processing order (or None).

    Under XLA, when the plan stores after few of the steps (`_runs_pay_off`), the steps
    between two stores run in an inner loop that touches no store at all, and only the
    storing steps write (`_forward_in_runs`); otherwise one loop writes at every step (to
    the scratch entry when the step stores nothing).
    """
    output_spec = program.output_spec
    sequence = OutputSequence(output_spec, inputs.batch, num_steps, store.xla)
    outputs = sequence.empty() if return_sequences else tf.zeros([0])
    last_output = tf.zeros(tf.concat([[inputs.batch], output_spec.shape[1:]], 0),
                           output_spec.dtype)
    state = store.empty(carry0, inputs.batch)
    storing = np.flatnonzero(locations.first_sweep[:, st.FIRST_KIND] != seg.NOTHING)
    if _runs_pay_off(len(storing), num_steps, store.xla):
        run = _forward_in_runs
    else:
        run = _forward_writing_every_step
    outputs, last_output, final_carry, state = run(
        program, store, locations, inputs, carry0, state, outputs, last_output, sequence,
        return_sequences, num_steps, storing)
    state = store.finish_first_sweep(state)
    return (last_output, sequence.finish(outputs) if return_sequences else None,
            final_carry, state)


def _runs_pay_off(num_storing: int, num_steps: int, xla: bool) -> bool:
    """Whether the first sweep runs as runs of non-storing steps between storing ones.

    Under XLA an evaluation that writes a flat buffer costs up to about twice one that does
    not (benchmarks/bench_xla_store_write.py: 1.4-1.9x across runs for a hand-written LSTM
    loop on 2 CPU cores, whatever the buffer's size or layout), but every run costs an
    inner loop's start, about one step: runs pay off when at most one step in four stores
    (a plan at 5% stores after 1 step in 20; at 100%, every step). Measured at 5%, T = 1000: LSTMCell(32)
    1.58x -> 1.46x keras.layers.RNN's step, LSTMCell(128) 1.37x -> 1.26x, same memory.

    Not in graph mode: there each run held one more hidden-state-sized tensor until the
    gradient (measured, LSTMCell(512), T = 1000, 5%: hsm 28.2 -> 46.1 MiB, msm 31.5 -> 36.6
    MiB, one carry per storing step), for a gain of 2-4% in step time."""
    return xla and num_storing * 4 <= num_steps


def _evaluate(program, inputs, sequence, return_sequences, t, outputs, carry):
    """Step ``t + 1`` of the first sweep: ``(output, new_carry, internal, outputs)``, its
    output written into `outputs` when the layer returns sequences."""
    x, sides = inputs.at(t)
    output, new_carry, internal = program.forward(x, sides, list(carry), inputs.params,
                                                  inputs.constants)
    if return_sequences:
        outputs = sequence.write(outputs, t, output)
    return output, new_carry, internal, outputs


def _forward_writing_every_step(program, store, locations, inputs, carry0, state, outputs,
                                last_output, sequence, return_sequences, num_steps,
                                storing):
    table = tf.constant(locations.first_sweep)
    changed = store.writes(first_sweep=True)
    varying, join = store.split(state, changed)

    def body(t, varying, outputs, last_output, *carry):
        output, new_carry, internal, outputs = _evaluate(
            program, inputs, sequence, return_sequences, t, outputs, carry)
        state = store.after_evaluation(join(varying), tf.unstack(table[t]), new_carry,
                                       internal, first_sweep=True)
        return (t + 1, store.split(state, changed)[0], outputs, output) + tuple(new_carry)

    result = tf.while_loop(lambda t, *_: t < num_steps, body,
                           (tf.constant(0), varying, outputs, last_output) + tuple(carry0),
                           maximum_iterations=num_steps)
    _, varying, outputs, last_output = result[:4]
    return outputs, last_output, list(result[4:]), join(varying)


def _forward_in_runs(program, store, locations, inputs, carry0, state, outputs, last_output,
                     sequence, return_sequences, num_steps, storing):
    """Outer iteration ``k``: the steps after the previous storing step and before
    ``storing[k]`` (an inner loop that never touches the store), then step ``storing[k]``
    with its write; the steps after the last storing one close the sweep. Same evaluations
    in the same order as `_forward_writing_every_step`; only the scratch writes are gone."""
    rows = tf.constant(locations.first_sweep[storing]) if len(storing) else None
    # Run k covers steps run_begins[k]..storing[k]-1 (tables: no index arithmetic in the
    # loop, which XLA's CPU runtime would schedule as separate kernels).
    run_begins = np.concatenate([[0], storing[:-1] + 1]).astype(np.int32)
    positions, begins = tf.constant(storing.astype(np.int32)), tf.constant(run_begins)
    longest_run = int(np.max(np.diff(np.concatenate([[-1], storing, [num_steps]])))) - 1

    def evaluate(t, outputs, carry):
        return _evaluate(program, inputs, sequence, return_sequences, t, outputs, carry)

    def advance(begin, end, outputs, last_output, carry):
        """Steps ``begin..end-1``, storing nothing."""
        def body(t, outputs, last_output, *carry):
            output, new_carry, _, outputs = evaluate(t, outputs, carry)
            return (t + 1, outputs, output) + tuple(new_carry)

        result = tf.while_loop(lambda t, *_: t < end, body,
                               (begin, outputs, last_output) + tuple(carry),
                               maximum_iterations=max(longest_run, 1))
        return result[1], result[2], list(result[3:])

    changed = store.writes(first_sweep=True)
    varying, join = store.split(state, changed)
    carry = list(carry0)
    if len(storing):
        def body(k, varying, outputs, last_output, *carry):
            step = positions[k]
            outputs, last_output, carry = advance(begins[k], step, outputs, last_output,
                                                  carry)
            output, new_carry, internal, outputs = evaluate(step, outputs, carry)
            state = store.after_evaluation(join(varying), tf.unstack(rows[k]), new_carry,
                                           internal, first_sweep=True)
            return (k + 1, store.split(state, changed)[0], outputs, output) + tuple(new_carry)

        result = tf.while_loop(lambda k, *_: k < len(storing), body,
                               (tf.constant(0), varying, outputs, last_output) + tuple(carry),
                               maximum_iterations=len(storing))
        _, varying, outputs, last_output = result[:4]
        carry = list(result[4:])
    tail_begin = int(storing[-1]) + 1 if len(storing) else 0
    if tail_begin < num_steps:
        outputs, last_output, carry = advance(tf.constant(tail_begin), tf.constant(num_steps),
                                              outputs, last_output, carry)
    return outputs, last_output, carry, join(varying)


def backward_sweep(program, store, locations: st.Locations, segments_: seg.Segments,
                   inputs: StepInputs, state, final_carry, d_final_carry, d_outputs, d_last,
                   need_dx: bool, in_flight: int = 1, overlap_segments: bool = False):
    """The gradient: ``(dxs, d_carry0, d_params)``. `d_final_carry` holds the gradients of
    the differentiable carry parts after step ``T``; `d_outputs` (batch-major, processing
    order; each step reads its own slice) or `d_last` the output gradients. `dxs` is
    batch-major, written in place one step at a time like an output sequence (None unless
    `need_dx`). `in_flight` backward steps may run at once (see `in_flight_backwards`);
    with `overlap_segments` a segment's restore and recomputation may start while the
    previous segment's last backwards finish (see `segments_overlap`; not under XLA, whose
    loops run one iteration at a time anyway)."""
    num_steps = segments_.num_steps
    invariants = program.invariants(inputs.params, inputs.constants)
    signature = program.signature
    diff_params = [p for p, d in zip(inputs.params, signature.param_differentiable) if d]
    output_spec = program.output_spec
    zero_output = tf.zeros(tf.concat([[inputs.batch], output_spec.shape[1:]], 0),
                           output_spec.dtype)
    backward_table = tf.constant(locations.backwards)
    # The input's gradients, one row per step (a loop variable only when built).
    input_gradient = OutputSequence(signature.input_spec, inputs.batch, num_steps, store.xla)
    dxs = [input_gradient.empty()] if need_dx else []

    # Without output sequence only step T's output has a gradient. Its backward comes
    # first: when it is segment 0's, it runs on its own with `d_last` and every other
    # backward reads zeros; otherwise each backward picks its own.
    first = segments_.segments[0]
    peel_last = d_outputs is None and first[8] > first[7]

    def run_backward(j, state, d_carry, d_params, dxs, d_out=None):
        row = tf.unstack(backward_table[j])
        step, at = row[st.BWD_STEP], row[st.BWD_AT]
        internal, state = store.read_internal_and_free(state, at)
        x, sides = inputs.at(step - 1)
        if d_out is None:
            if d_outputs is not None:
                d_out = tf.gather(d_outputs, step - 1, axis=1)
            elif peel_last:
                d_out = zero_output
            else:
                d_out = tf.where(tf.equal(step, num_steps), d_last, zero_output)
        dx, d_prev, grads = program.backward(internal, x, sides, inputs.params,
                                             inputs.constants, invariants, d_out, d_carry,
                                             inputs.batch, need_dx)
        # AddN, not AddV2: grappler's remapper fuses `MatMul + AddV2` into a matrix product
        # with a bias, and with a [1, n] params' gradient (a cell of one unit) the fused
        # kernel then fails ("bias must be 1-dimensional").
        d_params = [tf.math.add_n([a, g]) for a, g in zip(d_params, grads)]
        if need_dx:
            dxs = [input_gradient.write(dxs[0], inputs.column(step - 1), dx)]
        return state, d_prev, d_params, dxs

    frees = store.writes(frees_internal=True)

    def backward_loop(begin, end, state, d_carry, d_params, dxs):
        varying, join = store.split(state, frees)

        def body(j, varying, d_carry, d_params, dxs):
            state, d_carry, d_params, dxs = run_backward(j, join(varying), d_carry, d_params,
                                                         dxs)
            return j + 1, store.split(state, frees)[0], d_carry, d_params, dxs

        result = tf.while_loop(lambda j, *_: j < end, body,
                               (begin, varying, d_carry, d_params, dxs),
                               maximum_iterations=max(segments_.max_backwards, 1),
                               parallel_iterations=in_flight)
        return (join(result[1]),) + tuple(result[2:])

    d_carry = [tf.zeros_like(final_carry[k]) if d is None else d
               for k, d in zip([k for k, diff in enumerate(signature.carry_differentiable)
                                if diff], d_final_carry)]
    d_params = [tf.zeros_like(p) for p in diff_params]
    begin = int(first[7])
    if peel_last:
        state, d_carry, d_params, dxs = run_backward(tf.constant(begin), state, d_carry,
                                                     d_params, dxs, d_out=d_last)
        begin += 1
    if first[8] > begin:
        state, d_carry, d_params, dxs = backward_loop(
            tf.constant(begin), tf.constant(int(first[8])), state, d_carry, d_params, dxs)
    if len(segments_.segments) > 1:
        state, d_carry, d_params, dxs = _segment_loop(
            program, store, locations, segments_, inputs, state, d_carry, d_params, dxs,
            run_backward, backward_loop, overlap=overlap_segments and not store.xla)
    if need_dx:  # rows are in processing order; the input is batch-major
        dxs = input_gradient.finish(dxs[0])
    else:
        dxs = None
    return dxs, d_carry, d_params


def _segment_loop(program, store, locations, segments_, inputs, state, d_carry, d_params,
                  dxs, run_backward, backward_loop, overlap: bool = False):
    """Segments 1..S-1: restore the cursor, evaluate, run the backwards.

    With `overlap`, two segment iterations may be in flight: the next segment's restore and
    recomputation start as soon as the store's last free of this segment has run, while this
    segment's last backwards are still computing their params' gradients (they are off the
    store's chain). Without it, TensorFlow waits for every op of an iteration, and each of
    a plan's segment boundaries costs an idle wait (measured, graph, T = 1000, 5%, 41
    alternated rounds: LSTMCell(32) 1.38x -> 1.29x keras.layers.RNN's step per round,
    the README example 1.36x -> 1.25x, GRUCell(128) unchanged). The next segment's first
    backward still waits for the params' gradients summed so far, so no more of them are in
    flight than within a segment."""
    segment_table = tf.constant(locations.segments[1:])
    runs = segments_.segments[1:, 8] - segments_.segments[1:, 7]
    stored_after_cursor = bool(np.any(runs > 1))
    advance_table = tf.constant(locations.advances)
    restore_kinds = {int(k) for k in np.unique(segments_.segments[1:, 0])}
    frees_hidden = bool(np.any(segments_.segments[1:, 4]))
    max_advances = max(segments_.max_advances, 1)

    writes = store.writes(later=True)
    changed = store.writes(later=True, frees_hidden=frees_hidden, frees_internal=True)

    def advance_loop(begin, end, state, cursor):
        varying, join = store.split(state, writes)

        def body(i, varying, *cursor):
            row = tf.unstack(advance_table[i])
            x, sides = inputs.at(row[st.ADV_STEP] - 1)
            _, new_carry, internal = program.forward(x, sides, list(cursor), inputs.params,
                                                     inputs.constants)
            state = store.after_evaluation(join(varying), row, new_carry, internal,
                                           first_sweep=False)
            return (i + 1, store.split(state, writes)[0]) + tuple(new_carry)

        result = tf.while_loop(lambda i, *_: i < end, body, (begin, varying) + tuple(cursor),
                               maximum_iterations=max_advances)
        return join(result[1])

    def body(k, varying, d_carry, d_params, dxs):
        state = join(varying)
        row = tf.unstack(segment_table[k])
        restored_step = row[st.SEG_RESTORE_STEP]

        def restart(internal):
            # I_s restarts the cursor at h_s, recomputed from it with step s's input.
            x, sides = inputs.at(restored_step - 1)
            return program.carry_of_internal(internal, x, sides, inputs.params,
                                             inputs.constants)

        cursor = store.restore(state, row[st.SEG_RESTORE_KIND], row[st.SEG_RESTORE_AT],
                               restart, restore_kinds)
        if frees_hidden:
            state = store.free_hidden(state, row[st.SEG_FREE_AT])
        state = advance_loop(row[st.SEG_ADVANCE_BEGIN], row[st.SEG_ADVANCE_END], state,
                             cursor)
        # A segment runs at least one backward (checked when the plan was compiled): the
        # first runs inline; only the backwards after it need a loop, and only plans that
        # have some build one (starting a nested loop costs about as much as a step, and
        # hsm plans have one segment per step).
        begin = row[st.SEG_BACKWARD_BEGIN]
        if overlap:
            with tf.control_dependencies(d_params):
                begin = tf.identity(begin)
        state, d_carry, d_params, dxs = run_backward(begin, state, d_carry, d_params, dxs)
        if stored_after_cursor:
            state, d_carry, d_params, dxs = backward_loop(
                begin + 1, row[st.SEG_BACKWARD_END], state, d_carry, d_params, dxs)
        return k + 1, store.split(state, changed)[0], d_carry, d_params, dxs

    varying, join = store.split(state, changed)
    result = tf.while_loop(lambda k, *_: k < len(locations.segments) - 1, body,
                           (tf.constant(0), varying, d_carry, d_params, dxs),
                           maximum_iterations=len(locations.segments) - 1,
                           parallel_iterations=2 if overlap else 1)
    return (join(result[1]),) + tuple(result[2:])


def in_flight_backwards(param_bytes: float, stored_bytes: float, limit: int = 10,
                        small_cell_bytes: float = 2 ** 20) -> int:
    """How many backward steps may run at once.

    A step's gradients with respect to the params are off the critical path (the next
    backward needs only the carry's gradient): with one step at a time, TensorFlow waits for
    them before starting the next step, which leaves CPU cores idle when steps are short
    (measured: LSTMCell(32) at T = 1000 with nothing recomputed, 1.34x keras.layers.RNN's
    step time with one step at a time, 1.03x with ten; LSTMCell(128) at 5%, 1.65x with one,
    1.40x with four). But each step in flight holds its own copy of the params' gradients
    until it is summed, memory the plan does not count. So the extra copies may always use
    a twentieth of the stored states' bytes (LSTMCell(512), T = 1000: the whole step measured
    1.00-1.12x the plan's prediction from 10% budgets up), and up to a quarter of them when
    they total at most `small_cell_bytes` (small cells, where the concurrency pays).
    Measured, LSTMCell(512), T = 1000, 10%: three steps in flight held 4.6 MiB more at the
    peak (1.14x the predicted step memory) than one; 5 alternated rounds ran 3.7% faster.
    At least 1, at most `limit`."""
    if param_bytes <= 0:
        return limit
    extra = _extra_allowance(stored_bytes, small_cell_bytes)
    return int(max(1, min(limit, 1 + extra // param_bytes)))


def segments_overlap(in_flight: int, internal_bytes: float, stored_bytes: float,
                     small_cell_bytes: float = 2 ** 20) -> bool:
    """Whether the next segment's restore and recomputation may start while the previous
    segment's last backwards finish (`_segment_loop`).

    Those backwards, at most ``in_flight - 1`` of them, hold the internal states they read
    (already freed from the store) until their params' gradients are computed, while the
    next segment's recomputation stores again: for that short while up to ``in_flight - 1``
    internal states are held beyond the plan's stored states. So segments overlap only when
    more than one backward may be in flight (a cell whose gradient copies are cheap, which
    is also where the idle wait at a segment boundary costs most) and those internal states
    fit the same allowance as the gradient copies (`in_flight_backwards`)."""
    return in_flight > 1 and (in_flight - 1) * internal_bytes <= _extra_allowance(
        stored_bytes, small_cell_bytes)


def _extra_allowance(stored_bytes: float, small_cell_bytes: float) -> float:
    """Bytes a training step may hold beyond the plan's stored states for concurrency: a
    twentieth of the stored states, or up to a quarter of them when that is at most
    `small_cell_bytes`."""
    return max(stored_bytes / 20, min(stored_bytes / 4, small_cell_bytes))
