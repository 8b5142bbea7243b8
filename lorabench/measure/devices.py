"""Which driver device is torch's: every handle matched by UUID or PCI address, never by index.

    lorabench check --device cuda        # the device mapping check resolves every visible GPU

CUDA orders devices fastest-first, the drivers (NVML, amdsmi) by bus, and the visible-devices
variables renumber what is left, so a torch index names nothing in a driver's list. torch's own
UUID and PCI numbers do (`identity_of`), as does CUDA_VISIBLE_DEVICES where it names UUIDs, or
indices in PCI order. Two functions in one PCI slot, and a MIG GPU reached by its address, are
refused rather than guessed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Pci:
    """A PCI address: domain, bus, device (the slot) and function. NVML writes it
    `00000000:3B:00.0` (8-digit domain; `busIdLegacy` has 4), amdsmi and lspci `0000:3b:00.0`;
    torch knows the slot only (no function). A GPU is found by its slot; two functions in one slot
    (SR-IOV virtual functions) are ambiguous and refused, never guessed."""

    domain: int
    bus: int
    device: int
    function: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Pci":
        m = re.fullmatch(
            r"(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})(?:\.([0-7]))?", str(text).strip()
        )
        if not m:
            raise ValueError(f"not a PCI address: {text!r}")
        domain, bus, device, function = m.groups()
        return cls(int(domain or "0", 16), int(bus, 16), int(device, 16), int(function) if function else None)

    @property
    def slot(self) -> tuple[int, int, int]:
        return self.domain, self.bus, self.device

    def __str__(self) -> str:
        return f"{self.domain:08X}:{self.bus:02X}:{self.device:02X}" + (
            f".{self.function}" if self.function is not None else ""
        )


def bare_uuid(text: str) -> str:
    """A GPU UUID without NVML's `GPU-` / `MIG-` prefix, lower case: torch prints it bare
    (`{:02x}` x 16 in 8-4-4-4-12 groups), NVML with the prefix."""
    text = str(text).strip()
    for prefix in ("GPU-", "MIG-"):
        if text.upper().startswith(prefix):
            text = text[len(prefix) :]
    return text.lower()


def device_identity(index: int = 0) -> dict[str, str]:
    """UUID and PCI slot of torch's device `index`, in this (cell) process: the keys that map a
    torch device to the driver's, whose order differs (CUDA orders fastest-first, NVML by bus)."""
    import torch

    return identity_of(torch.cuda.get_device_properties(index))


def identity_of(props) -> dict[str, str]:
    """{"uuid", "pci_bus_id", "name"} of torch's device properties (`torch.cuda.get_device_properties`)."""
    ident: dict[str, str] = {"name": props.name} if getattr(props, "name", None) else {}
    uuid = bare_uuid(getattr(props, "uuid", "") or "")
    if uuid:
        ident["uuid"] = uuid
    if getattr(props, "pci_bus_id", None) is not None:
        ident["pci_bus_id"] = str(
            Pci(getattr(props, "pci_domain_id", 0), props.pci_bus_id, getattr(props, "pci_device_id", 0))
        )
    return ident


def by_slot(handles: list, address_of, want: Pci, what: str):
    """The one handle whose PCI slot is `want`'s; LookupError when none is, or several are."""
    found = [h for h in handles if Pci.parse(address_of(h)).slot == want.slot]
    if len(found) > 1:
        raise LookupError(
            f"{len(found)} {what} devices share PCI slot {want} (functions "
            f"{', '.join(str(Pci.parse(address_of(h)).function) for h in found)}); torch does not say "
            "which one it uses"
        )
    if not found:
        raise LookupError(f"no {what} device at PCI slot {want}")
    return found[0]


def _nvml_address(nvml, handle) -> str:
    info = nvml.nvmlDeviceGetPciInfo(handle)
    bus_id = info.busId.decode() if isinstance(info.busId, bytes) else str(info.busId)
    return bus_id or f"{info.domain:08X}:{info.bus:02X}:{info.device:02X}"


def _nvml_mig_enabled(nvml, handle) -> bool:
    try:
        return nvml.nvmlDeviceGetMigMode(handle)[0] == nvml.NVML_DEVICE_MIG_ENABLE
    except nvml.NVMLError:  # NOT_SUPPORTED: a GPU without MIG
        return False


def nvml_devices(nvml) -> list:
    """Every GPU NVML sees (MIG instances are reached through their GPU or their UUID)."""
    return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]


def nvml_handle(nvml, index: int = 0, identity: dict[str, str] | None = None):
    """The NVML handle of torch's device `index`, resolved by UUID or PCI slot, never by torch's
    index. A GPU in MIG mode is resolved by UUID only: its instances share its PCI address, so the
    slot would name the whole GPU. Without an identity (no CUDA in this process),
    CUDA_VISIBLE_DEVICES is read: UUIDs (GPU-..., MIG-...) map exactly, and indices only under
    CUDA_DEVICE_ORDER=PCI_BUS_ID."""
    if identity:
        uuid = bare_uuid(identity.get("uuid", ""))
        for candidate in [f"GPU-{uuid}", f"MIG-{uuid}"] if uuid else []:
            try:
                return nvml.nvmlDeviceGetHandleByUUID(candidate)
            except nvml.NVMLError:
                pass
        if identity.get("pci_bus_id"):
            handle = by_slot(
                nvml_devices(nvml),
                lambda h: _nvml_address(nvml, h),
                Pci.parse(identity["pci_bus_id"]),
                "NVML",
            )
            if _nvml_mig_enabled(nvml, handle):
                raise LookupError(
                    f"the GPU at PCI slot {identity['pci_bus_id']} is in MIG mode: its instances are told "
                    f"apart by UUID only, and torch's UUID ({uuid or 'none'}) matched none of them"
                )
            return handle
    ordered = os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if index >= len(entries):
            raise LookupError(f"CUDA_VISIBLE_DEVICES={visible} has no device {index}")
        entry = entries[index]
        if entry.startswith(("GPU-", "MIG-")):
            return nvml.nvmlDeviceGetHandleByUUID(entry)
        if entry.isdigit() and ordered:
            return nvml.nvmlDeviceGetHandleByIndex(int(entry))
        raise LookupError(
            f"CUDA_VISIBLE_DEVICES entry {entry!r} is an index in CUDA's fastest-first order, which "
            "NVML does not share; use GPU UUIDs or set CUDA_DEVICE_ORDER=PCI_BUS_ID"
        )
    if nvml.nvmlDeviceGetCount() == 1 or ordered:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    raise LookupError(
        "several GPUs and no way to tell which one torch uses; set CUDA_DEVICE_ORDER=PCI_BUS_ID"
    )


def nvml_visible(nvml) -> tuple[list, str]:
    """(handles of the GPUs this process's cells may use, how they were found), without CUDA: the
    UUIDs of CUDA_VISIBLE_DEVICES, its indices under PCI order, else every GPU (where its indices
    cannot be mapped, a superset: what is read of them is the least, never more)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return nvml_devices(nvml), "every GPU"
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    try:
        return [nvml_handle(nvml, i) for i in range(len(entries))], f"CUDA_VISIBLE_DEVICES={visible}"
    except (LookupError, nvml.NVMLError) as e:
        return nvml_devices(nvml), f"every GPU (CUDA_VISIBLE_DEVICES={visible} cannot be mapped: {e})"


def amdsmi_handle(amdsmi, identity: dict[str, str] | None):
    """The amdsmi processor handle of torch's device, matched by PCI slot, domain included; the
    visible-devices variables (ROCR_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES) renumber devices, the
    address does not."""
    handles = amdsmi.amdsmi_get_processor_handles()
    want = (identity or {}).get("pci_bus_id")
    if want:
        return by_slot(handles, amdsmi.amdsmi_get_gpu_device_bdf, Pci.parse(want), "amdsmi")
    if len(handles) == 1:
        return handles[0]
    raise LookupError(
        f"{len(handles)} amdsmi devices and no PCI address of torch's device to tell them apart"
    )
