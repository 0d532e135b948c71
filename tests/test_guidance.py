"""Tests of the class-conditional U-Net and classifier-free guidance (ddpm_lib.Guided).

The guided samplers are checked on a case with a known answer: two classes of Gaussian data,
x0 | c ~ N(μ_c, s²) per pixel. The exact conditional ε* of each class is the closed form of
tests/test_sampling.py, and the exact unconditional ε* (the null class) is the mixture's,
ε*_∅ = Σ_c r_c(x_t)·ε*_c with r_c the posterior weight of class c given x_t. Guided DDIM must then
pull the samples of a class toward its mean as w grows, past it for w > 1.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import ddpm_lib as dl
import ddpm_cli as cli
import ddpm_train as dt

T = 1000


def smoke_cond(**kw) -> dl.Config:
    return dl.get_config("smoke", generation=True, n_classes=3, **kw)


class TwoGaussians(nn.Module):
    """The exact ε* of two equally likely classes x0 | c ~ N(μ_c, s²) (per pixel, independent),
    called like a conditional UNet: model(x, t, y) with y = 2 (or None) the null class.
    Float64 inside."""

    n_classes = 2

    def __init__(self, mus=(-0.5, 0.5), s2: float = 0.04):
        super().__init__()
        b = np.linspace(1e-3, 0.02, T)
        self.register_buffer("ab", torch.tensor(np.cumprod(1 - b)))
        self.mus, self.s2 = torch.tensor(mus, dtype=torch.float64), s2

    def forward(self, x, t, y=None):
        ab = self.ab[t - 1].view(-1, 1, 1, 1)
        xd, v = x.double(), ab * self.s2 + 1 - ab                          # Var(x_t | c)
        eps = [(1 - ab).sqrt() * (xd - ab.sqrt() * m) / v for m in self.mus]   # ε*_c
        # log p(x_t | c) over the whole image, up to a constant shared by the classes
        logp = torch.stack([-((xd - ab.sqrt() * m) ** 2).sum((1, 2, 3)) / (2 * v.flatten())
                            for m in self.mus])                             # (2, B)
        r = logp.softmax(0).view(2, -1, 1, 1, 1)                          # posterior of c
        uncond = r[0] * eps[0] + r[1] * eps[1]
        y = torch.full((len(x),), 2, device=x.device) if y is None else y
        out = torch.where((y == 0).view(-1, 1, 1, 1), eps[0],
                          torch.where((y == 1).view(-1, 1, 1, 1), eps[1], uncond))
        return out.float()


# -----------------------------------------------------------------------------------------------
# the model


def test_conditional_unet_shapes_and_null_class():
    """A class embedding of n_classes + 1 rows (the last: null); y = None is the null class; the
    label changes the output; an unconditional config builds the report's U-Net unchanged."""
    cfg = smoke_cond()
    torch.manual_seed(0)
    model = dl.build_model(cfg, torch.device("cpu"), verbose=False).eval()
    assert model.cemb.num_embeddings == 4
    plain = dl.build_model(dl.get_config("smoke", generation=True), torch.device("cpu"),
                           verbose=False)
    assert plain.cemb is None
    assert dl.n_params(model) - dl.n_params(plain) == 4 * cfg.time_dim
    x, t = torch.randn(5, 3, 16, 16), torch.tensor([1, 10, 500, 999, 1000])
    with torch.no_grad():
        out = model(x, t, torch.tensor([0, 1, 2, 3, 0]))
        assert out.shape == x.shape
        torch.testing.assert_close(model(x, t), model(x, t, torch.full((5,), 3)), rtol=0, atol=0)
        assert not torch.allclose(model(x, t, torch.zeros(5, dtype=torch.long)),
                                  model(x, t, torch.ones(5, dtype=torch.long)))
    assert cfg.run_dir("all").name == "all_cond" and "_cond" in str(dl.committed_dir(cfg, "all"))
    assert "--conditional" in dl.train_command(cfg, "all")


def test_label_dropout_at_the_stated_rate_and_unconditional_draws_unchanged():
    """epoch_batches drops a share p_uncond of the labels to the null class (binomial, 4 SE) and
    keeps the others; an unconditional config yields no labels (and draws none: its batches
    are those of the report's U-Net runs)."""
    cfg = smoke_cond(p_uncond=0.15, steps_per_epoch=200, batch_size=50, flip=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1000, 3, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (1000,), generator=g)
    fp = dl.Diffusion(T)
    cond = list(dt.epoch_batches(images, cfg, fp, torch.Generator().manual_seed(1), labels))
    plain = list(dt.epoch_batches(images, dataclasses.replace(cfg, n_classes=0), fp,
                                  torch.Generator().manual_seed(1), labels))
    y = torch.cat([b[3] for b in cond])
    null = (y == 3).float().mean().item()
    assert abs(null - 0.15) < 4 * np.sqrt(0.15 * 0.85 / len(y)), null
    # the kept labels are the images' own: find each x0 among the images by its pixels
    x0 = torch.cat([b[0] for b in cond])
    flat = dl.to_float(images).flatten(1)
    for i in range(0, len(y), 97):
        if y[i] < 3:
            same = (flat == x0[i].flatten()).all(1) | (flat == x0[i].flip(-1).flatten()).all(1)
            assert y[i] in labels[same]
    assert all(b[3] is None for b in plain)
    for u, v in zip(cond[0][:3], plain[0][:3]):     # the labels are drawn after x0, t and ε
        assert torch.equal(u, v)


def test_guidance_w0_is_unconditional_and_w1_conditional_exactly():
    """Guided: w = 0 returns the null-class output and w = 1 the conditional one, bit for bit;
    w = 3 is the extrapolation out_∅ + 3·(out_c − out_∅). An unconditional model is refused."""
    torch.manual_seed(0)
    model = dl.build_model(smoke_cond(), torch.device("cpu"), verbose=False).eval()
    x, t, y = torch.randn(4, 3, 16, 16), torch.tensor([3, 300, 700, 1000]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        u, c = model(x, t), model(x, t, y)
        assert torch.equal(dl.Guided(model, y, 0.0)(x, t), u)
        assert torch.equal(dl.Guided(model, y, 1)(x, t), c)
        torch.testing.assert_close(dl.Guided(model, y, 3.0)(x, t), u + 3 * (c - u),
                                   rtol=1e-5, atol=1e-5)
    plain = dl.build_model(dl.get_config("smoke"), torch.device("cpu"), verbose=False)
    with pytest.raises(ValueError, match="class-conditional"):
        dl.Guided(plain, y, 2.0)
    with pytest.raises(ValueError, match="one class label per sample"):
        dl.sample(model, dl.Diffusion(T), "ddim", 4, 16, y=y[:3], steps=2)


def test_guided_sampling_on_two_gaussians_moves_toward_the_class():
    """With the exact ε* of two Gaussian classes (means −0.5 and 0.5): unconditional (w = 0)
    samples split between the classes (mean ≈ 0); w = 1 gives class 1's N(0.5, s²) (DDIM-100,
    η = 0: its discretisation error only); the mean of class-1 samples grows with w, past 0.5
    for w > 1 (the guided ε̂ at the different t is not the noising of one distribution, and the
    deterministic chain follows it),
    and class 0 mirrors it; DDPM-1000 draws class 1 for w ≥ 1."""
    oracle, fp = TwoGaussians(), dl.Diffusion(T)
    n = 256
    means = {}
    for cls in (0, 1):
        y = torch.full((n,), cls)
        for w in (0, 1, 2, 3, 5):
            x, _ = dl.sample(oracle, fp, "ddim", n, 2, seed=0, y=y, w=w, steps=100,
                             clip=False, progress=False)
            means[cls, w] = x.mean((1, 2, 3))                               # per sample
    m1 = [means[1, w].mean().item() for w in (0, 1, 2, 3, 5)]
    assert abs(m1[0]) < 0.15, m1                       # w = 0: both classes, ±0.5 halves
    assert abs(m1[1] - 0.5) < 0.02, m1                 # w = 1: class 1
    assert all(a < b for a, b in zip(m1, m1[1:])), m1   # toward, then past, class 1's mean
    assert (means[1, 1] > 0).all() and (means[1, 0] < 0).any()
    for w in (0, 1, 2, 3, 5):                          # class 0 is the mirror image
        assert abs(means[0, w].mean().item() + means[1, w].mean().item()) < 0.15
    # DDPM-1000 takes the guided model alike. Its chain targets p_c^w·p^(1−w) at every t, which
    # is p_c where the classes do not overlap: class 1's mean at w = 1 and at w = 3, and class
    # 0's without guidance toward class 1 (w = 0 splits the two)
    y = torch.ones(n, dtype=torch.long)
    m = {w: dl.sample(oracle, fp, "ddpm", n, 2, seed=0, y=y, w=w, clip=False,
                      progress=False)[0].mean((1, 2, 3)) for w in (0, 1, 3)}
    assert abs(m[1].mean() - 0.5) < 0.03 and abs(m[3].mean() - 0.5) < 0.03, m
    assert (m[1] > 0).all() and (m[0] < 0).any() and (m[0] > 0).any()


# -----------------------------------------------------------------------------------------------
# training and the weights that are sampled


def test_conditional_training_samples_with_the_ema_weights(tmp_path, monkeypatch):
    """A conditional run trains with finite losses; generation_model(conditional=True) loads its
    EMA weights (those of best.pt), never the raw training weights of checkpoint.pt, so guided
    sampling cannot run on the raw weights. An unconditional checkpoint in its place is refused."""
    dl.load_index(dl.get_config("smoke"))         # the synthetic set exists
    data = str(dl.ROOT / "runs" / "smoke" / "data")
    cfg = dl.get_config("smoke", root=str(tmp_path), conditional=True, data_dir=data, max_epochs=2)
    assert cfg.n_classes == dl.load_index(cfg).label.nunique() == 3
    h = dt.train(cfg, "all", progress=False)
    assert np.isfinite(h.train_loss).all() and np.isfinite(h.val_loss).all()
    model = dl.generation_model(dl.get_config("smoke", root=str(tmp_path), data_dir=data), conditional=True)
    run = cfg.run_dir("all")
    ema, raw = dl.load_checkpoint(run / "best.pt")["ema"], dl.load_checkpoint(
        run / "checkpoint.pt")["model"]
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v.float()) for k, v in ema.items())
    assert not all(torch.equal(sd[k], v.float()) for k, v in raw.items())
    x, _ = dl.sample(model, dl.Diffusion.from_config(cfg), "ddim", 6, cfg.image_size,
                     y=torch.tensor([0, 1, 2, 0, 1, 2]), w=2.0, steps=3, progress=False)
    assert x.shape == (6, 3, 16, 16) and x.isfinite().all()
    plain = dataclasses.replace(cfg, n_classes=0)
    dt.train(plain, 0, out=tmp_path / "plain", progress=False)
    with pytest.raises(ValueError, match="n_classes"):
        dl.load_model(cfg, "all", tmp_path / "plain" / "best.pt")


def test_cli_samples_a_fruit_with_guidance(monkeypatch, capsys, tmp_path):
    """`sample --fruit NAME --w W` samples the class-conditional model guided toward that class
    with weight w, and names the grid after both; `train --conditional` needs --fold all."""
    classes = sorted(dl.load_index(dl.get_config("smoke")).label.unique())
    seen = {}
    real = dl.SAMPLERS["ddim"]

    def spy(model, *args, **kw):
        seen["model"] = model
        return real(model, *args, **kw)
    monkeypatch.setitem(dl.SAMPLERS, "ddim", spy)
    cli.main(["sample", "--profile", "smoke", "--n", "3", "--steps", "2", "--fruit", classes[1],
              "--w", "2", "--out", str(tmp_path)])
    m = seen["model"]
    assert isinstance(m, dl.Guided) and m.w == 2.0 and m.y.tolist() == [1, 1, 1]
    name = f"_{classes[1].replace(' ', '_')}_w2_n3_seed0.png"
    assert name in capsys.readouterr().out and len(list(tmp_path.glob(f"*{name}"))) == 1
    with pytest.raises(SystemExit, match="add --fold all"):
        cli.main(["train", "--profile", "smoke", "--fold", "0", "--conditional"])


# -----------------------------------------------------------------------------------------------
# the measurements: guidance by w, time to quality, and the report's fields from them


def test_guidance_metrics_tables_and_the_chosen_w(tmp_path):
    """guidance_metrics on the smoke models: one row per set (the real test images, the
    unconditional model, each w), one per (w, class), class-major samples; pick_w takes the most
    accurate w within the FFD limit; the report's fields name that w."""
    cfg = dl.get_config("smoke")
    k = dl.load_index(cfg).label.nunique()
    df, per, xs = dl.guidance_metrics(cfg, n_per_class=4, ws=(0, 1, 3), steps=3, progress=False)
    assert df.set.tolist() == ["real: test images", "unconditional model"] + ["conditional model"] * 3
    assert len(per) == 3 * k and set(per.w) == {0, 1, 3}
    assert all(x.shape == (4 * k, 3, 16, 16) for x in xs.values())
    assert df.kid_vs_unconditional.iloc[1] == 1.0 and per.kid.notna().all()
    assert df.ffd.iloc[1:].notna().all()        # 4 × 3 samples: at least smoke's n_min (8)
    assert (df.ffd_ratio_std.iloc[1:] > 0).all() and (df.ffd_vs_unconditional_std.iloc[2:] > 0).all()
    g = df[df.set == "conditional model"]
    assert ((g.accuracy >= 0) & (g.accuracy <= 1)).all()
    np.testing.assert_allclose(g.accuracy, per.groupby("w").accuracy.mean().to_numpy())
    assert (g.min_class_accuracy <= g.accuracy).all()
    fake = pd.DataFrame(dict(set=["unconditional model"] + ["conditional model"] * 4,
                             w=[np.nan, 0, 1, 3, 5], accuracy=[np.nan, 0.2, 0.8, 0.95, 0.99],
                             ffd_vs_unconditional=[1, 1.0, 0.9, 1.4, 2.0]))
    assert dl.pick_w(fake) == 3                          # 5 is more accurate, but over 1.5×
    assert dl.pick_w(fake, ffd_max=0.5) == 5             # none within: the most accurate
    df.to_csv(tmp_path / "guidance.csv", index=False)
    per.to_csv(tmp_path / "guidance_by_class.csv", index=False)
    f = cli._report_fields(tmp_path)
    assert f["guidance_w"] == f"{dl.pick_w(df):g}" and f["guidance_n_per_class"] == "4"
    assert "guidance_table" in f and "guidance_class_table" in f


def test_time_to_quality_scores_every_snapshot(tmp_path, monkeypatch):
    """A generation run keeps an fp16 EMA snapshot every snapshot_every epochs; time_to_quality
    scores each with its epoch, images seen and minutes from the run's history; without
    snapshots it says how to make them."""
    dl.load_index(dl.get_config("smoke"))
    data = str(dl.ROOT / "runs" / "smoke" / "data")
    cli.train_classifier(dl.get_config("smoke"), progress=False)
    cfg = dl.get_config("smoke", root=str(tmp_path), data_dir=data)
    dl.classifier_path(cfg).parent.mkdir(parents=True)
    dl.classifier_path(cfg).write_bytes(dl.classifier_path(dl.get_config("smoke")).read_bytes())
    with pytest.raises(FileNotFoundError, match="snapshots"):
        cli.time_to_quality(cfg, n=6, steps=2, progress=False)
    gcfg = dl.get_config("smoke", root=str(tmp_path), generation=True, data_dir=data)
    assert gcfg.snapshot_every == 1
    dt.train(gcfg, "all", progress=False)
    snaps = sorted(p.name for p in gcfg.run_dir("all").glob("ema_epoch*.pt"))
    assert snaps == ["ema_epoch0001.pt", "ema_epoch0002.pt"]
    tq = cli.time_to_quality(cfg, n=6, steps=2, progress=False)
    h = pd.read_csv(gcfg.run_dir("all") / "history.csv")
    assert tq.epoch.tolist() == [1, 2]
    assert tq.images.tolist() == [gcfg.steps_per_epoch * gcfg.batch_size * e for e in (1, 2)]
    np.testing.assert_allclose(tq.minutes, h.seconds.cumsum() / 60)
    assert (tq.ffd_ratio > 0).all() and (tq.ffd_std > 0).all() and tq.kid.notna().all()
    assert set(tq.cpu) == {h.cpu.iloc[0]} and h.cpu.iloc[0] == dt.cpu_name()
    tq.to_csv(tmp_path / "recipe_generation.csv", index=False)
    assert "ttq_table" not in cli._report_fields(tmp_path, "another recipe")
    f = cli._report_fields(tmp_path, cli.recipe_of(gcfg))
    assert f["ttq_last_epoch"] == "2" and f["ttq_n"] == "6" and "min_snr_gamma=5" in f["ttq_recipe"]
    steps = 2 * gcfg.steps_per_epoch                 # where the configured EMA decay first acts
    assert f["ttq_steps"] == str(steps) and f["ema_last_decay"] == f"{(1 + steps) / (10 + steps):.5f}"
    binds = next(n for n in range(10**6) if (1 + n) / (10 + n) >= gcfg.ema_decay)
    assert f["ema_binds_step"] == f"{binds:,}"
    # another recipe's run folder (train --set … --out): scored under its snapshots' own config
    other = tmp_path / "minsnr"
    dt.train(dataclasses.replace(gcfg, min_snr_gamma=0.0, lr_decay="constant"), "all", out=other,
             progress=False)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        dl.load_model(gcfg, "all", other / "ema_epoch0002.pt")
    tr = cli.time_to_quality(cfg, n=6, steps=2, progress=False, run=other)
    assert tr.epoch.tolist() == [1, 2] and not np.allclose(tr.ffd, tq.ffd)
    figs = dl.get_config("smoke").fig_dir()
    (figs / "recipe_minsnr.csv").unlink(missing_ok=True)
    cli.main(["evaluate", "--profile", "smoke", "--what", "curve", "--run", str(other), "--n", "6"])
    assert pd.read_csv(figs / "recipe_minsnr.csv").epoch.tolist() == [1, 2]
    (figs / "generation_time_to_quality.png").unlink(missing_ok=True)
    cli.main(["report", "--profile", "smoke"])                # draws every recipe's curve
    assert (figs / "generation_time_to_quality.png").exists()


def test_cli_evaluate_guidance_writes_tables_and_figures(capsys):
    """`evaluate --what guidance --n N` writes what notebook 05 writes (save_guidance, the one
    writer): the table by w, the table by class and w, the plot against w and the grid at the
    chosen w (the smoke profile's figures stay in runs/smoke)."""
    figs = dl.get_config("smoke").fig_dir()
    names = ("guidance.csv", "guidance_by_class.csv", "05_guidance.png", "05_guidance_grid.png")
    for name in names:
        (figs / name).unlink(missing_ok=True)
    cli.main(["evaluate", "--profile", "smoke", "--what", "guidance", "--n", "2"])
    assert all((figs / name).exists() for name in names)
    df = pd.read_csv(figs / "guidance.csv")
    assert (df.n_per_class == 2).all() and sorted(df.w.dropna()) == list(dl.GUIDANCE_W)
    assert f"(w = {dl.pick_w(df):g})" in capsys.readouterr().out
