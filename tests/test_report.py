"""The report is filled from the tables in figures/, and says so when a piece is missing."""
import numpy as np
import pandas as pd

import ddpm_lib as dl


def _render(tmp_path, template: str) -> str:
    """The report of `template` from the tables in tmp_path (smoke profile)."""
    tpl = tmp_path / "t.md"
    tpl.write_text(template)
    return dl.write_report(dl.get_config("smoke"), tpl, figs=tmp_path,
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
    out = dl.write_report(dl.get_config("smoke"), tpl, figs=tmp_path, out=tmp_path / "r" / "r.md")
    text = out.read_text()
    want = df[(df.method == "corrected") & (df.t == 50)].ssim_mean.mean()
    assert f"A {want:.3f} B" in text
    assert f"B {df[(df.method == 'report-faithful') & (df.t == 50)].ssim_mean.mean():.3f}" in text
    assert "generation_table: not produced yet" in text
    assert "![x](../02_schedules.png)" in text            # relative to the report's folder
    assert "figure nope.png not produced yet" in text
    assert "| t | fold 0 | fold 1 | mean over folds |" in text
    assert "$" not in text


def test_table1_wide_mean_over_folds(tmp_path):
    df = _table1(tmp_path)
    wide = dl.table1_wide(df, "corrected")
    assert list(wide.columns) == ["t", "fold 0", "fold 1", "mean over folds"]
    m = df[(df.method == "corrected") & (df.t == 100)].ssim_mean
    got = wide.set_index("t").loc[100, "mean over folds"]
    assert got == f"{m.mean():.3f} ± {m.std():.3f}"
    assert np.isclose(float(wide.set_index("t").loc[50, "fold 1"].split(" ± ")[0]),
                      0.9 - 50 / 2000 + 0.01, atol=1e-3)


def test_report_generation_epochs_from_training_summary(tmp_path):
    summary = pd.DataFrame(dict(run=["eps-grouped/fold0", "eps-grouped/all"], epochs=[3, 7],
                                best_val_loss=[0.02, 0.01]))
    dl.write_csv(summary, tmp_path / "training_summary.csv")
    text = _render(tmp_path, "trained ${gen_epochs} epochs\n${training_table}")
    assert "trained 7 epochs" in text
    assert "| eps-grouped/all | 7 | 0.01 |" in text


def _sweep(tmp_path):
    rows = [dict(sampler=name, steps=k, seed=seed, n=500, ffd=r * 2.0, ffd_floor=2.0, ffd_ratio=r)
            for name, base in (("DDIM, Gaussian ε̂ at high t", 6.0), ("DDIM, η=1", 4.0))
            for k in (20, 50) for seed, r in ((0, base + 1 - k / 50), (1, base + 2 - k / 50))]
    df = pd.DataFrame(rows)
    dl.write_csv(df, tmp_path / "sampler_sweep.csv")
    return df


def test_report_sampler_sweep_mean_and_range_over_seeds(tmp_path):
    _sweep(tmp_path)
    text = _render(tmp_path, "${sweep_seeds} seeds of ${sweep_n}: η=0 ${sweep_eta0_50} "
                   "(${sweep_eta0_50_range}), η=1 ${sweep_eta1_20}\n${sweep_table}")
    assert "2 seeds of 500: η=0 6.50 (6.00–7.00), η=1 5.10" in text     # (6 + 7) / 2; (4.6 + 5.6) / 2
    assert "| steps | DDIM, Gaussian ε̂ at high t | DDIM, η=1 |" in text
    assert "| 20 | 7.10 ± 0.71 (6.60–7.60) | 5.10 ± 0.71 (4.60–5.60) |" in text


def test_plot_sampler_sweep_draws_the_mean_over_seeds(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    df = _sweep(tmp_path)
    ax = dl.plot_sampler_sweep(df, {"DDPM-1000": (1000, 2.9)}, target=3.0)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    mean = next(ln for lb, ln in lines.items() if lb.startswith("DDIM, η=1: mean of 2 seeds"))
    assert list(mean.get_xdata()) == [20, 50] and np.allclose(mean.get_ydata(), [5.1, 4.5])
    assert list(lines["DDPM-1000"].get_ydata()) == [2.9]
    assert list(lines["target: 3× the floor"].get_ydata()) == [3.0, 3.0]


def test_report_b256_fields_and_comparison(tmp_path):
    """figures/b256/ (and its h200/, h200/cpu/) fill b256_…, b256_h200_…, b256_h200_cpu_… fields,
    and the comparison table has one column per generation_metrics found, FFD / floor per row."""
    def gm(d, ratio):
        d.mkdir(parents=True, exist_ok=True)
        dl.write_csv(pd.DataFrame(dict(sampler=["DDPM-1000", "DDIM-50"], n=[500, 500],
                                       ffd_ratio=ratio)), d / "generation_metrics.csv")
    gm(tmp_path / "b256" / "h200", [2.0, 23.0])
    gm(tmp_path / "b256" / "h200" / "cpu", [2.9, 15.0])
    gm(tmp_path / "b256", [2.1, 22.0])
    gm(tmp_path / "cpu", [9.0, 9.0])                 # not a b256 folder: never read
    dl.write_csv(pd.DataFrame(dict(run=["eps-grouped/all"], epochs=[24], best_val_loss=[0.0085],
                                   minutes=[3.77], images_per_s=[5583.0])),
                 tmp_path / "b256" / "h200" / "generation_training.csv")
    text = _render(tmp_path, "${b256_h200_ddpm_ffd_ratio} ${b256_h200_cpu_ddim50_ffd_ratio} "
                   "${b256_h200_gen_minutes} min, ${b256_h200_gen_img_s} img/s, "
                   "${b256_ddpm_ffd_ratio}\n${b256_comparison}")
    assert text.startswith("2 15 3.8 min, 5,583 img/s, 2.1\n")
    assert "| sampler | cpu model (H200) | b256 model (H200) | b256 model (CPU) |" in text
    assert "| DDPM-1000 | 2.9 | 2 | 2.1 |" in text and "| DDIM-50 | 15 | 23 | 22 |" in text
    assert "cpu_ddpm" not in str(dl._report_fields(tmp_path).keys()).replace("h200_cpu_ddpm", "")


def test_report_of_the_b256_profile_reads_all_figures(tmp_path, monkeypatch):
    """`report --profile b256` writes the same report as cpu: from figures/, not figures/b256/."""
    seen = []
    monkeypatch.setattr(dl, "_report_fields", lambda figs, nested=True: seen.append(figs) or {})
    tpl = tmp_path / "t.md"
    tpl.write_text("x")
    dl.write_report(dl.get_config("b256"), tpl, out=tmp_path / "r.md")
    assert seen == [dl.ROOT / "figures"]


def _seeds_csv(path, by: str, variants, samplers, seeds, ratio):
    """A _seeds_table CSV: the real test images' row, then per (variant, start, base) of
    `variants`, sampler and seed a row with FFD / floor ratio(base, sampler, seed),
    recognizability 0.99 − seed/100 and nearest-training SSIM max 0.95 + seed/100."""
    rows = [{"sampler": "real: test images", by: "", "from_t": np.nan, "seed": np.nan, "n": 1714,
             "ffd": np.nan, "ffd_floor": np.nan, "ffd_ratio": np.nan, "recognizability": 1.0,
             "classes_covered": 10, "nn_ssim_mean": 0.87, "nn_ssim_max": 0.999}]
    for v, start, base in variants:
        for sampler in samplers:
            for seed in seeds:
                r = ratio(base, sampler, seed)
                rows.append({"sampler": sampler, by: v, "from_t": start, "seed": seed, "n": 500,
                             "ffd": 2 * r, "ffd_floor": 2.0, "ffd_ratio": r,
                             "recognizability": 0.99 - seed / 100, "classes_covered": 10,
                             "nn_ssim_mean": 0.7, "nn_ssim_max": 0.95 + seed / 100})
    dl.write_csv(pd.DataFrame(rows), path)


def test_report_finetune_table(tmp_path):
    """figures/skip/generation_finetune.csv → skip_ft_… fields: one row per (model, variant),
    FFD / floor per sampler as mean (min–max), keyed by the model's profile and the variant."""
    rows = [dict(model="", variant="", sampler="real: test images", seed=np.nan, n=1714,
                 ffd=np.nan, ffd_floor=np.nan, ffd_ratio=np.nan, recognizability=1.0,
                 classes_covered=10, nn_ssim_mean=0.87, nn_ssim_max=0.999, from_t=np.nan)]
    for m, base in zip(dl.FT_PROFILES, (15.0, 12.0, 4.0, 3.0)):
        for v in dl.FT_VARIANTS:
            for sampler in dl.NORM_SAMPLERS:
                for seed in (0, 1):
                    r = base + seed + 100 * (v == "not clipped") * (base > 10)
                    rows.append(dict(model=m, variant=v, sampler=sampler, seed=seed, n=500,
                                     ffd=2 * r, ffd_floor=2.0, ffd_ratio=r, recognizability=0.99,
                                     classes_covered=10, nn_ssim_mean=0.7, nn_ssim_max=0.95,
                                     from_t=np.nan))
    (tmp_path / "skip").mkdir()
    dl.write_csv(pd.DataFrame(rows), tmp_path / "skip" / "generation_finetune.csv")
    text = _render(tmp_path, "${skip_ft_seeds}×${skip_ft_n}: ${skip_ft_ddim50_skip_noclip} "
                   "(${skip_ft_ddim50_skip_noclip_range}), ${skip_ft_ddim20_cpuft_noclip}, "
                   "${skip_ft_ddim50_cpu_clip}\n${skip_ft_table}")
    assert text.startswith("2×500: 4.50 (4.00–5.00), 112.50, 15.50\n")
    assert "| model, variant | DDIM-50 | DDIM-20 |" in text and "from t" not in text
    assert ("| trained on with s(t) (skip), not clipped | 4.50 (4.00–5.00) | 4.50 (4.00–5.00) |"
            in text)
    assert _render(tmp_path, "${skip_ft_ddim20_precond_clip}") == "3.50"
    err = pd.DataFrame({"t": dl.FT_EPS_T, **{m: [1e-3 * (i + 1)] * len(dl.FT_EPS_T)
                                            for i, m in enumerate(dl.FT_PROFILES)},
                        dl.FT_MIXTURE: 5.7e-6})
    dl.write_csv(err, tmp_path / "skip" / "finetune_eps_error.csv")
    assert _render(tmp_path, "${skip_fteps_precond_1000} ${skip_fteps_segment_500} "
                   "${skip_fteps_cpuft_100}") == "0.004 5.7e-06 0.002"
    err[dl.FT_MIXTURE] = 5.696e-6
    dl.write_csv(err, tmp_path / "skip" / "finetune_eps_error.csv")
    assert _render(tmp_path, "${skip_fteps_segment_1000}") == "5.7e-06"
    assert "| t | cpu model |" in _render(tmp_path, "${skip_fteps_table}")


def test_report_mixture_table(tmp_path):
    """generation_mixture.csv → one row per prior: its start, FFD / floor per sampler as
    mean (min–max) over the seeds, the lowest recognizability and the SSIM to the training set."""
    _seeds_csv(tmp_path / "generation_mixture.csv", "prior",
               (("network only", np.nan, 15.0), ("a Gaussian per class", 550, 3.0)),
               ("DDIM-50", "DDIM-50, η=1"), (0, 1),
               lambda base, sampler, seed: base + seed + (sampler != "DDIM-50"))
    text = _render(tmp_path, "${mix_seeds}×${mix_n} (${mix_floor}): ${mix_ddim50_class} (${mix_ddim50_class_range}), "
                   "η=1 ${mix_ddim50eta1_net}; from ${mix_from_class}, ${mix_from_net}; "
                   "SSIM ≤ ${mix_nn_max_class} (real ${mix_real_nn_max})\n${mixture_table}")
    assert "2×500 (2.000): 3.50 (3.00–4.00), η=1 16.50; from 550, n/a; SSIM ≤ 0.960 (real 0.999)" in text
    assert "| a Gaussian per class | 550 | 3.50 (3.00–4.00) | 4.50 (4.00–5.00) | 0.98 |" in text
    assert "| network only | — | 15.50 (15.00–16.00) |" in text


def test_report_norm_table(tmp_path):
    """generation_norm.csv → one row per variant (NORM_KEYS names its fields): the start only
    where the network's ε̂ is norm-matched, FFD / floor per sampler as mean (min–max)."""
    _seeds_csv(tmp_path / "generation_norm.csv", "variant",
               (("x̂0 clipped", np.nan, 12.0), ("norm-matched, not clipped", 400, 3.0)),
               ("DDIM-50", "DDIM-20"), (0, 1, 2),
               lambda base, sampler, seed: base + seed / 2 + (sampler == "DDIM-20"))
    text = _render(tmp_path, "${norm_seeds}×${norm_n}: ${norm_ddim50_clip} → ${norm_ddim50_matched} "
                   "(${norm_ddim50_matched_range}), DDIM-20 ${norm_ddim20_matched}; from "
                   "${norm_from_matched}, ${norm_from_clip}; real ${norm_real_nn_max}\n${norm_table}")
    assert "3×500: 12.50 → 3.50 (3.00–4.00), DDIM-20 4.50; from 400, n/a; real 0.999" in text
    assert "| norm-matched, not clipped | 400 | 3.50 (3.00–4.00) | 4.50 (4.00–5.00) | 0.97 |" in text


def test_report_values_beside_ours(tmp_path):
    """data/report_table1.csv holds typed-in values with their source; table1_vs_report puts ours
    (mean, lowest and highest fold) beside them at each of their t, and plot_table1 draws them."""
    rep = dl.report_table1()
    assert {"t", "what", "ssim", "source"} <= set(rep.columns) and rep.source.str.len().min() > 10
    assert rep.ssim.between(0, 1).all() and set(rep.t) <= set(dl.TABLE1_T)
    df = _table1(tmp_path)
    cmp = dl.table1_vs_report(df, rep).set_index("t")
    assert list(cmp.index) == sorted(rep.t.unique())
    d = df[(df.method == "corrected") & (df.t == 500)]
    assert np.isclose(cmp.loc[500, "corrected ssim"], d.ssim_mean.mean())
    assert cmp.loc[500, "corrected lowest fold"] == d.ssim_mean.min()
    assert cmp.loc[500, "report"] == " – ".join(f"{v:.3f}" for v in rep[rep.t == 500].ssim)
    axes = dl.plot_table1(df, rep)
    assert len(axes[0].lines) == 2 + rep.t.nunique() and len(axes[1].lines) == 2
