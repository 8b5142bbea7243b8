"""The survey: what is known of a cell before it runs, and what the device can run.

    lorabench run --dry-run --preset quick      # every cell surveyed: counts, prediction, GFLOP/step

Every cell is built on torch's meta device (exact parameter counts, the closed-form memory
prediction, in milliseconds), which refuses an unbuildable cell before anything is written, and
its training step is simulated on fake tensors (`simulation`: the peak memory, what holds it, and
the step's FLOPs; about a second for a medium model, 4 s for bert-base, 8 s for bloom-1b4 on 2
cores). Whether the device runs a cell's precision and quantisation is asked in a child (`probe`):
this is the parent of the run, which never initialises CUDA.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .. import forksafe
from ..errors import first_line
from ..measure import flops, simulation
from ..measure.predictions import DTYPE_BYTES, Prediction, per_process, predict
from ..measure.trackers import Unavailable, unavailable
from ..workload import data, digits, distributed, models, optimizers, precision, quantization, spec
from ..workload.checkpointing import checkpoint
from ..workload.methods import Adapted, MethodError, ParamCount
from ..workload.methods import method as method_of
from ..workload.precision import TORCH
from ..workload.tasks import Task, task_of_data
from .axes import SURVEYED_FIELDS
from .cells import Cell, CellError


class PlanError(CellError):
    """A plan that cannot run here: an unbuildable cell, data of the wrong kind, missing weights."""


@dataclass(frozen=True)
class Survey:
    params: ParamCount
    task: str
    prediction: Prediction
    gemms: frozenset[tuple[int, int, int]] = frozenset()  # (M, K, N) of the model's Linear products
    unbuildable: str | None = None  # why PEFT cannot build this method on this model: a skipped cell
    duration: Any = None  # its predicted times (`timing.Duration`, or why none), once the plan has rates


def _unbuildable(bundle, why: str) -> Survey:
    """What is known of a cell PEFT cannot build: its base model's size, nothing trained, no prediction."""
    total = sum(p.numel() for p in bundle.module.parameters())
    nothing = Prediction(0, 0, 0, 0, unavailable(why), 0)
    return Survey(ParamCount(total, 0, 0, 0), bundle.task.name, nothing, frozenset(), why)


# A model the meta device cannot run (DeBERTa-v2 reads a tensor's value in its forward) is counted on
# one real CPU step of one sample in this process, when its weights and gradients fit in this much.
REAL_COUNT_MAX_BYTES = 2**30


def _count_for_real(cell: Cell, total_params: int, why: Unavailable, checkpointed: bool):
    """The step's FLOPs from a real CPU step of one sample, times the samples of a step: matrix
    products scale exactly with the batch (the sequence length stays, attention's cost with it)."""
    need = 2 * 4 * total_params  # fp32 weights and gradients
    if need > REAL_COUNT_MAX_BYTES:
        return unavailable(f"{why.reason}; too large for a real step here ({need / 2**30:.1f} GiB)")
    torch.manual_seed(0)
    # the base unquantised: FLOPs are the same, and bitsandbytes is kept out of this process (`forksafe`)
    counted = dataclasses.replace(cell.spec, checkpointing=checkpointed, quantize="none")
    bundle, adapted = spec.build(counted, "cpu", "random")
    return flops.count(
        adapted.module,
        bundle.task,
        batch_size=1,
        grad_accum=cell.batch_size * cell.grad_accum,
        seq_len=cell.seq_len,
        vocab_size=bundle.vocab_size,
        num_labels=bundle.num_labels,
        device="cpu",
    )


def _decided_module_dropout(module) -> None:
    """PEFT's LoHa and LoKr layers draw `torch.rand(1) > module_dropout` in each training forward,
    a value fake tensors cannot decide; at module_dropout 0 (lorabench's) the draw always passes,
    which is what those layers do in eval mode: so they, and only they, step in eval mode. (A model
    built without PEFT holds none: its import, ~3 s on 2 cores, is not made for it.)"""
    lycoris = sys.modules.get("peft.tuners.lycoris_utils")
    if lycoris is None:
        return
    for layer in module.modules():
        if isinstance(layer, lycoris.LycorisLayer) and not any(getattr(layer, "module_dropout", {}).values()):
            layer.training = False


def _simulate(cell: Cell, task: Task) -> simulation.Simulated | Unavailable:
    """The cell's training step on fake tensors (`simulation`): built as `experiment` builds it
    (the weights' dtype, the method, checkpointing), on the meta device, then given fake storage."""
    if cell.quantized:
        return unavailable("a quantised base is not simulated: bitsandbytes runs no fake tensors")
    dtype = TORCH[cell.dtype]
    made = {}

    def build():
        with torch.device(method_of(cell.method).survey_device):
            made["bundle"], adapted = spec.build(cell.spec, weights="random")
        _decided_module_dropout(adapted.module)
        return adapted.module

    def train():
        b = made["bundle"]
        # two steps' micro-batches, in place before the step: not counted, as a run's data set is not
        n = cell.batch_size * cell.grad_accum * 2
        ds = b.synthetic(n, cell.seq_len)
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in ds.train.items()}

    cast = cell.compute_dtype if cell.compute_dtype != cell.dtype else None
    return simulation.simulate(
        build,
        task,
        train,
        batch_size=cell.batch_size,
        grad_accum=cell.grad_accum,
        optimizer=cell.optimizer,
        lr=cell.lr,
        autocast_dtype=TORCH[cast] if cast else None,
        block=simulation.GPU_BLOCK_BYTES if cell.on_gpu else 1,
        gpu=cell.on_gpu,
    )


def _step_flops(
    cell: Cell, adapted: Adapted, bundle: models.Bundle, simulated: simulation.Simulated | Unavailable | None
) -> tuple[flops.StepFlops | Unavailable, flops.StepFlops | Unavailable | None]:
    """(model FLOPs, hardware FLOPs or None) of one step. The model's, what MFU divides (PaLM,
    appendix B): as the simulated step ran them on the CPU's kernels, else counted on the meta
    device, else on one real CPU step of one sample. With checkpointing, the hardware's too: the
    device also runs the recomputed forward, as the simulated step did (what HFU divides)."""
    count = lambda: flops.count(
        adapted.module,
        bundle.task,
        batch_size=cell.batch_size,
        grad_accum=cell.grad_accum,
        seq_len=cell.seq_len,
        vocab_size=bundle.vocab_size,
        num_labels=bundle.num_labels,
    )
    stepped = simulated.flops if isinstance(simulated, simulation.Simulated) else None
    checkpointed = cell.checkpointed
    counted = (None if checkpointed else stepped) or count()
    if isinstance(counted, Unavailable):
        counted = _count_for_real(cell, adapted.params.total, counted, checkpointed=False)
    if not checkpointed:
        return counted, None
    hardware = stepped
    if hardware is None:
        checkpoint(adapted.module)
        hardware = count()
    if isinstance(hardware, Unavailable):
        hardware = _count_for_real(cell, adapted.params.total, hardware, checkpointed=True)
    return counted, hardware


def survey(cell: Cell, simulate: bool = True) -> Survey:
    """Build the cell's model and method on the meta device: exact counts, the closed-form memory
    prediction and the counted FLOPs of one step; then simulate its step (`simulate=False`: counts
    and the closed form only, no FLOPs, as `lorabench list` needs). Raises ModelError / MethodError for a
    cell that cannot be built."""
    method = method_of(cell.method)
    if method.uses_peft:
        forksafe.no_cuda_extensions()  # this is the parent: BOFT would build one and initialise CUDA
    # counted as built, before checkpointing (which the count would see as recomputation)
    counted = dataclasses.replace(cell.spec, checkpointing=False, quantize="none")
    with torch.device(method.survey_device):
        bundle = spec.base(counted, weights="random")
        try:
            adapted = spec.adapt(counted, bundle)
        except MethodError:
            raise  # what the user asked for is wrong: refused, exit 2
        except Exception as e:
            if not method.uses_peft:
                raise
            # PEFT's own limit (LoHa on GPT-2's Conv1D, ...): this pair is skipped, the rest runs
            why = f"PEFT cannot build {cell.method} on {cell.model}: {type(e).__name__}: {first_line(e)}"
            return _unbuildable(bundle, why)
    task = bundle.task
    simulated = _simulate(cell, task) if simulate else None
    counted, hardware = (
        _step_flops(cell, adapted, bundle, simulated)
        if simulate
        else (unavailable("not counted: the survey was asked for counts and the closed form only"), None)
    )
    pred = predict(
        adapted.module,
        adapted.params,
        method=method,
        task=task,
        batch_size=cell.batch_size,
        grad_accum=cell.grad_accum,
        seq_len=cell.seq_len,
        dtype=cell.dtype,
        flops=counted,
        act_dtype=cell.compute_dtype,
        checkpointing=cell.checkpointed,
        optimizer=cell.optimizer,
    )
    pred = dataclasses.replace(pred, hardware_flops=hardware, simulated=simulated)
    if cell.quantized:  # the frozen Linears in bits, with their scales
        pred = dataclasses.replace(
            pred,
            weights_bytes=quantization.predicted_bytes(
                adapted.module, cell.quantize, DTYPE_BYTES[cell.dtype]
            ),
        )
    if cell.nproc > 1:
        largest, root = distributed.unit_params(adapted.module)
        if cell.sharded and not largest:
            raise PlanError(
                f"FSDP2 cannot wrap {cell.model}: it has no transformer blocks (an nn.ModuleList) and "
                "no Linear layers to shard"
            )
        pred = per_process(
            pred, nproc=cell.nproc, strategy=cell.strategy, largest_unit=largest, root=root, dtype=cell.dtype
        )
    rows = cell.batch_size * task.tokens_per_sample(cell.seq_len)
    return Survey(adapted.params, task.name, pred, frozenset(flops.gemm_shapes(adapted.module, rows)))


def survey_all(cells: list[Cell], simulate: bool = True) -> list[Survey]:
    """Every cell's survey (cells of one shape share one build); an unbuildable cell, data of the
    wrong kind, or pretrained weights that cannot be had raise PlanError."""
    surveys: dict[tuple, Survey] = {}
    kinds: dict[str, str] = {}
    shape = lambda c: tuple(getattr(c, f) for f in SURVEYED_FIELDS)
    for cell in cells:
        if shape(cell) not in surveys:
            try:
                surveys[shape(cell)] = survey(cell, simulate)
            except (models.ModelError, MethodError) as e:
                raise PlanError(str(e)) from None
        task = surveys[shape(cell)].task
        if not cell.synthetic_data:
            if cell.data not in kinds:  # detection parses the whole file: once per path
                try:
                    kinds[cell.data] = data.detect(cell.data)
                except data.DataError as e:
                    raise PlanError(str(e)) from None
            if cell.data == data.DIGITS and cell.samples > digits.training_scans(cell.data_variant):
                raise PlanError(
                    f"--data {cell.data}: the {cell.data_variant} task has "
                    f"{digits.training_scans(cell.data_variant)} training scans, fewer than --samples {cell.samples}"
                )
            holds = task_of_data(kinds[cell.data]).name
            if holds != task:
                raise PlanError(
                    f"--data {cell.data} holds {kinds[cell.data]} data ({holds}) but {cell.model} is a "
                    f"{task} model"
                )
    for model in sorted({c.model for c in cells if c.published_weights}):
        try:
            models.check_pretrained(model)
        except models.ModelError as e:
            raise PlanError(str(e)) from None
    return [surveys[shape(c)] for c in cells]


# The settings every device runs (no probe needed), of the axes a device may not support.
# The settings a device may not run: their registries (an entry's `probe` says whether to ask) and
# how to ask (a small layer tried on the device).
PROBED = {
    "precision": (precision.PRECISIONS, lambda value, device: precision.unsupported(value, device)),
    "quantize": (quantization.QUANTIZATIONS, lambda value, device: quantization.unsupported(value, device)),
    "optimizer": (optimizers.OPTIMIZERS, lambda value, device: optimizers.unsupported(value, device)),
}
PROBE_TIMEOUT_S = 300.0  # importing bitsandbytes and a first kernel on a cold GPU take seconds, not minutes


def to_probe(cells: list[Cell]) -> dict[str, list[str]]:
    """{setting: values} of `cells` a device must be asked about (their entries' `probe`)."""
    asked = {
        axis: sorted({getattr(c, axis) for c in cells if registry[getattr(c, axis)].probe})
        for axis, (registry, _) in PROBED.items()
    }
    return {axis: values for axis, values in asked.items() if values}


def probe(device: str, asked: dict[str, list[str]]) -> dict[str, dict[str, str | None]]:
    """Why `device` cannot run each asked value, or None where it can: each tried on a small layer.
    Runs in a child (`child.call`): it initialises the device."""
    return {
        axis: {value: PROBED[axis][1](value, device) for value in values} for axis, values in asked.items()
    }
