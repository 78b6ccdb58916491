"""Test-wide settings.

The tests run tiny models whose ops take microseconds; with more than one intra-op thread, any
other load on a 2-core machine makes OpenMP's spinning threads wait on each other and the same
ops take milliseconds. One thread keeps the suite's run time independent of the machine's load.
The same goes for every process a test starts (the validator's evaluation children above all: one
per submission per round): OMP_NUM_THREADS=1 in the environment they inherit. Under load a child
with two spinning threads took 110 s of wall time for what one thread does in 17 s.

Shared fixtures: `pristine`, a valid `tiny` submission directory (weights, config, manifest) made
once per module, `ckpt`, a fresh copy of it for a test to damage, and `distilled_student`, a tiny
student distilled from the tiny teacher once per session (tests/distilled.py; read-only: copy it
before changing it).
"""
import os
import shutil

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported here, and inherited by every child
os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from neurons.manifest import write_manifest  # noqa: E402
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("pristine")
    torch.manual_seed(0)
    QuasarLongForCausalLM(QuasarLongConfig.preset("tiny")).save_pretrained(d)
    (d / "tokenizer_config.json").write_text("{}")
    write_manifest(d)
    return d


@pytest.fixture
def ckpt(tmp_path, pristine):
    d = tmp_path / "ckpt"
    shutil.copytree(pristine, d)
    return d



@pytest.fixture(scope="session")
def distilled_student():
    """The tiny student (one loop, no looped injection, seed 0) distilled 100 steps at lr 1e-2 (batch
    seed 0) from the tiny teacher: test_evaluate's trained student and test_redteam_scoring's honest
    miner, the same model, trained once instead of once per module."""
    from transformers import AutoTokenizer

    from quasar_model.teacher_outputs.capture import load_teacher
    from quasar_model.teacher_outputs.tiny_teacher import tiny_teacher
    from distilled import distill, train_stream

    path = tiny_teacher(progress=False)
    teacher = load_teacher(str(path), dtype="float32")[0]
    torch.manual_seed(0)
    student = QuasarLongForCausalLM(QuasarLongConfig.preset("tiny", vocab_size=1024, num_loops=1,
                                                            use_looped_injection=False))
    return distill(student, teacher, train_stream(AutoTokenizer.from_pretrained(path)), 100, 1e-2, seed=0)
