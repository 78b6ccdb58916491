"""Red team, scoring (issue 11, attacks 3 and 5): the teacher submitted as a student, and near-copies,
each run against the real validator on a local chain (real fetch, checks, evaluation and scoring).

Every attack ends the same way: the honest miner holds its weight, the attacker gets nothing with a
recorded gate or rejection reason, and the validator finishes its round.

The students are tiny models distilled from the tiny teacher (tests/distilled.py); a copier starts
from one of them. The competition turns the degenerate gate off (`degenerate_max_repeat` 1.0):
these tests are about the copy and teacher gates, and briefly trained tiny students may loop.
"""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from quasar_model.conversion import init_student, logit_gap
from quasar_model.teacher_outputs.capture import load_teacher
from quasar_model.teacher_outputs.tiny_teacher import tiny_teacher
from distilled import distill, train_stream
from eval.competition import CompetitionError, load_competition, parse_competition
from eval.gates import fingerprint_ids, fingerprint_probes, fingerprint_similarity, logit_fingerprint, without_teacher
from neurons.commitment import encode_commitment
from neurons.state import ValidatorState
from neurons.storage import publish
from neurons.validator import Validator
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM
from test_validator import Subnet, small_competition

OLD_IDS = torch.arange(64) * 16   # the 64 vocabulary ids the fixed, public fingerprint used to read


def competition(**score) -> dict:
    raw = small_competition()
    raw["score"].update(degenerate_max_repeat=1.0, **score)
    return raw


@pytest.fixture(scope="module")
def teacher():
    from transformers import AutoTokenizer

    path = tiny_teacher(progress=False)
    return load_teacher(str(path), dtype="float32")[0], AutoTokenizer.from_pretrained(path)


def fresh(seed):
    torch.manual_seed(seed)
    return QuasarLongForCausalLM(QuasarLongConfig.preset("tiny", vocab_size=1024, num_loops=1,
                                                         use_looped_injection=False))


@pytest.fixture(scope="module")
def students(teacher, tmp_path_factory, distilled_student):
    """honest: distilled 100 steps (conftest's `distilled_student`, the same as distill(fresh(0), teacher,
    stream, 100, 1e-2, seed=0)); copies of it a copier could make in seconds; the teacher as a student."""
    model, tok = teacher
    stream = train_stream(tok)
    honest = distilled_student
    rows = copy.deepcopy(honest)
    with torch.no_grad():  # only the rows the old fingerprint read, by a row's spread: logits elsewhere untouched
        w = rows.get_output_embeddings().weight
        w[OLD_IDS] += w[OLD_IDS].std() * torch.randn(w[OLD_IDS].shape, generator=torch.Generator().manual_seed(9))
    out = {"honest": honest, "rows": rows,
           "tuned": distill(copy.deepcopy(honest), model, stream, 20, 3e-3, seed=120, warmup=1),
           "weak": fresh(5).eval(),
           "teacher_add": init_student(model).eval(),                      # `quasar init-student` without --replace
           "teacher_dense": init_student(model, hybrid_layers=[]).eval()}  # the same with no branch at all
    out.update({f"near{k}": distill(copy.deepcopy(honest), model, stream, 5, 1e-3, seed=200 + k, warmup=1)
                for k in range(4)})
    out.update({f"independent{k}": distill(fresh(k), model, stream, 100, 1e-2, seed=k) for k in (1, 2)})
    root = tmp_path_factory.mktemp("students")
    for name, m in out.items():
        m.save_pretrained(root / name)
    return {name: root / name for name in out} | {"_models": out}


def old_fingerprint(model) -> torch.Tensor:
    """The fingerprint as it was: fixed public probes (seed 24), 64 fixed ids, last 8 positions."""
    probes = torch.randint(0, 1024, (16, 32), generator=torch.Generator().manual_seed(24))
    with torch.no_grad():
        lp = F.log_softmax(model(input_ids=probes, use_cache=False).logits[:, -8:].float(), -1)
    return lp[..., OLD_IDS].flatten()


class Net(Subnet):
    def __init__(self, tmp, raw):
        super().__init__(tmp, raw)

    def publish(self, name, path) -> str:
        return self.commit(name, encode_commitment(publish(path, "local", hotkey=self.hotkey(name),
                                                           storage_root=self.storage, location=f"{name}/ckpt")))

    def round(self):
        """One validator round; (its scores by hotkey, the state, the validator's latest weights by hotkey)."""
        self.chain.advance(25)
        v = Validator(self.chain, self.validator, self.competition, self.settings(self.tmp / "v"))
        assert v.run(max_rounds=1) == 1
        state = ValidatorState(self.tmp / "v" / "validator.db")
        r = state.last_round()
        assert r.phase == "done"  # the round finished: no attack stopped it
        weights = self.chain.latest_weights(self.validator.ss58_address) or {}
        mg = self.chain.metagraph()
        by_hotkey = {h: weights.get(mg.uid_of(h), 0.0) for h in mg.hotkeys}
        return {s["hotkey"]: s for s in state.scores(r.id)}, state, by_hotkey


# ================================================================================ 3: the teacher
def test_teacher_built_by_structural_init_is_refused_by_the_size_ratio(tmp_path, students, teacher):
    assert logit_gap(students["_models"]["teacher_add"], teacher[0], torch.arange(64)[None]) < 1e-4  # it IS the teacher
    net = Net(tmp_path, competition())
    attacker = net.publish("teacher", students["teacher_add"])   # committed first: it would lead
    net.chain.advance(1)
    honest = net.publish("honest", students["honest"])
    scores, state, weights = net.round()
    (refused,) = [s for s in state.submissions("rejected") if s.hotkey == attacker]
    assert refused.stage == "config" and "active parameters" in refused.reason and "teacher" in refused.reason
    assert attacker not in scores and weights[attacker] == 0.0
    assert scores[honest]["gate"] is None and weights[honest] == 1.0


def test_teacher_within_a_loose_size_ratio_is_gated_as_the_teacher(tmp_path, students):
    # ratio 1.0, the loosest a competition may set: the teacher's own trunk with no branch fits it
    raw = competition()
    raw["student"]["max_active_params_vs_teacher"] = 1.0
    net = Net(tmp_path, raw)
    attacker = net.publish("teacher", students["teacher_dense"])
    net.chain.advance(1)
    honest = net.publish("honest", students["honest"])
    scores, state, weights = net.round()
    gated = scores[attacker]
    assert gated["gate"] == "teacher" and gated["composite"] == 0 and "teacher" in gated["axes"]["gate_reason"]
    # the premise: its held-out KL is ~0, so without the gate it would have led
    assert gated["axes"]["kl"] > 0.999 > scores[honest]["axes"]["kl"]
    assert scores[honest]["gate"] is None and weights[honest] == 1.0 and weights[attacker] == 0.0


# ================================================================================ 5: near-copies
@pytest.mark.parametrize("attack", ["rows", "tuned"])
def test_copy_that_escaped_the_fixed_fingerprint_is_gated(tmp_path, students, attack):
    """rows: only the lm_head rows the public fingerprint read, perturbed. tuned: fine-tuned 20 steps."""
    models = students["_models"]
    old = fingerprint_similarity(old_fingerprint(models["honest"]), old_fingerprint(models[attack]))
    assert old < 0.999, f"premise: the copy escaped the old 0.999 gate on the fixed reading (got {old})"
    net = Net(tmp_path, competition())
    honest = net.publish("honest", students["honest"])
    net.chain.advance(1)  # the copy lands after the original it copies
    copier = net.publish("copier", students[attack])
    scores, _, weights = net.round()
    gated = scores[copier]
    assert gated["gate"] == "functional_copy" and gated["composite"] == 0
    assert scores[honest]["model_hash"] in gated["axes"]["gate_reason"]
    assert scores[honest]["gate"] is None and weights[honest] == 1.0 and weights[copier] == 0.0


@pytest.mark.parametrize("copy_gate", [True, False])
def test_near_copies_committed_later_never_take_the_lead_from_their_source(tmp_path, students, copy_gate):
    """A weak miner holds the field; a clearly better challenger commits; four copies of it, each
    fine-tuned 5 steps, commit a block later. With the copy gate on they are gated; with it off
    (threshold 1.0), the earliest-commitment rule alone keeps the crown with the challenger."""
    net = Net(tmp_path, competition(**({} if copy_gate else {"functional_copy_threshold": 1.0})))
    weak = net.publish("weak", students["weak"])
    net.chain.advance(1)
    source = net.publish("source", students["honest"])
    net.chain.advance(1)
    copies = [net.publish(f"near{k}", students[f"near{k}"]) for k in range(4)]
    scores, _, weights = net.round()
    assert scores[weak]["composite"] < scores[source]["composite"] and weights[weak] == 0.0
    assert scores[source]["gate"] is None and weights[source] == 1.0
    for c in copies:
        assert weights[c] == 0.0
        if copy_gate:
            assert scores[c]["gate"] == "functional_copy" and scores[c]["composite"] == 0
        else:  # scored, and compared with the source they copied: not better by the margin
            assert scores[c]["gate"] is None and scores[c]["axes"]["lower_bound"] <= net.competition.score.margin
    if not copy_gate:  # the premise: some copy has the best composite, which used to take the crown
        assert max(scores[c]["composite"] for c in copies) > scores[source]["composite"]


def test_threshold_separates_copies_from_independent_students(students, teacher):
    """The copy gate's threshold against the fingerprint similarity it sees, on three round seeds."""
    models, t = students["_models"], load_competition("localnet").score.functional_copy_threshold
    rows = []
    for seed in (1, 2, 3):
        probes = fingerprint_probes(16, 32, 1024, seed)
        ids = fingerprint_ids(teacher[0], probes, seed, 1024)
        ref = logit_fingerprint(teacher[0], probes, ids)
        fp = {k: without_teacher(logit_fingerprint(m, probes, ids), ref)
              for k, m in models.items() if not k.startswith("teacher")}
        sim = {k: fingerprint_similarity(fp["honest"], fp[k]) for k in fp if k != "honest"}
        sim["independent1~2"] = fingerprint_similarity(fp["independent1"], fp["independent2"])
        rows.append(sim)
        print(f"\nseed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(sim.items())))
    copies = [r[k] for r in rows for k in ("rows", "tuned", "near0", "near1", "near2", "near3")]
    independent = [r[k] for r in rows for k in ("independent1", "independent2", "independent1~2")]
    print(f"copies >= {min(copies):.4f}, threshold {t}, independent students <= {max(independent):.4f}")
    assert min(copies) > t > max(independent)


# ================================================================================ the competition file
def test_the_size_ratio_is_required_and_below_one():
    raw = load_competition("localnet").to_dict()
    for path, value, words in [(("student", "max_active_params_vs_teacher"), 1.5, "(0, 1]"),
                               (("student", "max_active_params_vs_teacher"), 0.0, "(0, 1]"),
                               (("teacher", "params"), 0, "teacher.params")]:
        bad = json.loads(json.dumps(raw))
        bad[path[0]][path[1]] = value
        with pytest.raises(CompetitionError, match=path[1]) as e:
            parse_competition(bad)
        assert words in str(e.value)
    missing = json.loads(json.dumps(raw))
    del missing["teacher"]["params"]
    with pytest.raises(CompetitionError, match="teacher.params: missing"):
        parse_competition(missing)
    sn24 = load_competition("sn24")
    assert sn24.student.max_active_params(sn24.teacher.params) < sn24.teacher.params
