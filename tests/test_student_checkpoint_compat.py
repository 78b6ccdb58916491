"""A submission published before issue 16's refactors (tests/data/student_v1) still loads and computes
exactly what it computed then: miners' checkpoints on the chain must survive a validator upgrade.

The fixture was written at f151d32 (before the lazy `quasar_model` package, the weight-loading methods
and the ops' shared varlen loop): the `tiny` preset cut to ~7k parameters with every component kept
(hybrid branch, MoE, engram, two loops, NoPE past position 4), seed 0, `save_pretrained` +
`write_manifest`; student_v1.logits.json holds its logits on a fixed input, computed then.
"""
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import quasar_model
from eval.checkpoint_layout import check_checkpoint_files
from neurons.manifest import read_manifest, verify_manifest

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "student_v1"


def test_a_checkpoint_written_before_the_refactor_loads_and_gives_the_same_logits():
    verify_manifest(FIXTURE, read_manifest(FIXTURE))  # the files are the ones it published
    check_checkpoint_files(FIXTURE)
    quasar_model.register()  # what a validator's loader does before the Auto classes
    model = AutoModelForCausalLM.from_pretrained(FIXTURE).eval()
    assert type(model).__name__ == "QuasarLongForCausalLM" and model.config.num_loops == 2
    then = json.loads((DATA / "student_v1.logits.json").read_text())
    with torch.no_grad():
        now = model(input_ids=torch.tensor([then["input_ids"]])).logits[0]
    expected = torch.tensor(then["logits"])
    assert now.shape == expected.shape and expected.std() > 0.1
    torch.testing.assert_close(now, expected, rtol=1e-5, atol=1e-5)
