"""Config loading, overrides and validation errors that name the key."""

import pytest
import yaml

from wcl.config import PRESET_DIR, Config, ConfigError, config_from_dict, load_config


def test_every_shipped_preset_loads(tmp_path):
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert {"imagenet-r50-100ep", "imagenet-r50-200ep", "imagenet-r50-800ep", "cifar10-r18"} <= set(
        names
    )
    assert "fashion-mnist-demo" in names
    for name in names:
        cfg = load_config(name, [f"data.root={tmp_path}"] if "fashion" not in name else [])
        assert isinstance(cfg, Config)


def test_release_recipe_values(tmp_path):
    cfg = load_config("imagenet-r50-200ep", [f"data.root={tmp_path}"])
    assert (cfg.model.backbone, cfg.model.hidden_dim, cfg.model.out_dim) == ("resnet50", 4096, 256)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (200, 4096, 0.075)
    assert (cfg.optim.weight_decay, cfg.optim.warmup_epochs, cfg.model.temperature) == (
        1e-6,
        10.0,
        0.1,
    )
    paper = load_config("imagenet-r50-100ep-paper", [f"data.root={tmp_path}"])
    assert (paper.model.hidden_dim, paper.model.out_dim, paper.train.epochs) == (2048, 128, 100)


def test_overrides_and_base_chain(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump({"train": {"epochs": 7, "batch_size": 64}, "optim": {"warmup_epochs": 1}})
    )
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain:\n  epochs: 9\n")
    cfg = load_config(child, ["optim.lr=0.5", "model.sync_bn=false", "data.subset=100"])
    assert (cfg.train.epochs, cfg.train.batch_size) == (9, 64)
    assert (cfg.optim.lr, cfg.model.sync_bn, cfg.data.subset) == (0.5, False, 100)


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"optim": {"lrr": 1.0}}, "optim.lrr"),
        ({"optimiser": {}}, "optimiser"),
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"epochs": True}}, "train.epochs"),
        ({"model": {"backbone": "vgg"}}, "model.backbone"),
        ({"model": {"gather": "fast"}}, "model.gather"),
        ({"optim": {"lr": float("nan")}}, "optim.lr"),
        ({"optim": {"momentum": 1.5}}, "optim.momentum"),
        ({"data": {"channels": 2}}, "data.channels"),
        ({"model": {"graph_k": 8}, "train": {"batch_size": 8}}, "model.graph_k"),
        ({"data": {"image_size": 16}, "model": {"stem": "imagenet"}}, "data.image_size"),
        ({"data": {"dataset": "folder"}}, "data.root"),
        ({"data": {"channels": 3}}, "data.channels"),
        ({"data": {"dataset": "cifar10", "channels": 1}}, "data.channels"),
        ({"data": {"root": "/no/such/dir"}}, "data.root"),
        ({"optim": {"warmup_epochs": 20}, "train": {"epochs": 10}}, "optim.warmup_epochs"),
        ({"data": {"small_crops": -1}}, "data.small_crops"),
        ({"data": {"small_crops": 2, "small_min_scale": 0.5}}, "data.small_min_scale"),
        ({"data": {"small_crops": 2, "small_max_scale": 1.5}}, "data.small_max_scale"),
        ({"data": {"small_crops": 2, "small_size": 4}}, "data.small_size"),
        (
            {"data": {"small_crops": 2, "image_size": 64}, "model": {"stem": "imagenet"}},
            "data.small_size",
        ),
        (
            {"data": {"small_crops": 2}, "model": {"small_k": 8}, "train": {"batch_size": 8}},
            "model.small_k",
        ),
        ({"model": {"small_weight": -1.0}}, "model.small_weight"),
    ],
)
def test_validation_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(raw)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("fashion-mnist-demo", ["epochs=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_int_accepted_for_float_and_round_trip():
    cfg = config_from_dict({"optim": {"lr": 1}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_config_loads_without_torch_and_knows_every_augment_mode():
    """wcl.config stays torch-free (``wcl --help`` is instant), so it writes the augment
    modes out: they must be the data code's."""
    import subprocess
    import sys

    code = "import sys, wcl.config; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
    from wcl.config import CHOICES
    from wcl.data.views import AUGMENT_MODES

    assert CHOICES["data.augment"] == AUGMENT_MODES


def test_package_exports_resolve_lazily():
    import wcl

    assert sorted(wcl.__all__) == sorted(wcl._HOMES)
    assert all(callable(getattr(wcl, name)) for name in wcl.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        wcl.nope  # noqa: B018


def test_yaml_reads_off_as_a_word_and_exponents_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) would read ``off`` as False and ``1e-6`` as a string, so
    ``train.amp=off`` and ``optim.weight_decay=1e-6`` failed their type checks; both
    overrides and files now follow YAML 1.2 on these two points."""
    from wcl.eval.config import load_eval_config

    cfg = load_config("fashion-mnist-demo", ["train.amp=off", "optim.weight_decay=1e-6",
                                             "optim.lr=2.5E+1", "model.sync_bn=false"])  # fmt: skip
    assert (cfg.train.amp, cfg.optim.weight_decay, cfg.optim.lr) == ("off", 1e-6, 25.0)
    assert cfg.model.sync_bn is False
    path = tmp_path / "c.yaml"
    path.write_text("base: " + str(PRESET_DIR / "fashion-mnist-demo.yaml") +
                    "\ntrain: {amp: off, seed: 7}\noptim: {final_lr: 5e-4}\n")  # fmt: skip
    cfg = load_config(path)
    assert (cfg.train.amp, cfg.train.seed, cfg.optim.final_lr) == ("off", 7, 5e-4)
    (tmp_path / "x.pt").touch()
    overrides = ["run.amp=off", f"run.checkpoint={tmp_path / 'x.pt'}"]
    assert load_eval_config("knn", "knn-small", overrides).run.amp == "off"
    # A YAML 1.1 boolean spelling for a boolean key is named, not silently read.
    with pytest.raises(ConfigError, match=r"'model.sync_bn' must be bool, got 'yes'"):
        load_config("fashion-mnist-demo", ["model.sync_bn=yes"])
    # The saved config (yaml.safe_dump quotes 'off') reads back the same.
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(path) == cfg


def test_a_leading_tilde_in_a_path_key_is_the_home_folder(tmp_path, monkeypatch):
    """A shell does not expand ``~`` inside ``--set data.root=~/data``; wcl does, for the
    keys that name files and folders (and only there)."""
    from wcl.eval.config import load_eval_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "ck.pt").touch()
    cfg = load_config("fashion-mnist-demo", ["data.root=~/data", "train.out_dir=~/runs/a"])
    assert (cfg.data.root, cfg.train.out_dir) == (str(tmp_path / "data"), str(tmp_path / "runs/a"))
    ev = load_eval_config("knn", "knn-small", ["run.checkpoint=~/ck.pt", "run.out_dir=~/ev"])
    assert (ev.run.checkpoint, ev.run.out_dir) == (str(tmp_path / "ck.pt"), str(tmp_path / "ev"))
    with pytest.raises(ConfigError, match="must be one of"):  # other keys: taken as written
        load_config("fashion-mnist-demo", ["model.backbone=~/resnet50"])


def test_misspelt_keys_and_values_get_a_suggestion():
    from wcl.eval.config import load_eval_config

    for override, message in (
        ("train.epoch=3", "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
        ("trian.epochs=3", "unknown config section 'trian' (did you mean 'train'?)"),
        ("data.augment=bach", "got 'bach' (did you mean 'batch'?)"),
        ("train.zzz=3", "unknown config key 'train.zzz'; valid keys in 'train'"),  # none close
    ):
        with pytest.raises(ConfigError) as err:
            load_config("fashion-mnist-demo", [override])
        assert message in str(err.value)
    with pytest.raises(ConfigError, match=r"got 'fp61' \(did you mean 'fp16'\?\)"):
        load_eval_config("knn", "knn-small", ["run.amp=fp61"])


# The keys wcl.rundir.MAY_CHANGE_ON_RESUME and wcl.eval.common._RESUMABLE_CHANGES listed by
# hand before the flag moved into the key declarations: the regression reference.
RUN_RESUME_KEYS = {
    "data.root", "data.workers", "data.download", "train.out_dir", "train.device",
    "train.dist_backend", "train.checkpoint_every", "train.checkpoint_every_steps",
    "train.log_every", "train.threads", "train.knn_every", "train.knn_k", "train.knn_t",
    "train.knn_bank", "train.knn_queries", "train.deterministic",
}  # fmt: skip
EVAL_RESUME_KEYS = {
    "data.workers", "run.device", "run.dist_backend", "run.threads", "run.out_dir",
    "run.progress", "run.eval_batch_size", "linear.eval_every", "linear.checkpoint_every",
    "finetune.eval_every", "finetune.checkpoint_every",
}  # fmt: skip


def test_the_keys_that_may_change_on_resume_come_from_the_declarations():
    from wcl.config import MAY_CHANGE_ON_RESUME
    from wcl.config_schema import resume_ok_keys
    from wcl.eval.config import KINDS

    assert MAY_CHANGE_ON_RESUME == RUN_RESUME_KEYS
    assert set().union(*(resume_ok_keys(cls) for cls in KINDS.values())) == EVAL_RESUME_KEYS


def _config_classes():
    from wcl.eval.config import KINDS

    return [Config, *KINDS.values()]


def test_every_key_is_declared_with_help():
    import dataclasses

    from wcl.config_schema import key_info, sections

    for cls in _config_classes():
        for name, section in sections(cls).items():
            for f in dataclasses.fields(section):
                assert key_info(f).help.strip(), f"{cls.__name__} {name}.{f.name}"


def test_shared_keys_have_one_declaration():
    """The eval configs' amp, device, ... are pre-training's declarations, not copies."""
    from wcl.config_schema import schema
    from wcl.eval.config import LinearConfig

    pre, ev = schema(Config), schema(LinearConfig)
    for a, b in [("train.amp", "run.amp"), ("train.device", "run.device"),
                 ("train.dist_backend", "run.dist_backend"), ("train.threads", "run.threads"),
                 ("train.seed", "run.seed"), ("data.workers", "data.workers")]:  # fmt: skip
        assert pre[a] == ev[b], (a, b)


def test_the_key_tables_list_every_key_once():
    """One table per section dataclass of every config (the eval configs share data and
    run), each listing every key of its section exactly once."""
    import dataclasses
    import re
    import subprocess
    import sys

    from wcl.config_docs import TABLES, _config_class, key_table_markdown
    from wcl.config_schema import sections

    text = key_table_markdown()
    blocks = text.split("\n### ")
    assert len(blocks) == len(TABLES)
    tabled = set()
    for block, (name, (_, cls_name, section)) in zip(blocks, TABLES.items(), strict=True):
        assert (
            key_table_markdown(name).removeprefix("### ").strip()
            == block.removeprefix("### ").strip()
        )
        listed = re.findall(r"^\| `([\w.]+)` \|", block, flags=re.M)
        cls = sections(_config_class(cls_name))[section]
        assert listed == [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
        tabled.add(cls)
    assert tabled == {s for c in _config_classes() for s in sections(c).values()}
    with pytest.raises(ValueError, match="unknown key table"):
        key_table_markdown("nope")
    cmd = [sys.executable, "-m", "wcl.config_docs", "train"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert done.stdout == key_table_markdown("train")
