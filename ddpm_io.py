"""
Files of ddpm_lib, written whole or not at all and read without running code: atomic writes
(a reader sees the old file or the new one, never half of one), CSV and markdown tables, and model
files loaded with torch.load(weights_only=True), checked against what the caller needs.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn


@contextlib.contextmanager
def atomic_path(path: Path | str):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.
    Readers never see a half-written file, and the previous file survives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_csv(df: pd.DataFrame, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def to_markdown(df: pd.DataFrame) -> str:
    """A pipe table (no extra dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                                       for v in row) + " |")
    return "\n".join(lines) + "\n"


class CheckpointError(ValueError):
    """A model file that cannot be read: truncated, corrupt, or holding more than tensors."""


def load_checkpoint(path: Path | str, need=()) -> dict:
    """Read one of our checkpoints with torch.load(weights_only=True): tensors and plain data
    only, so a file from elsewhere cannot run code while it loads. need: the keys it must have
    (a bare state dict, or an export where a training checkpoint is needed, is refused)."""
    _check_model_file(Path(path))
    ck = _torch_load(Path(path))
    missing = [k for k in need if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(missing)}: it is not a file this command can use (a bare "
            f"state dict, or an fp16 export where a training checkpoint is needed?). Use the file "
            f"train or export wrote for this run, or train again")
    return ck


def load_state(module, state, path: Path) -> None:
    """module.load_state_dict(state); a state that does not fit (a missing, extra or misshapen
    tensor) or holds non-finite weights is refused, naming the file."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} does not fit this model ({why}): it was written for "
                              f"other settings, or edited. Use the file of a run with these "
                              f"settings, or train again") from None
    params = module.state_dict().items() if isinstance(module, nn.Module) else ()
    bad = [k for k, v in params if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights (nan or inf in {len(bad)} "
                              f"tensors, first {bad[0]}): the run diverged or the file is damaged. "
                              f"Use an earlier checkpoint or train again")


# The largest model file this project writes is far below this (the full profile's training
# checkpoint: tens of MB); a larger one is not ours, and is refused before it is read.
MAX_MODEL_BYTES = 2 * 1024**3


def _not_ours(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a model file of this project ({why}; not a readable checkpoint: "
        f"truncated, empty, corrupt or another format). Delete it and train again, or restore it "
        f"from its source")


def _check_model_file(path: Path) -> None:
    """Refuse, before torch.load opens it, what cannot be one of our model files: a FIFO, device
    or folder (opening a FIFO waits forever), a file over MAX_MODEL_BYTES, anything but the zip
    archive torch.save writes, and a zip whose entries are compressed or unpack to more than the
    file holds (torch.save stores them as they are; a zip bomb does not)."""
    import stat
    import zipfile
    st = os.stat(path)                              # FileNotFoundError: said by the caller
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)"
                if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "not a regular file")
        raise CheckpointError(f"{path} is {kind}, not a model file: it was not opened. Point at "
                              f"the .pt file that train or export wrote, or remove {path}")
    if st.st_size > MAX_MODEL_BYTES:
        raise _not_ours(path, f"{st.st_size / 1e9:.1f} GB, more than any model file of this "
                              f"project ({MAX_MODEL_BYTES / 1e9:.1f} GB at most)")
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError,
            UnicodeDecodeError, IndexError, KeyError) as e:
        raise _not_ours(path, f"not the zip archive torch.save writes: {type(e).__name__}") from None
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    unpacked = sum(i.file_size for i in infos)
    if packed or unpacked > st.st_size:
        raise _not_ours(path, f"its entries would unpack to {unpacked / 1e6:,.1f} MB from a "
                              f"{st.st_size / 1e6:,.1f} MB file"
                              + (f", compressed ({packed[0]}…)" if packed else "")
                              + ": torch.save never compresses, so it was not unpacked")


def _torch_load(path: Path):
    import pickle
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), None)
        if why:                                    # a class or function: could run code
            raise CheckpointError(
                f"{path} holds more than tensors and plain data, so it was not loaded (loading "
                f"it could run code: {why}). Use a checkpoint written by this repository's own "
                f"train or export, or delete it") from None
        err = e
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError,
            AttributeError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        err = e                                  # a damaged archive fails in many ways
    raise _not_ours(path, type(err).__name__)


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save through atomic_path: the previous file survives a failed write."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise                                 # permissions, a bad path: said by the caller
        free = shutil.disk_usage(path.parent).free / 1e6 if path.parent.exists() else float("nan")
        raise CheckpointError(
            f"could not write {path} ({str(e).splitlines()[0][:160]}; {free:.0f} MB free on its "
            f"disk — is it full?). The previous version of the file, if any, is intact: free "
            f"space, then rerun (with --resume for training)") from None

