"""Write the class names into committed model files that lack them (issue 44: a model file says
what it was trained on). No retraining: each file is loaded, given a "classes" key (the index's
sorted class folder names, which a conditional model's labels index) and saved whole
(save_checkpoint); its tensors are left as they are, checked bit for bit after the write.

    python tools/add_model_classes.py [--classes NAME …] [FILE …]   (default: data/checkpoints/**/*.pt)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ddpm_io import load_checkpoint, save_checkpoint  # noqa: E402
from ddpm_lib import SUBSET_CLASSES  # noqa: E402


def tensors(d, prefix=""):
    """Every tensor in a nested checkpoint dict, by its key path."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(tensors(v, f"{prefix}{k}/"))
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--classes", nargs="+", default=sorted(SUBSET_CLASSES))
    a = ap.parse_args(argv)
    files = a.files or sorted((ROOT / "data" / "checkpoints").rglob("*.pt"))
    for path in files:
        ck = load_checkpoint(path)
        if "classes" in ck:
            print(f"{path}: has its classes ({len(ck['classes'])})")
            continue
        n = ck.get("config", {}).get("n_classes", 0)
        if n and n != len(a.classes):
            sys.exit(f"error: {path} is conditional on {n} classes, not {len(a.classes)}: pass "
                     f"its --classes")
        before = tensors(ck)
        save_checkpoint({**ck, "classes": list(a.classes)}, path)
        after = load_checkpoint(path)
        same = tensors(after)
        if after["classes"] != list(a.classes) or before.keys() != same.keys() or not all(
                v.dtype == same[k].dtype and torch.equal(v, same[k]) for k, v in before.items()):
            sys.exit(f"error: {path} was not written back unchanged: restore it with "
                     f"`git checkout -- {path}`")
        print(f"{path}: classes added ({len(a.classes)})")


if __name__ == "__main__":
    main()
