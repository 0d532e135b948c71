"""The native path (issue 42): a profile fine-tuned at another size from another profile's weights
(Config.init), Table 1 at the images' own resolution with network-free yardsticks, and Figures 4
and 5 at any profile. On the smoke profile and its 24×24 twin, smoke-native; tiny models, one
thread, runs in pytest's tmp_path."""
from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ddpm_cli
import ddpm_lib as dl
import ddpm_train as dt

REPO = Path(__file__).resolve().parents[1]
SMOKE_DATA = str(REPO / "runs" / "smoke" / "data")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A root with smoke's fold-0 models (both targets) and smoke-native's fine-tuned from them."""
    root = tmp_path_factory.mktemp("native")
    dl.load_index(dl.get_config("smoke"))                      # the synthetic set exists
    for profile in ("smoke", "smoke-native"):
        for target in ("eps", "scaled_eps"):
            dt.train(dl.get_config(profile, root=str(root), data_dir=SMOKE_DATA, target=target), 0,
                     progress=False)
    return root


def cfgs(root, **kw):
    return (dl.get_config("smoke-native", root=str(root), data_dir=SMOKE_DATA, **kw),
            dl.get_config("smoke", root=str(root), data_dir=SMOKE_DATA, **kw))


def test_native_profile_is_fold0_at_100_from_cpu():
    nat = dl.get_config("native")
    assert (nat.image_size, nat.init, nat.width) == (100, "cpu", dl.get_config("cpu").width)
    assert dl.NATIVE == {"cpu": "native", "smoke": "smoke-native"}
    assert dl.planned_runs("native") == [({}, 0), (dict(target="scaled_eps"), 0)]
    with pytest.raises(ValueError, match="native profile has no generation model"):
        dl.get_config("native", generation=True)


def test_fine_tuning_starts_from_the_init_profiles_weights(root, tmp_path):
    """With a learning rate of 1e-12 nothing moves measurably, so the fine-tuned run's best EMA
    weights are the smoke run's: the init weights were loaded (random ones differ by ~0.1)."""
    nat, small = cfgs(root)
    out = tmp_path / "lr0"
    dt.train(dataclasses.replace(nat, lr=1e-12, weight_decay=0.0), 0, out=out, progress=False)
    got = torch.load(out / "best.pt", weights_only=True)["ema"]
    want = torch.load(small.run_dir(0) / "best.pt", weights_only=True)["ema"]
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k].float(), want[k].float(), atol=1e-8) for k in got)
    fresh = dl.build_model(nat, verbose=False).state_dict()
    assert not all(torch.allclose(fresh[k].float(), want[k].float(), atol=1e-2) for k in fresh)
    assert dt.init_weights(nat, 0) == small.run_dir(0) / "best.pt"


def test_fine_tuning_refuses_another_architecture_and_a_missing_start(root, tmp_path):
    nat, _ = cfgs(root)
    with pytest.raises(ValueError, match="width"):
        dt.train(dataclasses.replace(nat, width=16), 0, out=tmp_path / "w", progress=False)
    with pytest.raises(FileNotFoundError, match="Train it first: `python -m ddpm_cli train "
                                                "--profile smoke --fold 1`"):
        dt.train(nat, 1, out=tmp_path / "f1", progress=False)
    assert not (tmp_path / "f1" / "checkpoint.pt").exists()


def test_yardstick_x_t_over_sqrt_alpha_bar_is_exact_without_noise_and_tv_denoises():
    fp = dl.Diffusion.from_config(dl.get_config("smoke"))
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 24), torch.linspace(-1, 1, 24), indexing="ij")
    x0 = torch.stack([0.6 * (yy > 0).float() - 0.3, 0.5 * xx, -0.4 + 0 * xx])[None].repeat(4, 1, 1, 1)
    t = torch.full((4,), 200)
    clean = dl.yardstick_x0(fp, fp.q_sample(x0, t, torch.zeros_like(x0)), t, "x_t/√ᾱ_t")
    assert torch.allclose(clean, dl.to_unit(x0), atol=1e-5)
    xt = fp.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    raw, tv = (dl.yardstick_x0(fp, xt, t, how) for how in dl.YARDSTICKS)
    err = lambda x: ((x - dl.to_unit(x0)) ** 2).mean().item()
    assert err(tv) < 0.5 * err(raw)                      # a piecewise-smooth image: TV removes noise
    assert 0 <= tv.min() and tv.max() <= 1
    with pytest.raises(ValueError, match="yardstick"):
        dl.yardstick_x0(fp, xt, t, "median")


def test_tv_weight_is_chosen_on_training_images_only(root, monkeypatch):
    nat, _ = cfgs(root)
    seen = []
    real = dl.one_step_eval
    monkeypatch.setattr(dl, "one_step_eval", lambda m, fp, images, *a, **kw:
                        seen.append(images) or real(m, fp, images, *a, **kw))
    choice = dl.tv_weight_choice(nat, n=6, ts=(50, 400))
    assert choice.ssim_mean.is_monotonic_decreasing and sorted(choice.tv_weight) == sorted(dl.TV_GRID)
    tr, _ = dl.fold_rows(dl.load_index(nat), 0)                # fold 0's training rows, seeded
    rows = tr.sample(n=6, random_state=nat.seed).sort_index()
    assert (rows.split == "train").all()
    want = dl.Fruits(rows, nat.home / nat.data_dir / "fruits-360", nat.image_size).images
    assert len(seen) == len(dl.TV_GRID) and all(torch.equal(x, want) for x in seen)


def test_native_table1_rows_share_images_and_the_findings_read_the_table(root):
    nat, small = cfgs(root)
    df = dl.table1_native(nat, small, 1.0, n=8, ts=(50, 250, 500, 800, 1000), progress=False)
    rows = df.groupby(["method", "resolution", "kind"]).size()
    assert len(rows) == 2 * len(dl.NATIVE_METHODS) + 1 + len(dl.YARDSTICKS) and (rows == 5).all()
    assert (df.n == 8).all()
    assert set(df.kind) == {"native", "upsampled", "ceiling", "no network"}
    ceiling = df[df.kind == "ceiling"].ssim_mean
    assert np.allclose(ceiling, ceiling.iloc[0])
    # the yardsticks need no model: the same numbers from a root without any run
    bare = dataclasses.replace(nat, root=str(root / "nothing"))
    again = dl.table1_native(bare, dataclasses.replace(small, root=bare.root), 1.0, n=8,
                             ts=(50, 250, 500, 800, 1000), progress=False)
    assert set(again.kind) == {"ceiling", "no network"}
    key = ["method", "t"]
    a = df[df.kind == "no network"].set_index(key).ssim_mean
    assert np.allclose(a, again[again.kind == "no network"].set_index(key).ssim_mean.loc[a.index])
    # the corrected native model at the report's t: the number the findings quote, and the table's
    table, say = dl.native_findings(df, dl.report_table1())
    c50 = df[(df.method == "corrected") & (df.kind == "native") & (df.t == 50)].ssim_mean.item()
    assert f"scores {c50:.3f}" in say[0] and table.set_index("t").loc[50, "corrected, 24×24"] == round(c50, 3)
    assert any(s.startswith("Closest to the report") for s in say)
    verdict = dl.native_verdict(df, dl.report_table1())
    e50 = df[(df.method == "scaled-ε model, decoded as ε") & (df.kind == "native") & (df.t == 50)]
    assert f"({c50:.3f})" in verdict and f"target moves our model by {e50.ssim_mean.item() - c50:+.3f}" in verdict
    wide = dl.table1_native_wide(df, dl.report_table1())
    assert list(wide.t) == [50, 250, 500, 800, 1000] and "report fold 4" in wide


def test_native_files_have_one_writer_in_the_profiles_folder(root):
    nat, small = cfgs(root)
    df = dl.table1_native(nat, small, 1.0, n=4, ts=(50, 500), progress=False)
    dl.save_table1_native(nat, df, dl.tv_weight_choice(nat, n=4, ts=(50,)))
    folder = nat.fig_dir()
    assert folder == root / "runs" / "smoke" / "figures" / "native"
    for name in ("table1_native.csv", "table1_native_wide.md", "tv_weight_choice.csv",
                 "04_ssim_vs_t_native.png"):
        assert (folder / name).exists(), name
    assert not (root / "figures").exists()


def test_figure4_and_figure5_at_the_native_size(root):
    nat, _ = cfgs(root)
    rows = dl.figure4(nat, (50, 500), image=1, seed=3)
    assert list(rows) == ["ground truth x0", "forward process x_t", *dl.FIG4_ROWS]
    assert all(v.shape == (2, 3, 24, 24) and 0 <= v.min() and v.max() <= 1 for v in rows.values())
    sets = [k for k in dl.FIG5_SAMPLERS if k.startswith("report's")]
    xs, trajs, stats = dl.figure5(nat, n=2, samplers=sets, keep=(900, 500, 0), progress=False)
    assert list(xs) == sets and list(stats.images) == ["real test images", *sets]
    b = dl.brightness_by_t(trajs)
    assert list(b.t) == [900, 500, 0]
    for name in sets:
        assert np.isclose(b[name].iloc[-1], dl.to_unit(trajs[name][0]).mean().item())
    fig = dl.plot_figure5(xs, trajs)
    assert np.allclose(fig.axes[2].lines[0].get_ydata(), b[sets[0]])


def test_report_reads_the_native_tables(root):
    nat, small = cfgs(root)
    df = dl.table1_native(nat, small, 1.0, n=4, ts=dl.TABLE1_T, progress=False)
    figs = root / "figs"
    (figs / "native").mkdir(parents=True)
    df.to_csv(figs / "native" / "table1_native.csv", index=False)
    f = ddpm_cli._report_fields(figs)
    _, say = dl.native_findings(df, dl.report_table1())
    assert f["native_findings"] == " ".join(say) and f["native_n"] == "4"
    assert f["native_tv"].startswith("TV denoiser (weight 1")


def test_one_evaluation_serves_every_decoding_with_the_same_numbers(root):
    """one_step_eval with a tuple of decodings scores each exactly as a run of its own (one
    network evaluation instead of one per decoding)."""
    _, small = cfgs(root, target="scaled_eps")
    model, fp = dl.load_model(small, 0), dl.Diffusion.from_config(small)
    images = dl.eval_images(small, 6)
    both = dl.one_step_eval(model, fp, images, (50, 700), 0, ("eq5", "alpha", "eps"), batch=4)
    for decode in ("eq5", "alpha", "eps"):
        alone = dl.one_step_eval(model, fp, images, (50, 700), 0, decode, batch=4)
        got = both[both.decode == decode].drop(columns="decode").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, alone)
    assert dl.by_decoding(dl.TABLE1_METHODS) == {
        "eps": {"corrected": "eps"},
        "scaled_eps": {"report-faithful": "eq5", "report-faithful, 1/√α_t decoding": "alpha"}}


def test_figure5_native_is_run_once_and_read_back(root, monkeypatch):
    """`figure5` (make figure5-native) writes FIG5_NATIVE_TABLES and the picture into the profile's
    folder; read_result reads them back, the run's own before the committed ones; before the run
    it names the command in one line."""
    nat, _ = cfgs(root)
    cmd = "make figure5-native"
    with pytest.raises(dl.DataError, match=r"figure5_run\.csv is not in .*: run `make "
                                           r"figure5-native` first"):
        dl.read_result(nat, "figure5_run", cmd)
    monkeypatch.setattr(ddpm_cli, "get_config", lambda profile: nat)
    ddpm_cli.main(["figure5", "--profile", "smoke-native", "--n", "2", "--seed", "3"])
    stats, by_t, run = (dl.read_result(nat, name, cmd) for name in dl.FIG5_NATIVE_TABLES)
    assert (run.n[0], run.seed[0], run["size"][0]) == (2, 3, nat.image_size)
    assert list(stats.images) == ["real test images", *dl.FIG5_NATIVE_SETS]
    assert (stats.n.iloc[1:] == 2).all()
    assert list(by_t.columns) == ["t", *dl.FIG5_NATIVE_SETS, "real test images"]
    assert dl.result_file(nat, "05_figure5_native.png", cmd).parent == nat.fig_dir()
    # without the run's own tables, the committed ones are read
    nat.committed_dir().mkdir(parents=True, exist_ok=True)
    committed = run.assign(seed=7)
    committed.to_csv(nat.committed_dir() / "figure5_run.csv", index=False)
    assert dl.read_result(nat, "figure5_run", cmd).seed[0] == 3           # the run's own first
    (nat.fig_dir() / "figure5_run.csv").unlink()
    assert dl.read_result(nat, "figure5_run", cmd).seed[0] == 7
