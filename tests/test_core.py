"""Tests of ddpm_lib's core: the noise schedule and forward process, the report's Eq. 5 scaler,
the U-Net, training (overfitting, early stopping, EMA, checkpoints, resume after SIGKILL,
refusals), the profiles and the command line's errors.

Everything runs on the CPU, on one thread, with tiny models (the smoke profile: width 8, 16×16
synthetic fruit in runs/smoke/data, made by conftest through the `data` command). Training output
goes to pytest's tmp_path, never to runs/. Reference values are computed independently here
(float64 numpy), never copied from a run.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import ddpm_lib as dl
import ddpm_cli
import ddpm_train as dt

REPO = Path(__file__).resolve().parents[1]
T = 1000


def np_linear_alpha_bar(T: int = T, b1: float = 1e-3, bT: float = 0.02):
    """(β, ᾱ, ᾱ_prev) of the linear schedule in float64 numpy, t = 1..T at index t-1."""
    b = np.linspace(b1, bT, T)
    ab = np.cumprod(1.0 - b)
    return b, ab, np.concatenate([[1.0], ab[:-1]])


def smoke_cfg(**kw) -> dl.Config:
    return dl.get_config("smoke", **kw)


@pytest.fixture(scope="module", autouse=True)
def smoke_data():
    """The smoke profile's synthetic set exists before any training (and any subprocess) runs."""
    index = dl.load_index(smoke_cfg())
    assert len(index) > 0
    return index


def cli_env() -> dict:
    env = dict(os.environ, DDPM_PROFILE="smoke", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return env


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "ddpm_cli", *args]


# -----------------------------------------------------------------------------------------------
# 1. schedule and forward process


def test_linear_betas_exactly_T_values():
    b = dl.make_betas(T, "linear", 1e-3, 0.02)
    assert b.dtype == torch.float64 and b.shape == (T,)
    assert b[0].item() == pytest.approx(0.001, abs=1e-15)
    assert b[-1].item() == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(b.numpy(), np.linspace(0.001, 0.02, T), rtol=0, atol=1e-15)
    assert (b.diff() > 0).all()
    # the report's torch.arange could give T+1 values: other T too
    for n in (50, 999, 1001):
        assert len(dl.make_betas(n)) == n


def test_alpha_bar_is_cumulative_product():
    fp = dl.Diffusion(T)
    b, ab, ab_prev = np_linear_alpha_bar()
    np.testing.assert_allclose(fp.betas.double().numpy(), b, rtol=1e-6)
    np.testing.assert_allclose(fp.alphas.double().numpy(), 1 - b, rtol=1e-6)
    np.testing.assert_allclose(fp.alpha_bar.double().numpy(), ab, rtol=1e-5)
    np.testing.assert_allclose(fp.alpha_bar_prev.double().numpy(), ab_prev, rtol=1e-5)
    # and the buffer itself is the running product of its alphas
    np.testing.assert_allclose(fp.alpha_bar.double().numpy(),
                               np.cumprod(fp.alphas.double().numpy()), rtol=1e-5)


def test_cosine_schedule():
    b = dl.make_betas(T, "cosine")
    assert b.shape == (T,)
    assert ((b > 0) & (b < 1)).all()
    fp = dl.Diffusion(T, "cosine")
    ab = fp.alpha_bar
    assert ((ab > 0) & (ab < 1)).all()
    assert (ab.diff() < 0).all(), "ᾱ_t must decrease"
    # IDDPM Eq. 17: ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1+s)·π/2) (up to the 0.999 clamp)
    s, t = 0.008, np.arange(T + 1)
    f = np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
    np.testing.assert_allclose(ab[:900].double().numpy(), (f[1:] / f[0])[:900], rtol=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        dl.make_betas(10, "quadratic")


def test_schedule_tensors_are_buffers_and_follow_to():
    fp = dl.Diffusion(50)
    names = {"betas", "alphas", "alpha_bar", "alpha_bar_prev", "beta_tilde", "post_c0", "post_ct"}
    assert names <= dict(fp.named_buffers()).keys()
    assert list(fp.parameters()) == []
    fp64 = fp.to(torch.float64)
    assert all(getattr(fp64, n).dtype == torch.float64 for n in names)
    meta = dl.Diffusion(50).to("meta")          # a device move, without needing a GPU
    assert all(getattr(meta, n).device.type == "meta" for n in names)


def test_one_based_t_convention():
    fp = dl.Diffusion(T)
    b, ab, _ = np_linear_alpha_bar()
    t = torch.tensor([1, 2, T])
    assert fp.at(fp.betas, t).shape == (3, 1, 1, 1)
    np.testing.assert_allclose(fp.at(fp.betas, t).flatten().double().numpy(),
                               [b[0], b[1], b[T - 1]], rtol=1e-6)
    assert fp.at(fp.betas, torch.tensor([1])).item() == pytest.approx(0.001, rel=1e-6)
    assert fp.at(fp.alpha_bar_prev, torch.tensor([1])).item() == 1.0        # ᾱ_0 = 1
    assert fp.at(fp.beta_tilde, torch.tensor([1])).item() == 0.0            # β̃_1 = 0
    # q_sample at t = 1 is one step of noise: sqrt(1-β_1)·x0 + sqrt(β_1)·ε
    x0, eps = torch.full((1, 3, 2, 2), 0.5), torch.ones(1, 3, 2, 2)
    xt = fp.q_sample(x0, torch.tensor([1]), eps)
    torch.testing.assert_close(xt, torch.full_like(x0, 0.5 * math.sqrt(1 - b[0]) + math.sqrt(b[0])))
    ts = fp.sample_t(20000, torch.Generator().manual_seed(0))
    assert ts.min().item() == 1 and ts.max().item() == T


# -----------------------------------------------------------------------------------------------
# 2. q_sample / forward / predict_x0 / q_posterior


def test_forward_eps_target_is_unscaled_standard_normal():
    fp = dl.Diffusion(T)
    torch.manual_seed(0)
    x0 = torch.rand(256, 3, 8, 8) * 2 - 1
    t = fp.sample_t(256, torch.Generator().manual_seed(1))
    xt, target = fp(x0, t)
    assert xt.shape == target.shape == x0.shape
    # 49 152 values: the standard error of the mean is 0.0045, of the std ≈ 0.0032
    assert abs(target.mean().item()) < 0.02
    assert abs(target.std().item() - 1) < 0.02
    ab = fp.alpha_bar[t - 1].view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * target, rtol=0, atol=1e-6)


def test_q_sample_is_eq4_exactly():
    fp = dl.Diffusion(T)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1, torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([1, 10, 300, 999, 1000])
    _, ab, _ = np_linear_alpha_bar()
    a = ab[t.numpy() - 1].reshape(-1, 1, 1, 1)
    want = np.sqrt(a) * x0.double().numpy() + np.sqrt(1 - a) * eps.double().numpy()
    np.testing.assert_allclose(fp.q_sample(x0, t, eps).double().numpy(), want, atol=2e-6)
    xt, target = fp(x0, t, eps)
    assert torch.equal(target, eps)
    assert torch.equal(xt, fp.q_sample(x0, t, eps))


def test_scaled_eps_target_is_report_faithful():
    fp = dl.Diffusion(T, target="scaled_eps")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([1, 50, 500, 1000])
    xt, target = fp(x0, t, eps)
    _, ab, _ = np_linear_alpha_bar()
    a = ab[t.numpy() - 1].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(target.double().numpy(), np.sqrt(1 - a) * eps.double().numpy(),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(xt, dl.Diffusion(T).q_sample(x0, t, eps))   # same x_t
    torch.testing.assert_close(fp.eps_from_output(xt, t, target), eps, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="target"):
        dl.Diffusion(10, target="x0")


def test_preconditioned_target_has_unit_variance_and_inverts():
    """sigma_data: F's target (ε − c_skip·x_t)/c_out has unit variance at every t when x0 ~
    N(0, σ_d²) (EDM's loss weighting), eps_from_output turns it back into ε, and x_t is the
    plain q_sample. The report-faithful target cannot be preconditioned."""
    sd = 0.7
    fp = dl.Diffusion(T, sigma_data=sd)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 128, 128, generator=g) * sd, torch.randn(3, 1, 128, 128, generator=g)
    t = torch.tensor([1, 300, 1000])
    xt, target = fp(x0, t, eps)
    torch.testing.assert_close(xt, fp.q_sample(x0, t, eps))
    np.testing.assert_allclose(target.var(dim=(1, 2, 3)).numpy(), 1.0, atol=0.05)
    torch.testing.assert_close(fp.eps_from_output(xt, t, target), eps, rtol=0, atol=1e-5)
    _, ab, _ = np_linear_alpha_bar()
    v = ab * sd ** 2 + 1 - ab                                 # float64, no library code
    np.testing.assert_allclose(fp.c_skip.numpy(), np.sqrt(1 - ab) / v, rtol=1e-5)
    np.testing.assert_allclose(fp.c_out.numpy(), np.sqrt(ab) * sd / np.sqrt(v), rtol=1e-4)
    assert fp.c_skip[-1] > 0.99 and fp.c_out[-1] < 0.01 and fp.c_out[0] > 0.99   # ε̂ ≈ x_t at T
    for bad in (dict(target="scaled_eps", sigma_data=sd), dict(sigma_data=-0.5)):
        with pytest.raises(ValueError, match="sigma_data"):
            dl.Diffusion(10, **bad)


def test_preconditioned_run_trains_and_is_kept_apart(tmp_path, monkeypatch):
    """A run with sigma_data trains (finite losses); its checkpoint is refused under a plain
    config or another sigma_data; the generation model is preconditioned (GENERATION), so a
    plain run where it lives is refused instead of being misread."""
    h = dt.train(smoke_cfg(sigma_data=0.7, max_epochs=1), 0, out=tmp_path / "pre",
                 progress=False)
    assert np.isfinite(h.train_loss).all() and np.isfinite(h.val_loss).all()
    pre = tmp_path / "pre" / "best.pt"
    for other in (0.0, 0.5):
        with pytest.raises(ValueError, match="sigma_data"):
            dl.load_model(smoke_cfg(sigma_data=other), path=pre)
    assert dl.get_config("smoke", generation=True).sigma_data == 0.7
    data = str(REPO / "runs" / "smoke" / "data")
    dt.train(smoke_cfg(root=str(tmp_path), data_dir=data, max_epochs=1), "all", progress=False)   # plain, same folder
    with pytest.raises(ValueError, match="sigma_data"):
        dl.generation_model(smoke_cfg(root=str(tmp_path), data_dir=data))


@pytest.mark.parametrize("sd", [0.0, 0.7])
def test_min_snr_weighting_is_min_snr_times_the_x0_error(sd):
    """min_snr_gamma [MinSNR]: for any network output, the loss is the mean over images of
    min(SNR_t, γ)·‖x̂0 − x0‖²/d, with x̂0 computed here in float64 from the output (ε, or EDM's
    F through c_skip and c_out), with or without preconditioning; γ = 0 leaves the plain MSE."""
    gamma, g = 5.0, torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    eps, out = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([1, 20, 100, 300, 700, 1000])
    fp = dl.Diffusion(T, sigma_data=sd, min_snr_gamma=gamma)
    loss = dl.diffusion_loss(lambda xt, tt: out, fp, x0, t, eps)
    _, ab, _ = np_linear_alpha_bar()
    a = ab[t.numpy() - 1][:, None, None, None]
    X0, E, O = (v.double().numpy() for v in (x0, eps, out))
    xt = np.sqrt(a) * X0 + np.sqrt(1 - a) * E
    v = a * sd ** 2 + 1 - a
    eps_hat = np.sqrt(1 - a) / v * xt + np.sqrt(a) * sd / np.sqrt(v) * O if sd else O
    x0_hat = (xt - np.sqrt(1 - a) * eps_hat) / np.sqrt(a)
    snr = (a / (1 - a)).ravel()
    want = np.mean(np.minimum(snr, gamma) * ((x0_hat - X0) ** 2).mean(axis=(1, 2, 3)))
    assert loss.item() == pytest.approx(want, rel=1e-4)
    plain = dl.Diffusion(T, sigma_data=sd)
    xt_, target = plain(x0, t, eps)
    assert dl.diffusion_loss(lambda xt, tt: out, plain, x0, t, eps).item() == pytest.approx(
        ((out - target) ** 2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        dl.Diffusion(10, target="scaled_eps", min_snr_gamma=5)


@pytest.mark.parametrize("gamma", [5.0, 0.0])
def test_validation_loss_is_the_training_loss_on_one_batch(gamma):
    """validation_loss scores the loss training optimises: on one batch, with its own seeded
    t and ε, it equals diffusion_loss (min-SNR weights included) — and under min-SNR it is
    not the plain MSE, so leaving the weights out fails here."""
    cfg = dl.get_config("smoke", generation=True, min_snr_gamma=gamma)
    fp = dl.Diffusion.from_config(cfg)
    torch.manual_seed(0)
    model = dl.build_model(cfg, verbose=False).eval()
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    val = dt.validation_loss(model, fp, images, cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(cfg.seed + 7919)          # validation_loss's draws
    t, eps = fp.sample_t(8, g), torch.randn(8, 3, 16, 16, generator=g)
    with torch.no_grad():
        train = dl.diffusion_loss(model, fp, dl.to_float(images), t, eps).item()
        xt, target = fp(dl.to_float(images), t, eps)
        plain = torch.nn.functional.mse_loss(model(xt, t).float(), target).item()
    assert val == pytest.approx(train, rel=1e-5)
    assert (val != pytest.approx(plain, rel=1e-2)) if gamma else val == pytest.approx(plain)


def test_learning_rate_warms_up_then_decays_and_training_follows_it(tmp_path):
    """learning_rate: linear warm-up to lr, then constant or half a cosine to 0 at max_epochs;
    a smoke run's history records, each epoch, the rate of its last step (computed here)."""
    c = smoke_cfg(lr=1e-3, lr_warmup=4, lr_decay="cosine", max_epochs=2)     # 3 steps an epoch
    assert [dl.learning_rate(c, s, 3) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert dl.learning_rate(c, 5, 3) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert dl.learning_rate(dataclasses.replace(c, lr_decay="constant"), 5, 3) == 1e-3
    with pytest.raises(ValueError, match="lr_decay"):
        dl.learning_rate(dataclasses.replace(c, lr_decay="linear"), 5, 3)
    c = smoke_cfg(lr=1e-3, lr_warmup=2, lr_decay="cosine", max_epochs=2)
    h = dt.train(c, 0, out=tmp_path / "run", progress=False)
    assert h.lr.tolist() == pytest.approx([1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4))])


def test_train_set_takes_any_setting_by_its_type_and_needs_out(capsys):
    """`train --set KEY=VALUE`: parsed as the Config field's type; an unknown key or a value of
    the wrong type is a usage error naming it; a changed recipe needs its own --out."""
    assert ddpm_cli._setting("min_snr_gamma=5") == ("min_snr_gamma", 5.0)
    assert ddpm_cli._setting("lr_warmup=250") == ("lr_warmup", 250)
    assert ddpm_cli._setting("flip=false") == ("flip", False)
    assert ddpm_cli._setting("bf16=true") == ("bf16", True)
    for bad, said in (("min_snr=5", "Config setting"), ("lr_warmup=2.5", "takes a whole number"),
                      ("profile=cpu", "Config setting"), ("lr", "KEY=VALUE")):
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            ddpm_cli._setting(bad)
    with pytest.raises(SystemExit) as e:
        ddpm_cli.main(["train", "--profile", "smoke", "--fold", "all", "--set", "lr=1e-3"])
    assert "--out" in str(e.value.code)


def test_predict_x0_inverts_q_sample():
    fp = dl.Diffusion(T)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1, torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([1, 2, 100, 500, 900, 1000])
    rec = fp.predict_x0(fp.q_sample(x0, t, eps), t, eps)
    # 1/sqrt(ᾱ_1000) ≈ 156 amplifies float32 rounding at large t
    torch.testing.assert_close(rec, x0, rtol=0, atol=2e-4)
    torch.testing.assert_close(rec[:4], x0[:4], rtol=0, atol=1e-5)


def test_q_posterior_matches_closed_form():
    """Ho et al. Eqs. 6-7, in float64:
    μ̃ = sqrt(ᾱ_{t-1})β_t/(1-ᾱ_t)·x0 + sqrt(α_t)(1-ᾱ_{t-1})/(1-ᾱ_t)·x_t,
    β̃ = (1-ᾱ_{t-1})/(1-ᾱ_t)·β_t."""
    fp = dl.Diffusion(T)
    b, ab, abp = np_linear_alpha_bar()
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1, torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([1, 2, 10, 500, 999, 1000])
    mean, var = fp.q_posterior(x0, xt, t)
    i = t.numpy() - 1
    r = lambda v: v[i].reshape(-1, 1, 1, 1)
    want_mean = (np.sqrt(r(abp)) * r(b) / (1 - r(ab)) * x0.double().numpy()
                 + np.sqrt(1 - r(b)) * (1 - r(abp)) / (1 - r(ab)) * xt.double().numpy())
    want_var = (1 - r(abp)) / (1 - r(ab)) * r(b)
    np.testing.assert_allclose(mean.double().numpy(), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var.double().numpy(), np.broadcast_to(want_var, var.shape),
                               rtol=1e-5, atol=1e-12)


def test_report_scaler_is_eq5_with_per_step_alpha():
    """Eq. 5 with the per-step α_t = 1 − β_t of the linear schedule ("the 1/√α of the original
    literature", [DDPM] Algorithm 2), in float64: 1.31 at t = 200 and 5.2 at t = 500, near the
    exact correction 1/sqrt(ᾱ_t) there (1.34, 4.2)."""
    b, ab, _ = np_linear_alpha_bar()
    t = np.array([1, 50, 100, 200, 250, 500, 750, 1000])
    want = (1 / np.sqrt(1 - b[t - 1]) - 1) * 8 * (t / 50) ** 2 + 1
    got = dl.report_scaler(torch.tensor(t)).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert got[0] == pytest.approx(1.0, abs=1e-5)     # t = 1: almost no scaling
    assert got[3] == pytest.approx(1.31, abs=0.005) and got[5] == pytest.approx(5.2, abs=0.05)
    assert 1 / np.sqrt(ab[199]) == pytest.approx(1.34, abs=0.005)
    # 'alpha': 1/√α_t alone, the decoding the report started from
    np.testing.assert_allclose(dl.report_scaler(torch.tensor(t), "alpha").numpy(),
                               1 / np.sqrt(1 - b[t - 1]), rtol=1e-9)


@pytest.mark.parametrize("t_val", [50, 500, 1000])
def test_alpha_decoding_of_an_exact_scaled_network_darkens_x0(t_val):
    """1/√α_t·(x_t − out) with out exactly the report's target √(1−ᾱ_t)·ε is √ᾱ_t/√α_t·x0 (before
    the mapping to [0, 1]): the image fades as t grows, which Eq. 5 was invented to undo."""
    x0, t, xt, eps, fp, _ = _ideal_x0(t_val)
    out = (1 - fp.at(fp.alpha_bar, t)).sqrt() * eps
    s = dl.report_scaler(t, "alpha").float().view(-1, 1, 1, 1)
    k = fp.at(fp.alpha_bar, t).sqrt() / fp.at(fp.alphas, t).sqrt()
    torch.testing.assert_close(s * (xt - out), k * x0, rtol=0, atol=1e-5)
    rec = dl.reconstruct(lambda x, tt: out, fp, xt, t, "alpha")
    torch.testing.assert_close(rec, dl.to_unit(k * x0), rtol=0, atol=1e-5)


def _ideal_x0(t_val: int):
    """(x0, x_t, ε, scaled-ε process, ε process) on the smoke profile's synthetic test images,
    x_t made with known seeded ε at one t."""
    cfg = smoke_cfg()
    x0 = dl.to_float(dl.eval_images(cfg))
    fp_rep = dl.Diffusion.from_config(dataclasses.replace(cfg, target="scaled_eps"))
    fp_eps = dl.Diffusion.from_config(cfg)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((len(x0),), t_val, dtype=torch.long)
    return x0, t, fp_rep.q_sample(x0, t, eps), eps, fp_rep, fp_eps


@pytest.mark.parametrize("t_val,want", [(50, 0.9995), (200, 0.9997), (500, 0.9728), (800, 0.8433)])
def test_report_x0_literal_reading_with_ideal_network(t_val, want):
    """The report's decoding, scaler·(x_t − output), for a network whose output is exactly its
    target sqrt(1−ᾱ_t)·ε: x_t − output = sqrt(ᾱ_t)·x0, and Eq. 5's scaler stands in for
    1/sqrt(ᾱ_t). The mean SSIM is pinned to the measured value, so a change to the decoding
    shows; the output is the [-1, 1] → [0, 1] mapping of the scaled image, clipped."""
    x0, t, xt, eps, fp, _ = _ideal_x0(t_val)
    ideal = (1 - fp.at(fp.alpha_bar, t)).sqrt() * eps
    rec = dl.report_x0(xt, t, ideal)
    s = dl.report_scaler(t).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(rec, dl.to_unit(s * fp.at(fp.alpha_bar, t).sqrt() * x0),
                               rtol=0, atol=1e-5)
    assert rec.min() >= 0 and rec.max() <= 1
    assert dl.ssim(rec, dl.to_unit(x0)).mean().item() == pytest.approx(want, abs=0.01)


@pytest.mark.parametrize("t_val", [50, 200, 500, 800])
def test_corrected_decoding_with_ideal_network_is_exact(t_val):
    """The corrected path with an ideal ε-network (output exactly ε) recovers x0: SSIM ≈ 1."""
    x0, t, xt, eps, _, fp = _ideal_x0(t_val)
    rec = dl.to_unit(fp.predict_x0(xt, t, fp.eps_from_output(xt, t, eps)))
    assert dl.ssim(rec, dl.to_unit(x0)).mean().item() == pytest.approx(1.0, abs=1e-3)


# -----------------------------------------------------------------------------------------------
# 3. the U-Net


@pytest.mark.parametrize("size,width", [(100, 8), (32, 32), (16, 8)])
def test_unet_output_shape(size, width):
    torch.manual_seed(0)
    model = dl.UNet(width, 32, 2).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y = model(x, torch.tensor([1, 1000]))
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_build_model_prints_parameter_count(capsys):
    cfg = dl.get_config("cpu", width=32, channels_last=False)
    model = dl.build_model(cfg, torch.device("cpu"))
    out = capsys.readouterr().out
    m = re.search(r"UNet\(width=32\): ([\d,]+) parameters", out)
    assert m, out
    printed = int(m.group(1).replace(",", ""))
    assert printed == sum(p.numel() for p in model.parameters()) == dl.n_params(model)
    assert printed > 100_000
    dl.build_model(cfg, torch.device("cpu"), verbose=False)
    assert capsys.readouterr().out == ""


# -----------------------------------------------------------------------------------------------
# 4. training pieces


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = dl.UNet(8, 32, 2)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    fp = dl.Diffusion(T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    t, eps = torch.tensor([10, 100, 400, 800]), torch.randn(x0.shape, generator=g)
    losses = []
    for _ in range(150):
        loss = dl.diffusion_loss(model, fp, x0, t, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.5                            # ≈ Var(ε) = 1 at the start
    assert np.mean(losses[-10:]) < losses[0] / 10, (losses[0], losses[-10:])


def test_early_stopping_script():
    es = dt.EarlyStopping(patience=2)
    assert es.step(1.0) is True and not es.stop
    assert es.step(0.8) is True and es.best == 0.8 and es.bad_epochs == 0
    assert es.step(0.9) is False and es.bad_epochs == 1 and not es.stop
    assert es.step(0.8) is False and es.bad_epochs == 2 and es.stop    # equal is no decrease
    es = dt.EarlyStopping(patience=3)
    for v in (1.0, 1.1, 1.2):
        es.step(v)
    assert es.bad_epochs == 2 and not es.stop
    assert es.step(0.5) is True and es.bad_epochs == 0 and es.best == 0.5   # improvement resets
    for v in (0.6, 0.7, 0.5):
        es.step(v)
    assert es.stop and es.best == 0.5


def test_training_stops_early(tmp_path, monkeypatch):
    """train() stops after `patience` epochs without a new best, and best.pt holds the best."""
    vals = iter([1.0, 0.5, 0.6, 0.7, 0.4, 0.3])
    calls = []        # every epoch: the validation loss, then the Test/ loss (not for stopping)
    monkeypatch.setattr(dt, "validation_loss",
                        lambda *a, **k: calls.append(1) or (next(vals) if len(calls) % 2 else 9.0))
    h = dt.train(smoke_cfg(max_epochs=6, patience=2), 0, out=tmp_path / "run", progress=False)
    assert list(h.epoch) == [1, 2, 3, 4]
    assert list(h.best) == [True, True, False, False]
    assert list(h.val_loss) == [1.0, 0.5, 0.6, 0.7] and set(h.test_loss) == {9.0}
    assert dl.load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 2


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_ema_warmup_decay_and_buffers():
    model = _bn_model()
    ema = dl.EMA(model, decay=0.9)
    assert ema.model is not model and ema.n == 0
    assert not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
    start = [p.detach().clone() for p in ema.model.parameters()]
    for n in range(1, 41):
        old = [p.clone() for p in ema.model.parameters()]
        with torch.no_grad():                       # the "training" step: move every weight
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.copy_(torch.randn(4) * 10)
            model[1].num_batches_tracked += 7
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))            # warm-up, then the decay
        for e, o, p in zip(ema.model.parameters(), old, model.parameters()):
            torch.testing.assert_close(e, d * o + (1 - d) * p, rtol=1e-5, atol=1e-6)
        # buffers are copied from the model, not averaged
        assert torch.equal(ema.model[1].running_mean, model[1].running_mean)
        assert torch.equal(ema.model[1].num_batches_tracked, model[1].num_batches_tracked)
    assert ema.n == 40
    # the EMA lags the model: it is neither the start nor the current weights
    w_ema, w_model = ema.model[0].weight, model[0].weight
    assert not torch.allclose(w_ema, w_model) and not torch.allclose(w_ema, start[0])
    # state_dict round trip keeps weights and the step count (so warm-up resumes right)
    other = dl.EMA(_bn_model(), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.n == 40
    for a, b in zip(other.model.state_dict().values(), ema.model.state_dict().values()):
        assert torch.equal(a, b)


# -----------------------------------------------------------------------------------------------
# 5. checkpoints: resume after SIGKILL, refusals, NaN


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_after_sigkill_is_bitwise_equal(tmp_path):
    """Kill a CLI training run (SIGKILL) right after its first checkpoint, resume it to the end:
    every weight, EMA weight and optimizer moment equals an unbroken run's, bit for bit."""
    n_epochs = 8
    args = ["train", "--profile", "smoke", "--fold", "0", "--max-epochs", str(n_epochs),
            "--patience", "1000"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    kw = dict(cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    p_full = subprocess.Popen(cli(*args, "--out", str(full)), **kw)      # runs alongside
    p_broken = subprocess.Popen(cli(*args, "--out", str(broken)), **kw)
    p_resume = None
    try:
        deadline = time.monotonic() + 120
        while not (broken / "checkpoint.pt").exists():
            assert p_broken.poll() is None, p_broken.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.005)
        p_broken.send_signal(signal.SIGKILL)
        p_broken.wait(30)
        assert p_broken.returncode == -signal.SIGKILL
        killed_at = _ckpt(broken / "checkpoint.pt")["epoch"]
        assert 1 <= killed_at < n_epochs, "the kill came too late to test a resume"
        p_resume = subprocess.Popen(cli(*args, "--out", str(broken), "--resume"), **kw)
        for p in (p_full, p_resume):
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()[-2000:]
    finally:
        for p in (p_full, p_broken, p_resume):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    a, b = _ckpt(full / "checkpoint.pt"), _ckpt(broken / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == n_epochs
    _assert_same_state(a["model"], b["model"])
    _assert_same_state(a["ema"]["model"], b["ema"]["model"])
    assert a["ema"]["n"] == b["ema"]["n"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    _assert_same_state(_ckpt(full / "best.pt")["ema"], _ckpt(broken / "best.pt")["ema"])
    cols = ["epoch", "train_loss", "val_loss", "best"]
    ha, hb = pd.read_csv(full / "history.csv"), pd.read_csv(broken / "history.csv")
    pd.testing.assert_frame_equal(ha[cols], hb[cols])
    assert len(hb) == n_epochs


def test_resume_with_other_config_is_refused(tmp_path):
    out = tmp_path / "run"
    dt.train(smoke_cfg(max_epochs=1), 0, out=out, progress=False)
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"\bema_decay\b"):      # lr may change (issue 45)
        dt.train(smoke_cfg(max_epochs=2, ema_decay=0.99), 0, out=out, resume=True, progress=False)
    with pytest.raises(ValueError, match="width"):
        dt.train(smoke_cfg(max_epochs=2, width=16), 0, out=out, resume=True, progress=False)
    assert (out / "checkpoint.pt").read_bytes() == before
    # the resumable keys may differ: a longer run continues the same one
    h = dt.train(smoke_cfg(max_epochs=2, patience=9), 0, out=out, resume=True, progress=False)
    assert list(h.epoch) == [1, 2]


def test_a_setting_newer_than_the_checkpoint_counts_as_its_default(tmp_path):
    """check_config reads a setting the checkpoint predates as made with its default (the
    committed fold runs predate sigma_data, n_classes and snapshot_every)."""
    src = tmp_path / "src"
    dt.train(smoke_cfg(max_epochs=1), 0, out=src, progress=False)
    new = ("sigma_data", "n_classes", "p_uncond", "snapshot_every")
    old = {k: v for k, v in dl.load_checkpoint(src / "best.pt")["config"].items() if k not in new}
    dl.check_config(old, smoke_cfg(), src)
    for k, v in dict(sigma_data=0.7, n_classes=3).items():
        with pytest.raises(ValueError, match=k):
            dl.check_config(old, smoke_cfg(**{k: v}), src)


def test_generation_model_committed_prefers_the_export(tmp_path, monkeypatch):
    """generation_model: the local run first; committed=True: the committed export first."""
    cfg = smoke_cfg()
    local = dl.generation_model(cfg)                    # conftest.smoke_models trained it
    gcfg = dl.get_config("smoke", generation=True)
    dt.train(gcfg, 0, out=tmp_path / "other", progress=False)   # same config, other weights
    monkeypatch.setattr(dl, "committed_dir", lambda c, fold: tmp_path / "other")
    (tmp_path / "other" / "best.pt").rename(tmp_path / "other" / "ema_fp16.pt")
    export = dl.load_model(gcfg, "all", tmp_path / "other" / "ema_fp16.pt")
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                               b.state_dict().values()))
    assert same(dl.generation_model(cfg), local) and not same(local, export)
    assert same(dl.generation_model(cfg, committed=True), export)


def test_existing_run_without_resume_is_refused(tmp_path):
    out = tmp_path / "run"
    dt.train(smoke_cfg(max_epochs=1), 0, out=out, progress=False)
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match="resume"):
        dt.train(smoke_cfg(max_epochs=1), 0, out=out, progress=False)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_history_csv_columns(tmp_path):
    out = tmp_path / "run"
    h = dt.train(smoke_cfg(max_epochs=2, patience=5), 0, out=out, progress=False)
    csv = pd.read_csv(out / "history.csv")
    assert list(csv.columns[:6]) == ["epoch", "train_loss", "val_loss", "test_loss", "seconds", "lr"]
    assert list(csv.epoch) == [1, 2]
    assert (csv.lr == smoke_cfg().lr).all()
    assert np.isfinite(csv[["train_loss", "val_loss", "seconds"]].to_numpy()).all()
    pd.testing.assert_frame_equal(csv, h, check_dtype=False)
    ck = _ckpt(out / "checkpoint.pt")
    assert ck["epoch"] == 2 and ck["config"] == dataclasses.asdict(smoke_cfg(max_epochs=2,
                                                                             patience=5))


def test_nan_loss_raises_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = smoke_cfg(max_epochs=3, patience=5)
    real_loss, calls, saved = dl.diffusion_loss, [0], {}

    def loss_nan_in_epoch_2(*a, **k):
        calls[0] += 1
        if calls[0] <= cfg.steps_per_epoch:
            return real_loss(*a, **k)
        saved.setdefault("bytes", (out / "checkpoint.pt").read_bytes())   # epoch 1's file
        return real_loss(*a, **k) * float("nan")

    monkeypatch.setattr(dl, "diffusion_loss", loss_nan_in_epoch_2)   # in dl.train_step
    with pytest.raises(FloatingPointError, match="epoch 2") as e:
        dt.train(cfg, 0, out=out, progress=False)
    assert "resume" in str(e.value)
    assert calls[0] == cfg.steps_per_epoch + 1        # stopped at the first bad step
    assert (out / "checkpoint.pt").read_bytes() == saved["bytes"]
    ck = _ckpt(out / "checkpoint.pt")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert len(pd.read_csv(out / "history.csv")) == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# -----------------------------------------------------------------------------------------------
# 6. profiles and the command line


def test_profiles(monkeypatch):
    smoke, cpu, full = (dl.get_config(p) for p in ("smoke", "cpu", "full"))
    assert (smoke.profile, cpu.profile, full.profile) == ("smoke", "cpu", "full")
    assert cpu.image_size == 32 and full.image_size == 100 and smoke.image_size == 16
    assert full.width == cpu.width == 32 and full.T == 1000
    assert dl.get_config("cpu", lr=1e-3).lr == 1e-3
    gen = dl.get_config("cpu", generation=True)
    assert gen.max_epochs == dl.GENERATION["cpu"]["max_epochs"] != cpu.max_epochs
    monkeypatch.setenv("DDPM_PROFILE", "cpu")
    assert dl.get_config().profile == "cpu" and dl.default_profile() == "cpu"
    monkeypatch.setenv("DDPM_PROFILE", "smoke")
    assert dl.get_config().profile == "smoke"
    monkeypatch.delenv("DDPM_PROFILE")
    monkeypatch.setattr(dl.torch.cuda, "is_available", lambda: True)
    assert dl.default_profile() == "cpu"          # a GPU speeds a profile up, never picks one
    with pytest.raises(ValueError, match="nope"):
        dl.get_config("nope")
    monkeypatch.setenv("DDPM_PROFILE", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        dl.get_config()
    with pytest.raises(SystemExit) as e:           # the CLI turns it into an "error:" exit
        ddpm_cli.main(["train", "--fold", "0", "--out", "/nonexistent/never-written"])
    assert str(e.value.code).startswith("error:") and "bogus" in str(e.value.code)


def test_profiles_name_a_scale_and_the_generation_model_is_preconditioned():
    """Five profiles, each a scale; in the three with a generation model, it is the same network with EDM's
    preconditioning, and every other setting of the fold runs is the profile's own."""
    assert set(dl.PROFILES) == set(dl.EVAL) == set(ddpm_cli.PROFILE_HELP) \
        == {"smoke", "cpu", "full", "native", "smoke-native"}
    assert set(dl.GENERATION) == {"smoke", "cpu", "full"}      # the fine-tuned ones have none
    for p in dl.GENERATION:
        c, g = dl.get_config(p), dl.get_config(p, generation=True)
        assert c.sigma_data == 0 and g.sigma_data == 0.7
        assert (g.width, g.image_size, g.T, g.target) == (c.width, c.image_size, c.T, c.target)


def test_committed_generation_model_loads():
    """The committed generation models (unconditional and class-conditional): half-precision
    EMA weights, at most 10 MB, made with the profile's settings (another config is refused)."""
    cfg = dl.get_config("cpu", generation=True)
    cond = dataclasses.replace(dl.get_config("cpu", **dl.GENERATION_COND["cpu"]), n_classes=10)
    for c in (cfg, cond):
        path = dl.committed_dir(c, "all") / "ema_fp16.pt"
        assert path.stat().st_size <= 10e6
        ck = dl.load_checkpoint(path)
        assert {v.dtype for v in ck["ema"].values() if v.is_floating_point()} == {torch.float16}
    model = dl.load_model(cfg, "all", dl.committed_dir(cfg, "all") / "ema_fp16.pt")
    assert dl.n_params(model) == dl.n_params(dl.build_model(dl.get_config("cpu"), verbose=False))
    with pytest.raises(ValueError, match="another config"):
        dl.load_model(dl.get_config("cpu", generation=True, batch_size=99), "all",
                      dl.committed_dir(cfg, "all") / "ema_fp16.pt")
    with pytest.raises(ValueError, match="sigma_data"):       # not the report's U-Net's
        dl.load_model(dl.get_config("cpu"), "all", dl.committed_dir(cfg, "all") / "ema_fp16.pt")
    with pytest.raises(ValueError, match="n_classes"):        # nor the conditional one
        dl.load_model(cond, "all", dl.committed_dir(cfg, "all") / "ema_fp16.pt")
    assert dl.load_model(cond, "all", dl.committed_dir(cond, "all") / "ema_fp16.pt").n_classes == 10


def test_cli_train_all_writes_the_generation_summary(tmp_path, capsys):
    """`train --fold all` (the generation model) ends with its one-row summary in the figures;
    a run into another --out folder (a scratch run) leaves the figures alone."""
    path = smoke_cfg().fig_dir() / "generation_training.csv"
    path.unlink(missing_ok=True)
    ddpm_cli.main(["train", "--profile", "smoke", "--fold", "all", "--out", str(tmp_path / "run")])
    assert not path.exists()
    ddpm_cli.main(["train", "--profile", "smoke", "--fold", "all", "--resume"])
    assert str(path) in capsys.readouterr().out
    s = pd.read_csv(path)
    assert len(s) == 1 and s.epochs[0] == dl.GENERATION["smoke"]["max_epochs"]


def test_cli_second_train_into_same_run_is_an_error(tmp_path):
    out = tmp_path / "run"
    dt.train(smoke_cfg(max_epochs=1), 0, out=out, progress=False)     # the first run
    r = subprocess.run(cli("train", "--profile", "smoke", "--fold", "0", "--out", str(out)),
                       cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert any(line.startswith("error:") for line in r.stderr.splitlines()), r.stderr
    assert "--resume" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_timestep_out_of_range_raises():
    """t is 1-based: t = 0 or t > T must not wrap around to another step's ᾱ."""
    fp = dl.Diffusion(T=10)
    x = torch.zeros(1, 3, 4, 4)
    for bad in (0, 11):
        with pytest.raises(IndexError, match="from 1 to 10"):
            fp.q_sample(x, torch.tensor([bad]), x)


def test_cli_sample_passes_the_ddim_options(monkeypatch, capsys, tmp_path):
    """`sample` hands --steps, --eta and --no-clip to the DDIM sampler and saves a grid named by
    every setting in --out; --steps or --eta with another sampler is an error."""
    seen, ts = {}, []
    real = dl.SAMPLERS["ddim"]

    def spy(model, diff, x, t, t_prev, g, **kw):
        seen.update(kw)
        ts.append(t)
        return real(model, diff, x, t, t_prev, g, **kw)
    monkeypatch.setitem(dl.SAMPLERS, "ddim", spy)
    ddpm_cli.main(["sample", "--profile", "smoke", "--n", "4", "--steps", "3", "--eta", "0.5",
                   "--seed", "7", "--out", str(tmp_path)])
    assert (ts, seen["eta"], seen["clip"]) == ([1000, 500, 1], 0.5, True)
    out = tmp_path / "samples_smoke_ddim3_eta0.5_clip_n4_seed7.png"
    assert out.exists() and str(out.name) in capsys.readouterr().out
    ddpm_cli.main(["sample", "--profile", "smoke", "--n", "2", "--steps", "3", "--no-clip",
                   "--out", str(tmp_path)])
    assert seen["clip"] is False
    assert "samples_smoke_ddim3_eta0_noclip_n2_seed0.png" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="DDIM option"):
        ddpm_cli.main(["sample", "--profile", "smoke", "--method", "ddpm", "--steps", "3"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_training_and_the_command_line_keep_freed_memory_and_get_device_does_not(tmp_path):
    """get_device has no side effect; training and every command of the command line set glibc's
    malloc to keep freed memory (mallopt accepts every setting; the speed it buys is measured by
    tests/bench.py); the method (sampling, evaluation) leaves the allocator alone."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("no glibc (musl?)")
    dt.keep_freed_memory.cache_clear()
    assert dl.get_device().type in ("cpu", "cuda")
    dl.sample(dl.UNet(8, 32, 2), dl.Diffusion(5), "ddim", n=1, size=8, steps=2, progress=False)
    assert dt.keep_freed_memory.cache_info().currsize == 0
    dt.train(smoke_cfg(max_epochs=1), 0, out=tmp_path / "run", progress=False)
    assert dt.keep_freed_memory.cache_info().currsize == 1 and dt.keep_freed_memory() is True
    dt.keep_freed_memory.cache_clear()
    ddpm_cli.main(["data", "--synthetic", "--out", str(tmp_path / "data")])
    assert dt.keep_freed_memory.cache_info().currsize == 1


def test_committed_fold_run_is_used_without_a_local_run(tmp_path, monkeypatch):
    """export --fold k writes the EMA weights (fp16) and the history under data/checkpoints/runs/;
    with the local run gone, load_model and run_history use them."""
    cfg = smoke_cfg(root=str(tmp_path), data_dir=str(REPO / "runs" / "smoke" / "data"))
    dt.train(cfg, 0, progress=False)
    path = dt.export_ema(cfg, 0)
    assert path == tmp_path / "data/checkpoints/runs/smoke/eps-grouped/fold0/ema_fp16.pt"
    want = dl.load_model(cfg, 0)
    h = dl.run_history(cfg, 0)
    shutil.rmtree(cfg.run_dir(0))
    got = dl.load_model(cfg, 0)
    for k, v in got.state_dict().items():
        assert torch.equal(v, want.state_dict()[k].half().float())
    assert dl.run_history(cfg, 0).equals(h) and list(h.epoch) == [1, 2]
    shutil.rmtree(tmp_path / "data")
    assert dl.run_history(cfg, 0) is None
    with pytest.raises(FileNotFoundError, match="train it first"):
        dl.load_model(cfg, 0)


def test_committed_checkpoints_stay_small():
    files = [p for p in (REPO / "data" / "checkpoints").rglob("*.pt")]
    total = sum(p.stat().st_size for p in files) / 1e6
    print(f"{len(files)} committed checkpoints, {total:.1f} MB")
    assert files and total < 75 and all(p.stat().st_size < 10e6 for p in files)


def test_plot_leakage_draws_both_losses_and_their_ratio():
    h = pd.DataFrame(dict(epoch=[1, 2, 3], val_loss=[0.4, 0.2, 0.1], test_loss=[0.4, 0.3, 0.2]))
    axes = dl.plot_leakage({"grouped": h, "random": h.assign(test_loss=h.val_loss)})
    assert len(axes[0].lines) == 4
    assert np.allclose(axes[1].lines[0].get_ydata(), [1.0, 1.5, 2.0])      # grouped
    assert list(axes[1].lines[1].get_ydata()) == [1.0, 1.0, 1.0]          # random


def test_with_cuda_the_default_is_cpu_and_its_committed_models(monkeypatch):
    """A GPU never picks the profile: with CUDA mocked and no DDPM_PROFILE, the notebooks run
    the cpu profile, and describe_run (their setup cells) says every fold run loads its
    committed export (no local run here: runs/cpu does not exist in the checkout)."""
    monkeypatch.delenv("DDPM_PROFILE", raising=False)
    monkeypatch.setattr(dl.torch.cuda, "is_available", lambda: True)
    cfg = dl.get_config()
    assert cfg.profile == "cpu"
    if (cfg.home / "runs" / "cpu").exists():
        pytest.skip("a local runs/cpu/ exists: its weights would be preferred")
    runs = [(o, k) for o, k in dl.planned_runs("cpu") if not o.get("conditional")]
    text = dl.describe_run(cfg, 5, runs=runs)
    assert text.startswith("profile cpu (from the default), seed 5, device cuda")
    rows = text.splitlines()[1:]
    assert len(rows) == len(runs) and all(" committed: data/checkpoints/runs/cpu/" in r
                                          for r in rows), text
    for o, k in runs:
        c = dl.get_config("cpu", generation=k == "all", **o)
        assert dl.uses_committed(c, k) and dl.weights(c, k).name == "ema_fp16.pt"


def test_missing_data_and_classifier_name_the_command_that_makes_them(tmp_path, monkeypatch):
    """The library never calls the command line: missing data or a missing classifier is an
    error naming the command that makes it (no hidden `data` or `classifier` run)."""
    monkeypatch.setattr(ddpm_cli, "prepare_data", lambda *a, **k: pytest.fail("made data"))
    monkeypatch.setattr(ddpm_cli, "train_classifier", lambda *a, **k: pytest.fail("trained"))
    cfg = smoke_cfg(root=str(tmp_path))                   # runs/smoke/data under tmp_path: none
    with pytest.raises(dl.DataError, match=r"`python -m ddpm_cli data --synthetic "
                                           r"--synthetic-size 32 --out .*runs/smoke/data`"):
        dl.load_index(cfg)
    with pytest.raises(dl.DataError, match="--from ../shared/fruits-360-subset"):
        dl.load_index(dl.get_config("cpu", root=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="`python -m ddpm_cli classifier --profile smoke`"):
        dl.load_classifier(cfg)
    assert not (tmp_path / "runs").exists()


def test_trained_never_trains_and_train_all_trains_only_what_is_missing(tmp_path, monkeypatch,
                                                                        capsys):
    """trained() never trains: with a fold's weights committed and no local run it gives the
    committed history; with none it is an error naming the train command; retrain=True refuses
    the export. train-all (the command line) trains what is missing; --retrain trains it all."""
    cfg = smoke_cfg(root=str(tmp_path), data_dir=str(REPO / "runs" / "smoke" / "data"), max_epochs=1)
    dt.train(cfg, 0, progress=False)
    dt.export_ema(cfg, 0)
    h = dl.run_history(cfg, 0)
    shutil.rmtree(cfg.run_dir(0))
    calls = []
    monkeypatch.setattr(dt, "train", lambda c, k, **kw: calls.append(k) or h)
    assert dl.uses_committed(cfg, 0) and dl.trained(cfg, 0).equals(h) and calls == []
    with pytest.raises(FileNotFoundError, match=r"train it with `python -m ddpm_cli train "
                                                r"--profile smoke --fold 0` \(at most 1 epochs, "
                                                r"up to about \d+ min at the last run's speed"):
        dl.trained(cfg, 0, retrain=True)                  # how long: the committed history's
    assert not dl.uses_committed(cfg, 1)                     # nothing committed: an error
    with pytest.raises(FileNotFoundError, match="--fold 1`"):
        dl.trained(cfg, 1)
    assert calls == []
    (cfg.run_dir(1)).mkdir(parents=True)
    (cfg.run_dir(1) / "checkpoint.pt").touch()             # a stopped run: resume it
    with pytest.raises(FileNotFoundError, match="--fold 1 --resume`"):
        dl.trained(cfg, 1)
    shutil.rmtree(cfg.run_dir(1))
    monkeypatch.setattr(ddpm_cli, "get_config", lambda *a, **kw: dataclasses.replace(cfg, **{
        k: v for k, v in kw.items() if k != "generation"}))
    monkeypatch.setattr(ddpm_cli, "planned_runs", lambda profile=None: [({}, 0), ({}, 1)])
    ddpm_cli.main(["train-all", "--profile", "smoke"])
    assert "committed" in capsys.readouterr().out and calls == [1]
    ddpm_cli.main(["train-all", "--profile", "smoke", "--retrain"])
    assert calls == [1, 0, 1]


def test_leakage_table_and_training_summary_keep_what_has_no_history(tmp_path, monkeypatch):
    h = pd.DataFrame(dict(epoch=[1, 2, 3], train_loss=[0.5, 0.3, 0.2], val_loss=[0.4, 0.1, 0.2],
                          test_loss=[0.4, 0.3, 0.3], seconds=[60.0] * 3, images_per_s=[10.0] * 3))
    t = dl.leakage_table({"grouped": h}).set_index("when")
    assert t.loc["best epoch", "epoch"] == 2 and np.isclose(t.loc["best epoch", "test_over_val"], 3)
    assert np.isclose(t.loc["last epoch", "test_over_val"], 1.5)
    cfg = smoke_cfg(root=str(tmp_path))
    old = pd.DataFrame([dict(run="eps-grouped/all", epochs=9, best_epoch=9, best_val_loss=0.01,
                             final_train_loss=0.01, early_stopped=False, minutes=5.0,
                             images_per_s=1.0)])
    dl.write_csv(old, cfg.fig_dir() / "training_summary.csv")
    s = dl.training_summary([(cfg, 0, h), (cfg, "all", None), (cfg, 1, None)], cfg)
    assert list(s.run) == ["eps-grouped/fold0", "eps-grouped/all"]
    assert s.iloc[0].best_epoch == 2 and s.iloc[0].minutes == 3.0 and s.iloc[1].epochs == 9


def test_plot_figure4_one_row_per_entry_one_column_per_t():
    rows = {"a": torch.zeros(3, 3, 8, 8), "b": torch.ones(3, 3, 8, 8)}
    fig = dl.plot_figure4(rows, (50, 500, 1000))
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["a", "b"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["t = 50", "t = 500", "t = 1000"]
    assert fig.axes[1].images[0].get_array().min() == 1.0          # the ones shown white


def test_every_option_has_help_and_shows_its_default():
    """`python -m ddpm_cli COMMAND --help`: every option of every command says what it does, and
    every option with a default shows it."""
    ap = ddpm_cli.build_parser()
    commands = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(ddpm_cli.COMMANDS)
    for name, p in commands.items():
        text = p.format_help().split("options:")[1]
        for act in p._actions:
            if act.help == argparse.SUPPRESS or "-h" in act.option_strings:
                continue
            assert act.help, f"{name} {act.option_strings}: no help text"
            if act.default not in (None, False, "", argparse.SUPPRESS):
                flag = act.option_strings[-1]
                block = text[text.index(f"  {flag}"):].split("\n  -")[0]
                assert "default" in block, f"{name} {flag}: default {act.default!r} not shown"
