"""Models say what they are (issue 44): every committed model file stores the class names it was
trained on; a conditional model refuses an index whose names differ (a class renamed); `data
--from` a folder with more classes indexes the committed models' classes unless told otherwise."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import ddpm_cli
import ddpm_lib as dl
from conftest import real_subset

REPO = Path(__file__).resolve().parents[1]
COND = Path("data/checkpoints/runs/cpu/eps-grouped/all_cond/ema_fp16.pt")
MODELS = sorted((REPO / "data" / "checkpoints").rglob("*.pt"))


def test_there_are_committed_models():
    assert len(MODELS) >= 10 and REPO / COND in MODELS


@pytest.mark.parametrize("path", MODELS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_committed_model_stores_its_classes(path):
    """The 10 class folder names of the subset, in the order a conditional model's labels index
    them (sorted, as sorted(index.label.unique())); the weights stay fp16."""
    ck = dl.load_checkpoint(path)
    assert ck["classes"] == sorted(dl.SUBSET_CLASSES)
    if "ema" in ck:
        assert all(v.dtype == torch.float16 for v in ck["ema"].values() if v.is_floating_point())


def _root_with_cond_model(tmp_path: Path, labels: list[str]) -> dl.Config:
    """A root holding the committed conditional model and an index (csv only) of `labels`."""
    (tmp_path / COND).parent.mkdir(parents=True)
    shutil.copy(REPO / COND, tmp_path / COND)
    rows = [dict(path=f"Training/{c}/{i}_100.jpg", label=c, split=s, video="v", frame=i,
                 group=f"{c}/0", fold=i % 5) for c in labels for s in ("train", "test")
            for i in range(2)]
    pd.DataFrame(rows, columns=dl.INDEX_COLUMNS).to_csv(tmp_path / "data" / "index.csv",
                                                        index=False)
    return dl.get_config("cpu", root=str(tmp_path))


def test_the_conditional_model_refuses_a_renamed_class(tmp_path):
    labels = sorted(dl.SUBSET_CLASSES)
    labels[labels.index("Kiwi 1")] = "Kiwi 2"                   # same count, another fruit
    cfg = _root_with_cond_model(tmp_path, sorted(labels))
    with pytest.raises(dl.DataError, match=r"Kiwi 1.*Kiwi 2") as e:
        dl.generation_model(cfg, conditional=True)
    assert "\n" not in str(e.value)


def test_the_conditional_model_loads_with_its_own_classes(tmp_path):
    cfg = _root_with_cond_model(tmp_path, sorted(dl.SUBSET_CLASSES))
    model = dl.generation_model(cfg, conditional=True)
    assert model.classes == sorted(dl.SUBSET_CLASSES)


@pytest.fixture
def bigger_dataset(tmp_path) -> Path:
    """The real subset with one more class (a folder linked under another name): a stand-in
    for the full Fruits-360."""
    src = real_subset()
    if not (src / "Training").is_dir():
        pytest.skip(f"no real Fruits-360 subset at {src}")
    big = tmp_path / "fruits-360-bigger"
    for split in ("Training", "Test"):
        (big / split).mkdir(parents=True)
        for c in dl.SUBSET_CLASSES:
            os.symlink(src / split / c, big / split / c)
        os.symlink(src / split / "Lemon 1", big / split / "Lemon 2")
    return big


def test_data_from_more_classes_indexes_the_committed_models_classes(bigger_dataset, tmp_path,
                                                                       capsys):
    ddpm_cli.main(["data", "--from", str(bigger_dataset), "--out", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert "indexing the 10 classes of the committed models, of the 11" in out
    assert "--all-classes" in out
    index = pd.read_csv(tmp_path / "d" / "index.csv")
    assert sorted(index.label.unique()) == sorted(dl.SUBSET_CLASSES)


def test_data_all_classes_indexes_every_class(bigger_dataset, tmp_path):
    ddpm_cli.main(["data", "--from", str(bigger_dataset), "--out", str(tmp_path / "d"),
                   "--all-classes"])
    index = pd.read_csv(tmp_path / "d" / "index.csv")
    assert index.label.nunique() == 11 and "Lemon 2" in set(index.label)
