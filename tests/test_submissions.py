"""Submissions: manifest packaging, the commitment grammar, and the validator-side checks.

A real tiny checkpoint passes every check; each hostile variant is refused at the right stage
with a reason naming the problem. CPU only; the checkpoint is built once per module.
"""
import dataclasses
import hashlib
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from neurons.chain import MAX_COMMITMENT_BYTES
from neurons.checks import StudentLimits, check_submission
from neurons.commitment import Commitment, CommitmentRejected, encode_commitment, parse_commitment
from neurons.manifest import (
    Manifest, ManifestEntry, SubmissionRejected, build_manifest, compute_model_hash, read_manifest,
    verify_manifest, write_manifest,
)
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM
from quasar_model.report import parameter_counts

LIMITS = StudentLimits(max_total_params=10_000_000, vocab_size=384, max_layers=12, max_hidden=256)
WEIGHTS = "model.safetensors"


def rejected(d, stage, *words, limits=LIMITS, **kwargs) -> SubmissionRejected:
    with pytest.raises(SubmissionRejected) as info:
        check_submission(d, limits, **kwargs)
    err = info.value
    assert err.stage == stage, err
    for word in words:
        assert word in err.reason, (word, err.reason)
    return err


def edit_config(d, resign=True, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    if resign:  # a consistent manifest, so the config check is the one under test
        write_manifest(d)


def edit_weights(d, edit):
    tensors = load_file(d / WEIGHTS)
    edit(tensors)
    save_file(tensors, d / WEIGHTS, metadata={"format": "pt"})
    write_manifest(d)


# ================================================================================ the good case
def test_real_checkpoint_passes(ckpt):
    result = check_submission(ckpt, LIMITS)
    counts = parameter_counts(QuasarLongConfig.preset("tiny"))
    assert result.config.vocab_size == 384 and result.config.model_type == "quasar_long"
    assert result.summary.total_params == counts["total"]
    assert result.summary.active_params == counts["active"]
    assert result.summary.model_hash == read_manifest(ckpt).model_hash
    assert result.summary.dtypes["F32"] > 100 and result.summary.tensor_count > 100
    assert result.summary.weight_bytes < (ckpt / WEIGHTS).stat().st_size
    assert set(result.summary.files) == {"config.json", "generation_config.json", WEIGHTS, "tokenizer_config.json"}


def test_bf16_checkpoint_passes(ckpt):
    edit_weights(ckpt, lambda t: t.update({k: v.bfloat16() for k, v in t.items() if v.is_floating_point()}))
    assert check_submission(ckpt, LIMITS).summary.dtypes.get("BF16", 0) > 100


def test_tied_embeddings_checkpoint_passes(tmp_path):
    cfg = QuasarLongConfig.preset("tiny", tie_word_embeddings=True)
    QuasarLongForCausalLM(cfg).save_pretrained(tmp_path)
    write_manifest(tmp_path)
    assert check_submission(tmp_path, LIMITS).summary.total_params == parameter_counts(cfg)["total"]


def test_sharded_checkpoint_passes_and_index_is_checked(tmp_path):
    torch.manual_seed(0)
    QuasarLongForCausalLM(QuasarLongConfig.preset("tiny")).save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    write_manifest(tmp_path)
    assert check_submission(tmp_path, LIMITS).summary.tensor_count > 100
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    write_manifest(tmp_path)
    rejected(tmp_path, "header", "elsewhere.safetensors")


def test_model_hash_definition(ckpt):
    m = read_manifest(ckpt)
    by_hand = hashlib.sha256(b"".join(
        f"{e.name}\0{e.sha256}\n".encode() for e in sorted(m.files, key=lambda e: e.name))).hexdigest()
    assert m.model_hash == by_hand == compute_model_hash(reversed(m.files))
    os.utime(ckpt / WEIGHTS, (1, 1))  # mtime does not enter
    assert build_manifest(ckpt).model_hash == m.model_hash
    (ckpt / "vocab.json").write_text("{}")  # a new file does
    assert build_manifest(ckpt).model_hash != m.model_hash


def test_commitment_binds_manifest_to_the_hotkey(ckpt):
    m = read_manifest(ckpt)
    miner, copier = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY", "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
    good = Commitment.for_model("hf", "miner/student", "a" * 40, m.model_hash, miner)
    # sha256(model hash || hotkey), as documented: nothing else enters
    assert good.binding == hashlib.sha256((m.model_hash + miner).encode()).hexdigest()[:32]
    assert good.matches(m.model_hash, miner) and not good.matches(m.model_hash, copier)
    assert check_submission(ckpt, LIMITS, commitment=good, hotkey=miner)
    # the same commitment string made by another hotkey names nothing that hotkey can serve
    rejected(ckpt, "manifest", "not the committed", "copied from another hotkey", commitment=good, hotkey=copier)
    other = Commitment("hf", "miner/student", "a" * 40, "0" * 32)
    rejected(ckpt, "manifest", "not the committed", commitment=other, hotkey=miner)
    with pytest.raises(ValueError, match="needs the hotkey"):
        check_submission(ckpt, LIMITS, commitment=good)
    # the binding does not reveal the model: a copier reading it cannot recover the hash's prefix
    assert m.model_hash[:8] not in encode_commitment(good)


# ================================================================================ manifest stage
def test_pickle_file_rejected(ckpt):
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n.")
    rejected(ckpt, "manifest", "pytorch_model.bin", "pickle")
    with pytest.raises(SubmissionRejected, match="pickle"):  # the miner hears it first
        write_manifest(ckpt)


def test_code_file_rejected(ckpt):
    (ckpt / "modeling_evil.py").write_text("import os; os.system('true')\n")
    rejected(ckpt, "manifest", "modeling_evil.py", "code")


def test_pickle_listed_in_manifest_rejected(ckpt):
    body = json.loads((ckpt / "manifest.json").read_text())
    body["files"].append({"name": "pytorch_model.bin", "size": 1, "sha256": "0" * 64})
    body["model_hash"] = compute_model_hash(ManifestEntry(f["name"], f["size"], f["sha256"]) for f in body["files"])
    (ckpt / "manifest.json").write_text(json.dumps(body))
    rejected(ckpt, "manifest", "pytorch_model.bin", "pickle")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "sub/model.safetensors", "..", ".hidden.json",
                                  "model.safetensors\n", "con\\fig.json"])
def test_unsafe_names_in_manifest_rejected(ckpt, name):
    body = json.loads((ckpt / "manifest.json").read_text())
    body["files"].append({"name": name, "size": 1, "sha256": "0" * 64})
    body["model_hash"] = compute_model_hash(ManifestEntry(f["name"], f["size"], f["sha256"]) for f in body["files"])
    (ckpt / "manifest.json").write_text(json.dumps(body))
    err = rejected(ckpt, "manifest", repr(name)[1:-1][:20])
    assert any(w in err.reason for w in ("traversal", "hidden", "control", "separator"))


def test_traversal_in_manifest_object_rejected_before_disk(ckpt):
    m = read_manifest(ckpt)
    files = (*m.files, ManifestEntry("../x", 1, "0" * 64))
    with pytest.raises(SubmissionRejected, match="traversal"):
        verify_manifest(ckpt, Manifest(files, compute_model_hash(files)))


def test_hash_mismatch_rejected(ckpt):
    path = ckpt / WEIGHTS
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    path.write_bytes(bytes(data))
    rejected(ckpt, "manifest", WEIGHTS, "sha256 mismatch")


def test_missing_file_rejected(ckpt):
    (ckpt / "generation_config.json").unlink()
    rejected(ckpt, "manifest", "generation_config.json", "missing")


def test_extra_unlisted_file_rejected(ckpt):
    (ckpt / "vocab.json").write_text("{}")  # an allowed name, but not in the manifest
    rejected(ckpt, "manifest", "vocab.json", "not listed")


def test_symlink_and_subdirectory_rejected(ckpt, tmp_path):
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", ckpt / "vocab.json")
    rejected(ckpt, "manifest", "vocab.json", "symbolic link")
    (ckpt / "vocab.json").unlink()
    (ckpt / "merges.txt").mkdir()
    rejected(ckpt, "manifest", "merges.txt", "not a regular file")


def test_manifest_tampering_rejected(ckpt):
    body = json.loads((ckpt / "manifest.json").read_text())
    body["model_hash"] = "f" * 64
    (ckpt / "manifest.json").write_text(json.dumps(body))
    rejected(ckpt, "manifest", "model_hash")
    (ckpt / "manifest.json").write_text('{"version": 1, "version": 1}')
    rejected(ckpt, "manifest", "repeats")


# ================================================================================ config stage
@pytest.mark.parametrize("field,value", [("vocab_size", 10**9), ("num_hidden_layers", 10**6),
                                         ("engram_slots", 10**15), ("engram_ngram_orders", [2, 10**9]),
                                         ("hidden_size", 10**7), ("num_loops", 10**6)])
def test_config_bomb_rejected_fast(ckpt, field, value):
    edit_config(ckpt, **{field: value})
    start = time.perf_counter()
    rejected(ckpt, "config", field.split("_ngram")[0])
    assert time.perf_counter() - start < 1.0


def test_a_slow_latent_memory_segment_is_rejected_before_evaluation(ckpt):
    # parameter-free compute: a segment of 1 runs the memory's Python step at every token
    edit_config(ckpt, latent_memory_layers=[1], latent_memory_segment=1)
    rejected(ckpt, "config", "latent_memory_segment", "at least 16")


@pytest.mark.parametrize("changes,words", [
    # issue 11: per-token compute the parameter count does not see, each named by its field
    ({"head_dim": 4096}, ["head_dim=4096", "at most 256"]),                  # d^2 recurrent states, per-head attention
    ({"head_dim": 128}, ["num_attention_heads * head_dim=512", "at most max_hidden 256"]),  # 4 heads x 128 > 256
    ({"num_attention_heads": 64, "num_key_value_heads": 2}, ["num_attention_heads * head_dim=1024"]),
    ({"hybrid_raven_slots": 10**6, "hybrid_raven_topk": 4}, ["hybrid_raven_slots=1000000", "at most 1024"]),
])
def test_config_fields_that_multiply_evaluation_compute_are_bounded(ckpt, changes, words):
    edit_config(ckpt, **changes)
    start = time.perf_counter()
    rejected(ckpt, "config", *words)
    assert time.perf_counter() - start < 1.0   # refused before the meta build


def test_a_model_over_the_competitions_evaluation_flops_is_rejected_naming_its_cost(ckpt):
    from eval.budget import model_cost, plan
    from eval.competition import load_competition

    # the tiny preset under localnet's plan, against a cap just under what it costs
    the_plan = tuple(plan(load_competition("localnet")))
    config = QuasarLongConfig.preset("tiny")
    flops = sum(model_cost(config).axis_flops(a) for a in the_plan)
    capped = dataclasses.replace(LIMITS, max_eval_flops=flops - 1, eval_plan=the_plan)
    rejected(ckpt, "config", "budget.max_flops", f"{flops:.3e}", "num_loops=2", limits=capped)
    assert check_submission(ckpt, dataclasses.replace(capped, max_eval_flops=flops)).summary.total_params > 0


def test_raven_slots_are_free_without_a_raven_layer():
    from neurons.checks import check_config_bounds

    # the bound applies to layers that run the branch: a model with no raven layer may carry any value
    check_config_bounds(QuasarLongConfig.preset("tiny", hybrid_raven_slots=10**6, hybrid_layerwise_cycle=["quasar", "gla"]),
                        LIMITS)


def test_over_parameter_cap_rejected(ckpt):
    small = StudentLimits(max_total_params=100_000, vocab_size=384, max_layers=12, max_hidden=256)
    rejected(ckpt, "config", "parameters", "100,000", limits=small)


def test_over_the_teacher_ratio_rejected_on_meta(ckpt):
    # the tiny preset (342,120 active parameters at this vocabulary) against a 600k teacher at ratio 0.5
    capped = StudentLimits(max_total_params=10_000_000, vocab_size=384, max_layers=12, max_hidden=256,
                           max_active_params=300_000)
    rejected(ckpt, "config", "active parameters", "300,000", "smaller than its teacher", limits=capped)


def test_wrong_architecture_rejected(ckpt):
    edit_config(ckpt, model_type="llama")
    rejected(ckpt, "config", "model_type", "llama")


def test_invalid_config_names_field(ckpt):
    edit_config(ckpt, num_key_value_heads=3)
    rejected(ckpt, "config", "num_key_value_heads")


@pytest.mark.parametrize("changes,words", [
    ({"rms_norm_eps": "abc"}, ["rms_norm_eps", "type"]),
    ({"auto_map": {"AutoModelForCausalLM": "evil.Model"}}, ["auto_map"]),
    ({"unexpected_field": 1}, ["unknown key"]),
    ({"architectures": ["LlamaForCausalLM"]}, ["architectures"]),
    ({"rope_theta": 10**400}, ["rope_theta"]),
    ({"dtype": ["float32"]}, ["dtype"]),
    ({"intermediate_size": 10**30}, ["does not build"]),
])
def test_config_schema_rejected(ckpt, changes, words):
    edit_config(ckpt, **changes)
    rejected(ckpt, "config", *words)


def test_config_json_oddities_rejected(ckpt):
    text = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text(text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN'))
    write_manifest(ckpt)
    rejected(ckpt, "config", "NaN")
    (ckpt / "config.json").write_text('{"model_type": "quasar_long", "model_type": "quasar_long"}')
    write_manifest(ckpt)
    rejected(ckpt, "config", "repeats")
    (ckpt / "config.json").write_text("[1, 2]")
    write_manifest(ckpt)
    rejected(ckpt, "config", "not a JSON object")


def test_oversize_config_rejected(ckpt):
    text = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text(text + " " * (70 << 10))  # still valid JSON, just huge
    write_manifest(ckpt)
    rejected(ckpt, "config", "config.json", "cap")


# ================================================================================ header stage
def test_wrong_tensor_shape_rejected(ckpt):
    edit_weights(ckpt, lambda t: t.update({"model.embed_tokens.weight": torch.zeros(385, 64)}))
    rejected(ckpt, "header", "model.embed_tokens.weight", "shape", "[385, 64]")


def test_missing_and_extra_tensors_rejected(ckpt, tmp_path):
    edit_weights(ckpt, lambda t: t.pop("model.norm.weight"))
    rejected(ckpt, "header", "missing", "model.norm.weight")
    edit_weights(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(64), "payload": torch.zeros(4)}))
    rejected(ckpt, "header", "unexpected tensor", "payload")


def test_disallowed_dtype_rejected(ckpt):
    edit_weights(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.float64)}))
    rejected(ckpt, "header", "model.norm.weight", "F64")


def test_truncated_safetensors_rejected(ckpt):
    path = ckpt / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])
    write_manifest(ckpt)  # the manifest matches: only the file's own layout is wrong
    rejected(ckpt, "header", WEIGHTS, "truncated")
    path.write_bytes(path.read_bytes()[:5])
    write_manifest(ckpt)
    rejected(ckpt, "header", WEIGHTS, "too short")


def test_trailing_payload_and_bad_header_rejected(ckpt):
    path = ckpt / WEIGHTS
    original = path.read_bytes()
    path.write_bytes(original + b"hidden payload")
    write_manifest(ckpt)
    rejected(ckpt, "header", "trailing bytes")
    path.write_bytes((200 << 20).to_bytes(8, "little") + original[8:])
    write_manifest(ckpt)
    rejected(ckpt, "header", "header length", "cap")


# ================================================================================ weights stage
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_rejected(ckpt, bad):
    def poison(t):
        t["model.layers.3.mixer.attn.o_proj.weight"][5, 7] = bad
    edit_weights(ckpt, poison)
    rejected(ckpt, "weights", "model.layers.3.mixer.attn.o_proj.weight", "NaN/Inf")


# ================================================================================ commitment
HASH = "0123456789abcdef" * 2
SHA = "89ab" * 10


@pytest.mark.parametrize("text,localnet", [
    (f"q2:hf:miner-1/quasar.student_v2:{SHA}:{HASH}", False),
    (f"q2:http:8.8.4.4:8091:r42:{HASH}", False),
    (f"q2:http:miner.example.org:443:v1.2-rc_3:{HASH}", False),
    (f"q2:http:127.0.0.1:8091:rev1:{HASH}", True),
    (f"q2:local:miners/hk5/step-100:r1:{HASH}", True),
])
def test_commitment_round_trip(text, localnet):
    c = parse_commitment(text, localnet=localnet)
    assert encode_commitment(c) == text
    assert parse_commitment(text.encode(), localnet=localnet) == c
    assert c.binding == HASH and not c.matches("f" * 64, "5Fhotkey")


def test_commitment_fields_and_worst_case_fit():
    c = parse_commitment(f"q2:http:8.8.4.4:8091:r42:{HASH}")
    assert (c.kind, c.host, c.port, c.revision) == ("http", "8.8.4.4", 8091, "r42")
    worst = [
        Commitment("hf", "o" * 23 + "/" + "n" * 24, "f" * 40, HASH),
        Commitment("http", "a" * 50 + ".com:65535", "t" * 24, HASH),
        Commitment("local", "p" * 60, "t" * 24, HASH),
    ]
    for c in worst:
        text = encode_commitment(c)
        assert len(text.encode()) <= MAX_COMMITMENT_BYTES
        assert parse_commitment(text, localnet=True) == c
    assert len(encode_commitment(worst[0])) == MAX_COMMITMENT_BYTES


@pytest.mark.parametrize("raw,words", [
    ("", ["empty"]),
    ("q2:hf:" + "a" * 200, ["over the 128-byte cap"]),
    (f"q2:hf:owner/name:{SHA}:{HASH}".encode() + b"\xff", ["UTF-8"]),
    (f"q2:hf:owner/ná:{SHA}:{HASH}", ["disallowed character"]),
    (f"q2:hf:owner/name:{SHA}:{HASH}\n", ["disallowed character"]),
    (f"q2:hf:owner name:{SHA}:{HASH}", ["disallowed character"]),
    (f"q3:hf:owner/name:{SHA}:{HASH}", ["unknown commitment version", "q3"]),
    (f"q1:hf:owner/name:{SHA}:{HASH}", ["version 'q1' is retired", "bare model hash", "re-commit as 'q2'"]),
    (f"hf:owner/name:{SHA}:{HASH}", ["unknown commitment version"]),
    (f"q2:s3:bucket/key:{SHA}:{HASH}", ["unknown storage kind", "s3"]),
    (f"q2:hf:owner/name:{SHA}:{HASH}:extra", ["extra fields"]),
    (f"q2:hf:owner/name:{HASH}", ["missing fields"]),
    (f"q2:hf:name:{SHA}:{HASH}", ["owner/name"]),
    (f"q2:hf:a/b/c:{SHA}:{HASH}", ["owner/name"]),
    (f"q2:hf:owner--x/name:{SHA}:{HASH}", ["naming rules"]),
    (f"q2:hf:.owner/name:{SHA}:{HASH}", ["naming rules"]),
    (f"q2:hf:owner/name.git:{SHA}:{HASH}", [".git"]),
    (f"q2:hf:owner/name:main:{HASH}", ["40-character"]),
    (f"q2:hf:owner/name:{SHA.upper()}:{HASH}", ["40-character"]),
    (f"q2:hf:owner/name:{SHA}:{HASH[:-1]}", ["binding", "32 lowercase hex"]),
    (f"q2:hf:owner/name:{SHA}:{HASH.upper()}", ["binding", "32 lowercase hex"]),
    (f"q2:http:8.8.4.4:0:r1:{HASH}", ["port"]),
    (f"q2:http:8.8.4.4:65536:r1:{HASH}", ["port"]),
    (f"q2:http:8.8.4.4:080:r1:{HASH}", ["port"]),
    (f"q2:http:999.1.1.1:80:r1:{HASH}", ["IPv4"]),
    (f"q2:http:8.8.04.4:80:r1:{HASH}", ["IPv4"]),
    (f"q2:http:Miner.Example.org:80:r1:{HASH}", ["lowercase hostname"]),
    (f"q2:http:10.0.0.5:80:r1:{HASH}", ["not a public address"]),
    (f"q2:http:169.254.169.254:80:r1:{HASH}", ["not a public address"]),
    (f"q2:http:localhost:80:r1:{HASH}", ["local name"]),
    (f"q2:http:8.8.4.4:80:-r1:{HASH}", ["revision"]),
    (f"q2:local:miners/hk:r1:{HASH}", ["localnet only"]),
])
def test_malformed_commitments_rejected(raw, words):
    with pytest.raises(CommitmentRejected) as info:
        parse_commitment(raw)
    for word in words:
        assert word in info.value.reason, (word, info.value.reason)


@pytest.mark.parametrize("location", ["../etc", "/abs/path", "a//b", ".hidden/x", "a/../b"])
def test_unsafe_local_paths_rejected(location):
    with pytest.raises(CommitmentRejected, match="local path"):
        parse_commitment(f"q2:local:{location}:r1:{HASH}", localnet=True)


def test_encode_refuses_bad_commitments():
    with pytest.raises(CommitmentRejected, match="extra fields"):
        encode_commitment(Commitment("hf", "owner/name", f"{SHA}:x", HASH))
    with pytest.raises(CommitmentRejected, match="unknown storage kind"):
        encode_commitment(Commitment("ftp", "owner/name", SHA, HASH))
    with pytest.raises(CommitmentRejected, match="128-byte cap"):  # a 49-char repo id cannot fit
        encode_commitment(Commitment("hf", "o" * 24 + "/" + "n" * 24, SHA, HASH))
    with pytest.raises(CommitmentRejected, match="longer than 60"):
        encode_commitment(Commitment("http", "a" * 52 + ".com:8091", "r", HASH))
