"""The NVML and amdsmi adapters against fakes that keep the real APIs' shapes and failures."""

import time

import pynvml
import pytest
import torch
from fakes import AMDSMI_STATUS_NO_PERM, FakeAMD, FakeAmdsmi, FakeGPU, FakeNVML, me

from lorabench.measure import devices, drivers, environment
from lorabench.measure.devices import amdsmi_handle, nvml_handle
from lorabench.measure.drivers import AmdsmiMemory, NvmlMemory
from lorabench.measure.energy import amdsmi_energy, nvml_energy
from lorabench.measure.trackers import Unavailable, is_unavailable
from lorabench.run import experiment

GiB = 2**30
A = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
B = "GPU-bbbbbbbb-0000-0000-0000-000000000000"
MIG = "MIG-cccccccc-0000-0000-0000-000000000000"


@pytest.fixture
def two_gpus(monkeypatch):
    for var in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(var, raising=False)
    gpus = [
        FakeGPU(uuid=A, pci_bus_id="00000000:3B:00.0"),
        FakeGPU(
            uuid=B, pci_bus_id="00000000:86:00.0", mig=[FakeGPU(uuid=MIG, pci_bus_id="00000000:86:00.0")]
        ),
    ]
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
    assert nvml_handle(FakeNVML([gpus[0]]), 0) is gpus[0]  # one GPU: nothing to confuse


def test_nvml_samples_this_process_and_the_device():
    gpu = FakeGPU(used=3 * GiB, processes={12345: 1 * GiB})
    nvml = FakeNVML([gpu])
    t = NvmlMemory(nvml, gpu, interval_s=0.001)
    with t:
        gpu.processes[me()] = int(1.5 * GiB)  # this process allocates, then frees
        gpu.used = int(4.5 * GiB)
        deadline = time.monotonic() + 10  # a busy machine may delay the sampler's thread: wait for a sample
        while (
            t.device_peak < gpu.used or t.process_peak < gpu.processes[me()]
        ) and time.monotonic() < deadline:
            time.sleep(0.001)
        gpu.processes[me()] = int(0.5 * GiB)
        gpu.used = int(3.5 * GiB)
    r = t.result()
    assert r == {
        "nvml_process_peak_bytes": int(1.5 * GiB),
        "nvml_device_used_peak_bytes": int(4.5 * GiB),
        "nvml_device_used_before_bytes": 3 * GiB,
    }


def test_nvml_process_not_visible_is_unavailable_not_zero():
    gpu = FakeGPU(processes={4242: GiB})  # only another PID (a container's view)
    with NvmlMemory(FakeNVML([gpu]), gpu, interval_s=0.001) as t:
        pass
    r = t.result()
    assert r["nvml_process_peak_bytes"].reason.startswith("process not visible to NVML")
    assert r["nvml_device_used_peak_bytes"] == gpu.used


def test_nvml_per_process_memory_not_available():
    gpu = FakeGPU(processes={me(): None})  # NVML_VALUE_NOT_AVAILABLE -> usedGpuMemory None
    with NvmlMemory(FakeNVML([gpu]), gpu, interval_s=0.001) as t:
        pass
    assert t.result()["nvml_process_peak_bytes"] == Unavailable(
        "NVML reports no per-process memory on this device"
    )


def test_nvml_permission_error_while_listing_processes_is_reported():
    gpu = FakeGPU()
    with NvmlMemory(
        FakeNVML([gpu], process_error=pynvml.NVML_ERROR_NO_PERMISSION), gpu, interval_s=0.001
    ) as t:
        pass
    r = t.result()
    # the driver's own error, not a guess about containers; the device figure goes on
    assert r["nvml_process_peak_bytes"] == Unavailable(
        "NVML could not list the device's processes (NVMLError_NoPermission: Insufficient Permissions)"
    )
    assert r["nvml_device_used_peak_bytes"] == gpu.used


def test_nvml_used_leaves_out_driver_reserved_memory_where_v2_exists():
    idle = FakeGPU(used=0, reserved=512 * 2**20)  # an idle card: the driver keeps 512 MiB for itself
    t = NvmlMemory(FakeNVML([idle]), idle)
    assert t.before_bytes == 0 and t.source == "NVML memory info v2: used, excluding 512 MiB driver-reserved"
    old = FakeGPU(used=0, reserved=512 * 2**20, v2=False)  # a driver without nvmlDeviceGetMemoryInfo_v2
    t = NvmlMemory(FakeNVML([old]), old)
    assert t.before_bytes == 512 * 2**20
    assert t.source.startswith(
        "NVML memory info v1: used, driver-reserved memory included (no v2: Function Not Found"
    )
    with t:
        pass
    assert t.result()["nvml_device_used_peak_bytes"] == 512 * 2**20


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
    meter = nvml_energy(FakeNVML([gpu]), gpu, update_s=1e-4, update_from="test")  # 1 ms epochs suffice
    for joules in (250, 350):
        meter.begin()
        gpu.energy_mj += joules * 1000
        time.sleep(0.002)
        meter.end()
    assert meter.result() == {
        "energy_j_per_epoch": 300.0,
        "energy_source": "NVML total energy counter (the whole device: other processes' work included)",
    }
    old = FakeGPU(energy_mj=None)  # pre-Volta: NVML_ERROR_NOT_SUPPORTED
    meter = nvml_energy(FakeNVML([old]), old)
    meter.begin()
    meter.end()
    assert meter.result()["energy_j_per_epoch"] == Unavailable(
        "NVML total energy counter: NVMLError_NotSupported: Not Supported"
    )


def test_driver_trackers_use_nvml_by_identity(monkeypatch):
    gpu = FakeGPU(uuid=A, pci_bus_id="00000000:3B:00.0")
    fake = FakeNVML([FakeGPU(uuid=B), gpu])
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake)
    monkeypatch.setattr(drivers, "device_identity", lambda i: {"uuid": A[4:], "pci_bus_id": gpu.pci_bus_id})
    monkeypatch.setattr(torch.version, "hip", None)
    trackers, energy, info, missing = drivers.driver_trackers(torch.device("cuda", 0), 0.001)
    assert isinstance(trackers[0], NvmlMemory) and trackers[0].handle is gpu
    assert info == {
        "gpu_driver_view": "NVML",
        "gpu_driver": "550.54.15",
        "gpu_memory_used": "NVML memory info v2: used, excluding 0 MiB driver-reserved",
        "gpu_uuid": A[4:],
        "gpu_pci_bus_id": gpu.pci_bus_id,
    }


@pytest.mark.parametrize(
    "rocm,name,expected",
    [(False, "NVIDIA H100 80GB HBM3", "sm_90"), (True, "gfx90a:sramecc+:xnack-", "gfx90a")],
)
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
    assert trackers == [] and info == {"gpu_uuid": A[4:]}
    why = Unavailable("NVML: NVMLError_LibraryNotFound: NVML Shared Library Not Found")
    # every figure the sampler would have given, the device's "before" reading included
    assert missing == {
        "nvml_process_peak_bytes": why,
        "nvml_device_used_peak_bytes": why,
        "nvml_device_used_before_bytes": why,
    }
    assert energy.result()["energy_j_per_epoch"] == Unavailable(
        "NVML unavailable: NVMLError_LibraryNotFound: NVML Shared Library Not Found"
    )


def test_free_memory_gate_reads_nvml_without_cuda(monkeypatch):
    def no_cuda():
        raise AssertionError("the fit gate initialised CUDA")

    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)  # every CUDA tensor and device query passes here
    monkeypatch.setattr(torch.version, "hip", None)
    gpu = FakeGPU(total=80 * GiB, used=30 * GiB)
    monkeypatch.setitem(__import__("sys").modules, "pynvml", FakeNVML([gpu]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert environment.free_memory_bytes("cuda") == (
        50 * GiB,
        "GPU memory free (NVML, the least of 1 GPU(s): every GPU)",
    )
    monkeypatch.setitem(
        __import__("sys").modules, "pynvml", FakeNVML([gpu], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    )
    free, what = environment.free_memory_bytes("cuda")
    assert free is None and "NVMLError_DriverNotLoaded" in what
    assert not torch.cuda.is_initialized()


def test_free_memory_is_read_per_visible_gpu_and_several_gpus_without_uuids_keep_the_gate(
    two_gpus, monkeypatch
):
    nvml, gpus = two_gpus
    gpus[0].used, gpus[1].used = 10 * GiB, 70 * GiB
    monkeypatch.setitem(__import__("sys").modules, "pynvml", nvml)
    monkeypatch.setattr(torch.version, "hip", None)
    # no CUDA_VISIBLE_DEVICES: every GPU is the run's, whatever order CUDA gives them; the least free is kept
    assert environment.free_memory_bytes("cuda") == (
        10 * GiB,
        "GPU memory free (NVML, the least of 2 GPU(s): every GPU)",
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", A)  # the run may only use GPU A: B's load is not its concern
    assert environment.free_memory_bytes("cuda")[0] == 70 * GiB
    monkeypatch.setenv(
        "CUDA_VISIBLE_DEVICES", "1"
    )  # an index in CUDA's order: unmappable, so every GPU, never more
    free, what = environment.free_memory_bytes("cuda")
    assert free == 10 * GiB and what.startswith(
        "GPU memory free (NVML, the least of 2 GPU(s): every GPU (CUDA_VISIBLE_DEVICES=1 cannot be mapped"
    )


# ---- amdsmi -------------------------------------------------------------------------------------


def test_amdsmi_handle_by_pci_slot_domain_included_and_ambiguity_refused():
    # torch's device 0 may be amdsmi's second (HIP renumbers what HIP_VISIBLE_DEVICES shows): the address decides
    gpus = [FakeAMD(bdf="0000:c1:00.0"), FakeAMD(bdf="0000:03:00.0"), FakeAMD(bdf="0001:03:00.0")]
    smi = FakeAmdsmi(gpus)
    assert amdsmi_handle(smi, {"pci_bus_id": "00000000:03:00"}) is gpus[1]
    assert amdsmi_handle(smi, {"pci_bus_id": "00000001:03:00"}) is gpus[2]  # the same bus in another domain
    with pytest.raises(LookupError, match="no amdsmi device at PCI slot 00000000:44:00"):
        amdsmi_handle(smi, {"pci_bus_id": "00000000:44:00"})
    vfs = FakeAmdsmi(
        [FakeAMD(bdf="0000:03:00.1"), FakeAMD(bdf="0000:03:00.2")]
    )  # two virtual functions of one slot
    with pytest.raises(LookupError, match="2 amdsmi devices share PCI slot 00000000:03:00 .functions 1, 2."):
        amdsmi_handle(vfs, {"pci_bus_id": "00000000:03:00"})
    with pytest.raises(LookupError, match="3 amdsmi devices and no PCI address"):
        amdsmi_handle(smi, {})
    assert amdsmi_handle(FakeAmdsmi(gpus[:1]), {}) is gpus[0]  # one device: nothing to confuse


@pytest.mark.parametrize("api", ["dicts", "handles"])
def test_amdsmi_vram_in_use_not_capacity_and_this_process(api):
    gpu = FakeAMD(vram_used_mb=1024, processes={me(): 3 * GiB, 999: GiB})
    with AmdsmiMemory(FakeAmdsmi([gpu], process_api=api), gpu, interval_s=0.001) as t:
        gpu.vram_used_mb = 4096
        time.sleep(0.01)
    r = t.result()
    assert r["amdsmi_device_vram_used_before_bytes"] == 1024 * 2**20
    assert r["amdsmi_device_vram_used_peak_bytes"] == 4096 * 2**20 < gpu.vram_total_mb * 2**20
    assert r["amdsmi_process_peak_bytes"] == 3 * GiB


def test_amdsmi_permission_denied_is_unavailable_with_the_reason():
    gpu = FakeAMD(processes={me(): GiB})
    with AmdsmiMemory(FakeAmdsmi([gpu], process_error=AMDSMI_STATUS_NO_PERM), gpu, interval_s=0.001) as t:
        pass
    r = t.result()
    assert r["amdsmi_process_peak_bytes"].reason.startswith("amdsmi could not list the device's processes")
    assert "AMDSMI_STATUS_NO_PERM" in r["amdsmi_process_peak_bytes"].reason


@pytest.mark.parametrize("key", ["energy_accumulator", "power"])
def test_amdsmi_energy_counter_times_resolution(key):
    gpu = FakeAMD(energy=1000, resolution_uj=15.3)
    meter = amdsmi_energy(FakeAmdsmi([gpu], energy_key=key), gpu, update_s=1e-4, update_from="test")
    meter.begin()
    gpu.energy += 10_000_000  # x 15.3 uJ = 153 J
    time.sleep(0.002)
    meter.end()
    assert meter.result()["energy_j_per_epoch"] == pytest.approx(153.0)


def test_driver_trackers_use_amdsmi_by_bus_id_on_rocm_and_record_the_driver(monkeypatch):
    gpus = [FakeAMD(bdf="0000:03:00.0"), FakeAMD(bdf="0000:c1:00.0", driver_version=None)]
    monkeypatch.setitem(__import__("sys").modules, "amdsmi", FakeAmdsmi(gpus))
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(drivers, "device_identity", lambda i: {"pci_bus_id": "0000:03:00.0"})
    trackers, energy, info, missing = drivers.driver_trackers(torch.device("cuda", 0), 0.001)
    assert isinstance(trackers[0], AmdsmiMemory) and trackers[0].handle is gpus[0]
    assert info == {"gpu_driver_view": "amdsmi", "gpu_driver": "6.8.5", "gpu_pci_bus_id": "0000:03:00.0"}
    # a device whose driver query is not supported: the version is unavailable, the trackers still run
    monkeypatch.setattr(drivers, "device_identity", lambda i: {"pci_bus_id": "0000:c1:00.0"})
    trackers, energy, info, missing = drivers.driver_trackers(torch.device("cuda", 0), 0.001)
    assert trackers[0].handle is gpus[1]
    assert info["gpu_driver"].startswith("unavailable: amdsmi driver info: AmdSmiLibraryException")


def test_the_driver_version_lands_in_the_rows_environment_not_its_metrics(monkeypatch):
    from lorabench.measure.energy import unavailable_energy
    from lorabench.plan.cells import Cell

    monkeypatch.setattr(
        experiment,
        "driver_trackers",
        lambda device, interval: (
            [],
            unavailable_energy("fake"),
            {"gpu_driver_view": "NVML", "gpu_driver": "550.54.15"},
            {},
        ),
    )
    row = experiment.execute(
        Cell(
            model="cifar-mlp",
            method="lora",
            rank=1,
            samples=16,
            eval_samples=8,
            batch_size=8,
            epochs=1,
            warmup_epochs=0,
        )
    )
    assert row.ok, row.error
    assert row.environment["gpu_driver"] == "550.54.15" and row.environment["gpu_driver_view"] == "NVML"
    assert "gpu_driver" not in row.metrics and "gpu_driver" not in row.info


# ---- torch's own strings, and the edges of the mapping --------------------------------------------


def torch_uuid_format() -> str:
    """The format torch itself prints a device's UUID with (`str(props.uuid)`, torch/csrc/cuda/Module.cpp),
    read from the installed libtorch_python: fmt's `{:02x}` syntax is Python's."""
    import re
    from pathlib import Path

    lib = Path(torch.__file__).parent / "lib" / "libtorch_python.so"
    found = re.search(
        rb"(?:\{:02x\}){4}-(?:\{:02x\}){2}-(?:\{:02x\}){2}-(?:\{:02x\}){2}-(?:\{:02x\}){6}", lib.read_bytes()
    )
    assert found, f"torch's UUID format is not in {lib}: torch changed how it prints a device UUID"
    return found.group().decode()


class TorchUuid:
    """torch._C._CUuuid as torch prints it: the 16 bytes the CUDA driver reports, in torch's format."""

    def __init__(self, raw: bytes):
        self.bytes = list(raw)

    def __str__(self):
        return torch_uuid_format().format(*self.bytes)


def test_torchs_real_uuid_and_pci_numbers_map_to_the_nvml_device(two_gpus):
    from types import SimpleNamespace

    nvml, gpus = two_gpus
    raw = bytes.fromhex(A[4:].replace("-", ""))
    props = SimpleNamespace(uuid=TorchUuid(raw), pci_bus_id=0x3B, pci_device_id=0, pci_domain_id=0)
    assert str(props.uuid) == A[4:]  # torch prints it bare, NVML with "GPU-"
    ident = devices.identity_of(props)
    assert ident == {"uuid": A[4:], "pci_bus_id": "00000000:3B:00"}
    assert nvml_handle(nvml, 0, ident) is gpus[0]
    assert (
        nvml_handle(nvml, 0, {"pci_bus_id": ident["pci_bus_id"]}) is gpus[0]
    )  # by slot, NVML's busId parsed


@pytest.mark.parametrize(
    "text,address",
    [
        ("00000000:3B:00.0", (0, 0x3B, 0, 0)),  # NVML busId: 8-digit domain
        ("0000:3B:00.0", (0, 0x3B, 0, 0)),  # NVML busIdLegacy, lspci
        ("0001:c1:00.1", (1, 0xC1, 0, 1)),  # amdsmi's BDF, another domain, a second function
        ("00000000:86:00", (0, 0x86, 0, None)),  # what torch knows: no function
    ],
)
def test_pci_addresses_parse_in_every_spelling(text, address):
    pci = devices.Pci.parse(text)
    assert (pci.domain, pci.bus, pci.device, pci.function) == address
    with pytest.raises(ValueError):
        devices.Pci.parse("GPU-0")


def test_a_mig_gpu_is_never_taken_by_its_pci_address(two_gpus):
    nvml, gpus = two_gpus
    # torch's UUID of an instance the driver does not list: the slot would name the whole GPU, so refuse
    with pytest.raises(LookupError, match="in MIG mode: its instances are told apart by UUID only"):
        nvml_handle(nvml, 0, {"uuid": "dddddddd-0000-0000-0000-000000000000", "pci_bus_id": "00000000:86:00"})
    gpus[0].mig_capable = True  # MIG-capable but off: the slot is the GPU
    assert nvml_handle(nvml, 0, {"pci_bus_id": "00000000:3B:00"}) is gpus[0]


def test_two_functions_in_one_slot_are_refused_not_guessed():
    vfs = [FakeGPU(uuid=A, pci_bus_id="00000000:3B:00.1"), FakeGPU(uuid=B, pci_bus_id="00000000:3B:00.2")]
    with pytest.raises(LookupError, match="2 NVML devices share PCI slot 00000000:3B:00 .functions 1, 2."):
        nvml_handle(FakeNVML(vfs), 0, {"pci_bus_id": "00000000:3B:00"})
    assert (
        nvml_handle(FakeNVML(vfs), 0, {"uuid": B[4:], "pci_bus_id": "00000000:3B:00"}) is vfs[1]
    )  # the UUID decides


@pytest.mark.parametrize("library", ["nvml", "amdsmi"])
def test_a_sampler_that_fails_after_a_good_reading_reports_no_peak(library):
    if library == "nvml":
        gpu = FakeGPU(processes={me(): GiB})
        nvml = FakeNVML([gpu])
        t, key = (
            NvmlMemory(nvml, gpu, interval_s=3600),
            "nvml_device_used_peak_bytes",
        )  # samples on demand only
        fail = lambda: setattr(
            nvml,
            "nvmlDeviceGetMemoryInfo",
            lambda *a, **k: (_ for _ in ()).throw(pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)),
        )
    else:
        gpu = FakeAMD(processes={me(): GiB})
        smi = FakeAmdsmi([gpu])
        t, key = AmdsmiMemory(smi, gpu, interval_s=3600), "amdsmi_device_vram_used_peak_bytes"
        fail = lambda: setattr(
            smi,
            "amdsmi_get_gpu_vram_usage",
            lambda h: (_ for _ in ()).throw(__import__("fakes").AmdSmiLibraryException(1)),
        )
    with t:
        fail()  # the start's reading was good; the final one fails: the peak in between was never seen
    r = t.result()
    assert is_unavailable(r[key])  # not the peak of the one good reading
    assert r[key].reason.endswith(
        (
            "a reading failed after 1: NVMLError_GpuIsLost: GPU is lost",
            "a reading failed after 1: AmdSmiLibraryException: Error code:\n\t1 | AMDSMI_STATUS_INVAL",
        )
    )
