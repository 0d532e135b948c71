"""Tests of ddpm_lib's samplers, one-step evaluation and sample-quality metrics.

The samplers are checked two ways: on an untrained tiny U-Net for shape, range, seeding and the
intermediate steps they keep; and on a case with a known answer. If the data is N(μ, s²) per
pixel, x_t ~ N(sqrt(ᾱ)μ, ᾱs² + 1 - ᾱ) and the optimal noise predictor is the closed form

    ε*(x_t, t) = sqrt(1-ᾱ_t)·(x_t - sqrt(ᾱ_t)·μ) / (ᾱ_t·s² + 1 - ᾱ_t),

so with ε* in place of the network a correct sampler must return N(μ, s²) (up to its own
discretisation error), and every sampler is a linear Gaussian recursion whose output moments are
computed exactly here, in float64, independently of the library.
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


def loop(step, default_steps=None):
    """The library's one loop (sample_loop) running `step` over timesteps(T, steps): every t, or
    for DDIM `steps` of them, as sample runs it."""
    def run(model, fp, x, g, steps=default_steps, keep=(), **kw):
        return dl.sample_loop(step, model, fp, x, dl.timesteps(fp.T, steps), g, keep, **kw)
    return run


DDPM, DDIM = loop(dl.p_sample), loop(dl.ddim_step, 50)
REPORT, REPORT_FIRST = loop(dl.report_step), loop(dl.report_first_step)

MU, S2 = 0.3, 0.04
T = 1000


# -----------------------------------------------------------------------------------------------
# helpers


class OptimalEps(nn.Module):
    """ε*(x_t, t) of N(μ, s²) data, called like the U-Net: model(x (B, C, H, W), t (B,) long,
    1-based). Works in float64 inside and returns float32 (autocast leaves elementwise ops
    alone)."""

    def __init__(self, mu: float = MU, s2: float = S2, T: int = T):
        super().__init__()
        b = np.linspace(1e-3, 0.02, T)
        self.register_buffer("ab", torch.tensor(np.cumprod(1 - b)))       # float64, own copy
        self.mu, self.s2 = mu, s2

    def forward(self, x, t):
        ab = self.ab[t - 1].view(-1, 1, 1, 1)
        xd = x.double()
        return ((1 - ab).sqrt() * (xd - ab.sqrt() * self.mu) / (ab * self.s2 + 1 - ab)).float()


def linear_alpha_bar(T: int = T) -> tuple[np.ndarray, np.ndarray]:
    b = np.linspace(1e-3, 0.02, T)
    return b, np.cumprod(1 - b)


def exact_moments(kind: str, mu=MU, s2=S2, T: int = T, scale: float = 1.0) -> tuple[float, float]:
    """Mean and variance of a sampler's output when x_T ~ N(0, 1) and the model is ε*/scale:
    every step is x' = A·x + B + σ·z, so M' = A·M + B, V' = A²·V + σ² (float64, no library code).
    kind: 'beta' / 'beta_tilde' (DDPM, Algorithm 2 with the posterior mean) or 'report'."""
    b, ab = linear_alpha_bar(T)
    M, V = 0.0, 1.0
    for t in range(T, 0, -1):
        a, ap, bt = ab[t - 1], (ab[t - 2] if t > 1 else 1.0), b[t - 1]
        c = np.sqrt(1 - a) / (a * s2 + 1 - a) / scale         # ε̂ = c·(x - sqrt(a)·μ)
        a0, b0 = (1 - np.sqrt(1 - a) * c) / np.sqrt(a), np.sqrt(1 - a) * c * mu  # x̂0=a0·x+b0
        if kind == "report":                        # x' = sqrt(ᾱ')·x̂0 + sqrt(1-ᾱ')·z
            A, B, var = np.sqrt(ap) * a0, np.sqrt(ap) * b0, 1 - ap
        else:                                                # x' = μ̃(x̂0, x) + σ·z
            c0, ct = np.sqrt(ap) * bt / (1 - a), np.sqrt(1 - bt) * (1 - ap) / (1 - a)
            A, B = c0 * a0 + ct, c0 * b0
            var = bt if kind == "beta" else bt * (1 - ap) / (1 - a)
        M, V = A * M + B, A * A * V + (var if t > 1 else 0.0)
    return M, V


def ddim_reference(xT: np.ndarray, steps: int, mu=MU, s2=S2, T: int = T,
                   scale: float = 1.0) -> np.ndarray:
    """Deterministic DDIM (Song et al. Eq. 12, η = 0) in float64 with ε*/scale, over `steps`
    timesteps evenly spaced from T down to 1 (rounded), the last one going to ᾱ_0 = 1."""
    _, ab = linear_alpha_bar(T)
    taus = np.rint(np.linspace(T, 1, steps)).astype(int)
    x = xT.astype(np.float64)
    for i, t in enumerate(taus):
        a = ab[t - 1]
        ap = ab[taus[i + 1] - 1] if i + 1 < len(taus) else 1.0
        eps = np.sqrt(1 - a) * (x - np.sqrt(a) * mu) / (a * s2 + 1 - a) / scale
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        x = np.sqrt(ap) * x0 + np.sqrt(1 - ap) * eps
    return x


def gaussian_run(loop, n_side: int = 128, seed: int = 0, **kw) -> torch.Tensor:
    """A sampler loop with ε*, on 16 384 independent 1-pixel chains (one (1, 1, 128, 128) batch:
    ε* acts per pixel), no clipping."""
    fp = dl.Diffusion(T)
    g = torch.Generator().manual_seed(seed)
    xT = torch.randn(1, 1, n_side, n_side, generator=g)
    x, _ = loop(OptimalEps(), fp, xT, g, clip=False, **kw)
    return xT, x


def check_moments(x: torch.Tensor, mean: float, var: float, n_se: float = 5.0):
    """x's sample mean and variance agree with (mean, var) within n_se standard errors
    (Gaussian output: SE of the mean sqrt(var/n), of the variance var·sqrt(2/(n-1)))."""
    n = x.numel()
    m, v = x.double().mean().item(), x.double().var().item()
    assert abs(m - mean) < n_se * np.sqrt(var / n), (m, mean)
    assert abs(v - var) < n_se * var * np.sqrt(2 / (n - 1)), (v, var)


# -----------------------------------------------------------------------------------------------
# 1. every sampler on an untrained tiny U-Net


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = dl.UNet(8, 32, 2).eval().requires_grad_(False)
    return model, dl.Diffusion(50)


SAMPLER_KW = {"ddpm": dict(var="beta"), "ddim": dict(steps=10), "report": {}, "report-first": {}}


def test_samplers_table():
    assert set(dl.SAMPLERS) == {"ddpm", "ddim", "report", "report-first"}
    with pytest.raises(ValueError, match="method"):
        dl.sample(nn.Linear(1, 1), dl.Diffusion(5), "euler", n=1, size=8, progress=False)


@pytest.mark.parametrize("method,kw", [("ddpm", dict(var="beta")),
                                       ("ddpm", dict(var="beta_tilde")),
                                       ("ddim", dict(steps=10)),
                                       ("ddim", dict(steps=10, eta=1.0)),
                                       ("report", {}), ("report", dict(decode="report")),
                                       ("report-first", {})])
def test_sampler_shape_range_and_seed(tiny, method, kw):
    model, fp = tiny
    run = lambda seed: dl.sample(model, fp, method, n=3, size=16, seed=seed, batch=2,
                                 progress=False, **kw)[0]
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 3, 16, 16) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    assert a.std() > 0.01
    assert torch.equal(a, b), "same seed, different samples"
    assert not torch.allclose(a, c), "different seeds, same samples"
    assert not torch.allclose(a[0], a[1])            # images of one batch differ too


class Recorder(nn.Module):
    """Wraps a model and records every (t, x_t) it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t):
        self.calls.append((int(t[0]), x.detach().clone()))
        return self.model(x, t)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "report"])
def test_keep_returns_the_intermediate_steps(tiny, method):
    """traj[k] is x_k: the very input the model is called with next (at t = k, or for DDIM at
    the first of its timesteps at or below k); traj[0] is the output before sample's clamp."""
    model, fp = tiny
    rec = Recorder(model)
    keep = (0, 7, 25, 49)
    x, traj = dl.sample(rec, fp, method, n=2, size=16, seed=3, keep=keep, progress=False,
                        **SAMPLER_KW[method])
    assert sorted(traj) == sorted(keep)
    assert all(v.shape == (2, 3, 16, 16) for v in traj.values())
    assert torch.equal(x, traj[0].clamp(-1, 1))
    called = dict(rec.calls)
    assert len(called) == len(rec.calls)             # one call per timestep
    for k in (7, 25, 49):
        nxt = max(t for t in called if t <= k)
        if method != "ddim":
            assert nxt == k
        assert torch.equal(traj[k], called[nxt]), k
    if method != "ddim":
        assert sorted(called) == list(range(1, fp.T + 1))
    # keeping nothing changes nothing
    x2, traj2 = dl.sample(model, fp, method, n=2, size=16, seed=3, progress=False,
                          **SAMPLER_KW[method])
    assert traj2 == {} and torch.equal(x, x2)


# -----------------------------------------------------------------------------------------------
# 2. the exact Gaussian test


def test_optimal_eps_is_the_posterior_mean_of_eps():
    """The oracle itself: at a fixed t, ε* = E[ε | x_t], i.e. regressing ε on x_t by least
    squares over many (x0, ε) pairs gives ε*'s slope, and its MSE beats ε* scaled by ±5 %."""
    fp = dl.Diffusion(T)
    g = torch.Generator().manual_seed(0)
    n, t = 200_000, torch.tensor([300])
    x0 = MU + np.sqrt(S2) * torch.randn(n, 1, 1, 1, generator=g)
    eps = torch.randn(n, 1, 1, 1, generator=g)
    xt = fp.q_sample(x0, t.expand(n), eps)
    pred = OptimalEps()(xt, t.expand(n))
    slope = np.polyfit(xt.flatten().double().numpy(), eps.flatten().double().numpy(), 1)[0]
    assert pred.flatten()[:2].diff().item() / xt.flatten()[:2].diff().item() == \
        pytest.approx(slope, rel=0.01)
    mse = (pred - eps).pow(2).mean()
    assert mse < (1.05 * pred - eps).pow(2).mean() and mse < (0.95 * pred - eps).pow(2).mean()


@pytest.mark.parametrize("var,data_tol", [("beta", 0.05), ("beta_tilde", 0.15)])
def test_ddpm_samples_the_gaussian(var, data_tol):
    _, x = gaussian_run(DDPM, var=var)
    n = x.numel()
    m_exact, v_exact = exact_moments(var)
    check_moments(x, m_exact, v_exact)               # the sampler is the recursion it claims
    assert abs(x.mean().item() - MU) < 4 * np.sqrt(S2 / n) + 1e-3
    assert abs(x.var().item() - S2) < data_tol * S2, x.var().item()


def test_ddim_eta0_is_eq12_exactly():
    xT, x = gaussian_run(DDIM, steps=50, eta=0.0)
    ref = ddim_reference(xT.double().numpy(), 50)
    np.testing.assert_allclose(x.double().numpy(), ref, rtol=0, atol=1e-4)
    assert abs(x.mean().item() - MU) < 0.01
    # 50 deterministic steps: known to under-disperse (discretisation), not a sampling error
    assert x.var().item() < 0.9 * S2
    # deterministic: another generator state does not matter at η = 0
    fp, g = dl.Diffusion(T), torch.Generator().manual_seed(123)
    x2, _ = DDIM(OptimalEps(), fp, xT, g, steps=50, eta=0.0, clip=False)
    assert torch.equal(x, x2)


class ZeroNet(nn.Module):
    """F ≡ 0: a preconditioned model's output before any training of what it adds."""

    def forward(self, x, t):
        return torch.zeros_like(x)


def test_preconditioning_alone_is_the_gaussian_optimum():
    """EDM's preconditioning with σ_d = s and F ≡ 0 gives ε̂ = c_skip·x_t = ε* of N(0, s²) data,
    so the network only has to learn what the data has beyond that Gaussian: DDIM driven by it
    is Eq. 12 with ε* exactly. With another σ_d it is not."""
    g = torch.Generator().manual_seed(0)
    xT = torch.randn(1, 1, 128, 128, generator=g)
    run = lambda s2: DDIM(ZeroNet(), dl.Diffusion(T, sigma_data=s2 ** 0.5),
                          xT, g, steps=50, clip=False)[0].double().numpy()
    ref = ddim_reference(xT.double().numpy(), 50, mu=0.0, s2=0.25)
    np.testing.assert_allclose(run(0.25), ref, rtol=0, atol=1e-4)
    assert np.abs(run(0.5) - ref).mean() > 0.01


def test_ddim_many_steps_samples_the_gaussian():
    xT, x = gaussian_run(DDIM, steps=1000, eta=0.0)
    n = x.numel()
    assert abs(x.mean().item() - MU) < 4 * np.sqrt(S2 / n) + 1e-3
    assert abs(x.var().item() - S2) < 0.10 * S2, x.var().item()
    np.testing.assert_allclose(x.double().numpy(), ddim_reference(xT.double().numpy(), 1000),
                               rtol=0, atol=1e-4)


def test_ddim_eta1_with_re_derived_eps_is_the_ddpm_posterior_step():
    """With η = 1 over all T steps and ε̂ re-derived from the clipped x̂0, DDIM's step is DDPM's
    posterior step with σ² = β̃_t (same noise draws): the two loops agree when x̂0 is clipped
    (ε* of N(0, 2²) data, whose x̂0 leaves [-1, 1]). Keeping the network's ε̂ is another sampler
    once clipping is active, and the same one without clipping."""
    model, fp = OptimalEps(0.0, 4.0, T=50), dl.Diffusion(50)
    xT = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    run = lambda loop, **kw: loop(model, fp, xT.clone(), torch.Generator().manual_seed(1), **kw)[0]
    t = torch.full((4,), fp.T)
    x0 = fp.predict_x0(xT, t, dl.eps_hat(model, fp, xT, t))
    assert (x0.abs() > 1).float().mean() > 0.3                     # clipping is active
    ddpm = run(DDPM, var="beta_tilde")
    ddim = run(DDIM, steps=fp.T, eta=1.0, recompute_eps=True)
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-5)
    kept = run(DDIM, steps=fp.T, eta=1.0)
    assert (kept - ddpm).abs().max() > 0.1
    torch.testing.assert_close(
        run(DDIM, steps=10, clip=False),
        run(DDIM, steps=10, clip=False, recompute_eps=True), rtol=0, atol=1e-5)


def test_report_method_does_not_sample_the_gaussian():
    _, x = gaussian_run(REPORT)
    m_exact, v_exact = exact_moments("report")
    check_moments(x, m_exact, v_exact)               # it is the method its docstring describes
    assert x.var().item() < 0.6 * S2, x.var().item()  # … and that method collapses the variance


# -----------------------------------------------------------------------------------------------
# 3. SSIM, PSNR, Fréchet distance, KID, nearest-neighbour SSIM


def _structured(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth images with edges: gradients plus a disc, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        c = torch.rand(3, 4, generator=g)
        disc = ((xx - c[0, 0]) ** 2 + (yy - c[0, 1]) ** 2 < 0.1).float()
        out.append(torch.stack([(c[i, 2] * xx + c[i, 3] * yy) / 2 + 0.4 * disc for i in range(3)]))
    return torch.stack(out).clamp(0, 1)


def test_ssim_matches_skimage():
    """ddpm_lib.ssim mimics skimage's structural_similarity(channel_axis=0, data_range=1) with its
    defaults: 7×7 uniform window, sample covariance, K1 = 0.01, K2 = 0.03, border cropped."""
    from skimage.metrics import structural_similarity
    g = torch.Generator().manual_seed(0)
    rand_a, rand_b = torch.rand(3, 3, 24, 24, generator=g), torch.rand(3, 3, 24, 24, generator=g)
    st_a = _structured(3)
    st_b = (st_a + 0.1 * torch.randn(st_a.shape, generator=g)).clamp(0, 1)
    st_c = _structured(3, seed=1)
    for a, b in ((rand_a, rand_b), (st_a, st_b), (st_a, st_c), (rand_a, st_a[:, :, :24, :24])):
        got = dl.ssim(a, b)
        want = [structural_similarity(x.double().numpy(), y.double().numpy(), channel_axis=0,
                                      data_range=1.0) for x, y in zip(a, b)]
        assert got.shape == (len(a),)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-3)
    assert torch.allclose(dl.ssim(st_a, st_a), torch.ones(3))
    assert (dl.ssim(st_a, st_b) > dl.ssim(st_a, st_c)).all()


def test_psnr_is_10_log10_one_over_mse():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 16, 16, generator=g)
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    mse = ((a.double() - b.double()) ** 2).mean(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(dl.psnr(a, b).numpy(), 10 * np.log10(1 / mse), rtol=1e-5)
    np.testing.assert_allclose(dl.psnr(a * 2, b * 2, data_range=2.0).numpy(),
                               10 * np.log10(1 / mse), rtol=1e-5)


def _features(n: int = 600, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, np.random.Generator]:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d))
    return torch.tensor(rng.normal(size=(n, d)) @ mix + rng.normal(size=d)), rng


def test_frechet_distance():
    f, rng = _features()
    assert abs(dl.frechet_distance(f, f)) < 1e-6     # (a one-sided regularisation gave -2e-6·d)
    noise = torch.tensor(rng.normal(size=f.shape))
    d = [dl.frechet_distance(f, f + s * noise) for s in (0.3, 1.0, 3.0)]
    assert 0 < d[0] < d[1] < d[2], d
    # a pure mean shift adds exactly ‖Δμ‖²
    shift = torch.arange(8, dtype=torch.float64) / 4
    assert dl.frechet_distance(f, f + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-3)


def test_ffd_floor_is_larger_for_fewer_samples():
    """FFD, like FID, is biased upward for small sets: the floor (real vs real) at n = 20 is above
    the floor at n = 300, which is why a sample set is compared with the floor at its own n."""
    torch.manual_seed(0)
    clf = dl.FruitClassifier(3, width=4).eval()                 # 16-d features
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, 256, (400, 3, 16, 16), dtype=torch.uint8, generator=g)
    test = dl.to_float(torch.randint(0, 256, (300, 3, 16, 16), dtype=torch.uint8, generator=g))
    (small, s_std), (large, l_std) = (dl.ffd_floor(clf, train, test, n) for n in (20, 300))
    assert small > 2 * large > 0 and 0 < l_std < large, (small, large)
    assert dl.ffd_floor(clf, train, test, 20) == (small, s_std)          # seeded


def test_kid():
    rng = np.random.default_rng(0)
    f, f2 = (torch.tensor(rng.normal(size=(600, 32))) for _ in range(2))
    same, same_std = dl.kid(f, f, subsets=20)
    other, _ = dl.kid(f, f2, subsets=20)              # another sample of the same distribution
    small, _ = dl.kid(f, f + 0.5, subsets=20)
    large, _ = dl.kid(f, f + 1.0, subsets=20)
    assert abs(same) < 0.05 and abs(other) < 0.05 and same_std > 0
    assert 0.5 < small < large, (small, large)
    assert dl.kid(f, f + 1.0, subsets=20) == (large, dl.kid(f, f + 1.0, subsets=20)[1])  # seeded


def test_nearest_ssim_finds_a_copy():
    train = (_structured(12, 16, seed=2) * 255).round().to(torch.uint8)
    copies = dl.to_float(train[[3, 8]])
    s = dl.nearest_ssim(copies, train, batch=1)
    torch.testing.assert_close(s, torch.ones(2), rtol=0, atol=1e-5)
    new = dl.to_float((_structured(2, 16, seed=5) * 255).round().to(torch.uint8))
    assert (dl.nearest_ssim(new, train) < 0.999).all()


# -----------------------------------------------------------------------------------------------
# 4. one-step evaluation and Table 1's layout


class Oracle(nn.Module):
    """Returns the true ε of x_t for known clean images: ε = (x_t - sqrt(ᾱ)·x0)/sqrt(1-ᾱ)."""

    def __init__(self, x0: torch.Tensor, fp: dl.Diffusion):
        super().__init__()
        self.x0, self.fp = x0, fp
        self.dummy = nn.Parameter(torch.zeros(()))   # one_step_eval reads the model's device

    def forward(self, x, t):
        ab = self.fp.at(self.fp.alpha_bar, t).double()
        return ((x.double() - ab.sqrt() * self.x0.double()) / (1 - ab).sqrt()).float()


def test_one_step_eval_rows_and_perfect_predictor():
    images = (_structured(4, 16, seed=3) * 255).round().to(torch.uint8)
    fp = dl.Diffusion(T)
    ts = (1, 50, 1000)
    df = dl.one_step_eval(Oracle(dl.to_float(images), fp), fp, images, ts=ts, batch=4)
    assert list(df.columns[:3]) == ["t", "ssim", "psnr"]
    assert len(df) == len(images) * len(ts)
    assert df.groupby("t").size().to_dict() == {t: len(images) for t in ts}
    assert (df.ssim > 0.999).all(), df            # the true ε reconstructs x0 at every t
    assert (df.psnr > 50).all(), df
    # an untrained network: same layout, finite, and far worse at large t than the oracle
    torch.manual_seed(0)
    net = dl.UNet(8, 32, 2).eval().requires_grad_(False)
    bad = dl.one_step_eval(net, fp, images, ts=(50, 1000), batch=2)
    assert len(bad) == 2 * len(images) and np.isfinite(bad[["ssim", "psnr"]].to_numpy()).all()
    assert (bad.ssim <= 1).all()
    assert bad[bad.t == 1000].ssim.mean() < 0.5
    # the report-faithful reconstruction runs on the same rows
    rep = dl.one_step_eval(net, dl.Diffusion(T, target="scaled_eps"), images, ts=(50,),
                           decode="eq5", batch=4)
    assert len(rep) == len(images) and ((rep.ssim >= -1) & (rep.ssim <= 1)).all()


def test_perfect_reconstruction_upsampled_scores_the_ceiling():
    """Table 1's 100×100 column of a perfect x̂0 (Oracle) is the down- and upsampling ceiling,
    per image; at the model's own resolution it scores 1."""
    cfg = dl.get_config("smoke")
    small, big = dl.eval_images(cfg), dl.eval_images(cfg, size=100)
    fp = dl.Diffusion.from_config(cfg)
    per = dl.one_step_eval(Oracle(dl.to_float(small), fp), fp, small, ts=(50, 800), hires=big,
                           batch=len(small))              # the oracle holds every image's x0
    ceiling = dl.upsampling_ceiling(cfg)
    assert np.allclose(per.ssim, 1, atol=1e-4)
    assert np.allclose(per.groupby("t").ssim_hr.mean(), ceiling.ssim_hr_mean.iloc[0], atol=1e-4)
    assert 0.3 < ceiling.ssim_hr_mean.iloc[0] < 1 and ceiling.n.iloc[0] == len(small)


def _long_table(ts=(50, 100, 150), folds=(0, 1, 2)) -> pd.DataFrame:
    rows = []
    for method, off in (("corrected", 0.0), ("report-faithful", 0.3)):
        for k in folds:
            for t in ts:
                rows.append(dict(method=method, fold=k, t=t, ssim_mean=0.9 - t / 1000 - 0.01 * k
                                 - off, ssim_std=0.01 + 0.002 * k + t / 1e4, psnr_mean=20.0,
                                 psnr_std=1.0, n=10))
    return pd.DataFrame(rows)


def _expected_wide(long: pd.DataFrame, method: str = "corrected") -> pd.DataFrame:
    d = long[long.method == method]
    out = {"t": sorted(d.t.unique())}
    folds = sorted(d.fold.unique())
    for k in folds:
        out[f"fold {k}"] = [f"{r.ssim_mean.item():.3f} ± {r.ssim_std.item():.3f}"
                            for t in out["t"] for r in [d[(d.fold == k) & (d.t == t)]]]
    means = [[d[(d.fold == k) & (d.t == t)].ssim_mean.item() for k in folds] for t in out["t"]]
    out["mean over folds"] = [f"{np.mean(m):.3f} ± {np.std(m, ddof=1):.3f}" if len(m) > 1
                              else f"{np.mean(m):.3f}" for m in means]
    return pd.DataFrame(out)


class Zero(nn.Module):
    """A 'network' that predicts ε̂ = 0 (ε-MSE = E[ε²] = 1 at every t)."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return x * 0 + self.p


def gaussian_images(n: int, seed: int = 0) -> torch.Tensor:
    """n 'images' (3, 4, 4) of N(MU, S2) per pixel: the data OptimalEps is optimal for."""
    return MU + np.sqrt(S2) * torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


class ScaleBlind(nn.Module):
    """ε* of N(μ, s²) data (OptimalEps) applied to the input rescaled to its expected norm
    sqrt(E‖x_t‖²): like the report's U-Net, blind to ‖x_t‖, and otherwise optimal."""

    def __init__(self, x0_sq: torch.Tensor):
        super().__init__()
        self.opt, self.x0_sq = OptimalEps(), x0_sq

    def forward(self, x, t):
        ab = self.opt.ab[t - 1].float()
        m = (ab * self.x0_sq + (1 - ab) * x[0].numel()).sqrt()
        return self.opt(x * (m / x.flatten(1).norm(dim=1)).view(-1, 1, 1, 1), t)


class EpsIsX(nn.Module):
    """ε̂ = x_t: the large-t limit of the ideal ε̂, which scales with its input."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return x + self.p


def test_scale_response_reads_the_scale_an_eps_follows():
    """scale_response gives c for ε̂ = x_t, c for a preconditioned F ≡ 0 (ε̂ = c_skip·x_t), and 1
    for the report's U-Net, whose convolutions feed GroupNorm(1, C) without a bias (a property of
    its architecture, here measured by the function under test)."""
    images = (torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    fp, ts = dl.Diffusion(T), (100, 1000)
    r = dl.scale_response(EpsIsX(), fp, images, ts, c=1.1)
    assert list(r.t) == list(ts) and np.allclose(r.ratio, 1.1, atol=1e-5) and (r.c == 1.1).all()
    r = dl.scale_response(Zero(), dl.Diffusion(T, sigma_data=0.7), images, ts, c=0.8)
    assert np.allclose(r.ratio, 0.8, atol=1e-5)
    torch.manual_seed(0)
    r = dl.scale_response(dl.UNet(8, 32, 2).eval(), fp, images, ts, c=2.0)
    assert np.allclose(r.ratio, 1.0, atol=1e-3)


def test_scale_blind_eps_drifts_in_deterministic_ddim():
    """Deterministic DDIM without clipping, driven by ε* of Gaussian data made blind to ‖x_t‖
    (ScaleBlind), ends far wider than with ε* itself: the starting noise's norm is never
    corrected. The mechanism notebook 05 shows."""
    fp = dl.Diffusion(T)
    x0_sq = gaussian_images(20_000).flatten(1).pow(2).sum(1).mean()
    xT = torch.randn(4000, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    run = lambda model: DDIM(model, fp, xT.clone(), torch.Generator(), steps=50, clip=False)[0]
    opt, blind = run(OptimalEps()), run(ScaleBlind(x0_sq))
    assert blind.var() > 100 * opt.var()                     # measured: 180 against 0.027


def test_generation_metrics_scores_every_story_row(tmp_path, monkeypatch):
    """generation_metrics on the smoke profile's two story models: the two real references, then
    one row per GEN_SAMPLERS entry with n (n_report for the report's method) samples in [-1, 1],
    FFD over the floor at each row's n, and the samples saved; class_shares sums to 1 per set."""
    cfg = dl.get_config("smoke", root=str(tmp_path), data_dir=str(dl.Path(__file__).resolve().parents[1] / "runs" /
                                               "smoke" / "data"), T=20)
    monkeypatch.setitem(dl.GENERATION, "smoke", dict(dl.GENERATION["smoke"], T=20))
    with pytest.raises(FileNotFoundError, match="train it with `python -m ddpm_cli train"):
        dl.story_models(cfg)                                   # the library never trains
    dt.train(dataclasses.replace(cfg, target="eps", split="grouped"), 0, progress=False)
    dt.train(dl.generation_config(cfg), "all", progress=False)
    with pytest.raises(FileNotFoundError, match="classifier --profile smoke"):
        dl.load_classifier(cfg)                                # nor trains a classifier
    dl.classifier_path(cfg).write_bytes(dl.classifier_path(dl.get_config("smoke")).read_bytes())
    models = dl.story_models(cfg)
    assert models["generation"][1].sigma_data == 0.7 and models["fold0"][1].sigma_data == 0
    df, samples = dl.generation_metrics(cfg, models, n=16, n_slow=4, progress=False)
    assert list(df.sampler) == ["real: training images", "real: test images", *dl.GEN_SAMPLERS]
    assert list(samples) == list(dl.GEN_SAMPLERS)
    for name, (_, method, _) in dl.GEN_SAMPLERS.items():
        assert samples[name].shape == ((16 if method == "ddim" else 4), 3, 16, 16)
        assert samples[name].abs().max() <= 1
    rows = df.set_index("sampler").loc[list(dl.GEN_SAMPLERS)]
    ddim = rows.index.str.startswith("DDIM")                  # n = 16, EVAL's n: FFD; the rest KID
    assert np.allclose(rows.ffd_ratio[ddim], rows.ffd[ddim] / rows.ffd_floor[ddim])
    assert rows.ffd[ddim].notna().all() and (rows.ffd_std[ddim] > 0).all()
    assert rows.ffd[~ddim].isna().all() and rows.kid.notna().all()
    assert (tmp_path / "runs" / "smoke" / "samples.pt").exists()
    clf, classes, _ = dl.load_classifier(cfg)
    shares = dl.class_shares(clf, classes, samples)
    assert list(shares.index) == [*classes, "unrecognized"]
    assert np.allclose(shares.sum(), 1.0)


def test_table1_wide_layout():
    long = _long_table()
    wide = dl.table1_wide(long)
    assert list(wide.columns) == ["t", "fold 0", "fold 1", "fold 2", "mean over folds"]
    assert list(wide.t) == [50, 100, 150]
    pd.testing.assert_frame_equal(wide, _expected_wide(long), check_dtype=False)
    assert wide.loc[0, "fold 1"] == "0.840 ± 0.017"      # 0.9 - 0.05 - 0.01, 0.01 + 0.002 + 0.005
    rep = dl.table1_wide(long, "report-faithful")
    pd.testing.assert_frame_equal(rep, _expected_wide(long, "report-faithful"), check_dtype=False)
    one = dl.table1_wide(_long_table(folds=(3,)))
    assert list(one.columns) == ["t", "fold 3", "mean over folds"]
    assert all("±" not in v for v in one["mean over folds"])


def test_table1_wide_does_not_depend_on_row_order():
    long = _long_table()
    shuffled = long.sample(frac=1.0, random_state=0)
    pd.testing.assert_frame_equal(dl.table1_wide(shuffled), _expected_wide(long),
                                  check_dtype=False)


def test_summarise_std_over_images_and_over_batch_means():
    """summarise: the per-image std as before, and the std of the means of consecutive batches
    of 64 images in the order evaluated (the last one smaller), per t; NaN with one batch."""
    rng = np.random.default_rng(0)
    sizes = {50: 150, 100: 40}
    per = pd.DataFrame([dict(t=t, ssim=v, psnr=30 * v) for t, n in sizes.items()
                        for v in rng.uniform(0, 1, n)])
    got = dl.summarise(per).set_index("t")
    for t, n in sizes.items():
        v = per[per.t == t].ssim.to_numpy()
        assert got.loc[t, "n"] == n
        assert got.loc[t, "ssim_std"] == pytest.approx(np.std(v, ddof=1))
        means = [v[i:i + 64].mean() for i in range(0, n, 64)]
        if len(means) > 1:
            assert got.loc[t, "ssim_std_batch"] == pytest.approx(np.std(means, ddof=1))
            assert got.loc[t, "psnr_std_batch"] == pytest.approx(30 * np.std(means, ddof=1))
        else:
            assert np.isnan(got.loc[t, "ssim_std_batch"]) and np.isnan(got.loc[t, "psnr_std_batch"])
    assert list(dl.summarise(per).columns[:6]) == ["t", "ssim_mean", "ssim_std", "psnr_mean",
                                                   "psnr_std", "n"]


def test_ddpm_rejects_unknown_variance():
    """A typo in var must not silently fall back to β̃."""
    with pytest.raises(ValueError, match="beta_tilde"):
        dl.sample(OptimalEps(), dl.Diffusion(T=10), "ddpm", 1, 4, var="betta")


def _seeds_table_from_the_command_line(what: str, by: str, variants, samplers, metrics):
    """`evaluate --what <what>` for sample seeds 0 and 1 (a _seeds_table): the real test images'
    row, then one row per (sampler, variant in column `by`, seed) with the ratio to the floor and
    the SSIM to the training set, and its figure; `metrics` called directly gives the same FFD
    again for seed 1. Returns (the rows but the first, {(sampler, variant): samples of seed 1})."""
    cfg = dl.get_config("smoke")
    table, fig = {"mixture": ("generation_mixture", "mixture_ffd"),
                  "norm": ("generation_norm", "norm_ffd")}[what]
    (cfg.fig_dir() / f"{fig}.png").unlink(missing_ok=True)
    cli.main(["evaluate", "--profile", "smoke", "--what", what, "--seeds", "0", "1"])
    df = pd.read_csv(cfg.fig_dir() / f"{table}.csv")
    assert len(df) == 1 + len(samplers) * len(variants) * 2 and df.sampler[0] == "real: test images"
    d = df.iloc[1:]
    assert set(d[by]) == set(variants) and set(d.sampler) == set(samplers)
    assert np.allclose(d.ffd_ratio, d.ffd / d.ffd_floor) and d.nn_ssim_max.notna().all()
    assert (cfg.fig_dir() / f"{fig}.png").exists()
    again, samples = metrics(cfg, dl.generation_model(cfg), seeds=(1,), progress=False)
    assert np.allclose(again.ffd[1:], d[d.seed == 1].ffd, rtol=1e-5)
    assert len(samples) == len(samplers) * len(variants)
    return d, samples


def test_classifier_does_not_depend_on_the_callers_rng():
    """train_classifier seeds before it builds the network, so its weights (and every FFD) are
    the same whatever used the global RNG before it (it used to build the network first)."""
    cfg = dl.get_config("smoke")
    weights = []
    for s in (1, 2):
        torch.manual_seed(s)
        weights.append(cli.train_classifier(cfg, progress=False).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# -----------------------------------------------------------------------------------------------
# 5. the report's samplers read literally (its Section 5), checked against float64 recursions


class ScaledOptimalEps(OptimalEps):
    """The ideal report-faithful network: it outputs its target sqrt(1-ᾱ_t)·ε* exactly."""

    def forward(self, x, t):
        return ((1 - self.ab[t - 1].view(-1, 1, 1, 1)).sqrt() * super().forward(x, t).double()).float()


def _literal_run(loop, model, n_side: int = 64, seed: int = 0, **kw):
    """loop with `model` on (1, 1, n_side, n_side) 1-pixel chains, and the noise it draws
    (the same generator, replayed: one N(0, 1) draw of x's shape per step with t > 1)."""
    fp = dl.Diffusion(T)
    g = torch.Generator().manual_seed(seed)
    xT = torch.randn(1, 1, n_side, n_side, generator=g)
    x, _ = loop(model, fp, xT, g, **kw)
    g2 = torch.Generator().manual_seed(seed)
    torch.randn(1, 1, n_side, n_side, generator=g2)
    z = [torch.randn(1, 1, n_side, n_side, generator=g2).double().numpy() for _ in range(T - 1)]
    return xT.double().numpy(), x.double().numpy(), z


def _out_coef(t: int, scaled: bool) -> float:
    """The oracle's output is k·(x − sqrt(ᾱ_t)·μ): k of ε*, or of sqrt(1-ᾱ_t)·ε* (scaled)."""
    _, ab = linear_alpha_bar()
    a = ab[t - 1]
    return np.sqrt(1 - a) / (a * S2 + 1 - a) * (np.sqrt(1 - a) if scaled else 1.0)


@pytest.mark.parametrize("scaled", [False, True])
def test_report_first_sampler_is_algorithm2_with_the_raw_output(scaled):
    """x_{t-1} = (x_t − β_t/sqrt(1-ᾱ_t)·out)/sqrt(α_t) + sqrt(β_t)·z, replayed in float64 with the
    same z. With ε* it is DDPM (the data's variance); with the ideal report-faithful output it
    removes too little noise and ends ~10× too wide, its mean still right."""
    model = ScaledOptimalEps() if scaled else OptimalEps()
    xT, x, z = _literal_run(REPORT_FIRST, model)
    b, ab = linear_alpha_bar()
    ref = xT
    for i, t in enumerate(range(T, 0, -1)):
        out = _out_coef(t, scaled) * (ref - np.sqrt(ab[t - 1]) * MU)
        ref = (ref - b[t - 1] / np.sqrt(1 - ab[t - 1]) * out) / np.sqrt(1 - b[t - 1])
        ref = ref + (np.sqrt(b[t - 1]) * z[i] if t > 1 else 0)
    np.testing.assert_allclose(x, ref, rtol=0, atol=2e-4)
    if scaled:
        assert x.var() > 5 * S2 and abs(x.mean() - MU) < 0.1
    else:
        assert abs(x.var() - S2) < 0.15 * S2


def test_report_iterative_method_with_its_own_decoding():
    """decode='report': x̂0 = clip(s(t)·(x_t − out)) with Eq. 5's scaler, then q_sample to t−1,
    replayed in float64; on the ideal report-faithful output it differs from decoding ε̂."""
    fp = dl.Diffusion(T)
    xT, x, z = _literal_run(REPORT, ScaledOptimalEps(), decode="report")
    _, ab = linear_alpha_bar()
    s = dl.report_scaler(torch.arange(1, T + 1)).numpy()
    ref = xT
    for i, t in enumerate(range(T, 0, -1)):
        out = _out_coef(t, True) * (ref - np.sqrt(ab[t - 1]) * MU)
        x0 = np.clip(np.float32(s[t - 1]) * (ref - out), -1, 1)
        ref = np.sqrt(ab[t - 2]) * x0 + np.sqrt(1 - ab[t - 2]) * z[i] if t > 1 else x0
    np.testing.assert_allclose(x, ref, rtol=0, atol=2e-4)
    _, x_eps, _ = _literal_run(REPORT, ScaledOptimalEps())
    assert np.abs(x - x_eps).max() > 0.01
    with pytest.raises(ValueError, match="decode"):
        dl.sample(OptimalEps(), fp, "report", 1, 2, decode="other")


def test_figure5_samples_every_set_from_the_same_seed(tmp_path, monkeypatch):
    """figure5 on two freshly trained smoke fold models (T = 50): one set per FIG5_SAMPLERS row
    plus the real images' row, each kept t recorded, and the same seed gives the same sets."""
    cfg = dl.get_config("smoke", root=str(tmp_path), data_dir=str(dl.Path(__file__).resolve().parents[1] / "runs" /
                                               "smoke" / "data"), T=50, max_epochs=1)
    for target in ("eps", "scaled_eps"):
        dt.train(dataclasses.replace(cfg, target=target), 0, progress=False)
    xs, trajs, stats = dl.figure5(cfg, n=3, keep=(40, 20, 0), progress=False)
    assert list(xs) == list(dl.FIG5_SAMPLERS) and len(stats) == len(xs) + 1
    assert stats.images.iloc[0] == "real test images"
    assert ((stats.dark_share >= 0) & (stats.dark_share <= 1)).all() and (stats.n[1:] == 3).all()
    for name, x in xs.items():
        assert x.shape == (3, 3, 16, 16) and sorted(trajs[name]) == [0, 20, 40]
        assert torch.isfinite(x).all() and x.abs().max() <= 1
    assert not torch.equal(xs["DDPM-1000, corrected model"], xs["DDIM-50 (η = 0), corrected model"])
    again, _, _ = dl.figure5(cfg, n=3, keep=(0,), progress=False)
    assert all(torch.equal(again[k], xs[k]) for k in xs)
    fig = dl.plot_figure5(xs, trajs, n_show=8)
    assert len(fig.axes) == 3 * len(xs) and fig.axes[0].get_title(loc="left") == list(xs)[0]
    assert "3 final samples" in fig.get_suptitle()


def test_the_committed_yardstick_tells_real_from_damaged_images_at_its_n(tmp_path):
    """With the committed classifier at the one n of every FFD (EVAL's n_samples): a fresh draw of
    real training images scores within 3 spreads of the floor (drawn apart from it), while the
    same images blurred or with their colours shifted score far outside."""
    from conftest import real_subset
    from torchvision.transforms.v2.functional import gaussian_blur
    if not (real_subset() / "Training").is_dir():
        pytest.skip(f"the real Fruits-360 subset is not at {real_subset()} (FRUITS360_DIR)")
    cfg = dl.get_config("cpu", data_dir=str(tmp_path / "data"))
    if not dl.classifier_path(cfg).exists():
        pytest.fail(f"{dl.classifier_path(cfg)} is not committed")
    cli.prepare_data(real_subset(), out=tmp_path / "data")
    _, train_ds, test_imgs, clf, acc = dl.scoring_setup(cfg, progress=False)
    n, fr = dl.EVAL["cpu"]["n_samples"], dl.classify(clf, dl.to_float(test_imgs))[0]
    floor, spread = dl.ffd_floor(clf, train_ds.images, dl.to_float(test_imgs), n)
    real = dl.to_float(train_ds.images[torch.randperm(
        len(train_ds), generator=torch.Generator().manual_seed(99))[:n]])
    ffd = lambda x: dl.frechet_distance(dl.classify(clf, x)[0], fr)
    assert acc > 0.9 and n >= 500 and 0 < spread < floor
    assert abs(ffd(real) - floor) < 3 * spread
    blurred = gaussian_blur(real, kernel_size=5, sigma=1.5)
    shifted = (real + torch.tensor([0.4, 0.0, -0.4]).view(1, 3, 1, 1)).clamp(-1, 1)
    for bad in (blurred, shifted):
        assert ffd(bad) > floor + 20 * spread


def test_seed_reaches_every_draw_of_generation_metrics(tmp_path, monkeypatch):
    """Notebook 05's SEED: generation_metrics(seed=s) draws every sampler's x_T (sample), the
    real subsets (ffd_floor, quality's bootstrap) with s, not cfg.seed; another s, other samples."""
    data = str(dl.Path(__file__).resolve().parents[1] / "runs" / "smoke" / "data")
    cfg = dl.get_config("smoke", root=str(tmp_path), data_dir=data)
    dl.classifier_path(cfg).parent.mkdir(parents=True)
    dl.classifier_path(cfg).write_bytes(dl.classifier_path(dl.get_config("smoke")).read_bytes())
    seeds = []

    def fake_sample(model, fp, method, n, size, seed=0, **kw):
        seeds.append(("sample", seed))
        return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1, {}

    real_floor, real_quality = dl.ffd_floor, dl.quality
    monkeypatch.setattr(dl, "sample", fake_sample)
    monkeypatch.setattr(dl, "ffd_floor", lambda *a, seed=0, **k: seeds.append(("floor", seed))
                        or real_floor(*a, seed=seed, **k))
    monkeypatch.setattr(dl, "quality", lambda *a, **k: seeds.append(("quality", a[5]))
                        or real_quality(*a, **k))
    fp = dl.Diffusion(20)
    models = {key: (None, fp) for key, _, _ in dl.GEN_SAMPLERS.values()}
    _, s7 = dl.generation_metrics(cfg, models, n=16, n_slow=2, progress=False, seed=7)
    assert seeds and {s for _, s in seeds} == {7}
    assert {k for k, _ in seeds} == {"sample", "floor", "quality"}
    _, s8 = dl.generation_metrics(cfg, models, n=16, n_slow=2, progress=False, seed=8)
    assert all(not torch.equal(s7[k], s8[k]) for k in s7)
