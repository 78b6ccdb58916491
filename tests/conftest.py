"""Test-wide settings.

The tests run tiny models whose ops take microseconds; with more than one intra-op thread, any
other load on a 2-core machine makes OpenMP's spinning threads wait on each other and the same
ops take milliseconds. One thread keeps the suite's run time independent of the machine's load.
The same goes for every process a test starts (the validator's evaluation children above all: one
per submission per round): OMP_NUM_THREADS=1 in the environment they inherit. Under load a child
with two spinning threads took 110 s of wall time for what one thread does in 17 s.

Shared fixtures: `pristine`, a valid `tiny` submission directory (weights, config, manifest) made
once per module, and `ckpt`, a fresh copy of it for a test to damage.
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

