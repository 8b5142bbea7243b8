"""What the GPU drivers' readings mean, against fakes that behave as the real libraries do: how often
each query may run, an energy counter that moves in steps, the runtime context a container hides,
and which amdsmi binding is imported."""

import sys
import time

import pytest
import torch
from fakes import FakeAMD, FakeAmdsmi, FakeGPU, FakeNVML, me

from lorabench import gpucheck
from lorabench.measure import calibration, drivers
from lorabench.measure import energy as energies
from lorabench.measure.drivers import AmdsmiMemory, NvmlMemory, runtime_context
from lorabench.measure.energy import EnergyMeter, nvml_energy
from lorabench.measure.trackers import Unavailable, is_unavailable

GiB, MiB = 2**30, 2**20
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path))
    return tmp_path


# ---- each query at the cadence its cost allows ---------------------------------------------------


def test_a_costly_process_list_is_not_read_every_sample():
    """Listing the processes costs milliseconds (a driver walk, a psutil tree): read every 10 ms it
    would take a fifth of a core from the training it measures. Device memory is read every sample."""
    gpu = FakeGPU(processes={me(): GiB})
    nvml = FakeNVML([gpu], process_list_s=0.002)  # 2 ms a call: at most once every 200 ms at a 1 % duty
    with NvmlMemory(nvml, gpu, interval_s=0.001) as t:
        time.sleep(0.5)
    assert len(t.series) > 50  # device memory, every sample
    assert nvml.process_lists <= 6  # start, stop, and every 200 ms between
    assert t.result()["nvml_process_peak_bytes"] == GiB
    assert t.processes.period_s == pytest.approx(0.2, rel=0.5)


def test_amdsmis_process_list_runs_at_most_once_a_second():
    gpu = FakeAMD(processes={me(): GiB})
    smi = FakeAmdsmi([gpu])
    with AmdsmiMemory(smi, gpu, interval_s=0.001) as t:
        time.sleep(0.3)
    assert smi.process_lists == 2  # the readings at start and stop only
    assert len(t.series) > 20 and t.result()["amdsmi_process_peak_bytes"] == GiB


def test_the_cadence_says_what_each_query_cost():
    gpu = FakeGPU()
    with NvmlMemory(FakeNVML([gpu], process_list_s=0.001), gpu, interval_s=0.01) as t:
        time.sleep(0.05)
    import re

    assert re.fullmatch(
        r"device memory \d\.\d{3} ms every 10 ms; process list \d\.\d{3} ms every \d+ ms", t.cadence()
    )
    assert t.processes.cost_s >= 0.001 and t.processes.period_s >= 0.1


# ---- energy: a counter that moves in steps ---------------------------------------------------------


def test_an_epoch_shorter_than_ten_counter_updates_has_no_energy_figure():
    """On A100/H100 the counter moves about every 100 ms: an epoch of 30 ms read 0 J, or one step's
    worth, as a number."""
    gpu = FakeGPU(power_w=300.0, energy_update_s=0.01)
    nvml = FakeNVML([gpu])
    short = nvml_energy(nvml, gpu, update_s=0.01, update_from="measured")
    short.begin()
    time.sleep(0.03)
    short.end()
    why = short.result()["energy_j_per_epoch"]
    assert (
        is_unavailable(why)
        and "shorter than 10 of the counter's update periods (10 ms, measured)" in why.reason
    )
    long = nvml_energy(nvml, gpu, update_s=0.01, update_from="measured")
    long.begin()
    t0 = time.perf_counter()
    time.sleep(0.2)
    took = time.perf_counter() - t0
    long.end()
    assert long.result()["energy_j_per_epoch"] == pytest.approx(300.0 * took, rel=0.15)


def test_a_counter_that_did_not_move_is_not_zero_joules():
    gpu = FakeGPU(energy_mj=5_000)
    meter = nvml_energy(FakeNVML([gpu]), gpu, update_s=1e-4, update_from="test")
    meter.begin()
    time.sleep(0.01)
    meter.end()
    assert meter.result()["energy_j_per_epoch"] == Unavailable(
        "NVML total energy counter: the counter did not advance"
    )


def test_the_update_period_is_measured_from_the_counters_steps():
    gpu = FakeGPU(power_w=250.0, energy_update_s=0.02)
    nvml = FakeNVML([gpu])
    period = energies.update_period(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(gpu) / 1e3, 0.3)
    assert period == pytest.approx(0.02, rel=0.25)
    still = energies.update_period(lambda: 7.0, 0.05)
    assert is_unavailable(still) and still.reason == "the counter moved 0 times in 0.05 s"


def test_a_cell_uses_the_update_period_check_recorded_for_its_device(cache, monkeypatch):
    gpu = FakeGPU(uuid="GPU-aaaaaaaa-0000-0000-0000-000000000000")
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([gpu]))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(drivers, "device_identity", lambda i: {"uuid": gpu.uuid[4:], "name": H100})
    _, energy, _, _ = drivers.driver_trackers(torch.device("cuda", 0), 0.01)
    assert energy.update_s == energies.ASSUMED_UPDATE_S and energy.update_from.startswith("assumed")
    calibration.record_energy_update(H100, 0.05, "2.14")
    _, energy, _, _ = drivers.driver_trackers(torch.device("cuda", 0), 0.01)
    assert (energy.update_s, energy.update_from) == (0.05, f"measured by lorabench check on {H100}")


def test_the_meter_default_is_the_published_period():
    meter = EnergyMeter(lambda: 0.0, "x")
    assert meter.update_s == 0.1 and energies.MIN_PERIODS == 10


# ---- the runtime context, inside a container and out -------------------------------------------------


def _window(gpu: FakeGPU, nvml: FakeNVML, before=None) -> dict:
    with NvmlMemory(nvml, gpu, interval_s=0.001, before=before) as t:
        pass
    return t, t.result()


def test_the_check_judges_a_container_by_the_devices_use_and_still_finds_the_context():
    """In a container NVML lists host PIDs, never ours: the check read this process's peak as 0, the
    context as 0 - reserved < 0, failed, and recorded nothing. The device's memory in use tells both."""
    others, context, reserved = 2 * GiB, 500 * MiB, 2 * MiB
    gpu = FakeGPU(used=others + context + reserved, processes={4242: others})  # a host PID, not ours
    nvml = FakeNVML([gpu])
    idle_sampler, idle = _window(gpu, nvml, before=others)  # read before this process had a context
    gpu.used += GiB
    _, loaded = _window(gpu, nvml)
    seen = gpucheck.driver_sees(idle_sampler, idle, loaded, reserved, reserved + GiB, before_is_others=True)
    assert seen.ok and seen.context == context
    assert seen.measured.startswith(
        "NVML device in use +1,024 MiB for reserved +1,024 MiB (process not visible"
    )
    gpu.used += 512 * MiB  # the driver sees half a GiB the allocator does not: not a pass
    _, wrong = _window(gpu, nvml)
    assert not gpucheck.driver_sees(idle_sampler, idle, wrong, reserved, reserved + GiB, True).ok
    unknown = gpucheck.driver_sees(
        idle_sampler, idle, loaded, reserved, reserved + GiB, before_is_others=False
    )
    assert unknown.ok and unknown.context is None  # judged, but no context can be read off it


def test_the_check_uses_the_process_view_where_the_driver_lists_us():
    reserved, context = 2 * MiB, 450 * MiB
    gpu = FakeGPU(used=3 * GiB, processes={me(): reserved + context})
    nvml = FakeNVML([gpu])
    idle_sampler, idle = _window(gpu, nvml)
    gpu.processes[me()] += GiB
    _, loaded = _window(gpu, nvml)
    seen = gpucheck.driver_sees(idle_sampler, idle, loaded, reserved, reserved + GiB, before_is_others=False)
    assert seen.ok and seen.context == context and "NVML process" in seen.measured


def test_a_cells_runtime_context_is_read_from_the_process_or_the_device():
    base = {"torch_peak_reserved_bytes": 3 * GiB}
    process = {**base, "nvml_process_peak_bytes": 3 * GiB + 600 * MiB}
    assert runtime_context(process, before_is_others=False) == 600 * MiB
    hidden = Unavailable("process not visible to NVML (a container without the host PID namespace?)")
    container = {
        **base,
        "nvml_process_peak_bytes": hidden,
        "nvml_device_used_peak_bytes": 5 * GiB + 700 * MiB,
        "nvml_device_used_before_bytes": 2 * GiB,
    }
    assert runtime_context(container, before_is_others=True) == 700 * MiB
    assert is_unavailable(runtime_context(container, before_is_others=False))
    amd = {**base, "amdsmi_process_peak_bytes": 3 * GiB + 256 * MiB}
    assert runtime_context(amd, False) == 256 * MiB
    assert runtime_context({}, True) == Unavailable("the allocator's reserved peak is missing")


def test_the_devices_use_before_a_cell_is_read_before_its_context_exists(monkeypatch):
    gpu = FakeGPU(uuid="GPU-aaaaaaaa-0000-0000-0000-000000000000", used=3 * GiB)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([gpu]))
    monkeypatch.setattr(torch.version, "hip", None)

    def identity(i):  # torch's device identity creates the context: the driver now sees it
        gpu.used += 500 * MiB
        return {"uuid": gpu.uuid[4:]}

    monkeypatch.setattr(drivers, "device_identity", identity)
    (sampler,), _, _, _ = drivers.driver_trackers(torch.device("cuda", 0), 0.01)
    assert sampler.before_bytes == 3 * GiB and sampler.before_is_others
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # a context of ours existed already
    (sampler,), _, _, _ = drivers.driver_trackers(torch.device("cuda", 0), 0.01)
    assert sampler.before_bytes == 3 * GiB + 1000 * MiB and not sampler.before_is_others  # two contexts made


def test_each_gpu_cell_records_its_context_by_kind_and_the_fit_check_adds_that_kinds(cache):
    from lorabench.plan.admission import context_kind
    from lorabench.plan.admission import runtime_context as need
    from lorabench.plan.cells import Cell
    from lorabench.results.rows import Row, Status
    from lorabench.run.runner import keep_context

    llama = Cell(model="tiny-llama", method="lora", rank=8, device="cuda", precision="bf16-mixed")
    mlp = Cell(model="cifar-mlp", method="full", device="cuda")
    assert context_kind(llama) == "transformer, bfloat16" and context_kind(mlp) == "mlp, float32"
    assert need(llama)[0] == 0 and "not in the predicted needs" in need(llama)[1]
    calibration.record_context(H100, calibration.CHECK, 400 * MiB, "2.14")
    assert need(llama)[0] == 400 * MiB  # only the check's: the least a cell has
    env = {"gpu_name": H100, "torch": "2.14.1", "hip_runtime": None}
    keep_context(Row.make(llama, Status.OK, {"gpu_context_bytes": 900 * MiB}, environment=env))
    keep_context(Row.make(mlp, Status.ERROR, {"gpu_context_bytes": 999 * MiB}, environment=env))  # not ok
    assert need(llama) == (
        900 * MiB,
        f"a GPU cell's need includes the runtime context measured on {H100}: 900 MiB (transformer, bfloat16)",
    )
    assert calibration.known()[H100]["contexts"] == {
        calibration.CHECK: 400 * MiB,
        "transformer, bfloat16": 900 * MiB,
    }
    assert need(Cell(model="cifar-mlp", method="full", device="cpu")) == (0, None)


# ---- which amdsmi binding --------------------------------------------------------------------------

BINDING = """
SHIPPED = {shipped}
def amdsmi_init(flags=None): pass
def amdsmi_get_processor_handles(): return ["gpu0"]
def amdsmi_get_gpu_vram_usage(handle): return {{"vram_total": 196592, "vram_used": 512}}
def amdsmi_get_rocm_version(): return True, "6.4.1"
def amdsmi_get_lib_version(): return {{"major": 25, "minor": 3, "release": 0, "build": "25.3.0.60401"}}
"""


@pytest.fixture
def binding(tmp_path, monkeypatch):
    """binding(where, version): an amdsmi package with the calls a check makes, in ROCm's share/amd_smi
    (where="rocm") or a site folder with package metadata of `version` (where="registry")."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)

    def install(where: str, version: str | None = None):
        root = tmp_path / ("rocm/share/amd_smi" if where == "rocm" else "site")
        (root / "amdsmi").mkdir(parents=True)
        (root / "amdsmi" / "__init__.py").write_text(BINDING.format(shipped=where == "rocm"))
        if version:
            meta = root / f"amdsmi-{version}.dist-info"
            meta.mkdir()
            (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: amdsmi\nVersion: {version}\n")
        if where == "rocm":
            monkeypatch.setenv("ROCM_PATH", str(tmp_path / "rocm"))
        else:
            sys.path.insert(0, str(root))
        return root

    return install


def test_the_binding_rocm_ships_goes_first_before_torch_imports_amdsmi(binding):
    """A ROCm build of torch imports amdsmi as it is imported: lorabench's own import, which comes
    first, puts ROCm's binding ahead of the registry's, which then stays unused."""
    import lorabench

    binding("registry", "7.0.2")
    binding("rocm")
    lorabench._prefer_the_amdsmi_rocm_ships()
    amdsmi = drivers.import_amdsmi()
    assert amdsmi.SHIPPED
    assert drivers.amdsmi_versions(amdsmi) == {
        "binding": str(drivers.Path(amdsmi.__file__).parent),
        "binding_version": "shipped with ROCm",
        "rocm_version": "6.4.1",
        "library_version": "25.3.0.60401",
        "match": "yes",
    }
    assert gpucheck.amdsmi_binding().ok


def test_check_says_when_the_registrys_binding_is_not_the_hosts_rocm_release(binding):
    binding("registry", "6.2.0")  # made for ROCm 6.2, on a host with ROCm 6.4
    result = gpucheck.amdsmi_binding()
    assert not result.ok
    assert (
        "binding 6.2.0" in result.measured
        and "ROCm 6.4.1" in result.measured
        and "match: no" in result.measured
    )


def test_a_registry_binding_of_the_hosts_release_passes(binding):
    binding("registry", "6.4.1")
    assert drivers.amdsmi_versions(drivers.import_amdsmi())["match"] == "yes" and gpucheck.amdsmi_binding().ok


def test_a_binding_that_cannot_read_the_device_fails_the_check(monkeypatch):
    from fakes import AMDSMI_STATUS_NO_PERM, AmdSmiLibraryException

    fake = FakeAmdsmi([FakeAMD()])
    fake.amdsmi_get_gpu_vram_usage = lambda h: (_ for _ in ()).throw(
        AmdSmiLibraryException(AMDSMI_STATUS_NO_PERM)
    )
    monkeypatch.setitem(sys.modules, "amdsmi", fake)
    result = gpucheck.amdsmi_binding()
    assert not result.ok and "cannot read the device: AmdSmiLibraryException" in result.measured
