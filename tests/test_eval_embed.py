"""wcl embed: embeddings of a folder of images, saved as .npy plus the list of paths."""

import os

import numpy as np
import torch
from evalkit import (
    FASHION_PNG,
    PHOTOS,
    float32_default,  # noqa: F401 (autouse: float32 default dtype)
    tiny_checkpoint,
)

from wcl.cli import main
from wcl.data import ImageFolderDataset
from wcl.eval.config import EvalData
from wcl.eval.data import eval_transform
from wcl.weights import load_backbone


def test_embed_writes_rows_in_path_order(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    argv = ["embed", "--checkpoint", str(ckpt), "--images", str(PHOTOS)]
    assert main(argv + ["--out", str(tmp_path / "e"), "--no-progress", "--batch-size", "4"]) == 0
    assert "6 x 64 embeddings" in capsys.readouterr().out
    emb = np.load(tmp_path / "e.npy")
    paths = (tmp_path / "e.txt").read_text().splitlines()
    assert emb.shape == (6, 64) and emb.dtype == np.float32
    assert [p.rsplit("/", 1)[-1] for p in paths] == sorted(p.name for p in PHOTOS.glob("*.*g"))
    # Row i is the backbone's features of image i: greyscale, 28 px centre crop (the
    # pre-training size), Fashion-MNIST statistics.
    backbone = load_backbone(ckpt).module.eval()
    dataset = ImageFolderDataset(PHOTOS, channels=1)
    transform = eval_transform(EvalData(dataset="fashion_mnist", image_size=28), 1)
    with torch.no_grad():
        expected = backbone(torch.stack([transform(dataset[i][0]) for i in range(6)]))
    np.testing.assert_allclose(emb, expected.numpy(), rtol=1e-5, atol=1e-6)

    assert main(argv + ["--out", str(tmp_path / "n.npy"), "--normalize", "--no-progress"]) == 0
    unit = np.load(tmp_path / "n.npy")
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(unit, emb / np.linalg.norm(emb, axis=1, keepdims=True), rtol=1e-5)
    assert (tmp_path / "n.txt").read_text().splitlines() == paths


def test_embed_files_follow_the_umask(tmp_path):
    """The array and the path list are written through wcl.atomic, as checkpoints are:
    the mode a plain open() gives, 0o666 less the umask."""
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    argv = ["embed", "--checkpoint", str(ckpt), "--images", str(PHOTOS), "--no-progress"]
    umask = os.umask(0o077)
    try:
        assert main(argv + ["--out", str(tmp_path / "e")]) == 0
    finally:
        os.umask(umask)
    for name in ("e.npy", "e.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".tmp-*"))


def test_embed_class_folders_recursively(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    out = tmp_path / "sub" / "fashion.npy"
    argv = ["embed", "--checkpoint", str(ckpt), "--images", str(FASHION_PNG), "--out", str(out)]
    assert main(argv + ["--no-progress"]) == 0
    assert np.load(out).shape == (300, 64)
    assert len((tmp_path / "sub" / "fashion.txt").read_text().splitlines()) == 300


def test_embed_missing_folder_is_a_clear_error(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    argv = ["embed", "--checkpoint", str(ckpt), "--images", str(tmp_path / "none")]
    assert main(argv + ["--out", str(tmp_path / "e")]) == 1
    assert "does not exist" in capsys.readouterr().err
