"""Red team: the held-out set. A miner who precomputed (memorised) the teacher's outputs on a fixed set
of documents - the dataset's first N, as the old 200,000-document pool was, or any other fixed set -
must hold no more of a round's held-out documents than that set's share of the whole dataset.

The real code path throughout: eval.heldout_data's HubSource reading a parquet dataset through
huggingface_hub from a stand-in Hub on 127.0.0.1 (tests/servers.py: revision info, recursive tree,
HTTP range reads), eval.heldout.draw_documents, and once the whole eval.evaluate.prepare_round a
validator runs, with the tiny teacher.
"""
import dataclasses
import json

import pytest

from eval.competition import CompetitionError, load_competition, parse_competition
from eval.heldout import draw_documents, heldout_source
from eval.heldout_data import (LOCAL_SHARD_DOCS, HeldoutDataError, HubSource, LocalSource, local_revision,
                               split_files)
from servers import DatasetHub, parquet_bytes, running

REPO = "corp/web"
# the split's files (rows), as the Hub lays out a large web corpus: crawls in folders, shards in each
TRAIN = {"data/CC-A/train-00000-of-00002.parquet": 40, "data/CC-A/train-00001-of-00002.parquet": 10,
         "data/CC-B/train-00000-of-00003.parquet": 25, "data/CC-B/train-00001-of-00003.parquet": 60,
         "data/CC-B/train-00002-of-00003.parquet": 5, "data/CC-C/train-00000-of-00001.parquet": 30}
TOTAL = sum(TRAIN.values())
EMPTY = {("data/CC-B/train-00001-of-00003.parquet", r) for r in (3, 17, 41)}  # rows with no text
N = 8   # documents per round


def text(path: str, row: int) -> str:
    if (path, row) in EMPTY:
        return ""
    return f"{path} row {row}: " + " ".join(f"w{(row * 7 + i) % 50}" for i in range(300 + row % 50))


def dataset_files() -> dict:
    files = {p: parquet_bytes({"text": [text(p, r) for r in range(n)], "id": list(range(n))}, row_group_size=7)
             for p, n in TRAIN.items()}
    # not the split: another split, a sample subset of the same rows, the card
    files["data/CC-A/test-00000-of-00001.parquet"] = parquet_bytes({"text": ["held back"] * 5}, 5)
    files["sample/10BT/000_00000.parquet"] = parquet_bytes({"text": [text(p, 0) for p in TRAIN]}, 5)
    files["README.md"] = b"---\nconfigs: [{config_name: default, data_files: data/*/*}]\n---\n"
    return files


class Words:
    """A tokenizer stand-in: one id per word. The draw only needs encode()."""

    def encode(self, s: str) -> list[int]:
        return [sum(map(ord, w)) % 1000 for w in s.split()]


@pytest.fixture
def hub():
    fake = DatasetHub()
    fake.commit = fake.add_commit(REPO, dataset_files())
    with running(fake.app) as port:
        fake.endpoint = f"http://127.0.0.1:{port}"
        yield fake


def source(hub, cache, revision=None, **kw) -> HubSource:
    return HubSource(kw.pop("dataset", REPO), kw.pop("split", "train"), kw.pop("text_field", "text"),
                     revision or hub.commit, cache_root=cache, endpoint=hub.endpoint)


def draw(src, seed, n=N):
    return draw_documents(src, seed, n, Words(), 64)


def origin(doc) -> tuple[str, int]:
    path, row = doc.origin.rsplit("#", 1)
    return path, int(row)


# -----------------------------------------------------------------------------
# the attack

def test_memorising_the_first_n_documents_or_any_fixed_set_gains_nothing(hub, tmp_path):
    """The old pool was the split's first documents in stored order: a miner who captured the teacher
    on them held 100% of every round. Now the round's documents are drawn over every file and row:
    the first N (here the whole first file, 40 of 170 rows), any other fixed set of that size, and a
    past round's revealed documents are each covered only at their share of the dataset."""
    src = source(hub, tmp_path / "cache")
    files = src.files()
    assert [f.path for f in files] == sorted(TRAIN) and sum(f.rows for f in files) == TOTAL
    seeds = range(1000, 1060)
    rounds = {s: [origin(d) for d in draw(src, s)] for s in seeds}

    stored_order = [(p, r) for p in sorted(TRAIN) for r in range(TRAIN[p])]   # how the old pool read the split
    first_n = set(stored_order[:40])
    last_n = set(stored_order[-40:])
    drawn = [d for docs in rounds.values() for d in docs]
    share = len(first_n) / (TOTAL - len(EMPTY))
    for memorised in (first_n, last_n):
        covered = sum(d in memorised for d in drawn) / len(drawn)
        # 480 draws: a binomial's mean 0.24 +- 3 sd (0.06); the old pool made this 1.0
        assert abs(covered - share) < 0.07, (covered, share)
    # the round's documents come from every data file, and from rows deep inside each one
    assert {p for p, _ in drawn} == set(TRAIN)
    assert max(r for p, r in drawn if p == "data/CC-B/train-00001-of-00003.parquet") > 40
    # what one round revealed predicts little of the next: expected overlap N * N / TOTAL < 0.4 docs
    overlaps = [len(set(rounds[s]) & set(rounds[s + 1])) for s in seeds if s + 1 in rounds]
    assert sum(overlaps) / len(overlaps) < 1.0
    # rows without text are passed over, never scored
    assert not EMPTY & set(drawn)


def test_the_draw_is_uniform_over_rows_and_the_same_for_every_validator(hub, tmp_path):
    """Each file is drawn in proportion to its rows (a row anywhere is as likely as any other), and two
    validators with separate caches hold the same documents for a seed: same files, same rows, same ids."""
    a, b = source(hub, tmp_path / "a"), source(hub, tmp_path / "b")
    counts = dict.fromkeys(TRAIN, 0)
    for seed in range(40):
        docs = draw(a, seed, 10)
        assert docs == draw(b, seed, 10) and len({d.index for d in docs}) == 10
        for d in docs:
            counts[origin(d)[0]] += 1
    for path, rows in TRAIN.items():   # 400 draws; expected 400 * rows / 170, within about 4 sd
        expected = 400 * rows / TOTAL
        assert abs(counts[path] - expected) < 4 * expected ** 0.5 + 2, (path, counts[path], expected)
    assert draw(a, 1) != draw(a, 2)


def test_only_the_drawn_row_groups_are_read_and_a_replay_reads_nothing(hub, tmp_path, monkeypatch):
    import eval.heldout_data

    # files of a few kB here (GBs on the Hub): probe their ends as if the footer were large, too
    monkeypatch.setattr(eval.heldout_data, "FOOTER_PROBE", 256)
    cache = tmp_path / "cache"
    docs = draw(source(hub, cache), 5)
    files = dataset_files()
    whole = sum(len(files[p]) for p in TRAIN)
    body = 0   # bytes read other than the files' footers (ranges that end at the file's end)
    for path, rng in hub.requests:
        if "/resolve/" in path:
            assert rng, path   # every file is read by range requests
            start, end = map(int, rng[len("bytes="):].split("-"))
            name = path.split(hub.commit + "/", 1)[1]
            body += 0 if end == len(files[name]) - 1 else end - start + 1
    # at most 5 of the 28 row groups: their text column, not the files
    assert 0 < body < whole / 4, (body, whole)
    hub.requests.clear()
    assert draw(source(hub, cache), 5) == docs and hub.requests == []   # cached by (dataset, commit, file)
    for d in docs:   # the text is the dataset's row
        path, row = origin(d)
        assert d.input_ids == Words().encode(text(path, row))[:64]


def test_a_branch_is_resolved_to_its_commit_and_the_commit_keys_the_cache(hub, tmp_path):
    by_branch = source(hub, tmp_path / "c", revision="main")
    assert draw(by_branch, 3) == draw(source(hub, tmp_path / "c"), 3)
    assert by_branch.commit == hub.commit and (tmp_path / "c" / "heldout-data" / "corp%2Fweb" / hub.commit).is_dir()


# -----------------------------------------------------------------------------
# errors name the problem

def test_errors_name_the_problem(hub, tmp_path):
    with pytest.raises(HeldoutDataError, match="cannot list the files of commit 0000000000"):
        source(hub, tmp_path, revision="0" * 40).files()
    with pytest.raises(HeldoutDataError, match="cannot resolve the revision"):
        source(hub, tmp_path, revision="no-such-branch").files()
    with pytest.raises(HeldoutDataError, match="cannot resolve"):
        source(hub, tmp_path, revision="main", dataset="corp/none").files()
    with pytest.raises(HeldoutDataError, match="no parquet data files of split 'validation'"):
        source(hub, tmp_path, split="validation").files()
    with pytest.raises(HeldoutDataError, match=r"has no text field 'content'; fields present: \['id', 'text'\]"):
        source(hub, tmp_path, text_field="content").files()
    bad = hub.add_commit("corp/bad", {"data/train-00000-of-00001.parquet": b"not parquet at all, not at all"})
    with pytest.raises(HeldoutDataError, match="does not end like a parquet file"):
        source(hub, tmp_path, revision=bad, dataset="corp/bad").files()
    few = hub.add_commit("corp/few", {"train.parquet": parquet_bytes({"text": ["a b c", "", "d e"]}, 2)})
    with pytest.raises(HeldoutDataError, match="2 usable documents of 3 rows, the competition asks for 3"):
        draw(source(hub, tmp_path, revision=few, dataset="corp/few"), 0, 3)


def test_split_files_follow_the_hub_layout():
    paths = ["data/x/train-00000-of-00002.parquet", "train.parquet", "train/part-0.parquet", "data/test-0.parquet",
             "sample/10BT/000_00000.parquet", "trainer/x.parquet", "data/training-0.parquet", "README.md"]
    assert split_files(paths, "train") == ["data/x/train-00000-of-00002.parquet", "train.parquet",
                                           "train/part-0.parquet"]


# -----------------------------------------------------------------------------
# the competition file

def test_the_competition_pins_the_dataset_revision_and_drops_the_pool():
    raw = load_competition("localnet").to_dict()
    raw["heldout"]["pool"] = 200000
    with pytest.raises(CompetitionError, match="heldout.pool: removed: .*first N documents.*heldout.revision"):
        parse_competition(raw)
    raw = load_competition("sn24").to_dict()
    assert "heldout.revision is 'main', not a 40-hex commit of dataset 'HuggingFaceFW/fineweb-edu'" in \
        load_competition("sn24").unpinned()
    raw["heldout"]["revision"] = "local"
    with pytest.raises(CompetitionError, match="'local' names the local corpus"):
        parse_competition(raw)
    del raw["heldout"]["revision"]
    with pytest.raises(CompetitionError, match="heldout.revision: missing"):
        parse_competition(raw)
    raw["heldout"]["revision"] = "a" * 40
    assert not any(u.startswith("heldout") for u in parse_competition(raw).unpinned())


def test_localnet_draws_its_local_corpus_by_shard_and_offset():
    from quasar_model.corpus import local_split

    comp = load_competition("localnet")
    src = heldout_source(comp.heldout)
    docs = local_split("heldout")
    assert isinstance(src, LocalSource) and len(src.files()) == -(-len(docs) // LOCAL_SHARD_DOCS)
    drawn = draw(src, 11, 12)
    assert drawn != draw(src, 12, 12) and len({d.origin for d in drawn}) == 12
    for d in drawn:
        path, row = origin(d)
        assert d.input_ids == Words().encode(docs[int(path.rsplit("-", 1)[1]) * LOCAL_SHARD_DOCS + row])[:64]
    # pinned: the local corpus's own revision is accepted, another machine's is named
    assert draw(LocalSource("heldout", local_revision("heldout")), 11, 12) == drawn
    with pytest.raises(HeldoutDataError, match="this machine's local corpus"):
        LocalSource("heldout", "f" * 40)


def test_a_validator_round_draws_from_the_hub_dataset(hub, tmp_path):
    """prepare_round, as the validator calls it, on a competition whose held-out data is the Hub
    dataset at its commit: documents from the draw, the teacher cache over them, replayable offline."""
    from eval.evaluate import prepare_round

    comp = load_competition("localnet")
    comp = dataclasses.replace(
        comp, heldout=dataclasses.replace(comp.heldout, dataset=REPO, revision=hub.commit, split="train",
                                          documents=4, seq_len=32),
        recall=dataclasses.replace(comp.recall, context_len=256, families=("passkey",), lengths=(1,), depth_bins=1,
                                   prefill_chunk=256, max_answer_tokens=6),
        score=dataclasses.replace(comp.score, fingerprint_probes=2))
    inputs = prepare_round(comp, 21, cache_root=tmp_path / "cache", hf_endpoint=hub.endpoint)
    docs = inputs.heldout.docs
    assert len(docs) == 4 and all(origin(d)[0] in TRAIN for d in docs)
    assert len(inputs.heldout.cache) == 4 and inputs.heldout.teacher_ce is not None
    index = json.loads(next((tmp_path / "cache" / "heldout").glob("*.json")).read_text())
    assert index["documents"] == [d.origin for d in docs]
    # an offline replay of the round: nothing read from the Hub, the same documents and teacher cache
    hub.requests.clear()
    again = prepare_round(comp, 21, cache_root=tmp_path / "cache", hf_endpoint="http://127.0.0.1:9")
    assert again.heldout.docs == docs and again.heldout.key == inputs.heldout.key and hub.requests == []
