"""Small n reads true (issue 44): notebook 05 at its defaults draws 1 sample per class and 2 of
the 1000-step samplers; no metric may then read as a number it is not (a KID of −3.3, a ratio of
−3.12×), warn, or squash a figure."""
from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

import ddpm_lib as dl

matplotlib.use("Agg")


@pytest.mark.parametrize("m", [1, 2, dl.KID_MIN_N - 1])
def test_kid_below_its_minimum_n_is_nan_without_a_warning(m):
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(m, 8, generator=g), torch.randn(50, 8, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k, s = dl.kid(f1, f2, subset_size=min(100, m))
    assert np.isnan(k) and np.isnan(s)


def test_kid_at_its_minimum_n_is_a_number():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(dl.KID_MIN_N, 8, generator=g)
    k, _ = dl.kid(f, torch.randn(40, 8, generator=g) + 3, subset_size=dl.KID_MIN_N)
    assert np.isfinite(k) and k > 0


def test_a_kid_ratio_is_never_negative():
    r = dl.ratio_of_positive(pd.Series([0.2, -0.1, np.nan, 0.4]), 0.1)
    assert np.allclose(r[[0, 3]], [2.0, 4.0]) and r[[1, 2]].isna().all()
    assert np.isnan(dl.ratio_of_positive(0.2, -3.0)) and dl.ratio_of_positive(0.2, 0.1) == 2.0


def test_a_metric_below_its_minimum_n_prints_n_a():
    assert dl.n_text(float("nan"), 2) == "n/a (n = 2)"
    assert dl.n_text(1.2345, 16, ".2f", "×") == "1.23×"


def test_the_report_says_n_a_for_a_guidance_ratio_it_has_not(tmp_path):
    import ddpm_cli
    rows = [dict(set="real: test images", w=np.nan, n=40, accuracy=np.nan, min_class_accuracy=np.nan,
                 ffd=np.nan, ffd_vs_unconditional=np.nan, kid=np.nan, kid_vs_unconditional=np.nan,
                 recognizability=1.0, nn_ssim_max=0.9),
            dict(set="unconditional model", w=np.nan, n=10, accuracy=np.nan,
                 min_class_accuracy=np.nan, ffd=np.nan, ffd_vs_unconditional=np.nan, kid=np.nan,
                 kid_vs_unconditional=np.nan, recognizability=0.5, nn_ssim_max=0.8)]
    rows += [dict(set="conditional model", w=w, n=10, accuracy=0.5, min_class_accuracy=0.1,
                  ffd=np.nan, ffd_vs_unconditional=np.nan, kid=np.nan, kid_vs_unconditional=np.nan,
                  recognizability=0.5, nn_ssim_max=0.8) for w in (0, 1, 2)]
    df = pd.DataFrame(rows).assign(steps=50, n_per_class=1, classifier_test_acc=1.0)
    dl.write_csv(df, tmp_path / "guidance.csv")
    f = ddpm_cli._report_fields(tmp_path, "")
    assert f["guidance_measure"] == "KID n/a (n = 10)"


@pytest.mark.parametrize("n", [1, 2, 4, 5, 8])
def test_the_class_grid_is_laid_out_for_the_n_it_gets(n):
    """No warning (constrained_layout not applied), a title on at most two lines, and images
    not squashed into one narrow column."""
    import matplotlib.pyplot as plt
    classes = [f"Fruit name {i}" for i in range(10)]
    x = torch.rand(10 * n, 3, 32, 32) * 2 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = dl.plot_class_grid(x, classes, n_show=min(8, n),
                                 title="requested class per row, w = 5, DDIM-50, seed 0")
        fig.canvas.draw()
    ax = fig.axes[0]
    assert ax._left_title.get_text().count("\n") <= 1
    bb = ax.get_window_extent()
    assert bb.width / fig.bbox.width > 0.5                # the grid spans the figure's width
    labels = [t.get_text() for t in (ax.get_xticklabels() if n < 5 else ax.get_yticklabels())]
    assert labels == classes
    plt.close(fig)
