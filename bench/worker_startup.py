"""What DataLoader workers cost at the start of every epoch, and what keeping them saves.

``python bench/worker_startup.py`` reads the demo's data as ``data.augment=batch`` does
(the 60,000 Fashion-MNIST training images in memory, raw uint8 with their index, batch
256, 2 workers) and, for the fork and forkserver start methods (forkserver is Python
3.14's default on Linux), with and without ``persistent_workers``, measures the wait
for each epoch's first batch over 4 epochs. Epoch 1 starts the workers in every case;
the figure is the median wait of epochs 2-4, and the ratio is new workers / kept
workers. Pre-training keeps its workers in ``batch`` mode (``TrainingViews.
workers_may_persist``). Writes runs/bench/worker_startup.json.
"""

import json
import multiprocessing
import statistics
import time

import torch
from benchkit import save_results
from torch.utils.data import DataLoader

from wcl.data import WithIndex, build_dataset

EPOCHS, BATCHES = 4, 10


def first_batch_waits(dataset, method: str, persistent: bool) -> list[float]:
    loader = DataLoader(
        dataset, batch_size=256, shuffle=True, num_workers=2, persistent_workers=persistent,
        multiprocessing_context=multiprocessing.get_context(method),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    waits = []
    for _ in range(EPOCHS):
        start = time.perf_counter()
        batches = iter(loader)
        next(batches)
        waits.append(time.perf_counter() - start)
        for _, _ in zip(range(BATCHES - 1), batches, strict=False):
            pass
        del batches  # non-persistent workers shut down here, as at an epoch's end
    return waits


def main() -> None:
    dataset = WithIndex(build_dataset("fashion_mnist", None, train=True, channels=1))
    rows = []
    for method in ("fork", "forkserver"):
        row = {"start_method": method}
        for persistent in (False, True):
            waits = first_batch_waits(dataset, method, persistent)
            key = "kept" if persistent else "new"
            row[f"{key}_first_epoch_s"] = waits[0]
            row[f"{key}_later_epochs_s"] = statistics.median(waits[1:])
        row["ratio"] = row["new_later_epochs_s"] / row["kept_later_epochs_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| start method | first epoch | later epochs, new workers | later epochs, kept | ratio |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['start_method']} | {r['new_first_epoch_s'] * 1e3:.0f} ms | "
              f"{r['new_later_epochs_s'] * 1e3:.0f} ms | {r['kept_later_epochs_s'] * 1e3:.0f} ms | "
              f"{r['ratio']:.0f}x |")  # fmt: skip
    save_results("worker_startup.json", rows)


if __name__ == "__main__":
    main()
