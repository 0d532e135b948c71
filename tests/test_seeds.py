"""The held-out seeds and the cause table (issue 46): spreads that carry the floor's, one change
per row of the cause table, the table's words, and `seeds` as a resumable run-once command."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import ddpm_cli as cli
import ddpm_lib as dl
import ddpm_train


def test_ratio_spread_adds_relative_errors():
    """(a/b)·√((σa/a)² + (σb/b)²): exact for the values below, the bootstrap alone when the
    floor has no spread, and larger than either part."""
    assert dl.ratio_spread(2.0, 0.2, 1.0, 0.1) == pytest.approx(2 * np.sqrt(0.02))
    assert dl.ratio_spread(6.0, 0.6, 2.0, 0.0) == pytest.approx(0.3)
    assert dl.ratio_spread(6.0, 0.0, 2.0, 0.5) == pytest.approx(0.75)
    assert dl.ratio_spread(6.0, 0.6, 2.0, 0.5) > max(0.3, 0.75)


def summary_rows(table="causes", ffd=(10.0, 12.0, 14.0), precision=(0.5, 0.6, 0.7),
                 name="a", floor=(2.0, 0.4)) -> pd.DataFrame:
    return pd.DataFrame([dict(table=table, set=name, seed=s, n=64, ffd=f, ffd_floor=floor[0],
                              ffd_floor_std=floor[1], precision=p, precision_floor=0.97,
                              coverage=p / 2, coverage_floor=0.87, brightness=0.4 + s / 100)
                         for s, f, p in zip((1, 2, 3), ffd, precision)])


def test_seed_summary_means_over_seeds_and_carries_the_floors_spread():
    """One row per set: means over the seeds, std with ddof 1, and FFD ÷ floor's ± from the
    seeds' FFD std and the floor's std together; one seed: no spread (NaN)."""
    s = dl.seed_summary(summary_rows()).iloc[0]
    assert (s.seeds, s.n) == ("1, 2, 3", 64)
    assert s.ffd == 12.0 and s.ffd_std == pytest.approx(2.0) and s.ffd_ratio == 6.0
    assert s.ffd_ratio_std == pytest.approx(6.0 * np.hypot(2.0 / 12.0, 0.4 / 2.0))
    assert s.precision == pytest.approx(0.6) and s.precision_std == pytest.approx(0.1)
    assert s.brightness == pytest.approx(0.42) and s.coverage_floor == 0.87
    one = dl.seed_summary(summary_rows().iloc[:1]).iloc[0]
    assert np.isnan(one.precision_std) and np.isnan(one.ffd_ratio_std)


def test_each_cause_row_changes_one_thing():
    """Every CAUSES row names a row before it and differs from it in exactly one of the model,
    the sampler and x̂0 clipping (the report's Eq. 5 decoding clips, so it counts as clipped);
    CAUSE_CHAIN runs through rows that each change the one before."""
    names = list(dl.CAUSES)
    aspects = lambda k, m, kw: (k, m, kw.get("clip", True))
    for i, (name, (k, m, kw, frm, change)) in enumerate(dl.CAUSES.items()):
        assert change
        if i == 0:
            assert frm == "" and kw == dict(decode="report")
            continue
        assert frm in names[:i], name
        before = aspects(*dl.CAUSES[frm][:3])
        assert sum(a != b for a, b in zip(aspects(k, m, kw), before)) == 1, name
    chain = dl.CAUSE_CHAIN
    assert chain[0] == names[0] and all(dl.CAUSES[b][3] == a for a, b in zip(chain, chain[1:]))


def fake_causes(ratio: dict, std: float = 0.1) -> pd.DataFrame:
    """seed_summary-like causes rows: FFD ÷ floor from ratio, precision and coverage 1/ratio."""
    return pd.DataFrame([dict(table="causes", set=k, n=64, seeds="1, 2, 3", ffd=r, ffd_floor=1.0,
                              ffd_std=std * r, ffd_ratio=r, ffd_ratio_std=3 * std * r, precision=1 / r,
                              precision_std=0.01, precision_floor=0.97, coverage=1 / r,
                              coverage_std=0.01, coverage_floor=0.87, brightness=0.5,
                              brightness_std=0.01) for k, r in ratio.items()])


def test_the_cause_table_says_better_or_worse_only_beyond_the_spreads():
    """A row whose FFD ÷ floor falls by more than the two rows' spreads over the seeds added
    (not the floor's: both rows share it) is 'better' (precision and coverage rising with it),
    one that rises 'worse', one that moves less 'within the spread'; the chain sentence names the steps that improve all three measures beyond the
    spreads, those that improve FFD ÷ floor alone, and the one that divided it the most."""
    ratio = dict.fromkeys(dl.CAUSES, 10.0)
    ratio.update({"ε target": 100.0, "report as written": 1000.0, "DDPM sampler": 10.0,
                  "x̂0 not clipped": 10.5, "DDIM-50 without preconditioning, not clipped": 900.0,
                  "DDIM-50": 13.0})
    t = dl.cause_table(fake_causes(ratio)).set_index("row")
    assert t.loc["report as written", "from"] == "—"
    assert "FFD ÷ floor 1e+03 → 100 (better)" in t.loc["ε target", "what it did"]
    assert "precision 0.00 → 0.01 (within the spread)" in t.loc["ε target", "what it did"]
    assert "(within the spread)" in t.loc["x̂0 not clipped", "what it did"].split(";")[0]
    # 10 → 13: beyond the seeds' spreads (1 + 1.3), within the ratios' (3 + 3.9) that hold the floor's
    assert t.loc["DDIM-50", "what it did"].startswith("FFD ÷ floor 10 → 13 (worse)")
    assert "FFD ÷ floor 10 → 900 (worse)" in t.loc[
        "DDIM-50 without preconditioning, not clipped", "what it did"]
    assert "precision 0.10 → 0.00 (worse)" in t.loc[
        "DDIM-50 without preconditioning, not clipped", "what it did"]
    chain = dl.cause_chain(fake_causes(ratio))
    assert ("all improve at *DDPM sampler*, *DDIM-50, x̂0 not clipped*; FFD ÷ floor alone at "
            "*ε target*;") in chain
    assert chain.endswith("the largest step is *ε target* (FFD ÷ floor divided by 10)")
    ratio["DDPM sampler"] = 0.5                                     # now the largest step
    assert "largest step is *DDPM sampler* (FFD ÷ floor divided by 200)" in dl.cause_chain(
        fake_causes(ratio))


@pytest.fixture
def tiny_seeds(monkeypatch):
    """`seeds` on the smoke profile with one cheap set (the cause table's DDIM-50 row) and
    tables of their own names, so the conftest's smoke tables are left alone."""
    monkeypatch.setattr(dl, "SEED_TABLES", {"causes": ["DDIM-50"]})
    monkeypatch.setattr(dl, "SEED_FILES", tuple(f"test_{f}" for f in dl.SEED_FILES))
    cfg = dl.get_config("smoke")
    yield cfg
    for name in dl.SEED_FILES:
        for suffix in (".csv", ".md"):
            (cfg.fig_dir() / f"{name}{suffix}").unlink(missing_ok=True)


def test_seeds_caches_each_cell_and_leaves_a_held_cell_to_its_process(tiny_seeds, monkeypatch,
                                                                         capsys):
    """A cell another process holds (run_lock) is skipped and no table is written; once every
    cell is there the tables are written, and a second run reuses the cache (samples nothing)."""
    cfg, seeds = tiny_seeds, ["--seeds", "11", "12"]
    models = dl.cause_models(cfg)
    clf = dl.load_classifier(cfg)[0]
    digest = cli.weights_digest([m for m, _ in models.values()]
                                + [dl.generation_model(cfg, conditional=True), clf])
    cache = cfg.home / "runs" / cfg.profile / "seeds" / digest
    for seed in (11, 12):
        for f in ("rows.csv", "samples.pt"):
            (cli.seed_cell(cache, "causes", "DDIM-50", seed) / f).unlink(missing_ok=True)
    with ddpm_train.run_lock(cli.seed_cell(cache, "causes", "DDIM-50", 12)):
        cli.main(["seeds", "--profile", "smoke", *seeds])
    assert "1 cells are still being computed by another process" in capsys.readouterr().out
    assert not (cfg.fig_dir() / f"{dl.SEED_FILES[0]}.csv").exists()
    cli.main(["seeds", "--profile", "smoke", *seeds])
    rows = pd.read_csv(cfg.fig_dir() / f"{dl.SEED_FILES[0]}.csv")
    assert rows.seed.tolist() == [11, 12] and rows.ffd_ratio_std.notna().all()
    summary = pd.read_csv(cfg.fig_dir() / f"{dl.SEED_FILES[1]}.csv")
    assert summary.seeds.tolist() == ["11, 12"]
    monkeypatch.setattr(dl, "seed_set", lambda *a, **k: pytest.fail("a cached cell was sampled"))
    cli.main(["seeds", "--profile", "smoke", *seeds])
    assert pd.read_csv(cfg.fig_dir() / f"{dl.SEED_FILES[0]}.csv").equals(rows)


def test_held_out_rows_beside_seed_0_take_the_1000_step_rows_from_the_cause_table():
    """beside_held_out: a generation row scored on the held-out seeds is shown with its own
    scores; a 1000-step row with its cause_twin's (the same model, sampler and settings); a row
    neither scored is left out."""
    assert dl.cause_twin("DDPM-1000, report's U-Net") == "DDPM sampler"
    assert dl.cause_twin("DDIM-20 (η = 0), preconditioned") is None
    summary = pd.concat([fake_causes({"DDPM sampler": 4.0}),
                         fake_causes({"DDIM-50 (η = 0), preconditioned": 6.0}).assign(
                             table="generation", n=500)])
    rows = pd.DataFrame(dict(sampler=["DDPM-1000, report's U-Net", "DDIM-50 (η = 0), preconditioned",
                                      "DDIM-20 (η = 0), preconditioned"], n=[16, 500, 500],
                             ffd_ratio=[np.nan, 5.5, 7.0], ffd_ratio_std=[np.nan, 0.5, 0.6],
                             precision=[np.nan, 0.55, 0.5], coverage=[np.nan, 0.9, 0.9]))
    t = dl.beside_held_out(rows, rows.sampler.tolist(), summary, "generation", 0)
    assert t.set.tolist() == ["DDPM-1000, report's U-Net (cause table: DDPM sampler)",
                              "DDIM-50 (η = 0), preconditioned"]
    assert t["n, seed 0"].tolist() == [16, 500] and t["n, held out"].tolist() == [64, 500]
    assert t["FFD ÷ floor, seeds 1, 2, 3"].tolist() == ["4 ± 1.2", "6 ± 1.8"]
    assert t["FFD ÷ floor, seed 0"].tolist() == ["nan", "5.5 ± 0.5"]
