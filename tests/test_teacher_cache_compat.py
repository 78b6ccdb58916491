"""A teacher cache written before issue 16's moves (tests/data/teacher_cache_v1, made by the code of
437df25 from the sequences below) still opens, verifies and reads back the same values, and
writing those sequences again gives the same cache id: the format did not change with the code's home."""

from dataclasses import replace
from pathlib import Path

import torch

from quasar_model.teacher_outputs.cache import CapturedSequence, TeacherCacheMeta, TeacherCacheWriter, open_teacher_cache

FIXTURE = Path(__file__).parent / "data" / "teacher_cache_v1"
CACHE_ID = "6727916c4d87b3733b233ac45e5af46edc699761c41e6c947de79a0ad2b9959b"
LENGTHS, K, V = [5, 3, 4], 4, 32


def _sequence(i: int, n: int) -> CapturedSequence:
    g = torch.Generator().manual_seed(i)
    ids = torch.randint(0, V, (n,), generator=g)
    top = torch.log_softmax(torch.randn(n, V, generator=g), -1).topk(K, -1)
    return CapturedSequence(i, ids, top.indices, top.values, 1 - top.values.exp().sum(-1))


def _meta() -> TeacherCacheMeta:
    return TeacherCacheMeta("fixture-teacher", None, "f" * 64, V, K, 1.0, "d" * 64, logprob_dtype="bfloat16")


def test_a_cache_written_before_the_move_opens_and_reads_back():
    cache = open_teacher_cache(FIXTURE / CACHE_ID, tokenizer_fingerprint="f" * 64, k=K, vocab_size=V)
    assert cache.meta == replace(_meta(), num_sequences=3, num_tokens=12)
    assert len(cache) == len(LENGTHS) and len(cache.shards) == 2
    for got, n in zip(cache, LENGTHS):
        want = _sequence(got.index, n)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.topk_ids, want.topk_ids)
        torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs.bfloat16().float())
        torch.testing.assert_close(got.tail_mass, want.tail_mass)


def test_the_same_sequences_written_now_get_the_same_cache_id(tmp_path):
    with TeacherCacheWriter(tmp_path, _meta(), shard_tokens=6) as w:
        for i, n in enumerate(LENGTHS):
            w.add(_sequence(i, n))
    assert w.path.name == CACHE_ID
    for f in (FIXTURE / CACHE_ID).iterdir():
        assert (w.path / f.name).read_bytes() == f.read_bytes(), f.name
