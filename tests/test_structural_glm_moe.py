"""GLM-4, GLM-4.5 (glm4_moe) and Qwen3.5-MoE as structural-init teachers, against transformers' own classes.

Small random teachers with every weight perturbed off its init (norms, biases, routers, the routing
correction bias included), so that a tensor copied to the wrong place, a rotary layout mistake or a
routing rule that differs shows up as a logit gap. Sequences of 40 tokens reach past the 8 rotary
channels' first period, so a wrong pairing of rotary channels cannot hide.
"""
import json

import pytest
import torch
from transformers import (
    Glm4Config, Glm4ForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig,
)

from quasar_model.conversion import check_teacher, init_student, logit_gap
from quasar_model import QuasarLongForCausalLM
from quasar_model.cache import QuasarLongCache
from quasar_model.layers.moe import MoE

V = 300
SMALL = dict(vocab_size=V, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def perturbed(model, centre_of_norms: float):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "A_log" in name or "dt_bias" in name:
                p.copy_(centre_of_norms + 0.3 * noise)
            elif "conv1d" in name:
                p.copy_(0.4 * noise)
            else:
                p.copy_(0.08 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):   # large enough to change which experts are picked
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def glm4(**kw):
    torch.manual_seed(0)
    c = Glm4Config(**SMALL, num_hidden_layers=3, head_dim=16, intermediate_size=96, attention_bias=True, **kw)
    return perturbed(Glm4ForCausalLM(c), 1.0)


def glm4_moe(**kw):
    torch.manual_seed(0)
    c = Glm4MoeConfig(**SMALL, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
                      n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2,
                      routed_scaling_factor=2.5, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True, **kw)
    return perturbed(Glm4MoeForCausalLM(c), 1.0)


def qwen35_moe():
    torch.manual_seed(0)
    c = Qwen3_5MoeTextConfig(
        **SMALL, num_hidden_layers=3, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
    return perturbed(Qwen3_5MoeForCausalLM(c), 0.0)


@pytest.fixture(autouse=True)
def teacher_on_its_pytorch_path(monkeypatch):
    # fla's Triton kernels (bound by transformers when importable) need a GPU: transformers' own
    # PyTorch functions are the reference math
    import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe as m

    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"):
        fn = getattr(m, name)
        monkeypatch.setattr(m, name, getattr(fn, "__wrapped__", fn))


def ids(n=2, t=40, seed=0):
    return torch.randint(3, V, (n, t), generator=torch.Generator().manual_seed(seed))


def decodes_as_it_forwards(student, x, prefill=17):
    """Prefill, then one token at a time through the hybrid cache: the same logits as one forward."""
    full = student(input_ids=x, use_cache=False).logits
    cache = QuasarLongCache()
    steps = [student(input_ids=x[:, :prefill], cache=cache).logits]
    steps += [student(input_ids=x[:, t:t + 1], cache=cache).logits for t in range(prefill, x.shape[1])]
    gap = float((torch.cat(steps, 1) - full).abs().max())
    assert gap <= 1e-4, gap
    return cache


@torch.no_grad()
def test_glm4_add_mode_student_is_exact_and_decodes(tmp_path):
    teacher = glm4()
    student = init_student(teacher, hybrid_layers=[1, 2], cycle=["quasar", "gla"]).eval()
    cfg = student.config
    assert cfg.attention_qkv_bias and cfg.sandwich_norm and cfg.partial_rotary_factor == 0.5
    assert not cfg.use_qk_norm and student.model.layers[0].mixer.qkv_proj.bias is not None
    x = ids()
    gap = logit_gap(student, teacher, x)
    print(f"glm4 add-mode student: max |dlogit| = {gap:.2e}")
    assert gap <= 1e-4, gap
    decodes_as_it_forwards(student, x)
    student.save_pretrained(tmp_path / "s")           # the new options survive a round trip
    again = QuasarLongForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert again.config.sandwich_norm and again.config.attention_qkv_bias
    torch.testing.assert_close(again(input_ids=x).logits, student(input_ids=x).logits)
    # the rotary layout is a row permutation of q and k (per head [0, 2, 4, 6, 1, 3, 5, 7, 8, ...]);
    # the teacher's rows as they are would be audibly wrong
    attn, t_attn = student.model.layers[0].mixer, teacher.model.layers[0].self_attn
    q_rows = attn.qkv_proj.weight[:64].view(4, 16, 64)
    assert torch.equal(q_rows[:, [0, 1, 4, 5, 8]], t_attn.q_proj.weight.view(4, 16, 64)[:, [0, 2, 1, 3, 8]])
    attn.qkv_proj.weight[:64] = t_attn.q_proj.weight
    attn.qkv_proj.weight[64:96] = t_attn.k_proj.weight
    attn.qkv_proj.bias[:96] = torch.cat([t_attn.q_proj.bias, t_attn.k_proj.bias])
    assert logit_gap(student, teacher, x) > 1e-2


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@torch.no_grad()
def test_glm4_moe_add_mode_student_is_exact_and_decodes(norm_topk_prob):
    teacher = glm4_moe(norm_topk_prob=norm_topk_prob)
    student = init_student(teacher, hybrid_layers=[]).eval()
    cfg = student.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (8, 3, 4, 2)
    assert cfg.first_k_dense_replace == 1 and cfg.moe_norm_topk_prob == norm_topk_prob
    assert cfg.routed_scaling_factor == 2.5 and cfg.use_qk_norm and not cfg.sandwich_norm
    moe = student.model.layers[1].ffn
    assert isinstance(moe, MoE) and not isinstance(student.model.layers[0].ffn, MoE)
    torch.testing.assert_close(moe.expert_bias, teacher.model.layers[1].mlp.gate.e_score_correction_bias)
    x = ids()
    gap = logit_gap(student, teacher, x)
    print(f"glm4_moe (norm_topk_prob={norm_topk_prob}) add-mode student: max |dlogit| = {gap:.2e}")
    assert gap <= 1e-4, gap
    decodes_as_it_forwards(student, x)
    # the correction bias steers the choice of experts: without it the student is another model
    moe.expert_bias.zero_()
    assert logit_gap(student, teacher, x) > 1e-3


@torch.no_grad()
def test_qwen35_moe_add_mode_student_is_exact_and_decodes_with_the_hybrid_cache(tmp_path):
    teacher = qwen35_moe()
    student = init_student(teacher).eval()
    cfg = student.config
    assert cfg.moe_router_score == "softmax" and cfg.moe_shared_expert_gate and cfg.first_k_dense_replace == 0
    assert cfg.moe_shared_expert_intermediate_size == 48 and cfg.hybrid_replace_layers == [0, 2]
    x = ids()
    gap = logit_gap(student, teacher, x)
    print(f"qwen3_5_moe add-mode student: max |dlogit| = {gap:.2e}")
    assert gap <= 1e-4, gap
    cache = decodes_as_it_forwards(student, x)
    S, conv = cache.entry(0, 0)["branch"]                      # the DeltaNet's recurrent + conv state
    assert S.shape == (2, 4, 8, 12) and conv.shape == (2, 3, 2 * 2 * 8 + 4 * 12)
    student.save_pretrained(tmp_path / "s")
    again = QuasarLongForCausalLM.from_pretrained(tmp_path / "s").eval()
    torch.testing.assert_close(again(input_ids=x).logits, student(input_ids=x).logits)
    # the shared expert's gate matters: switched open, the student departs from the teacher
    for layer in student.model.layers:
        layer.ffn.shared_expert_gate.weight.zero_()
    assert logit_gap(student, teacher, x) > 1e-3


def test_refusals_name_the_field(tmp_path, capsys):
    from distill.cli import main as cli_main

    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        check_teacher(Glm4Config(hidden_act="gelu"))
    with pytest.raises(ValueError, match="rope_type='linear'"):
        check_teacher(Glm4MoeConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    with pytest.raises(ValueError, match="n_group=8"):
        check_teacher(Glm4MoeConfig(n_routed_experts=8, n_group=8))
    from transformers import Qwen3_5MoeConfig
    with pytest.raises(ValueError, match="model_type 'qwen3_5_moe' is the vision-language wrapper"):
        check_teacher(Qwen3_5MoeConfig())
    with pytest.raises(ValueError, match="num_experts=4: the glm4_moe teacher is a MoE already"):
        init_student(glm4_moe(), num_experts=4)
    # via the command line: one error line naming the field, rc 2, nothing written
    teacher_dir = tmp_path / "glm"
    glm4(hidden_act="gelu").save_pretrained(teacher_dir)
    _tokenizer(teacher_dir)
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli_main(["init-student", "--teacher", str(teacher_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: teacher hidden_act='gelu'"), err
    assert not out.exists()


def _tokenizer(path):
    from quasar_model import corpus
    from quasar_model.teacher_outputs.tiny_teacher import train_tokenizer

    train_tokenizer(corpus.local_split("train")[:20], V).save_pretrained(path)


def test_init_student_command_on_glm4_moe_and_qwen35_moe_checkpoints(tmp_path):
    from distill.cli import main as cli_main

    for name, make in (("glm4_moe", glm4_moe), ("qwen3_5_moe", qwen35_moe)):
        teacher_dir = tmp_path / name
        make().save_pretrained(teacher_dir)
        _tokenizer(teacher_dir)
        out = tmp_path / f"{name}_student"
        assert cli_main(["init-student", "--teacher", str(teacher_dir), "--out", str(out),
                         "--hybrid-layers", "none"]) == 0
        report = json.loads((out / "structural_init.json").read_text())
        assert report["max_abs_logit_gap_to_teacher"] <= 1e-4, (name, report)
        assert report["num_experts"] == 8
