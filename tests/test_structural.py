"""Structural initialisation (a student built from a teacher's weights) and hidden-state MSE training.

The mapping tests use small random teachers whose every weight (norms included) is perturbed, so a
tensor copied to the wrong place, or not copied, shows up as a logit gap.
"""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen3Config, Qwen3ForCausalLM

from distill.structural import LiveTeacher, layer_map
from quasar_model import QuasarLongForCausalLM
from quasar_model.conversion import check_teacher, default_hybrid_layers, init_student, logit_gap, student_config
from quasar_model.layers.moe import MoE


def perturbed(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.08 * noise)
    return model.eval()


def qwen3(tie=True, **kw):
    torch.manual_seed(0)
    c = Qwen3Config(vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=512,
                    tie_word_embeddings=tie, **kw)
    return perturbed(Qwen3ForCausalLM(c))


def ids(n=2, t=40, vocab=300, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# the weight map

def test_qwen3_student_reproduces_the_teacher_and_survives_save_load(tmp_path):
    teacher = qwen3()
    student = init_student(teacher, hybrid_layers=[1, 2, 3], cycle=["quasar", "raven", "gla"]).eval()
    cfg = student.config
    assert [cfg.branch_kind(i) for i in (0, 1, 2, 3)] == [None, "quasar", "raven", "gla"]
    assert cfg.tie_word_embeddings and cfg.use_qk_norm and cfg.partial_rotary_factor == 1.0
    # the branches are off (sigmoid(-15) ~ 3e-7): the student computes the teacher's function
    assert logit_gap(student, teacher, ids()) < 1e-4
    # packed rows too: position ids restarting per document, as in training
    x = ids(1, 48)
    pos = torch.cat([torch.arange(20), torch.arange(28)])[None]
    s = student(input_ids=x, position_ids=pos, use_cache=False).logits
    t = teacher(input_ids=x, position_ids=pos, use_cache=False).logits     # no cache: HF's packed mask
    torch.testing.assert_close(s, t, atol=1e-4, rtol=0)
    alone = teacher(input_ids=x[:, 20:]).logits
    torch.testing.assert_close(s[:, 20:], alone, atol=1e-4, rtol=0)      # no reading across documents
    student.save_pretrained(tmp_path / "s")
    again = QuasarLongForCausalLM.from_pretrained(tmp_path / "s").eval()
    torch.testing.assert_close(again(ids()).logits, student(ids()).logits)
    # a fresh student of the same config is far from the teacher: the gap above is the weights' doing
    torch.manual_seed(0)
    assert logit_gap(QuasarLongForCausalLM(cfg).eval(), teacher, ids()) > 0.1


def test_llama_untied_without_qk_norm():
    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=200, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=1, intermediate_size=96, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    teacher = perturbed(LlamaForCausalLM(c))
    student = init_student(teacher, hybrid_layers=[0, 2], cycle=["gla", "quasar"]).eval()
    assert not student.config.use_qk_norm and not student.config.tie_word_embeddings
    assert student.config.rope_theta == 50000.0
    assert logit_gap(student, teacher, ids(vocab=200)) < 1e-4


def test_branches_start_from_the_attention_projections():
    teacher = qwen3()
    student = init_student(teacher, hybrid_layers=[1, 2, 3], cycle=["quasar", "raven", "gla"])
    t = teacher.model.layers
    quasar, raven, gla = (student.model.layers[i].mixer.branch for i in (1, 2, 3))
    # quasar: one k/v per query head, each KV head repeated over its group of 2
    q, k, v = quasar.qkv_proj.weight.split(64, dim=0)
    assert torch.equal(q, t[1].self_attn.q_proj.weight)
    kh = t[1].self_attn.k_proj.weight.view(2, 16, 64)
    assert torch.equal(k.view(4, 16, 64)[0], kh[0]) and torch.equal(k.view(4, 16, 64)[1], kh[0])
    assert torch.equal(k.view(4, 16, 64)[2], kh[1])
    assert torch.equal(v.view(4, 16, 64)[3], t[1].self_attn.v_proj.weight.view(2, 16, 64)[1])
    for branch, layer in ((raven, t[2]), (gla, t[3])):
        a = layer.self_attn
        assert torch.equal(branch.q_proj.weight, a.q_proj.weight)
        assert torch.equal(branch.kv_proj.weight, torch.cat([a.k_proj.weight, a.v_proj.weight]))
        assert torch.equal(branch.o_proj.weight, a.o_proj.weight)
        assert torch.equal(branch.k_norm.weight, a.k_norm.weight)
    fresh = init_student(teacher, hybrid_layers=[1], cycle=["gla"], branch_from_attention=False)
    assert not torch.equal(fresh.model.layers[1].mixer.branch.q_proj.weight, t[1].self_attn.q_proj.weight)
    # switched on, the branches change the function
    on = init_student(teacher, hybrid_layers=[1, 2, 3], cycle=["quasar", "raven", "gla"], alpha_init=0.0).eval()
    assert logit_gap(on, teacher, ids()) > 1e-2


def test_replace_mode_swaps_attention_for_the_branch():
    teacher = qwen3()
    student = init_student(teacher, hybrid_layers=[2, 3], cycle=["gla", "quasar"], replacement_mode="replace").eval()
    layer = student.model.layers[2]
    assert layer.mixer.attn is None and layer.mixer.alpha is None
    assert torch.equal(layer.mixer.branch.q_proj.weight, teacher.model.layers[2].self_attn.q_proj.weight)
    # layers 0-1 are the teacher's exactly; the swapped layers change the function
    x = ids()
    hs = student(input_ids=x, use_cache=False, output_hidden_states=True).hidden_states
    ths = teacher(input_ids=x, use_cache=False, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hs[2], ths[2], atol=1e-4, rtol=0)
    assert (hs[3] - ths[3]).abs().max() > 1e-2


def test_moe_upcycling_is_exact_then_the_experts_learn():
    teacher = qwen3()
    student = init_student(teacher, hybrid_layers=[], num_experts=8, experts_per_tok=2, moe_intermediate_size=32)
    cfg = student.config
    assert cfg.num_shared_experts == 4 and cfg.first_k_dense_replace == 1
    moe = student.model.layers[2].ffn
    assert isinstance(moe, MoE) and not isinstance(student.model.layers[0].ffn, MoE)
    gate = teacher.model.layers[2].mlp.gate_proj.weight
    assert torch.equal(moe.shared_experts.gate_proj.weight, gate)
    assert torch.equal(moe.gate_up_proj[5][:, :32], gate[32:64].t())        # expert 5 = slice 5 mod 4
    assert logit_gap(student.eval(), teacher, ids()) < 1e-4                   # routed experts write nothing yet
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x = ids()
    student(input_ids=x, labels=x, use_cache=False).loss.backward()
    opt.step()
    assert moe.down_proj.abs().sum() > 0                                      # and then they learn
    assert logit_gap(student.eval(), teacher, ids()) > 1e-3


def test_refuses_teachers_that_do_not_map():
    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=64)
    cases = [
        (LlamaConfig(**base, attention_bias=True), "attention_bias=True"),
        (LlamaConfig(**base, mlp_bias=True), "mlp_bias=True"),
        (LlamaConfig(**base, hidden_act="gelu"), "hidden_act='gelu'"),
        (LlamaConfig(**base, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
         "rope_type='linear'"),
        (MistralConfig(**base, sliding_window=64), "sliding_window=64"),
        (Qwen3Config(**base, use_sliding_window=True, sliding_window=64, max_window_layers=0), "sliding_window"),
    ]
    for cfg, msg in cases:
        with pytest.raises(ValueError, match=msg):
            check_teacher(cfg)
    from transformers import Qwen2Config
    with pytest.raises(ValueError, match="model_type 'qwen2'"):
        check_teacher(Qwen2Config(**base))
    check_teacher(MistralConfig(**base, sliding_window=None))               # no window: maps
    with pytest.raises(ValueError, match="must divide the teacher's intermediate_size=64"):
        student_config(LlamaConfig(**base), num_experts=4, moe_intermediate_size=48)
    with pytest.raises(ValueError, match="student vocab_size=100 differs from the teacher.s 300"):
        init_student(qwen3(), student_config(LlamaConfig(**base)))


def test_layer_maps():
    assert layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert layer_map(3, 6) == [(0, 1), (1, 3), (2, 5)]                        # the last layers meet
    assert layer_map(4, 4, [[3, 1]]) == [(3, 1)]
    for pairs, msg in (([[4, 0]], "student layer 4 out of range"), ([[0, 9]], "teacher layer 9"),
                       ([[0]], "pair"), ([], "empty")):
        with pytest.raises(ValueError, match=msg):
            layer_map(4, 4, pairs)
    assert default_hybrid_layers(20) == list(range(4, 20))                    # the preview's 16 of 20


def test_live_teacher_targets_on_packed_rows_are_per_document():
    teacher = qwen3()
    live = LiveTeacher(teacher, layer_map(4, 4))
    x = ids(1, 30)
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
    packed = live.hidden_targets(x, pos)
    alone = live.hidden_targets(x[:, 12:], torch.arange(18)[None])
    assert len(packed) == 4
    for a, b in zip(packed, alone):
        torch.testing.assert_close(a[:, 12:], b, atol=1e-5, rtol=0)
    # the student's hidden states follow the same convention, so they line up layer by layer
    student = init_student(teacher, hybrid_layers=[]).eval()
    hs = student(input_ids=x, position_ids=pos, use_cache=False, output_hidden_states=True).hidden_states
    for (i, _), t in zip(live.pairs, packed):
        torch.testing.assert_close(hs[i + 1], t, atol=1e-4, rtol=0)


# -----------------------------------------------------------------------------
# end to end: init-student, then distill with hidden-state MSE against the live teacher

@pytest.mark.slow
def test_structural_distillation_end_to_end(tmp_path, capsys):
    from distill.cli import main as cli_main
    from distill.cli import teacher_cache_main
    from distill.config import load_config
    from distill.metrics_log import read_metrics
    from distill.trainer import Trainer
    from quasar_model.paths import cache_root

    root = cache_root() / "test-teacher-caches"
    kw = dict(k=16, seq_len=128, batch_size=64, progress=False)
    train = teacher_cache_main("tiny-teacher", "corpus:train", root / "train", **kw)
    held = teacher_cache_main("tiny-teacher", "corpus:heldout", root / "heldout", **kw)
    out = tmp_path / "student"
    # layers 1-3 swapped for branches alone (the teacher's attention copied into them)
    assert cli_main(["init-student", "--teacher", "tiny-teacher", "--out", str(out), "--replace",
                     "--hybrid-layers", "1-3", "--cycle", "quasar,raven,gla"]) == 0
    report = json.loads((out / "structural_init.json").read_text())
    assert report["branches"] == {"1": "quasar", "2": "raven", "3": "gla"}
    assert report["hybrid_replacement_mode"] == "replace" and report["max_abs_logit_gap_to_teacher"] > 0.1
    assert "max |logit - teacher logit|" in capsys.readouterr().out
    cfg = load_config("configs/structural_tiny.json", [
        f"data.train_cache={train}", f"data.heldout_cache={held}", f"output_dir={tmp_path / 'run'}",
        f"student.init_from={out}", "progress=false", "steps=80", "checkpoint_every=40"])
    trainer = Trainer(cfg)
    assert trainer.teacher.pairs == [(0, 0), (1, 1), (2, 2), (3, 3)]
    recs = trainer.train()
    kl = [r["heldout_kl"] for r in recs if "heldout_kl" in r]
    mse = [r["hidden_mse"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "hidden_mse" in r]
    print(f"\nheld-out KL {kl}")
    assert kl[-1] < kl[0] / 2, kl
    assert sum(mse[-10:]) < sum(mse[:10]) / 2, (mse[:10], mse[-10:])
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    assert QuasarLongForCausalLM.from_pretrained(tmp_path / "run" / "final").config.hybrid_attention_layers == [1, 2, 3]


def test_branches_only_training_and_live_teacher_errors(tmp_path):
    from distill.cli import main as cli_main
    from distill.cli import teacher_cache_main
    from distill.config import load_config
    from distill.trainer import Trainer
    from quasar_model import corpus
    from quasar_model.paths import cache_root
    from quasar_model.teacher_outputs.tiny_teacher import train_tokenizer

    root = cache_root() / "test-teacher-caches"
    train = teacher_cache_main("tiny-teacher", "corpus:train", root / "train", k=16, seq_len=128, batch_size=64,
                               progress=False)
    out = tmp_path / "student"
    assert cli_main(["init-student", "--teacher", "tiny-teacher", "--out", str(out), "--hybrid-layers", "2-3",
                     "--cycle", "gla", "--alpha", "0"]) == 0
    base = [f"data.train_cache={train}", "data.heldout_cache=none", f"student.init_from={out}", "progress=false",
            "steps=3", "teacher.model=tiny", "loss.hidden_mse_weight=1", "checkpoint_every=100"]
    trainer = Trainer(load_config("configs/structural_tiny.json", [*base, f"output_dir={tmp_path / 'b'}",
                                                                   "student.trainable=branches"]))
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    trainer.train()
    moved = {n for n, p in trainer.student.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".mixer." in n and ".mixer.attn." not in n for n in moved), sorted(moved)
    assert any(".mixer.branch." in n for n in moved)

    # a live teacher with another tokenizer than the cache's
    other = tmp_path / "other-teacher"
    tok = train_tokenizer(corpus.local_split("train")[:40], 1024)
    qwen3().save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizer fingerprint"):
        Trainer(load_config("configs/structural_tiny.json", [*base, f"output_dir={tmp_path / 'c'}",
                                                             f"teacher.model={other}"]))
    with pytest.raises(ValueError, match="teacher layer 7 out of range"):
        Trainer(load_config("configs/structural_tiny.json", [*base, f"output_dir={tmp_path / 'd'}",
                                                             "teacher.layers=[[0, 7]]"]))
    with pytest.raises(ValueError, match="student.trainable"):
        load_config("configs/structural_tiny.json", [*base, "student.trainable=some"])


def test_init_student_in_bfloat16_halves_the_checkpoint(tmp_path):
    from safetensors import safe_open

    from distill.cli import main as cli_main

    sizes = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert cli_main(["init-student", "--teacher", "tiny-teacher", "--dtype", dtype, "--out", str(out)]) == 0
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert f.get_tensor("model.embed_tokens.weight").dtype == getattr(torch, dtype)
        sizes[dtype] = (out / "model.safetensors").stat().st_size
        report = json.loads((out / "structural_init.json").read_text())
        assert report["max_abs_logit_gap_to_teacher"] < (1e-4 if dtype == "float32" else 0.5)
    assert sizes["bfloat16"] < 0.55 * sizes["float32"]


@pytest.mark.parametrize("overrides", [
    {},  # tiny: every branch kind, add mode
    # a Qwen3.5-style hybrid: replace-mode layers (no attention, no a) inside an add model
    dict(hybrid_attention_layers=[1, 2, 4], hybrid_replace_layers=[2, 4], num_hidden_layers=5),
])
def test_trainer_frozen_set_and_report_branch_count_agree(overrides):
    from distill.setup import freeze_all_but_branches
    from quasar_model import QuasarLongConfig
    from quasar_model.report import parameter_counts

    cfg = QuasarLongConfig.preset("tiny", **overrides)
    model = QuasarLongForCausalLM(cfg)
    names = freeze_all_but_branches(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(names)
    assert sum(p.numel() for p in trainable) == parameter_counts(cfg)["branches"]
    # the gates on the branch's output are branch parameters (the spec's a, g, c), the GQA is not
    for i in cfg.hybrid_attention_layers:
        assert f"model.layers.{i}.mixer.branch_gain" in names and f"model.layers.{i}.mixer.channel_scale" in names
        assert (f"model.layers.{i}.mixer.alpha" in names) is not cfg.is_replace_layer(i)
    assert not any(".attn." in n for n in names)
