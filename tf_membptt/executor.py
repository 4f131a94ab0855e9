"""Runs a `Plan` with TensorFlow: one `tf.custom_gradient` around the whole sequence.

How internal states are stored, for any cell
--------------------------------------------
The backward of one step needs some tensors of that step's forward: its *residuals*. We
find them exactly, for any cell, from TensorFlow's own gradient graph: `StepProgram` traces
the step once (in a `tf.compat.v1.wrap_function` graph, with the cell's variables replaced by
placeholders through `keras.StatelessScope`), builds its gradient with `tf.gradients`, and
collects every forward tensor that a gradient op reads. Those are sorted into

* per-step residuals: they depend on the step's carry (``h_{i-1}``); stored in ``I_i``;
* functions of the step inputs alone (``x_i``, the mask bit, weights): recomputed by the
  backward function from the input sequence, never stored;
* invariants: depend on weights only (weights, transposes, casts, constants); computed once
  per call;
* shape-only uses (a `Shape` op reading a forward tensor): fed from static shapes, so the
  tensor itself need not be kept.

An internal state ``I_i`` must serve both as a restart point (``h_i``) and for the backward
of step ``i``. It has one of two layouts, whichever is smaller for the cell:

* residuals: ``h_i`` followed by the per-step residuals;
* compact: the tensors from which ``h_i`` and the residuals follow by cheap ops alone
  (elementwise math, slicing, reductions: `_CHEAP_OPS`), found by walking back from them
  until the carry ``h_{i-1}`` or the output of an expensive op such as a matrix product. For
  an LSTM that is ``h_{i-1}``, ``c_{i-1}`` and ``h_{i-1} @ U``: 3 units of ``(h, c)``
  instead of 4.5 (GRU: 4 units of ``h`` instead of 7). The backward and a restart from
  ``I_i`` recompute the gates elementwise (and ``x_i @ W``, as the residuals layout does).
  An op with control inputs (e.g. a stateful side effect) is never recomputed.

The graph is then cut (`WrappedFunction.prune`) into a forward function that returns the new
carry *and* what an internal state holds, a backward function from that (+ inputs,
invariants, upstream gradients) to the gradients of the inputs, carry and weights, and, for
the compact layout, a function from an internal state to ``h_i``. The cell's alpha is
measured in elements (`StepProgram.internal_size / StepProgram.hidden_size`).

How memory is laid out
----------------------
Every plan allocates its stored states as a stack (see `schedule.py`), slot ``k`` holding
the ``k``-th state from the bottom (``h_0`` is slot 0). In graph and eager mode the stack is
a TensorArray with one element per slot (`_SlotStore`): a store replaces one element and a
FREE empties it, so what is held is exactly the plan's stack. Under XLA it is one flat
``[batch, capacity + scratch]`` buffer (`_FlatStore`), each state at the element offset
fixed by what lies below it; the capacity is the plan's peak in elements, and XLA updates
the buffer in place only under the access pattern `_FlatStore` describes.

The loops
---------
The forward function runs the first sweep (ADVANCE/STORE ops only: one `tf.while_loop` over
steps with a per-step store table). The gradient function runs the rest of the op table as
one `tf.while_loop` over the T backward ops; each iteration first runs, in an inner loop
that dispatches on the op kind with `tf.switch_case`, the advances, stores, restores and
frees the plan makes before that backward. The weight-gradient sums and the carry gradient
thus never pass through a conditional (under XLA that copied them on every op, measured).
Graph size and trace time do not depend on ``T``; the op tables are constant tensors. Weight
gradients are accumulated in the loop carry (never held per step), one iteration at a time.
All loops set `maximum_iterations`, which XLA needs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List

import numpy as np
import tensorflow as tf

from tf_membptt.schedule import OpKind, Plan

_SHAPE_OPS = ("Shape", "ShapeN", "Size", "Rank")

# Ops whose cost is linear in their operands (elementwise math, slicing, joining, reshaping,
# reductions). An internal state may store the inputs of a chain of such ops instead of its
# outputs: the backward recomputes the chain for a small fraction of a step's cost. Every
# other op (matrix products, convolutions, control flow, random ops) is expensive: its output
# is stored when a backward needs what it feeds.
_CHEAP_OPS = frozenset({
    "Identity", "IdentityN", "StopGradient", "Cast", "Const",
    "Add", "AddV2", "AddN", "BiasAdd", "Sub", "Mul", "MulNoNan", "RealDiv", "Div", "DivNoNan",
    "FloorDiv", "FloorMod", "Neg", "Reciprocal", "Square", "SquaredDifference", "Sqrt",
    "Rsqrt", "Exp", "Expm1", "Log", "Log1p", "Pow", "Abs", "Sign", "Maximum", "Minimum",
    "Sigmoid", "Tanh", "Relu", "Relu6", "LeakyRelu", "Elu", "Selu", "Softplus", "Softsign",
    "Erf", "Sin", "Cos", "ClipByValue", "Select", "SelectV2", "ZerosLike", "OnesLike", "Fill",
    "Greater", "GreaterEqual", "Less", "LessEqual", "Equal", "NotEqual", "LogicalAnd",
    "LogicalOr", "LogicalNot", "IsFinite",
    "Split", "SplitV", "Slice", "StridedSlice", "Reshape", "ExpandDims", "Squeeze",
    "ConcatV2", "Pack", "Unpack", "Shape", "ShapeN", "Size", "Rank", "BroadcastTo",
    "Sum", "Mean", "Max", "Min", "Prod",
})


class StepProgram:
    """Forward-with-residuals and backward-from-residuals functions of one step.

    Args:
        step_fn: ``step_fn(x, mask, carry, weights, extras) -> (output, new_carry)`` on
            tensors; `carry` and `new_carry` are flat lists; `mask` is a ``[batch]`` bool.
        x_spec: `tf.TensorSpec` of one step's input, batch dimension first.
        carry_specs: specs of the carry tensors (batch first, all of one float dtype).
        weight_specs: specs of the tensors that get gradients (the cell's trainable
            weights, as read outside the loops).
        extra_specs: specs of other per-call constants (non-trainable variables, dropout
            masks); they get no gradient.
    """

    def __init__(self, step_fn: Callable, x_spec, carry_specs, weight_specs, extra_specs):
        self.step_fn = step_fn
        self.x_spec = x_spec
        self.carry_specs = list(carry_specs)
        self.weight_specs = list(weight_specs)
        self.extra_specs = list(extra_specs)
        dtypes = {s.dtype for s in self.carry_specs}
        if len(dtypes) != 1:
            raise NotImplementedError(
                "All recurrent state tensors of the cell must share one dtype; received "
                f"dtypes {sorted(d.name for d in dtypes)}. Use keras.layers.RNN for such cells.")
        self.dtype = self.carry_specs[0].dtype
        for spec in self.carry_specs:
            if any(d is None for d in spec.shape[1:]):
                raise NotImplementedError(
                    f"State shapes must be static apart from the batch dimension; received "
                    f"{spec.shape}. Use keras.layers.RNN for such cells.")
        self._trace(step_fn)

    # ----------------------------------------------------------------------------------
    def _trace(self, step_fn):
        num_carry = len(self.carry_specs)
        num_weights = len(self.weight_specs)
        record = {}

        def traced(*args):
            x, mask = args[0], args[1]
            carry = list(args[2:2 + num_carry])
            weights = list(args[2 + num_carry:2 + num_carry + num_weights])
            extras = list(args[2 + num_carry + num_weights:])
            output, new_carry = step_fn(x, mask, carry, weights, extras)
            new_carry = list(new_carry)
            graph = tf.compat.v1.get_default_graph()
            num_forward_ops = len(graph.get_operations())
            d_output = tf.compat.v1.placeholder(output.dtype, output.shape, name="d_output")
            d_carry = [tf.compat.v1.placeholder(c.dtype, c.shape, name=f"d_carry_{i}")
                       for i, c in enumerate(new_carry)]
            grads = tf.gradients([output] + new_carry, [x] + carry + weights,
                                 grad_ys=[d_output] + d_carry,
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
            record.update(output=output, new_carry=new_carry, d_output=d_output,
                          d_carry=d_carry, grads=grads, x=x, mask=mask, carry=carry,
                          weights=weights, extras=extras,
                          forward_ops=graph.get_operations()[:num_forward_ops],
                          backward_ops=graph.get_operations()[num_forward_ops:])
            return [output] + new_carry + grads

        specs = ([self.x_spec, tf.TensorSpec([self.x_spec.shape[0]], tf.bool)]
                 + self.carry_specs + self.weight_specs + self.extra_specs)
        wrapped = tf.compat.v1.wrap_function(traced, specs)
        r = record
        forward_ops = set(r["forward_ops"])
        step_inputs = {id(r["x"]), id(r["mask"])}
        carry_ids = {id(c) for c in r["carry"]}

        # Forward tensors read by gradient ops, and the shape-only reads among them.
        residual_candidates, shape_feeds = [], []
        for op in r["backward_ops"]:
            for tensor in op.inputs:
                if tensor.op not in forward_ops:
                    continue
                if op.type in _SHAPE_OPS:
                    for out in op.outputs:
                        if not any(out is s for s in shape_feeds):
                            shape_feeds.append(out)
                elif not any(tensor is t for t in residual_candidates):
                    residual_candidates.append(tensor)
        # Shape ops whose outputs we feed must read forward tensors only.
        self._shape_feeds = []
        for out in shape_feeds:
            source = out.op.inputs[out.value_index if out.op.type == "ShapeN" else 0]
            static = source.shape
            if static.rank is None or any(d is None for d in static.as_list()[1:]):
                raise NotImplementedError(
                    f"The cell's gradient reads the shape of {source.name} whose shape "
                    f"{static} is not static apart from the batch dimension.")
            self._shape_feeds.append((out, out.op.type, static.as_list(), out.dtype))

        # One memoized walk each, shared by the sorting below and the compact layout's.
        depends_on_carry = _depends_on(carry_ids)
        depends_on_inputs = _depends_on(step_inputs)
        per_step, invariants = [], []
        for tensor in residual_candidates:
            if depends_on_carry(tensor):
                per_step.append(tensor)
            elif not depends_on_inputs(tensor):
                invariants.append(tensor)
            # Otherwise it is a function of x_i and the mask bit (and weights): the
            # backward function recomputes it from those, so it is never stored.
        # Two ways to lay out an internal state; the smaller is used.
        # * "residuals": h_i followed by the residuals (a residual that is a component of
        #   h_i is stored once, as part of h_i).
        # * "compact": the tensors that h_i and the residuals are computed from by cheap ops
        #   alone (`_CHEAP_OPS`), walking back until the carry h_{i-1} or an expensive op.
        #   For an LSTM that is h_{i-1}, c_{i-1} and h_{i-1} @ U: 3 units of (h, c) instead
        #   of 4.5; the gates, c_i and h_i are recomputed elementwise when needed.
        new_carry_ids = {id(c): k for k, c in enumerate(r["new_carry"])}
        residual_from_carry = [new_carry_ids.get(id(t), -1) for t in per_step]
        stored = [t for t in per_step if id(t) not in new_carry_ids]
        order = {id(op): n for n, op in enumerate(r["forward_ops"])}
        frontier = _cheap_frontier(per_step + r["new_carry"], carry_ids,
                                   depends_on_carry)
        frontier.sort(key=lambda t: (order.get(id(t.op), -1), t.value_index))
        residual_layout_size = (sum(self._row_elements(c) for c in r["new_carry"])
                                + sum(self._row_elements(t) for t in stored))
        # (An empty frontier would mean that neither h_i nor the backward reads h_{i-1}:
        # the residuals layout, h_i alone, is then the internal state.)
        self.compact = (bool(frontier) and all(_storable(t) for t in frontier)
                        and sum(self._row_elements(t) for t in frontier) < residual_layout_size)
        kept = frontier if self.compact else stored
        for tensor in kept:
            if not _storable(tensor):
                shape = tensor.shape
                if not tensor.dtype.is_floating:
                    raise NotImplementedError(
                        f"A tensor that the cell's backward needs, {tensor.name}, has dtype "
                        f"{tensor.dtype.name}; only floating tensors can be stored. Use "
                        "keras.layers.RNN for this cell.")
                raise NotImplementedError(
                    f"A tensor that the cell's backward needs, {tensor.name}, has shape "
                    f"{shape}: only tensors with a leading batch dimension and static other "
                    f"dimensions can be stored. Use keras.layers.RNN for this cell.")
        self._residual_from_carry = [] if self.compact else residual_from_carry
        # Kept tensors that are the step's carry inputs are taken as they came in, not
        # passed through the forward function.
        carry_position = {id(c): k for k, c in enumerate(r["carry"])}
        self._kept_source = [carry_position.get(id(t), -1) for t in kept]
        computed = [t for t in kept if id(t) not in carry_position]
        # What an internal state holds beside h_i (all of it when compact): the "working" set.
        self.working_specs = [tf.TensorSpec([None] + t.shape.as_list()[1:], t.dtype)
                              for t in kept]
        feeds_fwd = [r["x"], r["mask"]] + r["carry"] + r["weights"] + r["extras"]
        self._forward = wrapped.prune(feeds_fwd, [r["output"]] + r["new_carry"] + computed)
        invariant_feeds = r["weights"] + r["extras"]
        # Invariants with a value known now (constants, static shapes) are passed as
        # constants: computed through a function from the weights, XLA would treat the
        # weights as compile-time constants and recompile after every weight update.
        self._static_invariants = [tf.get_static_value(t) for t in invariants]
        dynamic = [t for t, v in zip(invariants, self._static_invariants) if v is None]
        self._invariants = wrapped.prune(invariant_feeds, dynamic) if dynamic else None
        step_feeds = [r["x"], r["mask"]] + r["weights"] + r["extras"]
        if self.compact:
            # Restarting from a compact internal state recomputes h_i from it.
            self._carry_from_kept = wrapped.prune(_unique(kept + step_feeds), r["new_carry"])
            self._carry_from_kept_index = _unique_index(kept + step_feeds)
            input_feeds = step_feeds
        else:
            input_feeds = [r["x"], r["mask"]]
        backward_feeds = (kept + [r["new_carry"][k] for k in self._carry_residual_indices()]
                          + [s[0] for s in self._shape_feeds] + invariants
                          + input_feeds + [r["d_output"]] + r["d_carry"])
        # A tensor may appear twice (e.g. a residual that is also an invariant's input):
        # it is fed once, and `_backward_unique_index` maps each position to its feed.
        self._backward = wrapped.prune(_unique(backward_feeds), r["grads"])
        # Without the input gradient, for when nothing asks for it (e.g. in model.fit).
        self._backward_without_dx = wrapped.prune(_unique(backward_feeds), r["grads"][1:])
        self._backward_unique_index = _unique_index(backward_feeds)
        self.output_spec = tf.TensorSpec([None] + r["output"].shape.as_list()[1:],
                                         r["output"].dtype)
        self._stored_size = [int(np.prod(s.shape[1:])) for s in self.working_specs]
        self._carry_size = [int(np.prod(s.shape[1:])) for s in self.carry_specs]

    @staticmethod
    def _row_elements(tensor) -> int:
        """Elements per batch row; a tensor that cannot be stored counts as unaffordable."""
        return int(np.prod(tensor.shape.as_list()[1:])) if _storable(tensor) else 1 << 62

    def _carry_residual_indices(self):
        return sorted({k for k in self._residual_from_carry if k >= 0})

    # -- sizes, in elements per batch row ----------------------------------------------
    @property
    def hidden_size(self) -> int:
        return sum(self._carry_size)

    @property
    def internal_size(self) -> int:
        """Elements per batch row of an internal state (see the two layouts in `_trace`)."""
        stored = sum(self._stored_size)
        return stored if self.compact else self.hidden_size + stored

    @property
    def alpha(self) -> float:
        """What an internal state costs in hidden states. A compact one smaller than a
        hidden state is charged as one: in the checkpointing game an internal state is
        never cheaper than the hidden state it restarts from (so plans stay valid)."""
        return max(1.0, self.internal_size / self.hidden_size)

    # -- calls ------------------------------------------------------------------------
    def invariants(self, weights, extras) -> List[tf.Tensor]:
        dynamic = iter(self._invariants(*weights, *extras) if self._invariants else [])
        return [next(dynamic) if value is None else tf.constant(value)
                for value in self._static_invariants]

    def forward(self, x, mask, carry, weights, extras):
        """One step: ``(output, new_carry, working)``; `working` is what an internal state
        holds beside ``h_i`` (all of it in the compact layout)."""
        out = self._forward(x, mask, *carry, *weights, *extras)
        num_carry = len(self.carry_specs)
        batch = x.shape[:1]
        output = _with_batch(out[0], batch)
        new_carry = [_with_batch(t, batch) for t in out[1:1 + num_carry]]
        computed = iter(out[1 + num_carry:])
        working = [carry[k] if k >= 0 else _with_batch(next(computed), batch)
                   for k in self._kept_source]
        return output, new_carry, working

    def backward(self, working, new_carry, invariants, x, mask, d_output, d_carry, batch,
                 weights, extras, need_dx=True):
        """Gradients ``(dx, d_carry_prev, d_weights)`` of one step from its internal state
        (dx is None unless `need_dx`). `new_carry` is not read in the compact layout."""
        shape_values = []
        for _, op_type, static, dtype in self._shape_feeds:
            dims = [batch if d is None else tf.constant(d, tf.int32) for d in static]
            dims = [tf.cast(d, dtype) for d in dims]
            if op_type in ("Shape", "ShapeN"):
                shape_values.append(tf.stack(dims) if dims else tf.zeros([0], dtype))
            elif op_type == "Size":
                shape_values.append(tf.reduce_prod(tf.stack(dims)) if dims
                                    else tf.constant(1, dtype))
            else:  # Rank
                shape_values.append(tf.constant(len(static), dtype))
        inputs = [x, mask] + (list(weights) + list(extras) if self.compact else [])
        feeds = (list(working) + [new_carry[k] for k in self._carry_residual_indices()]
                 + shape_values + list(invariants) + inputs + [d_output] + list(d_carry))
        unique = _gather_unique(feeds, self._backward_unique_index)
        if need_dx:
            grads = self._backward(*unique)
        else:
            grads = [None] + list(self._backward_without_dx(*unique))
        num_carry = len(self.carry_specs)
        dx = _with_shape(grads[0], x.shape) if need_dx else None
        d_carry_prev = [_with_shape(g, c.shape) for g, c in zip(grads[1:1 + num_carry], d_carry)]
        d_weights = list(grads[1 + num_carry:])
        return dx, d_carry_prev, d_weights

    # -- packing -----------------------------------------------------------------------
    def pack_hidden(self, carry) -> tf.Tensor:
        return _pack(carry)

    def unpack_hidden(self, flat) -> List[tf.Tensor]:
        return _unpack(flat, self.carry_specs)

    def pack_internal(self, carry, working) -> tf.Tensor:
        parts = list(working) if self.compact else list(carry) + list(working)
        return _pack(parts, self.dtype)

    def unpack_internal(self, flat):
        """``(carry, working)`` of a packed internal state; carry is None when compact."""
        if self.compact:
            return None, _unpack(flat, self.working_specs)
        parts = _unpack(flat, self.carry_specs + self.working_specs)
        num_carry = len(self.carry_specs)
        return parts[:num_carry], parts[num_carry:]

    def carry_of_internal(self, flat, x, mask, weights, extras) -> List[tf.Tensor]:
        """``h_i`` from a packed internal state ``I_i`` (x and mask are step i's)."""
        if not self.compact:
            return self.unpack_hidden(flat[:, :self.hidden_size])
        _, working = self.unpack_internal(flat)
        feeds = list(working) + [x, mask] + list(weights) + list(extras)
        out = self._carry_from_kept(*_gather_unique(feeds, self._carry_from_kept_index))
        return [_with_batch(t, x.shape[:1]) for t in out]


def _storable(tensor) -> bool:
    """A tensor an internal state can hold: floating, batch first, static other dims."""
    shape = tensor.shape
    return (tensor.dtype.is_floating and shape.rank is not None and shape.rank > 0
            and all(d is not None for d in shape.as_list()[1:]))


def _depends_on(source_ids):
    """A memoized test: does a tensor depend (through data inputs) on any source tensor?"""
    memo = {}

    def depends(tensor):
        key = id(tensor)
        if key not in memo:
            memo[key] = key in source_ids
            if not memo[key]:
                memo[key] = any(depends(t) for t in tensor.op.inputs)
        return memo[key]

    return depends


def _cheap_frontier(targets, carry_ids, depends):
    """The tensors the carry-dependent `targets` are computed from by cheap ops alone: walk
    back from each target through `_CHEAP_OPS`, stopping at a carry input or the output of
    an expensive op. Tensors that do not depend on the carry are recomputed from the step's
    inputs and weights, so the walk ignores them (as the residuals layout does)."""
    frontier, seen, pending = [], set(), list(targets)
    while pending:
        tensor = pending.pop()
        if id(tensor) in seen or not depends(tensor):
            continue
        seen.add(id(tensor))
        # An op with control inputs is never recomputed: recomputing it would rerun them.
        if (id(tensor) in carry_ids or tensor.op.type not in _CHEAP_OPS
                or tensor.op.control_inputs):
            frontier.append(tensor)
        else:
            pending.extend(tensor.op.inputs)
    return frontier


def _gather_unique(values, unique_index):
    """The values at their first positions, for a function pruned with `_unique` feeds."""
    unique = [None] * (max(unique_index) + 1 if values else 0)
    for value, index in zip(values, unique_index):
        unique[index] = value
    return unique


def _with_batch(tensor, batch_shape):
    """Gives a function output its static batch size back (pruned functions lose it)."""
    if isinstance(tensor, tf.Tensor) and not tf.executing_eagerly():
        tensor.set_shape(tf.TensorShape(batch_shape).concatenate(tensor.shape[1:]))
    return tensor


def _with_shape(tensor, shape):
    if isinstance(tensor, tf.Tensor) and not tf.executing_eagerly():
        tensor.set_shape(shape)
    return tensor


def _unique(tensors):
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _unique_index(tensors):
    index, out = {}, []
    for t in tensors:
        if id(t) not in index:
            index[id(t)] = len(index)
        out.append(index[id(t)])
    return out


def _pack(tensors, dtype=None):
    flat = [tf.reshape(t, [tf.shape(t)[0], -1]) for t in tensors]
    if dtype is not None:
        flat = [tf.cast(t, dtype) for t in flat]
    return flat[0] if len(flat) == 1 else tf.concat(flat, axis=1)


def _unpack(flat, specs):
    sizes = [int(np.prod(s.shape[1:])) for s in specs]
    parts = tf.split(flat, sizes, axis=1) if len(sizes) > 1 else [flat]
    return [tf.cast(tf.reshape(p, [-1] + s.shape.as_list()[1:]), s.dtype)
            for p, s in zip(parts, specs)]


# --------------------------------------------------------------------------------------
# Loops
# --------------------------------------------------------------------------------------
def _step_input(xs, t, num_steps, go_backwards):
    """Input of the ``t``-th step processed, read from the batch-major sequence: a copy of
    one step, where a time-major transpose would copy the whole sequence (4 MiB at
    ``T = 1000`` in the benchmark, 40 MiB at ``T = 10,000``)."""
    return tf.gather(xs, num_steps - 1 - t if go_backwards else t, axis=1)


def run_plain(program: StepProgram, xs, masks, carry, weights, extras, return_sequences,
              go_backwards=False):
    """Inference: a forward loop that stores nothing. ``xs`` is batch-major, ``masks``
    time-major in processing order; outputs are time-major in processing order."""
    num_steps = tf.shape(xs)[1]
    output_ta = tf.TensorArray(program.output_spec.dtype, size=num_steps if return_sequences
                               else 1, element_shape=None)
    last_output = tf.zeros([tf.shape(xs)[0]] + program.output_spec.shape.as_list()[1:],
                           program.output_spec.dtype)

    def body(t, output_ta, last_output, *carry):
        # The Python step itself, not the traced function: TensorFlow can then
        # differentiate this loop like any other (standard BPTT) if a tape asks.
        x_t = _step_input(xs, t, num_steps, go_backwards)
        output, new_carry = program.step_fn(x_t, masks[t], list(carry), weights, extras)
        if return_sequences:
            output_ta = output_ta.write(t, output)
        return (t + 1, output_ta, output) + tuple(new_carry)

    result = tf.while_loop(lambda t, *_: t < num_steps, body,
                           (tf.constant(0), output_ta, last_output) + tuple(carry),
                           maximum_iterations=num_steps)
    outputs = result[1].stack() if return_sequences else None
    return result[2], outputs, list(result[3:])


@dataclasses.dataclass(frozen=True)
class _Tables:
    """The plan as constant tables for the loops (numpy, made once per plan)."""

    forward_store: np.ndarray  # per step: kind (0 none, 1 hidden, 2 internal), slot, offset
    moves: np.ndarray  # the gradient's other ops, in order; rows: kind, step, slot, offset
    # The gradient's backward ops, in order (steps T..1); rows: kind, step, slot, offset,
    # and the range [first, end) of `moves` rows that run before it.
    backwards: np.ndarray
    capacity: int  # elements per batch row of the flat buffer: the plan's peak
    num_slots: int  # stack depth of the slot list: the most states held at once
    stores_internal: bool


def plan_tables(plan: Plan, hidden_size: int, internal_size: int,
                restore_internal: bool = False) -> _Tables:
    """Splits the op table into the first sweep's per-step stores and the gradient's rows,
    with element offsets for this cell (vectorized: plans have 10^5 ops at T = 10^4).

    With `restore_internal` (internal states that do not begin with ``h_i``: the compact
    layout), a RESTORE from a slot holding an internal state gets the code
    `RESTORE_INTERNAL`."""
    table = plan.op_table().astype(np.int64)
    if restore_internal:
        table[_restores_from_internal(table), 0] = RESTORE_INTERNAL
    kind, step, slot = table[:, 0], table[:, 1], table[:, 2]
    offset = table[:, 3] * hidden_size + table[:, 4] * internal_size
    is_store = (kind == OpKind.STORE_HIDDEN) | (kind == OpKind.STORE_INTERNAL)
    size = np.where(kind == OpKind.STORE_HIDDEN, hidden_size, internal_size)
    # h_0 is slot 0, at offset 0.
    capacity = int(max(hidden_size, np.max(np.where(is_store, offset + size, 0))))
    num_slots = int(max(1, np.max(np.where(is_store, slot + 1, 0))))

    num_forward = plan.num_forward_ops
    forward = slice(0, num_forward)
    allowed = np.isin(kind[forward], [OpKind.ADVANCE, OpKind.STORE_HIDDEN,
                                       OpKind.STORE_INTERNAL, OpKind.FREE, OpKind.RESTORE,
                                       RESTORE_INTERNAL])
    if not np.all(allowed):
        raise AssertionError("the first sweep holds only advances and stores")
    stores = np.nonzero(is_store[forward])[0]
    store_steps = step[stores]  # a store's step is the cursor's: the step just evaluated
    if len(np.unique(store_steps)) != len(store_steps):
        raise AssertionError("the first sweep stores at most one state per step")
    forward_store = np.zeros((plan.num_steps, 3), np.int32)
    forward_store[store_steps - 1, 0] = np.where(kind[stores] == OpKind.STORE_HIDDEN, 1, 2)
    forward_store[store_steps - 1, 1] = slot[stores]
    forward_store[store_steps - 1, 2] = offset[stores]

    rows = np.stack([kind, step, slot, offset], axis=1)[num_forward:]
    is_backward = np.isin(rows[:, 0], [OpKind.BACKWARD_CURSOR, OpKind.BACKWARD_STORED])
    # Ops after the last backward only free slots: nothing is left to do.
    last = np.nonzero(is_backward)[0][-1]
    rows, is_backward = rows[:last + 1], is_backward[:last + 1]
    positions = np.nonzero(is_backward)[0]
    if not np.array_equal(rows[positions, 1], np.arange(plan.num_steps, 0, -1)):
        raise AssertionError("the gradient runs each step's backward once, T down to 1")
    # The gradient loop runs one backward per iteration, after the moves since the last.
    moves_before = positions - np.arange(len(positions))
    first = np.concatenate([[0], moves_before[:-1]])
    backwards = np.concatenate([rows[positions], first[:, None], moves_before[:, None]],
                               axis=1).astype(np.int32)
    moves = rows[~is_backward].astype(np.int32)
    stores_internal = bool(np.any(kind == OpKind.STORE_INTERNAL))
    return _Tables(forward_store, moves, backwards, capacity, num_slots, stores_internal)


# The executor's own op code beside `OpKind`'s: restore the cursor from an internal state.
RESTORE_INTERNAL = max(int(k) for k in OpKind) + 1


def _restores_from_internal(table) -> np.ndarray:
    """Row indices of the RESTORE ops whose slot holds an internal state."""
    kind, slot = table[:, 0], table[:, 2]
    rows = np.nonzero(np.isin(kind, [OpKind.STORE_HIDDEN, OpKind.STORE_INTERNAL,
                                     OpKind.RESTORE]))[0]
    holds_internal = {}
    hits = []
    for row in rows:  # only stores and restores: a few per step
        if kind[row] == OpKind.RESTORE:
            if holds_internal.get(int(slot[row]), False):
                hits.append(row)
        else:
            holds_internal[int(slot[row])] = kind[row] == OpKind.STORE_INTERNAL
    return np.asarray(hits, np.int64)


class _FlatStore:
    """All stored states in one ``[batch, capacity + scratch]`` buffer, at stack offsets.

    Used under XLA, which updates a loop-carried buffer in place with a dynamic-update-slice
    -- but only when, within a loop iteration, the buffer passes through no conditional and
    nothing reads the old buffer after the update is issued (otherwise XLA copies the whole
    buffer every iteration; measured). So every iteration writes unconditionally -- a real
    store to its slot, any other op to a scratch area past the stack -- and reads only after
    writing. The scratch area holds one state of the largest kind the plan stores; the layer
    plans with that much less memory under XLA (`scratch_slots`). TensorFlow's own executor
    copies such a buffer on every update, so outside XLA `_SlotStore` is used.
    """

    def __init__(self, tables, batch, static_batch, dtype, hidden_size, internal_size):
        self.capacity, self.batch, self.dtype = tables.capacity, batch, dtype
        self.static_batch = static_batch
        self.scratch_size = internal_size if tables.stores_internal else hidden_size

    def empty(self):
        return tf.zeros(tf.stack([self.batch, self.capacity + self.scratch_size]), self.dtype)

    def write(self, store, slot, offset, flat):
        from tensorflow.compiler.tf2xla.python import xla

        return xla.dynamic_update_slice(store, tf.cast(flat, self.dtype),
                                        tf.stack([tf.constant(0, tf.int32), offset]))

    def read(self, store, slot, offset, size):
        # Every size is explicit: a size of -1 with a dynamic offset is lowered by tf2xla as
        # a pad of the whole buffer to twice its size in each dimension, then a full-size
        # dynamic-slice. With one reader XLA fuses the pad away (hsm); when the plan both
        # restores and runs stored backwards (msm, ism), two slices read it and XLA
        # materializes the padded buffer on every iteration (measured: 15-35x the time of
        # standard BPTT instead of ~1.6x).
        begin = tf.stack([tf.constant(0, tf.int32), tf.cast(offset, tf.int32)])
        flat = tf.slice(store, begin, tf.stack([tf.shape(store)[0], size]))
        return _with_shape(flat, [self.static_batch, size])

    def free(self, store, slot):
        return store  # the stack's next push overwrites it

    def store_step(self, store, kind, offset, hidden_kind, internal_kind, pack_hidden,
                   pack_internal):
        """One unconditional write per iteration: the hidden or internal state when `kind`
        is a store of that kind, else whatever to the scratch area. A hidden state is padded
        to the internal size when the plan stores both (the padding lands on free memory
        above the stack top, or in the scratch area), so one write serves both kinds: two
        writes per iteration made XLA copy the buffer again (measured)."""
        size = self.scratch_size
        values, hits = [], []
        if hidden_kind is not None:
            flat = pack_hidden()
            if flat.shape[1] < size:
                flat = tf.pad(flat, [[0, 0], [0, size - flat.shape[1]]])
            values.append(flat)
            hits.append(tf.equal(kind, hidden_kind))
        if internal_kind is not None:
            values.append(pack_internal())
            hits.append(tf.equal(kind, internal_kind))
        if not values:
            return store
        value = values[0] if len(values) == 1 else tf.where(hits[0], values[0], values[1])
        hit = hits[0] if len(hits) == 1 else tf.logical_or(hits[0], hits[1])
        return self.write(store, None, tf.where(hit, offset, self.capacity), value)

    def load_step(self, store, kind, offset, kinds):
        """One read per iteration, after the write: `scratch_size` elements at `offset` when
        `kind` is one of `kinds`, else at offset 0 (unused)."""
        hit = tf.reduce_any(tf.equal(kind, tf.constant(kinds, tf.int32)))
        return self.read(store, None, tf.where(hit, offset, 0), self.scratch_size)


def scratch_slots(alpha: float, strategy: str) -> float:
    """Memory (hidden-state units) of `_FlatStore`'s scratch area, which the layer keeps out
    of the plan's budget under XLA: an internal state, or a hidden state for ``hsm``."""
    return 1.0 if strategy == "hsm" else float(alpha)


class _SlotStore:
    """One TensorArray element per stack slot (hidden ``[batch, H]`` or internal
    ``[batch, R]``). A write replaces one element, without copying the others; a FREE
    replaces it with an empty tensor, so memory held is exactly the plan's stack."""

    def __init__(self, tables, batch, static_batch, dtype):
        self.num_slots, self.batch, self.dtype = tables.num_slots, batch, dtype
        self.static_batch = static_batch

    def empty(self):
        return tf.TensorArray(self.dtype, size=self.num_slots, clear_after_read=False,
                              infer_shape=False, element_shape=tf.TensorShape([None, None]))

    def write(self, store, slot, offset, flat):
        return store.write(slot, flat)

    def read(self, store, slot, offset, size):
        # `size` may be less than the element: in the residuals layout an internal state
        # starts with h_i, so a RESTORE reads its first H elements (a compact one is read
        # whole, by RESTORE_INTERNAL).
        flat = tf.reshape(store.read(slot)[:, :size], [-1, size])
        return _with_shape(flat, [self.static_batch, size])

    def free(self, store, slot):
        return store.write(slot, tf.zeros(tf.stack([self.batch, 0]), self.dtype))


def in_xla_context() -> bool:
    """Whether ops are being built for XLA (inside `tf.function(jit_compile=True)`)."""
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def run_planned(program: StepProgram, plan: Plan, xs, masks, carry, weights, extras,
                return_sequences: bool, go_backwards: bool = False):
    """Training: outputs as `run_plain`, with the plan's memory-efficient gradient.

    Gradients flow to `xs`, `carry` and `weights` (all tensors; read variables outside).
    """
    num_steps = plan.num_steps
    tables = plan_tables(plan, program.hidden_size, program.internal_size, program.compact)
    num_carry = len(carry)
    batch = tf.shape(xs)[0]
    store_kind = _FlatStore if in_xla_context() else _SlotStore
    if store_kind is _FlatStore:
        store = _FlatStore(tables, batch, xs.shape[0], program.dtype, program.hidden_size,
                           program.internal_size)
    else:
        store = _SlotStore(tables, batch, xs.shape[0], program.dtype)

    # When no tape watches the inputs (e.g. the layer reads a model input in model.fit),
    # their gradient is never used: the sequence is then captured rather than passed in,
    # and the backward does not build it (saving 2-3 copies of the input sequence).
    needs_input_grad = _watched(xs)
    captured_xs = xs

    def graph_forward_sweep(xs, masks, carry0, weight_values, extras):
        return _forward_sweep(program, tables, store, xs, masks, carry0, weight_values,
                              extras, batch, return_sequences, num_steps, go_backwards)

    def graph_backward_sweep(xs, masks, weight_values, extras, invariants, stored,
                             final_carry, working_last, d_final_carry, d_outputs, d_last):
        return _backward_sweep(program, tables, store, xs, masks, weight_values, extras,
                               invariants, stored, final_carry, working_last,
                               d_final_carry, d_outputs, d_last, batch, num_steps,
                               needs_input_grad, go_backwards)

    if tf.executing_eagerly():
        # Eagerly, the loops would dispatch every op of every step from Python (~0.1 s a
        # step, measured); they run as two traced functions instead, cached per plan. The
        # stored states pass from one to the other as a TensorArray, as in graph mode.
        forward_sweep, backward_sweep = _eager_sweeps(program, plan, tables,
                                                      return_sequences, needs_input_grad,
                                                      go_backwards)
    else:
        forward_sweep, backward_sweep = graph_forward_sweep, graph_backward_sweep

    @tf.custom_gradient
    def planned(*inputs):
        if needs_input_grad:
            xs, inputs = inputs[0], inputs[1:]
        else:
            xs = captured_xs
        carry0 = list(inputs[:num_carry])
        weight_values = list(inputs[num_carry:])
        # Nothing in the forward is recorded on an outer (eager) tape: the gradient below
        # replaces it, and recording would keep every step's tensors alive.
        with _stop_recording():
            invariants = program.invariants(weight_values, extras)
            last_output, outputs, final_carry, stored, working_last = forward_sweep(
                xs, masks, carry0, weight_values, extras)

        def grad(d_result, *d_final_carry, variables=None):
            d_outputs = d_result if return_sequences else None
            d_last = None if return_sequences else d_result
            d_xs, d_carry0, d_weights = backward_sweep(
                xs, masks, weight_values, extras, invariants, stored, final_carry,
                working_last, list(d_final_carry), d_outputs, d_last)
            return ([d_xs] if needs_input_grad else []) + d_carry0 + d_weights

        result = outputs if return_sequences else last_output
        return (result,) + tuple(final_carry), grad

    out = planned(*([xs] if needs_input_grad else []), *carry, *weights)
    result, final_carry = out[0], list(out[1:])
    if return_sequences:
        return result[-1], result, final_carry
    return result, None, final_carry


def _eager_sweeps(program, plan, tables, return_sequences, needs_input_grad, go_backwards):
    cache = program.__dict__.setdefault("_eager_sweeps", {})
    key = (plan, return_sequences, needs_input_grad, go_backwards)
    if key in cache:
        return cache[key]
    num_steps = plan.num_steps

    def store_for(xs):
        return _SlotStore(tables, tf.shape(xs)[0], xs.shape[0], program.dtype)

    # A TensorArray crosses a function boundary as its flow (a TensorList variant).
    @tf.function(autograph=False)
    def forward_sweep(xs, masks, carry0, weight_values, extras):
        result = _forward_sweep(program, tables, store_for(xs), xs, masks, carry0,
                                weight_values, extras, tf.shape(xs)[0], return_sequences,
                                num_steps, go_backwards)
        return result[:3] + (result[3].flow,) + result[4:]

    @tf.function(autograph=False)
    def backward_sweep(xs, masks, weight_values, extras, invariants, stored_flow,
                       final_carry, working_last, d_final_carry, d_outputs, d_last):
        store = store_for(xs)
        stored = tf.TensorArray(program.dtype, flow=stored_flow, clear_after_read=False,
                                infer_shape=False)
        return _backward_sweep(program, tables, store, xs, masks, weight_values, extras,
                               invariants, stored, final_carry, working_last,
                               d_final_carry, d_outputs, d_last, tf.shape(xs)[0], num_steps,
                               needs_input_grad, go_backwards)

    cache[key] = (forward_sweep, backward_sweep)
    return cache[key]


class _stop_recording:
    def __enter__(self):
        from tensorflow.python.eager import record

        self._ctx = record.stop_recording()
        self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _watched(tensor) -> bool:
    """Whether a gradient tape would record an op reading `tensor` (True if unsure)."""
    try:
        from tensorflow.python.eager import record

        return bool(record.should_record_backprop([tensor]))
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - private API moved
        return True


def _forward_sweep(program, tables, store, xs, masks, carry0, weights, extras, batch,
                   return_sequences, num_steps, go_backwards):
    used = [bool(np.any(tables.forward_store[:, 0] == k)) for k in range(3)]
    store_table = tf.constant(tables.forward_store)
    output_ta = tf.TensorArray(program.output_spec.dtype,
                               size=num_steps if return_sequences else 1)
    last_output = tf.zeros(tf.concat([[batch], program.output_spec.shape[1:]], 0),
                           program.output_spec.dtype)
    zero_working = [tf.zeros(tf.concat([[batch], s.shape[1:]], 0), s.dtype)
                      for s in program.working_specs]
    num_carry = len(carry0)

    def body(t, stored, output_ta, last_output, residuals, *carry):
        x_t = _step_input(xs, t, num_steps, go_backwards)
        output, new_carry, new_working = program.forward(x_t, masks[t], list(carry),
                                                           weights, extras)
        kind, slot, offset = store_table[t][0], store_table[t][1], store_table[t][2]
        if isinstance(store, _FlatStore):
            stored = store.store_step(
                stored, kind, offset, 1 if used[1] else None, 2 if used[2] else None,
                lambda: program.pack_hidden(new_carry),
                lambda: program.pack_internal(new_carry, new_working))
        elif used[1] or used[2]:
            # Only the store kinds this plan uses are built (see _backward_sweep).
            def no_store():
                return stored

            def store_hidden():
                return store.write(stored, slot, offset, program.pack_hidden(new_carry))

            def store_internal():
                return store.write(stored, slot, offset,
                                   program.pack_internal(new_carry, new_working))

            stored = tf.switch_case(kind, [no_store, store_hidden if used[1] else no_store,
                                           store_internal if used[2] else no_store])
        if return_sequences:
            output_ta = output_ta.write(t, output)
        return (t + 1, stored, output_ta, output, new_working) + tuple(new_carry)

    # h_0 is held in slot 0 for the whole step (the plan counts it; restores read it).
    stored = store.write(store.empty(), 0, 0, program.pack_hidden(carry0))
    result = tf.while_loop(
        lambda t, *_: t < num_steps, body,
        (tf.constant(0), stored, output_ta, last_output, zero_working)
        + tuple(carry0),
        maximum_iterations=num_steps)
    _, stored, output_ta, last_output, residuals = result[:5]
    final_carry = list(result[5:5 + num_carry])
    outputs = output_ta.stack() if return_sequences else None
    return last_output, outputs, final_carry, stored, list(residuals)


def _backward_sweep(program, tables, store, xs, masks, weights, extras, invariants, stored,
                    final_carry, working_last, d_final_carry, d_outputs, d_last, batch,
                    num_steps, needs_input_grad, go_backwards):
    """The gradient: one iteration per step's backward (T down to 1), each first running
    the moves the plan makes before it (advances, stores, restores, frees) in an inner loop.

    Only the inner loop dispatches on op kinds, and it carries only the cursor, the working
    internal state and the store: the weight-gradient sums and the carry gradient never pass
    through a conditional, which under XLA copied them on every op (measured)."""
    move_kinds = set(int(k) for k in np.unique(tables.moves[:, 0]))
    backward_kinds = set(int(k) for k in np.unique(tables.backwards[:, 0]))
    moves_table = tf.constant(tables.moves if len(tables.moves)
                              else np.zeros((1, 4), np.int32))
    backwards_table = tf.constant(tables.backwards)
    runs = tables.backwards[:, 5] - tables.backwards[:, 4]
    longest_run = int(np.max(runs)) if len(runs) else 0
    hidden_size, internal_size = program.hidden_size, program.internal_size
    output_spec = program.output_spec
    zero_output = tf.zeros(tf.concat([[batch], output_spec.shape[1:]], 0), output_spec.dtype)
    no_buffer = tf.zeros([], tf.int32)
    flat_store = isinstance(store, _FlatStore)
    d_weights0 = [tf.zeros_like(w) for w in weights]
    dxs_ta = (tf.TensorArray(xs.dtype, size=num_steps) if needs_input_grad
              else tf.zeros([], xs.dtype))  # a placeholder loop variable
    num_carry, num_res = len(final_carry), len(working_last)
    d_carry0 = [tf.zeros_like(c) if d is None else d for c, d in zip(final_carry, d_final_carry)]

    def step_inputs(step):
        # Per-step slices are taken outside any switch, so that branches capture one step's
        # tensors rather than whole sequences (XLA passes captures as operands).
        t = tf.maximum(step - 1, 0)
        return _step_input(xs, t, num_steps, go_backwards), masks[t]

    def move(i, stored, *state):
        cursor, working = list(state[:num_carry]), list(state[num_carry:])
        row = moves_table[i]
        kind, step, slot, offset = row[0], row[1], row[2], row[3]
        # ADVANCE evaluates `step`; RESTORE_INTERNAL restarts from the state of `step`.
        x_t, mask_t = step_inputs(step)

        def pack(stored, cursor, working):
            if flat_store:
                stored = no_buffer  # the buffer stays outside the switch
            return (stored,) + tuple(cursor) + tuple(working)

        def advance():
            _, new_carry, res = program.forward(x_t, mask_t, cursor, weights, extras)
            return pack(stored, new_carry, res)

        def store_hidden():
            if flat_store:  # written above
                return pack(stored, cursor, working)
            return pack(store.write(stored, slot, offset, program.pack_hidden(cursor)),
                        cursor, working)

        def store_internal():
            if flat_store:  # written above
                return pack(stored, cursor, working)
            return pack(store.write(stored, slot, offset,
                                    program.pack_internal(cursor, working)), cursor, working)

        if flat_store:
            # Under XLA the buffer stays out of the switch below (see _FlatStore):
            # reads happen before it, writes after it.
            stored = store.store_step(
                stored, kind, offset,
                int(OpKind.STORE_HIDDEN) if OpKind.STORE_HIDDEN in move_kinds else None,
                int(OpKind.STORE_INTERNAL) if OpKind.STORE_INTERNAL in move_kinds else None,
                lambda: program.pack_hidden(cursor),
                lambda: program.pack_internal(cursor, working))
            # The read comes after the write (an op is one kind, so it never reads what
            # this iteration wrote): reading first would make XLA copy the buffer.
            read_kinds = [k for k in (int(OpKind.RESTORE), RESTORE_INTERNAL)
                          if k in move_kinds]
            loaded = (store.load_step(stored, kind, offset, read_kinds) if read_kinds
                      else None)
            restored = loaded[:, :hidden_size] if loaded is not None else None
            internal = (loaded[:, :internal_size] if RESTORE_INTERNAL in move_kinds
                        else None)
        else:
            restored = internal = None

        def restore():
            flat = restored if flat_store else store.read(stored, slot, offset, hidden_size)
            return pack(stored, program.unpack_hidden(flat), working)

        def restore_internal():
            # A compact internal state does not hold h_i: it is recomputed from it.
            flat = internal if flat_store else store.read(stored, slot, offset, internal_size)
            return pack(stored, program.carry_of_internal(flat, x_t, mask_t, weights, extras),
                        working)

        def free():
            return pack(store.free(stored, slot), cursor, working)

        def unused():
            return pack(stored, cursor, working)

        by_kind = {OpKind.ADVANCE: advance, OpKind.STORE_HIDDEN: store_hidden,
                   OpKind.STORE_INTERNAL: store_internal, OpKind.RESTORE: restore,
                   OpKind.FREE: free, RESTORE_INTERNAL: restore_internal}
        # Kinds the plan never uses get a no-op branch: XLA compiles every branch, and
        # e.g. reading an internal state from a buffer sized for hidden states alone would
        # not compile.
        result = tf.switch_case(kind, [by_kind[k] if k in move_kinds and k in by_kind
                                       else unused for k in range(RESTORE_INTERNAL + 1)])
        if not flat_store:
            stored = result[0]
        return (i + 1, stored) + tuple(result[1:])

    def body(j, stored, dxs_ta, *loop_vars):
        cursor = list(loop_vars[:num_carry])
        working = list(loop_vars[num_carry:num_carry + num_res])
        d_carry = list(loop_vars[num_carry + num_res:2 * num_carry + num_res])
        d_weights = list(loop_vars[2 * num_carry + num_res:])
        row = backwards_table[j]
        kind, step, slot, offset, first, end = (row[0], row[1], row[2], row[3], row[4],
                                                row[5])
        if longest_run:
            moved = tf.while_loop(lambda i, *_: i < end, move,
                                  (first, stored) + tuple(cursor) + tuple(working),
                                  maximum_iterations=longest_run, parallel_iterations=1)
            stored = moved[1]
            cursor = list(moved[2:2 + num_carry])
            working = list(moved[2 + num_carry:])
        x_t, mask_t = step_inputs(step)
        if d_outputs is not None:
            d_out = d_outputs[step - 1]
        else:
            d_out = tf.where(tf.equal(step, num_steps), d_last, zero_output)

        # The backward of `step`, from its stored internal state or from the cursor's.
        new_carry, residuals = cursor, working
        if OpKind.BACKWARD_STORED in backward_kinds:
            from_store = tf.equal(kind, int(OpKind.BACKWARD_STORED))
            if flat_store:  # read after the moves' writes, unconditionally (see _FlatStore)
                flat = store.read(stored, None, tf.where(from_store, offset, 0), internal_size)
                carry_i, res_i = program.unpack_internal(flat)
                residuals = [tf.where(from_store, a, b) for a, b in zip(res_i, working)]
                if carry_i is not None:
                    new_carry = [tf.where(from_store, a, b) for a, b in zip(carry_i, cursor)]
            else:
                def stored_state():
                    carry_i, res_i = program.unpack_internal(
                        store.read(stored, slot, offset, internal_size))
                    return tuple(carry_i if carry_i is not None else cursor) + tuple(res_i)

                chosen = tf.cond(from_store, stored_state,
                                 lambda: tuple(cursor) + tuple(working))
                new_carry, residuals = list(chosen[:num_carry]), list(chosen[num_carry:])
        dx, d_prev, dw = program.backward(residuals, new_carry, invariants, x_t, mask_t,
                                          d_out, d_carry, batch, weights, extras,
                                          need_dx=needs_input_grad)
        d_weights = [a + g for a, g in zip(d_weights, dw)]
        if needs_input_grad:
            dxs_ta = dxs_ta.write(step - 1, dx)
        return ((j + 1, stored, dxs_ta) + tuple(cursor) + tuple(working) + tuple(d_prev)
                + tuple(d_weights))

    init = ((tf.constant(0), stored, dxs_ta) + tuple(final_carry) + tuple(working_last)
            + tuple(d_carry0) + tuple(d_weights0))
    # One iteration at a time: with TensorFlow's default of 10 in flight, the weight
    # gradients of later backward steps are computed ahead of the running sum and held at
    # once (measured: 11 copies of dW at the peak instead of 2).
    result = tf.while_loop(lambda j, *_: j < num_steps, body, init,
                           maximum_iterations=num_steps, parallel_iterations=1)
    dxs = None
    if needs_input_grad:  # rows are in processing order; the input is batch-major
        dxs = result[2].stack()
        if go_backwards:
            dxs = tf.reverse(dxs, [0])
        dxs = tf.transpose(dxs, [1, 0] + list(range(2, len(dxs.shape))))
    d_carry = list(result[3 + num_carry + num_res:3 + 2 * num_carry + num_res])
    d_weights = list(result[3 + 2 * num_carry + num_res:])
    return dxs, d_carry, d_weights
