"""Issue 11, the per-submission budget: the competition file states the token budget and the seconds
one submission's evaluation may take; the loader refuses a plan over its budget; the validator's
timeout follows the competition; the FLOP estimate is the documented formula; `quasar eval` prints
the plan before it evaluates."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from eval.budget import ModelCost, Pass, model_cost, plan, planned_tokens
from eval.competition import CompetitionError, load_competition, parse_competition
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM
from quasar_model.report import parameter_counts


# ------------------------------------------------------------------------------ the plan
def test_the_localnet_plan_is_what_the_evaluator_runs_counted_by_hand():
    comp = load_competition("localnet")
    axes = {a.axis: a for a in plan(comp)}
    # 16 documents of 256 tokens
    assert axes["heldout"].tokens == 16 * 256
    # 5 families x 3 depth bins x 1 item at 512, 1024 and 2048 tokens, then 12 - 1 decode steps each
    assert axes["recall"].tokens == 15 * (512 + 1024 + 2048) + 3 * 15 * 11 == 54255
    assert axes["recall"].sequences == 45
    # 16 probes of 32 tokens; 8 continuations of a 32-token prefix and 31 decode steps
    assert axes["fingerprint"].tokens == 16 * 32
    assert axes["continuations"].tokens == 8 * (32 + 31)
    assert planned_tokens(comp) == 4096 + 54255 + 512 + 504 == 59367 <= comp.budget.tokens


def test_the_shipped_competitions_fit_their_budgets_and_sn24_is_sized_for_its_cadence():
    for name in ("localnet", "sn24"):
        comp = load_competition(name)
        assert planned_tokens(comp) <= comp.budget.tokens
    sn24 = load_competition("sn24")
    assert sn24.budget.reference_gpu == "H200"
    # the design point (README, sn24 notes): 10 distinct models per round, each within budget.seconds,
    # in 70% of the cadence at 12 s a block
    assert 10 * sn24.budget.seconds <= 0.7 * sn24.schedule.cadence_blocks * 12
    # as many recall items as before the resize (300): the bootstrap's resolution on recall is kept
    r = sn24.recall
    assert len(r.families) * len(r.lengths) * r.depth_bins * r.items_per_cell == 300


def test_a_competition_over_its_token_budget_is_refused_naming_both_numbers():
    raw = load_competition("localnet").to_dict()
    raw["budget"]["tokens"] = 59366  # one token short of the plan
    with pytest.raises(CompetitionError, match="budget.tokens") as e:
        parse_competition(raw)
    assert "59,367" in str(e.value) and "59,366" in str(e.value)
    raw = load_competition("localnet").to_dict()
    raw["recall"]["items_per_cell"] = 3  # triples recall: 167,877 tokens against 120,000
    with pytest.raises(CompetitionError, match="over the budget of 120,000"):
        parse_competition(raw)


def test_the_budget_section_is_required_and_checked():
    raw = load_competition("localnet").to_dict()
    del raw["budget"]
    with pytest.raises(CompetitionError, match="budget: missing"):
        parse_competition(raw)
    for key, value in [("seconds", 0), ("seconds", -1.0), ("tokens", 0)]:
        bad = load_competition("localnet").to_dict()
        bad["budget"][key] = value
        with pytest.raises(CompetitionError, match=f"budget.{key}"):
            parse_competition(bad)


def test_the_digest_covers_the_budget():
    comp = load_competition("localnet")
    raw = comp.to_dict()
    raw["budget"]["seconds"] = comp.budget.seconds + 1
    assert parse_competition(raw).digest != comp.digest


# ------------------------------------------------------------------------------ FLOPs
def test_the_flop_formula_on_one_pass_by_hand():
    cost = ModelCost(layer_params=1000, head_params=50, loops=2, attention_width=8, recurrent=7)
    p = Pass(count=3, prefill=10, decode=2, logits=4, forwards=4)
    # n = 12 tokens, causal pairs 12 * 13 / 2 = 78
    one_pass = 2 * 1000 * 12 + 4 * 8 * 78 + 7 * 12          # 24000 + 2496 + 84 = 26580
    assert cost.flops(p) == 3 * (2 * one_pass + 2 * 50 * 4) == 3 * (53160 + 400) == 160680


def test_the_model_terms_of_the_tiny_preset_by_hand():
    config = QuasarLongConfig.preset("tiny")
    counts = parameter_counts(config)
    cost = model_cost(config, counts)
    H, d = 4, 16
    # hybrid layers 1..5 take the cycle quasar, raven, quasar, quasar, gla; raven has 8 slots
    assert [config.branch_kind(i) for i in range(1, 6)] == ["quasar", "raven", "quasar", "quasar", "gla"]
    assert cost.recurrent == 3 * (6 * H * d * d) + 8 * H * d * 8 + 4 * H * d * d == 18432 + 4096 + 4096
    assert cost.attention_width == 6 * H * d == 384            # "add" mode: every layer keeps its attention
    assert cost.head_params == 384 * 64
    assert cost.loops == 2
    assert cost.layer_params == counts["active"] - counts["embeddings"]   # the count the fetch checks use
    # "replace" mode: the hybrid layers have no attention, only layer 0 does
    replaced = model_cost(QuasarLongConfig.preset("tiny", hybrid_replacement_mode="replace"))
    assert replaced.attention_width == H * d
    # replace-mode layers inside an "add" model (a Qwen3.5 student's DeltaNet layers) attend to nothing,
    # and a quasar state of Hv value heads is [Hv, dk, dv]
    mixed = QuasarLongConfig.preset("tiny", hybrid_replace_layers=[1, 3], hybrid_quasar_num_key_heads=2,
                                    hybrid_quasar_num_value_heads=4, hybrid_quasar_value_head_dim=8)
    cost_mixed = model_cost(mixed)
    assert cost_mixed.attention_width == 4 * H * d
    assert cost_mixed.recurrent - cost.recurrent == 3 * 6 * 4 * d * (8 - d)   # three quasar layers in tiny


def test_attention_is_quadratic_the_rest_linear():
    cost = ModelCost(layer_params=0, head_params=0, loops=1, attention_width=4096, recurrent=0)
    T = 8192
    # a causal prefill of T tokens in attention of width d: ~2 d T^2 (q.k and p.v, half the square)
    assert cost.flops(Pass(1, T, 0, 0, 1)) == 4 * 4096 * T * (T + 1) // 2
    assert cost.flops(Pass(1, 2 * T, 0, 0, 1)) / cost.flops(Pass(1, T, 0, 0, 1)) == pytest.approx(4, rel=1e-3)
    dense = ModelCost(layer_params=10**6, head_params=0, loops=1, attention_width=0, recurrent=5)
    assert dense.flops(Pass(1, 2 * T, 0, 0, 1)) == 2 * dense.flops(Pass(1, T, 0, 0, 1))


# ------------------------------------------------------------------------------ the validator's timeout
class Built(Exception):
    pass


def _validator(tmp_path: Path, raw: dict, **settings):
    from test_validator import Subnet

    net = Subnet(tmp_path, raw)
    from neurons.validator import Validator

    return Validator(net.chain, net.validator, net.competition, net.settings(tmp_path / "v", **settings))


def test_the_validators_timeout_follows_the_competition(tmp_path):
    from test_validator import small_competition

    raw = small_competition()
    raw["budget"]["seconds"] = 123.0
    v = _validator(tmp_path / "a", raw)
    assert v.eval_timeout == 123.0 and v._eval_limits().timeout == 123.0
    v = _validator(tmp_path / "b", raw, eval_time_scale=2.5)        # a machine 2.5x slower than the reference
    assert v._eval_limits().timeout == pytest.approx(307.5)
    v = _validator(tmp_path / "c", raw, eval_timeout=42.0, eval_time_scale=2.5)   # the operator's override wins
    assert v._eval_limits().timeout == 42.0
    from neurons.validator import ValidatorSettings

    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="time scale"):
            ValidatorSettings(work_dir=tmp_path, eval_time_scale=bad)


def test_the_validator_command_passes_the_scale_and_defaults_to_the_competition(tmp_path, monkeypatch):
    import neurons.validator
    from neurons.cli import main
    from test_stack import _local_validator

    chain, keys, _ = _local_validator(tmp_path)
    seen = []

    def capture(chain, keypair, competition, settings, evaluate=None):
        seen.append((competition, settings))
        raise Built()

    monkeypatch.setattr(neurons.validator, "Validator", capture)
    base = ["validator", "--network", "localnet", "--chain.path", str(chain.path), "--wallet.path", str(keys),
            "--wallet.name", "validator", "--competition", "localnet", "--out", str(tmp_path / "v"),
            "--status-port", "-1"]
    for extra, want in [([], 600.0), (["--eval-time-scale", "3"], 1800.0), (["--eval-timeout", "5"], 5.0)]:
        with pytest.raises(Built):
            main(base + extra)
        comp, settings = seen[-1]
        timeout = settings.eval_timeout if settings.eval_timeout is not None else \
            comp.budget.seconds * settings.eval_time_scale
        assert timeout == want


# ------------------------------------------------------------------------------ `quasar eval`
def test_quasar_eval_prints_the_plan_before_evaluating(tmp_path, capsys):
    from eval.cli import main
    from test_validator import small_competition

    comp_path = tmp_path / "competition.json"
    comp_path.write_text(json.dumps(small_competition()))
    comp = load_competition(comp_path)
    torch.manual_seed(0)
    config = QuasarLongConfig.preset("tiny", vocab_size=1024)
    QuasarLongForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    assert main(["eval", str(tmp_path / "ckpt"), "--competition", str(comp_path), "--seed", "3", "--out",
                 str(tmp_path / "out"), "--device", "cpu", "--cache-root", str(tmp_path / "cache"), "--quiet"]) == 0
    out = capsys.readouterr().out
    cost = model_cost(config)
    block = out[out.index("evaluation plan"):out.index("  budget:")].splitlines()[1:]
    lines = {line.split()[0]: line for line in block}
    assert set(lines) == {"heldout", "recall", "fingerprint", "continuations", "total"}
    for axis in plan(comp):
        assert f"{axis.tokens:,} tokens" in lines[axis.axis]
        assert f"{cost.axis_flops(axis):.3e} FLOPs" in lines[axis.axis]
    assert f"{planned_tokens(comp):,} tokens" in lines["total"]
    assert f"budget: {comp.budget.tokens:,} tokens" in out and f"{comp.budget.seconds:g} s per submission" in out
    assert out.index("evaluation plan") < out.index("evaluated in")    # printed before the evaluation ran


def test_the_plan_is_printed_without_flops_when_the_config_does_not_read(tmp_path, capsys):
    from eval.cli import print_plan

    print_plan(load_competition("localnet"), tmp_path / "nothing-here")
    out = capsys.readouterr().out
    assert "no FLOP estimate" in out and "59,367 tokens" in out
    block = out[out.index("evaluation plan"):out.index("  budget:")]
    assert "FLOPs" not in block and "this student" not in out


def test_budget_dataclass_round_trips():
    comp = load_competition("sn24")
    assert parse_competition(comp.to_dict()) == comp
    assert dataclasses.asdict(comp.budget) == {"tokens": 3_500_000, "seconds": 290.0, "reference_gpu": "H200",
                                               "max_flops": 3.5e16}


# ------------------------------------------------------------------------------ the FLOP cap at fetch
def sn24_reference_student(**overrides) -> QuasarLongConfig:
    """scripts/size_budget.py's reference: ~4.3B active, under sn24's 4.5B cap."""
    return QuasarLongConfig.preset(
        "preview", vocab_size=248320, hidden_size=3072, num_hidden_layers=28, hybrid_attention_layers=list(range(4, 28)),
        num_attention_heads=24, num_key_value_heads=4, intermediate_size=8192, num_experts=64, n_group=8,
        topk_group=4, num_experts_per_tok=4, moe_intermediate_size=1024, **overrides)


def test_sn24_admits_the_reference_student_and_refuses_it_with_two_loops_at_fetch():
    from neurons.checks import count_parameters
    from neurons.manifest import SubmissionRejected
    from neurons.validator import student_limits

    limits = student_limits(load_competition("sn24"))
    assert limits.max_eval_flops == 3.5e16 and limits.eval_plan == tuple(plan(load_competition("sn24")))
    counts = count_parameters(sn24_reference_student(), limits)          # within every cap
    assert counts["active"] <= limits.max_active_params
    # the same student looping twice: the same parameters, twice the layers' compute (~5.2e16)
    with pytest.raises(SubmissionRejected) as e:
        count_parameters(sn24_reference_student(num_loops=2, use_looped_injection=True), limits)
    assert e.value.stage == "config"
    assert "budget.max_flops" in e.value.reason and "num_loops=2" in e.value.reason and "3.500e+16" in e.value.reason


def test_max_flops_must_not_be_negative_and_zero_means_no_cap():
    from neurons.validator import student_limits

    raw = load_competition("localnet").to_dict()
    raw["budget"]["max_flops"] = -1
    with pytest.raises(CompetitionError, match="budget.max_flops"):
        parse_competition(raw)
    raw["budget"]["max_flops"] = 0
    assert student_limits(parse_competition(raw)).max_eval_flops is None
