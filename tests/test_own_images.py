"""A folder of one's own images through every command: no output ever holds a substitute.

A broken file gets no embedding row and no place in an accuracy: each command's figures
on a folder with broken files equal the same command's on a copy without them.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from evalkit import (
    FASHION_PNG,
    float32_default,  # noqa: F401 (autouse: float32 default dtype)
    tiny_checkpoint,
)

from wcl.cli import main

NON_UTF8 = os.fsdecode(b"caf\xe9 \xff.png")  # Latin-1 bytes: not UTF-8


def _copy_split(target: Path, per_class: int, offset: int) -> None:
    for folder in sorted(FASHION_PNG.iterdir()):
        files = sorted(folder.glob("*.png"))[offset : offset + per_class]
        (target / folder.name).mkdir(parents=True)
        for f in files:
            shutil.copy(f, target / folder.name / f.name)


@pytest.fixture()
def folders(tmp_path):
    """(clean, dirty): train/ and val/ class folders of fixture PNGs; ``dirty`` also holds a
    truncated PNG and an empty file in each split, and a readable image whose name is not
    UTF-8 in both (so that the two folders differ only by the broken files)."""
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    for root in (clean, dirty):
        _copy_split(root / "train", 12, 0)
        _copy_split(root / "val", 6, 12)
        source = next((root / "train" / "Bag").glob("*.png"))
        shutil.copy(source, root / "train" / "Bag" / NON_UTF8)
    for split in ("train", "val"):
        good = next((dirty / split / "Coat").glob("*.png")).read_bytes()
        (dirty / split / "Coat" / "truncated.png").write_bytes(good[: len(good) // 2])
        (dirty / split / "Shirt" / "empty.png").write_bytes(b"")
    return clean, dirty


def test_embed_leaves_broken_files_out_and_lists_them(tmp_path, folders, capsys):
    clean, dirty = folders
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    for name, root in (("clean", clean), ("dirty", dirty)):
        argv = ["embed", "--checkpoint", str(ckpt), "--images", str(root / "train")]
        assert main(argv + ["--out", str(tmp_path / name), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 files did not decode" in out and "dirty.skipped.jsonl" in out
    # Rows: the readable images only, each its own vector (equal to the clean folder's).
    np.testing.assert_array_equal(np.load(tmp_path / "dirty.npy"), np.load(tmp_path / "clean.npy"))
    lines = (tmp_path / "dirty.txt").read_bytes().splitlines()
    clean_lines = (tmp_path / "clean.txt").read_bytes().splitlines()
    assert [Path(os.fsdecode(x)).relative_to(dirty) for x in lines] == [
        Path(os.fsdecode(x)).relative_to(clean) for x in clean_lines
    ]
    # The name that is not UTF-8 is written as its bytes.
    assert any(line.endswith(b"caf\xe9 \xff.png") for line in lines)
    skipped = [json.loads(x) for x in (tmp_path / "dirty.skipped.jsonl").read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in skipped) == ["empty.png", "truncated.png"]
    assert {r["reason"] for r in skipped} <= {"zero-byte", "truncated", "undecodable"}
    assert not (tmp_path / "clean.skipped.jsonl").exists()
    # Embedding the clean folder under the dirty name removes the stale list.
    argv = ["embed", "--checkpoint", str(ckpt), "--images", str(clean / "train")]
    assert main(argv + ["--out", str(tmp_path / "dirty"), "--no-progress"]) == 0
    assert not (tmp_path / "dirty.skipped.jsonl").exists()


def _eval(command, config, ckpt, root, out, *extra):
    argv = [command, "--config", config, "--checkpoint", str(ckpt)]
    for key in ("data.dataset=folder", f"data.root={root}", f"run.out_dir={out}",
                "data.workers=0", "run.progress=false", *extra):  # fmt: skip
        argv += ["--set", key]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_knn_eval_scores_no_substitute(tmp_path, folders):
    clean, dirty = folders
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    want = _eval("knn-eval", "knn-small", ckpt, clean, tmp_path / "k-clean", "knn.k=[20, 5]")
    got = _eval("knn-eval", "knn-small", ckpt, dirty, tmp_path / "k-dirty", "knn.k=[20, 5]")
    assert got["skipped_images"] == {"train": 2, "test": 2, "list": "skipped.jsonl"}
    assert want["skipped_images"]["train"] == want["skipped_images"]["test"] == 0
    assert got["train_images"] == want["train_images"] == 10 * 12 + 1
    assert got["test_images"] == want["test_images"] == 10 * 6
    for k in ("k20", "k5"):
        assert got[k] == want[k]
    listed = (tmp_path / "k-dirty" / "skipped.jsonl").read_text()
    assert "truncated.png" in listed and "empty.png" in listed


@pytest.mark.parametrize("mode", ["fast", "protocol"])
def test_linear_eval_scores_no_substitute(tmp_path, folders, mode):
    clean, dirty = folders
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    extra = [f"linear.mode={mode}", "linear.epochs=2", "linear.batch_size=32"]
    want = _eval("linear-eval", "linear-small", ckpt, clean, tmp_path / "l-clean", *extra)
    got = _eval("linear-eval", "linear-small", ckpt, dirty, tmp_path / "l-dirty", *extra)
    assert got["skipped_images"] == {"train": 2, "test": 2, "list": "skipped.jsonl"}
    assert got["history"][-1]["test_images"] == want["history"][-1]["test_images"] == 60
    if mode == "fast":  # the same readable features in the same order: the same classifier
        assert got["final"] == want["final"]


def test_finetune_counts_broken_test_files(tmp_path, folders):
    _, dirty = folders
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    extra = ["finetune.fraction=0.5", "finetune.epochs=1", "finetune.batch_size=16"]
    got = _eval("finetune", "finetune-small", ckpt, dirty, tmp_path / "f", *extra)
    assert got["skipped_images"]["test"] == 2
    assert got["history"][-1]["test_images"] == 60


def test_check_data_and_pretraining_take_a_name_that_is_not_utf8(tmp_path, folders, capsys):
    clean, _ = folders
    assert main(["check-data", str(clean / "train"), "--channels", "1"]) == 0
    argv = ["pretrain", "--config", "fashion-mnist-demo"]
    for key in (f"data.root={clean / 'train'}", "data.dataset=folder", "data.augment=loader",
                "data.workers=0", "model.backbone=resnet10", "model.width=8",
                "model.hidden_dim=32", "model.out_dim=16", "train.epochs=1",
                "train.batch_size=32", "train.knn_every=1", f"train.out_dir={tmp_path / 'run'}"):  # fmt: skip
        argv += ["--set", key]
    assert main(argv) == 0
    assert (tmp_path / "run" / "last.pt").is_file()


def _folder_checkpoint(path: Path, root: Path, size: int, stem: str) -> Path:
    """A pre-training checkpoint of an RGB ResNet-10 (width 8) pre-trained, as its config
    says, on the image folder ``root`` at ``size`` px."""
    import torch

    from wcl.backbones import build_backbone
    from wcl.checkpoint import save_checkpoint
    from wcl.config import load_config
    from wcl.model import WCL

    torch.manual_seed(0)
    backbone = build_backbone("resnet10", stem, 3, 8)
    model = WCL(backbone, backbone.feature_dim, hidden_dim=32, out_dim=16)
    cfg = load_config("fashion-mnist-demo", [
        "data.dataset=folder", f"data.root={root}", "data.channels=3", f"data.image_size={size}",
        f"model.stem={stem}", "model.width=8", "model.hidden_dim=32", "model.out_dim=16",
        "data.augment=loader",
    ])  # fmt: skip
    save_checkpoint({"kind": "pretrain", "model": model.state_dict(), "config": cfg.to_dict(),
                     "epoch": 1}, path)  # fmt: skip
    return path


def test_evaluation_takes_its_data_from_the_checkpoint(tmp_path, folders, capsys):
    """A backbone pre-trained on a folder at 32 px RGB is evaluated on that folder at 32 px
    with the folder's (ImageNet) statistics, with no data key given; it says so."""
    clean, _ = folders
    ckpt = _folder_checkpoint(tmp_path / "pre.pt", clean, 32, "small")
    out = tmp_path / "knn"
    argv = ["knn-eval", "--config", "knn-small", "--checkpoint", str(ckpt), "--set",
            f"run.out_dir={out}", "--set", "data.workers=0", "--set", "run.progress=false",
            "--set", "knn.k=[20, 5]"]  # fmt: skip
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert f"knn-eval: evaluating on folder ({clean}), 3 channel(s), resize 32 + centre " in said
    assert "(as pre-trained)" in said
    data = json.loads((out / "results.json").read_text())["config"]["data"]
    assert (data["dataset"], data["root"], data["image_size"], data["resize"], data["stats"]) == (
        "folder",
        str(clean),
        32,
        32,
        "imagenet",
    )
    # An override that contradicts the checkpoint: a warning (size) or an error (channels).
    assert main([*argv, "--set", "data.image_size=28"]) == 0
    assert "differs from the 32 px the backbone" in capsys.readouterr().err
    assert main([*argv, "--set", "data.channels=1"]) == 2
    assert "'data.channels' is 1 but the backbone" in capsys.readouterr().err
    # A checkpoint that cannot say (an exported state dict without its JSON): name the key.
    assert main(["export", str(ckpt), str(tmp_path / "exp")]) == 0
    (tmp_path / "exp" / "backbone.json").unlink()
    argv[4] = str(tmp_path / "exp" / "backbone.pt")
    assert main(argv) == 2
    assert "'data.dataset' is not set" in capsys.readouterr().err


def test_backbone_json_alone_reproduces_embed(tmp_path, capsys):
    """torchvision ops chosen from backbone.json's preprocessing, and the backbone rebuilt
    as the JSON says from the safetensors file, give wcl embed's rows (ImageNet stem at
    64 px: Resize(73) + CenterCrop(64), the photos' sizes all differ)."""
    import torch
    from safetensors.torch import load_file
    from torchvision.transforms.v2 import functional as TF

    from wcl.backbones import build_backbone
    from wcl.data import ImageFolderDataset

    photos = Path(__file__).parent / "fixtures" / "photos"
    ckpt = _folder_checkpoint(tmp_path / "pre.pt", photos, 64, "imagenet")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "backbone.onnx").write_bytes(b"an earlier export's file")
    assert main(["export", str(ckpt), str(tmp_path / "exp")]) == 0
    assert not (tmp_path / "exp" / "backbone.onnx").exists()  # not written this time
    argv = ["embed", "--checkpoint", str(ckpt), "--images", str(photos)]
    assert main([*argv, "--out", str(tmp_path / "emb"), "--no-progress"]) == 0
    want = np.load(tmp_path / "emb.npy")

    info = json.loads((tmp_path / "exp" / "backbone.json").read_text())
    prep = info["input"]["preprocessing"]
    assert prep["steps"] == ["channels", "resize", "center_crop", "scale", "normalize"]
    assert (prep["resize"]["short_side"], prep["center_crop"]) == (73, 64)
    b = info["backbone"]
    net = build_backbone(b["name"], b["stem"], b["in_channels"], b["width"]).eval()
    net.load_state_dict(load_file(tmp_path / "exp" / "backbone.safetensors"))
    rows = []
    for path in sorted(p for p in photos.iterdir()):
        image = ImageFolderDataset(photos, channels=3).samples  # the decoder embed uses
        image = next(ImageFolderDataset(photos, channels=3)[i][0] for i, (p, _) in
                     enumerate(image) if p == str(path))  # fmt: skip
        if prep["channels"]["count"] == 1:
            image = TF.rgb_to_grayscale(image)
        image = TF.resize(
            image, prep["resize"]["short_side"], antialias=prep["resize"]["antialias"]
        )
        image = TF.center_crop(image, prep["center_crop"]).float() / 255
        norm = prep["normalize"]
        image = TF.normalize(image, norm["mean"], norm["std"])
        with torch.no_grad():
            rows.append(net(image[None])[0].numpy())
    np.testing.assert_allclose(np.stack(rows), want, atol=1e-5, rtol=1e-5)
