"""Tensors follow the model's device: every family x method through the run.py path with strict devices (CPU).

A GPU run found FastV crashing on CUDA because an index was built with ``torch.arange(n)`` (on the host) and used on
the scores' device; the CPU suite could not see it, since every tensor is on the CPU here. With
:func:`checks.devicecheck.strict_devices` the default device is ``meta`` inside every model call, so a tensor made
without ``device=`` has no data and the first operation that needs it fails, on the CPU too. Each cell runs the
shipped checkpoint on the shipped POPE questions, batch 3 (left padding), prefill and cached decoding.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from adapters.base import Adapter
from checks.device_matrix import METHODS, MODELS, cell
from checks.devicecheck import strict_devices

#: what each family refuses before loading (the method's own message is checked in its tests)
UNSUPPORTED = {("qwen_vl", m) for m in ("fastervlm", "fastervlm+debias", "embedlens", "embedlens+drop")} | {
    ("internvl", m) for m in ("embedlens", "embedlens+drop")
}


def _args(strict: bool) -> argparse.Namespace:
    """Three batches of 2, with images decoded and processed ahead (the GPU default): the third is served prepared."""
    return argparse.Namespace(device="cpu", dtype="float32", task="pope", limit=2, batch_size=2, prefetch=1,
                              strict_devices=strict)  # fmt: skip


@pytest.mark.parametrize(("model", "method"), [(m, x) for m in MODELS for x in METHODS])
def test_every_cell_runs_with_strict_devices(model, method, tmp_path):
    got = cell(model, method, _args(strict=True), tmp_path)
    want = "unsupported" if (model, method) in UNSUPPORTED else "ok"
    assert got["status"] == want, got
    if want == "ok":
        assert got["samples"] == 6 and got["errors"] == 0
    if method == "var+forced":  # the cell that puts VAR's edit path through the check must edit
        assert got["activity"]["selected_head_rows"] > 0, got


def test_strict_devices_catches_a_planted_host_index(tmp_path, monkeypatch):
    """The original bug, planted again: FastV's selection indexed with an index built without a device."""
    from methods.fastv import FastV

    real = FastV._select_batched

    def planted(self, batch):
        keep = real(self, batch)
        return keep[torch.arange(keep.shape[0])]  # no device=: the host, on a GPU

    monkeypatch.setattr(FastV, "_select_batched", planted)
    assert cell("llava", "fastv", _args(strict=False), tmp_path / "a")["status"] == "ok"  # invisible on the CPU ...
    failed = cell("llava", "fastv", _args(strict=True), tmp_path / "b")
    assert failed["status"] == "FAILED", failed  # ... but not here, and at the planted line
    assert failed["error"].startswith("DeviceMixError") and failed["where"].startswith("tests/test_device_placement")


def test_a_meta_index_into_a_host_tensor_raises():
    """torch indexes a CPU tensor with a meta index silently (garbage out); the strict mode refuses it."""
    from checks.devicecheck import DeviceMixError, _NoMixing

    keep = torch.tensor([True, False, True])
    with torch.device("meta"), _NoMixing():
        index = torch.arange(3)
        with pytest.raises(DeviceMixError):
            keep[index]
        with pytest.raises(DeviceMixError):
            torch.zeros(3, device="cpu").gather(0, index)
        assert keep[torch.tensor(1, device="cpu")].item() is False  # a 0-dim host index is fine, as on CUDA


def test_strict_devices_restores_the_adapter():
    original = Adapter._call
    with strict_devices():
        assert Adapter._call is not original
    assert Adapter._call is original
    with pytest.raises(RuntimeError), strict_devices():
        raise RuntimeError("boom")
    assert Adapter._call is original
