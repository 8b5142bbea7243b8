"""Predictions made before a cell runs: the peak memory of a simulated step (`simulation`), the
closed form beside it as a cross-check, and training FLOPs per step.

    lorabench run --dry-run --preset seed-bert      # prints each cell's predicted peak

The peak is what one training step on fake tensors holds at its fullest, with what holds it; a cell
fake tensors cannot run (a quantised base, a model that reads a value) is predicted by the closed
form alone, and says why.

Closed form: weights at the training dtype for every parameter; a gradient and Adam's two moments

for every trainable one (fp32: 4 + 4 + 8 bytes; a frozen parameter costs its 4 alone); plus the
activations autograd saves for backward (which `trackers.SavedTensors` measures; a frozen Linear
keeps no input, so LoRA saves less than full fine-tuning, not the same). A causal LM's loss
upcasts the logits to fp32 and log_softmax keeps them: batch x seq x vocab x 4 bytes, often the
largest single tensor of the step (the task says so: `Task.loss_saved_bytes`). These are
estimates: the measured figures sit beside them in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from ..workload.methods import Method, ParamCount
from ..workload.optimizers import OPTIMIZERS
from ..workload.tasks import Task
from .flops import StepFlops
from .simulation import KINDS, Simulated
from .trackers import Unavailable

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Prediction:
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    flops: StepFlops | Unavailable  # the model's, counted on the meta device, or why it could not be
    tokens_per_step: int
    comm_bytes: int | None = (
        None  # a cell of several processes: the strategy's own buffers (None: one process)
    )
    # what the device runs: the model's FLOPs plus gradient checkpointing's recomputed forward (None: the same)
    hardware_flops: StepFlops | Unavailable | None = None
    # the simulated step's peak and what held it, or why the step could not be simulated
    simulated: Simulated | Unavailable | None = None

    @property
    def flops_per_step(self) -> float | None:
        return None if isinstance(self.flops, Unavailable) else self.flops.total

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.grads_bytes
            + self.optimizer_bytes
            + self.activations_bytes
            + (self.comm_bytes or 0)
        )

    @property
    def peak_bytes(self) -> int:
        """The predicted peak: the simulated step's (with a rank's communication buffers), or the
        closed form's total where the step could not be simulated."""
        if isinstance(self.simulated, Simulated):
            return self.simulated.peak_bytes + (self.comm_bytes or 0)
        return self.total_bytes

    @property
    def peak_by(self) -> str:
        """How the peak was predicted: what a report and a dry run say beside it."""
        if isinstance(self.simulated, Simulated):
            return "simulated step"
        why = f": {self.simulated.reason}" if isinstance(self.simulated, Unavailable) else ""
        return f"closed form{why}"

    def to_metrics(self) -> dict[str, float | int | str]:
        hardware = self.flops if self.hardware_flops is None else self.hardware_flops
        at_peak = self.simulated.at_peak if isinstance(self.simulated, Simulated) else {}
        return {
            "predicted_peak_bytes": self.peak_bytes,
            "predicted_peak_by": self.peak_by,
            **(
                {"predicted_attention": self.simulated.attention}
                if isinstance(self.simulated, Simulated)
                else {}
            ),
            **{f"predicted_peak_{kind}_bytes": at_peak[kind] for kind in KINDS if kind in at_peak},
            **({"predicted_comm_bytes": self.comm_bytes} if self.comm_bytes is not None else {}),
            "predicted_weights_bytes": self.weights_bytes,
            "predicted_grads_bytes": self.grads_bytes,
            "predicted_optimizer_bytes": self.optimizer_bytes,
            "predicted_activations_bytes": self.activations_bytes,
            "predicted_total_bytes": self.total_bytes,
            "flops_per_step": self.flops if isinstance(self.flops, Unavailable) else self.flops.total,
            "hardware_flops_per_step": hardware if isinstance(hardware, Unavailable) else hardware.total,
            "tokens_per_step": self.tokens_per_step,
        }


def _shape(module: nn.Module) -> tuple[int, int, int, int]:
    """(layers, hidden, heads, vocab) of a transformer; zeros for a model without a config."""
    cfg = getattr(module, "config", None)
    if cfg is None:
        base = getattr(module, "base_model", None)
        cfg = getattr(getattr(base, "model", None), "config", None)
    if cfg is None:
        return 0, 0, 0, 0
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 0)
    return int(layers), int(hidden), int(heads), int(getattr(cfg, "vocab_size", 0) or 0)


def predict(
    module: nn.Module,
    params: ParamCount,
    *,
    method: Method,
    task: Task,
    batch_size: int,
    grad_accum: int,
    seq_len: int,
    dtype: str,
    flops: StepFlops | Unavailable,
    checkpointing: bool = False,
    act_dtype: str | None = None,
    optimizer: str = "adam",
) -> Prediction:
    """`dtype` holds weights, gradients and the optimizer's state (its own per tensor: `optimizers`); activations are at `act_dtype` (autocast's:
    16 bits for most saved tensors, though autocast keeps norms and softmax at 32)."""
    w = DTYPE_BYTES[dtype]
    b = DTYPE_BYTES[act_dtype or dtype]
    layers, hidden, heads, vocab = _shape(module)
    per_sample = task.tokens_per_sample(seq_len)
    tokens = batch_size * grad_accum * per_sample
    rows = batch_size * per_sample  # activation rows of one micro-batch
    if layers:
        # Korthikanti et al. 2022: ~ s*b*h*(34 + 5*a*s/h) bytes per layer at 16 bits, scaled to the
        # dtype. 14 of the 34 are the inputs of the four Linear layers, which autograd keeps only for
        # a weight gradient: the method says how many it keeps, and what its adapters add back.
        if checkpointing:
            # each block keeps only its input; the embeddings' output and its norm keep two more
            act = (layers + 2) * rows * hidden * b + task.loss_saved_bytes(rows, vocab)
        else:
            units = 20 + method.linear_input_units + 5 * heads * seq_len / max(hidden, 1)
            act = layers * seq_len * batch_size * hidden * units * b / 2
            act += method.extra_activations(module, rows, b, inputs=True) + task.loss_saved_bytes(rows, vocab)
    else:
        # an MLP keeps each layer's output per sample for backward (a ReLU's output is also the next
        # Linear's input, one tensor); the first layer's input is the data set, resident already.
        # Checkpointed per Linear, it keeps the same: those outputs are the segments' inputs.
        act = (
            rows
            * sum(
                m.out_features
                for name, m in module.named_modules()
                if isinstance(m, nn.Linear) and "lora_" not in name
            )
            * b
        )
        act += method.extra_activations(module, rows, b, inputs=False)
    return Prediction(
        weights_bytes=params.total * w,
        grads_bytes=params.trainable * w,
        optimizer_bytes=OPTIMIZERS[optimizer].state_bytes(
            [p.shape for p in module.parameters() if p.requires_grad], w
        ),
        activations_bytes=int(act),
        flops=flops,
        tokens_per_step=tokens,
    )


def per_process(
    pred: Prediction, *, nproc: int, strategy: str, largest_unit: int, root: int, dtype: str
) -> Prediction:
    """What one of `nproc` ranks holds, from the one-process prediction `pred` of its micro-batch.
    DDP: a whole replica, plus gradient buckets the size of the trainable gradients (the reducer
    copies gradients into them to all-reduce). FSDP2: weights, gradients and Adam state sharded
    N ways (each parameter's first dimension padded to a multiple of N, ignored here), plus the
    gathered units: the root's parameters stay gathered through forward and backward, and a block
    is gathered while the previous one still is (FSDP2 prefetches one ahead), so twice the largest.
    Activations are the rank's micro-batch's, as in one process. FLOPs and tokens are the whole
    step's: every rank's micro-batch. The simulated peak (one process's step) is changed the same
    way: its weights, gradients and optimizer state sharded for FSDP2, the buffers added for both."""

    def every_rank(f):
        return (
            f if f is None or isinstance(f, Unavailable) else StepFlops(f.forward * nproc, f.backward * nproc)
        )

    common = dict(
        flops=every_rank(pred.flops),
        hardware_flops=every_rank(pred.hardware_flops),
        tokens_per_step=pred.tokens_per_step * nproc,
    )
    if strategy == "ddp":
        return replace(pred, comm_bytes=pred.grads_bytes, **common)
    shard = lambda n: -(-n // nproc)  # ceiling
    sim = pred.simulated
    if isinstance(sim, Simulated):  # what is sharded of the simulated peak: the parameters and their state
        sharded = ("weights_frozen", "weights_trainable", "gradients", "optimizer")
        at_peak = {k: shard(v) if k in sharded else v for k, v in sim.at_peak.items()}
        common["simulated"] = replace(sim, peak_bytes=sum(at_peak.values()), at_peak=at_peak)
    return replace(
        pred,
        weights_bytes=shard(pred.weights_bytes),
        grads_bytes=shard(pred.grads_bytes),
        optimizer_bytes=shard(pred.optimizer_bytes),
        comm_bytes=(root + 2 * largest_unit) * DTYPE_BYTES[dtype],
        **common,
    )
