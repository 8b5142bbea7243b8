"""Stand-ins for the GPU driver libraries, the only parts of lorabench the tests may fake.

They keep the real modules' call signatures, return types, units and exceptions:
- FakeNVML follows nvidia-ml-py (`pynvml`): handles from index, UUID (GPU-/MIG-) or PCI bus id;
  PCI info (domain, bus and device as numbers, `busId` as text) and MIG mode (NOT_SUPPORTED off MIG GPUs);
  memory info in bytes, v1 (`used` includes driver-reserved memory) and v2 (`reserved` apart;
  FUNCTION_NOT_FOUND where the driver lacks it); compute processes with `pid` and `usedGpuMemory` (None when NVML cannot
  say); total energy in millijoules; errors are pynvml's own NVMLError subclasses, built from codes.
- FakeAmdsmi follows amdsmi: processor handles matched by BDF; `amdsmi_get_gpu_vram_usage` in MB;
  the process list as dicts (amdsmi >= 6.1) or as handles resolved by `amdsmi_get_gpu_process_info`;
  the energy counter with its resolution in microjoules; AmdSmiLibraryException with status codes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml


@dataclass
class FakeGPU:
    uuid: str = "GPU-11111111-2222-3333-4444-555555555555"
    pci_bus_id: str = "00000000:3B:00.0"
    total: int = 80 * 2**30
    used: int = 2 * 2**30  # processes' memory (v2's `used`)
    reserved: int = 0  # the driver's own; v1's `used` includes it
    v2: bool = True  # the driver has nvmlDeviceGetMemoryInfo_v2
    processes: dict[int, int | None] = field(default_factory=dict)  # pid -> usedGpuMemory
    energy_mj: int | None = 1_000_000  # None: counter not supported
    # The counter moves in steps (NVML's on A100/H100 about every 100 ms): with a power draw set, it
    # reads energy_mj plus what `power_w` added up to the last update, `energy_update_s` apart.
    power_w: float | None = None
    energy_update_s: float = 0.1
    mig: list["FakeGPU"] = field(default_factory=list)  # instances: the GPU is in MIG mode
    mig_capable: bool = False  # MIG mode can be read (A100, H100); off


class FakeNVML:
    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_NoPermission = pynvml.NVMLError_NoPermission
    NVMLError_NotFound = pynvml.NVMLError_NotFound
    nvmlMemory_v2 = pynvml.nvmlMemory_v2
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE

    def __init__(
        self,
        gpus: list[FakeGPU],
        init_error: int | None = None,
        process_error: int | None = None,
        process_list_s: float = 0.0,
    ):
        self.gpus, self.init_error, self.process_error = gpus, init_error, process_error
        self.process_list_s = (
            process_list_s  # what listing the processes costs (it walks the driver's tables)
        )
        self.process_lists = 0  # calls made
        self.initialised = 0
        self.t0 = time.perf_counter()

    def _all(self):
        for g in self.gpus:
            yield g
            yield from g.mig

    def nvmlInit(self):
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self):
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return 12040  # the newest CUDA the driver runs, as 1000 * major + 10 * minor

    def nvmlDeviceGetName(self, handle: FakeGPU) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int):
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str):
        for g in self._all():
            if g.uuid == uuid:
                return g
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle: FakeGPU) -> str:
        """pynvml >= 11.5 returns str (its convertStrBytes wrapper), with the GPU- or MIG- prefix."""
        return handle.uuid

    def nvmlDeviceGetHandleByPciBusId(self, bus: str):
        for g in self.gpus:
            if g.pci_bus_id.upper() == bus.upper():
                return g
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetPciInfo(self, handle: FakeGPU):
        """pynvml's nvmlPciInfo_t: the slot as numbers, `busId` as text (pynvml turns the C chars into str)."""
        if handle not in self.gpus:  # a MIG instance's handle: the PCI query is the parent GPU's
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        domain, bus, rest = handle.pci_bus_id.split(":")
        device = rest.split(".")[0]
        return SimpleNamespace(
            busIdLegacy=f"{int(domain, 16):04X}:{bus}:{rest}",
            domain=int(domain, 16),
            bus=int(bus, 16),
            device=int(device, 16),
            pciDeviceId=0x233010DE,
            pciSubSystemId=0x16C110DE,
            busId=handle.pci_bus_id,
        )

    def nvmlDeviceGetMigMode(self, handle: FakeGPU):
        """[current, pending]; NOT_SUPPORTED on a GPU without MIG."""
        if not (handle.mig or handle.mig_capable):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if handle.mig else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGPU, version=None):
        """pynvml: no version -> nvmlMemory_t, whose `used` counts the driver-reserved memory too;
        version=nvmlMemory_v2 -> the v2 struct (reserved apart), or FUNCTION_NOT_FOUND on an old driver."""
        free = handle.total - handle.used - handle.reserved
        if not version:
            return SimpleNamespace(total=handle.total, free=free, used=handle.used + handle.reserved)
        if not handle.v2:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return SimpleNamespace(
            version=version, total=handle.total, reserved=handle.reserved, free=free, used=handle.used
        )

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGPU):
        self.process_lists += 1
        busy(self.process_list_s)
        if self.process_error is not None:
            raise pynvml.NVMLError(self.process_error)
        return [
            SimpleNamespace(
                pid=pid, usedGpuMemory=mem, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF
            )
            for pid, mem in handle.processes.items()
        ]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeGPU) -> int:
        if handle.energy_mj is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if handle.power_w is None:
            return handle.energy_mj
        updates = (time.perf_counter() - self.t0) // handle.energy_update_s
        return handle.energy_mj + int(handle.power_w * 1000 * updates * handle.energy_update_s)


class AmdSmiException(Exception):
    pass


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, err_code: int):
        self.err_code = err_code
        super().__init__(f"Error code:\n\t{err_code} | {AMDSMI_STATUS.get(err_code, 'UNKNOWN')}")


AMDSMI_STATUS = {1: "AMDSMI_STATUS_INVAL", 2: "AMDSMI_STATUS_NOT_SUPPORTED", 10: "AMDSMI_STATUS_NO_PERM"}
AMDSMI_STATUS_NOT_SUPPORTED, AMDSMI_STATUS_NO_PERM = 2, 10


@dataclass
class FakeAMD:
    bdf: str = "0000:c1:00.0"
    vram_total_mb: int = 196_592
    vram_used_mb: int = 512
    processes: dict[int, int] = field(default_factory=dict)  # pid -> VRAM bytes
    energy: int | None = 5_000_000  # counter units
    resolution_uj: float = 15.3
    driver_version: str | None = "6.8.5"  # None: the query is not supported


class FakeAmdsmi:
    AmdSmiException = AmdSmiException
    AmdSmiLibraryException = AmdSmiLibraryException

    def __init__(
        self,
        gpus: list[FakeAMD],
        process_api: str = "dicts",
        process_error: int | None = None,
        energy_key: str = "energy_accumulator",
    ):
        self.gpus, self.process_api, self.process_error, self.energy_key = (
            gpus,
            process_api,
            process_error,
            energy_key,
        )
        self.process_lists = 0  # calls made (the documentation asks for at least a second between them)

    def amdsmi_init(self, flag=None):
        pass

    lib_version = {"major": 6, "minor": 4, "release": 1, "build": "6.4.1.60401-83"}  # libamd_smi's

    def amdsmi_get_lib_version(self) -> dict:
        return dict(self.lib_version)

    rocm_version = "6.4.1"  # the host's ROCm release, from librocm-core

    def amdsmi_get_rocm_version(self) -> tuple[bool, str]:
        return True, self.rocm_version

    def amdsmi_shut_down(self):
        pass

    def amdsmi_get_processor_handles(self):
        return list(self.gpus)

    def amdsmi_get_gpu_device_bdf(self, handle: FakeAMD) -> str:
        return handle.bdf

    def amdsmi_get_gpu_driver_info(self, handle: FakeAMD) -> dict:
        if handle.driver_version is None:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_SUPPORTED)
        return {
            "driver_name": "amdgpu",
            "driver_version": handle.driver_version,
            "driver_date": "2015/01/01 00:00",
        }

    def amdsmi_get_gpu_vram_usage(self, handle: FakeAMD) -> dict:
        return {"vram_total": handle.vram_total_mb, "vram_used": handle.vram_used_mb}

    def amdsmi_get_gpu_process_list(self, handle: FakeAMD):
        self.process_lists += 1
        if self.process_error is not None:
            raise AmdSmiLibraryException(self.process_error)
        infos = [
            {
                "name": "python",
                "pid": pid,
                "mem": vram,
                "engine_usage": {"gfx": 0, "enc": 0},
                "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": vram},
            }
            for pid, vram in handle.processes.items()
        ]
        return infos if self.process_api == "dicts" else [("proc", i) for i in range(len(infos))]

    def amdsmi_get_gpu_process_info(self, handle: FakeAMD, proc):
        infos = [
            {"name": "python", "pid": pid, "mem": vram, "memory_usage": {"vram_mem": vram}}
            for pid, vram in handle.processes.items()
        ]
        return infos[proc[1]]

    def amdsmi_get_energy_count(self, handle: FakeAMD) -> dict:
        if handle.energy is None:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_SUPPORTED)
        return {self.energy_key: handle.energy, "counter_resolution": handle.resolution_uj, "timestamp": 0}


def busy(seconds: float) -> None:
    """Spend `seconds` of this thread's CPU time, as a driver call walking its tables does."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def me() -> int:
    return os.getpid()
