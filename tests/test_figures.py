"""Figures that read at notebook width: JupyterLab shows a figure about 680 px wide (6.8 in at
100 dpi), scaled down when wider, and every text must then be at least 10 pt."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.text import Text

import ddpm_cli
import ddpm_lib as dl

SHOWN_WIDTH = 6.8                                    # inches: 680 px at the notebook's 100 dpi


def _history(k: int) -> pd.DataFrame:
    e = np.arange(1, 9)
    return pd.DataFrame(dict(epoch=e, train_loss=0.2 / e + k / 100, val_loss=0.25 / e + k / 100,
                             test_loss=0.3 / e + k / 100))


def _guidance():
    w = list(dl.GUIDANCE_W)
    df = pd.DataFrame(dict(set=["unconditional model"] + ["conditional model"] * len(w),
                           w=[np.nan] + w, accuracy=np.linspace(0.3, 0.9, len(w) + 1),
                           ffd=np.linspace(2.0, 4.0, len(w) + 1)))
    per = pd.DataFrame([dict(cls=c, w=v, accuracy=0.5) for c in "abc" for v in w])
    return df, per


def _table1() -> pd.DataFrame:
    return pd.DataFrame([dict(method=m, fold=k, t=t, ssim_mean=1 - t / 1100, ssim_hr_mean=1 - t / 1000)
                         for m in ("corrected", "report-faithful") for k in range(5) for t in dl.TABLE1_T])


def _figure5():
    ts = range(900, -1, -100)
    names = list(dl.FIG5_SAMPLERS)
    return ({n: torch.rand(4, 3, 16, 16) * 2 - 1 for n in names},
            {n: {t: torch.randn(1, 3, 16, 16) for t in ts} for n in names})


FIGURES = {
    "xt": lambda: dl.plot_xt(dl.Diffusion(), torch.zeros(1, 3, 16, 16),
                             torch.randn(1, 3, 16, 16), (0, 50, 200, 500, 1000)),
    "history": lambda: dl.plot_history({f"fold {k}": _history(k) for k in range(5)}, max_epochs=10),
    "table1": lambda: dl.plot_table1(_table1(), dl.report_table1()),
    "figure4": lambda: dl.plot_figure4({"ground truth x0": torch.rand(9, 3, 16, 16),
                                        "x̂0 report-faithful (scaled-ε model, its decoding + Eq. 5)":
                                        torch.rand(9, 3, 16, 16)}, (50, 100, 200, 300, 400, 500, 600, 800, 1000)),
    "figure5": lambda: dl.plot_figure5(*_figure5(), n_show=4),
    "leakage": lambda: dl.plot_leakage({"grouped": _history(0), "random (the report's)": _history(1)}),
    "guidance": lambda: dl.plot_guidance(*_guidance()),
    "class_grid": lambda: dl.plot_class_grid(torch.rand(30, 3, 16, 16), [f"class {c}" for c in "abc"] * 2,
                                             n_show=8, title="requested class per row, w = 2, DDIM-50, seed 0"),
    "time_to_quality": lambda: ddpm_cli.plot_time_to_quality({name: pd.DataFrame(dict(
        minutes=[5.0, 10, 20], ffd_ratio=[9.0 * k, 4 * k, 2 * k], ffd_std=[0.1] * 3, ffd_floor=[1.0] * 3,
        n=[500] * 3, recognizability=[0.5, 0.8, 0.9])) for name, k in (("committed recipe", 2), ("new", 1))}),
}


def test_figure5_brightness_runs_from_T_to_0_left_to_right():
    """The brightness panels' t axis is inverted, so sampling (T → 0) runs left to right."""
    fig = dl.plot_figure5(*_figure5())
    assert all(ax.xaxis_inverted() for ax in fig.axes[2::3])
    assert fig.axes[-1].get_xlabel() == "t (sampling →)"


def test_class_grid_rows_hold_what_each_class_has():
    """Fewer samples per class than n_show: what each class has (2 here: a column per class)."""
    fig = dl.plot_class_grid(torch.rand(6, 3, 16, 16), ["a", "b", "c"], n_show=8)
    assert fig.axes[0].images[0].get_array().shape[:2] == (2 * 17 + 1, 3 * 17 + 1)
    fig = dl.plot_class_grid(torch.rand(18, 3, 16, 16), ["a", "b", "c"], n_show=8)
    assert fig.axes[0].images[0].get_array().shape[:2] == (3 * 17 + 1, 6 * 17 + 1)


@pytest.mark.parametrize("name", FIGURES)
def test_every_text_reads_at_notebook_width(name, tmp_path):
    """Drawn and saved by save_fig (as the notebooks do): every visible text is at least 10 pt at
    the width the notebook shows the figure, and no title is wider than its axes."""
    out = FIGURES[name]()
    fig = out if isinstance(out, matplotlib.figure.Figure) else np.ravel(out)[0].figure
    assert dl.save_fig(fig, name, dl.get_config("smoke", root=str(tmp_path))).exists()
    scale = min(1.0, SHOWN_WIDTH / fig.get_figwidth())
    small = {t.get_text(): round(t.get_fontsize() * scale, 1) for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip() and t.get_fontsize() * scale < 10 - 1e-9}
    assert not small, f"under 10 pt at {SHOWN_WIDTH} in: {small}"
    fig.draw_without_rendering()                                      # at the notebook's dpi
    for ax in fig.axes:
        for t in (ax.title, ax._left_title, ax._right_title):
            assert t.get_window_extent().width <= ax.get_window_extent().width + 1, t.get_text()
