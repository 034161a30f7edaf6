"""A torch/torchvision pair whose compiled operators do not load gives one clear error."""

from __future__ import annotations

import pytest
import torch

from dipid._compat import check_torch_install
from dipid.errors import TorchInstallError


def test_working_pair_passes():
    check_torch_install()


def test_missing_torchvision_ops_raise_a_clear_error(monkeypatch):
    class BrokenOps:
        def __getattr__(self, name):
            raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(torch.ops, "torchvision", BrokenOps(), raising=False)
    with pytest.raises(TorchInstallError, match="matching pair") as info:
        check_torch_install()
    assert "torchvision::nms" in str(info.value) and isinstance(info.value, ImportError)
