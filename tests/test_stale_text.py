"""Sentences that state a number say the one their source holds (issue 44, item 7)."""
import re
from pathlib import Path

import pandas as pd

import ddpm_cli
import ddpm_lib as dl

REPO = Path(__file__).resolve().parents[1]


def test_data_readme_gives_the_conditional_twins_own_recipe():
    text = (REPO / "data" / "README.md").read_text()
    cond = dl.GENERATION_COND["cpu"]
    assert "the same recipe" not in text
    part = text[text.index("all_cond/ema_fp16.pt"):][:600]
    assert 'GENERATION_COND["cpu"]' in part
    assert f"lr {cond['lr']:.0e}".replace("e-04", "e-4") in part and f"{cond['max_epochs']} epochs" in part
    assert cond.get("min_snr_gamma", 0) == 0 and "no min-SNR" in part
    table = pd.read_csv(REPO / "figures" / "generation_training_cond.csv")
    assert f"({table.minutes.iloc[0]:.0f} min" in part and int(table.epochs.iloc[0]) == cond["max_epochs"]


def test_the_template_takes_sample_counts_from_the_tables():
    """No hand-written count of guidance samples; the guidance command names the table's."""
    template = (REPO / "report" / "template.md").read_text()
    assert not re.search(r"\b50 samples per class", template)
    line = next(ln for ln in template.splitlines() if "--what guidance" in ln)
    assert "${guidance_n_per_class}" in line


def test_the_speed_appendix_says_where_its_numbers_come_from():
    template = (REPO / "report" / "template.md").read_text()
    appendix = template[template.index("## Appendix: Speed"):]
    assert "on the machine that made these tables" not in appendix
    assert "figures/bench.csv" in appendix and "${bench_provenance}" in appendix
    f = ddpm_cli._report_fields(REPO / "figures", "")
    bench = pd.read_csv(REPO / "figures" / "bench.csv")
    assert f"{int(bench.threads.iloc[0])} threads" in f["bench_provenance"]
    assert f"torch {bench.torch.iloc[0]}" in f["bench_provenance"]
