"""The checkpoints localnet's attackers publish (neurons.adversaries), checked cheaply against the
defences they must meet: the near-copy is a new hash with the same function, the crasher passes
every fetch check but computes NaN, the teacher-submitter is refused at fetch by the
active-parameter ratio. The end-to-end outcome (gated, rejected, 0 weight) is tests/test_localnet.py's.
"""

import pytest
import torch
from transformers import AutoTokenizer

from quasar_model.teacher_outputs.capture import load_teacher
from quasar_model.teacher_outputs.tiny_teacher import tiny_teacher
from distilled import distill, train_stream
from eval.competition import load_competition
from eval.evaluate import checkpoint_hash
from eval.gates import fingerprint_ids, fingerprint_probes, fingerprint_similarity, logit_fingerprint, without_teacher
from neurons import adversaries
from neurons.checks import check_submission
from neurons.manifest import SubmissionRejected, write_manifest
from neurons.validator import student_limits
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM

LOCALNET = load_competition("localnet")


@pytest.fixture(scope="module")
def teacher():
    path = tiny_teacher(progress=False)
    return load_teacher(str(path), dtype="float32")[0], AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def victim(teacher, tmp_path_factory):
    """A localnet-shaped student distilled briefly from the tiny teacher, saved as a miner exports it."""
    model, tok = teacher
    torch.manual_seed(0)
    student = QuasarLongForCausalLM(QuasarLongConfig.preset("tiny", vocab_size=1024, num_loops=1,
                                                            use_looped_injection=False))
    student = distill(student, model, train_stream(tok), 40, 1e-2, seed=0)
    d = tmp_path_factory.mktemp("victim") / "step-0000040"
    student.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def accepted(d):
    write_manifest(d)
    return check_submission(d, student_limits(LOCALNET))


def test_near_copy_has_a_new_hash_and_the_victims_fingerprint(tmp_path, victim, teacher):
    made = adversaries.near_copy(victim, tmp_path / "near")
    assert checkpoint_hash(made) != checkpoint_hash(victim)
    accepted(made)  # a well-formed submission: only the copy gate can stop it
    a, b = (QuasarLongForCausalLM.from_pretrained(p).eval() for p in (victim, made))
    assert not torch.equal(a.get_output_embeddings().weight, b.get_output_embeddings().weight)
    # the validator's fingerprint (eval.gates) on two round seeds: above the copy gate's threshold
    t = teacher[0]
    for seed in (1, 2):
        probes = fingerprint_probes(LOCALNET.score.fingerprint_probes, 32, 1024, seed)
        ids = fingerprint_ids(t, probes, seed, 1024)
        tr = logit_fingerprint(t, probes, ids)
        fa, fb = (without_teacher(logit_fingerprint(m, probes, ids), tr) for m in (a, b))
        assert fingerprint_similarity(fa, fb) > LOCALNET.score.functional_copy_threshold


def test_crasher_passes_the_fetch_checks_and_computes_nan(tmp_path, victim):
    made = adversaries.crash(victim, tmp_path / "crash")
    checked = accepted(made)  # every weight finite: sha256, config, headers and the NaN/Inf scan all pass
    assert checked.manifest.model_hash != checkpoint_hash(victim)
    model = QuasarLongForCausalLM.from_pretrained(made).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(16)[None], use_cache=False).logits
    # what the evaluation child reports as a non-finite result: the validator's rejection at "evaluate"
    # (tests/test_redteam_isolation.py runs that path)
    assert not torch.isfinite(logits).all()


def test_teacher_submission_is_the_teacher_and_refused_by_the_active_parameter_ratio(tmp_path, teacher):
    made = adversaries.teacher(None, tmp_path / "teacher", LOCALNET)
    student = QuasarLongForCausalLM.from_pretrained(made).eval()
    ids = torch.arange(64)[None]
    with torch.no_grad():
        gap = (student(input_ids=ids, use_cache=False).logits - teacher[0](input_ids=ids).logits).abs().max()
    assert gap < 1e-4
    with pytest.raises(SubmissionRejected) as e:
        accepted(made)
    assert e.value.stage == "config" and "active parameters" in str(e.value)


def test_exact_copy_is_the_same_hash(tmp_path, victim):
    made = adversaries.exact_copy(victim, tmp_path / "copy")
    assert checkpoint_hash(made) == checkpoint_hash(victim)
