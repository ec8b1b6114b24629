"""Data on the training device: where files live, fetching them, and drawing batches.

Datasets are small (CIFAR-10 is 180 MB as uint8), so the whole set moves to the device once and
a batch is an index into it: no DataLoader, no per-image work on the hot path.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError

DATA_DIR_ENV = "CIFARX_DATA_DIR"


def resolve_data_dir(option: str | Path | None = None) -> Path:
    """``--data-dir``, else ``$CIFARX_DATA_DIR``, else ``~/.cache/cifarx``."""
    chosen = option or os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "cifarx"
    return Path(chosen).expanduser()


def class_index(text: str, classes: tuple[str, ...]) -> int | None:
    """A class given by its number or its name -> its number; None if it is neither."""
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    return classes.index(text) if text in classes else None


def only_classes(data, wanted, flag: str = "--classes"):
    """``data`` (an :class:`~cifarx.ImageData`) with only the images of the ``wanted`` classes,
    named or numbered, relabelled 0, 1, ... in the order given: a task of its own (cat
    against dog), or the classes a model trained on such a task predicts."""
    from ..plugin_api.types import ImageData

    chosen = []
    for item in wanted:
        text = str(item).strip()
        index = class_index(text, data.classes)
        if index is None:
            raise UserError(f"{flag}: no class {text!r}; accepted: "
                            f"{', '.join(data.classes)} (or their numbers 0-"
                            f"{len(data.classes) - 1})")
        if index not in chosen:
            chosen.append(index)
    if len(chosen) < 2:
        raise UserError(f"{flag}: name at least two classes, got {len(chosen)}")
    relabel = torch.full((len(data.classes),), -1, dtype=torch.int64)
    relabel[chosen] = torch.arange(len(chosen))
    parts = {}
    for split in ("train", "test"):
        labels = relabel[getattr(data, f"{split}_labels")]
        keep = labels >= 0
        parts[f"{split}_images"] = getattr(data, f"{split}_images")[keep]
        parts[f"{split}_labels"] = labels[keep]
    return ImageData(**parts, classes=tuple(data.classes[i] for i in chosen), source=data.source)


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` and check its MD5; a partial file never takes ``dest``'s name.

    Raises ``OSError`` when the network fails, so the caller can say how to get the files
    another way; raises UserError when what arrived is not the expected file.
    """
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            print(f"cifarx: downloading {url} to {dest}", file=sys.stderr)
            shutil.copyfileobj(response, out, length=1 << 20)
    except (urllib.error.URLError, OSError):
        partial.unlink(missing_ok=True)
        for folder in created:  # a mistyped --data-dir leaves no folders behind
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    got = md5sum(partial)
    if got != md5:
        partial.unlink()
        raise UserError(f"download of {url} has MD5 {got}, expected {md5}; try again, or fetch "
                        f"the file yourself and place it at {dest}")
    partial.replace(dest)
    return dest


def extract(archive: Path, into: Path):
    """Unpack a tar archive, refusing members that would land outside ``into``."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"cannot unpack {archive}: {exc}; delete it and try again") from None


def gunzip(archive: Path) -> Path:
    """Unpack ``name.gz`` next to it as ``name``; a partial file never takes that name."""
    dest = archive.with_suffix("")
    partial = dest.with_name(dest.name + ".part")
    try:
        with gzip.open(archive, "rb") as packed, open(partial, "wb") as out:
            shutil.copyfileobj(packed, out, length=1 << 20)
    except (OSError, EOFError) as exc:
        partial.unlink(missing_ok=True)
        raise UserError(f"cannot unpack {archive}: {exc}; delete it and try again") from None
    partial.replace(dest)
    return dest


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device "
                        f"(torch {torch.__version__}); use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; accepted: auto, cpu, cuda")
    return torch.device(name)


class BatchSampler:
    """Random batches without replacement: a fresh permutation for each pass over the data.

    The tail of a pass that does not fill a batch is skipped, so every batch has the same size.
    ``epoch`` counts the passes begun (0 during the first).
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, device: torch.device):
        if not 0 < batch_size <= n:
            raise ValueError(f"batch size {batch_size} does not fit {n} images")
        self.n, self.batch_size, self.generator, self.device = n, batch_size, generator, device
        self._order: Tensor | None = None
        self._next = n  # forces a permutation on the first call
        self.epoch = -1

    def __call__(self) -> Tensor:
        if self._next + self.batch_size > self.n:
            self._order = torch.randperm(self.n, generator=self.generator, device=self.device)
            self._next = 0
            self.epoch += 1
        batch = self._order[self._next:self._next + self.batch_size]
        self._next += self.batch_size
        return batch

    def state(self) -> dict:
        """Where it is in the current pass (for a checkpoint)."""
        return {"order": self._order, "next": self._next, "epoch": self.epoch}

    def restore(self, state: dict):
        self._order, self._next = state["order"], state["next"]
        # a checkpoint from before epochs were counted: as many passes as batches drawn allow
        self.epoch = state.get("epoch", 0)


class TrainingImages:
    """The training images on the device; ``batch(indices)`` gives float pixels in [0, 1].

    The dataset's images stay uint8 (a quarter of float32's memory). Stored adversarial images
    (``--adv-data``) follow them as float32, as their attack made them: rounding them to 8 bits
    would move pixels by up to 0.5/255 (half an ifgsm step), and the model would train on
    images other than those the attack made and recorded. Index ``i >= len(images)`` is
    ``extra_images[i - len(images)]``.
    """

    def __init__(self, images: Tensor, labels: Tensor, device: torch.device,
                 extra_images: Tensor | None = None, extra_labels: Tensor | None = None):
        self.images = images.to(device)
        self.extra = None if extra_images is None else extra_images.to(device, torch.float32)
        if extra_labels is not None:
            labels = torch.cat([labels, extra_labels.to(labels.dtype)])
        self.labels = labels.to(device)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        x = self.images[indices if self.extra is None else indices.clamp(max=len(self.images) - 1)]
        x = x.float().div_(255)
        if self.extra is not None:
            # Two gathers and a select: boolean indexing would wait for the device each step.
            stored = self.extra[(indices - len(self.images)).clamp(min=0)]
            x = torch.where((indices < len(self.images)).view(-1, 1, 1, 1), x, stored)
        return x, self.labels[indices]
