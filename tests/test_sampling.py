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
    fp = dl.ForwardProcess(T)
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
    return model, dl.ForwardProcess(50)


SAMPLER_KW = {"ddpm": dict(var="beta"), "ddim": dict(steps=10), "report": {}, "report-first": {}}


def test_samplers_table():
    assert set(dl.SAMPLERS) == {"ddpm", "ddim", "report", "report-first"}
    with pytest.raises(ValueError, match="method"):
        dl.sample(nn.Linear(1, 1), dl.ForwardProcess(5), "euler", n=1, size=8, progress=False)


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
    fp = dl.ForwardProcess(T)
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
    _, x = gaussian_run(dl.p_sample_loop, var=var)
    n = x.numel()
    m_exact, v_exact = exact_moments(var)
    check_moments(x, m_exact, v_exact)               # the sampler is the recursion it claims
    assert abs(x.mean().item() - MU) < 4 * np.sqrt(S2 / n) + 1e-3
    assert abs(x.var().item() - S2) < data_tol * S2, x.var().item()


def test_ddim_eta0_is_eq12_exactly():
    xT, x = gaussian_run(dl.ddim_sample_loop, steps=50, eta=0.0)
    ref = ddim_reference(xT.double().numpy(), 50)
    np.testing.assert_allclose(x.double().numpy(), ref, rtol=0, atol=1e-4)
    assert abs(x.mean().item() - MU) < 0.01
    # 50 deterministic steps: known to under-disperse (discretisation), not a sampling error
    assert x.var().item() < 0.9 * S2
    # deterministic: another generator state does not matter at η = 0
    fp, g = dl.ForwardProcess(T), torch.Generator().manual_seed(123)
    x2, _ = dl.ddim_sample_loop(OptimalEps(), fp, xT, g, steps=50, eta=0.0, clip=False)
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
    run = lambda s2: dl.ddim_sample_loop(ZeroNet(), dl.ForwardProcess(T, sigma_data=s2 ** 0.5),
                                         xT, g, steps=50, clip=False)[0].double().numpy()
    ref = ddim_reference(xT.double().numpy(), 50, mu=0.0, s2=0.25)
    np.testing.assert_allclose(run(0.25), ref, rtol=0, atol=1e-4)
    assert np.abs(run(0.5) - ref).mean() > 0.01


def test_eps_scale_divides_the_networks_eps():
    """ε-scaling: DDIM (η = 0) with eps_scale = λ is Eq. 12 with ε*/λ exactly, and DDPM's output
    moments are the recursion's with ε*/λ; λ = 1 is the plain sampler, bit for bit."""
    xT, x = gaussian_run(dl.ddim_sample_loop, steps=50, eps_scale=1.05)
    ref = ddim_reference(xT.double().numpy(), 50, scale=1.05)
    np.testing.assert_allclose(x.double().numpy(), ref, rtol=0, atol=1e-4)
    assert np.abs(ref - ddim_reference(xT.double().numpy(), 50)).mean() > 0.01
    assert torch.equal(gaussian_run(dl.ddim_sample_loop, steps=50, eps_scale=1.0)[1],
                       gaussian_run(dl.ddim_sample_loop, steps=50)[1])
    _, x = gaussian_run(dl.p_sample_loop, eps_scale=1.05)
    check_moments(x, *exact_moments("beta", scale=1.05))
    assert exact_moments("beta", scale=1.05)[1] > 1.08 * exact_moments("beta")[1]   # > 5 SE


def test_ddim_many_steps_samples_the_gaussian():
    xT, x = gaussian_run(dl.ddim_sample_loop, steps=1000, eta=0.0)
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
    model, fp = OptimalEps(0.0, 4.0, T=50), dl.ForwardProcess(50)
    xT = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    run = lambda loop, **kw: loop(model, fp, xT.clone(), torch.Generator().manual_seed(1), **kw)[0]
    x0 = fp.predict_x0(xT, torch.full((4,), fp.T), dl._eps(model, fp, xT, fp.T)[1])
    assert (x0.abs() > 1).float().mean() > 0.3                     # clipping is active
    ddpm = run(dl.p_sample_loop, var="beta_tilde")
    ddim = run(dl.ddim_sample_loop, steps=fp.T, eta=1.0, recompute_eps=True)
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-5)
    kept = run(dl.ddim_sample_loop, steps=fp.T, eta=1.0)
    assert (kept - ddpm).abs().max() > 0.1
    torch.testing.assert_close(
        run(dl.ddim_sample_loop, steps=10, clip=False),
        run(dl.ddim_sample_loop, steps=10, clip=False, recompute_eps=True), rtol=0, atol=1e-5)


def test_report_method_does_not_sample_the_gaussian():
    _, x = gaussian_run(dl.report_sample_loop)
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
    small, large = (dl.ffd_floor(clf, train, test, n) for n in (20, 300))
    assert small > 2 * large > 0, (small, large)
    assert dl.ffd_floor(clf, train, test, 20) == small          # seeded


def test_ffd_floor_with_a_class_mix():
    """mix draws real images in given class proportions: with the test set's own proportions it
    scores like the plain floor; with all of one class it scores far worse (the part of a sample
    set's FFD that its class proportions alone explain)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)

    def images(lo, hi):                           # 200 flat images, grey level in [lo, hi)
        level = torch.randint(lo, hi, (200, 1, 1, 1), generator=g)
        return (level + torch.randint(-10, 11, (200, 3, 16, 16), generator=g)).clamp(0, 255) \
            .to(torch.uint8)
    dark, bright = images(10, 110), images(146, 246)
    train, labels = torch.cat([dark, bright]), torch.tensor([0] * 200 + [1] * 200)
    test = dl.to_float(torch.cat([dark[:100], bright[:100]]).flip(-1))
    clf = dl.FruitClassifier(2, width=4)
    for m in clf.modules():                       # untrained, but BatchNorm set to the data's
        if isinstance(m, nn.BatchNorm2d):         # statistics so that the features vary
            m.momentum = None
    with torch.no_grad():
        clf.train()(dl.to_float(train))
    clf.eval()
    plain = dl.ffd_floor(clf, train, test, 100)
    balanced = dl.ffd_floor(clf, train, test, 100, mix=torch.tensor([50, 50]), labels=labels)
    one_class = dl.ffd_floor(clf, train, test, 100, mix=torch.tensor([100, 0]), labels=labels)
    assert one_class > 5 * max(balanced, plain), (plain, balanced, one_class)
    # the draw takes exactly the requested classes: all dark = the floor of the dark images alone
    assert dl.ffd_floor(clf, train, test, 100, repeats=1, mix=torch.tensor([100, 0]),
                        labels=labels) == dl.ffd_floor(clf, dark, test, 100, repeats=1)


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
    g = torch.Generator().manual_seed(0)
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

    def __init__(self, x0: torch.Tensor, fp: dl.ForwardProcess):
        super().__init__()
        self.x0, self.fp = x0, fp
        self.dummy = nn.Parameter(torch.zeros(()))   # one_step_eval reads the model's device

    def forward(self, x, t):
        ab = self.fp.at(self.fp.alpha_bar, t).double()
        return ((x.double() - ab.sqrt() * self.x0.double()) / (1 - ab).sqrt()).float()


def test_one_step_eval_rows_and_perfect_predictor():
    images = (_structured(4, 16, seed=3) * 255).round().to(torch.uint8)
    fp = dl.ForwardProcess(T)
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
    rep = dl.one_step_eval(net, dl.ForwardProcess(T, target="scaled_eps"), images, ts=(50,),
                           report=True, batch=4)
    assert len(rep) == len(images) and ((rep.ssim >= -1) & (rep.ssim <= 1)).all()


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


def test_gaussian_eps_fitted_to_gaussian_data_is_the_optimal_eps():
    """GaussianEps fitted to N(μ, s²·I) samples is that data's ε* (OptimalEps, written
    independently) up to the estimation error of μ and Σ from 20,000 samples: the same ε-MSE on
    fresh data within 2 % at every t, and the same ε̂ at large t (where Σ matters little)."""
    fp = dl.ForwardProcess(T)
    prior = dl.GaussianEps(gaussian_images(20_000))
    assert prior.lam.shape == (1, 48) and (prior.lam - S2).abs().max() < 0.15 * S2  # spread ±11 %
    x0, g = gaussian_images(4000, seed=1), torch.Generator().manual_seed(2)
    for t_val in (1, 50, 300, 700, 1000):
        t, eps = torch.full((len(x0),), t_val), torch.randn(x0.shape, generator=g)
        xt = fp.q_sample(x0, t, eps)
        fit, opt = prior(fp, xt, t), OptimalEps()(xt, t)
        mse_fit, mse_opt = (fit - eps).pow(2).mean(), (opt - eps).pow(2).mean()
        assert 0.98 * mse_opt < mse_fit < 1.02 * mse_opt, (t_val, mse_fit, mse_opt)
        if t_val >= 700:
            torch.testing.assert_close(fit, opt, rtol=0, atol=0.01)


def test_gaussian_eps_knows_the_covariance():
    """On correlated data (every pixel the same value + small noise) the full-covariance
    predictor beats one that knows only the mean, and on data that is one image it is exact."""
    fp, t_val = dl.ForwardProcess(50), 30
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4000, 1, 1, 1, generator=g) * 0.5 + 0.02 * torch.randn(4000, 3, 4, 4, generator=g)
    t = torch.full((4000,), t_val)
    eps = torch.randn(x0.shape, generator=g)
    xt = fp.q_sample(x0, t, eps)
    mse = (dl.GaussianEps(x0)(fp, xt, t) - eps).pow(2).mean()
    ab = fp.alpha_bar[t_val - 1]
    mean_only = ((xt - ab.sqrt() * x0.mean(0)) / (1 - ab).sqrt() - eps).pow(2).mean()
    assert mse < 0.5 * mean_only, (mse, mean_only)
    one = x0[:1].expand(100, -1, -1, -1)
    xt1 = fp.q_sample(one, t[:100], eps[:100])
    torch.testing.assert_close(dl.GaussianEps(one)(fp, xt1, t[:100]), eps[:100], rtol=0, atol=1e-4)


def test_eps_error_and_takeover_start():
    """eps_error: a network that outputs 0 has ε-MSE ≈ 1 at every t; the Gaussian predictor is
    exact on images that are all the same, and not on varied ones.
    takeover_start: the first t of the run where the Gaussian stays better to the end."""
    fp, ts = dl.ForwardProcess(50), (1, 10, 25, 50)
    flat = torch.full((8, 3, 8, 8), 200, dtype=torch.uint8)
    df = dl.eps_error(Zero(), fp, flat, dl.GaussianEps(dl.to_float(flat)), ts=ts)
    assert list(df.t) == list(ts)
    assert (df.gaussian < 1e-8).all(), df
    assert ((df.network - 1).abs() < 0.15).all(), df
    assert dl.takeover_start(df) == 1
    g = torch.Generator().manual_seed(0)
    varied = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=g)
    err = dl.eps_error(Zero(), fp, varied, dl.GaussianEps(dl.to_float(varied)), ts=ts).gaussian
    assert ((err > 1e-4) & (err < 0.1)).all(), err     # it knows 8 images' span, not the images
    table = lambda gauss, net: pd.DataFrame(dict(t=[50, 40, 30, 20, 10], gaussian=gauss, network=net))
    assert dl.takeover_start(table([1, 1, 5, 1, 1], [2, 2, 2, 2, 2])) == 40   # unordered rows
    assert dl.takeover_start(table([3, 3, 3, 3, 3], [2, 2, 2, 2, 2])) == 51   # never
    assert dl.takeover_start(table([3, 1, 1, 1, 1], [2, 2, 2, 2, 2])) == 51   # not at the end
    other = table([1, 1, 5, 1, 1], [2, 2, 2, 2, 2]).rename(columns={"gaussian": "norm_matched"})
    assert dl.takeover_start(other, "norm_matched") == 40                   # another column


def test_eps_error_of_the_norm_matched_network():
    """eps_error(norm=…): a norm_matched column, and no gaussian one without a prior. For the
    scale-blind ε* norm matching helps at large t (ε̂ ≈ x_t there) and not at small t."""
    fp = dl.ForwardProcess(T)
    images = ((gaussian_images(500) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    norm = dl.NormMatch(dl.to_float(images))
    df = dl.eps_error(ScaleBlind(norm.x0_sq), fp, images, norm=norm, ts=(100, 900)).set_index("t")
    assert list(df.columns) == ["network", "norm_matched"]
    assert df.norm_matched[900] < 0.1 * df.network[900], df
    assert df.norm_matched[100] > 0.9 * df.network[100], df
    prior = dl.GaussianEps(dl.to_float(images))
    both = dl.eps_error(ScaleBlind(norm.x0_sq), fp, images, prior, norm=norm, ts=(100, 900))
    alone = dl.eps_error(ScaleBlind(norm.x0_sq), fp, images, prior, ts=(100, 900))
    assert list(both.columns) == ["t", "network", "gaussian", "norm_matched"]
    pd.testing.assert_frame_equal(both[alone.columns], alone)
    assert np.allclose(both.norm_matched, df.norm_matched)


def test_ddim_with_a_gaussian_prior():
    """prior.start decides who gives ε̂: from start = 1 on the network is never called (DDIM with
    the prior equals DDIM driven by ε* on N(μ, s²) data); above T the prior is never used."""
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            raise AssertionError("the network was called")
    fp = dl.ForwardProcess(T)
    prior = dl.GaussianEps(gaussian_images(20_000), start=1)
    xT = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    run = lambda model, **kw: dl.ddim_sample_loop(model, fp, xT.clone(), torch.Generator(),
                                                  steps=20, **kw)[0]
    torch.testing.assert_close(run(Fails(), prior=prior), run(OptimalEps()), rtol=0, atol=0.03)
    prior.start = T + 1
    assert torch.equal(run(OptimalEps(), prior=prior), run(OptimalEps()))
    prior.start = 500
    with pytest.raises(AssertionError, match="network was called"):
        run(Fails(), prior=prior)


def test_unet_cannot_see_the_scale_of_its_input():
    """The report's U-Net: bias-free convolutions before every GroupNorm and no residual path
    in `inc`, so net(c·x, t) = net(x, t) for c > 0 (why NormMatch exists); a shift it sees."""
    torch.manual_seed(0)
    net = dl.UNet(8, 32, 2).eval()
    x, t = torch.randn(4, 3, 16, 16), torch.full((4,), 700)
    with torch.no_grad():
        out = net(x, t)
        torch.testing.assert_close(net(2.5 * x, t), out, rtol=0, atol=1e-4)
        assert (net(x + 0.3, t) - out).abs().max() > 0.01


def test_eps_skip_starts_as_the_report_unet_and_sees_the_scale():
    """skip=True (Config.eps_skip): with the report's U-Net's weights and s(t) still zero it
    gives the same ε̂, so a fine-tune starts as the model it came from; with s(t) ≠ 0 the output
    moves with ‖x_t‖: net(c·x) − net(x) = (c − 1)·s(t)·x."""
    torch.manual_seed(0)
    net, skip = dl.UNet(8, 32, 2).eval(), dl.UNet(8, 32, 2, skip=True).eval()
    missing, unexpected = skip.load_state_dict(net.state_dict(), strict=False)
    assert sorted(missing) == ["skip.1.bias", "skip.1.weight"] and not unexpected
    x, t = torch.randn(4, 3, 16, 16), torch.full((4,), 700)
    with torch.no_grad():
        torch.testing.assert_close(skip(x, t), net(x, t), rtol=0, atol=0)
        s = torch.tensor([0.5, -0.2, 1.0])
        skip.skip[1].bias.copy_(s)                              # s(t) = its bias while W = 0
        torch.testing.assert_close(skip(2.5 * x, t) - skip(x, t), 1.5 * s.view(1, 3, 1, 1) * x,
                                   rtol=0, atol=1e-4)


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


def test_norm_match_rescales_eps_by_the_inputs_norm():
    """NormMatch: E‖x0‖² of its images, and ε̂·‖x_t‖ / sqrt(ᾱ·E‖x0‖² + (1-ᾱ)·D), which makes a
    scale-blind ε̂ scale with its input again."""
    x0 = gaussian_images(20_000)
    norm = dl.NormMatch(x0)
    assert abs(norm.x0_sq.item() - 48 * (MU ** 2 + S2)) < 0.05
    fp, g = dl.ForwardProcess(T), torch.Generator().manual_seed(1)
    t, eps = torch.full((8,), 600), torch.randn(8, 3, 4, 4, generator=g)
    xt = fp.q_sample(x0[:8], t, eps)
    ab = fp.alpha_bar[599]
    want = eps * (xt.flatten(1).norm(dim=1) / (ab * norm.x0_sq + (1 - ab) * 48).sqrt()).view(-1, 1, 1, 1)
    torch.testing.assert_close(norm(fp, xt, t, eps), want)
    blind = ScaleBlind(norm.x0_sq)
    torch.testing.assert_close(blind(2 * xt, t), blind(xt, t))
    torch.testing.assert_close(norm(fp, 2 * xt, t, blind(2 * xt, t)), 2 * norm(fp, xt, t, blind(xt, t)))


def test_norm_match_stops_the_drift_of_a_scale_blind_eps():
    """Deterministic DDIM without clipping, driven by the scale-blind ε*, diverges (the starting
    noise's norm is never corrected); norm-matched it returns what ε* itself returns."""
    fp = dl.ForwardProcess(T)
    norm = dl.NormMatch(gaussian_images(20_000), start=1)
    xT = torch.randn(4000, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    run = lambda model, **kw: dl.ddim_sample_loop(model, fp, xT.clone(), torch.Generator(),
                                                  steps=50, clip=False, **kw)[0]
    opt, blind = run(OptimalEps()), run(ScaleBlind(norm.x0_sq))
    fixed = run(ScaleBlind(norm.x0_sq), norm=norm)
    assert blind.var() > 100 * opt.var()                     # measured: 180 against 0.027
    assert abs(fixed.mean() - opt.mean()) < 0.02 and abs(fixed.var() / opt.var() - 1) < 0.2
    norm.start = T + 1                                          # never used: plain DDIM
    assert torch.equal(run(ScaleBlind(norm.x0_sq), norm=norm), blind)
    norm.start = T                                              # used at the first step only
    assert not torch.equal(run(ScaleBlind(norm.x0_sq), norm=norm), blind)


def _two_blobs(n: int, w: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n 'images' (3, 2, 2): a share w of N(-0.5, 0.1²) per pixel (label 0), the rest of
    N(+0.5 + a pixel-dependent shift, 0.1²) (label 1)."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) > w).long()
    shift = torch.linspace(0, 0.2, 12).view(3, 2, 2)
    x = torch.where(labels.view(-1, 1, 1, 1) == 1, 0.5 + shift, -0.5 + 0 * shift)
    return x + 0.1 * torch.randn(n, 3, 2, 2, generator=g), labels


def _mixture_eps_dense(x0, labels, fp, xt, t_val):
    """E[ε | x_t] for the mixture of the labels' Gaussians (sample means and covariances, weights
    their shares), computed densely: Bayes over the components with torch's MultivariateNormal,
    then each component's linear estimator s·(a²Σ + s²I)⁻¹(x_t − a·μ). float64."""
    a2 = fp.alpha_bar[t_val - 1].double()
    a, s2, d = a2.sqrt(), 1 - a2, x0[0].numel()
    logp, eps = [], []
    for k in labels.unique():
        xk = x0[labels == k].flatten(1).double()
        mu, cov = xk.mean(0), torch.cov(xk.T)
        c = a2 * cov + s2 * torch.eye(d, dtype=torch.float64)
        mvn = torch.distributions.MultivariateNormal(a * mu, covariance_matrix=c)
        logp.append(mvn.log_prob(xt.flatten(1)) + (labels == k).double().mean().log())
        eps.append(s2.sqrt() * torch.linalg.solve(c, (xt.flatten(1) - a * mu).T).T)
    w = torch.stack(logp, 1).softmax(1)                                 # (B, K)
    return torch.einsum("bk,kbd->bd", w, torch.stack(eps)).view_as(xt)


def test_gaussian_eps_with_labels_is_the_mixtures_posterior_mean():
    """GaussianEps(images, labels) is the dense E[ε | x_t] of the labels' Gaussian mixture,
    including a component of 6 images (rank 5 < D = 12: padded with zero eigenvalues), and
    without labels that of one Gaussian."""
    x0, labels = _two_blobs(3000)
    few = 1.5 + 0.1 * torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    x0, labels = torch.cat([x0, few]), torch.cat([labels, torch.full((6,), 2)])
    fp = dl.ForwardProcess(T)
    prior = dl.GaussianEps(x0, labels)
    assert prior.mu.shape == (3, 3, 2, 2) and prior.V.shape == (3, 12, 12)
    assert (prior.lam[2, 5:] < 1e-9).all() and (prior.lam[2, :5] > 1e-4).all()
    xt = torch.randn(64, 3, 2, 2, generator=torch.Generator().manual_seed(1)).double()
    xt[:8] += 1.5 * fp.alpha_bar[99].sqrt()                      # some near the small component
    for t_val in (5, 100, 400, 900):
        t = torch.full((64,), t_val)
        got = prior(fp, xt.float(), t).double()
        torch.testing.assert_close(got, _mixture_eps_dense(x0, labels, fp, xt, t_val),
                                   rtol=0, atol=2e-4)
        got1 = dl.GaussianEps(x0)(fp, xt.float(), t).double()
        torch.testing.assert_close(got1, _mixture_eps_dense(x0, torch.zeros(len(x0)), fp, xt, t_val),
                                   rtol=0, atol=2e-4)


def test_ddim_with_a_mixture_prior_draws_the_components_in_their_shares():
    """DDIM (η = 0) driven by the mixture alone (start = 1: the network is never called) on
    two-blob data draws 30 % / 70 % of its samples from the blobs; one Gaussian of the same
    data puts many samples between them, where there is no data."""
    x0, labels = _two_blobs(3000)
    fp = dl.ForwardProcess(T)
    xT = torch.randn(2000, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    run = lambda prior: dl.ddim_sample_loop(Zero(), fp, xT.clone(), torch.Generator(), steps=50,
                                            prior=prior, clip=False)[0]
    m = run(dl.GaussianEps(x0, labels, start=1)).mean((1, 2, 3))      # a sample's mean pixel
    assert abs((m < 0).float().mean() - 0.3) < 0.04                    # 3.5 standard errors
    assert ((m + 0.5).abs() < 0.2).float().mean() + ((m - 0.6).abs() < 0.2).float().mean() > 0.98
    m1 = run(dl.GaussianEps(x0, start=1)).mean((1, 2, 3))
    assert (m1.abs() < 0.3).float().mean() > 0.2, (m1.abs() < 0.3).float().mean()


def test_gaussian_prior_chooses_its_start_on_held_out_images(monkeypatch):
    """With held_out, eps_error (which decides the start) sees the held-out images, not training
    images; without, n training images. The mixture has a component per label."""
    seen = []
    real = dl.eps_error
    monkeypatch.setattr(dl, "eps_error", lambda m, fp, imgs, prior, **kw:
                        seen.append(imgs) or real(m, fp, imgs, prior, ts=(10, 50), **kw))
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8, generator=g)
    held = torch.randint(0, 256, (30, 3, 4, 4), dtype=torch.uint8, generator=g)
    fp = dl.ForwardProcess(50)
    prior = dl.gaussian_prior(Zero(), fp, train, n=20, labels=torch.arange(40) % 4, held_out=held)
    assert len(prior.log_w) == 4 and torch.equal(seen[-1], held)
    dl.gaussian_prior(Zero(), fp, train, n=20)
    assert len(seen[-1]) == 20 and any(torch.equal(seen[-1][0], im) for im in train)


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
        dl.p_sample_loop(None, dl.ForwardProcess(T=10), torch.zeros(1, 3, 4, 4),
                         torch.Generator(), var="betta")


def test_sampler_sweep_from_the_command_line_is_seeded():
    """`evaluate --what sweep`: one row per (sampler, steps, seed), the ratio to the floor, and
    the same FFD again for the same seed (sampler_sweep called directly), another for another."""
    cfg = dl.get_config("smoke")
    dl.main(["evaluate", "--profile", "smoke", "--what", "sweep", "--steps", "4", "8",
             "--seeds", "0", "1"])
    sw = pd.read_csv(cfg.fig_dir() / "sampler_sweep.csv")
    assert len(sw) == 2 * 2 * 2 and sw.steps.tolist()[:4] == [4, 4, 8, 8]
    assert set(sw.sampler) == {"DDIM, Gaussian ε̂ at high t", "DDIM, η=1"}
    assert np.allclose(sw.ffd_ratio, sw.ffd / sw.ffd_floor)
    again = dl.sampler_sweep(cfg, dl.generation_model(cfg), steps=(4,), seeds=(1,), progress=False)
    first = sw[(sw.steps == 4) & (sw.seed == 1)].reset_index(drop=True)
    assert np.allclose(again.ffd, first.ffd, rtol=1e-5)
    eta1 = sw[(sw.sampler == "DDIM, η=1") & (sw.steps == 4)]
    assert eta1.ffd.nunique() == 2                                   # seeds 0 and 1 differ


def _seeds_table_from_the_command_line(what: str, by: str, variants, samplers, metrics):
    """`evaluate --what <what>` for sample seeds 0 and 1 (a _seeds_table): the real test images'
    row, then one row per (sampler, variant in column `by`, seed) with the ratio to the floor and
    the SSIM to the training set, and its figure; `metrics` called directly gives the same FFD
    again for seed 1. Returns (the rows but the first, {(sampler, variant): samples of seed 1})."""
    cfg = dl.get_config("smoke")
    table, fig = {"mixture": ("generation_mixture", "mixture_ffd"),
                  "norm": ("generation_norm", "norm_ffd")}[what]
    (cfg.fig_dir() / f"{fig}.png").unlink(missing_ok=True)
    dl.main(["evaluate", "--profile", "smoke", "--what", what, "--seeds", "0", "1"])
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


def test_mixture_table_from_the_command_line_is_seeded():
    """`evaluate --what mixture`: a start for every prior but 'network only', and a prior used
    changes the samples."""
    d, samples = _seeds_table_from_the_command_line("mixture", "prior", dl.MIXTURE_PRIORS,
                                                    dl.MIXTURE_SAMPLERS, dl.mixture_metrics)
    T = dl.get_config("smoke").T
    net = d.prior == "network only"
    assert d[net].from_t.isna().all() and d[~net].from_t.between(1, T + 1).all()
    assert (d[~net].from_t <= T).any()                       # some prior is used (checked below)
    for (name, prior), x in samples.items():
        if prior != "network only" and d[d.prior == prior].from_t.iloc[0] <= T:
            assert not torch.equal(x, samples[(name, "network only")]), (name, prior)


def test_norm_table_from_the_command_line_is_seeded():
    """`evaluate --what norm`: a start only for the norm-matched rows, and each variant changes
    the samples."""
    d, samples = _seeds_table_from_the_command_line("norm", "variant", dl.NORM_VARIANTS,
                                                    dl.NORM_SAMPLERS, dl.norm_metrics)
    T = dl.get_config("smoke").T
    matched = d.variant.str.startswith("norm-matched")
    assert d[~matched].from_t.isna().all() and (d[matched].from_t <= T).all()   # used: below
    for a, b in (("x̂0 clipped", "not clipped"), ("not clipped", "norm-matched, not clipped"),
                 ("norm-matched, not clipped", "norm-matched, ε̂/1.005, not clipped")):
        assert not torch.equal(samples[("DDIM-20", a)], samples[("DDIM-20", b)]), (a, b)


def test_finetune_table_from_the_command_line(monkeypatch):
    """`evaluate --what finetune`: the real test images' row, then one row per (model, sampler,
    variant, seed), every model scored with --profile's classifier (one floor), and its figure,
    and the ε-MSE by t of each model and of the per-segment mixture;
    the same model twice scores the same, and s(t) ≠ 0, preconditioning (each model is sampled
    with its own config's ForwardProcess) or not clipping changes the samples."""
    cfg = dl.get_config("smoke")
    (cfg.fig_dir() / "finetune_ffd.png").unlink(missing_ok=True)
    monkeypatch.setattr(dl, "FT_PROFILES", {"a": "smoke", "b": "smoke"})
    dl.main(["evaluate", "--profile", "smoke", "--what", "finetune", "--seeds", "0", "1"])
    df = pd.read_csv(cfg.fig_dir() / "generation_finetune.csv")
    assert df.sampler[0] == "real: test images" and len(df) == 1 + 2 * 2 * 2 * 2
    d = df.iloc[1:]
    assert set(d.model) == {"a", "b"} and set(d.variant) == set(dl.FT_VARIANTS)
    assert set(d.sampler) == set(dl.NORM_SAMPLERS) and d.ffd_floor.nunique() == 1
    assert np.allclose(d.ffd_ratio, d.ffd / d.ffd_floor)
    assert np.allclose(d[d.model == "a"].ffd, d[d.model == "b"].ffd)
    assert (cfg.fig_dir() / "finetune_ffd.png").exists()
    err = pd.read_csv(cfg.fig_dir() / "finetune_eps_error.csv")
    assert list(err.columns) == ["t", "a", "b", dl.FT_MIXTURE] and tuple(err.t) == dl.FT_EPS_T
    assert np.allclose(err.a, err.b) and (err[["a", dl.FT_MIXTURE]] > 0).all().all()
    assert not np.allclose(err.a, err[dl.FT_MIXTURE])
    base = dl.generation_model(cfg)
    skip = dl.UNet(cfg.width, cfg.time_dim, cfg.heads, skip=True).eval().requires_grad_(False)
    skip.load_state_dict(base.state_dict(), strict=False)
    skip.skip[1].bias.fill_(0.1)
    pre = dataclasses.replace(cfg, sigma_data=0.7)              # the same weights, preconditioned
    again, x = dl.finetune_metrics(cfg, {"a": (base, cfg), "s": (skip, cfg), "p": (base, pre)},
                                   seeds=(0,), progress=False)
    assert np.allclose(again[again.model == "a"].ffd, d[(d.model == "a") & (d.seed == 0)].ffd,
                       rtol=1e-5)
    for other in ("s", "p"):
        assert not torch.equal(x[("a", "DDIM-20", "x̂0 clipped")],
                               x[(other, "DDIM-20", "x̂0 clipped")]), other
    assert not torch.equal(x[("a", "DDIM-20", "x̂0 clipped")], x[("a", "DDIM-20", "not clipped")])


def test_classifier_does_not_depend_on_the_callers_rng():
    """train_classifier seeds before it builds the network, so its weights (and every FFD) are
    the same whatever used the global RNG before it (it used to build the network first)."""
    cfg = dl.get_config("smoke")
    path = dl.ROOT / "runs" / cfg.profile / "classifier.pt"
    weights = []
    for s in (1, 2):
        path.unlink(missing_ok=True)
        torch.manual_seed(s)
        weights.append(dl.train_classifier(cfg, progress=False)[0].state_dict())
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
    fp = dl.ForwardProcess(T)
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
    xT, x, z = _literal_run(dl.report_first_loop, model)
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
    fp = dl.ForwardProcess(T)
    xT, x, z = _literal_run(dl.report_sample_loop, ScaledOptimalEps(), decode="report")
    _, ab = linear_alpha_bar()
    s = dl.ForwardProcess.report_scaler(torch.arange(1, T + 1)).numpy()
    ref = xT
    for i, t in enumerate(range(T, 0, -1)):
        out = _out_coef(t, True) * (ref - np.sqrt(ab[t - 1]) * MU)
        x0 = np.clip(np.float32(s[t - 1]) * (ref - out), -1, 1)
        ref = np.sqrt(ab[t - 2]) * x0 + np.sqrt(1 - ab[t - 2]) * z[i] if t > 1 else x0
    np.testing.assert_allclose(x, ref, rtol=0, atol=2e-4)
    _, x_eps, _ = _literal_run(dl.report_sample_loop, ScaledOptimalEps())
    assert np.abs(x - x_eps).max() > 0.01
    with pytest.raises(ValueError, match="decode"):
        dl.report_sample_loop(OptimalEps(), fp, torch.zeros(1, 1, 2, 2), torch.Generator(),
                              decode="other")


def test_figure5_samples_every_set_from_the_same_seed(tmp_path, monkeypatch):
    """figure5 on two freshly trained smoke fold models (T = 50): one set per FIG5_SAMPLERS row
    plus the real images' row, each kept t recorded, and the same seed gives the same sets."""
    monkeypatch.setattr(dl, "ROOT", tmp_path)
    cfg = dl.get_config("smoke", data_dir=str(dl.Path(__file__).resolve().parents[1] / "runs" /
                                               "smoke" / "data"), T=50, max_epochs=1)
    for target in ("eps", "scaled_eps"):
        dl.train(dataclasses.replace(cfg, target=target), 0, progress=False)
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
    fig = dl.plot_figure5(xs, trajs, n_show=3)
    assert len(fig.axes) == 3 * len(xs)
