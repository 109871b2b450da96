import os
import pickle

import pytest
import torch

from encoders import RFIError
from encoders.core.serialization import load_checkpoint, save_checkpoint


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_code_carrying_file_is_refused_and_not_run(tmp_path):
    marker = str(tmp_path / "pwned")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": _Exploit(marker)}, f)
    torch.save({"x": _Exploit(marker)}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(RFIError, match=name):
            load_checkpoint(tmp_path / name)
    assert not os.path.exists(marker)


def test_truncated_and_foreign_files(tmp_path):
    save_checkpoint({"w": torch.ones(1000)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    for name in ("cut.pt", "notes.pt", "missing.pt"):
        with pytest.raises(RFIError, match=name):
            load_checkpoint(tmp_path / name)
    assert torch.equal(load_checkpoint(tmp_path / "ok.pt")["w"], torch.ones(1000))


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint({"epoch": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        save_checkpoint({"epoch": 2, "bad": Boom()}, path)
    assert load_checkpoint(path) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
