"""The NVML and amdsmi adapters against fakes that keep the real APIs' shapes and failures."""
import time

import pynvml
import pytest
import torch

from fakes import (AMDSMI_STATUS_NO_PERM, FakeAMD, FakeAmdsmi, FakeGPU, FakeNVML, me)
from lorabench import drivers, environment, experiment
from lorabench.drivers import AmdsmiMemory, NvmlMemory, amdsmi_energy, amdsmi_handle, nvml_energy, nvml_handle
from lorabench.trackers import Unavailable, is_unavailable

GiB = 2 ** 30
A = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
B = "GPU-bbbbbbbb-0000-0000-0000-000000000000"
MIG = "MIG-cccccccc-0000-0000-0000-000000000000"


@pytest.fixture
def two_gpus(monkeypatch):
    for var in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(var, raising=False)
    gpus = [FakeGPU(uuid=A, pci_bus_id="00000000:3B:00.0"),
            FakeGPU(uuid=B, pci_bus_id="00000000:86:00.0", mig=[FakeGPU(uuid=MIG, pci_bus_id="00000000:86:00.0")])]
    return FakeNVML(gpus), gpus


def test_handle_by_the_torch_devices_uuid_not_its_index(two_gpus):
    nvml, gpus = two_gpus
    # torch reports the UUID without its prefix; CUDA's fastest-first order put GPU B first
    assert nvml_handle(nvml, 0, {"uuid": B[4:], "pci_bus_id": "00000000:86:00.0"}) is gpus[1]
    assert nvml_handle(nvml, 0, {"uuid": MIG[4:]}) is gpus[1].mig[0]
    assert nvml_handle(nvml, 0, {"uuid": "", "pci_bus_id": "00000000:3B:00.0"}) is gpus[0]


def test_handle_from_visible_devices_uuids_and_mig_ids(two_gpus, monkeypatch):
    nvml, gpus = two_gpus
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{B},{A}")
    assert nvml_handle(nvml, 0) is gpus[1] and nvml_handle(nvml, 1) is gpus[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", MIG)
    assert nvml_handle(nvml, 0) is gpus[1].mig[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-ffffffff-0000-0000-0000-000000000000")
    with pytest.raises(pynvml.NVMLError_NotFound):
        nvml_handle(nvml, 0)


def test_an_index_is_only_trusted_in_pci_bus_order(two_gpus, monkeypatch):
    nvml, gpus = two_gpus
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(LookupError, match="fastest-first order, which NVML does not share"):
        nvml_handle(nvml, 0)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert nvml_handle(nvml, 0) is gpus[1]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.delenv("CUDA_DEVICE_ORDER")
    with pytest.raises(LookupError, match="several GPUs"):
        nvml_handle(nvml, 0)
    assert nvml_handle(FakeNVML([gpus[0]]), 0) is gpus[0]      # one GPU: nothing to confuse


def test_nvml_samples_this_process_and_the_device():
    gpu = FakeGPU(used=3 * GiB, processes={12345: 1 * GiB})
    nvml = FakeNVML([gpu])
    t = NvmlMemory(nvml, gpu, interval_s=0.001)
    with t:
        gpu.processes[me()] = int(1.5 * GiB)     # this process allocates, then frees
        gpu.used = int(4.5 * GiB)
        deadline = time.monotonic() + 10         # a busy machine may delay the sampler's thread: wait for a sample
        while (t.device_peak < gpu.used or t.process_peak < gpu.processes[me()]) and time.monotonic() < deadline:
            time.sleep(0.001)
        gpu.processes[me()] = int(0.5 * GiB)
        gpu.used = int(3.5 * GiB)
    r = t.result()
    assert r == {"nvml_process_peak_bytes": int(1.5 * GiB), "nvml_device_used_peak_bytes": int(4.5 * GiB),
                 "nvml_device_used_before_bytes": 3 * GiB}


def test_nvml_process_not_visible_is_unavailable_not_zero():
    gpu = FakeGPU(processes={4242: GiB})          # only another PID (a container's view)
    with NvmlMemory(FakeNVML([gpu]), gpu, interval_s=0.001) as t:
        pass
    r = t.result()
    assert r["nvml_process_peak_bytes"].reason.startswith("process not visible to NVML")
    assert r["nvml_device_used_peak_bytes"] == gpu.used


def test_nvml_per_process_memory_not_available():
    gpu = FakeGPU(processes={me(): None})       # NVML_VALUE_NOT_AVAILABLE -> usedGpuMemory None
    with NvmlMemory(FakeNVML([gpu]), gpu, interval_s=0.001) as t:
        pass
    assert t.result()["nvml_process_peak_bytes"] == Unavailable("NVML reports no per-process memory on this device")


def test_nvml_permission_error_while_listing_processes_is_reported():
    gpu = FakeGPU()
    with NvmlMemory(FakeNVML([gpu], process_error=pynvml.NVML_ERROR_NO_PERMISSION), gpu, interval_s=0.001) as t:
        pass
    r = t.result()
    # the driver's own error, not a guess about containers; the device figure goes on
    assert r["nvml_process_peak_bytes"] == Unavailable(
        "NVML could not list the device's processes (NVMLError_NoPermission: Insufficient Permissions)")
    assert r["nvml_device_used_peak_bytes"] == gpu.used


def test_nvml_used_leaves_out_driver_reserved_memory_where_v2_exists():
    idle = FakeGPU(used=0, reserved=512 * 2 ** 20)          # an idle card: the driver keeps 512 MiB for itself
    t = NvmlMemory(FakeNVML([idle]), idle)
    assert t.before_bytes == 0 and t.source == "NVML memory info v2: used, excluding 512 MiB driver-reserved"
    old = FakeGPU(used=0, reserved=512 * 2 ** 20, v2=False)  # a driver without nvmlDeviceGetMemoryInfo_v2
    t = NvmlMemory(FakeNVML([old]), old)
    assert t.before_bytes == 512 * 2 ** 20
    assert t.source.startswith("NVML memory info v1: used, driver-reserved memory included (no v2: Function Not Found")
    with t:
        pass
    assert t.result()["nvml_device_used_peak_bytes"] == 512 * 2 ** 20


def test_the_process_tree_is_walked_once_a_second_not_every_sample(monkeypatch):
    calls = []
    import psutil
    real = psutil.Process.children
    monkeypatch.setattr(psutil.Process, "children", lambda self, **kw: calls.append(1) or real(self, **kw))
    gpu = FakeGPU(processes={me(): GiB})
    t = NvmlMemory(FakeNVML([gpu]), gpu, interval_s=0.001)
    for _ in range(200):
        t._sample()
    assert len(calls) == 1 and t.process_peak == GiB


def test_nvml_energy_per_interval_and_not_supported():
    gpu = FakeGPU(energy_mj=1_000_000)
    meter = nvml_energy(FakeNVML([gpu]), gpu)
    for joules in (250, 350):
        meter.begin()
        gpu.energy_mj += joules * 1000
        meter.end()
    assert meter.result() == {"energy_j_per_epoch": 300.0, "energy_source":
                              "NVML total energy counter (the whole device: other processes' work included)"}
    old = FakeGPU(energy_mj=None)                 # pre-Volta: NVML_ERROR_NOT_SUPPORTED
    meter = nvml_energy(FakeNVML([old]), old)
    meter.begin()
    meter.end()
    assert meter.result()["energy_j_per_epoch"] == Unavailable(
        "NVML total energy counter: NVMLError_NotSupported: Not Supported")


def test_driver_trackers_use_nvml_by_identity(monkeypatch):
    gpu = FakeGPU(uuid=A, pci_bus_id="00000000:3B:00.0")
    fake = FakeNVML([FakeGPU(uuid=B), gpu])
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake)
    monkeypatch.setattr(drivers, "device_identity", lambda i: {"uuid": A[4:], "pci_bus_id": gpu.pci_bus_id})
    monkeypatch.setattr(torch.version, "hip", None)
    trackers, energy, info, missing = drivers.driver_trackers(torch.device("cuda", 0), 0.001)
    assert isinstance(trackers[0], NvmlMemory) and trackers[0].handle is gpu
    assert info == {"gpu_driver_view": "NVML", "gpu_driver": "550.54.15",
                    "gpu_memory_used": "NVML memory info v2: used, excluding 0 MiB driver-reserved"}


@pytest.mark.parametrize("rocm,name,expected", [(False, "NVIDIA H100 80GB HBM3", "sm_90"),
                                                (True, "gfx90a:sramecc+:xnack-", "gfx90a")])
def test_gpu_arch_is_the_compute_capability_on_cuda_and_the_gfx_target_on_rocm(rocm, name, expected):
    # torch on CUDA puts the card's name in gcnArchName; only a ROCm build's is an architecture
    from types import SimpleNamespace
    props = SimpleNamespace(gcnArchName=name, major=9 if not rocm else 9, minor=0)
    assert environment.gpu_arch(props, rocm) == expected


def test_driver_trackers_without_the_library_report_why(monkeypatch):
    fake = FakeNVML([FakeGPU()], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake)
    monkeypatch.setattr(drivers, "device_identity", lambda i: {"uuid": A[4:]})
    monkeypatch.setattr(torch.version, "hip", None)
    trackers, energy, info, missing = drivers.driver_trackers(torch.device("cuda", 0), 0.001)
    assert trackers == [] and info == {}
    assert missing["nvml_process_peak_bytes"] == Unavailable("NVML: NVMLError_LibraryNotFound: NVML Shared Library Not Found")
    assert is_unavailable(energy.result()["energy_j_per_epoch"])


def test_free_memory_gate_reads_nvml_without_cuda(monkeypatch):
    gpu = FakeGPU(total=80 * GiB, used=30 * GiB)
    monkeypatch.setitem(__import__("sys").modules, "pynvml", FakeNVML([gpu]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert environment.free_memory_bytes("cuda") == (50 * GiB, "GPU memory free (NVML)")
    monkeypatch.setitem(__import__("sys").modules, "pynvml",
                        FakeNVML([gpu], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    free, what = environment.free_memory_bytes("cuda")
    assert free is None and "NVMLError_DriverNotLoaded" in what


# ---- amdsmi -------------------------------------------------------------------------------------

def test_amdsmi_handle_by_bus_id_whatever_the_visible_devices_numbering(monkeypatch):
    gpus = [FakeAMD(bdf="0000:c1:00.0"), FakeAMD(bdf="0000:03:00.0")]
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "1")        # torch's device 0 is the second GPU
    smi = FakeAmdsmi(gpus)
    assert amdsmi_handle(smi, {"pci_bus_id": "00000000:03:00.0"}) is gpus[1]
    with pytest.raises(LookupError, match="no amdsmi device with PCI bus id"):
        amdsmi_handle(smi, {"pci_bus_id": "00000000:44:00.0"})


@pytest.mark.parametrize("api", ["dicts", "handles"])
def test_amdsmi_vram_in_use_not_capacity_and_this_process(api):
    gpu = FakeAMD(vram_used_mb=1024, processes={me(): 3 * GiB, 999: GiB})
    with AmdsmiMemory(FakeAmdsmi([gpu], process_api=api), gpu, interval_s=0.001) as t:
        gpu.vram_used_mb = 4096
        time.sleep(0.01)
    r = t.result()
    assert r["amdsmi_device_vram_used_before_bytes"] == 1024 * 2 ** 20
    assert r["amdsmi_device_vram_used_peak_bytes"] == 4096 * 2 ** 20 < gpu.vram_total_mb * 2 ** 20
    assert r["amdsmi_process_peak_bytes"] == 3 * GiB


def test_amdsmi_permission_denied_is_unavailable_with_the_reason():
    gpu = FakeAMD(processes={me(): GiB})
    with AmdsmiMemory(FakeAmdsmi([gpu], process_error=AMDSMI_STATUS_NO_PERM), gpu, interval_s=0.001) as t:
        pass
    r = t.result()
    assert r["amdsmi_process_peak_bytes"].reason.startswith("process not visible to amdsmi")
    assert "AMDSMI_STATUS_NO_PERM" in r["amdsmi_process_peak_bytes"].reason


@pytest.mark.parametrize("key", ["energy_accumulator", "power"])
def test_amdsmi_energy_counter_times_resolution(key):
    gpu = FakeAMD(energy=1000, resolution_uj=15.3)
    meter = amdsmi_energy(FakeAmdsmi([gpu], energy_key=key), gpu)
    meter.begin()
    gpu.energy += 10_000_000                     # x 15.3 uJ = 153 J
    meter.end()
    assert meter.result()["energy_j_per_epoch"] == pytest.approx(153.0)


def test_driver_trackers_use_amdsmi_by_bus_id_on_rocm_and_record_the_driver(monkeypatch):
    gpus = [FakeAMD(bdf="0000:03:00.0"), FakeAMD(bdf="0000:c1:00.0", driver_version=None)]
    monkeypatch.setitem(__import__("sys").modules, "amdsmi", FakeAmdsmi(gpus))
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(drivers, "device_identity", lambda i: {"pci_bus_id": "0000:03:00.0"})
    trackers, energy, info, missing = drivers.driver_trackers(torch.device("cuda", 0), 0.001)
    assert isinstance(trackers[0], AmdsmiMemory) and trackers[0].handle is gpus[0]
    assert info == {"gpu_driver_view": "amdsmi", "gpu_driver": "6.8.5"}
    # a device whose driver query is not supported: the version is unavailable, the trackers still run
    monkeypatch.setattr(drivers, "device_identity", lambda i: {"pci_bus_id": "0000:c1:00.0"})
    trackers, energy, info, missing = drivers.driver_trackers(torch.device("cuda", 0), 0.001)
    assert trackers[0].handle is gpus[1]
    assert info["gpu_driver"].startswith("unavailable: amdsmi driver info: AmdSmiLibraryException")


def test_the_driver_version_lands_in_the_rows_environment_not_its_metrics(monkeypatch):
    from lorabench.cells import Cell
    from lorabench.drivers import unavailable_energy
    monkeypatch.setattr(experiment, "driver_trackers", lambda device, interval: (
        [], unavailable_energy("fake"), {"gpu_driver_view": "NVML", "gpu_driver": "550.54.15"}, {}))
    row = experiment.execute(Cell(model="cifar-mlp", method="lora", rank=1, samples=16, eval_samples=8, batch_size=8,
                                  epochs=1, warmup_epochs=0))
    assert row.ok, row.error
    assert row.environment["gpu_driver"] == "550.54.15" and row.environment["gpu_driver_view"] == "NVML"
    assert "gpu_driver" not in row.metrics and "gpu_driver" not in row.info
