"""`MemoryEfficientRNN`: a Keras 3 RNN layer that trains within a memory budget."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell
from keras.src.layers.rnn.stacked_rnn_cells import StackedRNNCells

from tf_membptt import executor
from tf_membptt.budget import format_bytes, parse_budget
from tf_membptt.planner import alpha_units, minimum_memory_slots, plan as make_plan
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

    **Inference.** Without training (``training=False``, `predict`, a served SavedModel) the
    layer runs a plain forward loop that stores nothing, for any batch size and length.

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
        **kwargs: `keras.layers.Layer` arguments (``name``, ``dtype``, ...).

    Call arguments:
        sequences: a ``(batch, timesteps, features)`` tensor.
        initial_state: optional list of initial state tensors.
        mask: optional ``(batch, timesteps)`` boolean mask (padding may be anywhere).
        training: whether the call is in training mode (dropout, and the planned gradient).

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
                 zero_output_for_mask=False, unroll=False, alpha=None, **kwargs):
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
        super().__init__(cell, return_sequences=return_sequences, return_state=return_state,
                         go_backwards=go_backwards, stateful=stateful, unroll=False,
                         zero_output_for_mask=zero_output_for_mask, **kwargs)
        self.memory_budget = memory_budget
        self.strategy = strategy
        self.alpha = alpha
        self._programs = {}
        self.last_plan = None
        self.step_alpha = None

    # ------------------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.pop("unroll", None)
        config.update(memory_budget=self.memory_budget, strategy=self.strategy,
                      alpha=self.alpha)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config.pop("unroll", None)
        cell = config.pop("cell")
        if isinstance(cell, dict):
            cell = keras.saving.deserialize_keras_object(cell, custom_objects=custom_objects)
        return cls(cell, **config)

    # ------------------------------------------------------------------------------------
    def inner_loop(self, sequences, initial_state, mask, training=False):
        training = _static_bool(training)
        if isinstance(sequences, (list, tuple, dict)):
            raise NotImplementedError(
                "MemoryEfficientRNN takes one input tensor per step; for nested inputs use "
                "keras.layers.RNN.")
        initial_state = list(initial_state) if isinstance(initial_state, (list, tuple)) \
            else [initial_state]
        state_structure = initial_state
        # Tensors, not variables: a stateful layer passes its state variables here.
        flat_states = [tf.convert_to_tensor(s) for s in keras.tree.flatten(initial_state)]
        carries_output = mask is not None and not self.zero_output_for_mask

        # The executor reads each step's input from the batch-major sequence (no
        # time-major copy of the whole input); masks are small, so they are made
        # time-major, in processing order.
        xs = sequences
        num_steps_static = sequences.shape[1]
        batch = tf.shape(sequences)[0]
        if mask is not None:
            masks = tf.transpose(tf.cast(mask, tf.bool), [1, 0])
        else:
            masks = tf.ones(tf.stack([tf.shape(xs)[1], batch]), tf.bool)
        if self.go_backwards:
            masks = tf.reverse(masks, [0])

        weights_vars = list(self.cell.trainable_variables)
        weight_values = [tf.convert_to_tensor(v.value) for v in weights_vars]
        other_vars = [v for v in self.cell.variables
                      if not any(v is w for w in weights_vars)]
        dropout_holders, dropout_values = _collect_dropout_masks(self.cell)
        extras = [tf.convert_to_tensor(v.value) for v in other_vars] + dropout_values

        program = self._program(training, xs, flat_states, carries_output, weights_vars,
                                weight_values, other_vars, extras, dropout_holders,
                                state_structure, mask is not None)
        carry0 = list(flat_states)
        if carries_output:
            carry0.append(tf.zeros(tf.concat([[batch], program.carry_specs[-1].shape[1:]], 0),
                                   program.carry_specs[-1].dtype))

        if training and num_steps_static is None:
            raise ValueError(
                "MemoryEfficientRNN plans its training step when it is traced and needs a "
                "static number of timesteps: give the input a fixed length (e.g. "
                "`keras.Input(shape=(T, features))`). Inference accepts any length. "
                f"Received: sequences.shape={tuple(sequences.shape)}")
        if training:
            the_plan = self._make_plan(program, num_steps_static, sequences.shape[0])
            last_output, outputs, carry = executor.run_planned(
                program, the_plan, xs, masks, carry0, weight_values, extras,
                self.return_sequences, self.go_backwards)
        else:
            last_output, outputs, carry = executor.run_plain(
                program, xs, masks, carry0, weight_values, extras, self.return_sequences,
                self.go_backwards)
        new_states = carry[:len(flat_states)]
        new_states = keras.tree.pack_sequence_as(state_structure, new_states)
        if outputs is None:
            outputs = tf.expand_dims(last_output, 1)
        else:
            outputs = tf.transpose(outputs, [1, 0] + list(range(2, len(outputs.shape))))
        return last_output, outputs, new_states

    # ------------------------------------------------------------------------------------
    def _program(self, training, xs, flat_states, carries_output, weights_vars,
                 weight_values, other_vars, extras, dropout_holders, state_structure,
                 has_mask):
        def spec(t):
            return tf.TensorSpec([None] + list(t.shape[1:]), t.dtype)

        num_other = len(other_vars)
        x_spec = spec(xs[:, 0])
        state_specs = [spec(s) for s in flat_states]
        weight_specs = [tf.TensorSpec(w.shape, w.dtype) for w in weight_values]
        # Variable values have fixed shapes; dropout masks have a batch dimension.
        extra_specs = [spec(e) if i >= num_other else tf.TensorSpec(e.shape, e.dtype)
                       for i, e in enumerate(extras)]
        key = (training, carries_output, has_mask, x_spec, tuple(state_specs),
               tuple(weight_specs), tuple(extra_specs))
        if key in self._programs:
            return self._programs[key]
        cell = self.cell
        all_vars = weights_vars + other_vars
        zero_output = self.zero_output_for_mask
        num_states = len(flat_states)
        cell_kwargs = {}
        if getattr(cell, "_call_has_training_arg", False):
            cell_kwargs["training"] = training

        def step_fn(x, mask_t, carry, weights, step_extras):
            variable_values = list(weights) + list(step_extras[:num_other])
            mask_values = list(step_extras[num_other:])
            states = keras.tree.pack_sequence_as(state_structure, carry[:num_states])
            with _DropoutMasks(dropout_holders, mask_values):
                with keras.StatelessScope(state_mapping=list(zip(all_vars, variable_values))):
                    output, new_states = cell(x, states, **cell_kwargs)
            new_flat = keras.tree.flatten(new_states)
            if has_mask:
                new_flat = [tf.where(_expand(mask_t, n), n, tf.cast(s, n.dtype))
                            for n, s in zip(new_flat, carry[:num_states])]
                previous = tf.zeros_like(output) if zero_output else carry[num_states]
                output = tf.where(_expand(mask_t, output), output, previous)
            new_carry = list(new_flat) + ([output] if carries_output else [])
            return output, new_carry

        carry_specs = list(state_specs)
        if carries_output:
            # The previous output is part of the carry: masked steps repeat it.
            output_size = getattr(cell, "output_size", None) or self.state_size[0]
            if not isinstance(output_size, int):
                raise NotImplementedError(
                    "With a mask, the cell's `output_size` must be an int; received "
                    f"output_size={output_size!r}. Use keras.layers.RNN for this cell.")
            carry_specs.append(tf.TensorSpec([None, output_size], flat_states[0].dtype))
        program = executor.StepProgram(step_fn, x_spec, carry_specs, weight_specs,
                                       extra_specs)
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
        itemsize = program.dtype.size
        hidden_bytes = (None if batch_size is None
                        else program.hidden_size * itemsize * int(batch_size))
        slots = self._budget.slots(num_steps=num_steps, alpha=alpha, hidden_bytes=hidden_bytes)
        if self._budget.kind == "unlimited":
            # No limit: leave room for what the planner charges an internal state (alpha
            # rounded up to a multiple of 1/q), so that peak_memory <= memory_slots and
            # msm/hsm/ism can store every internal state.
            units, per_slot = alpha_units(alpha)
            charged = units / per_slot
            if self.strategy in ("full", "chen"):
                slots = minimum_memory_slots(num_steps, self.strategy, charged)
            else:
                slots = max(slots, 1.0 + charged * num_steps)
        # Under XLA the executor's buffer has a scratch area of one state (see
        # executor._FlatStore): it comes out of the budget, so the plan gets the rest.
        reserved = (executor.scratch_slots(alpha, self.strategy)
                    if executor.in_xla_context() else 0.0)
        if self._budget.kind == "unlimited":
            slots += reserved
        minimum = minimum_memory_slots(num_steps, self.strategy, alpha) + reserved
        if slots < minimum - 1e-9:
            if self._budget.kind == "bytes":
                least = f"{int(np.ceil(minimum * hidden_bytes))} bytes " \
                        f"({format_bytes(minimum * hidden_bytes)})"
            elif self._budget.kind == "fraction":
                least = f"{minimum / (alpha * num_steps):.6g} (a fraction)"
            else:
                least = f"'slots:{minimum:g}'"
            raise ValueError(
                f"Argument `memory_budget` is below the least feasible budget for this layer "
                f"(strategy={self.strategy!r}, {num_steps} steps, alpha={alpha:.4g}): it gives "
                f"{slots:.4g} hidden-state slots, and the minimum is {minimum:g} slots"
                + (f" (including {reserved:g} for the XLA executor's scratch state)"
                   if reserved else "")
                + f", i.e. memory_budget={least}. Received: "
                f"memory_budget={self.memory_budget!r}")
        the_plan = make_plan(num_steps, slots - reserved, strategy=self.strategy, alpha=alpha)
        self.last_plan = the_plan
        return the_plan


class _DropoutMasks:
    """Temporarily sets the cells' cached dropout masks to the given tensors, so that the
    traced step reads them as inputs (the same masks in the first sweep and every
    recomputation)."""

    def __init__(self, holders, values):
        self.holders, self.values = holders, values

    def __enter__(self):
        self.saved = [(cell, attr, getattr(cell, attr, None)) for cell, attr, _ in self.holders]
        index = 0
        for cell, attr, count in self.holders:
            if count is None:
                setattr(cell, attr, self.values[index])
                index += 1
            else:
                setattr(cell, attr, list(self.values[index:index + count]))
                index += count

    def __exit__(self, *exc):
        for cell, attr, value in self.saved:
            setattr(cell, attr, value)


def _collect_dropout_masks(cell):
    """The dropout masks that keras.layers.RNN.call drew for this call, as flat tensors."""
    holders, values = [], []
    cells = cell.cells if isinstance(cell, StackedRNNCells) else [cell]
    for c in cells:
        if isinstance(c, StackedRNNCells):
            sub_holders, sub_values = _collect_dropout_masks(c)
            holders += sub_holders
            values += sub_values
            continue
        if not isinstance(c, DropoutRNNCell):
            continue
        for attr in ("_dropout_mask", "_recurrent_dropout_mask"):
            value = getattr(c, attr, None)
            if value is None:
                continue
            if isinstance(value, (list, tuple)):
                holders.append((c, attr, len(value)))
                values += list(value)
            else:
                holders.append((c, attr, None))
                values.append(value)
    return holders, values


def _expand(mask_t, like):
    # tf.where broadcasts; reading like's shape would make the mask depend on the carry.
    return tf.reshape(mask_t, [-1] + [1] * (len(like.shape) - 1))


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
