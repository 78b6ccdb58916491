"""A Qwen3.5 teacher (the sn24 teacher's family) runs on a CPU: transformers binds its gated delta
rule to fla's Triton kernels whenever fla is importable, and `load_teacher` on the CPU points it
back at transformers' own PyTorch functions."""
import shutil
import sys

import pytest
import torch
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

import transformers.models.qwen3_5.modeling_qwen3_5 as qwen35_modeling
from quasar_model.teacher_outputs import capture as teacher
from quasar_model.teacher_outputs.capture import capture_topk, load_teacher
from quasar_model.teacher_outputs.tiny_teacher import tiny_teacher


def test_a_qwen35_teacher_loaded_on_the_cpu_runs_on_its_pytorch_path(tmp_path, monkeypatch):
    for (module, name), bound in teacher.REBOUND_ON_CPU.items():  # undo an earlier test's load_teacher
        monkeypatch.setattr(sys.modules[module], name, bound)
    wrapped = qwen35_modeling.torch_chunk_gated_delta_rule
    assert wrapped.__wrapped__.__name__ == "torch_chunk_gated_delta_rule"  # bound to a kernel package
    torch.manual_seed(0)
    cfg = Qwen3_5TextConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, intermediate_size=96, linear_num_key_heads=2,
                            linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
                            layer_types=["linear_attention", "full_attention"], tie_word_embeddings=False)
    Qwen3_5ForCausalLM(cfg).save_pretrained(tmp_path / "teacher")
    for f in tiny_teacher(progress=False).iterdir():  # a tokenizer for the checkpoint (any will do here)
        if "token" in f.name:
            shutil.copy(f, tmp_path / "teacher" / f.name)
    ids = torch.randint(0, 300, (1, 70), generator=torch.Generator().manual_seed(0))

    bound = Qwen3_5ForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    with pytest.raises(Exception):  # the negative control: as bound, the teacher cannot run here
        bound(ids)

    model, _ = load_teacher(str(tmp_path / "teacher"), dtype="float32")
    assert qwen35_modeling.torch_chunk_gated_delta_rule is wrapped.__wrapped__
    with torch.no_grad():
        logits = model(ids).logits
    top_ids, top_lp, tail = capture_topk(model, ids, k=4)
    torch.testing.assert_close(top_lp, torch.log_softmax(logits.double(), -1).topk(4).values.float(), atol=1e-4, rtol=0)
