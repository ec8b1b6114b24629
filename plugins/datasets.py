"""Built-in dataset: CIFAR-10 from the standard ``cifar-10-batches-py`` pickle layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from cifarx import Dataset, ImageData, UserError, hookimpl
from cifarx.data import download, extract, md5sum

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_SPLITS = {"batch1": ["data_batch_1"], "all": [f"data_batch_{i}" for i in range(1, 6)]}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The only globals a CIFAR-10 pickle needs: numpy's array reconstruction (under its numpy 1 and
# numpy 2 module names), ndarray and dtype. Nothing else is ever imported or called.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            content = _ArraysOnly(f, encoding="bytes").load()
    except Exception as exc:  # truncated, corrupt or hostile: the same answer for all
        raise UserError(f"{path} is not a readable CIFAR-10 file ({type(exc).__name__}: {exc}); "
                        f"delete {path.parent} to download it again") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a CIFAR-10 file: it holds {type(content).__name__}, not dict")
    return content


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch file as uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    content = _unpickle(path)
    data, labels = content.get(b"data"), content.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    if not isinstance(labels, list) or len(labels) != len(data) \
            or not all(isinstance(y, int) and 0 <= y < len(CLASSES) for y in labels):
        raise UserError(f"{path}: 'labels' must be a list of {len(data)} class numbers 0-9")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.tensor(labels, dtype=torch.int64)


def _ensure_files(root: Path, needed: list[str]) -> Path:
    """The batch folder under ``root``, downloading and unpacking the archive if files are missing."""
    folder = root / FOLDER
    if all((folder / name).is_file() for name in needed):
        return folder
    archive = root / ARCHIVE
    if not archive.is_file():
        try:
            download(URL, archive, ARCHIVE_MD5)
        except OSError as exc:
            raise UserError(
                f"CIFAR-10 is not in {folder} and downloading {URL} failed ({exc}); put "
                f"{ARCHIVE} in {root} or unpack it there, or point --data-dir (or "
                f"CIFARX_DATA_DIR) at the folder that holds {FOLDER}") from None
    elif md5sum(archive) != ARCHIVE_MD5:
        raise UserError(f"{archive} does not have the MD5 of the official archive "
                        f"({ARCHIVE_MD5}); delete it to download it again")
    extract(archive, root)
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{archive} unpacked, but {folder} lacks {', '.join(missing)}")
    return folder


def load_cifar10(data_dir: Path, split: str) -> ImageData:
    folder = _ensure_files(Path(data_dir), TRAIN_SPLITS[split] + ["test_batch"])
    train = [read_batch(folder / name) for name in TRAIN_SPLITS[split]]
    test_images, test_labels = read_batch(folder / "test_batch")
    classes = CLASSES
    if (folder / "batches.meta").is_file():
        names = _unpickle(folder / "batches.meta").get(b"label_names")
        if isinstance(names, list) and len(names) == len(CLASSES):
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return ImageData(
        train_images=torch.cat([images for images, _ in train]),
        train_labels=torch.cat([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        classes=classes,
        source=str(folder),
    )


@hookimpl
def register_datasets(register):
    register(Dataset(
        name="cifar10",
        load=load_cifar10,
        splits=tuple(TRAIN_SPLITS),
        summary="CIFAR-10, 32x32 RGB, 10 classes; train split batch1 (10,000) or all (50,000)",
    ))
