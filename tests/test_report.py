"""The report is filled from the tables in figures/, and says so when a piece is missing."""
import numpy as np
import pandas as pd

import ddpm_lib as dl
import ddpm_cli as cli


def _render(tmp_path, template: str) -> str:
    """The report of `template` from the tables in tmp_path (smoke profile)."""
    tpl = tmp_path / "t.md"
    tpl.write_text(template)
    return cli.write_report(dl.get_config("smoke"), tpl, figs=tmp_path,
                           out=tmp_path / "r" / "r.md").read_text()


def _table1(tmp_path):
    rows = []
    for method, base in (("corrected", 0.9), ("report-faithful", 0.6)):
        for fold in range(2):
            for t in dl.TABLE1_T:
                rows.append(dict(method=method, fold=fold, t=t, ssim_mean=base - t / 2000 + fold / 100,
                                 ssim_std=0.01, psnr_mean=30 - t / 100, psnr_std=1.0, n=8))
    df = pd.DataFrame(rows)
    dl.write_csv(df, tmp_path / "table1_ssim.csv")
    return df


def test_report_fills_fields_and_marks_missing(tmp_path):
    df = _table1(tmp_path)
    (tmp_path / "02_schedules.png").write_bytes(b"png")
    tpl = tmp_path / "t.md"
    tpl.write_text("A ${ssim50_corrected} B ${ssim50_report} C ${generation_table}\n"
                   "![x](../figures/02_schedules.png) ![y](../figures/nope.png)\n${table1_corrected}")
    out = cli.write_report(dl.get_config("smoke"), tpl, figs=tmp_path, out=tmp_path / "r" / "r.md")
    text = out.read_text()
    want = df[(df.method == "corrected") & (df.t == 50)].ssim_mean.mean()
    assert f"A {want:.3f} B" in text
    assert f"B {df[(df.method == 'report-faithful') & (df.t == 50)].ssim_mean.mean():.3f}" in text
    assert "generation_table: not produced yet" in text
    assert "![x](../02_schedules.png)" in text            # relative to the report's folder
    assert "figure nope.png not produced yet" in text
    assert "| t | fold 0 | fold 1 | mean over folds |" in text
    assert "$" not in text


def test_report_table1_std_over_images_and_batch_means(tmp_path):
    df = _table1(tmp_path).assign(ssim_std_batch=0.004)
    dl.write_csv(df, tmp_path / "table1_ssim.csv")
    text = _render(tmp_path, "${table1_std}")
    assert "| method | t | ssim_std | ssim_std_batch | ratio |" in text
    assert "| corrected | 500 | 0.01 | 0.004 | 2.5 |" in text and text.count("\n") == 10   # 2 + 2 methods × 4 t


def test_table1_wide_mean_over_folds(tmp_path):
    df = _table1(tmp_path)
    wide = dl.table1_wide(df, "corrected")
    assert list(wide.columns) == ["t", "fold 0", "fold 1", "mean over folds"]
    m = df[(df.method == "corrected") & (df.t == 100)].ssim_mean
    got = wide.set_index("t").loc[100, "mean over folds"]
    assert got == f"{m.mean():.3f} ± {m.std():.3f}"
    assert np.isclose(float(wide.set_index("t").loc[50, "fold 1"].split(" ± ")[0]),
                      0.9 - 50 / 2000 + 0.01, atol=1e-3)


def test_report_training_fields(tmp_path):
    """The fold runs' epochs, their total minutes and how many early stopping ended, from the
    training table; the generation model's from its own summary (train --fold all)."""
    summary = pd.DataFrame(dict(run=["eps-grouped/fold0", "eps-grouped/fold1", "eps-random/fold0"],
                                epochs=[40, 21, 33], best_val_loss=[0.02, 0.01, 0.01],
                                early_stopped=[False, True, True], minutes=[50.0, 30.5, 40.0]))
    dl.write_csv(summary, tmp_path / "training_summary.csv")
    dl.write_csv(pd.DataFrame(dict(run=["eps-grouped/all"], epochs=[100], best_val_loss=[0.19],
                                   minutes=[35.5], images_per_s=[258.0])),
                 tmp_path / "generation_training.csv")
    text = _render(tmp_path, "${fold_epochs}; ${folds_early_stopped} stopped; ${fold_minutes} min; "
                   "generation ${gen_epochs} epochs ${gen_minutes} min\n${training_table}")
    assert "40, 21; 1 stopped; 80 min; generation 100 epochs 35.5 min" in text
    assert "| eps-random/fold0 | 33 |" in text


def test_report_generation_fields(tmp_path):
    """generation_metrics' table and one field per GEN_SAMPLERS row (key_column)."""
    rows = [dict(sampler=s, n=10, ffd=2.0 * r, ffd_floor=2.0, ffd_ratio=r, recognizability=0.9,
                 recognizability_ratio=0.9, classes_covered=10, nn_ssim_mean=0.7, nn_ssim_max=0.9,
                 seconds_per_image=0.1, classifier_test_acc=0.99)
            for s, r in zip(["real: training images", *dl.GEN_SAMPLERS], range(1, 9))]
    dl.write_csv(pd.DataFrame(rows), tmp_path / "generation_metrics.csv")
    sr = pd.DataFrame(dict(t=[1000, 1000], ratio=[1.0001, 1.0998], c=1.1, model=["fold0", "generation"]))
    dl.write_csv(sr, tmp_path / "scale_response.csv")
    text = _render(tmp_path, "${reportgen_ffd_ratio} ${ddpm_fold0_ffd_ratio} ${ddim50clip_fold0_ffd_ratio} "
                   "${ddim50_fold0_ffd_ratio} ${ddpm_gen_ffd_ratio} ${ddim50_gen_ffd_ratio} "
                   "${ddim20_gen_ffd_ratio} ${classifier_acc} ${scale_fold0_1000} ${scale_generation_1000}")
    assert text == "2 3 4 5 6 7 8 0.990 1.000 1.100"


def test_report_table1_is_the_whole_table(tmp_path):
    """data/report_table1.csv: all 100 cells of the report's Table 1 (20 t × 5 folds, mean ± std),
    with its extremes where the report puts them; table1_vs_report puts ours beside them at
    every t, and plot_table1 draws the report's five folds in each panel."""
    rep = dl.report_table1()
    assert len(rep) == 100 and set(rep.t) == set(dl.TABLE1_T) and set(rep.fold) == set(range(5))
    cell = rep.set_index(["t", "fold"])
    assert cell.loc[(50, 4), "ssim_mean"] == rep.ssim_mean.max() == 0.704      # its best
    assert cell.loc[(50, 4), "ssim_std"] == 0.012
    assert cell.loc[(1000, 0), "ssim_mean"] == 0.015 and cell.loc[(1000, 1), "ssim_mean"] == 0.016
    assert cell.loc[(500, 1), "ssim_mean"] == 0.426 and rep.ssim_std.between(0, 0.02).all()
    df = _table1(tmp_path)
    cmp = dl.table1_vs_report(df, rep).set_index("t")
    assert list(cmp.index) == list(dl.TABLE1_T)
    d = df[(df.method == "corrected") & (df.t == 500)]
    assert np.isclose(cmp.loc[500, "corrected"], d.ssim_mean.mean())
    assert np.isclose(cmp.loc[500, "report"], rep[rep.t == 500].ssim_mean.mean())
    assert (cmp.loc[500, "report lowest"], cmp.loc[500, "report highest"]) == (0.426, 0.531)
    axes = dl.plot_table1(df, rep)
    assert len(axes[0].lines) == 2 + 5


def test_report_leakage_fields(tmp_path):
    """Per split at the best epoch: Test/ ÷ validation, the epoch, and both losses."""
    h = pd.DataFrame(dict(epoch=[1, 2], val_loss=[0.02, 0.010], test_loss=[0.02, 0.012]))
    dl.write_csv(dl.leakage_table({"grouped": h, "random (the report's)": h.assign(val_loss=[0.02, 0.008])}),
                 tmp_path / "leakage.csv")
    text = _render(tmp_path, "${leak_grouped} ${leak_grouped_epoch} ${leak_grouped_val} "
                   "${leak_random} ${leak_random_val} ${leak_random_test}")
    assert text == "1.200 2 0.01000 1.500 0.00800 0.01200"
