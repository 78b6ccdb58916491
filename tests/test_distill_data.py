"""Training data: texts through `datasets`, segments, packing with position resets, determinism,
resumable positions, disjoint rank shares, and the error for a dataset without the text field."""
import json
import math

import pytest
import torch

from distill.data import (
    DataPosition, PackedLoader, iterate_once, load_texts, pack_row, tokenize_segments,
)
from distill.losses import IGNORE_INDEX
from quasar_model.teacher_outputs.cache import CapturedSequence

K, V = 4, 50


def fake_sequence(i: int, T: int) -> CapturedSequence:
    """A captured sequence whose every field says which sequence and position it came from."""
    g = torch.Generator().manual_seed(i)
    ids = torch.randint(1, V, (T,), generator=g)
    lp = torch.log_softmax(torch.randn(T, K, generator=g), -1) + math.log(0.9)
    return CapturedSequence(index=i, input_ids=ids, topk_ids=torch.randperm(V, generator=g)[:K].expand(T, K),
                            topk_logprobs=lp, tail_mass=torch.full((T,), 0.1))


def fake_cache(n=40, seed=0, max_len=16):
    g = torch.Generator().manual_seed(seed)
    return [fake_sequence(i, int(torch.randint(1, max_len + 1, (1,), generator=g))) for i in range(n)]


class CharTokenizer:
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


# -----------------------------------------------------------------------------
# texts and segments

def test_load_texts_local_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate("xyz")))
    assert list(load_texts(tmp_path / "a.jsonl")) == ["x", "y", "z"]
    d = tmp_path / "docs"
    d.mkdir()
    (d / "2.txt").write_text("second\n\ndoc")
    (d / "1.txt").write_text("first")
    assert list(load_texts(d)) == ["first", "second\n\ndoc"]          # one document per file, sorted
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert list(load_texts(tmp_path / "b.jsonl", text_field="body")) == ["x"]


def test_no_text_field_is_a_clear_error(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text(json.dumps({"content": "hi", "meta": 1}) + "\n")
    with pytest.raises(ValueError, match=r"no text field 'text'.*fields present: \['content', 'meta'\]"):
        list(load_texts(p))
    with pytest.raises(ValueError, match="no such file"):
        list(load_texts(tmp_path / "missing.jsonl"))


def test_segments_keep_documents_apart():
    docs = ["abcdefg", "", "hi"]
    segs = list(tokenize_segments(docs, CharTokenizer(), seq_len=3))
    assert all(1 <= len(s) <= 3 for s in segs)
    # EOS (0) ends each document; a segment never holds the end of one document and the next
    assert segs == [[97, 98, 99], [100, 101, 102], [103, 0], [104, 105, 0]]


# -----------------------------------------------------------------------------
# packing

def test_pack_row_positions_labels_mask():
    a, b = fake_sequence(0, 5), fake_sequence(1, 3)
    row = pack_row([a, b], seq_len=10, k=K, pad_id=7)
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert row["mask"].tolist() == [True] * 8 + [False] * 2
    lab = row["labels"].tolist()
    assert lab[:4] == a.input_ids[1:].tolist() and lab[4] == IGNORE_INDEX     # no label across the boundary
    assert lab[5:7] == b.input_ids[1:].tolist() and lab[7:] == [IGNORE_INDEX] * 3
    assert row["input_ids"][8:].tolist() == [7, 7]
    assert torch.equal(row["topk_ids"][5:8], b.topk_ids) and torch.equal(row["tail"][:5], a.tail_mass)
    with pytest.raises(ValueError, match="do not fit"):
        pack_row([a, b], seq_len=7, k=K)


def test_packed_row_computes_what_each_segment_computes_alone():
    """Position resets make a packed row equal to its segments run one by one (attention, branches,
    engram, loops): a KD target never sees another document."""
    from quasar_model import QuasarLongConfig, QuasarLongForCausalLM

    torch.manual_seed(0)
    model = QuasarLongForCausalLM(QuasarLongConfig.preset("tiny", vocab_size=V)).eval()
    segs = [fake_sequence(i, T) for i, T in enumerate((7, 5, 9))]
    row = pack_row(segs, seq_len=24, k=K)
    with torch.no_grad():
        packed = model(input_ids=row["input_ids"][None], position_ids=row["position_ids"][None],
                       use_cache=False).logits[0]
        start = 0
        for s in segs:
            alone = model(input_ids=s.input_ids[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + len(s)], alone, atol=2e-5, rtol=1e-4)
            start += len(s)


def batches_rows(loader, n):
    """n batches -> list of rows, each row the tuple of the sequence ids it holds (by input ids)."""
    out = []
    for _ in range(n):
        b = loader.next_batch()
        out.append((b.input_ids.clone(), b.position_ids.clone(), b.mask.clone()))
    return out


def test_loader_is_deterministic_and_resumable():
    cache = fake_cache()
    run = lambda seed: batches_rows(PackedLoader(cache, 32, 4, seed), 12)   # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    # stop after 5 batches, restore the position into a fresh loader: the same stream follows
    first = PackedLoader(cache, 32, 4, 0)
    batches_rows(first, 5)
    pos = DataPosition.from_dict(json.loads(json.dumps(first.state_dict())))
    second = PackedLoader(cache, 32, 4, 0)
    second.load_state_dict(pos.to_dict())
    rest = batches_rows(second, 7)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a[5:], rest))


def test_every_epoch_visits_every_sequence_once():
    cache = fake_cache(n=30)
    loader = PackedLoader(cache, 32, 2, seed=3)
    seen, epoch_of = [], []
    while loader.position.epoch < 2:
        rows, loader.position = loader.plan_rows(1, loader.position)
        seen.extend(rows[0])
        epoch_of.extend([loader.position.epoch - (loader.position.offset == 0)] * len(rows[0]))
        assert sum(len(cache[i]) for i in rows[0]) <= 32
    assert sorted(seen[:30]) == list(range(30)) and sorted(seen[30:60]) == list(range(30))
    assert seen[:30] != seen[30:60]                                       # a new order each epoch


def test_rank_shares_are_disjoint_and_complete():
    cache = fake_cache()
    whole = PackedLoader(cache, 32, 4, seed=0)
    parts = [PackedLoader(cache, 32, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):
        full = whole.next_batch().input_ids
        r0, r1 = (p.next_batch().input_ids for p in parts)
        assert torch.equal(full[0::2], r0) and torch.equal(full[1::2], r1)
    with pytest.raises(ValueError, match="divide evenly"):
        PackedLoader(cache, 32, 3, seed=0, world_size=2)


def test_iterate_once_and_length_check():
    cache = fake_cache(n=25)
    tokens = sum(int(b.mask.sum()) for b in iterate_once(cache, 32, 3))
    assert tokens == sum(len(s) for s in cache)
    shares = [sum(int(b.mask.sum()) for b in iterate_once(cache, 32, 3, rank=r, world_size=2)) for r in range(2)]
    assert sum(shares) == tokens
    assert len(list(iterate_once(cache, 32, 3, rank=0, world_size=2))) == \
        len(list(iterate_once(cache, 32, 3, rank=1, world_size=2)))          # ranks run the same steps
    with pytest.raises(ValueError, match="longer than seq_len=8"):
        PackedLoader(cache, 8, 2, seed=0)
