"""What one step's backward needs, found from TensorFlow's own gradient graph.

`StepProgram` turns a step function ``step_fn(x, sides, carry, params) -> (output,
new_carry)`` into the functions the sweeps call, in four named stages:

1. `_trace`: trace the step once in a `tf.compat.v1.wrap_function` graph and build its
   gradient with `tf.gradients`. Tensors the step captures from outside (a cell's cached
   dropout masks) become per-call *constants*, fed like inputs.
2. `_classify`: every forward tensor that a gradient op reads is a *residual*. Residuals
   that depend on the carry are *per-step* (they belong to the internal state); functions
   of the step's input alone are recomputed in the backward from that input; functions of
   the params and constants alone are *invariants*, computed once per call; tensors whose
   only use is their shape are fed from static shapes and never kept.
3. `_choose_layout`: an internal state ``I_i`` must restart the cursor at ``h_i`` and feed
   the backward of step ``i``. Two layouts do both; the one with fewer bytes wins:

   * residuals: ``h_i`` followed by the per-step residuals;
   * compact: tensors that ``h_i`` and the per-step residuals are computed from by cheap
     ops alone (`_CHEAP_OPS`: elementwise math, slicing, reductions), found by walking back
     until the carry ``h_{i-1}`` or an expensive op. Which such tensors depends on where the
     program runs. Under XLA, the walk's frontier (for an LSTM: ``h_{i-1}``, ``c_{i-1}`` and
     ``x_i @ W + h_{i-1} @ U``, 3 hidden states instead of 4.5): the store copies every
     component into one flat buffer, so few large components are cheapest, and XLA fuses
     the backward's elementwise recomputation of the gates into its other work. Elsewhere
     (graph and eager mode), when the batch size is static and the tensors are large enough
     (`NEAREST_CUT_MIN_BYTES`), of the sets of tensors with that fewest bytes, the one
     nearest the outputs (`_cut_nearest_targets`; for an LSTM: ``h_{i-1}``, ``c_{i-1}`` and
     the four gate activations, also 3 hidden states): the store keeps each component by
     reference, and every op the backward recomputes is one more kernel per step (measured,
     graph mode, T = 1000, 15 alternated rounds: `LSTMCell(128)` 1.46x -> 1.35x
     keras.layers.RNN's step at 5%, 1.11x -> 0.95x at 100%; `GRUCell(128)` 1.49x -> 1.42x
     and 1.13x -> 1.06x; under XLA the same change made `LSTMCell(128)` 1.20x -> 1.88x).

4. `_prune`: cut the graph (`WrappedFunction.prune`) into the forward (new carry, output
   and the internal state's components), the backward (from an internal state to the
   gradients of the input, the carry and the params), the invariants, and, for the compact
   layout, the restart (from an internal state to ``h_i``).

Every component keeps its own dtype and shape: a float16 carry beside a float32
intermediate, integer indices a gradient gathers with, a variable's value that does not
have a batch dimension. Sizes are counted in bytes, so ``alpha`` (internal state / hidden
state) is a ratio of bytes.

What a step may do (the contract, checked here): it may read the params it is given and
the tensors it captures; it must not read or write TensorFlow variables directly (the layer
maps every Keras variable the cell touches to a param or a carry part), and it must not use
TensorFlow's stateful random ops, which cannot be replayed: a recomputed step would draw new
numbers. Other stateful ops (``tf.print``, ``tf.py_function``) are allowed and run at every
evaluation, recomputations included.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np
import tensorflow as tf

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

# Outside XLA, the compact layout stores the tensors nearest the step's outputs (the
# backward recomputes the least) when they hold at least this many bytes per step on
# average (static batch sizes only): each component is one more store write, read and
# free per step, and for small tensors those cost more than the ops they save. Measured, graph mode,
# T = 1000, 15 alternated rounds, step time / keras.layers.RNN's at 5%: 4 KiB components
# (LSTMCell(32), batch 32; LSTMCell(16), batch 64) 1.31x -> 1.58x and 1.34x -> 1.50x (an
# earlier pair of runs: 1.80x -> 1.73x and, run beside a test suite, 1.43x -> 1.67x);
# 16 KiB (LSTMCell(128), GRUCell(128), batch 32) 1.46x -> 1.35x and 1.49x -> 1.42x;
# 64 KiB (LSTMCell(512), 11 rounds) 1.44x -> 1.34x.
NEAREST_CUT_MIN_BYTES = 8 * 1024

# TensorFlow's stateful random ops: each run draws new numbers, so a recomputed step would
# not replay the first sweep's. (Stateless random ops, which Keras's random functions and
# tf.random.stateless_* use, are replayed exactly from their seed.)
_STATEFUL_RANDOM_OPS = frozenset({
    "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal",
    "ParameterizedTruncatedNormal", "RandomGamma", "RandomGammaGrad", "RandomPoisson",
    "RandomPoissonV2", "RandomShuffle", "Multinomial", "RandomCrop",
    "StatefulUniform", "StatefulUniformInt", "StatefulUniformFullInt",
    "StatefulStandardNormal", "StatefulStandardNormalV2", "StatefulTruncatedNormal",
    "StatefulRandomBinomial", "RngSkip", "RngReadAndSkip", "NonDeterministicInts",
    "ExperimentalRandomDataset", "AnonymousRandomSeedGenerator",
})

# Ops that touch a TensorFlow variable directly. The layer maps every Keras variable the
# cell uses to a tensor; one of these in a step means a raw `tf.Variable`, whose reads the
# executor cannot give gradients to and whose writes recomputation would repeat.
_VARIABLE_OPS = frozenset({
    "ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
    "ResourceGather", "ResourceGatherNd", "ResourceScatterUpdate", "ResourceScatterAdd",
    "VarHandleOp", "VariableV2", "Assign", "AssignAdd", "AssignSub",
})


@dataclasses.dataclass(frozen=True)
class StepSignature:
    """The tensors one step takes, as the sweeps pass them.

    Attributes:
        input_spec: one step's input, batch dimension first.
        side_specs: one step's side inputs (e.g. its mask bits, or the targets of a loss
            computed inside the step): batch first, never differentiated.
        carry_specs: the carry's parts (batch first where `carry_batched`).
        carry_batched: which carry parts have the batch dimension.
        carry_differentiable: which carry parts get gradients (floating batched states;
            not, e.g., a random seed threaded through the carry).
        param_specs: values the step reads (the cell's variables, read outside the loops).
        batch_size: the static batch size, or None.
    """

    input_spec: tf.TensorSpec
    side_specs: Tuple[tf.TensorSpec, ...]
    carry_specs: Tuple[tf.TensorSpec, ...]
    carry_batched: Tuple[bool, ...]
    carry_differentiable: Tuple[bool, ...]
    param_specs: Tuple[tf.TensorSpec, ...]
    batch_size: Optional[int]

    @property
    def input_differentiable(self) -> bool:
        return self.input_spec.dtype.is_floating

    @property
    def param_differentiable(self) -> Tuple[bool, ...]:
        return tuple(s.dtype.is_floating for s in self.param_specs)


class _Traced(NamedTuple):
    """The step's graph after `_trace`: placeholders, outputs and the gradient."""

    wrapped: object  # the WrappedFunction
    x: tf.Tensor
    sides: List[tf.Tensor]
    carry: List[tf.Tensor]
    params: List[tf.Tensor]
    constants: List[tf.Tensor]  # internal placeholders of captured tensors
    output: tf.Tensor
    new_carry: List[tf.Tensor]
    d_output: tf.Tensor
    d_carry: List[tf.Tensor]  # one per differentiable carry part
    grads: List[tf.Tensor]  # [dx] + d_carry_prev (differentiable parts) + d_params (float)
    forward_ops: list
    backward_ops: list


class _Classified(NamedTuple):
    per_step: List[tf.Tensor]
    invariants: List[tf.Tensor]
    shape_feeds: List[tuple]  # (tensor, op type, static shape, dtype)
    depends_on_carry: Callable
    depends_on_inputs: Callable


class _Layout(NamedTuple):
    compact: bool
    internal: List[tf.Tensor]  # the components of an internal state, in order


class StepProgram:
    """The forward, backward, invariant and restart functions of one step.

    Args:
        step_fn: ``step_fn(x, sides, carry, params) -> (output, new_carry)`` on tensors
            (`sides`, `carry` and `params` flat lists).
        signature: a `StepSignature`.
        xla: whether the sweeps run under XLA (it decides the compact layout's tensors; see
            the module docstring).

    Raises:
        NotImplementedError: when the step does something the executor cannot replay or
            store (a stateful random op, a raw TensorFlow variable, a residual that is not
            a numeric tensor with static non-batch dimensions); the message names it and
            the alternative.
    """

    def __init__(self, step_fn: Callable, signature: StepSignature, xla: bool = False):
        self.signature = signature
        self.xla = xla
        traced = self._trace(step_fn)
        classified = self._classify(traced)
        layout = self._choose_layout(traced, classified)
        self._prune(traced, classified, layout)

    # -- 1. trace ----------------------------------------------------------------------
    def _trace(self, step_fn) -> _Traced:
        sig = self.signature
        num_carry, num_params = len(sig.carry_specs), len(sig.param_specs)
        record = {}

        def traced(*args):
            args = list(args)
            x = args.pop(0)
            sides = [args.pop(0) for _ in sig.side_specs]
            carry, params = args[:num_carry], args[num_carry:num_carry + num_params]
            graph = tf.compat.v1.get_default_graph()
            output, new_carry = step_fn(x, list(sides), list(carry), list(params))
            new_carry = list(new_carry)
            _check_new_carry(new_carry, sig)
            num_forward_ops = len(graph.get_operations())
            d_output = tf.compat.v1.placeholder(output.dtype, output.shape, name="d_output")
            diff = [k for k, d in enumerate(sig.carry_differentiable) if d]
            d_carry = [tf.compat.v1.placeholder(new_carry[k].dtype, new_carry[k].shape,
                                                name=f"d_carry_{k}") for k in diff]
            targets = [x] + [carry[k] for k in diff] + [
                p for p, d in zip(params, sig.param_differentiable) if d]
            ys = [output] + [new_carry[k] for k in diff]
            # Gradients of a tensor used several times are summed two at a time (see
            # `_keep_sums_in_order`).
            if output.dtype.is_floating:
                grads = tf.gradients(ys, targets, grad_ys=[d_output] + d_carry,
                                     unconnected_gradients=tf.UnconnectedGradients.ZERO,
                                     aggregation_method=_PAIRWISE)
            else:  # a non-float output gets no gradient
                grads = tf.gradients(ys[1:], targets, grad_ys=d_carry,
                                     unconnected_gradients=tf.UnconnectedGradients.ZERO,
                                     aggregation_method=_PAIRWISE)
            if not sig.input_differentiable:
                grads = [tf.zeros([0], tf.float32)] + list(grads[1:])
            ops = graph.get_operations()
            record.update(x=x, sides=sides, carry=list(carry), params=list(params),
                          output=output, new_carry=new_carry, d_output=d_output,
                          d_carry=d_carry, grads=list(grads),
                          forward_ops=ops[:num_forward_ops], backward_ops=ops[num_forward_ops:])
            return [output] + new_carry + list(grads)

        specs = ([sig.input_spec] + list(sig.side_specs) + list(sig.carry_specs)
                 + list(sig.param_specs))
        with _plain_cond_intermediates():
            wrapped = tf.compat.v1.wrap_function(traced, specs)
        _check_forward_ops(record["forward_ops"])
        _keep_sums_in_order(wrapped.graph)
        constants, self.captured = [], []
        for external, internal in wrapped.graph.captures:
            if external.dtype == tf.resource:
                raise NotImplementedError(_raw_variable_message(internal))
            constants.append(internal)
            self.captured.append(external)
        self.constant_specs = [tf.TensorSpec(c.shape, c.dtype) for c in constants]
        return _Traced(wrapped=wrapped, constants=constants, **record)

    # -- 2. classify -------------------------------------------------------------------
    def _classify(self, r: _Traced) -> _Classified:
        forward_ops = set(r.forward_ops)
        carry_ids = {id(c) for c in r.carry}
        step_inputs = {id(r.x)} | {id(t) for t in r.sides}
        candidates, shape_reads = [], []
        for op in r.backward_ops:
            for tensor in op.inputs:
                if tensor.op not in forward_ops:
                    continue
                if op.type in _SHAPE_OPS:
                    shape_reads.extend(o for o in op.outputs
                                       if not any(o is s for s in shape_reads))
                elif op.type in ("ZerosLike", "OnesLike"):
                    # Only the shape is read (e.g. the gradient of a carry part that does
                    # not reach the output): fed like a Shape op's result, see `_fill_like`.
                    shape_reads.extend(o for o in op.outputs
                                       if not any(o is s for s in shape_reads))
                elif not any(tensor is t for t in candidates):
                    candidates.append(tensor)
        shape_feeds = []
        batch = self.signature.batch_size
        for out in shape_reads:
            source = out.op.inputs[out.value_index if out.op.type == "ShapeN" else 0]
            static = source.shape
            dims = static.as_list() if static.rank is not None else None
            if dims is None or any(d is None for d in dims[1:]) or (
                    dims and dims[0] is None and batch is not None):
                raise NotImplementedError(
                    f"The cell's gradient reads the shape of {source.name}, whose shape "
                    f"{static} is not static apart from the batch dimension. Use "
                    "keras.layers.RNN for this cell.")
            shape_feeds.append((out, out.op.type, dims, out.dtype))
        depends_on_carry = _depends_on(carry_ids)
        depends_on_inputs = _depends_on(step_inputs)
        per_step, invariants = [], []
        captured = {id(t) for t in r.constants}
        for tensor in candidates:
            if id(tensor) in captured:
                continue  # every pruned function takes the constants (see `_call`)
            if depends_on_carry(tensor):
                per_step.append(tensor)
            elif not depends_on_inputs(tensor):
                invariants.append(tensor)
            # Otherwise a function of x_i and the side inputs (and params, constants): the
            # backward recomputes it from those, so it is never stored.
        return _Classified(per_step, invariants, shape_feeds, depends_on_carry,
                           depends_on_inputs)

    # -- 3. layout ---------------------------------------------------------------------
    def _choose_layout(self, r: _Traced, c: _Classified) -> _Layout:
        new_carry_ids = {id(t) for t in r.new_carry}
        residuals = r.new_carry + [t for t in c.per_step if id(t) not in new_carry_ids]
        order = {id(op): n for n, op in enumerate(r.forward_ops)}
        carry_ids = {id(t) for t in r.carry}
        batch = self.signature.batch_size
        targets = c.per_step + r.new_carry
        # Two compact frontiers: walking back as far as cheap ops go, or stopping where
        # going further would make the backward recompute an expensive function of the
        # input (an LSTM's `x @ W + h @ U`: storing the sum costs what storing `h @ U` does
        # and saves the backward a matrix product per step). The smaller wins; on a tie,
        # the one that recomputes less.
        recomputes_input = _expensive_input_work(c.depends_on_carry, c.depends_on_inputs)
        candidates = []
        for stop in (recomputes_input, None):
            region, frontier = _cheap_region(targets, carry_ids, c.depends_on_carry, stop)
            if not self.xla and batch is not None:
                # A minimum cut: never more bytes than the frontier, itself a cut.
                nearest = _cut_nearest_targets(region, frontier, targets, batch)
                if nearest is not None and (_row_bytes(nearest, batch) * batch
                                            >= NEAREST_CUT_MIN_BYTES * len(nearest)):
                    frontier = nearest
            frontier.sort(key=lambda t: (order.get(id(t.op), -1), t.value_index))
            if frontier and all(_storable(t, batch) for t in frontier):
                candidates.append((_row_bytes(frontier, batch), stop is None, frontier))
        candidates.sort(key=lambda entry: entry[:2])
        compact = bool(candidates) and candidates[0][0] < _row_bytes(residuals, batch)
        internal = candidates[0][2] if compact else residuals
        for tensor in internal:
            if not _storable(tensor, batch):
                raise NotImplementedError(_unstorable_message(tensor, batch))
        return _Layout(compact, internal)

    # -- 4. prune ----------------------------------------------------------------------
    def _prune(self, r: _Traced, c: _Classified, layout: _Layout):
        sig = self.signature
        self.compact = layout.compact
        batch = sig.batch_size
        self.internal_specs = [tf.TensorSpec(t.shape, t.dtype) for t in layout.internal]
        self.internal_batched = [_is_batched(t, batch) for t in layout.internal]
        self.output_spec = tf.TensorSpec(r.output.shape, r.output.dtype)
        self.hidden_bytes_per_row = _row_bytes(r.new_carry, batch, unbatched=False)
        self.internal_bytes_per_row = _row_bytes(layout.internal, batch, unbatched=False)
        self.hidden_unbatched_bytes = _unbatched_bytes(r.new_carry, batch)
        self.internal_unbatched_bytes = _unbatched_bytes(layout.internal, batch)
        # The constants stay captured inputs of every pruned function (`prune` keeps all of
        # the trace's captures, in order); `_call` feeds them.
        step_feeds = [r.x] + r.sides + r.params
        # Internal components that are the step's own carry inputs are taken as they came
        # in, not passed through the forward function.
        carry_position = {id(t): k for k, t in enumerate(r.carry)}
        self._internal_source = [carry_position.get(id(t), -1) for t in layout.internal]
        computed = [t for t in layout.internal if id(t) not in carry_position]
        self._forward = r.wrapped.prune([r.x] + r.sides + r.carry + r.params,
                                        [r.output] + r.new_carry + computed)
        # Invariants with a value known now (constants, static shapes) are passed as
        # constants: computed through a function of the params, XLA would treat the params
        # as compile-time constants and recompile after every update.
        self._static_invariants = [tf.get_static_value(t) for t in c.invariants]
        dynamic = [t for t, v in zip(c.invariants, self._static_invariants) if v is None]
        self._invariants = r.wrapped.prune(r.params, dynamic) if dynamic else None
        self._shape_feeds = [(op_type, dims, dtype) for _, op_type, dims, dtype in c.shape_feeds]
        backward_feeds = (layout.internal + [f[0] for f in c.shape_feeds] + c.invariants
                          + step_feeds + [r.d_output] + r.d_carry)
        self._backward_unique_index = _unique_index(backward_feeds)
        feeds = _unique(backward_feeds)
        self._backward = {True: r.wrapped.prune(feeds, r.grads),
                          False: r.wrapped.prune(feeds, r.grads[1:])}
        if self.compact:
            restart_feeds = layout.internal + step_feeds
            self._restart = r.wrapped.prune(_unique(restart_feeds), r.new_carry)
            self._restart_index = _unique_index(restart_feeds)

    # -- sizes --------------------------------------------------------------------------
    def hidden_bytes(self, batch_size: Optional[int] = None) -> float:
        """Bytes of one hidden state (per batch row when `batch_size` is None)."""
        if batch_size is None:
            return float(self.hidden_bytes_per_row)
        return float(self.hidden_bytes_per_row * batch_size + self.hidden_unbatched_bytes)

    def internal_bytes(self, batch_size: Optional[int] = None) -> float:
        if batch_size is None:
            return float(self.internal_bytes_per_row)
        return float(self.internal_bytes_per_row * batch_size + self.internal_unbatched_bytes)

    @property
    def alpha(self) -> float:
        """What an internal state costs in hidden states (bytes per batch row, the few
        bytes of unbatched parts aside). At least 1: in the checkpointing game an internal
        state is never cheaper than the hidden state it restarts from."""
        hidden = max(self.hidden_bytes(self.signature.batch_size), 1.0)
        return max(1.0, self.internal_bytes(self.signature.batch_size) / hidden)

    # -- calls ---------------------------------------------------------------------------
    def invariants(self, params, constants) -> List[tf.Tensor]:
        dynamic = iter(_call(self._invariants, list(params), constants)
                       if self._invariants else [])
        return [next(dynamic) if value is None else tf.constant(value)
                for value in self._static_invariants]

    def forward(self, x, sides, carry, params, constants):
        """One step: ``(output, new_carry, internal)``; `internal` lists the components of
        the step's internal state (by reference: nothing is copied)."""
        out = _call(self._forward, [x] + list(sides) + list(carry) + list(params), constants)
        num_carry = len(self.signature.carry_specs)
        output = _with_shape(out[0], self.output_spec.shape)
        new_carry = [_with_shape(t, s.shape)
                     for t, s in zip(out[1:1 + num_carry], self.signature.carry_specs)]
        computed = iter(out[1 + num_carry:])
        internal = [carry[k] if k >= 0 else next(computed) for k in self._internal_source]
        internal = [_with_shape(t, s.shape) for t, s in zip(internal, self.internal_specs)]
        return output, new_carry, internal

    def backward(self, internal, x, sides, params, constants, invariants, d_output, d_carry,
                 batch, need_dx):
        """Gradients of one step from its internal state: ``(dx, d_carry_prev, d_params)``,
        `d_carry` and `d_carry_prev` over the differentiable carry parts, `d_params` over
        the floating params; dx is None unless `need_dx`."""
        shape_values = [_shape_value(op_type, dims, dtype, batch)
                        for op_type, dims, dtype in self._shape_feeds]
        feeds = (list(internal) + shape_values + list(invariants) + [x] + list(sides)
                 + list(params) + [d_output] + list(d_carry))
        unique = _gather_unique(feeds, self._backward_unique_index)
        grads = list(_call(self._backward[need_dx], unique, constants))
        if not need_dx:
            grads = [None] + grads
        num_diff = len(d_carry)
        dx = _with_shape(grads[0], x.shape) if need_dx else None
        d_prev = [_with_shape(g, d.shape) for g, d in zip(grads[1:1 + num_diff], d_carry)]
        d_params = [_with_shape(g, s.shape) for g, s in zip(
            grads[1 + num_diff:],
            [s for s, d in zip(self.signature.param_specs,
                               self.signature.param_differentiable) if d])]
        return dx, d_prev, d_params

    def carry_of_internal(self, internal, x, sides, params, constants) -> List[tf.Tensor]:
        """``h_i`` from an internal state ``I_i`` (x and sides are step i's)."""
        num_carry = len(self.signature.carry_specs)
        if not self.compact:
            return list(internal[:num_carry])
        feeds = list(internal) + [x] + list(sides) + list(params)
        out = _call(self._restart, _gather_unique(feeds, self._restart_index), constants)
        return [_with_shape(t, s.shape) for t, s in zip(out, self.signature.carry_specs)]


# --------------------------------------------------------------------------------------
# Checks and messages
# --------------------------------------------------------------------------------------
def _check_new_carry(new_carry, sig):
    if len(new_carry) != len(sig.carry_specs):
        raise ValueError(f"The step returned {len(new_carry)} state tensors; the layer "
                         f"expects {len(sig.carry_specs)}.")
    for k, (tensor, spec) in enumerate(zip(new_carry, sig.carry_specs)):
        if tensor.dtype != spec.dtype or not tensor.shape.is_compatible_with(spec.shape):
            raise ValueError(
                f"State tensor {k} returned by the cell has dtype {tensor.dtype.name} and "
                f"shape {tensor.shape}, but the initial state has dtype {spec.dtype.name} "
                f"and shape {spec.shape}: a recurrent state must keep its dtype and shape "
                "from step to step.")


def _check_forward_ops(ops):
    for op in ops:
        if op.type in _STATEFUL_RANDOM_OPS:
            raise NotImplementedError(
                f"The cell uses TensorFlow's stateful random op {op.type} ({op.name}): it "
                "draws new numbers every time it runs, so a step recomputed for the "
                "gradient would not see the numbers of the first pass, and its gradient "
                "would be wrong. Draw the numbers with Keras's random functions and a "
                "seed generator (`keras.random.normal(shape, seed=self.seed_generator)` "
                "with `self.seed_generator = keras.random.SeedGenerator(seed)` in the "
                "cell, or a `keras.layers.Dropout` sublayer), or with "
                "`tf.random.stateless_*` and a seed derived from the state; or use "
                "keras.layers.RNN for this cell.")
        if op.type in _VARIABLE_OPS:
            raise NotImplementedError(_raw_variable_message(op))


def _raw_variable_message(where) -> str:
    return (f"The cell reads or writes a TensorFlow variable directly ({where.name}) rather "
            "than a Keras variable: MemoryEfficientRNN maps each Keras variable the cell "
            "uses to a tensor so that recomputed steps neither repeat its updates nor "
            "lose its gradient. Create the variable with `self.add_weight(...)` (or "
            "`keras.Variable`), or use keras.layers.RNN for this cell.")


def _unstorable_message(tensor, batch) -> str:
    return (f"A tensor that the cell's backward needs, {tensor.name} (dtype "
            f"{tensor.dtype.name}, shape {tensor.shape}), cannot be stored: an internal state "
            "holds numeric or bool tensors whose dimensions are static apart from the batch "
            "dimension. This happens, e.g., with a data-dependent `tf.cond` inside the "
            "cell (its gradient keeps TensorFlow optionals); compute both branches and "
            "select with `tf.where`, or use keras.layers.RNN for this cell.")


# --------------------------------------------------------------------------------------
# Graph helpers
# --------------------------------------------------------------------------------------
def _is_batched(tensor, batch) -> bool:
    shape = tensor.shape
    return shape.rank is not None and shape.rank >= 1 and shape[0] == batch


def _storable(tensor, batch) -> bool:
    """A tensor an internal state can hold: numeric or bool, and static apart from a
    leading batch dimension."""
    dtype = tensor.dtype
    if not (dtype.is_floating or dtype.is_integer or dtype == tf.bool):
        return False
    shape = tensor.shape
    if shape.rank is None:
        return False
    dims = shape.as_list()
    if _is_batched(tensor, batch):
        dims = dims[1:]
    return all(d is not None for d in dims)


def _row_bytes(tensors, batch, unbatched=True) -> int:
    """Bytes per batch row of the batched tensors (an unstorable one counts as too large
    to afford); unbatched ones add their bytes when `unbatched` (spread over the rows when
    the batch size is known, else counted whole: a rough but safe figure)."""
    total = 0.0
    for t in tensors:
        if not _storable(t, batch):
            return 1 << 62
        size = int(np.prod(t.shape.as_list()[1:] if _is_batched(t, batch)
                           else t.shape.as_list())) * t.dtype.size
        if _is_batched(t, batch):
            total += size
        elif unbatched:
            total += size / batch if batch else size
    return total


def _unbatched_bytes(tensors, batch) -> int:
    return sum(int(np.prod(t.shape.as_list())) * t.dtype.size
               for t in tensors if not _is_batched(t, batch))


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


def _cheap_region(targets, carry_ids, depends, stop=None):
    """``(region, frontier)``: the tensors the carry-dependent `targets` are computed from
    by cheap ops alone (by id), and where that walk stops. The walk goes back from each
    target through `_CHEAP_OPS`, stopping at a carry input or the output of an expensive op
    (and, with `stop`, at a cheap op for which ``stop(op)`` holds); the frontier, the
    tensors it stopped at, is one set the targets follow from. Tensors that do not depend
    on the carry are recomputed from the step's inputs and params, so the walk ignores them
    (as the residuals layout does)."""
    region, frontier, pending = {}, [], list(targets)
    while pending:
        tensor = pending.pop()
        if id(tensor) in region or not depends(tensor):
            continue
        region[id(tensor)] = tensor
        # An op with control inputs is never recomputed: recomputing it would rerun them.
        if (id(tensor) in carry_ids or tensor.op.type not in _CHEAP_OPS
                or tensor.op.control_inputs or (stop is not None and stop(tensor.op))):
            frontier.append(tensor)
        else:
            pending.extend(tensor.op.inputs)
    return region, frontier


def _cut_nearest_targets(region, frontier, targets, batch):
    """Of the sets of tensors of `region` from which the `targets` follow by cheap ops
    alone, one with the fewest bytes and, among those, the nearest the targets (so the
    backward recomputes the least from it); None when every such set holds a tensor an
    internal state cannot store.

    `region` and `frontier` are `_cheap_region`'s; the frontier's tensors are the sources.
    Each tensor of the region is a vertex whose capacity is its bytes per batch row; a
    minimum vertex cut between the sources and the targets is a maximum flow's
    (Edmonds-Karp: a step's region has tens of tensors), and the cut nearest the targets is
    made of the vertices whose outgoing half can still reach the targets in the residual
    graph while their incoming half cannot."""
    sources = {id(t) for t in frontier}
    unlimited = float("inf")
    capacity, neighbours = {}, {}

    def connect(u, v, amount):
        for a, b in ((u, v), (v, u)):
            if (a, b) not in capacity:
                capacity[(a, b)] = 0.0
                neighbours.setdefault(a, []).append(b)
        capacity[(u, v)] += amount

    # Vertex k is split in two: ("in", k) -> ("out", k) carries its bytes.
    for key, tensor in region.items():
        connect(("in", key), ("out", key), _row_bytes([tensor], batch)
                if _storable(tensor, batch) else unlimited)
        if key in sources:
            connect("source", ("in", key), unlimited)
        else:
            for t in tensor.op.inputs:
                if id(t) in region:
                    connect(("out", id(t)), ("in", key), unlimited)
    for t in targets:
        if id(t) in region:
            connect(("out", id(t)), "sink", unlimited)
    flow = dict.fromkeys(capacity, 0.0)

    def residual(u, v):
        return capacity[(u, v)] - flow[(u, v)] > 1e-9

    while True:  # augment along shortest paths until none is left
        parent, queue = {"source": None}, collections.deque(["source"])
        while queue and "sink" not in parent:
            u = queue.popleft()
            for v in neighbours.get(u, ()):
                if v not in parent and residual(u, v):
                    parent[v] = u
                    queue.append(v)
        if "sink" not in parent:
            break
        path, v = [], "sink"
        while parent[v] is not None:
            path.append((parent[v], v))
            v = parent[v]
        amount = min(capacity[e] - flow[e] for e in path)
        if amount == unlimited:
            return None
        for u, v in path:
            flow[(u, v)] += amount
            flow[(v, u)] -= amount
    reaches_sink, pending = {"sink"}, ["sink"]
    while pending:
        v = pending.pop()
        for u in neighbours.get(v, ()):
            if u not in reaches_sink and residual(u, v):
                reaches_sink.add(u)
                pending.append(u)
    return [tensor for key, tensor in region.items()
            if ("in", key) not in reaches_sink and ("out", key) in reaches_sink]


def _expensive_input_work(depends_on_carry, depends_on_inputs):
    """``stop(op)``: whether one of `op`'s inputs is an expensive function of the step's
    input alone (not of the carry), which the backward would recompute at every step."""
    memo = {}

    def expensive(tensor):
        key = id(tensor)
        if key not in memo:
            memo[key] = False
            if depends_on_inputs(tensor) and not depends_on_carry(tensor):
                memo[key] = (tensor.op.type not in _CHEAP_OPS
                             or any(expensive(t) for t in tensor.op.inputs))
        return memo[key]

    return lambda op: any(expensive(t) for t in op.inputs)


def _shape_value(op_type, dims, dtype, batch):
    """The value of a Shape/Size/Rank op (or the tensor a ZerosLike/OnesLike made) from the
    static shape of what it read and the runtime batch size."""
    if op_type in ("ZerosLike", "OnesLike"):
        shape = [batch if d is None else d for d in dims]
        fill = tf.zeros if op_type == "ZerosLike" else tf.ones
        return fill(tf.stack(shape) if any(d is None for d in dims) else shape, dtype)
    values = [tf.cast(batch, dtype) if d is None else tf.constant(d, dtype) for d in dims]
    if op_type in ("Shape", "ShapeN"):
        return tf.stack(values) if values else tf.zeros([0], dtype)
    if op_type == "Size":
        return tf.reduce_prod(tf.stack(values)) if values else tf.constant(1, dtype)
    return tf.constant(len(dims), dtype)  # Rank


def _plain_cond_intermediates():
    """A context in which the gradient of a `tf.cond` keeps the intermediates it needs as
    plain tensors (as under XLA) rather than TensorFlow optionals, which an internal state
    cannot store. (The other branch's intermediates are then unused placeholder values.)
    `tests/test_internals.py` fails loudly if TensorFlow moves this internal switch; without
    it, a cell with a data-dependent `tf.cond` is refused with a clear error."""
    try:
        from tensorflow.python.eager import context

        return context.temporarily_disable_optionals_in_gradients()
    except (ImportError, AttributeError):  # pragma: no cover - internal API moved
        import contextlib

        return contextlib.nullcontext()


_PAIRWISE = tf.AggregationMethod.EXPERIMENTAL_TREE
# Grappler's arithmetic optimizer leaves alone the sums that carry this attribute (it tags
# the nodes it has rewritten so as not to rewrite them twice). `tests/test_internals.py`
# fails loudly if a TensorFlow release renames it.
_ADD_OPS_REWRITTEN = "_grappler_ArithmeticOptimizer_AddOpsRewriteStage"


def _keep_sums_in_order(graph):
    """Keeps every sum of the step's functions a chain of two-term additions, so that a step
    gives the same bits at every run.

    TensorFlow's `AddN` kernel with three or more terms adds them starting from whichever
    input buffer it can reuse, and whether it can depends on which of the other readers of
    that input have already run: the order of the terms, so the rounding, changes from run
    to run. In a step of this layer the inputs of a sum are often read elsewhere too (the
    compact internal state stores ``h @ U`` and the like), and the order in which the store
    and the sum read them is up to the scheduler. Measured: a cell computing ``h = tanh(a +
    b + c)`` with ``b`` and ``c`` stored gave outputs 3e-7 and gradients 8e-6 apart between
    runs of one compiled training step. A sum of two terms gives the same bits in either
    order (floating-point addition is commutative, not associative). So grappler must not
    merge additions into an `AddN` (`_ADD_OPS_REWRITTEN`): that alone made the measured case
    identical run to run. Gradients are also summed in pairs (`_PAIRWISE`), a precaution
    for a gradient sum whose terms are read elsewhere too: no such case has been seen (a
    residual cell, ``h + tanh(h @ U) + sigmoid(h @ V)``, gave identical runs either way),
    and the pairs cost no measurable step time. An `AddN` of three or more terms that the
    cell writes itself (`tf.add_n`) keeps TensorFlow's behaviour."""
    value = tf.compat.v1.AttrValue(b=True)
    for op in graph.get_operations():
        if op.type in ("Add", "AddV2", "AddN"):
            op._set_attr(_ADD_OPS_REWRITTEN, value)


def _call(function, args, constants):
    """Calls a pruned function with `constants` in place of the tensors its trace captured
    (a cell's dropout masks are drawn anew for every call). `ConcreteFunction._call_flat`
    takes the captured inputs explicitly; `tests/test_internals.py` fails loudly if a
    TensorFlow release changes it."""
    if not constants:
        return function(*args)
    return function._call_flat(list(args), list(constants))


def _gather_unique(values, unique_index):
    """The values at their first positions, for a function pruned with `_unique` feeds."""
    unique = [None] * (max(unique_index) + 1 if values else 0)
    for value, index in zip(values, unique_index):
        unique[index] = value
    return unique


def _with_shape(tensor, shape):
    """Gives a function output its static shape back (pruned functions may lose it)."""
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
