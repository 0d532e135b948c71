"""
The command line of ddpm_lib (`python -m ddpm_cli COMMAND …`; `--help` lists the commands), with
what only it needs: the data command's sources (a folder, a zip, a URL, the synthetic set) and
the report writer (report/template.md filled from the tables in figures/).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import ddpm_lib as dl
from ddpm_lib import (n_text, classify, Config, DataError, Diffusion, EVAL, FruitClassifier, INDEX_COLUMNS, PROFILES,
                      ROOT, SAMPLERS, SUBSET_CLASSES, _decode, assign_folds, atomic_path,
                      classifier_path, committed_dir, ffd_floor, generation_config,
                      generation_metrics, generation_model, get_config, get_device,
                      guidance_metrics, load_checkpoint, load_classifier, load_index, load_model,
                      native_findings, native_verdict,
                      parse_name, pick_w, planned_runs, quality, report_table1, run_summary,
                      sample, save_checkpoint, save_fig, save_guidance, save_table, save_table1,
                      scoring_setup, seed_everything, show_grid, split_data, story_models, table1,
                      table1_wide, to_float, to_markdown, tqdm, train_command, uses_committed,
                      write_csv,
                      weights)
import ddpm_train
from ddpm_train import (Interrupted, keep_freed_memory, RunLocked, Slurm, export_ema, remove_partial, run_out, submit,
                         train)

# -----------------------------------------------------------------------------------------------
# data: the `data` command's sources (a folder, a zip, a URL, the synthetic set)


IMAGE_EXTS = (".jpg", ".jpeg", ".png")
SHARED_SUBSET = ROOT.parent / "shared" / "fruits-360-subset"


DEFAULT_URL = "https://github.com/fruits-360/fruits-360-100x100/archive/refs/heads/main.zip"


def _find_split_dirs(root: Path) -> dict[str, Path]:
    """Training/ and Test/ under root (or one folder below it, as in the dataset's zip)."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist: pass --from with a folder (or .zip) "
                        f"that holds Training/ and Test/ (e.g. ../shared/fruits-360-subset)")
    for base in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        found = {s: base / s for s in ("Training", "Test") if (base / s).is_dir()}
        if len(found) == 2:
            return found
    present = sorted(p.name for p in root.iterdir())
    raise DataError(f"{root} has no Training/ and Test/ folders (found: {present[:10]}). "
                    f"Fruits-360's layout is Training/<Class>/*.jpg and Test/<Class>/*.jpg; "
                    f"rename the folders (names are case-sensitive) or point --from at the right one")


def check_image(path: Path) -> tuple[int, int]:
    """Decode the whole image with the loader's decoder (catches truncated, non-image and
    undecodable files) and return its (height, width), or raise DataError."""
    try:
        return tuple(_decode(path).shape[-2:])
    except Exception as e:  # the decoder raises several types for bad files
        raise DataError(f"cannot read image {path}: {e}. Replace or delete the file, or rerun "
                        f"with --skip-bad to leave unreadable files out of the index") from e


def build_index(root: Path | str, classes=None, n_folds: int = 5, split: str = "grouped",
                seed: int = 0, skip_bad: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Scan a Fruits-360 folder → (index, bad files). Columns: path (relative to root), label,
    split, video, frame, group, fold."""
    root = Path(root)
    dirs = _find_split_dirs(root)
    available = sorted(p.name for p in dirs["Training"].iterdir() if p.is_dir())
    given = bool(classes)
    classes = list(classes) if classes else available
    missing = [c for c in classes if c not in available]
    if missing:
        raise DataError(f"classes {missing} are not in {dirs['Training']} "
                        f"(it has {len(available)}: {available[:12]}…); check --classes")
    rows, bad = [], []
    files = []
    for split_name, d in (("train", dirs["Training"]), ("test", dirs["Test"])):
        for c in classes:
            cdir = d / c
            entries = sorted(cdir.iterdir()) if cdir.is_dir() else []
            imgs = [p for p in entries if p.suffix.lower() in IMAGE_EXTS and p.is_file()]
            bad += [str(p) for p in entries if p.is_file() and p.suffix.lower() not in IMAGE_EXTS]
            bad += [f"{p} (a folder)" for p in entries if p.is_dir()]
            if not imgs:
                fix = ("remove the class from --classes or restore its images" if given else
                       f"restore its images, or remove the empty folder {cdir}, or index the "
                       f"other classes only (--classes NAME …)")
                raise DataError(f"class folder {cdir} is missing or has no images "
                                f"({', '.join(IMAGE_EXTS)}): {fix}")
            files += [(split_name, c, p) for p in imgs]
    resized, transparent = [], []
    for split_name, c, p in tqdm(files, desc="checking images", leave=False):
        try:
            video, frame = parse_name(p.name)
            if frame < 0:
                raise DataError(f"{p} is not named like a Fruits-360 frame ([r|r2|…_]<frame>_100"
                                f".jpg), so its video and frame, which keep the folds free of "
                                f"leakage, are unknown: rename or remove it, or rerun with "
                                f"--skip-bad to leave such files out")
            hw = check_image(p)
            if p.suffix.lower() == ".png" and _transparent(p):
                transparent.append(str(p))
        except DataError:
            if not skip_bad:
                raise
            bad.append(str(p))
            continue
        if hw[0] != hw[1]:                              # stretched to a square by read_image
            resized.append(f"{p} ({hw[1]}×{hw[0]})")
        rows.append(dict(path=str(p.relative_to(root)), label=c, split=split_name,
                         video=video, frame=frame))
    if not rows:
        return pd.DataFrame(columns=INDEX_COLUMNS), bad
    df = assign_folds(pd.DataFrame(rows), n_folds, split, seed)[INDEX_COLUMNS]
    df.attrs["resized"], df.attrs["transparent"] = resized, transparent
    return df, bad


def _transparent(path: Path) -> bool:
    """Whether a PNG has pixels that are not opaque (the loader puts them on white)."""
    return dl.png_alpha(path) is not None


def _fetch_url(url: str, dest: Path, expected_size: int | None = None) -> Path:
    """Download with a progress bar, resuming a partial file (HTTP Range), then check the size."""
    import urllib.error
    import urllib.request
    part = dest.with_suffix(dest.suffix + ".part")
    have = part.stat().st_size if part.exists() else 0
    total = None
    try:
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        r = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if not (have and e.code == 416):    # 416: nothing past `have`, the .part is complete
            raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
        r = None
    except (urllib.error.URLError, OSError, ValueError) as e:   # no network, bad host or URL
        raise DataError(f"cannot download {url}: {getattr(e, 'reason', e)}. Check the address and "
                        f"the network, or download the archive yourself and pass --from "
                        f"<file.zip>") from None
    if r is not None:
        with r:
            if have and r.status != 206:    # the server ignored the range: start again
                have = 0
            total = r.headers.get("Content-Length")
            total = int(total) + have if total is not None else None
            with open(part, "ab" if have else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    size = part.stat().st_size
    want = expected_size or total
    if want is not None and size != want:
        raise DataError(f"download of {url} is {size} bytes, expected {want}: rerun the same "
                        f"command to resume it, or delete {part} to start over")
    os.replace(part, dest)
    return dest


def _zip_stamp(src: Path) -> str:
    """A zip's size and mtime: which version of it an unpacked folder holds."""
    return f"{src.stat().st_size} {src.stat().st_mtime_ns}"


@contextlib.contextmanager
def _unpack(src: Path, dest: Path):
    """Unpack a zip into a temporary folder beside dest and yield it; only if the block
    succeeds (the new images indexed) does it replace dest. If dest already holds this very
    zip (its size and mtime are stamped in dest/.source), yield dest itself."""
    stamp = _zip_stamp(src)
    if (dest / ".source").is_file() and (dest / ".source").read_text() == stamp:
        yield dest
        return
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".unzip-"))
    try:
        try:
            with zipfile.ZipFile(src) as z:
                bad = z.testzip()
                if bad is not None:
                    raise DataError(f"{src} is damaged (member {bad} fails its CRC check): "
                                    f"download it again")
                z.extractall(tmp)
        except zipfile.BadZipFile as e:
            raise DataError(f"{src} is damaged ({e}): download it again") from e
        (tmp / ".source").write_text(stamp)
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def data_out(out: Path | str | None) -> Path:
    """`data --out`: the repository's data/ (where training reads) by default; a path given is
    taken from the working directory, as every other --out is."""
    return ROOT / "data" if out is None else Path(out).resolve()


SOURCE_STAMP = "source.txt"    # in a data folder: what its index.csv was made from (source_stamp)


def source_stamp(src: Path | str, classes=None, split: str = "grouped", seed: int = 0) -> str:
    """What an index is made from: the --from path (resolved; a zip's size and mtime too), the
    classes, the split and its seed. `data --if-changed` re-indexes only when it differs."""
    src = Path(src).resolve()
    zip_version = _zip_stamp(src) if src.is_file() else ""
    return (f"{src}\n{zip_version}\nclasses {sorted(classes) if classes else 'default'}\n"
            f"split {split} seed {seed}\n")


def up_to_date(out: Path, stamp: str) -> bool:
    """Whether out/index.csv was made from `stamp`'s source, whole (no switch left half-done)."""
    return ((out / "index.csv").exists() and not (out / dl.SWITCHING).exists()
            and (out / SOURCE_STAMP).exists() and (out / SOURCE_STAMP).read_text() == stamp)


def prepare_data(src: Path | str | None = None, url: str | None = None, synthetic: bool = False,
                 out: Path | str | None = None, classes=None, split: str = "grouped",
                 seed: int = 0, skip_bad: bool = False, synthetic_size: int = 100) -> pd.DataFrame:
    """The `data` command: put the images at out/fruits-360 (a link, or the unpacked zip) and
    write out/index.csv. Sources: a folder or .zip (src), a URL, or the synthetic set. out:
    data_out's (default: the repository's data/; a relative path from the working directory).
    A --from source is recorded in out/source.txt (source_stamp)."""
    out = data_out(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = source_stamp(src, classes, split, seed) if src is not None and not synthetic else None
    _remove_leftovers(out)
    if synthetic:
        src = make_synthetic(out / "synthetic-fruits", size=synthetic_size, seed=seed)
    elif url:
        src = _fetch_url(url, out / Path(url.split("?")[0]).name)
    if src is None:
        raise DataError("no data source: pass --from PATH, --url URL or --synthetic")
    src = _check_source(Path(src).resolve())
    if src.suffix.lower() == ".zip":
        if not zipfile.is_zipfile(src):
            raise DataError(f"{src} is not a valid zip file: download it again")
        # one folder per version of the zip: the link, switched with index.csv, says which
        version = hashlib.sha1(_zip_stamp(src).encode()).hexdigest()[:8]
        dest = out / f"{src.stem}-unpacked-{version}"
        with _unpack(src, dest) as staged:              # dest is made only on success
            root = _find_split_dirs(staged)["Training"].parent
            index = _index_folder(root, out, classes, split, seed, skip_bad)
        root = dest / root.relative_to(staged)
    else:
        root = _find_split_dirs(src)["Training"].parent
        index = _index_folder(root, out, classes, split, seed, skip_bad)
    (out / SOURCE_STAMP).unlink(missing_ok=True)        # written again once the switch is whole
    _switch_data(out, index, root)
    if stamp:
        with atomic_path(out / SOURCE_STAMP) as tmp:
            tmp.write_text(stamp)
    if src.suffix.lower() == ".zip":                   # older versions, now unused
        for old in set(out.glob(f"{src.stem}-unpacked*")) - {dest}:
            shutil.rmtree(old, ignore_errors=True)
    return index


def _switch_data(out: Path, index: pd.DataFrame, root: Path) -> None:
    """Switch out/index.csv and the link out/fruits-360 to the new images together: a marker
    (dl.SWITCHING) stands while both change, so that load_index refuses the mismatched pair a kill
    between the two would leave, until `data` runs again."""
    marker = out / dl.SWITCHING
    with atomic_path(out / "index.csv") as tmp:
        index.to_csv(tmp, index=False)              # a failure here has switched nothing
        marker.write_text(f"{root}\n")
    _switch_link(out / "fruits-360", root)
    marker.unlink()


def _switch_link(link: Path, root: Path) -> None:
    """Point link at root in one step: a new link under a temporary name renamed onto it. A real
    folder at link is the source itself and stays."""
    if link.exists() and not link.is_symlink() and not link.is_file():
        return
    new = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    new.unlink(missing_ok=True)
    new.symlink_to(root, target_is_directory=True)
    os.replace(new, link)


def _remove_leftovers(out: Path) -> None:
    """Remove what a killed `data` left in out: temporary files (of index.csv, the link) and the
    folders of an interrupted unzip or synthetic set."""
    remove_partial(out)
    for d in (*out.glob(".unzip-*"), *out.glob(".synthetic-*")):
        print(f"removing {d}, left by an interrupted unpack")
        shutil.rmtree(d, ignore_errors=True)


def _check_source(src: Path) -> Path:
    """--from: an existing folder or .zip."""
    if not src.exists() and not src.is_symlink():
        raise DataError(f"{src} does not exist: check the path given to --from")
    if src.is_file() and src.suffix.lower() != ".zip":
        unpack = (f" Unpack it first (`tar xf {src.name}`) and pass the folder it makes"
                  if src.suffix.lower() in TAR_SUFFIXES else "")
        raise DataError(f"{src} is not a folder or a .zip: --from takes a folder that holds "
                        f"Training/ and Test/, or a .zip of one.{unpack}")
    return src


TAR_SUFFIXES = (".tar", ".gz", ".tgz", ".bz2", ".xz")


ALL_CLASSES = ["*every class*"]                   # `data --all-classes`


def committed_classes() -> list:
    """The class names the committed models store (tools/add_model_classes.py wrote them), else
    the shared subset's."""
    for path in sorted((ROOT / "data" / "checkpoints").rglob("*.pt")):
        if classes := load_checkpoint(path).get("classes"):
            return list(classes)
    return sorted(SUBSET_CLASSES)


def _index_folder(root: Path, out: Path, classes, split: str, seed: int,
                  skip_bad: bool) -> pd.DataFrame:
    """build_index of root, reporting what it skipped or resized; nothing is written."""
    link = out / "fruits-360"
    if classes is None and root.resolve() == SHARED_SUBSET.resolve():
        classes = SUBSET_CLASSES
    elif classes is None:                      # the classes the committed models were trained on
        models = committed_classes()
        available = sorted(p.name for p in _find_split_dirs(root)["Training"].iterdir()
                           if p.is_dir())
        if set(models) <= set(available) and len(available) > len(models):
            print(f"indexing the {len(models)} classes of the committed models, of the "
                  f"{len(available)} in {root} (--all-classes: every class; --classes NAME …: "
                  f"others)")
            classes = models
    if classes == ALL_CLASSES:
        classes = None
    if link.exists() and not link.is_symlink() and link.resolve() != root.resolve():
        raise DataError(f"{link} is a real folder, not a link this command made: move it away "
                        f"(or pass --from {link}) — it is not deleted")
    index, bad = build_index(root, classes, split=split, seed=seed, skip_bad=skip_bad)
    if bad:
        print(f"skipped {len(bad)} files (unreadable, not {'/'.join(IMAGE_EXTS)}, named "
              f"outside the dataset's scheme, or folders):\n  " + "\n  ".join(bad))
    resized = index.attrs.get("resized", [])
    if resized:
        print(f"warning: {len(resized)} images are not square (first: {resized[0]}); they are "
              f"resized to a square, so their aspect ratio changes")
    transparent = index.attrs.get("transparent", [])
    if transparent:
        print(f"note: {len(transparent)} images have transparent pixels (first: {transparent[0]}); "
              f"they are put on a white background, as Fruits-360's fruit are")
    if index.empty:
        raise DataError(f"no readable image in {root}: nothing indexed")
    return index


def make_synthetic(root: Path | str, n_classes: int = 3, frames: int = 40, size: int = 100,
                   seed: int = 0) -> Path:
    """A small, deterministic fake Fruits-360: coloured blobs on white, 'rotating' over frames,
    two videos per class ('' and 'r'), every 4th frame in Test/. For tests and offline use only —
    never real results."""
    from PIL import Image, ImageDraw
    root = Path(root)
    settings = f"n_classes={n_classes} frames={frames} size={size} seed={seed}"
    if (root / ".complete").is_file() and (root / ".complete").read_text() == settings:
        return root
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp(dir=root.parent if root.parent.exists() else None,
                                prefix=".synthetic-"))
    try:
        for c in range(n_classes):
            colour = tuple(int(v) for v in rng.integers(30, 220, 3))
            aspect = 0.6 + 0.4 * rng.random()
            for video in ("", "r"):
                for f in range(frames):
                    split = "Test" if f % 4 == 3 else "Training"
                    d = tmp / split / f"Fake {c} 1"
                    d.mkdir(parents=True, exist_ok=True)
                    im = Image.new("RGB", (size, size), (255, 255, 255))
                    draw = ImageDraw.Draw(im)
                    phase = 2 * math.pi * f / frames
                    rx, ry = size * 0.35 * (0.75 + 0.25 * math.cos(phase)), size * 0.35 * aspect
                    cx, cy = size / 2, size / 2
                    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
                    hx = cx + rx * 0.5 * math.sin(phase)
                    draw.ellipse([hx - size * .06, cy - ry * .6, hx + size * .06, cy - ry * .3],
                                 fill=tuple(min(255, v + 60) for v in colour))
                    name = f"{video + '_' if video else ''}{f}_100.jpg"
                    im.save(d / name, quality=95)
        (tmp / ".complete").write_text(settings)
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# -----------------------------------------------------------------------------------------------
# report: report/template.md filled from the tables in figures/


# The generation and guidance tables' columns of dl.precision_coverage, beside FFD: fidelity
# (precision) and coverage, each with its real-vs-real floor at the set's n. Density stays in
# the CSVs: real images score 0.8 on it (training and test are other videos), not near 1.
MANIFOLD_COLUMNS = ("precision", "precision_floor", "coverage", "coverage_floor")


def _report_fields(figs: Path, recipe: str = "") -> dict:
    """Named pieces of the report (markdown tables and headline numbers) from figures/*.csv;
    a piece whose table is not there yet is left out (write_report marks it missing). recipe:
    the generation model's (recipe_of), whose time-to-quality table the ttq_ fields read."""
    def csv(name):
        p = figs / f"{name}.csv"
        return pd.read_csv(p) if p.exists() else None

    f = {}
    if (t1 := csv("table1_ssim")) is not None:
        mean = t1.groupby(["method", "t"]).ssim_mean.mean()
        for method, key in (("corrected", "corrected"), ("report-faithful", "report")):
            if method in t1.method.values:
                f[f"table1_{key}"] = to_markdown(table1_wide(t1, method))
                for t in (50, 500, 1000):
                    f[f"ssim{t}_{key}"] = f"{mean[method, t]:.3f}"
                f[f"folds_{key}"] = str(t1[t1.method == method].fold.nunique())
        f["n_eval"] = str(int(t1.n.iloc[0]))
        psnr = t1.groupby(["method", "t"]).psnr_mean.mean().unstack("method")
        f["table1_psnr"] = to_markdown(psnr.loc[[50, 100, 200, 500, 1000]].round(2).reset_index())
        for method, key in (("corrected", "corrected"), ("report-faithful", "report")):
            for t in (50, 200, 500, 800):
                d = t1[(t1.method == method) & (t1.t == t)]
                if len(d):
                    f[f"psnr{t}_{key}"] = f"{d.psnr_mean.mean():.1f}"
        if "ssim_std_batch" in t1:       # ± over single images and over 64-image batch means
            std = (t1[t1.t.isin([50, 200, 500, 800])].groupby(["method", "t"])
                   [["ssim_std", "ssim_std_batch"]].mean())
            f["table1_std"] = to_markdown(std.assign(ratio=std.ssim_std / std.ssim_std_batch)
                                          .round(4).reset_index())
    if (vs := csv("table1_vs_report")) is not None:
        f["table1_vs_report"] = to_markdown(vs.round(3))
        if "corrected 100" in vs:
            f.update(_resolution_fields(vs.set_index("t")))
    if (tn := csv("native/table1_native")) is not None:            # notebook 04, 100×100 models
        table, say = native_findings(tn, report_table1())
        f["native_table"], f["native_findings"] = to_markdown(table), " ".join(say)
        f["native_verdict"] = native_verdict(tn, report_table1())
        f["native_n"] = str(int(tn.n.iloc[0]))
        f["native_tv"] = next(m for m in tn.method.unique() if m.startswith("TV denoiser"))
    if (tc := csv("native/tv_weight_choice")) is not None:
        f["native_tv_choice"] = to_markdown(tc.round(4))
    if (ts := csv("native/training_summary")) is not None:
        f["native_training_table"] = to_markdown(ts)
        f["native_minutes_range"] = (f"{ts.minutes.min():.0f}" if ts.minutes.nunique() == 1 else
                                     f"{ts.minutes.min():.0f}–{ts.minutes.max():.0f}")
    if (f5 := csv("native/figure5_brightness")) is not None:        # notebook 05, 100×100
        by_t = csv("native/figure5_brightness_by_t")
        f["figure5_native_table"] = to_markdown((by_t if by_t is not None else f5).round(3))
        b = f5.set_index("images")["mean"]
        black = lambda m: "converges to black" if m < 0.2 else "does not converge to black"
        low = (lambda k: f", lowest along the chain {by_t[k].min():.2f}") if by_t is not None \
            else (lambda k: "")
        run = csv("native/figure5_run")
        how = (f", `make figure5-native`, run once: {run.seconds[0] / 60:.0f} min on {run.cpu[0]}, "
               f"{run.threads[0]} thread{'s' * (int(run.threads[0]) != 1)}" if run is not None else "")
        f["key_figure5_native"] = (
            f"At 100×100, with its own model trained at that size ({int(f5.n.iloc[1])} "
            f"samples{how}), "
            + "; ".join(f"{k} {black(b[k])} (mean brightness {b[k]:.2f}{low(k)})"
                        for k in b.index[1:3]) + f"; real test images: {b.iloc[0]:.2f}.")
    if (lk := csv("leakage")) is not None:
        f["leakage_table"] = to_markdown(lk.round(4))
        for split, r in lk[lk.when == "best epoch"].set_index("split").iterrows():
            key = "random" if split.startswith("random") else "grouped"
            f[f"leak_{key}"], f[f"leak_{key}_epoch"] = f"{r.test_over_val:.3f}", str(int(r.epoch))
            f[f"leak_{key}_val"], f[f"leak_{key}_test"] = f"{r.val_loss:.5f}", f"{r.test_loss:.5f}"
    if (f5 := csv("figure5_brightness")) is not None:
        f["figure5_table"] = to_markdown(f5.round(3))
        b = f5.set_index("images")["mean"]
        real, first, iterative = b.iloc[0], b.iloc[1], b.iloc[2]
        black = lambda m: "converges to black" if m < 0.2 else "does not converge to black"
        f["key_figure5"] = (f"With its own model the report's first sampler {black(first)} (mean "
                            f"brightness {first:.2f}) and its iterative method {black(iterative)} "
                            f"({iterative:.2f}); real test images: {real:.2f}.")
    if (g := csv("generation_metrics")) is not None:
        cols = ["sampler", "n", "ffd", "ffd_std", "ffd_floor", "ffd_floor_std", "ffd_ratio",
                "ffd_ratio_std", *MANIFOLD_COLUMNS, "kid", "kid_std", "recognizability",
                "recognizability_ratio", "classes_covered", "nn_ssim_mean", "nn_ssim_max",
                "seconds_per_image"]
        f["generation_table"] = to_markdown(g[[c for c in cols if c in g]])
        row = g.set_index("sampler")
        for name, key in GEN_KEYS.items():
            if name in row.index:
                for col in ("ffd", "ffd_std", "ffd_floor", "ffd_ratio", *MANIFOLD_COLUMNS, "kid",
                            "recognizability", "recognizability_ratio", "classes_covered",
                            "nn_ssim_max", "n", "seconds_per_image"):
                    v = row.loc[name, col] if col in row else np.nan
                    f[f"{key}_{col}"] = "n/a" if pd.isna(v) else f"{v:.3g}"
        f["classifier_acc"] = f"{g.classifier_test_acc.iloc[0]:.3f}"
        f["n_ffd"] = str(int(g[g.ffd.notna()].n.max())) if g.ffd.notna().any() else "n/a"
        f["manifold_k"], f["manifold_min_n"] = str(dl.MANIFOLD_K), str(dl.MANIFOLD_MIN_N)
    if (sr := csv("scale_response")) is not None:
        f["scale_table"] = to_markdown(sr.round(4))
        for model, d in sr.groupby("model"):
            f[f"scale_{model}_1000"] = f"{d.set_index('t').ratio[1000]:.3f}"
    if (h := csv("training_summary")) is not None:
        f["training_table"] = to_markdown(h)
        folds = h[h.run.str.startswith("eps-grouped/fold")]
        if len(folds):
            f["fold_epochs"] = ", ".join(str(int(e)) for e in folds.epochs)
            f["fold_minutes"] = f"{folds.minutes.sum():.0f}"
            f["fold_minutes_range"] = f"{folds.minutes.min():.0f}–{folds.minutes.max():.0f}"
            f["folds_early_stopped"] = str(int(folds.early_stopped.sum()))
        stopped = int(h.early_stopped.sum())
        f["early_stopping"] = ("Early stopping never fired: every run of the training table used "
                               "all its epochs." if stopped == 0 else
                               f"Early stopping ended {stopped} of {len(h)} runs.")
    if (gt := csv("generation_training")) is not None:            # `train --fold all`'s summary
        f["generation_training_table"] = to_markdown(gt)
        f["gen_minutes"], f["gen_img_s"] = f"{gt.minutes[0]:.1f}", f"{gt.images_per_s[0]:,.0f}"
        f["gen_best_val_loss"] = f"{gt.best_val_loss[0]:.4g}"
        f["gen_epochs"] = str(int(gt.epochs[0]))
    tables = [pd.read_csv(p).assign(run=p.stem.removeprefix("recipe_"))
              for p in sorted(figs.glob("recipe_*.csv"))]             # `evaluate --what curve`
    chosen = [t for t in tables if t.recipe.iloc[0] == recipe]
    if chosen:                                    # the time to quality of GENERATION's recipe
        tq = chosen[0].drop(columns=["run", "recipe"])
        f["ttq_recipe"] = chosen[0].recipe.iloc[0]
        f["ttq_table"] = to_markdown(tq.round(3))
        ok = tq[(tq.ffd_ratio < 3) & (tq.recognizability >= 0.95)]
        f["ttq_cross"] = (f"{ok.minutes.iloc[0]:.0f} min (epoch {int(ok.epoch.iloc[0])})"
                          if len(ok) else "not within the run")
        last = tq.iloc[-1]
        f["ttq_last_epoch"], f["ttq_last_min"] = str(int(last.epoch)), f"{last.minutes:.0f}"
        f["ttq_last_ffd_ratio"] = f"{last.ffd_ratio:.2f}"
        f["ttq_last_rec"] = f"{last.recognizability:.3f}"
        f["ttq_n"] = str(int(last.n))
        r = dict(kv.split("=") for kv in f["ttq_recipe"].split(", "))   # EMA's warm-up (EMA)
        d, steps = float(r["ema_decay"]), int(last.images) // int(r["batch_size"])
        f["ttq_steps"], f["ema_last_decay"] = f"{steps:,}", f"{(1 + steps) / (10 + steps):.5f}"
        f["ema_binds_step"] = f"{math.ceil((10 * d - 1) / (1 - d) - 1e-6):,}"
        f["ttq_recipe_ema"] = r["ema_decay"]
    if tables:                                                # every recipe measured
        t = pd.concat(tables)
        t["ffd_ratio_std"] = dl.ratio_spread(t.ffd, t.ffd_std, t.ffd_floor, t.ffd_floor_std)
        last = t[t.epoch == t.epoch.max()]
        f["recipe_images"] = " or ".join(f"{v:,}" for v in sorted(last.images.unique()))
        f["recipe_threads"] = " or ".join(str(int(v)) for v in last.threads.unique())
        f["recipe_cpu"] = " or ".join(last.cpu.unique())
        f["recipes_table"] = to_markdown(t[["run", "epoch", "minutes", "ffd_ratio", "ffd_ratio_std",
                                            "kid", "recognizability"]].round(3))
        f["recipes_settings"] = to_markdown(t.drop_duplicates("run")[["run", "recipe"]])
        for run, d in t.groupby("run"):                      # each recipe's last snapshot
            key = "recipe_" + re.sub(r"\W", "_", run)
            f[f"{key}_ffd_ratio"] = f"{d.ffd_ratio.iloc[-1]:.1f}"
            f[f"{key}_rec"] = f"{d.recognizability.iloc[-1]:.2f}"
    if (gd := csv("guidance")) is not None:                          # notebook 05, section 5
        cols = ["set", "w", "n", "accuracy", "min_class_accuracy", "recognizability", "ffd",
                "ffd_vs_unconditional", "ffd_vs_unconditional_std", *MANIFOLD_COLUMNS, "kid",
                "kid_vs_unconditional", "nn_ssim_max"]
        f["guidance_table"] = to_markdown(gd[[c for c in cols if c in gd and gd[c].notna().any()]]
                                          .round(3))
        w = pick_w(gd)
        g = gd[gd.set == "conditional model"].set_index("w")
        r, real = g.loc[w], gd.set_index("set").loc["real: test images"]
        f["guidance_w"], f["guidance_n_per_class"] = f"{w:g}", str(int(gd.n_per_class.iloc[0]))
        for col in ("accuracy", "min_class_accuracy", "recognizability", "nn_ssim_max"):
            f[f"guidance_{col}"] = f"{r[col]:.3f}"
        f["guidance_real_nn_ssim_max"] = f"{real.nn_ssim_max:.3f}"
        key = "ffd" if g.ffd.notna().any() else "kid"
        f["guidance_measure"] = f"{key.upper()} " + n_text(r[f"{key}_vs_unconditional"], r["n"], ".2f",
                                                            "× the unconditional model's")
        f["guidance_by_w"] = (f"From w = {g.index.min():g} to w = {g.index.max():g}, accuracy on the "
                              f"requested class goes {' → '.join(f'{a:.2f}' for a in g.accuracy)} "
                              f"and {key.upper()} against the test images "
                              f"{' → '.join(f'{v:.3g}' for v in g[key])} (w = "
                              f"{', '.join(f'{v:g}' for v in g.index)}).")
    if (gc := csv("guidance_by_class")) is not None:
        f["guidance_class_table"] = to_markdown(
            gc.pivot(index="cls", columns="w", values="accuracy").round(3).reset_index())
    if (ss := csv(dl.SEED_FILES[1])) is not None:                   # `make generation-seeds`
        f.update(_seed_fields(ss, csv(dl.SEED_FILES[2]), csv("generation_metrics"), csv("guidance")))
    if (b := csv("bench")) is not None:                                      # `make bench`
        cols = ["cpu", "bf16_native", "model", "size", "batch", "mode", "n_params", "train_img_s",
                "sample_img_s", "achieved_gflops", "mfu", "paired_ratio"]
        f["bench_table"] = to_markdown(b.loc[b.train_img_s.notna(), [c for c in cols if c in b]])
        what = [f"{int(b.threads.iloc[0])} threads" if "threads" in b else "",
                f"CPU {b.cpu.iloc[0]}" if "cpu" in b else "",
                f"torch {b.torch.iloc[0]}" if "torch" in b else ""]
        f["bench_provenance"] = "measured with " + (", ".join(w for w in what if w) or
                                                    "settings it does not record")
    return f


# generation_metrics' sets that the report names, by the key of their fields
GEN_KEYS = {"report's method, report's U-Net": "reportgen",
            "DDPM-1000, report's U-Net": "ddpm_fold0",
            "DDIM-50 (η = 0), report's U-Net, x̂0 clipped": "ddim50clip_fold0",
            "DDIM-50 (η = 0), report's U-Net": "ddim50_fold0",
            "DDPM-1000, preconditioned": "ddpm_gen",
            "DDIM-50 (η = 0), preconditioned": "ddim50_gen",
            "DDIM-20 (η = 0), preconditioned": "ddim20_gen",
            "real: test images": "real", "real: training images": "floor"}


def _seed_fields(summary: pd.DataFrame, run: pd.DataFrame | None, gen: pd.DataFrame | None,
                 guid: pd.DataFrame | None) -> dict:
    """The report's pieces from `make generation-seeds`' tables: the run, the cause table (its
    rows, what each change did, the chain), and the held-out seeds beside seed 0's sets of the
    generation and guidance tables (`held_<key>`: a set's quality in words)."""
    causes = dl.cause_table(summary)
    f = {"causes_table": to_markdown(causes.drop(columns="what it did")),
         "causes_did": "\n".join(f"- **{r.row}** ({r['from']}): {r['what it did']}."
                                 for _, r in causes.iloc[1:].iterrows()),
         "cause_chain": dl.cause_chain(summary)}
    c = summary[summary.table == "causes"].set_index("set")
    f["causes_n"], f["held_seeds"] = str(int(c.n.iloc[0])), c.seeds.iloc[0]
    for name, r in c.iterrows():
        f[f"cause_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}"] = dl.quality_text(r)
    held = summary.set_index("set")
    for name, key in GEN_KEYS.items():
        if name in held.index:
            f[f"held_{key}"] = dl.quality_text(held.loc[name])
    if run is not None:
        r = run.iloc[0]
        f["seeds_run"] = (f"{r.cells} sets × seeds, {r.cpu_seconds / 60:.0f} CPU-minutes on {r.cpu} "
                          f"({r.threads} thread{'s' * (int(r.threads) != 1)} a process)")
    if gen is not None and "seed" in gen:
        f["held_generation_table"] = to_markdown(dl.beside_held_out(
            gen, gen.sampler.tolist(), summary, "generation", int(gen.seed.iloc[0])))
    if guid is not None and "seed" in guid:
        f["held_guidance_table"] = to_markdown(dl.beside_held_out(
            guid, dl.guidance_names(guid), summary, "guidance", int(guid.seed.iloc[0])))
        w = pick_w(guid)
        h = held.loc[f"conditional model, w = {w:g}"]
        f["guidance_held"] = (f"on seeds {h.seeds}, which the choice never saw: accuracy "
                              f"{dl.pm(h.accuracy, h.accuracy_std)}, {dl.quality_text(h)}")
        f["guidance_seed"] = str(int(guid.seed.iloc[0]))
    return f


def _resolution_fields(vs: pd.DataFrame) -> dict:
    """The report's fold 0 and range, ours at 32×32 and upsampled to 100×100, and the ceiling at
    t = 50, 250, 500, 800, 1000 (a table), and the split of the gap to the report at low and high
    t into resolution (32×32 → upsampled) and model (what remains), in words."""
    rep0 = report_table1().query("fold == 0").set_index("t").ssim_mean
    ts = [t for t in (50, 250, 500, 800, 1000) if t in vs.index]
    methods = [m for m in ("corrected", "report-faithful") if f"{m} 100" in vs]
    cols = {"report fold 0": rep0[ts], "report range": [f"{vs.loc[t, 'report lowest']:.3f}–"
                                                        f"{vs.loc[t, 'report highest']:.3f}" for t in ts]}
    for m in methods:
        cols[f"{m} 32×32"], cols[f"{m} upsampled 100"] = vs.loc[ts, m], vs.loc[ts, f"{m} 100"]
    cols["ceiling 100"] = vs.loc[ts, "ceiling 100"]
    table = pd.DataFrame(cols, index=pd.Index(ts, name="t")).round(3).reset_index()
    words = []
    for t, when in ((50, "low"), (800, "high")):
        r, lo, hi = vs.loc[t, ["report", "corrected", "corrected 100"]]
        words.append(f"At {when} t (t = {t}) the report's folds average {r:.3f}; our corrected "
                     f"models score {lo:.3f} at 32×32 ({lo - r:+.3f} from the report's) and "
                     f"{hi:.3f} upsampled to 100×100: scoring at 100×100 moves our score by "
                     f"{hi - lo:+.3f}, leaving {hi - r:+.3f} between our upsampled models and the "
                     f"report's (a proxy for resolution: the 100×100 models measure it).")
    return dict(resolution_table=to_markdown(table), resolution_split=" ".join(words),
                ceiling_ssim=f"{vs['ceiling 100'].iloc[0]:.3f}",
                report50_range=f"{vs.loc[50, 'report lowest']:.3f}–{vs.loc[50, 'report highest']:.3f}")


def write_report(cfg: Config, template: Path | str | None = None, figs: Path | str | None = None,
                 out: Path | str | None = None) -> Path:
    """report/report.md from report/template.md: `${name}` fields come from _report_fields,
    figure links to ../figures/*.png are kept when the figure exists. Anything not produced yet
    is marked as missing in the text (never made up). The smoke profile writes to runs/smoke."""
    import string
    figs = Path(figs) if figs else (cfg.fig_dir() if cfg.profile == "smoke" else ROOT / "figures")
    template = Path(template) if template else ROOT / "report" / "template.md"
    out = Path(out) if out else (ROOT / "report" / "report.md" if cfg.profile != "smoke"
                                 else figs.parent / "report.md")
    fields = _report_fields(figs, recipe_of(generation_config(cfg)))
    if not fields:
        raise DataError(f"{figs} holds none of the report's tables: {out} is left as it is. "
                        f"Produce them first (`make figures`, or the notebooks)")
    text = string.Template(template.read_text()).safe_substitute(fields)
    text = re.sub(r"\$\{(\w+)\}", r"*(\1: not produced yet, run `make figures`)*", text)
    rel = os.path.relpath(figs, out.parent)

    def fig(m):
        name = m.group(2)
        if (figs / name).exists():
            return f"![{m.group(1)}]({Path(rel, name).as_posix()})"
        return f"*(figure {name} not produced yet, run `make figures`)*"

    text = re.sub(r"!\[([^\]]*)\]\(\.\./figures/([^)]+)\)", fig, text)
    _keep_better(out, text, figs, template.read_text())
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return out


# The sample sizes in a report (issue 44: notebook 05 at its defaults): a new report from smaller
# samples than the one it would replace is refused. Each is read where the template puts it.
REPORT_SIZES = ("n_ffd", "guidance_n_per_class", "ttq_n")


def _report_sizes(text: str, template: str) -> dict:
    """{size field: its value in text ('n/a' or digits)}, found after the literal words that
    precede ${field} in the template."""
    sizes = {}
    for key in REPORT_SIZES:
        i = template.find("${" + key + "}")
        pre = template[max(0, i - 24):i].split("}")[-1] if i >= 0 else ""
        if len(pre.strip()) >= 3 and (m := re.search(re.escape(pre) + r"(\d+|n/a)", text)):
            sizes[key] = m.group(1)
    return sizes


def _keep_better(out: Path, text: str, figs: Path, template: str = "") -> None:
    """Refuse to replace a report with one that has more pieces missing (inputs deleted), one
    with a metric at n/a, or one from smaller samples than the report it would replace."""
    gap = "not produced yet"
    old_text = out.read_text() if out.exists() else None
    old = old_text.count(gap) if old_text is not None else None
    if old is not None and text.count(gap) > old:
        raise DataError(f"{out} has {old} missing pieces, a new one would have "
                        f"{text.count(gap)} (tables or figures absent from {figs}): {out} is kept. "
                        f"Produce them (`make figures`), or delete {out} to write it anyway")
    if old_text is None:
        return
    new_n, old_n = _report_sizes(text, template), _report_sizes(old_text, template)
    smaller = [f"{k} {new_n[k]} < {v}" for k, v in old_n.items() if k in new_n and v != "n/a"
               and (new_n[k] == "n/a" or int(new_n[k]) < int(v))]
    if smaller or ("n/a×" in text and "n/a×" not in old_text):
        why = ", ".join(smaller) or "a ratio at n/a×"
        raise DataError(f"the tables in {figs} come from smaller samples than {out} ({why}): "
                        f"{out} is kept. Regenerate them with `make figures`, or delete {out} "
                        f"to write it anyway")


# -----------------------------------------------------------------------------------------------
# the fruit classifier (the yardstick of sample quality): retrained only by `classifier`


def train_classifier(cfg: Config, progress: bool = True) -> FruitClassifier:
    """Train the fruit classifier on every training image (Training/, flips, Adam 1e-3, batch 64,
    EVAL's clf_epochs, seeded) and write it in half precision to classifier_path with its
    classes, image size and test accuracy (`python -m ddpm_cli classifier`)."""
    classes = sorted(load_index(cfg).label.unique())
    seed_everything(cfg.seed)                      # before the network: its initial weights too
    clf = FruitClassifier(len(classes))
    tr, te = split_data(cfg, "train", classes), split_data(cfg, "test", classes)
    opt = torch.optim.Adam(clf.parameters(), 1e-3)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in tqdm(range(EVAL[cfg.profile]["clf_epochs"]), desc="classifier", disable=not progress):
        clf.train()
        perm = torch.randperm(len(tr), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            x = to_float(tr.images[idx])
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
            loss = F.cross_entropy(clf(x), tr.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    state = {k: v.half() if v.is_floating_point() else v for k, v in clf.state_dict().items()}
    clf.load_state_dict(state)                     # scored as it is stored
    with torch.no_grad():
        acc = (clf(to_float(te.images)).argmax(1) == te.labels).float().mean().item()
    save_checkpoint({"model": state, "classes": classes, "test_acc": acc, "features": 4 * 32,
                     "image_size": cfg.image_size, "seed": cfg.seed}, classifier_path(cfg))
    return clf


# -----------------------------------------------------------------------------------------------
# time to quality: the generation run's EMA snapshots scored (evaluate --what curve)


# The settings a recipe experiment varies (time_to_quality's recipe column).
RECIPE_KEYS = ("sigma_data", "min_snr_gamma", "lr", "lr_warmup", "lr_decay", "ema_decay",
               "batch_size")


def recipe_of(cfg: Config) -> str:
    """cfg's RECIPE_KEYS as 'key=value, …' (time_to_quality's recipe column)."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                     for k in RECIPE_KEYS for v in [getattr(cfg, k)])


def time_to_quality(cfg: Config, n: int = 500, steps: int = 50, progress: bool = True,
                    run: Path | str | None = None) -> pd.DataFrame:
    """Score the EMA snapshots of the generation run (or of the run folder `run`, any recipe:
    its snapshots' own config) kept every snapshot_every epochs: n DDIM samples each (η = 0,
    not clipped, seed cfg.seed), their FFD with its bootstrap std against the floor at n, KID
    and recognizability. minutes: the training time the run measured up to that epoch
    (validation included), on the CPU and threads its history names."""
    gcfg = generation_config(cfg)
    run, dev = Path(run) if run else gcfg.run_dir("all"), get_device()
    snaps = sorted(run.glob("ema_epoch*.pt"))
    if not snaps:
        raise FileNotFoundError(f"no snapshots (ema_epoch*.pt) in {run}: they are kept while the "
                                f"generation model trains (`{train_command(gcfg, 'all')}`), "
                                f"every snapshot_every epochs")
    gcfg = Config(**{**load_checkpoint(snaps[0], need=("config",))["config"], "root": cfg.root})
    hist = pd.read_csv(run / "history.csv")
    classes, train_ds, test_imgs, clf, _ = scoring_setup(cfg, progress)
    per_epoch = (gcfg.steps_per_epoch or len(train_ds) // gcfg.batch_size) * gcfg.batch_size
    real_test = to_float(test_imgs)
    floor, floor_std = ffd_floor(clf, train_ds.images, real_test, n, seed=cfg.seed)
    real_test = classify(clf, real_test)[0]                  # every snapshot's reference
    fp, rows = Diffusion.from_config(gcfg).to(dev), []
    for path in tqdm(snaps, desc="snapshots", disable=not progress):
        epoch = load_checkpoint(path)["epoch"]
        model = load_model(gcfg, "all", path).to(dev)
        x, _ = sample(model, fp, "ddim", n, gcfg.image_size, cfg.seed, steps=steps, clip=False,
                      progress=False)
        q, h = quality(clf, x, real_test, None, len(classes)), hist[hist.epoch <= epoch]
        rows.append(dict(epoch=epoch, images=epoch * per_epoch, minutes=h.seconds.sum() / 60,
                         cpu=h.cpu.iloc[-1] if "cpu" in h else "not recorded",
                         threads=h.threads.iloc[-1] if "threads" in h else np.nan,
                         recipe=recipe_of(gcfg), n=n,
                         ffd=q["ffd"], ffd_std=q["ffd_std"], ffd_floor=floor,
                         ffd_floor_std=floor_std, ffd_ratio=q["ffd"] / floor, kid=q["kid"],
                         recognizability=q["recognizability"],
                         classes_covered=q["classes_covered"]))
    return pd.DataFrame(rows)


def plot_time_to_quality(curves: dict, ffd_aim: float = 3.0, rec_aim: float = 0.95,
                         axes=None):
    """time_to_quality's tables ({recipe: table}): FFD ÷ its floor (log scale, ± its bootstrap
    std) and recognizability against the measured training minutes, the aims dashed."""
    import matplotlib.pyplot as plt
    axes = axes if axes is not None else plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")[1]
    for name, df in curves.items():
        axes[0].errorbar(df.minutes, df.ffd_ratio, fmt="o-", label=name,
                         yerr=df.ffd_std / df.ffd_floor if "ffd_std" in df else None)
        axes[1].plot(df.minutes, df.recognizability, "o-", label=name)
    n = {int(df.n.iloc[0]) for df in curves.values()}
    aim = axes[0].axhline(ffd_aim, ls="--", color="grey", label=f"aim: {ffd_aim:g}× the floor")
    axes[0].set(yscale="log", ylabel="FFD ÷ floor", title=f"FFD (DDIM-50, n = {', '.join(map(str, sorted(n)))})")
    axes[1].axhline(rec_aim, ls="--", color="grey", label=f"aim: {rec_aim:g}")
    axes[1].set(ylim=(0, 1.02), ylabel="share with p ≥ 0.9", title="recognizability")
    for ax in axes:
        ax.set_xlabel("training minutes, as measured")
    axes[0].legend(handles=[aim], loc="center right")                      # the aim only
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))          # every recipe, outside
    return axes


# -----------------------------------------------------------------------------------------------
# command line


def _fold_arg(v: str):
    """--fold: 0..4 or 'all'."""
    if v == "all":
        return v
    if v.isdigit() and 0 <= int(v) < 5:
        return int(v)
    raise argparse.ArgumentTypeError(f"expected 0, 1, 2, 3, 4 or 'all', not {v!r}")


def _whole(lo: int, hi: int | None = None, why: str = ""):
    """A whole-number flag in [lo, hi]; why: what the upper bound is for."""
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {v!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be ≥ {lo}, not {n}")
        if hi is not None and n > hi:
            raise argparse.ArgumentTypeError(f"must be ≤ {hi:,}{why}, not {n:,}")
        return n
    return parse


def _number(lo: float, hi: float, what: str):
    """A real-number flag in [lo, hi] (nan and inf refused); what: its meaning, for the message."""
    def parse(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in [{lo:g}, {hi:g}], not "
                                             f"{v!r}") from None
        if not lo <= x <= hi:                                   # also refuses nan
            raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}] ({what}), not {v}")
        return x
    return parse


def _setting(v: str) -> tuple[str, object]:
    """--set KEY=VALUE: a Config field and its value, parsed as the field's type."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    key, eq, raw = v.partition("=")
    if not eq or key not in fields or key in ("profile", "root"):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY a Config setting ({', '.join(sorted(fields))}), not {v!r}")
    kind = bool if fields[key].default is None else type(fields[key].default)
    try:
        value = ({"true": True, "false": False}[raw.lower()] if kind is bool
                 else kind(raw) if kind in (int, float, str) else float(raw))
    except (KeyError, ValueError):
        what = {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, "text")
        raise argparse.ArgumentTypeError(f"{key} takes {what}, not {raw!r}") from None
    try:
        dl.check_setting(key, value)                  # the one range check (SETTING_RULES)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return key, value


# --eta, --w and --seed: what makes sense (|w| beyond MAX_W only saturates the picture)
_eta = _number(0, 1, "0: deterministic, 1: DDPM's variance")
MAX_W = 20.0
_guidance_w = _number(-MAX_W, MAX_W, "the guidance weight: 0 unconditional, 1 conditional, "
                                     "useful up to about 5")
_seed = _whole(0, 2**63 - 1, " (a seed is a 64-bit signed number)")
MAX_SAMPLES = 4096                      # one grid picture; more: several runs, other --seed


# What each profile is, for --help.
PROFILE_HELP = {"smoke": "synthetic fruit, a tiny model, seconds (tests, CI)",
                "cpu": "the real 10-class subset at 32×32, the report's protocol (2-core CPU)",
                "full": "the report's 100×100 setup (a GPU)",
                "native": "100×100 on a CPU: fold 0 fine-tuned from cpu's 32×32 weights",
                "smoke-native": "smoke's fold 0 fine-tuned at 24×24 (tests, CI)"}


def cmd_data(a) -> None:
    t0 = time.perf_counter()
    out = data_out(a.out)
    if a.all_classes:
        a.classes = ALL_CLASSES
    if a.if_changed and a.src and up_to_date(out, source_stamp(a.src, a.classes, a.split, a.seed)):
        print(f"{out / 'index.csv'} is up to date: it was made from {Path(a.src).resolve()}")
        return
    index = prepare_data(a.src, a.url, a.synthetic, out, a.classes, a.split, a.seed, a.skip_bad,
                         a.synthetic_size)
    counts = index[index.split == "train"].fold.value_counts().sort_index()
    print(f"{len(index)} images ({(index.split == 'train').sum()} train, "
          f"{(index.split == 'test').sum()} test, {index.label.nunique()} classes) → "
          f"{out / 'index.csv'} in {time.perf_counter() - t0:.1f} s; rows per fold: "
          + ", ".join(f"{k}: {v}" for k, v in counts.items()))


def cmd_train(a) -> None:
    if a.conditional and a.fold != "all":
        raise ValueError("--conditional is the class-conditional generation model: add --fold all")
    over = {k: v for k, v in dict(target=a.target, split=a.split, max_epochs=a.max_epochs,
                                   patience=a.patience).items() if v is not None}
    cfg = get_config(a.profile, generation=a.fold == "all", conditional=a.conditional,
                     **over, **dict(a.set))
    if a.set and a.out is None:
        raise ValueError("--set changes the recipe: give the run its own folder with --out")
    if cfg.target != "eps" and (cfg.sigma_data or cfg.min_snr_gamma):
        parts = [f"{k} {getattr(cfg, k):g}" for k in ("sigma_data", "min_snr_gamma")
                 if getattr(cfg, k)]
        fold_cmd = train_command(get_config(a.profile, target=cfg.target), 0)
        raise ValueError(
            f"--target {cfg.target} (the report-faithful target) cannot be trained with "
            f"{' and '.join(parts)} (EDM preconditioning and min-SNR weighting need target eps)"
            + (f": the generation model (--fold all) uses them. Train the report-faithful target "
               f"on a fold: `{fold_cmd}`" if a.fold == "all" else
               f": leave {' and '.join(p.split()[0] for p in parts)} out of --set"))
    ckpt = (Path(a.out) if a.out else cfg.run_dir(a.fold)) / "checkpoint.pt"
    if a.resume and "lr" not in dict(a.set) and ckpt.is_file():
        # the learning rate changes on resume only when --set lr asks (the NaN advice)
        cfg = dataclasses.replace(cfg, lr=load_checkpoint(ckpt)["config"].get("lr", cfg.lr))
    h = train(cfg, a.fold, resume=a.resume, out=a.out)
    if len(h):
        b = h.loc[h.val_loss.idxmin()]
        print(f"done: {len(h)} epochs, best val loss {b.val_loss:.4f} at epoch {b.epoch:.0f}, "
              f"{h.images_per_s.median():.0f} img/s")
        if a.fold == "all" and a.out is None:                  # the generation model's run
            save_generation_summary(cfg, h)


def save_generation_summary(cfg: Config, history: pd.DataFrame) -> None:
    """The generation model's training table (generation_training[_cond]), from its history:
    written when its run ends (train) and when it is exported for committing (export)."""
    s = pd.DataFrame([run_summary(cfg, "all", history)])
    print(f"summary → {save_table(s, 'generation_training' + '_cond' * bool(cfg.n_classes), cfg)}")


def cmd_train_all(a) -> None:
    cfg = get_config(a.profile)
    for over, fold in planned_runs(cfg.profile):
        c = get_config(cfg.profile, generation=fold == "all", **over)
        out = run_out(a.out and Path(a.out).resolve(), c, fold)
        if a.out is None and uses_committed(c, fold, a.retrain):
            print(f"== {out}: committed ({committed_dir(c, fold).relative_to(c.home)}), "
                  f"not trained (--retrain trains it)", flush=True)
            continue
        print(f"== {out}", flush=True)
        ddpm_train.train(c, fold, resume=True, out=out)


def cmd_submit(a) -> None:
    profile = get_config(a.profile).profile
    sl = Slurm(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Slurm)})
    r = submit(profile, sl, a.out and Path(a.out).resolve(), a.max_epochs, a.wait, a.dry_run,
               a.tasks)
    logs = Path(a.out or ROOT / "runs" / profile) / "slurm"
    print(r if a.dry_run else f"submitted job array {r} ({a.tasks or len(planned_runs())} "
          f"tasks; script and logs in {logs})")


def cmd_evaluate(a) -> None:
    cfg = get_config(a.profile)
    if a.what in ("table1", "both"):
        vs = save_table1(cfg, table1(cfg))
        print(f"Table 1 → {cfg.fig_dir()}/table1_*.csv, 04_ssim_vs_t.png")
        print(vs.round(3).to_string(index=False))
    if a.what in ("generation", "both"):
        df, _ = generation_metrics(cfg, story_models(cfg), a.n)
        print(f"generation metrics → {save_table(df, 'generation_metrics', cfg)}")
        print(df.to_string(index=False))
    if a.what == "curve":
        df = time_to_quality(cfg, a.n or 500, run=a.run)
        name = "recipe_" + Path(a.run or "generation").name
        print(f"time to quality → {save_table(df, name, cfg)} (`report` draws the curves)")
        print(df.to_string(index=False))
    if a.what == "guidance":
        df, per, xs = guidance_metrics(cfg, a.n or 50)
        w = save_guidance(cfg, df, per, xs, sorted(load_index(cfg).label.unique()))
        print(f"guidance → {cfg.fig_dir()}/guidance*.csv, 05_guidance*.png (w = {w:g})")
        print(df.to_string(index=False))


def cmd_classifier(a) -> None:
    cfg = get_config(a.profile)
    train_classifier(cfg)
    clf, classes, acc = load_classifier(cfg)
    print(f"fruit classifier ({len(classes)} classes, {cfg.image_size}px, 128 features) → "
          f"{classifier_path(cfg)}: test accuracy {acc:.4f}")


def cmd_export(a) -> None:
    over = {k: v for k, v in dict(target=a.target, split=a.split).items() if v}
    cfg = get_config(a.profile, generation=a.fold == "all", conditional=a.conditional, **over)
    path = export_ema(cfg, a.fold)
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    if a.fold == "all":
        save_generation_summary(cfg, pd.read_csv(path.parent / "history.csv"))


def cmd_report(a) -> None:
    cfg = get_config(a.profile)
    if curves := {p.stem.removeprefix("recipe_"): pd.read_csv(p)
                  for p in sorted(cfg.fig_dir().glob("recipe_*.csv"))}:
        fig = plot_time_to_quality(curves)[0].figure             # every recipe's time to quality
        print(f"curves → {save_fig(fig, 'generation_time_to_quality', cfg)}")
    print(f"report → {write_report(cfg)}")


def cmd_sample(a) -> None:
    import matplotlib
    matplotlib.use("Agg")
    for flag in ("steps", "eta"):
        if getattr(a, flag) is not None and a.method != "ddim":
            raise ValueError(f"--{flag} is a DDIM option ({a.method} always runs all T steps): "
                             f"add --method ddim or leave --{flag} out")
    a.steps, a.eta = a.steps or 50, a.eta or 0.0
    cfg = get_config(a.profile)
    if a.steps > cfg.T:
        raise ValueError(f"--steps {a.steps} is more than the schedule's T = {cfg.T} steps")
    kw = dict(steps=a.steps, eta=a.eta) if a.method == "ddim" else {}
    if a.method != "report-first":           # it has no x̂0; its own clip clamps x_t (off)
        kw["clip"] = not a.no_clip
    cond = a.fruit is not None
    kw.update(_guidance(a, cfg))
    check_sample_memory(a.n, cfg.image_size)
    model = generation_model(cfg, conditional=cond)
    fp = Diffusion.from_config(generation_config(cfg)).to(get_device())
    x, _ = sample(model, fp, a.method, a.n, cfg.image_size, a.seed, **kw)
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"the samples hold nan or inf: nothing was written. The model "
                                 f"({weights(generation_config(cfg, cond), 'all')}) or these "
                                 f"settings make the sampler diverge; try another model file or "
                                 f"the defaults")
    what = f"{a.fruit}, w = {a.w:g}" if cond else "unconditional"
    ax = show_grid(x, nrow=int(math.ceil(math.sqrt(a.n))),
                   title=f"{what}: {a.method}{f'-{a.steps}' if a.method == 'ddim' else ''}, "
                         f"seed {a.seed}")
    print(f"{a.n} samples → {save_fig(ax.figure, _sample_name(a, cfg), cfg, a.out or SAMPLES)}")


def cmd_figure5(a) -> None:
    """Figure 5 at the profile's resolution with FIG5_NATIVE_SETS (the native profile: 100×100,
    `make figure5-native`), run once: its tables (FIG5_NATIVE_TABLES: the pixel statistics, the
    mean brightness at each shown t beside the real images', and this run's n, seed, seconds and
    CPU) and 05_figure5_native.png, which notebook 05 and the report read."""
    import matplotlib
    matplotlib.use("Agg")
    cfg = get_config(a.profile)
    start = time.time()
    xs, trajs, stats = dl.figure5(cfg, n=a.n, seed=a.seed, samplers=dl.FIG5_NATIVE_SETS)
    bright = dl.brightness_by_t(trajs).assign(**{"real test images": stats["mean"].iloc[0]})
    run = pd.DataFrame([dict(profile=cfg.profile, size=cfg.image_size, n=a.n, seed=a.seed,
                             seconds=round(time.time() - start), cpu=ddpm_train.cpu_name(),
                             threads=torch.get_num_threads(), device=str(get_device()))])
    fig = dl.plot_figure5(xs, trajs)
    for df, name in zip((stats.round(6), bright.round(6), run), dl.FIG5_NATIVE_TABLES):
        save_table(df, name, cfg)
    print(f"Figure 5 at {cfg.image_size}×{cfg.image_size}, {a.n} sample{'s' * (a.n != 1)} a set, in "
          f"{run.seconds[0]} s → {save_fig(fig, '05_figure5_native', cfg)}")


def weights_digest(modules) -> str:
    """12 hex digits of a SHA-1 over the modules' parameters and buffers: which weights made a
    cached result (generation_seeds' cache folder), whatever file they came from."""
    h = hashlib.sha1()
    for m in modules:
        for v in m.state_dict().values():
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def seed_cell(cache: Path, table: str, name: str, seed: int) -> Path:
    """The cache folder of one set of SEED_TABLES on one seed (cmd_seeds)."""
    return cache / f"{table}-{re.sub(r'[^A-Za-z0-9]+', '_', name)}-seed{seed}"


def cmd_seeds(a) -> None:
    """Score the story's headline sets on HELD_OUT_SEEDS (SEED_TABLES: the cause table, the
    generation table's DDIM rows, guidance at every w), run once (`make generation-seeds`),
    resumable: each (set, seed) is a cell, cached in runs/<profile>/seeds/<weights digest>/
    and skipped once done; a cell another process holds (run_lock) is left to it, so two
    single-thread runs side by side share the cells. When every cell is there, writes dl.SEED_FILES
    (floors at each n from seed 0's draws, as make figures) and 05_causes_samples.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg = get_config(a.profile)
    models = dl.cause_models(cfg)
    clf = load_classifier(cfg)[0]
    digest = weights_digest([m for m, _ in models.values()]
                            + [generation_model(cfg, conditional=True), clf])
    cache = cfg.home / "runs" / cfg.profile / "seeds" / digest
    cells = [(table, name, seed) for table, names in dl.SEED_TABLES.items() for name in names
             for seed in a.seeds]                                    # the tables' order
    slow_first = sorted(cells, key=lambda c: c[0] != "causes" or dl.CAUSES[c[1]][1] == "ddim")
    print(f"{len(cells)} cells (set × seed) → {cache}", flush=True)
    for table, name, seed in tqdm(slow_first, desc="cells"):
        folder = seed_cell(cache, table, name, seed)
        if (folder / "rows.csv").exists():
            continue
        try:
            with ddpm_train.run_lock(folder):
                if (folder / "rows.csv").exists():                   # finished meanwhile
                    continue
                t0 = time.time()
                rows, x = dl.seed_set(cfg, models, table, name, seed)
                df = pd.DataFrame(rows).assign(cell=folder.name, seconds=round(time.time() - t0, 1),
                                               cpu=ddpm_train.cpu_name(),
                                               threads=torch.get_num_threads())
                if x is not None:
                    save_checkpoint({"x": x}, folder / "samples.pt")
                write_csv(df, folder / "rows.csv")
                print(f"{table} · {name} · seed {seed}: {df.seconds.iloc[0]:.0f} s", flush=True)
        except RunLocked:
            continue
    if missing := [c for c in cells if not (seed_cell(cache, *c) / "rows.csv").exists()]:
        print(f"{len(missing)} cells are still being computed by another process: run this "
              f"again when it has finished to write the tables", flush=True)
        return
    df = pd.concat([pd.read_csv(seed_cell(cache, *c) / "rows.csv") for c in cells],
                   ignore_index=True)
    _, train_ds, test_imgs, clf, _ = scoring_setup(cfg, False)
    df = dl.add_floors(df, clf, train_ds.images, to_float(test_imgs), seed=0)
    run = pd.DataFrame([dict(profile=cfg.profile, size=cfg.image_size, seeds=" ".join(
        map(str, a.seeds)), cells=len(cells),
        cpu_seconds=round(df.drop_duplicates("cell").seconds.sum()),
        cpu=df.cpu.iloc[0], threads=int(df.threads.max()), weights=digest)])
    save_table(df.drop(columns=["cpu", "threads"]), dl.SEED_FILES[0], cfg)
    save_table(dl.seed_summary(df), dl.SEED_FILES[1], cfg)
    path = save_table(run, dl.SEED_FILES[2], cfg)
    xs = {name: load_checkpoint(seed_cell(cache, "causes", name, a.seeds[0]) / "samples.pt")["x"]
          for name in dl.SEED_TABLES["causes"]}
    fig, axes = plt.subplots(len(xs), 1, figsize=(dl.NOTEBOOK_WIDTH, 1.0 * len(xs) + 0.4),
                             layout="constrained", squeeze=False)
    for ax, (name, x) in zip(axes[:, 0], xs.items()):
        dl.show_grid(x, nrow=8, ax=ax)
        ax.set_title(name, fontsize=10)
    fig.suptitle(f"the cause table's sets, seed {a.seeds[0]}: the first 8 samples each")
    print(f"cause table and held-out seeds → {path.parent}/{dl.SEED_FILES[0]}.csv; "
          f"{save_fig(fig, '05_causes_samples', cfg)}")


SAMPLES = ROOT / "samples"              # `sample`'s pictures (ignored by git)


# What `sample` takes per image, mostly the grid picture's arrays: measured 5.5 GB for --n 4096
# at 32×32 (issue 45), so about 1,340 bytes a pixel; scaled by the image size.
SAMPLE_BYTES_PER_PIXEL = 1340


def available_memory() -> int:
    """Bytes this machine can still give (MemAvailable), or 0 where that is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def check_sample_memory(n: int, size: int) -> None:
    """Say, before anything is allocated, how much memory --n samples of size×size take: refused
    where it is more than 80% of what is available, named where it is over 1 GB."""
    need, free = n * size * size * SAMPLE_BYTES_PER_PIXEL, available_memory()
    per = size * size * SAMPLE_BYTES_PER_PIXEL
    if free and need > 0.8 * free:
        fits = max(int(0.8 * free // per), 0)
        raise ValueError(f"--n {n} at {size}×{size} would take about {need / 1e9:.1f} GB of memory "
                         f"(about {per / 1e6:.1f} MB a sample, mostly the picture), and "
                         f"{free / 1e9:.1f} GB is available: "
                         + (f"use --n {fits} or fewer (several runs with another --seed for more)"
                            if fits else "free memory (close other programs) first"))
    if need > 1e9:
        print(f"note: --n {n} at {size}×{size} takes about {need / 1e9:.1f} GB of memory",
              flush=True)


def _guidance(a, cfg: Config) -> dict:
    """--fruit and --w: the sampler's label and guidance weight ({} without --fruit); a.w gets
    its default (1: the class-conditional model unguided, as notebook 05 chose)."""
    if a.fruit is None:
        if a.w is not None:
            raise ValueError("--w is the guidance weight of --fruit (the class-conditional "
                             "model): add --fruit NAME, or leave --w out")
        return {}
    a.w = 1.0 if a.w is None else a.w
    classes = sorted(load_index(cfg).label.unique())
    if a.fruit not in classes:
        raise ValueError(f"--fruit {a.fruit!r} is not a class of {cfg.data_dir}/index.csv: "
                         f"choose one of {classes}")
    _check_classes(cfg, classes)
    return dict(y=torch.full((a.n,), classes.index(a.fruit)), w=a.w)


def _sample_name(a, cfg: Config) -> str:
    """The picture's name: every setting that changes it."""
    parts = [cfg.profile, a.method + (f"{a.steps}_eta{a.eta:g}" if a.method == "ddim" else "")]
    parts += [] if a.method == "report-first" else ["noclip" if a.no_clip else "clip"]
    parts += [a.fruit.replace(" ", "_"), f"w{a.w:g}"] if a.fruit is not None else []
    return "_".join(["samples", *parts, f"n{a.n}", f"seed{a.seed}"])


def _check_classes(cfg: Config, classes: list) -> None:
    """Refuse a conditional model file whose classes are not the index's: its labels would
    name other fruit. Files older than the stored names are checked by their count."""
    gcfg = generation_config(cfg, conditional=True)
    path = weights(gcfg, "all")
    if not path.exists():                    # generation_model trains it or says how
        return
    ck = load_checkpoint(path, need=("config",))
    saved, n = ck.get("classes"), ck["config"].get("n_classes")
    if n != len(classes) or (saved is not None and list(saved) != classes):
        names = f" ({', '.join(saved)})" if saved else ""
        raise ValueError(f"{path} was trained on {n} classes{names}, but "
                         f"{gcfg.data_dir}/index.csv has {len(classes)} ({', '.join(classes)}): "
                         f"--fruit would draw another fruit. Index the data it was trained on "
                         f"again (`python -m ddpm_cli data --from …`), or move {path.parent} "
                         f"away and train on this index: `{train_command(gcfg, 'all')}`")


# --help of `submit`'s sbatch settings (ddpm_train.Slurm)
SLURM_HELP = {"partition": "sbatch --partition ('': the cluster's default)",
              "account": "sbatch --account ('': the cluster's default)",
              "time": "time limit of each array task; a task that reaches it is requeued",
              "cpus_per_task": "CPU cores of each task (its OMP_NUM_THREADS)",
              "gpus_per_task": "GPUs of each task; more than 1 runs torchrun, one process a GPU",
              "mem": "sbatch --mem ('': the cluster's default)",
              "signal_secs": "SIGTERM this many seconds before the time limit (stop and requeue)"}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, where it has one that says something."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "" \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


COMMANDS = {"data": cmd_data, "train": cmd_train, "train-all": cmd_train_all,
            "classifier": cmd_classifier,
            "submit": cmd_submit, "evaluate": cmd_evaluate, "export": cmd_export,
            "report": cmd_report, "sample": cmd_sample, "figure5": cmd_figure5,
            "seeds": cmd_seeds}


def build_parser() -> argparse.ArgumentParser:
    """`python -m ddpm_cli`'s parser: one subcommand per COMMANDS entry, every option with its help
    and its default shown."""
    ap = argparse.ArgumentParser(prog="python -m ddpm_cli", description=dl.__doc__.split("\n")[1])
    sub = ap.add_subparsers(dest="cmd", required=True)
    fmt = dict(formatter_class=_Help)
    profiles = "; ".join(f"{k}: {v}" for k, v in PROFILE_HELP.items())

    def parser(name: str, help: str):
        p = sub.add_parser(name, help=help, description=help, **fmt)
        if name != "data":
            p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                           help=f"{profiles} (default: DDPM_PROFILE, else full with a GPU and "
                                f"cpu without)")
        return p

    p = parser("data", "index a Fruits-360 folder/zip/URL (or make a synthetic set)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="src", help="folder or .zip with Training/ and Test/")
    src.add_argument("--url", nargs="?", const=DEFAULT_URL, help="download the archive first")
    src.add_argument("--synthetic", action="store_true", help="fake fruit, for tests only")
    p.add_argument("--out", default=None, help="where index.csv goes (default: the repository's "
                   "data/, which training reads; a relative path is taken from the working "
                   "directory)")
    p.add_argument("--if-changed", action="store_true", help="with --from: do nothing when "
                   "index.csv was made from the same source, classes, split and seed (make data)")
    cls = p.add_mutually_exclusive_group()
    cls.add_argument("--classes", nargs="+", help="class folder names (default: the committed "
                     "models' 10 where the folder has them, else all)")
    cls.add_argument("--all-classes", action="store_true", help="every class of the folder (the "
                     "committed models then do not fit: train your own)")
    p.add_argument("--split", choices=["grouped", "random"], default="grouped",
                   help="the folds in index.csv: grouped (leakage-free blocks of each video) or "
                        "random (the report's)")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable files out, listed")
    p.add_argument("--seed", type=_seed, default=0, help="the seed of the random split")
    p.add_argument("--synthetic-size", type=int, default=100, help="with --synthetic: the "
                   "images' side in pixels (32 for the smoke profiles' set, make test)")

    p = parser("train", "train one fold (or 'all': the generation model) of a profile")
    p.add_argument("--fold", default=0, type=_fold_arg,
                   help="0..4, or 'all' (the generation model: every training image)")
    p.add_argument("--resume", action="store_true", help="continue a stopped run")
    p.add_argument("--out", default=None, help="run folder (default: runs/<profile>/…)")
    p.add_argument("--target", choices=["eps", "scaled_eps"], default=None,
                   help="scaled_eps: the report-faithful target (default: eps)")
    p.add_argument("--split", choices=["grouped", "random"], default=None,
                   help="random: the report's leaking split (default: grouped)")
    p.add_argument("--max-epochs", type=_whole(1), default=None,
                   help="stop after this many epochs (default: the profile's, 40 for the folds)")
    p.add_argument("--patience", type=_whole(1), default=None,
                   help="early stopping: epochs without a lower validation loss (default: the "
                        "profile's, 5 for the folds)")
    p.add_argument("--conditional", action="store_true", help="with --fold all: the "
                   "class-conditional generation model (classifier-free guidance)")
    p.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="any Config setting, e.g. --set min_snr_gamma=5 (repeatable; needs "
                        "--out): an experiment's recipe")

    p = parser("train-all", "every run the notebooks need (resumed, or skipped when finished or "
               "committed)")
    p.add_argument("--retrain", action="store_true",
                   help="train the runs whose weights are committed too (into runs/)")
    p.add_argument("--out", default=None, help="base folder of the runs (default: runs/<profile>)")

    p = parser("submit", "every run of train-all as one SLURM job array (sbatch)")
    for f in dataclasses.fields(Slurm):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=SLURM_HELP[f.name])
    p.add_argument("--out", default=None, help="base folder of the runs (default: runs/<profile>)")
    p.add_argument("--max-epochs", type=_whole(1), default=None,
                   help="each run's epoch cap (default: the profile's)")
    p.add_argument("--tasks", default="", help="which runs, by their index in planned_runs "
                   "(sbatch --array syntax: '0,6'); default: all")
    p.add_argument("--wait", action="store_true", help="return when every task has ended")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")

    p = parser("evaluate", "Table 1 (one-step SSIM/PSNR) and the generation metrics; curve: the "
               "generation run's snapshots scored; guidance: the conditional model by w")
    p.add_argument("--what", choices=["table1", "generation", "both", "curve", "guidance"],
                   default="both", help="table1: notebook 04's tables; generation: notebook 05's "
                   "generation table; both; curve: the generation run's snapshots; guidance: "
                   "notebook 05's guidance tables")
    p.add_argument("--n", type=_whole(2), default=None,
                   help="samples per sampler (default: the profile's, EVAL; curve: 500 per "
                        "snapshot; guidance: 50 per class)")
    p.add_argument("--run", default=None, help="curve: the run folder of a recipe (train "
                   "--set … --out DIR), its table recipe_<folder name>.csv (default: the "
                   "generation run, recipe_generation.csv)")

    p = parser("export", "write a run's best EMA weights in half precision for committing (the "
               "generation model; a fold run's with its history)")
    p.add_argument("--fold", default="all", type=_fold_arg,
                   help="0..4, or 'all' (the generation model)")
    p.add_argument("--target", choices=["eps", "scaled_eps"], default=None,
                   help="the run's target (default: eps)")
    p.add_argument("--split", choices=["grouped", "random"], default=None,
                   help="the run's split (default: grouped)")
    p.add_argument("--conditional", action="store_true", help="the class-conditional model")

    parser("classifier", "train the fruit classifier that scores samples (FFD, KID, "
           "recognizability) and write it, in half precision, to data/checkpoints/")

    parser("report", "report/report.md from report/template.md and figures/")

    p = parser("sample", "draw samples from the generation model into samples/")
    p.add_argument("--method", choices=sorted(SAMPLERS), default="ddim", help="the sampler")
    p.add_argument("--n", type=_whole(1, MAX_SAMPLES, " (one grid picture; for more, run again "
                   "with another --seed)"), default=64, help="how many samples")
    p.add_argument("--steps", type=_whole(1), default=None, help="DDIM steps (default 50, "
                   "at most T)")
    p.add_argument("--eta", type=_eta, default=None, help="DDIM η in [0, 1] (default 0)")
    p.add_argument("--no-clip", action="store_true", help="do not clip x̂0 to [-1, 1]")
    p.add_argument("--seed", type=_seed, default=0, help="the seed of x_T and of every z")
    p.add_argument("--fruit", default=None, help="a class name (e.g. 'Banana 1'): samples of it "
                   "from the class-conditional model")
    p.add_argument("--w", type=_guidance_w, default=None, help="with --fruit: the guidance "
                   f"weight, |w| ≤ {MAX_W:g} (0: unconditional, 1: conditional; default 1)")
    p.add_argument("--out", default=None, help="folder of the picture (default: samples/, "
                   "ignored by git)")

    p = parser("figure5", "Figure 5 at the profile's resolution (native: 100×100, make "
               "figure5-native), run once: its tables and picture, which notebook 05 reads")
    p.add_argument("--n", type=_whole(1, MAX_SAMPLES), default=8, help="samples per sampler")
    p.add_argument("--seed", type=_seed, default=0, help="the seed of x_T and of every z")

    p = parser("seeds", "the cause table, the generation table's DDIM rows and guidance on the "
               "held-out seeds (make generation-seeds), run once and resumable: the tables "
               "notebook 05 and the report read")
    p.add_argument("--seeds", type=_seed, nargs="+", default=list(dl.HELD_OUT_SEEDS),
                   help="the sampling seeds (the choices were made on seed 0)")
    return ap


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        COMMANDS[a.cmd](a)
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("stopped: interrupted (Ctrl-C); nothing half-written was kept", file=sys.stderr)
        sys.exit(130)
    except (DataError, FloatingPointError, ValueError, RunLocked) as e:  # CheckpointError too
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {os_message(e)}")
    except Exception as e:
        if os.environ.get("DDPM_DEBUG") == "1":
            raise
        sys.exit(unexpected_message(e))


# What to do about the system's disk and permission errors, by errno.
_OS_ADVICE = {(errno.ENOSPC, errno.EDQUOT): "the disk is full (or your quota used up): free "
                                            "space, then rerun",
              (errno.EACCES, errno.EPERM): "choose a folder you may write to (--out) or fix its "
                                           "permissions",
              (errno.EROFS,): "the file system is read-only: choose another folder (--out)",
              (errno.ENOENT,): "check the path",
              (errno.ENOTDIR, errno.EEXIST): "a file stands where a folder should be: move it "
                                             "or choose another path"}


def os_message(e: OSError) -> str:
    """What a disk or permission error means, naming the file: ours (a sentence, no errno) as
    it is; the system's (errno, file) with what to do about it."""
    if e.errno is None or e.filename is None:
        return str(e)
    what = next((v for k, v in _OS_ADVICE.items() if e.errno in k),
                "check the path, its disk and its permissions")
    return (f"{e.filename}: {e.strerror}. {what[0].upper()}{what[1:]}. Files already written "
            f"there are intact (every write goes through a temporary file)")


def unexpected_message(e: Exception) -> str:
    """One line for an error no check foresaw: what it was and where its traceback went."""
    import traceback
    text = "".join(traceback.format_exception(e))
    try:
        fd, path = tempfile.mkstemp(prefix="ddpm-error-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        where = f"the full traceback is in {path}"
    except OSError:
        where = "rerun with DDPM_DEBUG=1 to see the full traceback"
    return (f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            f"— {where} (DDPM_DEBUG=1 prints it). Please report it")


if __name__ == "__main__":
    main()
