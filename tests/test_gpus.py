"""GPU inventory without torch: nvidia-smi output, visibility variables, --assume-gpus."""

from __future__ import annotations

import pytest

from entrypoint import gpus
from recipes.errors import BadInput

SMI = """0, GPU-aaaa1111, NVIDIA H100 80GB HBM3, 81559
1, GPU-bbbb2222, NVIDIA H100 80GB HBM3, 81559
2, GPU-cccc3333, NVIDIA H100 80GB HBM3, 81559
3, GPU-dddd4444, NVIDIA H100 80GB HBM3, 81559
"""


def discover(env):
    return gpus.discover(env, smi=lambda: SMI)


def test_every_gpu_nvidia_smi_lists_is_visible_by_default():
    found = discover({})
    assert [g.id for g in found] == ["0", "1", "2", "3"]
    assert found[0].memory_gib == 79.6 and found[0].name == "NVIDIA H100 80GB HBM3"


def test_cuda_visible_devices_selects_and_orders_by_index():
    assert [g.id for g in discover({"CUDA_VISIBLE_DEVICES": "3,1"})] == ["3", "1"]


def test_cuda_visible_devices_accepts_uuid_prefixes():
    assert [g.id for g in discover({"CUDA_VISIBLE_DEVICES": "GPU-cccc"})] == ["GPU-cccc"]


def test_cuda_visible_devices_stops_at_the_first_invalid_entry_like_cuda():
    assert [g.id for g in discover({"CUDA_VISIBLE_DEVICES": "0,-1,2"})] == ["0"]
    assert [g.id for g in discover({"CUDA_VISIBLE_DEVICES": "1,9,2"})] == ["1"]


def test_empty_cuda_visible_devices_hides_every_gpu():
    assert discover({"CUDA_VISIBLE_DEVICES": ""}) == []


@pytest.mark.parametrize("value", ["none", "void", ""])
def test_nvidia_visible_devices_none_hides_every_gpu(value):
    assert discover({"NVIDIA_VISIBLE_DEVICES": value}) == []


def test_no_nvidia_smi_means_no_gpu():
    assert gpus.discover({}, smi=lambda: None) == []


def test_assume_gpus_with_and_without_memory():
    assert [(g.id, g.memory_gib) for g in gpus.assumed("2x80")] == [("0", 80.0), ("1", 80.0)]
    assert [g.memory_gib for g in gpus.assumed("3")] == [None, None, None]
    assert gpus.assumed("0") == []


@pytest.mark.parametrize("spec", ["four", "4x", "x80", "4x0", "-1"])
def test_bad_assume_gpus_is_refused(spec):
    with pytest.raises(BadInput, match="--assume-gpus"):
        gpus.assumed(spec)
