"""Which GPUs a cell is pinned to: of those this process inherited, by the variable that wins on the
platform, composed as torch parses them (torch.cuda._parse_visible_devices)."""

import pytest

from lorabench.run import runner


@pytest.fixture
def platform(monkeypatch):
    """platform(rocm, **environment): the visible-device variables set to exactly these."""

    def set_to(rocm: bool, **env):
        for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        monkeypatch.setattr(runner.torch.version, "hip", "6.2" if rocm else None)

    return set_to


def test_cuda_cells_take_the_inherited_devices_in_order(platform):
    platform(False)
    assert runner.devices("cuda", 2) == ["0", "1"]
    assert runner.pin(["0"]) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert runner.pin(["2", "3"]) == {"CUDA_VISIBLE_DEVICES": "2,3"}  # a cell of two processes
    platform(False, CUDA_VISIBLE_DEVICES="GPU-aaa,GPU-bbb,GPU-ccc")  # UUIDs pass through as given
    assert runner.devices("cuda", 2) == ["GPU-aaa", "GPU-bbb"]
    assert runner.devices("cpu", 1) == [] and runner.pin([]) == {}


def test_rocm_cells_stay_inside_an_allocation_given_by_cuda_visible_devices(platform):
    """HIP_VISIBLE_DEVICES wins over CUDA_VISIBLE_DEVICES on ROCm: pinning HIP_VISIBLE_DEVICES=0 under
    CUDA_VISIBLE_DEVICES=2,3 put the cell on physical GPU 0, outside the user's allocation."""
    platform(True, CUDA_VISIBLE_DEVICES="2,3")
    ids = runner.devices("cuda", 2)
    assert ids == ["2", "3"]
    assert [runner.pin([i]) for i in ids] == [{"HIP_VISIBLE_DEVICES": "2"}, {"HIP_VISIBLE_DEVICES": "3"}]


def test_rocm_hip_visible_devices_number_what_rocr_left(platform):
    platform(True, ROCR_VISIBLE_DEVICES="4,5,6", HIP_VISIBLE_DEVICES="2,0")
    assert runner.devices("cuda", 2) == ["2", "0"]  # HIP's numbers, inside ROCR's three
    platform(True, ROCR_VISIBLE_DEVICES="4,5")  # ROCR alone: its devices are 0 and 1 to HIP
    assert runner.devices("cuda", 2) == ["0", "1"]
    assert runner.pin(["1"]) == {"HIP_VISIBLE_DEVICES": "1"}  # the second of ROCR's: physical 5
    # HIP honours CUDA_VISIBLE_DEVICES inside what ROCR left (torch's own parser ignores it here)
    platform(True, ROCR_VISIBLE_DEVICES="0,1,2,3", CUDA_VISIBLE_DEVICES="2,3")
    assert runner.devices("cuda", 2) == ["2", "3"]


def test_rocm_without_any_variable_numbers_every_gpu(platform):
    platform(True)
    assert runner.devices("cuda", 3) == ["0", "1", "2"]
    assert runner.pin(["0", "1"]) == {"HIP_VISIBLE_DEVICES": "0,1"}
