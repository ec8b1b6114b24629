"""The baseline: CIFAR-10 training as a student would write it (assignment part 1).

A torch Dataset that returns PIL images, per-image torchvision transforms, a DataLoader with two
worker processes, and a loop that calls .item() every step. Same network (Table 1), optimizer,
schedule and protocol as `cifarx train`, so only the data path and bookkeeping differ.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from cifarx.plugins.architectures import build_table1
from cifarx.training.optim import lr_factor, make_optimizer


class CifarBatches(Dataset):
    def __init__(self, folder: Path, files: list[str], transform):
        images, labels = [], []
        for name in files:
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += batch[b"labels"]
        self.images, self.labels, self.transform = np.concatenate(images), labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def train_baseline(data_dir: Path, iters: int, batch_size: int, eval_every: int, hp: dict,
                   workers: int = 2, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    folder = Path(data_dir) / "cifar-10-batches-py"
    raw = CifarBatches(folder, ["data_batch_1"], transforms.ToTensor())
    stacked = torch.stack([raw[i][0] for i in range(len(raw))])
    mean, std = stacked.mean((0, 2, 3)).tolist(), stacked.std((0, 2, 3)).tolist()
    train_set = CifarBatches(folder, ["data_batch_1"], transforms.Compose([
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(mean, std),
        transforms.RandomCrop(32, padding=4)]))
    test_set = CifarBatches(folder, ["test_batch"], transforms.Compose([
        transforms.ToTensor(), transforms.Normalize(mean, std)]))
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                              num_workers=workers, persistent_workers=workers > 0)
    test_loader = DataLoader(test_set, batch_size=1000, num_workers=workers)

    net = build_table1()
    optimizer = make_optimizer(hp["optimizer"], net.parameters(), hp["lr"], hp["momentum"],
                               hp["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(hp["schedule"], iters))
    losses, accs, test_accs = [], [], []
    step = 0
    start = time.perf_counter()
    while step < iters:
        for images, labels in train_loader:
            net.train()
            logits = net(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            accs.append((logits.argmax(1) == labels).float().mean().item())
            step += 1
            if step % eval_every == 0 or step == iters:
                net.eval()
                correct = 0
                with torch.no_grad():
                    for images, labels in test_loader:
                        correct += (net(images).argmax(1) == labels).sum().item()
                test_accs.append(correct / len(test_set))
            if step == iters:
                break
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_second": iters * batch_size / seconds,
            "test_acc": test_accs[-1]}
