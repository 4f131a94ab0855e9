"""Entry points: the only place that knows about tapes, XLA contexts and custom gradients.

* `run_plain`: a forward loop that stores nothing (inference), calling the step function
  itself; used inside `run_deferred`, and by the layer where no gradient can be taken.
* `run_planned`: the first sweep stores what the plan says, and one `tf.custom_gradient`
  runs the plan's gradient (`sweeps.backward_sweep`). Used when a gradient tape watches the
  layer's inputs or variables, eagerly or while a function is traced.
* `run_deferred`: for graph code with no tape in sight (a `tf.function` differentiated from
  outside, graph-mode `tf.gradients`, an exported SavedModel): the forward is `run_plain`,
  and only when a gradient is asked for does the custom gradient plan, run the first sweep
  again with its stores and then the gradient. Inference pays nothing; a gradient costs one
  extra forward sweep but stays within the budget.

The gradient functions are not themselves differentiable: a second-order gradient through
them (a gradient penalty, a Hessian-vector product) raises `NotImplementedError` where it is
asked for (`_first_order_only`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from tf_membptt.executor import store as st
from tf_membptt.executor import sweeps
from tf_membptt.executor.step_program import StepProgram
from tf_membptt.segments import compile_plan

SECOND_ORDER_MESSAGE = (
    "MemoryEfficientRNN's gradient is not differentiable: a second-order gradient through "
    "it (a gradient penalty, a Hessian-vector product, MAML) is not supported, because the "
    "recomputation that keeps memory within the budget is not itself recorded. Use "
    "keras.layers.RNN for models that differentiate a gradient.")


def in_xla_context() -> bool:
    """Whether ops are being built for XLA (inside `tf.function(jit_compile=True)`).

    Reads a TensorFlow internal (`control_flow_util.GraphOrParentsInXlaContext`);
    `tests/test_internals.py` fails loudly if a release moves it."""
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def watched(tensors) -> bool:
    """Whether a gradient tape would record an op reading any of `tensors` (True if this
    TensorFlow does not say: then the planned path is taken, which is always safe).

    Reads a TensorFlow internal (`record.should_record_backprop`);
    `tests/test_internals.py` fails loudly if a release moves it."""
    tensors = [t for t in tensors if isinstance(t, tf.Tensor)]
    if not tensors:
        return False
    try:
        from tensorflow.python.eager import record

        return bool(record.should_record_backprop(tensors))
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - API moved
        return True


# --------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------
def run_plain(step_fn: Callable, inputs: sweeps.StepInputs, carry0, output_spec,
              return_sequences: bool):
    """A forward loop that stores nothing: ``(last_output, outputs, final_carry)``,
    `outputs` batch-major in processing order (or None). The number of steps may be
    dynamic."""
    num_steps = inputs.xs.shape[1]
    dynamic_steps = tf.shape(inputs.xs)[1] if num_steps is None else num_steps
    sequence = sweeps.OutputSequence(output_spec, inputs.batch, dynamic_steps,
                                     in_xla_context())
    outputs = sequence.empty() if return_sequences else tf.zeros([0])
    last_output = tf.zeros(tf.concat([[inputs.batch], output_spec.shape[1:]], 0),
                           output_spec.dtype)

    def body(t, outputs, last_output, *carry):
        x, sides = inputs.at(t)
        output, new_carry = step_fn(x, sides, list(carry), inputs.params)
        if return_sequences:
            outputs = sequence.write(outputs, t, output)
        return (t + 1, outputs, output) + tuple(new_carry)

    result = tf.while_loop(lambda t, *_: t < dynamic_steps, body,
                           (tf.constant(0), outputs, last_output) + tuple(carry0),
                           maximum_iterations=num_steps)
    outputs = sequence.finish(result[1]) if return_sequences else None
    return result[2], outputs, list(result[3:])


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def make_store(program: StepProgram, plan, xla: bool):
    """The store for this plan and context: flat buffers under XLA, lists otherwise."""
    segments_ = compile_plan(plan)
    sig = program.signature
    args = (segments_, sig.carry_specs, sig.carry_batched, program.internal_specs,
            program.internal_batched, sig.batch_size)
    return (st.StackStore(*args) if xla else st.ListStore(*args)), segments_


class _Differentiable:
    """Which of the step's tensors go through the custom gradient (and get gradients)."""

    def __init__(self, carry_flags, param_flags, need_dx: bool):
        self.need_dx = need_dx
        self.carry = [k for k, d in enumerate(carry_flags) if d]
        self.params = [k for k, d in enumerate(param_flags) if d]

    def pack(self, xs, carry, params) -> list:
        return (([xs] if self.need_dx else []) + [carry[k] for k in self.carry]
                + [params[k] for k in self.params])

    def unpack(self, args, xs, carry, params):
        """Replaces the differentiable tensors by the custom gradient's arguments (taken
        through `tf.stop_gradient`: nothing inside is recorded on an outer tape, whose
        gradient is the custom one; recording would keep every step's tensors alive)."""
        args = [tf.stop_gradient(a) for a in args]
        if self.need_dx:
            xs, args = args[0], args[1:]
        carry, params = list(carry), list(params)
        for k, value in zip(self.carry, args[:len(self.carry)]):
            carry[k] = value
        for k, value in zip(self.params, args[len(self.carry):]):
            params[k] = value
        return xs, carry, params


def _with_custom_gradient(diff: _Differentiable, inputs: sweeps.StepInputs, carry0,
                          return_sequences: bool, forward: Callable, gradient: Callable):
    """``(last_output, outputs, final_carry)`` of ``forward(step_inputs, carry)``, inside one
    `tf.custom_gradient` whose gradient is ``gradient(saved, step_inputs, carry,
    final_carry, d_result, d_final_carry) -> (dxs, d_carry0, d_params)``; `forward`
    returns ``(last_output, outputs, final_carry, saved)``."""
    side = {}

    @tf.custom_gradient
    def call(*sources):
        # Everything else enters through tf.stop_gradient too: an eager tape would otherwise
        # record the sweeps (a non-differentiable carry part, e.g. a counter's value, may
        # have been computed from watched weights).
        xs, carry, params = diff.unpack(
            sources, inputs.xs, [tf.stop_gradient(c) for c in carry0],
            [tf.stop_gradient(p) for p in inputs.params])
        step_inputs = sweeps.StepInputs(
            xs, [tf.stop_gradient(s) for s in inputs.sides], params,
            [tf.stop_gradient(c) for c in inputs.constants], inputs.go_backwards,
            inputs.batch)
        last_output, outputs, final_carry, saved = forward(step_inputs, carry)
        side["final_carry"] = final_carry

        def grad(d_result, *d_final_carry):
            if d_result is None:
                d_result = tf.zeros_like(outputs if return_sequences else last_output)
            dxs, d_carry0, d_params = gradient(saved, step_inputs, carry, final_carry,
                                               d_result, list(d_final_carry))
            return _first_order_only(([dxs] if diff.need_dx else []) + list(d_carry0)
                                     + list(d_params), sources)

        result = outputs if return_sequences else last_output
        return (result,) + tuple(final_carry[k] for k in diff.carry), grad

    out = call(*diff.pack(inputs.xs, carry0, inputs.params))
    final_carry = list(side["final_carry"])
    for k, value in zip(diff.carry, out[1:]):
        final_carry[k] = value
    if return_sequences:
        return out[0][:, -1], out[0], final_carry
    return out[0], None, final_carry


def in_flight(program: StepProgram, plan) -> int:
    """Backward steps that may run at once for this plan (`sweeps.in_flight_backwards`):
    the params' gradients against the plan's stored states, in bytes (per batch row when
    the batch size is not static: then fewer steps run at once)."""
    sig = program.signature
    param_bytes = sum(float(np.prod(s.shape.as_list())) * s.dtype.size
                      for s, d in zip(sig.param_specs, sig.param_differentiable) if d)
    stored_bytes = plan.peak_memory * program.hidden_bytes(sig.batch_size)
    return sweeps.in_flight_backwards(param_bytes, stored_bytes)


def overlap_segments(program: StepProgram, plan, in_flight_steps: int) -> bool:
    """Whether the plan's segments may overlap (`sweeps.segments_overlap`): the internal
    states the last backwards of a segment hold, against the plan's stored states."""
    batch_size = program.signature.batch_size
    return sweeps.segments_overlap(in_flight_steps, program.internal_bytes(batch_size),
                                   plan.peak_memory * program.hidden_bytes(batch_size))


def _recomputed_gradients(program, plan, step_inputs, carry, d_result, d_final_carry,
                          return_sequences, need_dx):
    """The plan's gradient from the step's inputs alone: the first sweep again, with the
    plan's stores, then the gradient (one forward sweep more than `run_planned`)."""
    store, segments_ = make_store(program, plan, in_xla_context())
    _, _, final_carry, state = sweeps.forward_sweep(
        program, store, store.locations, step_inputs, carry, False, plan.num_steps)
    return _plan_gradient(program, plan, store, segments_, step_inputs, state, final_carry,
                          d_final_carry, d_result, return_sequences, need_dx)


def _plan_gradient(program, plan, store, segments_, step_inputs, state, final_carry,
                   d_final_carry, d_result, return_sequences, need_dx):
    """`sweeps.backward_sweep` for this plan: `d_result` is the gradient of the output
    sequence with `return_sequences`, else of the last output."""
    steps = in_flight(program, plan)
    return sweeps.backward_sweep(
        program, store, store.locations, segments_, step_inputs, state, final_carry,
        d_final_carry, d_result if return_sequences else None,
        None if return_sequences else d_result, need_dx, steps,
        overlap_segments(program, plan, steps))


def run_planned(program: StepProgram, plan, inputs: sweeps.StepInputs, carry0,
                return_sequences: bool, need_dx: bool):
    """Training: ``(last_output, outputs, final_carry)`` as `run_plain`, with the plan's
    memory-efficient gradient for the input (when `need_dx`), the differentiable carry
    parts and the floating params."""
    sig = program.signature
    diff = _Differentiable(sig.carry_differentiable, sig.param_differentiable, need_dx)
    store, segments_ = make_store(program, plan, in_xla_context())
    if tf.executing_eagerly():
        forward_call, backward_call = _eager_sweeps(program, plan, store, segments_,
                                                    return_sequences, need_dx, inputs)

        def forward(step_inputs, carry):
            return forward_call(step_inputs.xs, step_inputs.sides, carry,
                                step_inputs.params, step_inputs.constants)

        def backward(flows, step_inputs, final_carry, d_result, d_final_carry):
            return backward_call(
                step_inputs.xs, step_inputs.sides, step_inputs.params,
                step_inputs.constants, flows, final_carry, d_final_carry,
                d_result if return_sequences else tf.zeros([0]),
                tf.zeros([0]) if return_sequences else d_result)
    else:
        def forward(step_inputs, carry):
            return sweeps.forward_sweep(program, store, store.locations, step_inputs, carry,
                                        return_sequences, plan.num_steps)

        def backward(state, step_inputs, final_carry, d_result, d_final_carry):
            return _plan_gradient(program, plan, store, segments_, step_inputs, state,
                                  final_carry, d_final_carry, d_result, return_sequences,
                                  need_dx)

    def gradient(saved, step_inputs, carry, final_carry, d_result, d_final_carry):
        if _in_save_context():
            # tf.saved_model.save traces this function to serialize it; it may not capture
            # the stored states (TensorLists), so the saved gradient recomputes them.
            return _recomputed_gradients(program, plan, step_inputs, carry, d_result,
                                         d_final_carry, return_sequences, need_dx)
        return backward(saved, step_inputs, final_carry, d_result, d_final_carry)

    return _with_custom_gradient(diff, inputs, carry0, return_sequences, forward, gradient)


def run_deferred(step_fn: Callable, prepare: Callable, inputs: sweeps.StepInputs, carry0,
                 output_spec, return_sequences: bool, carry_differentiable,
                 param_differentiable):
    """`run_plain` whose gradient, when asked for, runs the plan: ``prepare()`` returns
    ``(program, plan)`` then (it may raise; the error is then raised when the gradient
    runs)."""
    need_dx = inputs.xs.dtype.is_floating
    diff = _Differentiable(carry_differentiable, param_differentiable, need_dx)

    def forward(step_inputs, carry):
        last_output, outputs, final_carry = run_plain(step_fn, step_inputs, carry,
                                                       output_spec, return_sequences)
        return last_output, outputs, final_carry, None

    def gradient(unused_saved, step_inputs, carry, final_carry, d_result, d_final_carry):
        try:
            program, plan = prepare()
        except (NotImplementedError, ValueError) as error:
            return _failing_split(str(error), diff, step_inputs, carry)
        if list(program.signature.carry_differentiable) != list(carry_differentiable):
            raise AssertionError("the layer and the step program disagree on the carry")
        return _recomputed_gradients(program, plan, step_inputs, carry, d_result,
                                     d_final_carry, return_sequences, need_dx)

    return _with_custom_gradient(diff, inputs, carry0, return_sequences, forward, gradient)


def _failing_split(message, diff, step_inputs, carry):
    """`_failing_gradients` in the shape `gradient` returns: (dxs, d_carry0, d_params)."""
    failing = _failing_gradients(message, diff.pack(step_inputs.xs, carry,
                                                    step_inputs.params))
    dxs = failing.pop(0) if diff.need_dx else None
    return dxs, failing[:len(diff.carry)], failing[len(diff.carry):]


def _failing_gradients(message, like):
    """Gradients that raise `message` when they run (graph code only: the error must not
    break the tracing of functions that never run it, e.g. a SavedModel export)."""
    check = tf.debugging.Assert(tf.constant(False), [tf.constant(message)], summarize=1)
    with tf.control_dependencies([check]):
        return [tf.zeros_like(t) for t in like]


def _first_order_only(grads, sources):
    """`grads` through an identity whose own gradient raises: differentiating them again
    (a second-order gradient) fails where it is asked for, with `SECOND_ORDER_MESSAGE`.

    The identity also takes `sources`, the custom gradient's inputs as the caller passed
    them: the gradients are computed from copies no tape sees, so without this link an
    outer tape would take them for constants and return no second-order gradient at all,
    silently."""
    if not grads:
        return []

    @tf.custom_gradient
    def identity(*values):
        def second_order(*unused):
            if _in_save_context():
                # tf.saved_model.save traces every custom gradient it finds; the export must
                # not fail, so the saved second-order gradient fails when it runs instead.
                return _failing_gradients(SECOND_ORDER_MESSAGE, values)
            raise NotImplementedError(SECOND_ORDER_MESSAGE)

        return tuple(tf.identity(v) for v in values[:len(grads)]), second_order

    return list(identity(*grads, *sources))


def _in_save_context() -> bool:
    """Whether `tf.saved_model.save` is tracing (save_context.in_save_context, a TensorFlow
    internal; `tests/test_internals.py` checks it; without it an export that contains a
    gradient through the layer fails, naming the second-order limitation)."""
    try:
        from tensorflow.python.saved_model import save_context

        return save_context.in_save_context()
    except (ImportError, AttributeError):  # pragma: no cover - internal API moved
        return False


def _or_empty(tensor):
    return tf.zeros([0]) if tensor is None else tensor


def _eager_sweeps(program, plan, store, segments_, return_sequences, need_dx, inputs):
    """The sweeps as traced functions, cached per plan: eagerly, the loops would dispatch
    every op of every step from Python (~0.1 s a step, measured). The stored states pass
    from one to the other as plain tensors (`store.flows`)."""
    cache = program.__dict__.setdefault("_eager_sweeps", {})
    key = (plan, type(store), return_sequences, need_dx, inputs.go_backwards,
           len(inputs.sides))
    if key in cache:
        return cache[key]
    locations = store.locations
    go_backwards = inputs.go_backwards

    def step_inputs(xs, sides, params, constants):
        return sweeps.StepInputs(xs, list(sides), list(params),
                                 list(constants), go_backwards, tf.shape(xs)[0])

    @tf.function(autograph=False)
    def forward(xs, sides, carry0, params, constants):
        last_output, outputs, final_carry, state = sweeps.forward_sweep(
            program, store, locations, step_inputs(xs, sides, params, constants),
            list(carry0), return_sequences, plan.num_steps)
        return (last_output, outputs if return_sequences else tf.zeros([0]), final_carry,
                store.flows(state))

    @tf.function(autograph=False)
    def backward(xs, sides, params, constants, flows, final_carry, d_final_carry,
                 d_outputs, d_last):
        dxs, d_carry0, d_params = _plan_gradient(
            program, plan, store, segments_, step_inputs(xs, sides, params, constants),
            store.from_flows(flows), list(final_carry), list(d_final_carry),
            d_outputs if return_sequences else d_last, return_sequences, need_dx)
        return (dxs if need_dx else tf.zeros([0])), d_carry0, d_params

    def forward_call(*args):
        last_output, outputs, final_carry, flows = forward(*args)
        return last_output, (outputs if return_sequences else None), final_carry, flows

    def backward_call(*args):
        dxs, d_carry0, d_params = backward(*args)
        return (dxs if need_dx else None), d_carry0, d_params

    cache[key] = (forward_call, backward_call)
    return cache[key]
