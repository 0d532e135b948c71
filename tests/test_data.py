"""Tests of the data pipeline of ddpm_lib (section `# data`).

Most tests run on small synthetic sets (ddpm_cli.make_synthetic); the ones marked "real" use the
Fruits-360 subset at FRUITS360_DIR (default: ../shared/fruits-360-subset next to the repository)
and are skipped, with the reason, when it is absent.
"""
from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import ddpm_cli
import ddpm_lib
import ddpm_train
from ddpm_lib import DataError, PURGE_K

REPO = Path(__file__).resolve().parents[1]
# torchvision 0.29 deprecates its image decoders (used by read_image): not this file's concern
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
COLUMNS = ["path", "label", "split", "video", "frame", "group", "fold"]
N_FOLDS = 5


# -----------------------------------------------------------------------------------------------
# helpers


def synthetic(root: Path, **kw) -> Path:
    """A small synthetic Fruits-360 (3 classes x 2 videos x 40 frames, 32x32 unless told)."""
    return ddpm_cli.make_synthetic(root, **{"n_classes": 3, "frames": 40, "size": 32, **kw})


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in ddpm_cli.IMAGE_EXTS)


def leaks(train: pd.DataFrame, val: pd.DataFrame, k: int) -> pd.DataFrame:
    """Pairs (validation image, training image) of the same label and video whose frame numbers
    are at most k apart. Brute force, independent of fold_rows' own search."""
    cols = ["label", "video", "frame", "path"]
    m = val[cols].merge(train[cols], on=["label", "video"], suffixes=("_val", "_tr"))
    m = m[(m.frame_val >= 0) & (m.frame_tr >= 0)]
    return m[(m.frame_val - m.frame_tr).abs() <= k]


def check_fold_property(index: pd.DataFrame, k: int = PURGE_K) -> None:
    """For every fold: validation = the fold's rows; training = rows of the other folds minus
    exactly those within ±k frames of a validation frame; no leak is left."""
    train_all = index[index.split == "train"]
    for fold in range(N_FOLDS):
        tr, val = ddpm_lib.fold_rows(index, fold, k=k)
        rest = train_all[train_all.fold != fold]
        assert set(val.path) == set(train_all.path[train_all.fold == fold])
        assert len(tr) > 0 and set(tr.path) <= set(rest.path)
        bad = leaks(tr, val, k)
        assert bad.empty, f"fold {fold}: {len(bad)} near-duplicate pairs, e.g.\n{bad.head()}"
        # the purge is minimal: everything it dropped was a ±k neighbour of a validation frame
        dropped = rest[~rest.path.isin(tr.path)]
        assert set(dropped.path) == set(leaks(dropped, val, k).path_tr)


def check_balance(index: pd.DataFrame) -> None:
    """Fold sizes within ±10 % of their mean; every class in every fold with about 1/5 of its
    training images."""
    train = index[index.split == "train"]
    sizes = train.fold.value_counts()
    assert sorted(sizes.index) == list(range(N_FOLDS))
    assert (abs(sizes - sizes.mean()) <= 0.10 * sizes.mean()).all(), sizes.to_dict()
    per_class = pd.crosstab(train.label, train.fold)
    assert list(per_class.columns) == list(range(N_FOLDS))
    for label, row in per_class.iterrows():
        share = row.sum() / N_FOLDS
        assert (abs(row - share) <= max(2.0, 0.10 * share)).all(), (label, row.to_dict())


def out_listing(out: Path) -> dict[str, str]:
    """Each entry of out/: name → symlink target, "dir" or "file" (for before/after checks)."""
    return {p.name: (os.readlink(p) if p.is_symlink() else "dir" if p.is_dir() else "file")
            for p in out.iterdir()}


def temp_leftovers(out: Path) -> list[str]:
    """Names in out/ that look like temporary files of atomic writes, unzips or downloads."""
    return sorted(p.name for p in out.iterdir()
                  if p.name.startswith(".") or p.name.endswith((".tmp", ".part")))


def rgb_of(path: Path) -> np.ndarray:
    """PIL's reading of an image as (3, H, W) uint8 RGB: the reference for read_image."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def zip_folder(folder: Path, zip_path: Path, prefix: str = "") -> Path:
    """Zip Training/ and Test/ of `folder`, under `prefix` (e.g. 'fruits-360-100x100-main/')."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as z:
        for p in image_files(folder):
            z.write(p, prefix + p.relative_to(folder).as_posix())
    return zip_path


def real_dir() -> Path:
    return Path(os.environ.get("FRUITS360_DIR") or REPO.parent / "shared" / "fruits-360-subset")


# -----------------------------------------------------------------------------------------------
# fixtures (module-scoped: built once, never modified by a test)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A synthetic set of 100x100 images (the dataset's resolution)."""
    return synthetic(tmp_path_factory.mktemp("synth") / "fruits", size=100)


@pytest.fixture(scope="module")
def synth_index(synth) -> pd.DataFrame:
    index, bad = ddpm_cli.build_index(synth)
    assert bad == []
    return index


@pytest.fixture(scope="module")
def real_index() -> tuple[Path, pd.DataFrame]:
    root = real_dir()
    if not (root / "Training").is_dir():
        pytest.skip(f"real Fruits-360 subset not found at {root} (set FRUITS360_DIR to it)")
    index, bad = ddpm_cli.build_index(root, ddpm_lib.SUBSET_CLASSES)
    assert bad == []
    return root, index


# -----------------------------------------------------------------------------------------------
# 1. the index


def test_index_columns_and_counts(synth, synth_index):
    """build_index: exactly the 7 columns; one row per image file on disk, with its class and
    split; folds 0..4 for training rows and -1 for test rows."""
    index = synth_index
    assert list(index.columns) == COLUMNS
    n_train = len(image_files(synth / "Training"))
    n_test = len(image_files(synth / "Test"))
    assert n_train > 0 and n_test > 0
    assert len(index) == n_train + n_test
    assert (index.split == "train").sum() == n_train and (index.split == "test").sum() == n_test
    assert index.path.is_unique
    for p, label, split in zip(index.path, index.label, index.split):
        path = synth / p
        assert path.is_file() and path.parent.name == label
        assert path.parent.parent.name == {"train": "Training", "test": "Test"}[split]
    train, test = index[index.split == "train"], index[index.split == "test"]
    assert set(train.fold) == set(range(N_FOLDS))
    assert (test.fold == -1).all()
    assert (index.frame >= 0).all()


def test_prepare_data_writes_index_and_link(synth, tmp_path):
    """prepare_data(folder): out/index.csv with the 7 columns, the same rows as build_index,
    read back unchanged by load_index; out/fruits-360 links to the images."""
    out = tmp_path / "out"
    index = ddpm_cli.prepare_data(src=synth, out=out)
    csv = pd.read_csv(out / "index.csv", keep_default_na=False, dtype={"video": str})
    assert list(csv.columns) == COLUMNS
    assert len(csv) == len(image_files(synth))
    pd.testing.assert_frame_equal(csv, index.reset_index(drop=True), check_dtype=False)
    link = out / "fruits-360"
    assert link.is_symlink() and link.resolve() == synth.resolve()
    assert all((link / p).is_file() for p in csv.path)
    loaded = ddpm_lib.load_index(ddpm_lib.get_config("smoke", data_dir=str(out)))
    pd.testing.assert_frame_equal(loaded, csv)
    assert temp_leftovers(out) == []


# -----------------------------------------------------------------------------------------------
# 2-4. folds: no leakage, the random split leaks, balance


def test_fold_property_synthetic(synth_index):
    """Grouped folds + purge: no validation image has a training image of the same label and
    video within ±PURGE_K frames, for every fold."""
    check_fold_property(synth_index)


def test_fold_property_other_seed_and_k(synth):
    """The property holds for another seed and another purge width too."""
    index, _ = ddpm_cli.build_index(synth, seed=3)
    check_fold_property(index, k=PURGE_K)
    check_fold_property(index, k=2)


def _check_without_purge(index: pd.DataFrame) -> None:
    """check_fold_property's leak assertion on folds taken without purging (k=0)."""
    for fold in range(N_FOLDS):
        tr, val = ddpm_lib.fold_rows(index, fold, k=0)
        bad = leaks(tr, val, PURGE_K)
        assert bad.empty, f"fold {fold}: {len(bad)} near-duplicate pairs"


def leak_fraction(index: pd.DataFrame, k: int) -> float:
    """Share of validation images, over all folds taken without purge, that have a training
    image of the same label and video within ±k frames."""
    n_leaky = n_val = 0
    for fold in range(N_FOLDS):
        tr, val = ddpm_lib.fold_rows(index, fold, k=0)
        n_leaky += leaks(tr, val, k).path_val.nunique()
        n_val += len(val)
    return n_leaky / n_val


def check_random_split_leaks(grouped: pd.DataFrame) -> None:
    """The random split (used with no purge, as fold_datasets does) fails the fold property, and
    most of its validation images have a training image one frame away, unlike the grouped
    folds (whose only ±1 neighbours sit at block edges)."""
    rand = ddpm_lib.assign_folds(grouped, split="random", seed=0)
    with pytest.raises(AssertionError, match="near-duplicate"):
        _check_without_purge(rand)
    frac_random, frac_grouped = leak_fraction(rand, 1), leak_fraction(grouped, 1)
    assert frac_random > 0.6, frac_random
    assert frac_grouped < 0.5 * frac_random, (frac_grouped, frac_random)


def test_random_split_leaks(synth_index):
    """The report's random split leaks near-duplicates into validation: the leak check, and so
    the fold-property test, can fail."""
    check_random_split_leaks(synth_index)


def test_grouped_split_needs_the_purge(synth_index):
    """Contiguous blocks alone still leak at block edges: without the purge (k=0) the grouped
    folds fail the property, so the purge is what makes it hold."""
    with pytest.raises(AssertionError, match="near-duplicate"):
        _check_without_purge(synth_index)


def test_fold_balance_synthetic(synth_index):
    """Grouped folds are balanced (±10 %) and stratified by class (~1/5 of each class each)."""
    check_balance(synth_index)


def test_real_subset_counts(real_index):
    """Real subset, 10 classes of SUBSET_CLASSES: 6,821 images (5,107 train, 1,714 test), and
    every file name parses to a video and frame."""
    _, index = real_index
    assert list(index.columns) == COLUMNS
    assert len(index) == 6821
    assert (index.split == "train").sum() == 5107 and (index.split == "test").sum() == 1714
    assert sorted(index.label.unique()) == sorted(ddpm_lib.SUBSET_CLASSES)
    assert (index.frame >= 0).all()
    assert set(index.fold[index.split == "train"]) == set(range(N_FOLDS))
    assert (index.fold[index.split == "test"] == -1).all()


def test_fold_property_real(real_index):
    """Real subset: no validation image has a training neighbour within ±PURGE_K frames."""
    check_fold_property(real_index[1])


def test_random_split_leaks_real(real_index):
    """Real subset: the random split leaks near-duplicates into validation."""
    check_random_split_leaks(real_index[1])


def test_fold_balance_real(real_index):
    """Real subset: folds balanced (±10 %) and stratified by class."""
    check_balance(real_index[1])


def test_real_images_load(real_index):
    """Real subset: a few images load as (3, S, S) uint8 at 100 (no resize) and 32."""
    root, index = real_index
    rows = index.sample(8, random_state=0)
    full = ddpm_lib.Fruits(rows, root, size=100).images
    assert full.shape == (8, 3, 100, 100) and full.dtype == torch.uint8
    for img, p in zip(full, rows.path):
        assert np.abs(img.numpy().astype(int) - rgb_of(root / p)).max() <= 2
    assert ddpm_lib.Fruits(rows, root, size=32).images.shape == (8, 3, 32, 32)


# -----------------------------------------------------------------------------------------------
# 5. the Fruits dataset


@pytest.mark.parametrize("size", [32, 100])
def test_fruits_dataset(synth, synth_index, size):
    """Fruits items: x float32 (3, S, S) in [-1, 1] = uint8/127.5 - 1, label int64; the cache is
    uint8 (N, 3, S, S); at S=100 the 100x100 images are not resized, at 32 they are resized."""
    rows = synth_index.groupby("label").head(4)
    classes = sorted(synth_index.label.unique())
    ds = ddpm_lib.Fruits(rows, synth, size=size, classes=classes)
    assert len(ds) == len(rows)
    cache = ds.images
    assert cache.dtype == torch.uint8 and cache.shape == (len(rows), 3, size, size)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert torch.equal(x, cache[i].float() / 127.5 - 1)
        assert y.dtype == torch.int64 and classes[int(y)] == rows.label.iloc[i]
    ref = [rgb_of(synth / p) for p in rows.path]
    if size == 100:                          # no resize: the decoded pixels themselves
        for img, r in zip(cache, ref):
            assert np.abs(img.numpy().astype(int) - r).max() <= 2
    else:                                    # an antialiased resize of them
        for img, r in zip(cache, ref):
            small = np.asarray(Image.fromarray(r.transpose(1, 2, 0)).resize(
                (size, size), Image.BILINEAR)).transpose(2, 0, 1)
            assert np.abs(img.numpy().astype(int) - small).mean() < 3
    white = ds[0][0][:, 0, 0]                # the background corner is white → ≈ +1
    assert (white > 0.95).all()


def test_to_float_range():
    """to_float maps uint8 0 → -1 and 255 → +1, linearly, as float32."""
    x = ddpm_lib.to_float(torch.tensor([0, 127, 255], dtype=torch.uint8))
    assert x.dtype == torch.float32
    assert torch.allclose(x, torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]))


# -----------------------------------------------------------------------------------------------
# 6. bad inputs


def _first_image(root: Path, split: str = "Training") -> Path:
    return image_files(root / split)[0]


def test_truncated_and_non_image_files(tmp_path):
    """A truncated JPEG and a text file named .jpg: build_index raises DataError naming the file;
    skip_bad=True leaves them out and returns them in the bad list."""
    root = synthetic(tmp_path / "s")
    cls = root / "Training" / "Fake 0 1"
    data = _first_image(root).read_bytes()
    truncated, text = cls / "r_97_100.jpg", cls / "r_98_100.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    text.write_text("this is not an image\n")
    for bad_file in (truncated, text):
        other = text if bad_file == truncated else truncated
        moved = other.rename(tmp_path / other.name)
        with pytest.raises(DataError, match=re.escape(str(bad_file))):
            ddpm_cli.build_index(root)
        moved.rename(other)
    index, bad = ddpm_cli.build_index(root, skip_bad=True)
    assert sorted(bad) == sorted([str(truncated), str(text)])
    assert len(index) == len(image_files(root)) - 2
    assert not index.path.str.contains("r_9[78]_100").any()
    for f in (truncated, text):                    # read_image, too, names the file
        with pytest.raises(DataError, match=re.escape(str(f))):
            ddpm_lib.read_image(f, 32)


@pytest.mark.parametrize("mode,ext", [("L", ".png"), ("RGBA", ".png"), ("P", ".png"),
                                      ("LA", ".png"), ("1", ".png"), ("L", ".jpg"),
                                      ("CMYK", ".jpg"), ("RGB", ".png")])
def test_image_modes_load_as_rgb(tmp_path, mode, ext):
    """Grayscale, RGBA, palette, bilevel and CMYK images pass the index and load as 3-channel
    RGB uint8 with PIL's RGB pixels."""
    root = synthetic(tmp_path / "s")
    path = root / "Training" / "Fake 1 1" / f"r_90_100{ext}"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert(mode).save(path)
    index, bad = ddpm_cli.build_index(root)
    assert bad == []
    rows = index[index.path == path.relative_to(root).as_posix()]
    assert len(rows) == 1
    img = ddpm_lib.Fruits(rows, root, size=32).images[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
    assert np.abs(img.numpy().astype(int) - rgb_of(path)).max() <= 2


def test_16bit_png_loads_as_8bit_rgb(tmp_path):
    """A 16-bit grayscale PNG loads as uint8 RGB with the high byte of each pixel."""
    root = synthetic(tmp_path / "s")
    path = root / "Training" / "Fake 1 1" / "r_90_100.png"
    a = (np.arange(32 * 32).reshape(32, 32) * 61 + 7).astype(np.uint16)
    Image.fromarray(a).save(path)
    index, _ = ddpm_cli.build_index(root)
    rows = index[index.path == path.relative_to(root).as_posix()]
    assert ddpm_lib.read_image(path, 32).dtype == torch.uint8
    img = ddpm_lib.Fruits(rows, root, size=32).images[0]
    expected = np.broadcast_to((a >> 8).astype(np.uint8), (3, 32, 32))
    assert np.abs(img.numpy().astype(int) - expected).max() <= 1


def test_every_indexed_file_loads(tmp_path):
    """Whatever build_index accepts, Fruits can load (a BMP saved as .jpg is either rejected by
    the index check or decoded)."""
    root = synthetic(tmp_path / "s")
    path = root / "Training" / "Fake 1 1" / "r_90_100.jpg"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path, format="BMP")
    index, bad = ddpm_cli.build_index(root, skip_bad=True)
    ddpm_lib.Fruits(index, root, size=32).images


def test_wrong_size_image_is_resized(tmp_path):
    """A 60x40 image in a 32x32 set is indexed and resized to (3, 32, 32)."""
    root = synthetic(tmp_path / "s")
    path = root / "Training" / "Fake 2 1" / "r_90_100.jpg"
    Image.new("RGB", (60, 40), (10, 200, 90)).save(path, quality=95)
    index, _ = ddpm_cli.build_index(root)
    rows = index[index.path == path.relative_to(root).as_posix()]
    img = ddpm_lib.Fruits(rows, root, size=32).images[0]
    assert img.shape == (3, 32, 32)
    assert np.abs(img.float().mean((1, 2)).numpy() - [10, 200, 90]).max() < 4


@pytest.mark.parametrize("split", ["Training", "Test"])
def test_empty_class_folder(tmp_path, split):
    """An empty class folder (in Training/ or Test/) raises DataError naming the folder."""
    root = synthetic(tmp_path / "s")
    for s in ("Training", "Test"):
        (root / s / "Empty 1").mkdir()
    (root / ("Test" if split == "Training" else "Training") / "Empty 1" / "0_100.jpg") \
        .write_bytes(_first_image(root).read_bytes())
    with pytest.raises(DataError, match=re.escape(str(root / split / "Empty 1"))):
        ddpm_cli.build_index(root)


@pytest.mark.parametrize("case", ["missing", "lowercase"])
def test_missing_or_misnamed_training_folder(tmp_path, case):
    """No Training/ (deleted, or named 'training/'): DataError naming the data folder."""
    root = synthetic(tmp_path / "s")
    if case == "missing":
        shutil.rmtree(root / "Training")
    else:
        (root / "Training").rename(root / "training")
    with pytest.raises(DataError, match=re.escape(str(root))) as e:
        ddpm_cli.build_index(root)
    assert "Training" in str(e.value)
    with pytest.raises(DataError, match=re.escape(str(root))):
        ddpm_cli.prepare_data(src=root, out=tmp_path / "out")


def test_missing_source_folder(tmp_path):
    """A --from folder that does not exist: DataError naming it."""
    missing = tmp_path / "no such folder"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        ddpm_cli.build_index(missing)


def test_spaces_and_non_ascii_paths(tmp_path):
    """Spaces and non-ASCII characters in the data folder and class names ('Pömme Rouge 1')
    survive indexing, index.csv, load_index and image loading (fold_datasets)."""
    root = synthetic(tmp_path / "dätä with spaces" / "fruits 360")
    for split in ("Training", "Test"):
        (root / split / "Fake 0 1").rename(root / split / "Pömme Rouge 1")
    out = tmp_path / "oüt dir"
    index = ddpm_cli.prepare_data(src=root, out=out)
    assert "Pömme Rouge 1" in set(index.label)
    cfg = ddpm_lib.get_config("smoke", data_dir=str(out))
    loaded = ddpm_lib.load_index(cfg)
    assert set(loaded.label) == set(index.label) and set(loaded.path) == set(index.path)
    tr, val = ddpm_train.fold_datasets(cfg, 0)
    assert "Pömme Rouge 1" in tr.classes
    assert tr.images.shape == (len(tr), 3, cfg.image_size, cfg.image_size)
    assert val.images.shape[0] == len(val) > 0


def test_failed_prepare_leaves_previous_state(tmp_path):
    """A prepare_data that fails (bad image, missing folder, not-a-zip) leaves the previous
    out/index.csv byte-for-byte, the link unchanged, and no temporary files in out/."""
    out = tmp_path / "out"
    ddpm_cli.prepare_data(src=synthetic(tmp_path / "good"), out=out)
    before_csv, before = (out / "index.csv").read_bytes(), out_listing(out)

    broken = synthetic(tmp_path / "broken", n_classes=2)
    (broken / "Test" / "Fake 0 1" / "r_99_100.jpg").write_bytes(b"\xff\xd8\xff garbage")
    fake_zip = tmp_path / "fake.zip"
    fake_zip.write_bytes(b"PK not really a zip")
    for src in (broken, tmp_path / "missing", fake_zip):
        with pytest.raises(DataError):
            ddpm_cli.prepare_data(src=src, out=out)
        assert (out / "index.csv").read_bytes() == before_csv
        assert out_listing(out) == before
        assert temp_leftovers(out) == []


def test_failed_csv_write_is_atomic(tmp_path, monkeypatch):
    """If writing index.csv fails half-way, the previous index.csv is intact and the temporary
    file is removed."""
    out = tmp_path / "out"
    ddpm_cli.prepare_data(src=synthetic(tmp_path / "good"), out=out)
    before_csv = (out / "index.csv").read_bytes()

    def half_write(self, path, *a, **kw):
        Path(path).write_text("path,label\nhalf")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_write)
    with pytest.raises(OSError, match="disk full"):
        ddpm_cli.prepare_data(src=synthetic(tmp_path / "other", n_classes=2), out=out)
    assert (out / "index.csv").read_bytes() == before_csv
    assert temp_leftovers(out) == []


def test_prepare_data_keeps_images_already_at_out(tmp_path):
    """Indexing images that already live at out/fruits-360 (a real folder, not a link) keeps
    them: the images are still there after prepare_data, and the index points at them."""
    out = tmp_path / "out"
    synthetic(out / "fruits-360")
    n = len(image_files(out / "fruits-360"))
    try:
        index = ddpm_cli.prepare_data(src=out / "fruits-360", out=out)
    except DataError:
        index = None                        # refusing, with a message, would be fine too
    assert len(image_files(out / "fruits-360")) == n
    if index is not None:
        assert all((out / "fruits-360" / p).is_file() for p in index.path)


# -----------------------------------------------------------------------------------------------
# 7. file names


@pytest.mark.parametrize("name,expected", [
    ("5_100.jpg", ("", 5)), ("r_12_100.jpg", ("r", 12)), ("r2_117_100.jpg", ("r2", 117)),
    ("r0_103_100.jpg", ("r0", 103)), ("r1_7_100.jpg", ("r1", 7)), ("R_12_100.JPG", ("r", 12)),
    ("0_100.png", ("", 0)), ("img.jpg", ("img", -1))])
def test_parse_name(name, expected):
    """parse_name: every Fruits-360 name form → (video, frame); unknown names → (stem, -1)."""
    assert ddpm_lib.parse_name(name) == expected


# -----------------------------------------------------------------------------------------------
# 8. the synthetic set


def _pixels(root: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(root).as_posix(): np.asarray(Image.open(p)) for p in image_files(root)}


def test_make_synthetic_is_deterministic(tmp_path):
    """The same seed into two folders gives identical files and pixels; another seed differs."""
    a = _pixels(synthetic(tmp_path / "a", seed=7))
    b = _pixels(synthetic(tmp_path / "b", seed=7))
    c = _pixels(synthetic(tmp_path / "c", seed=8))
    assert len(a) == 3 * 2 * 40
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_make_synthetic_same_root_new_settings(tmp_path):
    """A second make_synthetic at the same root with another seed makes that seed's set."""
    root = tmp_path / "s"
    synthetic(root, seed=1)
    synthetic(root, seed=2)
    expected = _pixels(synthetic(tmp_path / "ref", seed=2))
    got = _pixels(root)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


# -----------------------------------------------------------------------------------------------
# 9. zip and URL sources


@pytest.mark.parametrize("prefix", ["", "fruits-360-100x100-main/"])
def test_prepare_data_from_zip(tmp_path, prefix):
    """prepare_data(.zip), with Training/ and Test/ at the top or one folder down (GitHub's
    archive): the same index as from the folder; no temporary unzip folder left."""
    folder = synthetic(tmp_path / "s")
    zip_path = zip_folder(folder, tmp_path / "fruits.zip", prefix)
    out = tmp_path / "out"
    index = ddpm_cli.prepare_data(src=zip_path, out=out)
    expected, _ = ddpm_cli.build_index(folder)
    pd.testing.assert_frame_equal(index.reset_index(drop=True), expected.reset_index(drop=True))
    link = out / "fruits-360"
    assert all((link / p).is_file() for p in index.path)
    assert temp_leftovers(out) == []


def test_corrupt_zip_member(tmp_path):
    """A zip whose member data is corrupted: DataError naming the zip, no temp folder left."""
    zip_path = zip_folder(synthetic(tmp_path / "s"), tmp_path / "fruits.zip")
    with zipfile.ZipFile(zip_path) as z:
        info = z.infolist()[5]
    data = bytearray(zip_path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 100] ^= 0xFF                        # flip one byte of the stored image
    zip_path.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=re.escape(str(zip_path))):
        ddpm_cli.prepare_data(src=zip_path, out=out)
    assert temp_leftovers(out) == []


def test_prepare_data_from_replaced_zip(tmp_path):
    """After the zip is replaced by a different one (same name), prepare_data indexes the new
    contents, not the previous unpack."""
    zip_path = tmp_path / "fruits.zip"
    out = tmp_path / "out"
    zip_folder(synthetic(tmp_path / "three", n_classes=3), zip_path)
    assert ddpm_cli.prepare_data(src=zip_path, out=out).label.nunique() == 3
    zip_folder(synthetic(tmp_path / "two", n_classes=2), zip_path)
    assert ddpm_cli.prepare_data(src=zip_path, out=out).label.nunique() == 2


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server (127.0.0.1, free port) serving state['files'] by path, with HTTP Range
    support. Switches: ignore_range (answer 200 with the whole file), cut (send that many bytes
    fewer than announced, then close). state['log'] records (path, Range, status, bytes sent)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    state = dict(files={}, log=[], ignore_range=False, cut=0)

    class RangeHandler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            data = state["files"].get(self.path.split("?")[0])
            if data is None:
                self.send_error(404)
                return
            rng = self.headers.get("Range")
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            start, status = (int(m.group(1)), 206) if m and not state["ignore_range"] else (0, 200)
            if start >= len(data) and status == 206:
                state["log"].append((self.path, rng, 416, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            sent = body[: len(body) - state["cut"]]
            # logged before the write: the client may assert on the log as soon as it has the bytes
            state["log"].append((self.path, rng, status, len(sent)))
            self.wfile.write(sent)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{srv.server_port}"
    yield state
    srv.shutdown()
    srv.server_close()
    thread.join(5)


PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8))


def test_fetch_url_full_download(server, tmp_path):
    """_fetch_url downloads the whole file to dest; no .part left."""
    server["files"]["/a.bin"] = PAYLOAD
    dest = ddpm_cli._fetch_url(server["url"] + "/a.bin", tmp_path / "a.bin")
    assert dest == tmp_path / "a.bin" and dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "a.bin.part").exists()
    assert server["log"] == [("/a.bin", None, 200, len(PAYLOAD))]


def test_fetch_url_resumes_partial(server, tmp_path):
    """With a partial .part file, _fetch_url asks for the rest (Range), appends it, and the
    result is the whole file."""
    server["files"]["/a.bin"] = PAYLOAD
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:123_456])
    dest = ddpm_cli._fetch_url(server["url"] + "/a.bin", tmp_path / "a.bin",
                               expected_size=len(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert server["log"] == [("/a.bin", "bytes=123456-", 206, len(PAYLOAD) - 123_456)]
    assert not (tmp_path / "a.bin.part").exists()


def test_fetch_url_server_without_range(server, tmp_path):
    """A server that ignores Range (200): the stale .part is overwritten, not appended to."""
    server["files"]["/a.bin"] = PAYLOAD
    server["ignore_range"] = True
    (tmp_path / "a.bin.part").write_bytes(b"x" * 1000)
    dest = ddpm_cli._fetch_url(server["url"] + "/a.bin", tmp_path / "a.bin")
    assert dest.read_bytes() == PAYLOAD


def test_fetch_url_size_mismatch_then_resume(server, tmp_path):
    """A cut-off download raises DataError naming the URL and keeps the .part; rerunning
    resumes it to the full file. A wrong expected_size raises DataError too."""
    url = server["url"] + "/a.bin"
    server["files"]["/a.bin"] = PAYLOAD
    server["cut"] = 50_000
    with pytest.raises(DataError, match=re.escape(url)):
        ddpm_cli._fetch_url(url, tmp_path / "a.bin")
    assert not (tmp_path / "a.bin").exists()
    assert (tmp_path / "a.bin.part").read_bytes() == PAYLOAD[:-50_000]
    server["cut"] = 0
    assert ddpm_cli._fetch_url(url, tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert server["log"][-1] == ("/a.bin", f"bytes={len(PAYLOAD) - 50_000}-", 206, 50_000)

    with pytest.raises(DataError, match=re.escape(url)):
        ddpm_cli._fetch_url(url, tmp_path / "b.bin", expected_size=len(PAYLOAD) + 1)
    assert not (tmp_path / "b.bin").exists()


def test_fetch_url_complete_part(server, tmp_path):
    """A .part that already holds the whole file is accepted (size checked) and renamed."""
    server["files"]["/a.bin"] = PAYLOAD
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD)
    dest = ddpm_cli._fetch_url(server["url"] + "/a.bin", tmp_path / "a.bin",
                               expected_size=len(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD


def test_prepare_data_from_url(server, tmp_path):
    """prepare_data(url=…): downloads the zip, unpacks it and indexes it."""
    folder = synthetic(tmp_path / "s")
    server["files"]["/archive/main.zip"] = zip_folder(folder, tmp_path / "x.zip",
                                                      "fruits-360-main/").read_bytes()
    out = tmp_path / "out"
    index = ddpm_cli.prepare_data(url=server["url"] + "/archive/main.zip?download=1", out=out)
    assert (out / "main.zip").is_file()
    assert len(index) == len(image_files(folder))
    assert temp_leftovers(out) == []


# -----------------------------------------------------------------------------------------------
# 10. command line


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ddpm_cli", "data", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_synthetic(tmp_path):
    """`python -m ddpm_cli data --synthetic --out DIR` exits 0 and writes DIR/index.csv."""
    out = tmp_path / "cli out"
    r = _cli("--synthetic", "--out", str(out))
    assert r.returncode == 0, r.stderr
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    assert list(index.columns) == COLUMNS and len(index) > 0
    assert len(index) == len(image_files(out / "fruits-360"))


def test_cli_missing_source(tmp_path):
    """`data --from /nonexistent…` exits non-zero and names the path on stderr."""
    missing = "/nonexistent/fruits-360-" + tmp_path.name
    r = _cli("--from", missing, "--out", str(tmp_path / "out"))
    assert r.returncode != 0
    assert missing in r.stderr
    assert not (tmp_path / "out" / "index.csv").exists()
