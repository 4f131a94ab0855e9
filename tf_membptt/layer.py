"""`MemoryEfficientRNN`: a Keras 3 RNN layer that trains within a memory budget."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tf_membptt import executor
from tf_membptt.budget import parse_budget, planning_slots
from tf_membptt.cell_step import CellStep, read_raw, signature_for
from tf_membptt.planner import plan as make_plan
from tf_membptt.schedule import STRATEGIES


@keras.saving.register_keras_serializable(package="tf_membptt")
class MemoryEfficientRNN(keras.layers.RNN):
    """Recurrent layer trained with memory-efficient backpropagation through time.

    A drop-in replacement for `keras.layers.RNN(cell)`: the same outputs and exactly the
    gradients of standard BPTT, while a training step keeps only the hidden states and
    internal states that a plan allows, recomputing the rest (Gruslys et al.,
    "Memory-Efficient Backpropagation Through Time", NeurIPS 2016).

    **The trade-off.** Standard BPTT keeps, for every step, the step's *internal state*:
    everything its backward needs (for an LSTM: the gates, the cell state and the previous
    state). This layer's memory for stored states is about
    ``slots x (bytes of one hidden state)``, where the budget fixes ``slots``. With more
    budget, fewer steps are recomputed. At 5% of standard BPTT's memory, a 1000-step
    sequence costs about 1.95 forward evaluations per step instead of 1 (about 1.32x the
    time of a training step, when a backward step costs two forward steps); at 20% about
    1.3; at 100% none. `python -m tf_membptt plan --num-steps T --budget 5% --plot c.png`
    prints any plan and draws the whole cost–memory curve, so you can choose a budget.

    **Strategies.** ``"msm"`` (default) mixes stored hidden states and stored internal
    states and is never worse than the others; ``"hsm"`` stores hidden states only
    (Revolve: the least memory per slot, more recomputation); ``"ism"`` internal states only;
    ``"full"`` is standard BPTT and ``"chen"`` ``sqrt(T)`` recompute segments (baselines).

    **How sizes are measured.** The layer traces one step of the cell and reads its
    gradient graph: the tensors a step's backward reads are the internal state (plus the new
    hidden state, a restart point). ``alpha`` = elements of an internal state / elements of
    a hidden state, for this cell and dtype (`step_alpha` after the first call); pass
    `alpha` to plan with a larger value.

    **How it is called.** Any gradient taken through the layer runs the plan, whatever
    `training` says (it keeps its Keras meaning: dropout and friends): `model.fit`, a
    custom loop with or without ``training=True``, ``training=False`` under a tape,
    graph-mode `tf.gradients`, XLA. Where no gradient can be taken (`predict`, serving, a
    call outside any tape) the layer stores nothing and runs no analysis of the cell, for
    any batch size and length.

    **Sequence losses.** With `loss` (and usually `head`), the per-step head and loss run
    inside the recurrence: ``layer(x, targets=y)`` returns the loss per sample and adds
    its mean to the layer's losses (so `model.fit` trains on it), and no ``(batch, T,
    units)`` or ``(batch, T, vocabulary)`` tensor is ever built; recomputed steps
    recompute the head too. Without `targets` the layer returns the head's outputs
    (e.g. logits for sampling), as `keras.layers.RNN(cell)` followed by `head` would.

    Args:
        cell: a Keras RNN cell (`LSTMCell`, `GRUCell`, `SimpleRNNCell`, a custom cell with
            ``call(inputs, states, training=None)`` and a (possibly nested) ``state_size``),
            a `StackedRNNCells`, or a list of cells (stacked).
        memory_budget: memory for stored states during training:
            a float in ``(0, 1]``: a fraction of the memory standard BPTT needs for this
            layer and sequence (default ``0.05``); or bytes for the whole batch, as an int or
            a string with units (``"64MiB"``, ``"1.5GB"``); or ``"slots:N"``, ``N`` hidden
            states (``h_0`` included); or ``None``: no limit. The budget never rounds up:
            a budget below the least feasible one raises ``ValueError`` naming it.
        strategy: ``"msm"``, ``"hsm"``, ``"ism"``, ``"full"`` or ``"chen"``.
        return_sequences: return the whole output sequence, not only the last output.
        return_state: also return the final states.
        go_backwards: process the sequence backwards and return the reversed sequence.
        stateful: carry the last states of a batch over to the next batch.
        zero_output_for_mask: masked steps output zeros instead of the previous output.
        unroll: only ``False`` is supported.
        alpha: optional internal-state size in hidden-state units used for planning; must
            be at least the measured one (`step_alpha`).
        head: optional Keras layer applied to each step's output (e.g.
            ``keras.layers.Dense(vocabulary)``).
        loss: optional Keras loss (an instance, e.g.
            ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``, or an
            identifier for `keras.losses.get`) between each step's target and its (head's)
            output; see `targets` below.
        **kwargs: `keras.layers.Layer` arguments (``name``, ``dtype``, ...).

    Call arguments:
        sequences: a ``(batch, timesteps, features)`` tensor.
        initial_state: optional list of initial state tensors.
        mask: optional ``(batch, timesteps)`` boolean mask (padding may be anywhere).
        training: whether the call is in training mode (dropout and friends; the planned
            gradient runs whenever a gradient is taken).
        targets: with `loss`, a ``(batch, timesteps, ...)`` tensor of per-step targets
            (in input order). The layer then returns the loss per sample, ``(batch,)``: the
            mean of the per-step losses over the unmasked steps (with `return_state`, then
            the final states), and adds the token mean over the batch to its losses.

    Training needs a static number of timesteps (the plan is made when the step is traced);
    a bytes budget also needs a static batch size. Inference accepts any shapes.

    Example:

    ```python
    layer = MemoryEfficientRNN(keras.layers.LSTMCell(256), memory_budget=0.05)
    model = keras.Sequential([keras.Input((1000, 32)), layer, keras.layers.Dense(1)])
    model.compile("adam", "mse")
    model.fit(x, y)
    print(layer.last_plan.describe())
    ```
    """

    def __init__(self, cell, memory_budget=0.05, *, strategy="msm", return_sequences=False,
                 return_state=False, go_backwards=False, stateful=False,
                 zero_output_for_mask=False, unroll=False, alpha=None, head=None, loss=None,
                 **kwargs):
        if unroll:
            raise NotImplementedError(
                "MemoryEfficientRNN does not unroll (unrolling keeps every step's internal "
                "state, which is what this layer avoids). Use keras.layers.RNN(cell, "
                "unroll=True) for short sequences. Received: unroll=True")
        if not isinstance(strategy, str) or strategy not in STRATEGIES:
            raise ValueError(
                f"Argument `strategy` must be one of {STRATEGIES}. Received: "
                f"strategy={strategy!r}")
        self._budget = parse_budget(memory_budget)
        if alpha is not None:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
                    np.isfinite(alpha) and alpha >= 1):
                raise ValueError(f"Argument `alpha` must be a finite number >= 1 or None. "
                                 f"Received: alpha={alpha!r}")
        if head is not None and not isinstance(head, keras.layers.Layer):
            raise TypeError(f"Argument `head` must be a Keras layer or None. Received: "
                            f"head={head!r}")
        loss_fn = None
        if loss is not None:
            try:
                loss_fn = keras.losses.get(loss)
            except (ValueError, TypeError) as error:
                raise ValueError(f"Argument `loss` must be a Keras loss or an identifier "
                                 f"for keras.losses.get. Received: loss={loss!r}") from error
            if loss_fn is None:
                raise ValueError(f"Argument `loss` must be a Keras loss or an identifier "
                                 f"for keras.losses.get. Received: loss={loss!r}")
        super().__init__(cell, return_sequences=return_sequences, return_state=return_state,
                         go_backwards=go_backwards, stateful=stateful, unroll=False,
                         zero_output_for_mask=zero_output_for_mask, **kwargs)
        self.head = head
        self.loss = loss_fn
        self.memory_budget = memory_budget
        self.strategy = strategy
        self.alpha = alpha
        self._steps = {}
        self._programs = {}
        self.last_plan = None
        self.step_alpha = None

    # ------------------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.pop("unroll", None)
        config.update(memory_budget=self.memory_budget, strategy=self.strategy,
                      alpha=self.alpha)
        if self.head is not None:
            config["head"] = keras.saving.serialize_keras_object(self.head)
        if self.loss is not None:
            config["loss"] = keras.saving.serialize_keras_object(self.loss)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config.pop("unroll", None)
        for key in ("cell", "head", "loss"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects)
        cell = config.pop("cell")
        return cls(cell, **config)

    def build(self, sequences_shape, initial_state_shape=None, targets_shape=None):
        super().build(sequences_shape, initial_state_shape)
        if self.head is not None and not self.head.built:
            self.head.build((sequences_shape[0], self._cell_output_size()))

    def _cell_output_size(self):
        output_size = getattr(self.cell, "output_size", None)
        return self.state_size[0] if output_size is None else output_size

    def compute_output_shape(self, sequences_shape, initial_state_shape=None,
                             targets_shape=None):
        shapes = super().compute_output_shape(sequences_shape, initial_state_shape)
        output, states = (shapes[0], list(shapes[1:])) if self.return_state else (shapes, [])
        if targets_shape is not None:
            output = (sequences_shape[0],)
        elif self.head is not None:
            head_shape = tuple(self.head.compute_output_shape(
                (sequences_shape[0], self._cell_output_size())))
            output = (output[:2] + head_shape[1:]) if self.return_sequences else head_shape
        return (output, *states) if self.return_state else output

    def call(self, sequences, initial_state=None, mask=None, training=False, targets=None):
        if targets is not None and self.loss is None:
            raise ValueError(
                "Argument `targets` needs the layer's `loss` (e.g. MemoryEfficientRNN(cell, "
                "head=keras.layers.Dense(vocabulary), loss=keras.losses."
                "SparseCategoricalCrossentropy(from_logits=True))). Received: "
                f"targets={targets!r} with loss=None")
        self._targets = targets
        try:
            return super().call(sequences, initial_state=initial_state, mask=mask,
                                training=training)
        finally:
            self._targets = None

    # ------------------------------------------------------------------------------------
    def inner_loop(self, sequences, initial_state, mask, training=False):
        training = _static_bool(training)
        if isinstance(sequences, (list, tuple, dict)):
            raise NotImplementedError(
                "MemoryEfficientRNN takes one input tensor per step; for nested inputs use "
                "keras.layers.RNN.")
        state_structure = (list(initial_state) if isinstance(initial_state, (list, tuple))
                           else [initial_state])
        # Tensors, not variables: a stateful layer passes its state variables here.
        flat_states = [tf.convert_to_tensor(s) for s in tf.nest.flatten(state_structure)]
        targets = getattr(self, "_targets", None)
        has_mask = mask is not None
        # A masked step repeats the last output; with a loss, masked steps count no loss
        # and the outputs are not returned.
        carries_output = has_mask and not self.zero_output_for_mask and targets is None
        step, discovery = self._cell_step(sequences, flat_states, state_structure, training,
                                          has_mask, carries_output, targets is not None)
        # Read once per call, outside the loops, in the variables' own dtypes; a tape
        # watching the variables sees these reads.
        params = [read_raw(v) for v in step.read]
        variable_states = [read_raw(v) for v in step.assigned]
        gradient_possible = executor.watched([sequences] + flat_states + params)
        if tf.executing_eagerly() and not gradient_possible and targets is None:
            # No gradient can be taken: keras.layers.RNN's own loop, exactly (and the
            # head after it, as it would follow keras.layers.RNN).
            last_output, outputs, states = super().inner_loop(sequences, initial_state, mask,
                                                              training=training)
            if self.head is not None:
                last_output, outputs = step._head(last_output), step._head(outputs)
            return last_output, outputs, states

        num_steps = sequences.shape[1]
        dynamic_length_error = ValueError(
            "A gradient through MemoryEfficientRNN needs a static number of timesteps: the "
            "layer plans its recomputation when the training step is traced. Give the "
            "input a fixed length (e.g. `keras.Input(shape=(T, features))`). Inference "
            f"accepts any length. Received: sequences.shape={tuple(sequences.shape)}")
        if gradient_possible and num_steps is None:
            raise dynamic_length_error
        batch = tf.shape(sequences)[0]
        # Side inputs, time-major in processing order (small: one bool or target per row
        # and step): the mask bits, the targets.
        sides = []
        if has_mask:
            sides.append(self._time_major(tf.cast(mask, tf.bool)))
        if targets is not None:
            sides.append(self._time_major(tf.convert_to_tensor(targets)))
        cell_output_spec = discovery.cell_output_spec
        carry0 = list(flat_states)
        if carries_output:
            carry0.append(tf.zeros(tf.concat([[batch], cell_output_spec.shape[1:]], 0),
                                   cell_output_spec.dtype))
        loss_parts = []
        if targets is not None:  # the loss summed over the steps, and the steps counted
            loss_parts = [tf.zeros(tf.stack([batch, 1]), tf.float32),
                          tf.zeros(tf.stack([batch, 1]), tf.int32)]
        carry0 += loss_parts + variable_states
        offset = step.variables_offset
        if step.assigned:
            # keras.layers.RNN calls the cell once more before its loop, on the first input
            # and the initial states, to learn the output's shape; the call's variable
            # updates stay (a seed generator advances, a counter counts). So here too.
            time_zero_sides = [tf.ones_like(side[0]) if k == 0 and has_mask else side[0]
                               for k, side in enumerate(sides)]
            _, time_zero = step(sequences[:, 0], time_zero_sides, carry0, params)
            carry0 = carry0[:offset] + list(time_zero[offset:])
        signature = signature_for(
            _spec(sequences[:, 0]), [_spec(side[0]) for side in sides],
            [_spec(s) for s in flat_states],
            tf.TensorSpec(sequences.shape[:1].concatenate(cell_output_spec.shape[1:]),
                          cell_output_spec.dtype),
            carries_output, [_spec(p) for p in loss_parts],
            [_spec(v) for v in variable_states], [_spec(p) for p in params],
            sequences.shape[0])
        step_output_spec = (tf.TensorSpec([sequences.shape[0], 1], tf.float32)
                            if targets is not None else discovery.output_spec)
        return_sequences = self.return_sequences and targets is None
        inputs = executor.StepInputs(sequences, sides, params, list(discovery.captured),
                                     self.go_backwards, batch)

        def prepare():
            if num_steps is None:
                raise dynamic_length_error
            program = self._program(step, signature, discovery)
            return program, self._make_plan(program, num_steps, sequences.shape[0])

        if not gradient_possible and discovery.captured and num_steps is not None:
            # The cell holds per-call tensors (e.g. dropout masks, which keras.layers.RNN
            # clears after the call): a gradient asked for later must trace the cell now,
            # as it is. An error waits for the gradient (inference must not fail).
            try:
                prepared = prepare()
                prepare = lambda: prepared  # noqa: E731
            except (NotImplementedError, ValueError) as error:
                def prepare(error=error):
                    raise error

        if gradient_possible:
            program, plan = prepare()
            # Eagerly, a tape that does not watch the input now never will. While a
            # function is traced, its input may still be differentiated from outside (a
            # tape around the function's call), so the input gradient is always built.
            need_dx = sequences.dtype.is_floating and (
                not tf.executing_eagerly() or executor.watched([sequences]))
            last_output, outputs, carry = executor.run_planned(
                program, plan, inputs, carry0, return_sequences, need_dx)
        elif tf.executing_eagerly():  # (a loss evaluated eagerly): nothing to defer
            last_output, outputs, carry = executor.run_plain(
                step, inputs, carry0, signature_output_spec(signature, step_output_spec),
                return_sequences)
        else:
            last_output, outputs, carry = executor.run_deferred(
                step, prepare, inputs, carry0,
                signature_output_spec(signature, step_output_spec), return_sequences,
                signature.carry_differentiable, signature.param_differentiable)
        # The cell's variable updates, applied once, with the values keras.layers.RNN would
        # leave after its T steps.
        for variable, value in zip(step.assigned, carry[offset:]):
            variable.assign(value)
        new_states = tf.nest.pack_sequence_as(state_structure, carry[:len(flat_states)])
        if targets is not None:
            loss_sum, count = carry[offset - 2:offset]
            per_sample = loss_sum[:, 0] / tf.cast(tf.maximum(count[:, 0], 1), tf.float32)
            # The mean over every unmasked step of the batch (as a Keras loss over the
            # output sequence would average it), for model.fit.
            self.add_loss(tf.reduce_sum(loss_sum) / tf.cast(
                tf.maximum(tf.reduce_sum(count), 1), tf.float32))
            return per_sample, per_sample, new_states
        if outputs is None:  # (as keras.layers.RNN: the last output as a sequence)
            outputs = tf.expand_dims(last_output, 1)
        return last_output, outputs, new_states

    def _time_major(self, sequence):
        """A ``(batch, T, ...)`` side input as ``(T, batch, ...)``, in processing order."""
        sequence = tf.transpose(sequence, [1, 0] + list(range(2, len(sequence.shape))))
        return tf.reverse(sequence, [0]) if self.go_backwards else sequence

    # ------------------------------------------------------------------------------------
    def _cell_step(self, sequences, flat_states, state_structure, training, has_mask,
                   carries_output, with_loss=False):
        """The cell as a step function, and what tracing it found (cached per input
        signature; traced again each call when the cell captures tensors, e.g. dropout
        masks drawn for this call)."""
        input_spec = _spec(sequences[:, 0])
        state_specs = [_spec(s) for s in flat_states]
        key = (training, has_mask, carries_output, with_loss, input_spec, tuple(state_specs),
               tf.nest.map_structure(lambda _: 0, state_structure).__repr__())
        cached = self._steps.get(key)
        if cached is not None and not cached[1].captured:
            return cached
        loss = None
        if with_loss:  # the loss per sample: a Keras Loss's call, before its reduction
            loss = self.loss.call if isinstance(self.loss, keras.losses.Loss) else self.loss
        step = cached[0] if cached is not None else CellStep(
            self.cell, state_structure, training, has_mask, carries_output,
            self.zero_output_for_mask, head=self.head, loss=loss)
        discovery = step.discover(input_spec, state_specs)
        self._steps[key] = (step, discovery)
        return step, discovery

    def _program(self, step, signature, discovery):
        constant_specs = tuple(_spec(c, batched=False) for c in discovery.captured)
        xla = executor.in_xla_context()
        key = (id(step), signature, constant_specs, xla)
        program = self._programs.get(key)
        if program is None:
            program = executor.StepProgram(step, signature, xla=xla)
            if [tuple(s.shape) for s in program.constant_specs] != \
                    [tuple(s.shape) for s in constant_specs]:
                raise AssertionError("the cell captured different tensors in two traces")
            self._programs[key] = program
        self.step_alpha = program.alpha
        return program

    def _make_plan(self, program, num_steps, batch_size):
        alpha = program.alpha
        if self.alpha is not None:
            if self.alpha < alpha - 1e-9:
                raise ValueError(
                    f"Argument `alpha` must be at least the measured internal-state size of "
                    f"this cell, {alpha:g} hidden states, or the budget would be exceeded. "
                    f"Received: alpha={self.alpha!r}")
            alpha = float(self.alpha)
        hidden_bytes = None if batch_size is None else program.hidden_bytes(int(batch_size))
        # Under XLA the executor's flat buffers keep one internal state of scratch (see
        # executor.StackStore): it comes out of the budget, so the plan gets the rest.
        reserved = executor.scratch_slots(alpha) if executor.in_xla_context() else 0.0
        slots = planning_slots(self._budget, num_steps=num_steps, alpha=alpha,
                               strategy=self.strategy, hidden_bytes=hidden_bytes,
                               reserved_slots=reserved)
        the_plan = make_plan(num_steps, slots, strategy=self.strategy, alpha=alpha)
        self.last_plan = the_plan
        return the_plan


def signature_output_spec(signature, output_spec):
    """One step's output spec, batch dimension as in the signature."""
    return tf.TensorSpec(tf.TensorShape([signature.batch_size]).concatenate(
        output_spec.shape[1:]), output_spec.dtype)


def _spec(tensor, batched=True):
    """The spec of a tensor as a step sees it (the batch dimension static when known)."""
    return tf.TensorSpec(tensor.shape, tensor.dtype)


def _static_bool(training):
    if training is None:
        return False
    if isinstance(training, (bool, np.bool_)):
        return bool(training)
    value = tf.get_static_value(training)
    if value is None:
        raise NotImplementedError(
            "MemoryEfficientRNN needs `training` to be a Python bool (or a constant) when it "
            "is traced; received a symbolic value. Call the layer with training=True/False.")
    return bool(value)
