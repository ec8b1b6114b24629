"""The datasets beyond CIFAR-10, each read from small files the test writes in the real format:
idx files (MNIST, Fashion-MNIST), the CIFAR-100 pickles, a folder of PNGs; then a tiny
Fashion-MNIST training and an attack on it through the CLI."""

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from mlflow import MlflowClient
from PIL import Image

from cifarx import UserError
from cifarx.plugin_api.registry import catalog
from cifarx.plugins import datasets
from cifarx.plugins.datasets import load_cifar100, load_fashion_mnist, load_image_folder, load_mnist
from cifarx.training.config import TrainConfig, plan

from test_cli import cli, one_line_error

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def write_idx(path: Path, array: np.ndarray, packed: bool = False) -> Path:
    """An idx file as LeCun's format has it: 0, 0, type 0x08 (uint8), the number of dimensions,
    each dimension as a big-endian int32, then the bytes; gzipped as published if ``packed``."""
    content = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + \
        array.astype(np.uint8).tobytes()
    if packed:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def grey_images(n: int, seed: int, side: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake MNIST: a fixed template per class plus noise, uint8 (n, side, side)."""
    templates = np.random.default_rng(1234).uniform(0, 255, size=(10, side, side))
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = np.clip(templates[labels] + rng.normal(0, 30, size=(n, side, side)), 0, 255)
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_mnist_layout(root: Path, holder: str = "FashionMNIST", train: int = 60, test: int = 30,
                       packed: bool = False) -> Path:
    """``root/<holder>/raw/`` with the four idx files, as torchvision keeps them."""
    raw = root / holder / "raw"
    for prefix, n, seed in (("train", train, 0), ("t10k", test, 1)):
        images, labels = grey_images(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, packed)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, packed)
    return raw


# --- MNIST and Fashion-MNIST --------------------------------------------------------------------

@pytest.mark.parametrize("name, holder, load", [("mnist", "MNIST", load_mnist),
                                                ("fashion-mnist", "FashionMNIST",
                                                 load_fashion_mnist)])
def test_idx_files_in_torchvisions_layout_load(tmp_path, name, holder, load):
    write_mnist_layout(tmp_path, holder)
    data = load(tmp_path, "all")
    assert data.train_images.shape == (60, 1, 28, 28) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (30, 1, 28, 28)
    images, labels = grey_images(60, 0)
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(images))
    assert data.train_labels.tolist() == labels.tolist()
    assert data.classes == tuple(getattr(torchvision.datasets, holder).classes)
    declared = catalog().get("dataset", name)
    assert declared.image_shape == tuple(data.train_images.shape[1:])
    assert declared.num_classes == len(data.classes) == 10
    assert declared.splits == ("all",)


def test_official_gz_files_are_checked_and_unpacked(tmp_path, monkeypatch):
    raw = write_mnist_layout(tmp_path, packed=True)
    md5s = [(f"{name}.gz", hashlib.md5((raw / f"{name}.gz").read_bytes()).hexdigest())
            for name in IDX_FILES]
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "resources", md5s)
    assert len(load_fashion_mnist(tmp_path, "all").train_images) == 60
    assert all((raw / name).is_file() for name in IDX_FILES)


def test_a_gz_file_with_another_md5_is_refused_and_loads_once_unpacked(tmp_path):
    raw = write_mnist_layout(tmp_path, packed=True)
    with pytest.raises(UserError, match="does not have the MD5 of the official file") as caught:
        load_fashion_mnist(tmp_path, "all")
    assert "unpack it there yourself" in str(caught.value)
    for name in IDX_FILES:  # what `gunzip` does: any well-formed unpacked file loads
        (raw / name).write_bytes(gzip.decompress((raw / f"{name}.gz").read_bytes()))
    assert len(load_fashion_mnist(tmp_path, "all").test_images) == 30


def test_downloads_from_the_first_mirror_that_answers(tmp_path, monkeypatch):
    served = write_mnist_layout(tmp_path / "served", packed=True)
    md5s = [(f"{name}.gz", hashlib.md5((served / f"{name}.gz").read_bytes()).hexdigest())
            for name in IDX_FILES]
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", md5s)
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors",
                        ["http://127.0.0.1:9/", served.as_uri() + "/"])
    data = load_mnist(tmp_path / "cache", "all")
    assert len(data.train_images) == 60
    raw = tmp_path / "cache" / "MNIST" / "raw"
    assert all((raw / name).is_file() for name in IDX_FILES) and not list(raw.glob("*.part"))


def test_offline_says_which_files_to_place_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(UserError) as caught:
        load_fashion_mnist(tmp_path, "all")
    message = str(caught.value)
    assert f"Fashion-MNIST is not in {tmp_path / 'FashionMNIST' / 'raw'}" in message
    assert all(f"{name}.gz" in message for name in IDX_FILES)
    assert "--data-dir" in message and "CIFARX_DATA_DIR" in message and "\n" not in message


@pytest.mark.parametrize("damage, fragment", [
    ("truncate", "train-images-idx3-ubyte is not a readable idx file"),
    ("not-idx", "train-images-idx3-ubyte is not a readable idx file"),
    ("count", "has 59 labels for the 60 images"),
    ("label", "labels must be class numbers 0-9, found 12"),
    ("shape", "accepted: square images"),
])
def test_damaged_idx_files_give_a_clear_error(tmp_path, damage, fragment):
    raw = write_mnist_layout(tmp_path)
    images, labels = grey_images(60, 0)
    if damage == "truncate":
        path = raw / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "not-idx":
        (raw / "train-images-idx3-ubyte").write_bytes(b"<html>not found</html>")
    elif damage == "count":
        write_idx(raw / "train-labels-idx1-ubyte", labels[:59])
    elif damage == "label":
        write_idx(raw / "train-labels-idx1-ubyte", np.full(60, 12))
    else:
        write_idx(raw / "train-images-idx3-ubyte", images.reshape(60, 28 * 2, 14))
    with pytest.raises(UserError, match=fragment) as caught:
        load_fashion_mnist(tmp_path, "all")
    assert "\n" not in str(caught.value)


def test_each_dataset_declares_its_default_train_split(tmp_path):
    assert plan(TrainConfig(dataset="fashion-mnist")).config.train_split == "all"
    assert plan(TrainConfig(dataset="cifar100")).config.train_split == "all"
    assert plan(TrainConfig()).config.train_split == "batch1"  # cifar10: the assignment's
    with pytest.raises(UserError, match="unknown --train-split 'batch1' for mnist; accepted: all"):
        plan(TrainConfig(dataset="mnist", train_split="batch1"))


# --- CIFAR-100 ----------------------------------------------------------------------------------

FINE = [f"fine{i}" for i in range(100)]
COARSE = [f"coarse{i}" for i in range(20)]


def write_cifar100_layout(root: Path, train: int = 50, test: int = 20) -> Path:
    """``cifar-100-python/`` with ``train``, ``test`` and ``meta``, pickled as the original is."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", train), ("test", test)):
        fine = rng.integers(0, 100, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * n, b"batch_label": name.encode(),
                         b"fine_labels": fine, b"coarse_labels": [y // 5 for y in fine],
                         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [c.encode() for c in FINE],
                     b"coarse_label_names": [c.encode() for c in COARSE]}, f)
    return folder


def test_cifar100_fine_and_coarse_labels(tmp_path):
    folder = write_cifar100_layout(tmp_path)
    with open(folder / "train", "rb") as f:
        stored = pickle.load(f)
    fine = load_cifar100(tmp_path, "all")
    assert fine.train_images.shape == (50, 3, 32, 32) and fine.test_images.shape == (20, 3, 32, 32)
    assert fine.classes == tuple(FINE) and fine.train_labels.tolist() == stored[b"fine_labels"]
    assert torch.equal(fine.train_images.flatten(1), torch.from_numpy(stored[b"data"]))
    coarse = load_cifar100(tmp_path, "all", labels="coarse")
    assert coarse.classes == tuple(COARSE)
    assert coarse.train_labels.tolist() == stored[b"coarse_labels"]
    assert torch.equal(coarse.train_images, fine.train_images)
    assert catalog().get("dataset", "cifar100").num_classes == 100


def test_cifar100_fetches_what_torchvision_fetches():
    kind = torchvision.datasets.CIFAR100
    assert (datasets.CIFAR100_URL, datasets.CIFAR100_MD5, datasets.CIFAR100_ARCHIVE,
            datasets.CIFAR100_FOLDER) == (kind.url, kind.tgz_md5, kind.filename, kind.base_folder)
    assert [kind.train_list[0][0], kind.test_list[0][0], kind.meta["filename"]] == \
        ["train", "test", "meta"]


def test_cifar100_errors(tmp_path, monkeypatch):
    folder = write_cifar100_layout(tmp_path)
    (folder / "meta").unlink()
    monkeypatch.setattr(datasets, "CIFAR100_URL", "http://127.0.0.1:9/cifar-100-python.tar.gz")
    with pytest.raises(UserError, match="CIFAR-100 is not in .*cifar-100-python and downloading"):
        load_cifar100(tmp_path, "all")
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"a", b"b"]}, f)
    with pytest.raises(UserError, match="'fine_label_names' must list the 100 class names"):
        load_cifar100(tmp_path, "all")
    (folder / "train").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                 b"fine_labels": [0, 100]}))
    with pytest.raises(UserError, match="'fine_labels' must be a list of 2 class numbers 0-99"):
        load_cifar100(tmp_path, "all")


def test_a_bad_dataset_option_is_one_line(tmp_path, in_tmp):
    write_cifar100_layout(tmp_path)
    one_line_error(cli("train", "--dataset", "cifar100", "--dataset-opt", "labels=medium",
                       "--data-dir", tmp_path, "--device", "cpu"),
                   "--dataset-opt labels=medium: not accepted by cifar100; accepted: fine, coarse")
    one_line_error(cli("train", "--dataset", "mnist", "--dataset-opt", "labels=coarse",
                       "--data-dir", tmp_path, "--device", "cpu"),
                   "mnist has no option 'labels'; accepted: none")
    assert not (in_tmp / "mlflow.db").exists()


# --- image-folder -------------------------------------------------------------------------------

def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3) -> Path:
    """PNGs of assorted sizes and modes: each class a colour, so that its pixels can be checked."""
    colours = {"cat": (200, 30, 30), "dog": (30, 30, 200), "eel": (30, 200, 30)}
    for part in ("train", "test"):
        for name in classes:
            (root / part / name).mkdir(parents=True)
            for i in range(per_class):
                image = Image.new("RGB", (40 + 13 * i, 25 + 7 * i), colours[name])
                image.save(root / part / name / f"{i}.png")
    return root


def test_image_folder_reads_resizes_and_names_the_classes(tmp_path):
    write_image_folder(tmp_path)
    data = load_image_folder(tmp_path, "all")
    assert data.classes == ("cat", "dog")  # the folder names, sorted
    assert data.train_images.shape == (6, 3, 32, 32) and data.test_images.shape == (6, 3, 32, 32)
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.train_images[0, :, 5, 5].tolist() == [200, 30, 30]
    assert data.train_images[4, :, 5, 5].tolist() == [30, 30, 200]
    grey = load_image_folder(tmp_path, "all", size=16, color="gray")
    assert grey.train_images.shape == (6, 1, 16, 16)
    # PIL's L: 0.299 R + 0.587 G + 0.114 B
    assert grey.train_images[0, 0, 3, 3].item() == pytest.approx(0.299 * 200 + 0.587 * 30 +
                                                                 0.114 * 30, abs=1)


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="train is not a folder; put your images in") as caught:
        load_image_folder(tmp_path, "all")
    assert "--data-dir" in str(caught.value)
    write_image_folder(tmp_path)
    (tmp_path / "test" / "eel").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "eel" / "0.png")
    with pytest.raises(UserError, match="test has the classes cat, dog, eel and .*cat, dog"):
        load_image_folder(tmp_path, "all")
    (tmp_path / "test" / "eel" / "0.png").unlink()
    with pytest.raises(UserError, match="Found no valid file for the classes eel"):
        load_image_folder(tmp_path, "all")
    (tmp_path / "test" / "eel").rmdir()
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png is not a readable image"):
        load_image_folder(tmp_path, "all")


def test_image_folder_options_are_checked(tmp_path, in_tmp):
    write_image_folder(tmp_path)
    one_line_error(cli("train", "--dataset", "image-folder", "--dataset-opt", "size=4",
                       "--data-dir", tmp_path, "--device", "cpu"),
                   "--dataset-opt size=4: not accepted by image-folder", "[8, 512]")
    one_line_error(cli("train", "--dataset", "image-folder", "--dataset-opt", "color=cmyk",
                       "--data-dir", tmp_path, "--device", "cpu"), "accepted: rgb, gray")


# --- 1-channel 28x28 end to end -----------------------------------------------------------------

def test_train_then_attack_on_fashion_mnist(tmp_path, in_tmp):
    write_mnist_layout(tmp_path / "data", train=100, test=40)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--data-dir", tmp_path / "data", "--device", "cpu", "--threads", "1",
              "--tracking-uri", uri]
    trained = cli("train", "--dataset", "fashion-mnist", "--arch", "convonly", "--aug",
                  "normalize", "--iters", "20", "--batch-size", "20", "--eval-every", "10",
                  "--probe", "grad-max", "--arch-opt", "dropout=0.2",
                  *common)  # no --train-split: the dataset's own
    assert trained.exit_code == 0, trained.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cifarx").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["dataset"] == "fashion-mnist" and run.data.params["train_split"] == "all"
    assert run.data.params["arch.dropout"] == "0.2"
    assert run.data.metrics["final/test_acc"] >= 0.5  # 10 templates plus noise: learnable
    assert "grad_max/first_conv" in run.data.metrics

    from cifarx.tracking.models import load_model

    model = load_model(f"runs:/{run.info.run_id}/model", uri)
    assert model.classes == tuple(torchvision.datasets.FashionMNIST.classes)
    normalize = model.normalize  # one channel, its statistics from the training images
    train_images = load_fashion_mnist(tmp_path / "data", "all").train_images.double() / 255
    assert normalize.mean.shape == (1, 1, 1, 1)
    assert normalize.mean.item() == pytest.approx(train_images.mean().item(), rel=1e-5)
    assert normalize.std.item() == pytest.approx(train_images.std().item(), rel=1e-3)

    attacked = cli("attack", "--model", f"runs:/{run.info.run_id}/model", "--dataset",
                   "fashion-mnist", "--per-class", "1", "--eps", "2/255", *common)
    assert attacked.exit_code == 0, attacked.output
    attack_run = client.get_run(attacked.stdout.split("run ")[1].split()[0])
    assert attack_run.data.metrics["attack/images"] == 10
    assert [a.path for a in client.list_artifacts(attack_run.info.run_id, "figures")] == \
        ["figures/adversarial.png"]


def test_describe_builds_for_the_datasets_image_shape():
    result = cli("describe", "table1", "--dataset", "fashion-mnist")
    assert result.exit_code == 0, result.output
    assert "input 1x28x28" in result.stdout and "32 x 14 x 14" in result.stdout
