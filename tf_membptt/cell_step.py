"""A Keras RNN cell as a pure step function of tensors.

The executor can only replay a step that is a function of its arguments: recomputing a
step must neither repeat its side effects nor see different random numbers. `CellStep`
makes one out of any Keras cell, the way `keras.StatelessScope` is meant to be used:

* every Keras variable the cell *reads* becomes a parameter tensor, read once per call
  outside the loops, in its own dtype (the cell autocasts it, as it would inside
  `keras.layers.RNN`); weights the cell does not own (tied embeddings, a shared matrix)
  are found the same way, so they get their gradients too;
* every Keras variable the cell *assigns* (a `SeedGenerator`'s state, a counter, a
  metric's accumulators) becomes a part of the carry: its value is threaded from step to
  step, restored with the hidden state (so a recomputed step draws exactly the random
  numbers of the first sweep), and assigned to the variable once, after the loop, with
  the value `keras.layers.RNN` would have left;
* a loss added inside the cell (`add_loss`) is refused: the step runs more than once.

The variables are found by tracing the cell once under `_RecordingScope`, a
`keras.StatelessScope` that records each variable it is asked for (`discover`).
`tests/test_internals.py` checks that Keras still routes reads and assignments through the
scope, so that a release that changes it fails loudly.
"""

from __future__ import annotations

import dataclasses
import inspect

import keras
import tensorflow as tf

from tf_membptt.executor.step_program import StepSignature


class _RecordingScope(keras.StatelessScope):
    """A stateless scope whose variables are given as `values` (variable -> tensor).

    With `discover=True`, a variable it does not know gets a placeholder and is recorded;
    otherwise an unknown variable is an error (the cell touched a variable the step was
    not built for). Assignments are recorded, never applied."""

    def __init__(self, values, discover=False):
        super().__init__(collect_losses=True, initialize_variables=False)
        # Set directly: the constructor would cast each value to `variable.dtype`, which
        # is the *autocast* dtype inside a mixed-precision layer; the cell casts itself.
        self.variables = []  # every variable seen, in order of first use
        self.assigned = []
        self._discover = discover
        for variable, value in values:
            self.state_mapping[id(variable)] = value
            self.variables.append(variable)

    def get_current_value(self, variable):
        value = super().get_current_value(variable)
        if value is None:
            if not self._discover:
                raise RuntimeError(
                    f"The cell read variable {variable.path!r}, which it did not read when "
                    "MemoryEfficientRNN traced it: a cell must touch the same variables at "
                    "every step.")
            value = tf.compat.v1.placeholder(raw_dtype(variable), variable.shape)
            self.state_mapping[id(variable)] = value
        if not any(v is variable for v in self.variables):
            self.variables.append(variable)
        return value

    def add_update(self, update):
        variable, _ = update
        if not any(v is variable for v in self.variables):
            if not self._discover:
                raise RuntimeError(
                    f"The cell assigned variable {variable.path!r}, which it did not touch "
                    "when MemoryEfficientRNN traced it.")
            self.variables.append(variable)
        if not any(v is variable for v in self.assigned):
            self.assigned.append(variable)
        super().add_update(update)


def call_has_training_arg(cell) -> bool:
    """Whether ``cell.call`` takes `training` (as `keras.layers.RNN` checks)."""
    try:
        return "training" in inspect.signature(cell.call).parameters
    except (TypeError, ValueError):  # pragma: no cover - a callable without a signature
        return bool(getattr(cell, "_call_has_training_arg", False))


def raw_dtype(variable) -> tf.DType:
    """A Keras variable's own dtype (`variable.dtype` is the autocast one in a layer)."""
    inner = getattr(variable, "_value", None)
    if inner is not None and hasattr(inner, "dtype"):
        return tf.as_dtype(inner.dtype)
    return tf.as_dtype(variable.dtype)  # pragma: no cover - attribute moved


def read_raw(variable) -> tf.Tensor:
    """A Keras variable's value in its own dtype (no autocast): the cell casts it itself.

    Inside a layer's call, `variable.value` is the autocast value; the stored value is
    the underlying TensorFlow variable's. `tests/test_internals.py` checks the attribute."""
    inner = getattr(variable, "_value", None)
    if isinstance(inner, tf.Variable) or hasattr(inner, "read_value"):
        return tf.convert_to_tensor(inner)
    return tf.convert_to_tensor(variable.value)  # pragma: no cover - attribute moved


@dataclasses.dataclass
class Discovery:
    """What tracing the cell once found."""

    read: list  # variables read and never assigned: the step's params
    assigned: list  # variables assigned: carry parts
    captured: list  # tensors captured from outside the step (e.g. dropout masks)
    cell_output_spec: tf.TensorSpec  # one step's output of the cell
    output_spec: tf.TensorSpec  # ... and of the head (the cell's without one)


class CellStep:
    """``step(x, sides, carry, params) -> (output, new_carry)`` for a Keras cell.

    The side inputs are ``[mask bits (with a mask)..., targets (with a loss)...]``. The
    carry is ``[state parts..., previous output (when a mask keeps it)..., loss sum and
    count (with a loss)..., assigned variables' values...]``; `params` are the values of
    the variables the cell (and the head, and the loss) read.

    Args:
        cell: the Keras cell.
        state_structure: the (nested) structure of the cell's states.
        training: the Python bool passed to the cell (when it takes `training`).
        has_mask: whether steps are masked (as `keras.layers.RNN` masks them).
        carries_output: whether the previous output is part of the carry (a mask that
            repeats the last output at masked steps).
        zero_output_for_mask: masked steps output zeros.
        head: a Keras layer applied to each step's output, or None.
        loss: with targets, ``loss(targets_t, output_t)`` per sample (unreduced), summed
            over the unmasked steps in the carry; or None.
    """

    def __init__(self, cell, state_structure, training, has_mask, carries_output,
                 zero_output_for_mask, head=None, loss=None):
        self.cell = cell
        self.state_structure = state_structure
        self.num_states = len(tf.nest.flatten(state_structure))
        self.cell_kwargs = {"training": training} if call_has_training_arg(cell) else {}
        self.head = head
        self.head_kwargs = ({"training": training}
                            if head is not None and call_has_training_arg(head) else {})
        self.loss = loss
        self.has_mask = has_mask
        self.carries_output = carries_output
        self.zero_output_for_mask = zero_output_for_mask
        self.read: list = []
        self.assigned: list = []

    @property
    def num_loss_parts(self) -> int:
        return 2 if self.loss is not None else 0

    @property
    def variables_offset(self) -> int:
        """Where the assigned variables' values start in the carry."""
        return self.num_states + (1 if self.carries_output else 0) + self.num_loss_parts

    def _head(self, cell_output):
        if self.head is None:
            return cell_output
        return self.head(cell_output, **self.head_kwargs)

    # -- discovery -----------------------------------------------------------------------
    def discover(self, input_spec, state_specs) -> Discovery:
        """Traces the cell once (in a scratch graph) and records the variables it reads and
        assigns and the tensors it captures. Raises NotImplementedError for `add_loss`."""
        record = {}

        def trace(x, *states):
            states = tf.nest.pack_sequence_as(self.state_structure, list(states))
            with _RecordingScope([], discover=True) as scope:
                cell_output, _ = self.cell(x, states, **self.cell_kwargs)
                output = self._head(cell_output)
            record["scope"] = scope
            record["specs"] = [tf.TensorSpec(t.shape, t.dtype) for t in (cell_output, output)]
            return []

        wrapped = tf.compat.v1.wrap_function(trace, [input_spec] + list(state_specs))
        scope = record["scope"]
        if scope.losses:
            raise NotImplementedError(
                "The cell calls `add_loss` inside `call`: its step runs more than once "
                "during a MemoryEfficientRNN training step (recomputation), and "
                "`keras.layers.RNN` itself cannot collect a loss from inside its loop in a "
                "compiled function. Compute the loss from the layer's outputs or states "
                "instead (e.g. `return_sequences=True` and a loss on the output, or the "
                "layer's `loss=` and `targets=`), or use keras.layers.RNN with eager "
                "execution.")
        assigned = list(scope.assigned)
        read = [v for v in scope.variables if not any(v is a for a in assigned)]
        for variable in assigned:
            if variable.trainable:
                raise NotImplementedError(
                    f"The cell assigns its trainable variable {variable.path!r} inside "
                    "`call`. MemoryEfficientRNN threads assigned variables through the "
                    "recurrence without gradient (an assignment is not differentiable), "
                    "which would silently drop the gradient `keras.layers.RNN` gives its "
                    "reads. Keep updated values in non-trainable variables or in the "
                    "cell's state, or use keras.layers.RNN for this cell.")
        captured = [external for external, _ in wrapped.graph.captures
                    if external.dtype != tf.resource]
        self.read, self.assigned = read, assigned
        return Discovery(read, assigned, captured, *record["specs"])

    # -- the step ------------------------------------------------------------------------
    def __call__(self, x, sides, carry, params):
        num_states = self.num_states
        mask = sides[0] if self.has_mask else None
        states = tf.nest.pack_sequence_as(self.state_structure, list(carry[:num_states]))
        offset = self.variables_offset
        variable_values = list(carry[offset:])
        values = list(zip(self.read, params)) + list(zip(self.assigned, variable_values))
        with _RecordingScope(values) as scope:
            cell_output, new_states = self.cell(x, states, **self.cell_kwargs)
            new_flat = tf.nest.flatten(new_states)
            if len(new_flat) != num_states:
                raise ValueError(
                    f"The cell returned {len(new_flat)} state tensors; its `state_size` and "
                    f"initial state have {num_states}.")
            if self.has_mask:
                # As keras.layers.RNN: masked steps keep the previous states and repeat
                # the previous output (or output zeros), before any head. Variable updates
                # are not masked: the cell runs at masked steps too.
                new_flat = [tf.where(_expand(mask, n), n, tf.cast(s, n.dtype))
                            for n, s in zip(new_flat, carry[:num_states])]
                previous = (carry[num_states] if self.carries_output
                            else tf.zeros_like(cell_output))
                cell_output = tf.where(_expand(mask, cell_output), cell_output, previous)
            output = self._head(cell_output)
            loss_parts = []
            if self.loss is not None:
                # This step's loss per sample, in float32, summed over the unmasked steps.
                step_loss = tf.cast(tf.reshape(self.loss(sides[-1], output), [-1, 1]),
                                    tf.float32)
                loss_sum, count = carry[offset - 2:offset]
                loss_parts = [loss_sum + step_loss, count + 1]
                if self.has_mask:
                    loss_parts = [tf.where(_expand(mask, n), n, s)
                                  for n, s in zip(loss_parts, (loss_sum, count))]
                output = step_loss
        new_variables = [_current(scope, v, old) for v, old in
                         zip(self.assigned, variable_values)]
        new_carry = (list(new_flat) + ([cell_output] if self.carries_output else [])
                     + loss_parts + new_variables)
        return output, new_carry


def _current(scope, variable, old):
    value = scope.get_current_value(variable)
    return tf.convert_to_tensor(old if value is None else value)


def _expand(mask_t, like):
    # tf.where broadcasts; reading like's shape would make the mask depend on the carry.
    return tf.reshape(mask_t, [-1] + [1] * (len(like.shape) - 1))


def signature_for(input_spec, side_specs, state_specs, cell_output_spec, carries_output,
                  loss_specs, assigned_specs, param_specs, batch_size) -> StepSignature:
    """The executor's view of a `CellStep`'s arguments (`loss_specs`: the loss sum and
    count with a loss, else empty)."""
    output_spec = cell_output_spec
    carry_specs = (list(state_specs) + ([output_spec] if carries_output else [])
                   + list(loss_specs) + list(assigned_specs))
    num_batched = len(state_specs) + (1 if carries_output else 0) + len(loss_specs)
    batched = [True] * num_batched + [False] * len(assigned_specs)
    # The previous output carried through masked steps and the loss sum get gradients
    # like a state; the values of assigned variables do not (an assignment is not
    # differentiable), nor does the count of steps.
    differentiable = ([s.dtype.is_floating for s in state_specs]
                      + ([output_spec.dtype.is_floating] if carries_output else [])
                      + [s.dtype.is_floating for s in loss_specs]
                      + [False] * len(assigned_specs))
    return StepSignature(input_spec=input_spec, side_specs=tuple(side_specs),
                         carry_specs=tuple(carry_specs), carry_batched=tuple(batched),
                         carry_differentiable=tuple(differentiable),
                         param_specs=tuple(param_specs), batch_size=batch_size)
