"""Built-in datasets, with their files under ``--data-dir`` as torchvision keeps them:

- ``cifar10``: ``cifar-10-batches-py/`` (train split ``batch1``, the assignment's, or ``all``);
- ``cifar100``: ``cifar-100-python/``, fine labels, or the 20 superclasses with ``labels=coarse``;
- ``mnist``, ``fashion-mnist``: ``MNIST/raw/``, ``FashionMNIST/raw/`` (idx files);
- ``image-folder``: your own images, ``train/<class>/*`` and ``test/<class>/*``, resized.

Missing files are downloaded from torchvision's addresses (the archive's MD5 checked) and
unpacked; offline, the error says which files to place where. Files already unpacked are read as
they are: any well-formed files in that layout load, byte-identical to the official ones or not
(torchvision's CIFAR classes refuse a file whose MD5 differs, and unpickle with ``pickle.load``,
which runs whatever a file names: here a restricted unpickler reads the arrays and nothing else).
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np
import torch

from cifarx import Dataset, ImageData, Option, UserError, hookimpl
from cifarx.training.data import download, extract, gunzip, md5sum

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_SPLITS = {"batch1": ["data_batch_1"], "all": [f"data_batch_{i}" for i in range(1, 6)]}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# CIFAR-100 as torchvision.datasets.CIFAR100 fetches and keeps it (a test checks they agree).
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_LABELS = {"fine": 100, "coarse": 20}

# The only globals a CIFAR pickle needs: numpy's array reconstruction (under its numpy 1 and
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


def again(folder: Path) -> str:
    """How to get a good copy of a damaged data folder without losing the only one: unpacked
    again from the archive beside it if there is one, else downloaded, which needs the network
    (so the old folder is moved aside, not deleted)."""
    archives = [p.name for p in folder.parent.glob("*.tar.gz")] if folder.parent.is_dir() else []
    if archives:
        return f"delete {folder}: the next run unpacks it again from {archives[0]} beside it"
    return (f"put a good copy there, or move {folder} aside and run again to download it "
            "(this needs the network: keep the old folder until the download worked)")


def _unpickle(path: Path, title: str = "CIFAR-10") -> dict:
    try:
        with open(path, "rb") as f:
            content = _ArraysOnly(f, encoding="bytes").load()
    except Exception as exc:  # truncated, corrupt or hostile: the same answer for all
        raise UserError(f"{path} is not a readable {title} file ({type(exc).__name__}: {exc}); "
                        f"{again(path.parent)}") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a {title} file: it holds {type(content).__name__}, "
                        "not dict")
    return content


def read_batch(path: Path, key: bytes = b"labels", num_classes: int = 10,
               title: str = "CIFAR-10") -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch as uint8 images (N, 3, 32, 32) and int64 labels (N,), the labels from
    ``key`` (CIFAR-100 has ``fine_labels`` and ``coarse_labels``)."""
    content = _unpickle(path, title)
    data, labels = content.get(b"data"), content.get(key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    if not isinstance(labels, list) or len(labels) != len(data) \
            or not all(isinstance(y, int) and 0 <= y < num_classes for y in labels):
        raise UserError(f"{path}: {key.decode()!r} must be a list of {len(data)} class numbers "
                        f"0-{num_classes - 1}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.tensor(labels, dtype=torch.int64)


def fetch_archive(root: Path, folder: str, needed: list[str], url: str, archive: str, md5: str,
                  title: str) -> Path:
    """``root / folder``, downloading and unpacking ``archive`` if any of ``needed`` is missing."""
    where = root / folder
    if all((where / name).is_file() for name in needed):
        return where
    packed = root / archive
    if not packed.is_file():
        try:
            download(url, packed, md5)
        except OSError as exc:
            raise UserError(
                f"{title} is not in {where} and downloading {url} failed ({exc}); put "
                f"{archive} in {root} or unpack it there, or point --data-dir (or "
                f"CIFARX_DATA_DIR) at the folder that holds {folder}") from None
    elif md5sum(packed) != md5:
        raise UserError(f"{packed} does not have the MD5 of the official archive "
                        f"({md5}); delete it to download it again")
    extract(packed, root)
    missing = [name for name in needed if not (where / name).is_file()]
    if missing:
        raise UserError(f"{packed} unpacked, but {where} lacks {', '.join(missing)}")
    return where


def label_names(path: Path, key: bytes, count: int, title: str) -> tuple[str, ...] | None:
    """The class names a meta file lists under ``key``, if it lists ``count`` of them."""
    names = _unpickle(path, title).get(key)
    if isinstance(names, list) and len(names) == count:
        return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return None


def load_cifar10(data_dir: Path, split: str) -> ImageData:
    folder = fetch_archive(Path(data_dir), FOLDER, TRAIN_SPLITS[split] + ["test_batch"], URL,
                           ARCHIVE, ARCHIVE_MD5, "CIFAR-10")
    train = [read_batch(folder / name) for name in TRAIN_SPLITS[split]]
    test_images, test_labels = read_batch(folder / "test_batch")
    meta = folder / "batches.meta"
    classes = (label_names(meta, b"label_names", len(CLASSES), "CIFAR-10") if meta.is_file()
               else None) or CLASSES
    return ImageData(
        train_images=torch.cat([images for images, _ in train]),
        train_labels=torch.cat([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        classes=classes,
        source=str(folder),
    )


def load_cifar100(data_dir: Path, split: str, labels: str = "fine") -> ImageData:
    folder = fetch_archive(Path(data_dir), CIFAR100_FOLDER, ["train", "test", "meta"],
                           CIFAR100_URL, CIFAR100_ARCHIVE, CIFAR100_MD5, "CIFAR-100")
    count, key = CIFAR100_LABELS[labels], f"{labels}_labels".encode()
    read = functools.partial(read_batch, key=key, num_classes=count, title="CIFAR-100")
    (train_images, train_labels), (test_images, test_labels) = read(folder / "train"), \
        read(folder / "test")
    classes = label_names(folder / "meta", f"{labels}_label_names".encode(), count, "CIFAR-100")
    if classes is None:
        raise UserError(f"{folder / 'meta'}: '{labels}_label_names' must list the {count} "
                        "class names")
    return ImageData(train_images, train_labels, test_images, test_labels, classes,
                     source=str(folder))


# --- MNIST and Fashion-MNIST: idx files, as torchvision's MNIST class reads them ----------------

def fetch_idx(raw: Path, resources: list[tuple[str, str]], mirrors: list[str], title: str,
              holder: str):
    """Each idx file in ``raw``, unpacked from its ``.gz``, which is downloaded if missing."""
    for packed_name, md5 in resources:
        packed = raw / packed_name
        if (raw / packed.stem).is_file():
            continue
        if not packed.is_file():
            for mirror in mirrors:  # torchvision's, in its order
                try:
                    download(mirror + packed_name, packed, md5)
                    break
                except OSError as exc:
                    failure = exc
            else:
                names = ", ".join(name for name, _ in resources)
                raise UserError(
                    f"{title} is not in {raw} and downloading {packed_name} from "
                    f"{' or '.join(mirrors)} failed ({failure}); "
                    f"put {names} there (gzipped as published, or unpacked), or point "
                    f"--data-dir (or CIFARX_DATA_DIR) at the folder that holds {holder}") from None
        elif md5sum(packed) != md5:
            raise UserError(f"{packed} does not have the MD5 of the official file ({md5}); "
                            "delete it to download it again, or unpack it there yourself")
        gunzip(packed)


def read_idx(reader, path: Path) -> torch.Tensor:
    try:
        return reader(str(path))
    except Exception as exc:  # torchvision asserts, or fails to reshape a short file
        reason = str(exc).splitlines()[0] if str(exc) else "malformed header"
        raise UserError(f"{path} is not a readable idx file ({type(exc).__name__}: {reason}); "
                        f"{again(path.parent)}") from None


def read_idx_split(raw: Path, prefix: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``<prefix>-images-idx3-ubyte`` and its labels as (N, 1, H, W) uint8 and (N,) int64."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    images_file = raw / f"{prefix}-images-idx3-ubyte"
    labels_file = raw / f"{prefix}-labels-idx1-ubyte"
    images, labels = read_idx(read_image_file, images_file), read_idx(read_label_file, labels_file)
    if images.shape[1] != images.shape[2]:
        raise UserError(f"{images_file}: the images are {images.shape[1]}x{images.shape[2]}; "
                        "accepted: square images")
    if len(labels) != len(images):
        raise UserError(f"{labels_file} has {len(labels)} labels for the {len(images)} images "
                        f"of {images_file}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise UserError(f"{labels_file}: labels must be class numbers 0-{num_classes - 1}, "
                        f"found {int(labels.max())}")
    return images.unsqueeze(1).contiguous(), labels


def load_idx(holder: str, title: str, data_dir: Path) -> ImageData:
    """A dataset laid out as torchvision's ``holder`` class (MNIST, FashionMNIST) keeps it."""
    import torchvision.datasets

    kind = getattr(torchvision.datasets, holder)
    raw = Path(data_dir) / holder / "raw"
    fetch_idx(raw, kind.resources, kind.mirrors, title, holder)
    train_images, train_labels = read_idx_split(raw, "train", len(kind.classes))
    test_images, test_labels = read_idx_split(raw, "t10k", len(kind.classes))
    if train_images.shape[1:] != test_images.shape[1:]:
        raise UserError(f"{raw}: the training images are {tuple(train_images.shape[2:])} and the "
                        f"test images {tuple(test_images.shape[2:])}; they must be the same size")
    return ImageData(train_images, train_labels, test_images, test_labels, tuple(kind.classes),
                     source=str(raw))


def load_mnist(data_dir: Path, split: str) -> ImageData:
    return load_idx("MNIST", "MNIST", data_dir)


def load_fashion_mnist(data_dir: Path, split: str) -> ImageData:
    return load_idx("FashionMNIST", "Fashion-MNIST", data_dir)


# --- image-folder: your own images ----------------------------------------------------------------

def read_image_folder(folder: Path, size: int, color: str):
    """torchvision's ImageFolder of ``folder``: images (N, C, size, size) uint8, labels, classes."""
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import functional as F

    def load(path: str) -> Image.Image:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB" if color == "rgb" else "L")

    try:
        found = ImageFolder(str(folder), loader=load)
    except FileNotFoundError as exc:  # no class folder, or a class folder without images
        raise UserError(f"image-folder: {folder}: {str(exc).splitlines()[0]}") from None
    images = torch.empty(len(found), 3 if color == "rgb" else 1, size, size, dtype=torch.uint8)
    for i, (path, _) in enumerate(found.samples):
        try:
            image = found.loader(path)
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"image-folder: {path} is not a readable image ({exc}); remove or "
                            "replace it") from None
        images[i] = F.pil_to_tensor(F.resize(image, [size, size], antialias=True))
    return images, torch.tensor(found.targets, dtype=torch.int64), tuple(found.classes)


def load_image_folder(data_dir: Path, split: str, size: int = 32, color: str = "rgb") -> ImageData:
    root = Path(data_dir)
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise UserError(f"image-folder: {root / part} is not a folder; put your images in "
                            f"{root}/train/<class>/ and {root}/test/<class>/ (PNG, JPEG, ...; any "
                            "size), or point --data-dir at the folder that holds train/ and test/")
    train_images, train_labels, classes = read_image_folder(root / "train", size, color)
    test_images, test_labels, test_classes = read_image_folder(root / "test", size, color)
    if test_classes != classes:
        raise UserError(f"image-folder: {root}/test has the classes {', '.join(test_classes)} and "
                        f"{root}/train {', '.join(classes)}; they must be the same folders")
    return ImageData(train_images, train_labels, test_images, test_labels, classes,
                     source=str(root))


@hookimpl
def register_datasets(register):
    register(Dataset(
        name="cifar10",
        load=load_cifar10,
        splits=tuple(TRAIN_SPLITS),
        summary="CIFAR-10, 32x32 RGB, 10 classes; train split batch1 (10,000) or all (50,000)",
    ))
    register(Dataset(
        name="cifar100",
        load=load_cifar100,
        options={"labels": Option("fine", choices=tuple(CIFAR100_LABELS),
                                  help="fine: the 100 classes; coarse: the 20 superclasses")},
        num_classes=100,
        summary="CIFAR-100, 32x32 RGB, 50,000 training images; 100 classes (labels=coarse: 20)",
    ))
    register(Dataset(
        name="mnist",
        load=load_mnist,
        image_shape=(1, 28, 28),
        summary="MNIST handwritten digits, 28x28 grey, 10 classes, 60,000 training images",
    ))
    register(Dataset(
        name="fashion-mnist",
        load=load_fashion_mnist,
        image_shape=(1, 28, 28),
        summary="Fashion-MNIST (Zalando's clothes), 28x28 grey, 10 classes, 60,000 training "
                "images",
    ))
    register(Dataset(
        name="image-folder",
        load=load_image_folder,
        options={"size": Option(32, int, range="[8, 512]",
                                help="every image is resized to size x size pixels"),
                 "color": Option("rgb", choices=("rgb", "gray"),
                                 help="rgb: 3 channels; gray: 1 (PIL's L conversion)")},
        summary="your images: --data-dir holds train/<class>/* and test/<class>/* (any size, "
                "resized); classes from the folder names",
    ))
