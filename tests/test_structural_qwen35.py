"""Qwen3.5 (dense, the sn24 teacher's family) as a structural-init teacher.

A small random `Qwen3_5ForCausalLM` (transformers' own classes) with gated DeltaNet and gated
attention layers mixed, every weight perturbed off its init (norms, decays and convolutions
included), so that a tensor copied to the wrong place, or a formula that differs, shows up as a
logit gap. Value heads outnumber key heads and key/value head dims differ, so a head layout
mistake cannot cancel out.
"""
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

from quasar_model.conversion import check_teacher, init_student, logit_gap
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM
from quasar_model.cache import QuasarLongCache

@pytest.fixture(autouse=True)
def teacher_on_its_pytorch_path(monkeypatch):
    # transformers binds fla's Triton kernels for the gated delta rule whenever fla is importable,
    # and they need a GPU: the teacher runs transformers' own PyTorch functions (its reference math)
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen35_modeling

    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"):
        fn = getattr(qwen35_modeling, name)
        monkeypatch.setattr(qwen35_modeling, name, getattr(fn, "__wrapped__", fn))


TYPES = ["linear_attention", "linear_attention", "full_attention", "linear_attention", "full_attention"]
LINEAR, FULL = [0, 1, 3], [2, 4]


def qwen35(**kw):
    torch.manual_seed(0)
    c = Qwen3_5TextConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4, layer_types=TYPES,
        tie_word_embeddings=False, **kw)
    model = Qwen3_5ForCausalLM(c)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "A_log" in name or "dt_bias" in name:
                p.add_(0.3 * noise)          # around the init: (1 + w) norms at 0, the gated norm at 1
            elif "conv1d" in name:
                p.copy_(0.4 * noise)         # a conv that mixes tokens audibly
            else:
                p.copy_(0.08 * noise)
    return model.eval()


def ids(n=2, t=70, seed=0):
    # 70: past one 64-token chunk of both chunked delta rules, and not a multiple of any chunk size
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_add_mode_student_reproduces_qwen35_and_decodes_with_the_hybrid_cache(tmp_path):
    teacher = qwen35()
    student = init_student(teacher).eval()
    cfg = student.config
    assert cfg.hybrid_attention_layers == LINEAR and cfg.hybrid_replace_layers == LINEAR
    assert [cfg.branch_kind(i) for i in range(5)] == ["quasar", "quasar", None, "quasar", None]
    assert cfg.quasar_heads() == (2, 4, 8, 12) and cfg.hybrid_quasar_conv_kernel == 4
    assert cfg.partial_rotary_factor == 0.25 and cfg.attention_output_gate and cfg.zero_centered_rms_norm
    for i in LINEAR:
        mixer = student.model.layers[i].mixer
        assert mixer.replace and mixer.attn is None                          # the DeltaNet alone
    x = ids()
    gap = logit_gap(student, teacher, x)
    print(f"qwen3_5 add-mode student: max |dlogit| = {gap:.2e}")
    assert gap <= 1e-4, gap

    # decoding: a prefill, then one token at a time, with the conv + recurrent state in the cache
    full = student(input_ids=x, use_cache=False).logits
    cache = QuasarLongCache()
    steps = [student(input_ids=x[:, :21], cache=cache).logits]
    assert isinstance(cache.entry(0, 0)["branch"], tuple)                  # (S, conv state)
    S, conv = cache.entry(0, 0)["branch"]
    assert S.shape == (2, 4, 8, 12) and conv.shape == (2, 3, 2 * 2 * 8 + 4 * 12)
    for t in range(21, x.shape[1]):
        steps.append(student(input_ids=x[:, t:t + 1], cache=cache).logits)
    dec = torch.cat(steps, dim=1)
    step_gap = float((dec - full).abs().max())
    print(f"qwen3_5 student decode vs full forward: max |dlogit| = {step_gap:.2e}")
    assert step_gap <= 1e-4, step_gap
    # and the teacher's own cached decoding agrees with the student's
    t_cache_logits = teacher(input_ids=x[:, :21], use_cache=True)
    tc = t_cache_logits.cache
    t_steps = [t_cache_logits.logits]
    for t in range(21, 30):
        out = teacher(input_ids=x[:, t:t + 1], cache=tc, use_cache=True)
        tc = out.cache
        t_steps.append(out.logits)
    torch.testing.assert_close(torch.cat(t_steps, 1), dec[:, :30], atol=1e-4, rtol=0)

    # a saved student loads back (every new config field survives the round trip)
    student.save_pretrained(tmp_path / "s")
    again = QuasarLongForCausalLM.from_pretrained(tmp_path / "s").eval()
    torch.testing.assert_close(again(input_ids=x).logits, full)
    # a fresh student of the same config is far from the teacher: the gap above is the weights' doing
    torch.manual_seed(0)
    assert logit_gap(QuasarLongForCausalLM(cfg).eval(), teacher, x) > 0.1


@torch.no_grad()
def test_replace_mode_swaps_the_attention_layers_for_gla_nope(tmp_path):
    # the Quasar-10B step: every layer recurrent, the attention layers GLA + NoPE. Not exact by
    # design (a linear recurrence is not softmax attention); a valid checkpoint that decodes.
    teacher = qwen35()
    student = init_student(teacher, replacement_mode="replace").eval()
    cfg = student.config
    assert cfg.hybrid_attention_layers == [0, 1, 2, 3, 4] and cfg.hybrid_gla_nope
    assert [cfg.branch_kind(i) for i in range(5)] == ["quasar", "quasar", "gla", "quasar", "gla"]
    assert all(cfg.is_replace_layer(i) for i in range(5))
    attn, gla = teacher.model.layers[2].self_attn, student.model.layers[2].mixer.branch
    per_head = attn.q_proj.weight.view(4, 32, 64)                       # per head [q_h; gate_h]
    assert torch.equal(gla.q_proj.weight, per_head[:, :16].reshape(64, 64))
    assert torch.equal(gla.g_proj.weight, per_head[:, 16:].reshape(64, 64))   # the output gate
    assert torch.equal(gla.kv_proj.weight, torch.cat([attn.k_proj.weight, attn.v_proj.weight]))
    torch.testing.assert_close(gla.q_norm.weight, 1 + attn.q_norm.weight)    # (1 + w) into w
    x = ids()
    hs = student(input_ids=x, use_cache=False, output_hidden_states=True).hidden_states
    ths = teacher(input_ids=x, use_cache=False, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hs[2], ths[2], atol=1e-4, rtol=0)      # layers 0-1 are the teacher's
    assert (hs[3] - ths[3]).abs().max() > 1e-2                          # layer 2 is swapped
    full = student(input_ids=x, use_cache=False).logits
    assert torch.isfinite(full).all() and logit_gap(student, teacher, x) > 1e-2
    cache = QuasarLongCache()
    steps = [student(input_ids=x[:, :30], cache=cache).logits]
    steps += [student(input_ids=x[:, t:t + 1], cache=cache).logits for t in range(30, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, :40], atol=1e-4, rtol=0)
    assert not any("k" in cache.entry(0, i) for i in range(5))          # no KV cache anywhere
    student.save_pretrained(tmp_path / "s")
    again = QuasarLongForCausalLM.from_pretrained(tmp_path / "s").eval()
    torch.testing.assert_close(again(input_ids=x).logits, full)


@torch.no_grad()
def test_packed_documents_and_padding_in_the_gated_deltanet_branch():
    student = init_student(qwen35()).eval()
    x = ids(1, 50)
    # packed rows: neither the convolution nor the state reaches across documents
    pos = torch.cat([torch.arange(20), torch.arange(30)])[None]
    packed = student(input_ids=x, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(packed[:, 20:], student(input_ids=x[:, 20:], use_cache=False).logits,
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(packed[:, :20], student(input_ids=x[:, :20], use_cache=False).logits,
                               atol=1e-4, rtol=0)
    # left padding: padded tokens are no one's neighbour in the conv and write no state
    xx = torch.cat([torch.zeros(1, 5, dtype=torch.long), x[:, :30]], 1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 30)], 1).long()
    padded = student(input_ids=xx, attention_mask=mask, use_cache=False).logits[:, 5:]
    torch.testing.assert_close(padded, student(input_ids=x[:, :30], use_cache=False).logits, atol=1e-4, rtol=0)


def test_softplus_step_is_the_discrete_beta_for_unit_keys():
    # alpha = 1 - exp(-softplus(b)) (the continuous-time step over a time softplus(b), unit keys)
    # equals sigmoid(b), the discrete delta rule's beta, across the whole range
    b = torch.linspace(-30, 30, 2001, dtype=torch.float64)
    alpha = -torch.expm1(-F.softplus(b))
    torch.testing.assert_close(alpha, torch.sigmoid(b), atol=1e-15, rtol=1e-12)


def test_qwen35_refusals_name_the_field():
    with pytest.raises(ValueError, match="attention_bias=True"):
        check_teacher(Qwen3_5TextConfig(attention_bias=True))
    from transformers import Qwen3_5Config
    with pytest.raises(ValueError, match="vision-language wrapper"):
        check_teacher(Qwen3_5Config())
    with pytest.raises(ValueError, match=r"hybrid layers \[1\] are not full-attention layers"):
        init_student(qwen35(), hybrid_layers=[1])
    with pytest.raises(ValueError, match="hybrid_quasar_num_value_heads"):
        QuasarLongConfig.preset("tiny", hybrid_quasar_num_key_heads=3, hybrid_quasar_num_value_heads=4)
    with pytest.raises(ValueError, match="hybrid_replace_layers"):
        QuasarLongConfig.preset("tiny", hybrid_replace_layers=[0])


def test_init_student_command_on_a_qwen35_checkpoint(tmp_path, capsys):
    import json

    from distill.cli import main as cli_main
    from quasar_model import corpus
    from quasar_model.teacher_outputs.tiny_teacher import train_tokenizer

    teacher_dir = tmp_path / "qwen35"
    qwen35().save_pretrained(teacher_dir)
    train_tokenizer(corpus.local_split("train")[:20], 300).save_pretrained(teacher_dir)
    for mode, flags in (("add", []), ("replace", ["--replace"])):
        out = tmp_path / mode
        assert cli_main(["init-student", "--teacher", str(teacher_dir), "--out", str(out), *flags]) == 0
        report = json.loads((out / "structural_init.json").read_text())
        assert report["hybrid_replacement_mode"] == mode
        if mode == "add":
            assert report["branches"] == {"0": "quasar", "1": "quasar", "3": "quasar"}
            assert report["max_abs_logit_gap_to_teacher"] <= 1e-4
        else:
            assert report["branches"] == {"0": "quasar", "1": "quasar", "2": "gla", "3": "quasar", "4": "gla"}
            assert report["max_abs_logit_gap_to_teacher"] > 1e-2
    assert "max |logit - teacher logit|" in capsys.readouterr().out


def test_init_student_command_on_a_vision_language_qwen35_checkpoint(tmp_path):
    """Qwen/Qwen3.5-9B-Base (sn24's teacher) is published as Qwen3_5ForConditionalGeneration: the
    text model sits under model.language_model, beside a vision tower the student has no use for."""
    import json

    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from distill.cli import main as cli_main
    from quasar_model import corpus
    from quasar_model.teacher_outputs.tiny_teacher import train_tokenizer

    text = qwen35()
    vl = Qwen3_5ForConditionalGeneration(Qwen3_5Config(
        text_config=text.config.to_dict(),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=64)))
    vl.model.language_model.load_state_dict({k.removeprefix("model."): v for k, v in text.state_dict().items()
                                             if k.startswith("model.")})
    vl.lm_head.load_state_dict(text.lm_head.state_dict())
    vl.save_pretrained(tmp_path / "vl")
    train_tokenizer(corpus.local_split("train")[:20], 300).save_pretrained(tmp_path / "vl")
    assert json.loads((tmp_path / "vl" / "config.json").read_text())["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert cli_main(["init-student", "--teacher", str(tmp_path / "vl"), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "structural_init.json").read_text())
    assert report["max_abs_logit_gap_to_teacher"] <= 1e-4
    # the gap is measured against the teacher as loaded from the wrapper: it is the text model
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    student = QuasarLongForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (student(ids).logits - text(ids).logits).abs().max() <= 1e-4
