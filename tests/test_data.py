import hashlib
import pickle
import tarfile
from pathlib import Path

import pytest
import torch

from cifarx import UserError
from cifarx.plugins import datasets
from cifarx.plugins.datasets import load_cifar10, read_batch
from cifarx.training.data import BatchSampler, resolve_data_dir

from conftest import CLASSES, synthetic_images, write_cifar_layout


def test_reads_the_standard_layout(data_dir):
    data = load_cifar10(data_dir, "batch1")
    assert data.train_images.shape == (200, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (200, 3, 32, 32)
    assert data.classes == tuple(CLASSES)
    raw, labels = synthetic_images(200, 1)  # what data_batch_1 holds, in R,G,B planes
    assert torch.equal(data.train_images[7, 1].flatten(), torch.from_numpy(raw[7, 1024:2048]))
    assert data.train_labels.tolist() == labels
    assert len(load_cifar10(data_dir, "all").train_images) == 1000


class Boom:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/cifarx-pwned"),))


def test_pickles_cannot_run_code(tmp_path):
    target = Path("/tmp/cifarx-pwned")
    target.unlink(missing_ok=True)
    evil = tmp_path / "data_batch_1"
    evil.write_bytes(pickle.dumps({b"data": Boom(), b"labels": []}))
    with pytest.raises(UserError, match="refusing to load pathlib"):
        read_batch(evil)
    assert not target.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-shape", "bad-labels", "not-dict"])
def test_damaged_files_give_a_clear_error(tmp_path, damage):
    folder = write_cifar_layout(tmp_path, per_batch=20, test=20)
    path = folder / "data_batch_1"
    content = path.read_bytes()
    data, labels = synthetic_images(20, 0)
    if damage == "truncate":
        path.write_bytes(content[: len(content) // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a pickle")
    elif damage == "wrong-shape":
        path.write_bytes(pickle.dumps({b"data": data[:, :100], b"labels": labels}))
    elif damage == "bad-labels":
        path.write_bytes(pickle.dumps({b"data": data, b"labels": [11] * 20}))
    else:
        path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(UserError, match="data_batch_1"):
        load_cifar10(tmp_path, "batch1")


def test_a_damaged_file_is_never_answered_with_delete_the_only_copy(tmp_path):
    """The advice was 'delete the folder to download it again': offline, the only copy."""
    folder = write_cifar_layout(tmp_path, per_batch=20, test=20)
    (folder / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(UserError) as raised:
        load_cifar10(tmp_path, "batch1")
    assert "delete" not in str(raised.value)
    assert f"move {folder} aside and run again to download it (this needs the network" in \
        str(raised.value)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"an archive beside it")
    with pytest.raises(UserError, match="unpacks it again from cifar-10-python.tar.gz"):
        load_cifar10(tmp_path, "batch1")


def official_archive(tmp_path: Path) -> tuple[Path, str]:
    """A tar.gz laid out like the official one, and its MD5."""
    source = tmp_path / "source"
    write_cifar_layout(source, per_batch=20, test=20)
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_downloads_checks_the_archive_and_unpacks(tmp_path, monkeypatch):
    archive, md5 = official_archive(tmp_path)
    monkeypatch.setattr(datasets, "URL", archive.as_uri())
    monkeypatch.setattr(datasets, "ARCHIVE_MD5", md5)
    root = tmp_path / "cache"
    data = load_cifar10(root, "all")
    assert len(data.train_images) == 100
    assert (root / "cifar-10-python.tar.gz").is_file()
    assert not list(root.glob("*.part"))


def test_a_download_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    archive, _ = official_archive(tmp_path)
    monkeypatch.setattr(datasets, "URL", archive.as_uri())
    root = tmp_path / "cache"
    with pytest.raises(UserError, match="MD5"):
        load_cifar10(root, "batch1")
    assert not (root / "cifar-10-python.tar.gz").exists()


def test_offline_says_where_it_looked_and_how_to_provide_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(UserError) as caught:
        load_cifar10(tmp_path / "empty", "batch1")
    message = str(caught.value)
    assert str(tmp_path / "empty" / "cifar-10-batches-py") in message
    assert "--data-dir" in message and "CIFARX_DATA_DIR" in message and "\n" not in message
    assert not (tmp_path / "empty").exists()  # a mistyped --data-dir leaves no folder behind


def test_data_dir_option_then_environment_then_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CIFARX_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "opt") == tmp_path / "opt"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("CIFARX_DATA_DIR")
    assert resolve_data_dir(None) == Path.home() / ".cache" / "cifarx"


def test_batches_cover_each_pass_once_without_replacement():
    sampler = BatchSampler(10, 3, torch.Generator().manual_seed(0), torch.device("cpu"))
    first_pass = torch.cat([sampler() for _ in range(3)])
    assert len(set(first_pass.tolist())) == 9  # one image of the ten waits for the next pass
    assert all(len(sampler()) == 3 for _ in range(10))
    with pytest.raises(ValueError, match="batch size 11 does not fit 10 images"):
        BatchSampler(10, 11, torch.Generator(), torch.device("cpu"))
