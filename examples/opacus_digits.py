#!/usr/bin/env python3
"""DP-SGD on scikit-learn's 8x8 digits with Opacus, in the style of Opacus's MNIST example
(``examples/mnist.py`` of the Opacus repository: the same structure and flags), runnable
offline. dpledger adds three lines, marked ``# dpledger: 1/3`` .. ``3/3``: they record every
example's gradient norm (the one Opacus clips with) and loss at every step it was sampled,
with the run's q, sigma, C and steps read from Opacus.

    python examples/opacus_digits.py --epochs 5 --sigma 1.0 -c 1.0 --ledger-db results.duckdb
    python examples/opacus_digits.py --grad-sample-mode ghost --virtual-batch-size 16
    dpledger account --run digits-convnet && dpledger rank --run digits-convnet --highest 5

Without ``--ledger-db``/``--ledger-lake`` the rows go to the project's lake (``lake/``
beside ``$DPLEDGER_DB`` or ``./dpledger.duckdb``).
"""

import argparse
import glob
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

import dpledger  # dpledger: 1/3


class SampleConvNet(nn.Module):
    """Opacus's MNIST SampleConvNet, sized for 8x8 images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        # x of shape [B, 1, 8, 8]
        x = F.relu(self.conv1(x))  # -> [B, 16, 8, 8]
        x = F.max_pool2d(x, 2, 2)  # -> [B, 16, 4, 4]
        x = F.relu(self.conv2(x))  # -> [B, 32, 4, 4]
        x = F.max_pool2d(x, 2, 2)  # -> [B, 32, 2, 2]
        x = x.view(-1, 32 * 2 * 2)  # -> [B, 128]
        x = F.relu(self.fc1(x))  # -> [B, 32]
        x = self.fc2(x)  # -> [B, 10]
        return x

    def name(self):
        return "SampleConvNet"


def digits_datasets():
    """scikit-learn's digits (1,797 8x8 images), 80/20 stratified split, normalised like MNIST."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = x_train.mean(), x_train.std()
    return (TensorDataset(torch.from_numpy((x_train - mean) / std), torch.from_numpy(y_train)),
            TensorDataset(torch.from_numpy((x_test - mean) / std), torch.from_numpy(y_test)))


def train(args, model, device, train_loader, optimizer, privacy_engine, criterion, epoch):
    model.train()
    losses = []

    def loop(loader):
        for _batch_idx, (data, target) in enumerate(loader):
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad()
            output = model(data)
            loss = criterion(output, target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

    if args.virtual_batch_size:
        with BatchMemoryManager(data_loader=train_loader, max_physical_batch_size=args.virtual_batch_size,
                                optimizer=optimizer) as memory_safe_loader:
            loop(memory_safe_loader)
    else:
        loop(train_loader)

    epsilon = privacy_engine.accountant.get_epsilon(delta=args.delta)
    print(f"Train Epoch: {epoch} \t Loss: {np.nanmean(losses):.6f} (ε = {epsilon:.2f}, δ = {args.delta})")


def test(model, device, test_loader):
    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.cross_entropy(output, target, reduction="sum").item()  # sum up batch loss
            pred = output.argmax(dim=1, keepdim=True)  # get the index of the max log-probability
            correct += pred.eq(target.view_as(pred)).sum().item()

    test_loss /= len(test_loader.dataset)
    print(f"\nTest set: Average loss: {test_loss:.4f}, "
          f"Accuracy: {correct}/{len(test_loader.dataset)} ({100.0 * correct / len(test_loader.dataset):.2f}%)\n")
    return correct / len(test_loader.dataset)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Opacus digits example (8x8, offline), recorded by dpledger",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-b", "--batch-size", type=int, default=64, metavar="B", help="Batch size")
    parser.add_argument("--test-batch-size", type=int, default=1024, metavar="TB", help="input batch size for testing")
    parser.add_argument("-n", "--epochs", type=int, default=10, metavar="N", help="number of epochs to train")
    parser.add_argument("--lr", type=float, default=0.5, metavar="LR", help="learning rate")
    parser.add_argument("--sigma", type=float, default=1.0, metavar="S", help="Noise multiplier")
    parser.add_argument("-c", "--max-per-sample-grad_norm", type=float, default=1.0, metavar="C",
                        help="Clip per-sample gradients to this norm")
    parser.add_argument("--delta", type=float, default=1e-5, metavar="D", help="Target delta")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="GPU ID for this process")
    parser.add_argument("--save-model", action="store_true", default=False, help="Save the trained model")
    parser.add_argument("--secure-rng", action="store_true", default=False,
                        help="Enable Secure RNG to have trustworthy privacy guarantees. "
                             "Comes at a performance cost")
    parser.add_argument("--accountant", type=str, default="prv", help="Accountant to use (rdp, prv, gdp)")
    parser.add_argument("--grad-sample-mode", type=str, default="hooks", choices=["hooks", "ghost"],
                        help="Per-sample gradients (hooks) or ghost clipping (ghost)")
    parser.add_argument("--virtual-batch-size", "--max-physical-batch-size", type=int, default=None,
                        help="Split each Poisson batch into physical batches of at most this size "
                             "(Opacus's BatchMemoryManager; one optimizer step per logical batch)")
    parser.add_argument("--seed", type=int, default=0, help="Random seed")
    parser.add_argument("--checkpoint-dir", type=str, default=None,
                        help="Save an Opacus checkpoint here after every epoch")
    parser.add_argument("--resume", action="store_true", default=False,
                        help="Continue from the last checkpoint in --checkpoint-dir")
    # where dpledger writes (default: the lake beside $DPLEDGER_DB or ./dpledger.duckdb)
    parser.add_argument("--ledger-db", type=str, default=None, help="dpledger: write into this DuckDB file")
    parser.add_argument("--ledger-lake", type=str, default=None, help="dpledger: write Parquet shards to this lake")
    parser.add_argument("--run", type=str, default="digits-convnet", help="dpledger: the run's name")
    parser.add_argument("--track-points", type=int, default=None,
                        help="dpledger: also track the first N examples every --track-every steps")
    parser.add_argument("--track-every", type=int, default=None, help="dpledger: steps between tracked-set norms")
    parser.add_argument("--ledger-commit-every", type=int, default=None,
                        help="dpledger: commit every N steps (default: every 5 seconds)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    train_set, test_set = digits_datasets()
    train_loader = DataLoader(train_set, batch_size=args.batch_size, num_workers=0, pin_memory=False)
    test_loader = DataLoader(test_set, batch_size=args.test_batch_size, shuffle=True, num_workers=0)

    model = SampleConvNet().to(device)
    optimizer = optim.SGD(model.parameters(), lr=args.lr, momentum=0)
    criterion = nn.CrossEntropyLoss()

    privacy_engine = PrivacyEngine(accountant=args.accountant, secure_mode=args.secure_rng)
    private = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        criterion=criterion,
        noise_multiplier=args.sigma,
        max_grad_norm=args.max_per_sample_grad_norm,
        grad_sample_mode=args.grad_sample_mode,
    )
    if args.grad_sample_mode == "ghost":
        model, optimizer, criterion, train_loader = private
    else:
        model, optimizer, train_loader = private

    first_epoch = 1
    if args.resume and args.checkpoint_dir:
        saved = sorted(glob.glob(os.path.join(args.checkpoint_dir, "epoch-*.pt")))
        if saved:
            checkpoint = privacy_engine.load_checkpoint(path=saved[-1], module=model, optimizer=optimizer)
            torch.set_rng_state(checkpoint["rng_state"])
            first_epoch = checkpoint["epoch"] + 1
            print(f"Resumed from {saved[-1]} (epoch {checkpoint['epoch']})")

    ledger = dpledger.track(privacy_engine, model, optimizer, train_loader, run=args.run, criterion=criterion, db=args.ledger_db, lake=args.ledger_lake, dataset="sklearn-digits", epochs=args.epochs, delta=args.delta, points=args.track_points, every=args.track_every, resume=args.resume, commit_every=args.ledger_commit_every)  # dpledger: 2/3

    for epoch in range(first_epoch, args.epochs + 1):
        train(args, model, device, train_loader, optimizer, privacy_engine, criterion, epoch)
        if args.checkpoint_dir:
            os.makedirs(args.checkpoint_dir, exist_ok=True)
            privacy_engine.save_checkpoint(path=os.path.join(args.checkpoint_dir, f"epoch-{epoch:04d}.pt"),
                                           module=model, optimizer=optimizer,
                                           checkpoint_dict={"epoch": epoch, "rng_state": torch.get_rng_state()})
    accuracy = test(model, device, test_loader)

    ledger.close()  # dpledger: 3/3

    if args.save_model:
        torch.save(model.state_dict(), f"digits_cnn_{args.sigma}_{args.max_per_sample_grad_norm}.pt")
    return accuracy


if __name__ == "__main__":
    main()
