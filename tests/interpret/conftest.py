"""Tests of the Triton path on CPU, through Triton's interpreter.

    TRITON_INTERPRET=1 python -m pytest -q tests/interpret

They run on their own, in a process of their own (the default `pytest` run leaves this folder out,
see pyproject.toml): the interpreter is chosen for the whole process when kernels are decorated,
triton.language's own helpers when triton is first imported, which torch and transformers do
early, hence the variable in the environment. The shim is installed here, before any test imports
fla, and fails with that command line when the variable was missing.
"""
import triton_interpreter

triton_interpreter.install()
