"""quasar_model.devices: the one resolution of `--device` and a config's `device`."""
import pytest
import torch

from quasar_model.devices import check_spelling, resolve_device


def test_cpu_and_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") == "cpu" and resolve_device() == "cpu"
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available on this machine"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device 'cuda:0': CUDA is not available"):
        resolve_device("cuda:0")


def test_with_two_gpus_cuda_means_this_ranks_and_a_missing_one_is_named(monkeypatch):
    # the machine's answer stands in for GPUs this CPU runner lacks; the resolution is the real code
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == "cuda:0" and resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == "cuda:1" and resolve_device("cuda", local_rank=0) == "cuda:0"
    with pytest.raises(ValueError, match=r"device 'cuda:2': this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("bad", ["tpu", "gpu", "cuda:", "cuda:-1", "CPU", "cuda:0 ", "", None, 0])
def test_other_spellings_are_refused(bad):
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        check_spelling(bad)
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device(bad)
