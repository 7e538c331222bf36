"""Broken and odd image files: real faults written into tmp_path next to real fixture images."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from wcl.data import (
    BrokenImageWarning,
    ImageFolderDataset,
    NoReadableImageError,
    TwoViews,
    check_data,
    decode_image,
    eval_pipeline,
    first_readable,
    read_image,
    read_skip_log,
)

FIXTURES = Path(__file__).parent / "fixtures"
PHOTOS = FIXTURES / "photos"
# Pillow 10.3 and later open a 16-bit greyscale PNG as "I;16", older releases as 32-bit "I".
GREY16 = "I;16" if tuple(map(int, PIL.__version__.split(".")[:2])) >= (10, 3) else "I"
FASHION = FIXTURES / "fashion"


# --------------------------------------------------------------------------- fixtures


def _half(source: Path, dest: Path) -> Path:
    """A real image file cut in half, as an interrupted copy leaves it."""
    raw = source.read_bytes()
    dest.write_bytes(raw[: len(raw) // 2])
    return dest


def _upright_photo() -> Image.Image:
    """A real, non-square RGB photo (96 x 64), so a missed rotation changes the shape."""
    with Image.open(PHOTOS / "china.jpg") as img:
        return img.convert("RGB")


def _write_odd(folder: Path) -> dict[str, str]:
    """One file per odd mode into ``folder``; returns ``{file name: PIL mode on disk}``."""
    folder.mkdir(parents=True)
    photo = _upright_photo()
    photo.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    _palette_with_transparency().save(folder / "palette_trns.png", transparency=0)
    photo.quantize(32).save(folder / "palette.png")
    Image.fromarray(_ramp16()).save(folder / "grey16.png")
    Image.fromarray(_rgba_array()).save(folder / "rgba.png")
    Image.fromarray(_rgba_array()[:, :, [0, 3]], mode="LA").save(folder / "la.png")
    Image.fromarray(_checkerboard()).convert("1").save(folder / "bilevel.png")
    Image.fromarray(_float_ramp()).save(folder / "float.tif")
    _save_rotated(photo, folder / "rotated.jpg")
    return {
        "cmyk.jpg": "CMYK",
        "palette_trns.png": "P",
        "palette.png": "P",
        "grey16.png": GREY16,
        "rgba.png": "RGBA",
        "la.png": "LA",
        "bilevel.png": "1",
        "float.tif": "F",
        "rotated.jpg": "RGB",
    }


def _palette_with_transparency() -> Image.Image:
    """8 x 6 palette image: left half index 0 (red, fully transparent), right half blue."""
    img = Image.new("P", (8, 6), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (3 * 254))
    img.paste(1, (4, 0, 8, 6))
    return img


def _ramp16() -> np.ndarray:
    """256 x 256 uint16 holding every value 0..65535 once."""
    return np.arange(65536, dtype=np.uint16).reshape(256, 256)


def _rgba_array() -> np.ndarray:
    """4 x 3 RGBA: a colour per column, alpha 0 / 128 / 255 / 255 per row."""
    colours = np.array([[200, 40, 10], [0, 255, 0], [30, 30, 220]], dtype=np.uint8)
    alpha = np.array([0, 128, 255, 255], dtype=np.uint8)
    rgba = np.zeros((4, 3, 4), dtype=np.uint8)
    rgba[:, :, :3] = colours[None]
    rgba[:, :, 3] = alpha[:, None]
    return rgba


def _on_white(rgba: np.ndarray) -> np.ndarray:
    """Expected composite of ``(..., 4)`` uint8 RGBA onto white, uint8 ``(..., 3)``."""
    colour = rgba[..., :3].astype(np.float64)
    alpha = rgba[..., 3:].astype(np.float64) / 255
    return np.rint(colour * alpha + 255 * (1 - alpha)).astype(np.uint8)


def _checkerboard() -> np.ndarray:
    return ((np.indices((6, 10)).sum(0) % 2) * 255).astype(np.uint8)


def _float_ramp() -> np.ndarray:
    return np.linspace(0.0, 1.0, 12 * 20, dtype=np.float32).reshape(12, 20)


def _save_rotated(upright: Image.Image, path: Path) -> None:
    """Store ``upright`` turned 90 degrees left with EXIF Orientation 6 ("turn right to view")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)


BAD = {
    "photos/00_truncated.jpg": "truncated",
    "photos/01_truncated.png": "truncated",
    "fashion/not_really.png": "not an image",
    "photos/zz_empty.jpg": "zero-byte",  # the very last sample: substitution must wrap
}


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """``fashion/`` (5 real PNGs), ``photos/`` (6 real photos) and ``odd/``, plus BAD."""
    root = tmp_path / "mixed"
    (root / "fashion").mkdir(parents=True)
    for png in sorted((FASHION / "Bag").glob("*.png"))[:5]:
        shutil.copy(png, root / "fashion" / png.name)
    shutil.copytree(PHOTOS, root / "photos")
    _write_odd(root / "odd")
    _half(PHOTOS / "china.jpg", root / "photos" / "00_truncated.jpg")
    _half(PHOTOS / "astronaut.png", root / "photos" / "01_truncated.png")
    (root / "fashion" / "not_really.png").write_text("a text file with an image extension\n")
    (root / "photos" / "zz_empty.jpg").write_bytes(b"")
    return root


def _bad_paths(root: Path) -> dict[str, str]:
    return {str(root / rel): reason for rel, reason in BAD.items()}


def _expected_source(ds: ImageFolderDataset, index: int, bad: set[str]) -> int:
    """The index that serves ``index``: the next sample (wrapping) whose file is not bad."""
    n = len(ds)
    return next((index + s) % n for s in range(n) if ds.samples[(index + s) % n][0] not in bad)


def _assert_substituted(ds: ImageFolderDataset, index: int, item: tuple, bad: set[str]) -> None:
    image, target = item
    source = _expected_source(ds, index, bad)
    path, source_target = ds.samples[source]
    assert path not in bad and target == source_target
    assert torch.equal(image, decode_image(path, ds.channels))


# --------------------------------------------------------------------------- odd modes


def _decode_one(tmp_path: Path, name: str, channels: int = 3) -> np.ndarray:
    folder = tmp_path / "odd"
    if not folder.exists():
        _write_odd(folder)
    return decode_image(folder / name, channels).permute(1, 2, 0).numpy()


def test_odd_modes_output_uint8_with_requested_channels(tmp_path: Path) -> None:
    modes = _write_odd(tmp_path / "odd")
    for name, mode in modes.items():
        with Image.open(tmp_path / "odd" / name) as img:
            assert img.mode == mode, name  # the file really is in the odd mode
        for channels in (1, 3):
            image = decode_image(tmp_path / "odd" / name, channels)
            assert image.dtype == torch.uint8 and image.ndim == 3, name
            assert image.shape[0] == channels and image.is_contiguous(), name


def test_cmyk_jpeg_matches_rgb_original(tmp_path: Path) -> None:
    decoded = _decode_one(tmp_path, "cmyk.jpg").astype(int)
    original = np.asarray(_upright_photo()).astype(int)
    assert decoded.shape == original.shape
    assert np.abs(decoded - original).mean() < 3  # JPEG loss only, not inverted or shifted


def test_palette_transparency_composited_on_white(tmp_path: Path) -> None:
    decoded = _decode_one(tmp_path, "palette_trns.png")
    assert (decoded[:, :4] == 255).all()  # transparent red -> white background
    assert (decoded[:, 4:] == [0, 0, 255]).all()  # opaque blue stays blue
    grey = _decode_one(tmp_path, "palette_trns.png", channels=1)
    assert (grey[:, :4] == 255).all()


def test_palette_without_transparency_is_exact(tmp_path: Path) -> None:
    expected = np.asarray(_upright_photo().quantize(32).convert("RGB"))
    np.testing.assert_array_equal(_decode_one(tmp_path, "palette.png"), expected)


def test_16bit_greyscale_is_rescaled_not_clipped(tmp_path: Path) -> None:
    decoded = _decode_one(tmp_path, "grey16.png", channels=1)[:, :, 0]
    expected = np.rint(_ramp16().astype(np.float64) / 257).astype(np.uint8)
    np.testing.assert_array_equal(decoded, expected)
    assert decoded.min() == 0 and decoded.max() == 255
    # Every 8-bit level is reached by exactly the 16-bit values that round to it.
    counts = np.bincount(decoded.ravel(), minlength=256)
    assert counts[0] == 129 and counts[255] == 129 and (counts[1:255] == 257).all()
    rgb = _decode_one(tmp_path, "grey16.png", channels=3)
    assert all(np.array_equal(rgb[:, :, c], expected) for c in range(3))


def test_rgba_and_la_composited_on_white(tmp_path: Path) -> None:
    rgba = _rgba_array()
    np.testing.assert_allclose(_decode_one(tmp_path, "rgba.png"), _on_white(rgba), atol=1)
    la = rgba[:, :, [0, 0, 0, 3]]  # LA = the red channel as grey, same alpha
    decoded = _decode_one(tmp_path, "la.png", channels=1)[:, :, 0]
    np.testing.assert_allclose(decoded, _on_white(la)[:, :, 0], atol=1)
    assert (_decode_one(tmp_path, "rgba.png")[0] == 255).all()  # alpha 0 row is pure white


def test_bilevel_float_and_int32(tmp_path: Path) -> None:
    np.testing.assert_array_equal(
        _decode_one(tmp_path, "bilevel.png", channels=1)[:, :, 0], _checkerboard()
    )
    decoded = _decode_one(tmp_path, "float.tif", channels=1)[:, :, 0]
    np.testing.assert_array_equal(decoded, np.rint(_float_ramp() * 255).astype(np.uint8))
    # Floats outside [0, 1] are stretched min..max onto 0..255, not clipped.
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.linspace(-5, 5, 11, dtype=np.float32).reshape(1, 11)).save(wide)
    row = decode_image(wide, 1)[0, 0].tolist()
    assert row[0] == 0 and row[-1] == 255 and row == sorted(row) and len(set(row)) == 11
    # 32-bit int ("I", how Pillow < 10 reads 16-bit PNGs) within 0..65535 is read as 16-bit.
    as_int = tmp_path / "int32.tif"
    Image.fromarray(_ramp16().astype(np.int32)).save(as_int)
    expected = np.rint(_ramp16() / 257).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(as_int, 1)[0].numpy(), expected)


def test_exif_rotated_jpeg_is_upright(tmp_path: Path) -> None:
    upright = _upright_photo()
    decoded = _decode_one(tmp_path, "rotated.jpg").astype(int)
    with Image.open(tmp_path / "odd" / "rotated.jpg") as stored:
        assert stored.size == (upright.height, upright.width)  # pixels on disk are turned
    assert decoded.shape == (upright.height, upright.width, 3)
    assert np.abs(decoded - np.asarray(upright)).mean() < 3
    assert read_image(tmp_path / "odd" / "rotated.jpg").exif_rotated


# --------------------------------------------------------------------------- skipping


def test_broken_files_are_substituted_counted_logged_and_warned_once(mixed: Path) -> None:
    log = mixed.parent / "skipped.jsonl"
    ds = ImageFolderDataset(mixed, skip_log=log)
    bad = _bad_paths(mixed)
    assert set(bad) <= {p for p, _ in ds.samples}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    for i, item in enumerate(items):
        _assert_substituted(ds, i, item, set(bad))
    assert ds.skipped == bad
    assert ds.skip_count == len(bad)  # one substitution per bad index
    assert read_skip_log(log) == bad
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == len(bad)  # a known-bad file is neither re-decoded nor re-logged
    assert all(line["detail"] for line in lines)
    ours = [w for w in caught if issubclass(w.category, BrokenImageWarning)]
    assert len(ours) == 1 and "skipping broken image" in str(ours[0].message)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on globally


def test_substitution_is_deterministic_and_wraps(mixed: Path) -> None:
    ds = ImageFolderDataset(mixed)
    last = len(ds) - 1
    assert ds.samples[last][0].endswith("zz_empty.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BrokenImageWarning)
        wrapped, target = ds[last]
        assert torch.equal(wrapped, ds[0][0]) and target == ds[0][1]
        assert torch.equal(ds[-1][0], wrapped)  # negative index, known-bad path
        first_bad = next(i for i, (p, _) in enumerate(ds.samples) if "00_truncated" in p)
        # Two bad files in a row: both are served by the sample after the second.
        assert torch.equal(ds[first_bad][0], ds[first_bad + 2][0])
        assert torch.equal(ds[first_bad + 1][0], ds[first_bad + 2][0])
    with pytest.raises(IndexError):
        ds[len(ds)]


def _keep(batch: object) -> object:
    return batch


def test_skip_log_collects_bad_files_from_worker_processes(mixed: Path) -> None:
    log = mixed.parent / "workers.jsonl"
    ds = ImageFolderDataset(mixed, skip_log=log)
    bad = _bad_paths(mixed)
    loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=_keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BrokenImageWarning)
        items = list(loader)
    assert len(items) == len(ds)
    for i, item in enumerate(items):
        _assert_substituted(ds, i, item, set(bad))
    assert ds.skipped == {}  # decoding happened in the workers' copies...
    assert read_skip_log(log) == bad  # ...whose records all reach the shared file


def test_two_views_over_broken_folder(mixed: Path) -> None:
    ds = ImageFolderDataset(mixed, channels=1)
    views = TwoViews(ds, eval_pipeline(16, (0.5,), (0.25,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BrokenImageWarning)
        v1, v2, _ = views[len(ds) - 1]
    assert v1.shape == v2.shape == (1, 16, 16)
    assert first_readable(views) == 0


def _all_bad(root: Path) -> Path:
    root.mkdir(parents=True)
    _half(PHOTOS / "coffee.jpg", root / "a.jpg")
    (root / "b.png").write_text("not a png")
    (root / "c.jpg").write_bytes(b"")
    return root


def test_all_bad_folder_raises_clear_error(tmp_path: Path) -> None:
    root = _all_bad(tmp_path / "all-bad")
    ds = ImageFolderDataset(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BrokenImageWarning)
        with pytest.raises(NoReadableImageError, match=str(root)) as err:
            ds[1]
    message = str(err.value)
    assert "all 3 image files" in message and "zero-byte: 1" in message
    with pytest.raises(NoReadableImageError, match="check-data"):
        ds[0]  # again, now from the record of known-bad files


def test_first_readable(tmp_path: Path, mixed: Path) -> None:
    root = _all_bad(tmp_path / "all-bad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BrokenImageWarning)
        with pytest.raises(NoReadableImageError, match=str(root)) as err:
            first_readable(root)
        assert "3 of 3" in str(err.value) and "truncated: 1" in str(err.value)
        ds = ImageFolderDataset(mixed)
        assert first_readable(ds) == 0
        # Start with the broken photos: the first readable one is the photo after them.
        photos = ImageFolderDataset(mixed / "photos")
        assert Path(photos.samples[first_readable(photos)][0]).name == "astronaut.png"
        # A limit spreads the tries over the data set: first and last sample here.
        with pytest.raises(NoReadableImageError, match=r"2 of 9 image files tried \(spread"):
            first_readable(photos, limit=2)


# --------------------------------------------------------------------------- check_data


@pytest.mark.parametrize("workers", [0, 2])
def test_check_data_report(mixed: Path, workers: int) -> None:
    shutil.copy(mixed / "photos" / "coffee.jpg", mixed / "odd" / "coffee-copy.jpg")
    (mixed / "README.txt").write_text("not an image, ignored")
    report = check_data(mixed, workers=workers, progress=False)
    bad = _bad_paths(mixed)
    assert report.files == 6 + 10 + 9  # fashion, odd (modes + copy), photos; BAD included
    assert report.ignored_files == 1
    assert {b.path: b.reason for b in report.broken} == bad
    assert all(b.detail for b in report.broken)
    assert report.readable == report.files - len(bad)
    assert report.broken_by_reason == {"truncated": 2, "not an image": 1, "zero-byte": 1}
    assert report.classes == {"fashion": 6, "odd": 10, "photos": 9}
    assert report.readable_per_class == {"fashion": 5, "odd": 10, "photos": 6}
    odd_modes = {"CMYK": 1, GREY16: 1, "RGBA": 1, "LA": 1, "1": 1, "F": 1}
    assert report.modes == {"RGB": 7, "L": 6, "P": 2, **odd_modes}
    assert report.converted == {k: v for k, v in report.modes.items() if k != "RGB"}
    assert report.exif_rotated == 1
    assert report.width is not None and report.height is not None
    assert (report.width.min, report.width.max) == (3, 256)
    copies = [str(mixed / "odd" / "coffee-copy.jpg"), str(mixed / "photos" / "coffee.jpg")]
    assert report.duplicates == [copies]
    assert not report.ok and report.usable
    summary = report.summary()
    for rel in BAD:
        assert rel in summary
    assert "WARNING: 4 broken files" in summary and "coffee-copy.jpg" in summary
    json.dumps(report.to_dict())  # JSON-ready
    assert report.to_dict()["broken_by_reason"]["truncated"] == 2


def test_check_data_all_bad_and_clean(tmp_path: Path) -> None:
    report = check_data(_all_bad(tmp_path / "all-bad"), progress=False)
    assert report.readable == 0 and not report.usable
    assert report.summary().splitlines()[-1].startswith("ERROR: no readable image")
    clean = check_data(PHOTOS, channels=1, progress=False, duplicates=False)
    assert clean.ok and clean.duplicates is None and clean.converted == {"RGB": 5}
    assert clean.summary().endswith("OK: every image file decodes.")
