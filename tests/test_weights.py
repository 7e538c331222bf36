"""Weights in and out: release conversion, loading from every source, export, safe loading."""

import errno
import importlib.metadata
import json
import os
import re

import pytest
import torch
import torchvision
from evalkit import (
    FASHION_IDX,
    PHOTOS,
    float32,
    float32_default,  # noqa: F401 (autouse: float32 default dtype)
    malicious_checkpoint,
    tiny_checkpoint,
)
from safetensors.torch import load_file
from torch import nn

import wcl.export
from wcl.backbones import BACKBONES, build_backbone
from wcl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from wcl.cli import main
from wcl.export import OnnxUnavailableError, export_backbone
from wcl.model import WCL
from wcl.release import convert_release
from wcl.weights import infer_spec, load_backbone


class ReleaseHead(nn.Module):
    """A projection head with the release's layer names (linear1, bn1, ..., linear3)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim_in, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.relu1 = nn.ReLU()
        self.linear2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.relu2 = nn.ReLU()
        self.linear3 = nn.Linear(hidden, dim_out)

    def forward(self, x):
        x = self.relu1(self.bn1(self.linear1(x)))
        return self.linear3(self.relu2(self.bn2(self.linear2(x))))


def randomise(state: dict) -> dict:
    """Random values in every tensor (positive variances), so a mis-mapped buffer shows."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.randint(1, 1000, ())
        elif key.endswith("running_var"):
            out[key] = torch.rand_like(value) + 0.5
        else:
            out[key] = torch.randn_like(value) * (0.05 if value.ndim > 1 else 0.5)
    return out


def release_file(path, net_state, heads):
    """torch.save a dict with exactly the release layout (DDP 'module.' prefix)."""
    model = {f"module.net.{k}": v for k, v in net_state.items()}
    for name, head in heads.items():
        model.update({f"module.{name}.{k}": v for k, v in head.state_dict().items()})
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 4.8}]}
    torch.save({"model": model, "optimizer": optimizer, "epoch": 100}, path)
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release-layout ResNet-50 checkpoint with 4096/256 heads, and its converted form."""
    with float32():
        return make_release(tmp_path_factory)


def make_release(tmp_path_factory):
    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    net_state = randomise({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    heads = {}
    for name in ("head1", "head2"):
        head = ReleaseHead(2048, 4096, 256)
        head.load_state_dict(randomise(head.state_dict()))
        heads[name] = head.eval()
    tmp = tmp_path_factory.mktemp("release")
    src = release_file(tmp / "wcl-100.pth", net_state, heads)
    dst = tmp / "converted.pt"
    summary = convert_release(src, dst)
    return {"src": src, "dst": dst, "net": net_state, "heads": heads, "summary": summary}


def torchvision_features(name, state, x):
    net = getattr(torchvision.models, name)()
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    net.fc = nn.Identity()
    return net.eval()(x)


def test_convert_release_gives_torchvision_features_and_heads(release):
    assert release["summary"]["hidden_dim"] == 4096 and release["summary"]["out_dim"] == 256
    assert release["summary"]["release_epoch"] == 100
    ckpt = load_checkpoint(release["dst"])
    assert ckpt["kind"] == "converted"
    assert ckpt["config"]["model"]["backbone"] == "resnet50"
    assert ckpt["config"]["model"]["stem"] == "imagenet"
    assert (ckpt["config"]["model"]["hidden_dim"], ckpt["config"]["model"]["out_dim"]) == (
        4096,
        256,
    )
    x = torch.randn(2, 3, 64, 64)
    loaded = load_backbone(release["dst"])
    ours = loaded.module.eval()(x)
    assert ours.shape == (2, 2048)
    torch.testing.assert_close(ours, torchvision_features("resnet50", release["net"], x))
    # head1 -> g (instance head), head2 -> phi (graph head), layer by layer.
    feats = torch.randn(4, 2048)
    state = ckpt["model"]
    for theirs, mine in (("head1", "g"), ("head2", "phi")):
        head = nn.Sequential(
            nn.Linear(2048, 4096),
            nn.BatchNorm1d(4096),
            nn.ReLU(),
            nn.Linear(4096, 4096),
            nn.BatchNorm1d(4096),
            nn.ReLU(),
            nn.Linear(4096, 256),
        )
        head.load_state_dict(
            {k[len(mine) + 1 :]: v for k, v in state.items() if k.startswith(mine)}
        )
        torch.testing.assert_close(head.eval()(feats), release["heads"][theirs](feats))
    # The raw release file is also a backbone source.
    direct = load_backbone(release["src"])
    assert direct.source == "release"
    torch.testing.assert_close(direct.module.eval()(x), ours)


def test_converted_release_exports_to_torchvision(release, tmp_path):
    paths = export_backbone(release["dst"], tmp_path / "out")
    state = torch.load(paths["pt"], weights_only=True)
    x = torch.randn(2, 3, 64, 64)
    expected = load_backbone(release["dst"]).module.eval()(x)
    torch.testing.assert_close(torchvision_features("resnet50", state, x), expected)
    sidecar = json.loads(paths["json"].read_text())
    assert sidecar["torchvision_compatible"] is True
    assert sidecar["input"]["shape"] == ["batch", 3, 224, 224]
    assert "torchvision.models.resnet50()" in sidecar["rebuild"]["torchvision"]


def test_wcl_resnet18_exports_to_torchvision(tmp_path):
    torch.manual_seed(2)
    backbone = build_backbone("resnet18")  # ImageNet stem, 3 channels, width 64
    backbone.load_state_dict(randomise(backbone.state_dict()))
    model = WCL(backbone, 512, hidden_dim=16, out_dim=8)
    save_checkpoint({"kind": "pretrain", "model": model.state_dict()}, tmp_path / "r18.pt")
    paths = export_backbone(tmp_path / "r18.pt", tmp_path / "out", name="r18")
    assert paths["pt"].name == "r18.pt" and paths["json"].name == "r18.json"
    x = torch.randn(2, 3, 64, 64)
    state = torch.load(paths["pt"], weights_only=True)
    torch.testing.assert_close(torchvision_features("resnet18", state, x), backbone.eval()(x))


def test_convert_maps_sequential_heads_by_order(tmp_path, capsys):
    """Heads saved as Sequentials (indices 0, 1, 3, 4, 6) and a tiny backbone convert too."""
    torch.manual_seed(1)
    net = build_backbone("resnet10", "small", 1, 8)
    heads = {}
    for name in ("head1", "head2"):
        head = nn.Sequential(nn.Linear(64, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 24))
        head.extend([nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 12)])
        head.load_state_dict(randomise(head.state_dict()))
        heads[name] = head.eval()
    src = release_file(tmp_path / "r.pth", randomise(net.state_dict()), heads)
    assert main(["convert", str(src), str(tmp_path / "c.pt")]) == 0
    assert "heads 24/12" in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "c.pt")["model"]
    for theirs, mine in (("head1", "g"), ("head2", "phi")):
        for key, value in heads[theirs].state_dict().items():
            torch.testing.assert_close(state[f"{mine}.{key}"], value)


def test_convert_refuses_non_finite_weights(tmp_path, capsys):
    """A diverged release checkpoint is refused in one line naming the tensor; no file."""
    torch.manual_seed(1)
    net = build_backbone("resnet10", "small", 1, 8).state_dict()
    net["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    heads = {}
    for name in ("head1", "head2"):
        head = nn.Sequential(nn.Linear(64, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 24))
        heads[name] = head.extend([nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 12)])
    src = release_file(tmp_path / "r.pth", net, heads)
    assert main(["convert", str(src), str(tmp_path / "c.pt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'backbone.layer2.0.conv1.weight' holds NaN or Inf (1 of" in err[0]
    assert not (tmp_path / "c.pt").exists()


def test_convert_refuses_wrong_head_structure(tmp_path):
    net = build_backbone("resnet10", "small", 1, 8)
    bad = {"head1": nn.Sequential(nn.Linear(64, 8)), "head2": nn.Sequential(nn.Linear(64, 8))}
    src = release_file(tmp_path / "r.pth", net.state_dict(), bad)
    with pytest.raises(CheckpointError, match="Linear-BN-Linear-BN-Linear"):
        convert_release(src, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize(("stem", "channels", "width"), [("imagenet", 3, 64), ("small", 1, 8)])
def test_infer_spec_reads_every_backbone(name, stem, channels, width):
    spec = infer_spec(build_backbone(name, stem, channels, width).state_dict())
    assert (spec.name, spec.stem, spec.in_channels, spec.width) == (name, stem, channels, width)


def test_nonstandard_export_sidecar_safetensors_and_rebuild(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    paths = export_backbone(ckpt, tmp_path / "out")
    pt = torch.load(paths["pt"], weights_only=True)
    st = load_file(paths["safetensors"])
    assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in pt)
    assert not any(k.startswith("fc.") for k in pt)
    sidecar = json.loads(paths["json"].read_text())
    spec = sidecar["backbone"]
    assert sidecar["torchvision_compatible"] is False
    assert spec == {
        "name": "resnet10",
        "stem": "small",
        "in_channels": 1,
        "width": 8,
        "feature_dim": 64,
    }
    assert sidecar["input"]["shape"] == ["batch", 1, 28, 28]
    rebuilt = build_backbone(spec["name"], spec["stem"], spec["in_channels"], spec["width"])
    rebuilt.load_state_dict(pt, strict=True)
    x = torch.randn(3, 1, 28, 28)
    expected = load_backbone(ckpt).module.eval()(x)
    torch.testing.assert_close(rebuilt.eval()(x), expected)
    # Each exported file is itself a backbone source; the sidecar restores the input size.
    for kind in ("pt", "safetensors"):
        loaded = load_backbone(paths[kind])
        torch.testing.assert_close(loaded.module.eval()(x), expected)
        assert loaded.config["data"] == {"image_size": 28, "dataset": "fashion_mnist", "resize": 28}


def test_export_follows_the_umask_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    """Exported files are written as checkpoints are (wcl.atomic): with the mode a plain
    open() gives (0o666 less the umask), and a write that fails (here the disk fills while
    the safetensors file is synced) leaves the previous file, no .tmp- file and one line
    naming the file."""
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    out = tmp_path / "out"
    umask = os.umask(0o027)
    try:
        paths = export_backbone(ckpt, out)
    finally:
        os.umask(umask)
    assert {path.stat().st_mode & 0o777 for path in paths.values()} == {0o640}
    before = paths["safetensors"].read_bytes()
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(
        OSError, match=r"could not write file .*backbone\.safetensors: no space"
    ) as err:
        export_backbone(ckpt, out)
    assert err.value.errno == errno.ENOSPC
    assert paths["safetensors"].read_bytes() == before
    assert not list(out.glob(".tmp-*"))


def test_export_onnx_runs_like_the_backbone(tmp_path):
    import onnx
    from onnx.reference import ReferenceEvaluator

    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    if torch.__version__ < wcl.export.ONNX_MIN_TORCH:
        # An older torch (the minimum-versions run): a clear refusal, nothing written.
        with pytest.raises(OnnxUnavailableError, match=r"torch>=2\.7 \(found"):
            export_backbone(ckpt, tmp_path / "out", onnx=True)
        assert not (tmp_path / "out").exists()
        return
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--onnx"]) == 0
    model = onnx.load(tmp_path / "out" / "backbone.onnx")
    onnx.checker.check_model(model)
    x = torch.randn(3, 1, 28, 28)  # another batch size than the export's example
    (out,) = ReferenceEvaluator(model).run(None, {"images": x.numpy()})
    expected = load_backbone(ckpt).module.eval()(x)
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-4, rtol=1e-4)


def test_export_onnx_without_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a)
    )
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    with pytest.raises(OnnxUnavailableError, match="pip install onnx"):
        export_backbone(ckpt, tmp_path / "out", onnx=True)
    assert not (tmp_path / "out").exists()
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--onnx"]) == 1
    assert "pip install onnx" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("torch_version", "onnxscript_version", "refused"),
    [("2.6.0+cu124", "0.7.2", "torch>=2.7 (found 2.6.0+cu124)"),
     ("2.11.0", "0.5.0", "onnxscript>=0.7 (found 0.5.0)"),
     ("2.7.0", "0.7.0", None)],
)  # fmt: skip
def test_export_onnx_with_too_old_releases_is_a_clear_error(
    tmp_path, monkeypatch, torch_version, onnxscript_version, refused
):
    monkeypatch.setattr(torch, "__version__", torch_version)
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: onnxscript_version if name == "onnxscript" else real(name),
    )
    if refused is None:
        wcl.export._require_onnx()  # the oldest releases that work pass
        return
    ckpt = tiny_checkpoint(tmp_path / "pre.pt")
    with pytest.raises(OnnxUnavailableError, match=re.escape(refused)):
        export_backbone(ckpt, tmp_path / "out", onnx=True)
    assert not (tmp_path / "out").exists()


def test_malicious_pickle_is_refused_everywhere_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.pth", marker)
    good = tiny_checkpoint(tmp_path / "good.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_backbone(evil)
    with pytest.raises(CheckpointError, match="refused"):
        convert_release(evil, tmp_path / "c.pt")
    commands = [
        ["convert", str(evil), str(tmp_path / "c.pt")],
        ["export", str(evil), str(tmp_path / "out")],
        ["embed", "--checkpoint", str(evil), "--images", str(PHOTOS), "--out", str(tmp_path / "e")],
        ["knn-eval", "--config", "knn-small", "--checkpoint", str(evil)]
        + ["--set", f"data.root={FASHION_IDX}", "--set", f"run.out_dir={tmp_path / 'k'}"],
        ["linear-eval", "--config", "linear-small", "--checkpoint", str(good)]
        + ["--set", f"data.root={FASHION_IDX}", "--set", f"run.out_dir={tmp_path / 'l'}"]
        + ["--resume", str(evil)],
    ]
    for argv in commands:
        assert main(argv) == 1, argv
        assert "refused" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "c.pt").exists()
    # Positive control: the payload is live, so the refusals above did protect us.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_unreadable_and_foreign_files_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_backbone(junk)
    torch.save({"weights": {"a": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no ResNet backbone"):
        load_backbone(tmp_path / "other.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_backbone(tmp_path / "bad.safetensors")


def test_stride2_small_stem_survives_export_and_load(tmp_path):
    """The weights of a stride-1 and a stride-2 small stem look alike; the config decides."""
    from wcl.backbones import build_backbone
    from wcl.checkpoint import save_checkpoint
    from wcl.weights import load_backbone

    torch.manual_seed(0)
    backbone = build_backbone("resnet10", stem="small-s2", in_channels=1, width=8).eval()
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    config = {"model": {"backbone": "resnet10", "stem": "small-s2", "width": 8},
              "data": {"image_size": 28, "channels": 1, "dataset": "fashion_mnist"}}  # fmt: skip
    save_checkpoint({"kind": "pretrain", "model": state, "config": config}, tmp_path / "c.pt")
    loaded = load_backbone(tmp_path / "c.pt")
    assert loaded.spec.stem == "small-s2" and loaded.module.conv1.stride == (2, 2)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded.module.eval()(x), backbone(x), atol=1e-6)
