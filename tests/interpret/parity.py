"""Run an op once per kernel backend on the same inputs and compare outputs and gradients.

The measure is the one the CUDA tests use: the RMS of the difference relative to the RMS of the
reference (the 'torch' backend), so bf16 results are judged at the scale of the data.
"""
from __future__ import annotations

import torch


def err_ratio(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.float(), ref.float()
    return ((got - ref).square().mean().sqrt() / ref.square().mean().sqrt().clamp_min(1e-8)).item()


def run_backend(op, inputs: dict, backend: str, grad: bool = True):
    """op(**inputs, backend=backend) on fresh leaves -> (outputs, {"d<name>": gradient}).

    op returns tensors, or tuples of them (GSA's state pair), or None for an output not asked
    for. The loss is a fixed random projection of every output, so every element matters."""
    leaves = {k: None if x is None else x.detach().clone().requires_grad_(grad) for k, x in inputs.items()}
    outs = _flatten(op(**leaves, backend=backend))
    if not grad:
        return outs, {}
    gen = torch.Generator().manual_seed(1)
    sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs).backward()
    return outs, {"d" + k: x.grad for k, x in leaves.items() if x is not None}


def compare(op, inputs: dict, out_names, tol: float, grad_tol: float | None = None, grad: bool = True):
    """'triton' against 'torch' -> [(name, error ratio, tolerance)], outputs then gradients, after
    checking shapes and dtypes, that the Triton results are finite, and that no reference is all
    zeros (a comparison against zeros would prove nothing)."""
    got_o, got_g = run_backend(op, inputs, "triton", grad)
    ref_o, ref_g = run_backend(op, inputs, "torch", grad)
    assert len(got_o) == len(ref_o) == len(out_names), (len(got_o), len(ref_o), out_names)
    pairs = [(n, a, b, tol) for n, a, b in zip(out_names, got_o, ref_o)]
    pairs += [(n, got_g[n], ref_g[n], grad_tol or tol) for n in ref_g]
    rows = []
    for name, a, b, t in pairs:
        assert a is not None and b is not None, f"{name}: missing (gradient not propagated?)"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        assert torch.isfinite(a.float()).all(), f"{name}: the Triton result has NaN/inf"
        assert b.float().abs().max() > 0, f"{name}: the reference is all zeros"
        rows.append((name, err_ratio(a, b), t))
    return rows


def assert_parity(rows) -> None:
    bad = [f"{name}: {err:.3g} > {tol:g}" for name, err, tol in rows if not err < tol]
    assert not bad, "the triton and torch backends differ: " + "; ".join(bad)


def _flatten(out):
    flat = []
    for x in out:
        if isinstance(x, (tuple, list)):
            flat.extend(_flatten(x))
        elif x is not None:
            flat.append(x)
    return flat
