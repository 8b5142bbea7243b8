"""Data sets: tensors resident in memory, built once per cell outside every timed region.

    lorabench run --models cifar-mlp --samples 256     # a synthetic CIFAR-shaped set of 256

Each task has a synthetic stand-in of the real set's shape that a model can learn, so loss and
accuracy move on a machine with no data and no network: CIFAR-shaped images made of a class
prototype plus noise; token sequences whose class is marked by class-specific tokens; and
arithmetic token progressions for causal LM, with the prompt part of each label masked (-100)
as seed 001 does.

Real data sets arrive through `--data PATH`, recognised by their shape:
- a CIFAR-10 directory (`cifar-10-batches-py/`, as torchvision downloads it): ToTensor, then each
  channel normalised with mean 0.5, std 0.5 (seed 002);
- a `.csv` or `.jsonl` file, or a data set saved by `datasets` (save_to_disk), with `text` and
  `label` columns: text classification;
- the same with `instruction`, `input`, `output`: seed 001's causal-LM format.
Text is tokenised with the model's tokenizer when one is available offline, else with a
deterministic word-hash tokenizer (the report names which). Sequences are padded to `seq_len`
once, so every tensor is resident and every step has the same shape.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError

SYNTHETIC = "synthetic"  # --data's default: the task's synthetic stand-in
DIGITS = "sklearn-digits"  # scikit-learn's handwritten digits (`digits`); any other value is a path


def is_synthetic(data: str) -> bool:
    return data == SYNTHETIC


def has_tasks(data: str) -> bool:
    """Whether the data set has a source and a related target task (`VARIANTS`) a trained base can
    be made on and adapted to: the synthetic stand-ins and the digits; not a user's files."""
    return data in (SYNTHETIC, DIGITS)


IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding)


@dataclass
class Dataset:
    train: dict[str, Tensor]  # every tensor shares its first dimension (samples)
    eval: dict[str, Tensor]
    source: str  # what the data is, for the report

    def to(self, device: torch.device, dtype: torch.dtype) -> "Dataset":
        """Move to the device once, casting floating inputs to the training dtype."""

        def move(split: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in split.items()}

        return Dataset(move(self.train), move(self.eval), self.source)


# What a synthetic set holds: every class (`ALL`, a run on random or published weights); the
# source task a trained base learns (`SOURCE`); or the related target task a cell then adapts it
# to (`TARGET`), shifted from the source in a stated way per task. The world a set is drawn from
# (the image prototypes) is fixed (WORLD_SEED), so every seed's data, the base's source set and
# every cell's target set are drawn from one world; the seed draws samples, noise and order.
ALL, SOURCE, TARGET = "all", "source", "target"
VARIANTS = (ALL, SOURCE, TARGET)
WORLD_SEED = 20240229


SHIFT = 0.95  # how far the target's prototypes moved from the source's: cos = sqrt(1 - SHIFT^2) = 0.31


def synthetic_images(
    n: int, n_eval: int, num_classes: int, generator: torch.Generator, variant: str = ALL
) -> Dataset:
    """CIFAR-10-shaped (3, 32, 32) images: 0.15 x prototype(class) + N(0, 1) noise.

    The noise dominates each pixel (as real images vary), but over 3,072 pixels the prototypes
    are separable, so an MLP reaches well above chance within a few hundred steps. The target task
    is a shifted distribution of the same classes: each class's prototype moved to
    0.31 x its source prototype + 0.95 x a new direction (a new look of the same things), so a base
    trained on the source starts above chance on the target and must adapt to reach it.
    """
    world = torch.Generator().manual_seed(WORLD_SEED)
    prototypes = torch.randn(num_classes, 3, 32, 32, generator=world)
    if variant == TARGET:
        new = torch.randn(num_classes, 3, 32, 32, generator=world)
        prototypes = (1 - SHIFT**2) ** 0.5 * prototypes + SHIFT * new

    def split(count: int) -> dict[str, Tensor]:
        labels = torch.randint(num_classes, (count,), generator=generator)
        x = 0.15 * prototypes[labels] + torch.randn(count, 3, 32, 32, generator=generator)
        return {"x": x, "labels": labels}

    what = {ALL: "", SOURCE: "; the source task", TARGET: f"; the target task: prototypes shifted by {SHIFT}"}
    return Dataset(
        split(n),
        split(n_eval),
        f"synthetic CIFAR-shaped images ({num_classes} class prototypes + noise{what[variant]})",
    )


def synthetic_text_classification(
    n: int,
    n_eval: int,
    seq_len: int,
    vocab_size: int,
    num_labels: int,
    generator: torch.Generator,
    variant: str = ALL,
) -> Dataset:
    """Random token sequences; a sample of class c holds its class's marker token at 4 random
    places: token 2 + c (the source task's rule, and every class's by default), or token
    2 + num_labels + c in the target task (a new label rule: new markers, the same classes)."""
    markers = 4
    if vocab_size < 2 + 2 * num_labels + 8:
        raise ValueError(f"vocabulary of {vocab_size} is too small for synthetic text classification")
    first = 2 + (num_labels if variant == TARGET else 0)  # the marker of class 0

    def split(count: int) -> dict[str, Tensor]:
        labels = torch.randint(num_labels, (count,), generator=generator)
        ids = torch.randint(2 + 2 * num_labels, vocab_size, (count, seq_len), generator=generator)
        places = torch.rand(count, seq_len, generator=generator).argsort(dim=1)[:, : min(markers, seq_len)]
        ids.scatter_(1, places, (first + labels).unsqueeze(1).expand_as(places))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    rule = f"class c marked by token {first} + c"
    return Dataset(
        split(n),
        split(n_eval),
        f"synthetic token sequences ({num_labels} classes, {rule}), {seq_len} tokens",
    )


def synthetic_causal_lm(
    n: int, n_eval: int, seq_len: int, vocab_size: int, generator: torch.Generator, variant: str = ALL
) -> Dataset:
    """Arithmetic progressions t_i = (s + d*i) mod V' (V' = min(vocab, 1000)): the next token is
    predictable from the two before it. The source task's steps d are 1..7 (every set's by default),
    the target's 8..14 (a shifted distribution). The first quarter is the prompt: labels -100."""
    modulus = min(vocab_size, 1000)
    prompt = seq_len // 4
    lo = 8 if variant == TARGET else 1

    def split(count: int) -> dict[str, Tensor]:
        start = torch.randint(modulus, (count, 1), generator=generator)
        step = torch.randint(lo, lo + 7, (count, 1), generator=generator)
        ids = (start + step * torch.arange(seq_len)) % modulus
        labels = ids.clone()
        labels[:, :prompt] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return Dataset(
        split(n),
        split(n_eval),
        f"synthetic token progressions (steps {lo}-{lo + 6}, prompt masked), {seq_len} tokens",
    )


# ---- real data sets --------------------------------------------------------------------------


class DataError(InputError):
    """A data path that is missing, of an unknown kind, or malformed."""


def detect(path: str) -> str:
    """'cifar10' (images), 'text-classification' or 'instructions' for a data path or the digits;
    DataError otherwise."""
    if path == DIGITS:  # refused up front where scikit-learn, which holds them, is not installed
        if importlib.util.find_spec("sklearn") is None:
            raise DataError(f"--data {DIGITS} reads the digits scikit-learn ships; pip install scikit-learn")
        return "cifar10"
    p = Path(path)
    if not p.exists():
        raise DataError(f"--data {path}: no such file or directory")
    if p.is_dir():
        if _cifar_dir(p) is not None:
            return "cifar10"
        if not _is_hf_dataset(p):
            raise DataError(
                f"--data {path}: neither a CIFAR-10 directory (cifar-10-batches-py/ with data_batch_1..5 "
                "and test_batch) nor a data set saved by datasets' save_to_disk"
            )
    elif p.suffix not in (".csv", ".jsonl"):
        raise DataError(
            f"--data {path}: unknown kind of file; use a .csv or .jsonl file or a CIFAR-10 directory"
        )
    records = _records(p)  # every line parsed up front: a malformed file is refused before any work
    if not records:
        raise DataError(f"--data {path}: no records")
    columns = set(records[0])
    for kind, needed in (
        ("instructions", {"instruction", "output"}),
        ("text-classification", {"text", "label"}),
    ):
        if needed <= columns:
            for i, r in enumerate(records, 1):
                if not needed <= set(r):
                    raise DataError(f"--data {path}: record {i} lacks {', '.join(sorted(needed - set(r)))}")
            return kind
    raise DataError(
        f"--data {path}: columns {sorted(columns)}; expected text and label, or instruction, input, output"
    )


def _is_hf_dataset(p: Path) -> bool:
    return (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()


def _hf_records(path: Path) -> list[dict]:
    """Rows of a data set saved with `datasets`' save_to_disk (Arrow files: data, never code);
    of a DatasetDict, its train split."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"--data {path}: reading a saved HF data set needs the datasets package "
            "(pip install 'lorabench[hf]')"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several kinds for a damaged directory
        raise DataError(f"--data {path}: cannot load the saved data set ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"--data {path}: the saved DatasetDict has no train split ({', '.join(ds)})")
        ds = ds["train"]
    return ds.to_list()


def _records(path: Path) -> list[dict]:
    if path.is_dir():
        return _hf_records(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--data {path}: cannot read ({e})") from None
    out = []
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"--data {path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"--data {path}:{i}: each line must be a JSON object")
        out.append(rec)
    return out


def _cifar_dir(p: Path) -> Path | None:
    for d in (p / "cifar-10-batches-py", p):
        if all((d / f).is_file() for f in ("data_batch_1", "test_batch")):
            return d
    return None


class _NumpyOnly(pickle.Unpickler):
    """CIFAR-10's batches are pickles: allow the numpy array machinery and nothing else, so a
    crafted file cannot run code (the safe-loading rule, for a format that has no safe loader)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    import numpy as np

    try:
        with open(path, "rb") as f:
            batch = _NumpyOnly(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as e:
        raise DataError(f"--data: {path} is not a CIFAR-10 batch ({e})") from None
    # ToTensor (uint8 -> [0, 1]) then Normalize(mean=0.5, std=0.5) per channel, as seed 002
    x = (torch.from_numpy(data).float() / 255.0 - 0.5) / 0.5
    return x, torch.from_numpy(labels)


def load_cifar10(path: str, samples: int, eval_samples: int, seed: int) -> Dataset:
    d = _cifar_dir(Path(path))
    train = [_cifar_batch(f) for f in sorted(d.glob("data_batch_*"))]
    x, y = torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train])
    ex, ey = _cifar_batch(d / "test_batch")
    g = torch.Generator().manual_seed(seed)
    take, etake = torch.randperm(len(y), generator=g)[:samples], torch.arange(min(eval_samples, len(ey)))
    if len(take) < samples:
        raise DataError(f"--data {path}: {len(y)} training images, fewer than --samples {samples}")
    return Dataset(
        {"x": x[take], "labels": y[take]},
        {"x": ex[etake], "labels": ey[etake]},
        f"CIFAR-10 from {path} ({samples} train / {len(etake)} test)",
    )


def download_cifar10(root: str) -> None:
    """Fetch CIFAR-10 with torchvision (only when asked, and only where the network allows)."""
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(root, train=True, download=True)
    except Exception as e:  # no network, or a refused connection
        raise DataError(f"--download: cannot fetch CIFAR-10 into {root} ({type(e).__name__}: {e})") from None


class HashTokenizer:
    """Words -> ids by CRC32 (stable across processes, unlike hash()); 0 pads, 1 ends a sequence."""

    name = "word-hash tokenizer (no tokenizer available offline)"
    pad_id, eos_id = 0, 1

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in text.split()]


class HFTokenizer:
    def __init__(self, tok, source: str):
        self.tok, self.name = tok, f"{source} tokenizer"
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else self.pad_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def tokenizer_for(source: str | None, vocab_size: int):
    """The model's own tokenizer when it loads without a network, else the word-hash one."""
    if source:
        try:
            from transformers import AutoTokenizer

            return HFTokenizer(AutoTokenizer.from_pretrained(source, local_files_only=True), source)
        except Exception:  # not cached, no tokenizer files, or no network: fall back, and say so
            pass
    return HashTokenizer(vocab_size)


def _split(records: list[dict], samples: int, eval_samples: int, seed: int, path: str) -> tuple[list, list]:
    if len(records) < samples + eval_samples:
        raise DataError(
            f"--data {path}: {len(records)} records, fewer than samples + eval samples "
            f"({samples} + {eval_samples})"
        )
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[i] for i in order[:samples]], [
        records[i] for i in order[samples : samples + eval_samples]
    ]


def _pad(rows: list[list[int]], seq_len: int, value: int) -> Tensor:
    return torch.tensor(
        [r[:seq_len] + [value] * (seq_len - len(r[:seq_len])) for r in rows], dtype=torch.long
    )


def load_text_classification(
    path: str, tokenizer, seq_len: int, samples: int, eval_samples: int, seed: int, num_labels: int
) -> Dataset:
    records = _records(Path(path))
    for i, r in enumerate(records):
        try:
            r["label"] = int(r["label"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"--data {path}: record {i + 1} has no whole-number label") from None
        if not 0 <= r["label"] < num_labels:
            raise DataError(
                f"--data {path}: record {i + 1} has label {r['label']}; the model has {num_labels} labels"
            )
    train, test = _split(records, samples, eval_samples, seed, path)

    def encode(rs):
        ids = [tokenizer.encode(str(r["text"]))[:seq_len] for r in rs]
        return {
            "input_ids": _pad(ids, seq_len, tokenizer.pad_id),
            "attention_mask": _pad([[1] * len(i) for i in ids], seq_len, 0),
            "labels": torch.tensor([r["label"] for r in rs]),
        }

    return Dataset(
        encode(train),
        encode(test),
        f"{Path(path).name} ({samples} train / {eval_samples} eval), {tokenizer.name}, {seq_len} tokens",
    )


def seed001_prompt(instruction: str, inp: str) -> str:
    """Seed 001's template: "Human: " + instruction + "\\n" + input, stripped, then "\\n\\nAssistant: "."""
    return ("Human: " + instruction + "\n" + inp).strip() + "\n\nAssistant: "


def load_instructions(
    path: str, tokenizer, seq_len: int, samples: int, eval_samples: int, seed: int
) -> Dataset:
    records = _records(Path(path))
    for i, r in enumerate(records):
        if not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise DataError(f"--data {path}: record {i + 1} needs string fields instruction and output")
    train, test = _split(records, samples, eval_samples, seed, path)

    def encode(rs):
        ids, labels = [], []
        for r in rs:
            prompt = tokenizer.encode(seed001_prompt(r["instruction"], str(r.get("input") or "")))
            response = tokenizer.encode(r["output"]) + [tokenizer.eos_id]
            ids.append((prompt + response)[:seq_len])  # cut at seq_len (256 in seed 001)
            labels.append(([IGNORE_INDEX] * len(prompt) + response)[:seq_len])
        return {
            "input_ids": _pad(ids, seq_len, tokenizer.pad_id),
            "attention_mask": _pad([[1] * len(i) for i in ids], seq_len, 0),
            "labels": _pad(labels, seq_len, IGNORE_INDEX),
        }

    return Dataset(
        encode(train),
        encode(test),
        f"{Path(path).name} ({samples} train / {eval_samples} eval, seed-001 template), "
        f"{tokenizer.name}, {seq_len} tokens",
    )


def load(
    path: str,
    *,
    samples: int,
    eval_samples: int,
    seq_len: int,
    seed: int,
    vocab_size: int | None,
    num_labels: int | None,
    tokenizer_source: str | None,
) -> Dataset:
    kind = detect(path)
    if kind == "cifar10":
        return load_cifar10(path, samples, eval_samples, seed)
    tokenizer = tokenizer_for(tokenizer_source, vocab_size)
    if kind == "text-classification":
        return load_text_classification(
            path, tokenizer, seq_len, samples, eval_samples, seed, num_labels or 2
        )
    return load_instructions(path, tokenizer, seq_len, samples, eval_samples, seed)
