"""Run fla's Triton kernels on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).

`install()` turns the interpreter on and works around three gaps that stop fla's kernels from
running there, or make them compute nonsense:

1. Autotuning. A kernel with more than one config benchmarks each one through the active driver,
   and with no GPU there is none ("0 active drivers"). Timing means nothing in the interpreter
   anyway, so the autotuner is given one config per call (the first that survives the kernel's own
   pruning for that call's arguments).
2. Loop variables. The interpreter runs `for i in range(n)` as a Python loop, so `i` is a Python
   int, while compiled Triton makes it a tensor; kernels that call `i.to(tl.int64)` then fail.
   The interpreter already rewrites each kernel's source through an AST transformer; ours also
   rebinds the loop variable as a tensor at the top of each `range` / `tl.range` loop body.
   `tl.static_range` loops are unrolled at compile time and their variable is a constexpr, so they
   are left alone.
3. bfloat16. The interpreter holds bf16 values as their raw 16-bit patterns (uint16), and NumPy
   then does dot products, arithmetic, comparisons, unary math, reductions and casts on the bit
   patterns (results around 1e10, or NaN). Here each of those ops widens bf16 operands to fp32,
   computes, and rounds a floating result back to bf16 (round to nearest even, as the GPU's
   conversion does). bf16 constants are made the same way (triton 3.7 cannot make them at all).

triton.jit picks the interpreter when a kernel is decorated: for triton.language's own helpers
when triton is first imported (torch and transformers import it early, so TRITON_INTERPRET=1 has to
be in the environment from the start), for fla's kernels when fla is imported (so this must be
installed before the first import of fla). Both are checked. It patches interpreter internals, so it checks
that they still look as they did in the Triton it was written against and fails loudly, naming the
installed Triton version, when they do not.
"""
from __future__ import annotations

import ast
import functools
import inspect
import os
import sys

TESTED_WITH = "triton 3.7.1 and 3.9.0 (with flash-linear-attention / fla-core 0.6.0)"

# (object path, parameters its signature must start with): what the workarounds rely on
_INTERNALS = {
    "interpreter.InterpreterBuilder.binary_op": ["self", "lhs", "rhs", "op"],
    "interpreter.InterpreterBuilder.unary_op": ["self", "arg", "op"],
    "interpreter.InterpreterBuilder.ternary_op": ["self", "lhs", "rhs", "other", "op"],
    "interpreter.InterpreterBuilder.create_fma": ["self", "x", "y", "z"],
    "interpreter.InterpreterBuilder.create_erf": ["self", "arg"],
    "interpreter.InterpreterBuilder.create_rsqrt": ["self", "arg"],
    "interpreter.InterpreterBuilder.create_dot": ["self", "a", "b", "d"],
    "interpreter.InterpreterBuilder.cast_impl": ["self", "src", "dst_type"],
    "interpreter.InterpreterBuilder.create_fp_to_fp": ["self", "src", "dst_type", "rounding_mode"],
    "interpreter.ReduceScanOpInterface.apply": ["self", "input"],
    "interpreter.ASTTransformer": None,
    "interpreter.FunctionRewriter.ast_transformer": None,
    "interpreter.TensorHandle": ["data", "dtype"],
    "interpreter.InterpretedFunction": None,
    "interpreter.interpreter_semantic.to_tensor": ["x", "check_type"],
    "autotuner.Autotuner.prune_configs": ["self", "kwargs"],
    "autotuner.Autotuner.run": ["self", "args", "kwargs"],
}

_installed = False


class InterpreterInternalsChanged(RuntimeError):
    pass


def _fail(what: str) -> None:
    import triton
    raise InterpreterInternalsChanged(
        f"triton {triton.__version__}: {what}. The interpreter shim in {__file__} was written "
        f"against {TESTED_WITH}; adapt it to this Triton or install that version.")


def check_internals(modules) -> None:
    """modules: {"interpreter": triton.runtime.interpreter, "autotuner": triton.runtime.autotuner}."""
    for path, params in _INTERNALS.items():
        mod_name, *attrs = path.split(".")
        obj = modules[mod_name]
        for attr in attrs:
            if not hasattr(obj, attr):
                _fail(f"triton.runtime.{path} no longer exists")
            obj = getattr(obj, attr)
        if params is not None:
            got = list(inspect.signature(obj).parameters)
            if got[:len(params)] != params:
                _fail(f"triton.runtime.{path} takes {got}, expected it to start with {params}")


def check_fla_not_imported(modules) -> None:
    already = sorted(m for m in modules if m == "fla" or m.startswith("fla."))
    if already:
        raise RuntimeError(
            "the Triton interpreter shim must be installed before fla is imported (triton.jit "
            f"chooses the interpreter when fla's kernels are decorated); already imported: {already[:3]}")


def check_language_interpreted(interpreter) -> None:
    """triton.language's own helpers (tl.zeros, tl.sum, ...) are decorated when triton is first
    imported, and torch/transformers import it early: the variable has to be set by then."""
    import triton.language as tl
    if not isinstance(tl.zeros, interpreter.InterpretedFunction):
        raise RuntimeError(
            "triton was imported before TRITON_INTERPRET=1 was set, so its own helpers were not "
            "made for the interpreter: set it in the environment, e.g. "
            "`TRITON_INTERPRET=1 python -m pytest -q tests/interpret`")


def install() -> None:
    """Enable Triton's interpreter with the three workarounds. Idempotent; before any fla import."""
    global _installed
    if _installed:
        return
    check_fla_not_imported(sys.modules)
    if "triton.language" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"

    from triton.runtime import autotuner, interpreter
    check_internals({"interpreter": interpreter, "autotuner": autotuner})
    check_language_interpreted(interpreter)
    _single_autotune_config(autotuner.Autotuner)
    _loop_variables_as_tensors(interpreter)
    _bf16_through_fp32(interpreter)
    _installed = True


# ------------------------------------------------------------------------------------------------
# 1. autotuning


def _single_autotune_config(Autotuner) -> None:
    run = Autotuner.run

    @functools.wraps(run)
    def run_one_config(self, *args, **kwargs):
        configs = self.configs
        if len(configs) <= 1:
            return run(self, *args, **kwargs)
        # the first config the kernel's own pruning keeps for these arguments; with one config the
        # autotuner runs it without benchmarking (there is no driver to time it with)
        self.nargs = dict(zip(self.arg_names, args))
        self.configs = self.prune_configs(kwargs)[:1]
        try:
            return run(self, *args, **kwargs)
        finally:
            self.configs = configs

    Autotuner.run = run_one_config


# ------------------------------------------------------------------------------------------------
# 2. loop variables


def _is_dynamic_range(it: ast.expr) -> bool:
    """`range(...)` or `<anything>.range(...)`, e.g. `tl.range`; not `tl.static_range(...)`."""
    if not isinstance(it, ast.Call):
        return False
    f = it.func
    return (isinstance(f, ast.Name) and f.id == "range") or (isinstance(f, ast.Attribute) and f.attr == "range")


def _loop_variables_as_tensors(interpreter) -> None:
    class LoopVariablesAsTensors(interpreter.ASTTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            if isinstance(node.target, ast.Name) and _is_dynamic_range(node.iter):
                name = node.target.id
                # i = interpreter_semantic.to_tensor(i, False): a tensor, as compiled Triton gives
                to_tensor = ast.Attribute(value=ast.Name(id="interpreter_semantic", ctx=ast.Load()),
                                          attr="to_tensor", ctx=ast.Load())
                rebind = ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())],
                                    value=ast.Call(func=to_tensor,
                                                   args=[ast.Name(id=name, ctx=ast.Load()),
                                                         ast.Constant(value=False)],
                                                   keywords=[]))
                node.body.insert(0, ast.copy_location(rebind, node.body[0]))
            return node

    interpreter.FunctionRewriter.ast_transformer = LoopVariablesAsTensors()


# ------------------------------------------------------------------------------------------------
# 3. bfloat16


def _bf16_through_fp32(interpreter) -> None:
    import numpy as np
    import triton.language as tl
    from triton._C.libtriton import ir

    TensorHandle = interpreter.TensorHandle
    Builder = interpreter.InterpreterBuilder

    def is_bf16(h) -> bool:
        return isinstance(h, TensorHandle) and getattr(h.dtype, "scalar", h.dtype) == tl.bfloat16

    def widen(h):
        """bf16 handle -> fp32 handle with the same values (exact); anything else as it is."""
        if not is_bf16(h):
            return h
        return TensorHandle((np.asarray(h.data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32),
                            tl.float32)

    def to_bf16_bits(x, rtz=False):
        x = np.ascontiguousarray(x, dtype=np.float32)
        bits = x.view(np.uint32)
        if not rtz:  # round to nearest, ties to even
            bits = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        out = (bits >> np.uint32(16)).astype(np.uint16)
        return np.where(np.isnan(x), np.uint16(0x7FC0), out)

    def result(h, bf16_out: bool):
        """Back to bf16 where the op's result is bf16; comparisons give int1, not a float type."""
        if h.data.dtype == np.bool_:
            return TensorHandle(h.data, tl.int1)
        if bf16_out and h.data.dtype == np.float32:
            return TensorHandle(to_bf16_bits(h.data), tl.bfloat16)
        return h

    def through_fp32(method, out_follows):
        """Wrap a builder method: widen bf16 handle arguments; the result is bf16 when the
        argument at index `out_follows` (the one whose type the op's result takes) was."""
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            if not any(is_bf16(a) for a in args):
                return method(self, *args, **kwargs)
            out = method(self, *(widen(a) for a in args), **kwargs)
            return result(out, is_bf16(args[out_follows]))
        return wrapper

    Builder.binary_op = through_fp32(Builder.binary_op, 0)       # lhs, rhs, op
    Builder.unary_op = through_fp32(Builder.unary_op, 0)         # arg, op
    Builder.ternary_op = through_fp32(Builder.ternary_op, 2)     # cond/x, lo/a, hi/b, op
    Builder.create_fma = through_fp32(Builder.create_fma, 2)     # x, y, z
    Builder.create_erf = through_fp32(Builder.create_erf, 0)
    Builder.create_rsqrt = through_fp32(Builder.create_rsqrt, 0)
    Builder.create_dot = through_fp32(Builder.create_dot, 2)     # a, b, accumulator

    cast_impl = Builder.cast_impl

    @functools.wraps(cast_impl)
    def cast(self, src, dst_type):
        dst_bf16 = dst_type.scalar == tl.bfloat16
        if is_bf16(src) == dst_bf16:
            return cast_impl(self, src, dst_type)
        if dst_bf16:  # int / fp64 / fp32 -> bf16: through fp32, rounded to nearest even
            return TensorHandle(to_bf16_bits(src.data.astype(np.float32)), tl.bfloat16)
        return cast_impl(self, widen(src), dst_type)

    Builder.cast_impl = cast

    fp_to_fp = Builder.create_fp_to_fp

    @functools.wraps(fp_to_fp)
    def fp_to_fp_rounded(self, src, dst_type, rounding_mode):
        dst_bf16 = dst_type.scalar == tl.bfloat16
        if not (is_bf16(src) or dst_bf16) or (is_bf16(src) and dst_bf16):
            return fp_to_fp(self, src, dst_type, rounding_mode)
        if dst_bf16 and src.dtype.scalar in (tl.float32, tl.float64):
            # the interpreter's own rounding carries a mantissa overflow into the exponent wrongly
            data = src.data.astype(np.float32)
            return TensorHandle(to_bf16_bits(data, rtz=rounding_mode == ir.ROUNDING_MODE.RTZ), tl.bfloat16)
        return fp_to_fp(self, widen(src), dst_type, rounding_mode)

    Builder.create_fp_to_fp = fp_to_fp_rounded

    def get_bf16(self, value):
        # a bf16 constant (tl.zeros/tl.full in bf16); triton 3.7 has no get_bf16 at all
        return TensorHandle(to_bf16_bits(np.array([value], dtype=np.float32)), tl.bfloat16)

    Builder.get_bf16 = get_bf16

    Reduce = interpreter.ReduceScanOpInterface
    apply = Reduce.apply

    def as_tensor(h, like):
        shape = list(h.data.shape)
        ty = tl.block_type(h.dtype, shape) if like.type.is_block() else h.dtype
        return tl.core.tensor(h, ty)

    @functools.wraps(apply)
    def apply_fp32(self, input):
        inputs = input if isinstance(input, tuple) else (input,)
        was_bf16 = [isinstance(t, tl.core.tensor) and is_bf16(t.handle) for t in inputs]
        if not any(was_bf16):
            return apply(self, input)
        wide = tuple(as_tensor(widen(t.handle), t) if b else t for t, b in zip(inputs, was_bf16))
        out = apply(self, wide if isinstance(input, tuple) else wide[0])
        outs = out if isinstance(out, tuple) else (out,)
        back = tuple(
            as_tensor(result(o.handle, True), o)
            if i < len(was_bf16) and was_bf16[i] and o.handle.data.dtype == np.float32 else o
            for i, o in enumerate(outs))
        return back if isinstance(out, tuple) else back[0]

    Reduce.apply = apply_fp32
