"""Test-wide settings.

The tests run tiny models whose ops take microseconds; with more than one intra-op thread, any
other load on a 2-core machine makes OpenMP's spinning threads wait on each other and the same
ops take milliseconds. One thread keeps the suite's run time independent of the machine's load.

Shared fixtures: `pristine`, a valid `tiny` submission directory (weights, config, manifest) made
once per module, and `ckpt`, a fresh copy of it for a test to damage.
"""
import shutil

import pytest
import torch

from neurons.manifest import write_manifest
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM

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

