"""The tiny model with kernel_backend="triton" against "torch": forward and backward, under Triton's
interpreter, every branch (quasar: delta rule, raven: GSA, gla: simple GLA) on fla's kernels.

fp32, unlike the CUDA test's bf16: here GLA and GSA then agree to fp32 rounding, and the one
difference left is the delta rule's chunk kernel, which fla runs in bf16 only. That difference
is amplified by the randomly initialised model (rounding only the delta rule's inputs to bf16 on
the torch path alone moves the gradient by ~1.5%), and MoE routing would turn it into O(1)
changes wherever a token's top-k choice flips: the FFNs are dense, so what is compared is the
kernels, not which expert a token happened to pick.
"""
import torch

from parity import err_ratio
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM


LAYERS = QuasarLongConfig.preset("tiny").num_hidden_layers


def build(backend):
    torch.manual_seed(0)
    cfg = QuasarLongConfig.preset("tiny", kernel_backend=backend, initializer_range=0.05,
                                  hidden_size=64, first_k_dense_replace=LAYERS)
    return QuasarLongForCausalLM(cfg).train()


def test_forward_backward_triton_matches_torch():
    # one row of 40 tokens: a partial chunk; the op tests cover batches and chunk boundaries
    ids = torch.randint(0, 384, (1, 40), generator=torch.Generator().manual_seed(0))
    losses, grads = {}, {}
    for backend in ("triton", "torch"):
        model = build(backend)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses[backend] = loss.item()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["triton"].keys() == grads["torch"].keys()
    assert abs(losses["triton"] - losses["torch"]) < 2e-2, losses    # as the CUDA test
    flat = {b: torch.cat([g.flatten() for g in grads[b].values()]) for b in grads}
    err = err_ratio(flat["triton"], flat["torch"])
    assert err < 5e-2, f"gradient error ratio {err:.3g}"               # the CUDA test's bound, per tensor there
