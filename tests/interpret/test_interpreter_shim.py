"""The interpreter shim itself (triton_interpreter.py): each workaround on a small kernel of its own,
and the loud failures when it is installed too late or Triton's internals have moved."""
import ast
import types

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

import triton_interpreter


# ------------------------------------------------------------------------------------------------
# 1. autotuning with several configs


@triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"])
@triton.jit
def _double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


def test_autotuned_kernel_with_several_configs_runs():
    # without the shim the autotuner benchmarks both configs and finds no driver to do it with
    x = torch.randn(50)
    y = torch.zeros(50)
    _double[lambda meta: (triton.cdiv(50, meta["BLOCK"]),)](x, y, 50)
    torch.testing.assert_close(y, 2 * x, rtol=0, atol=0)
    assert _double.best_config.kwargs == {"BLOCK": 16}


# ------------------------------------------------------------------------------------------------
# 2. loop variables are tensors, as in compiled Triton


@triton.jit
def _weighted_sum(x_ptr, out_ptr, n, N_STATIC: tl.constexpr):
    acc = tl.zeros([1], dtype=tl.int64)
    for i in range(n):                      # i.to(...) fails on a Python int
        acc += tl.load(x_ptr + i).to(tl.int64) * i.to(tl.int64)
    for j in tl.range(0, n, 2):
        acc += j.to(tl.int64)
    for s in tl.static_range(N_STATIC):     # a compile-time int, left as it is
        acc += s
    tl.store(out_ptr + tl.arange(0, 1), acc)


def test_dynamic_loop_variables_are_tensors():
    x = torch.arange(1, 8, dtype=torch.int64)
    out = torch.zeros(1, dtype=torch.int64)
    _weighted_sum[(1,)](x, out, 7, N_STATIC=4)
    expected = sum(v * i for i, v in enumerate(x.tolist())) + sum(range(0, 7, 2)) + sum(range(4))
    assert out.item() == expected


def test_only_dynamic_range_loops_are_rebound():
    src = ("def f(n):\n"
           "    for i in range(n):\n        pass\n"
           "    for j in tl.range(n):\n        pass\n"
           "    for s in tl.static_range(4):\n        pass\n"
           "    for a, b in zip(x, y):\n        pass\n")
    tree = interpreter.FunctionRewriter.ast_transformer.visit(ast.parse(src))
    loops = [node for node in ast.walk(tree) if isinstance(node, ast.For)]
    first = [ast.unparse(loop.body[0]) for loop in loops]
    assert first[0] == "i = interpreter_semantic.to_tensor(i, False)"
    assert first[1] == "j = interpreter_semantic.to_tensor(j, False)"
    assert first[2] == first[3] == "pass"


# ------------------------------------------------------------------------------------------------
# 3. bf16 computes in fp32 and rounds back


@triton.jit
def _bf16_ops(x_ptr, y_ptr, i_ptr, ew_ptr, dot_ptr, sum_ptr, max_ptr, cast_ptr, const_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    rc = r[:, None] * N + r[None, :]
    x = tl.load(x_ptr + rc)                            # bf16 [N, N]
    y = tl.load(y_ptr + rc)
    ew = tl.where(x < y, tl.maximum(x * y, -x), -x / (x * x + y * y))   # no Python floats: their
    # promotion with bf16 differs across Triton versions
    tl.store(ew_ptr + rc, ew)
    tl.store(dot_ptr + rc, tl.dot(x, y))               # fp32 accumulator
    tl.store(sum_ptr + r, tl.sum(x, axis=1))
    tl.store(max_ptr + r, tl.max(x, axis=1))
    tl.store(cast_ptr + r, tl.load(i_ptr + r).to(tl.bfloat16))
    tl.store(const_ptr + r, tl.full([N], 0.1, tl.bfloat16))


def test_bf16_arithmetic_dot_reductions_casts_and_constants_are_computed_on_values():
    N = 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, N, generator=gen).bfloat16()
    y = torch.randn(N, N, generator=gen).bfloat16()
    ints = torch.randint(-300, 300, (N,), generator=gen, dtype=torch.int32)
    ew = torch.empty_like(x)
    s, m, cast, const = (torch.empty(N).bfloat16() for _ in range(4))
    dot = torch.empty(N, N)
    _bf16_ops[(1,)](x, y, ints, ew, dot, s, m, cast, const, N=N)

    # torch's bf16 ops also compute in fp32 and round each result to bf16
    expected_ew = torch.where(x < y, torch.maximum(x * y, -x), -x / (x * x + y * y))
    torch.testing.assert_close(ew, expected_ew, rtol=0, atol=0)
    torch.testing.assert_close(dot, x.float() @ y.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, x.float().sum(1).bfloat16(), rtol=1e-2, atol=1e-2)  # summation order
    torch.testing.assert_close(m, x.max(1).values, rtol=0, atol=0)
    torch.testing.assert_close(cast, ints.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(const, torch.full((N,), 0.1).bfloat16(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# loud failures


def test_install_refuses_once_fla_is_imported():
    with pytest.raises(RuntimeError, match="before fla is imported"):
        triton_interpreter.check_fla_not_imported({"fla.ops.gla": types.ModuleType("fla.ops.gla")})


def test_changed_internals_fail_naming_the_triton_version():
    moved = types.SimpleNamespace()   # an interpreter module whose builder class has gone
    with pytest.raises(triton_interpreter.InterpreterInternalsChanged, match=f"triton {triton.__version__}"):
        triton_interpreter.check_internals({"interpreter": moved, "autotuner": moved})

    class Builder:                    # one whose binary_op takes other arguments
        def binary_op(self, a, b):
            pass
    renamed = types.SimpleNamespace(InterpreterBuilder=Builder)
    with pytest.raises(triton_interpreter.InterpreterInternalsChanged, match="binary_op takes"):
        triton_interpreter.check_internals({"interpreter": renamed, "autotuner": renamed})
