"""quasar_model.atomic.write_atomic: the one write-to-temp-then-rename every package uses."""
import os

import pytest
import torch

from quasar_model.atomic import write_atomic


def test_text_bytes_and_a_writer_each_replace_the_file_whole(tmp_path):
    path = tmp_path / "f"
    assert write_atomic(path, "é\n") == path and path.read_bytes() == "é\n".encode()
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    write_atomic(path, lambda tmp: torch.save({"x": torch.arange(3)}, tmp))
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert os.listdir(tmp_path) == ["f"]  # no temporary file left beside it


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f"
    path.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f"]
