"""Fidelity and coverage of samples (issue 46): precision (Kynkäänniemi et al. 2019), density and
coverage (Naeem et al. 2020) on k-nearest-neighbour balls of real features. First exact oracles
on hand-computable point sets; then, on the real images with the committed classifier, each
measure must fall for what it should see, by a stated margin below its real-vs-real floor."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import ddpm_cli as cli
import ddpm_lib as dl
from conftest import real_subset


# -----------------------------------------------------------------------------------------------
# exact oracles: ten real points at 0, 1, …, 9 on a line, k = 2. The k-NN radius is 2 at the ends
# (0's neighbours are 1 and 2) and 1 inside (i's are i − 1 and i + 1).

LINE = torch.arange(10.0).unsqueeze(1)


def test_the_k_nn_radius_on_a_line():
    """The ball of each real point reaches its k-th nearest other point: a fake at 2 lies in the
    balls of 0 (radius 2), 1, 2 and 3; one at 0.5 in those of 0 and 1 only."""
    s = dl.precision_coverage(LINE, torch.tensor([[2.0]]), k=2)
    assert s["density"] == 4 / 2 and s["coverage"] == 4 / 10
    assert dl.precision_coverage(LINE, torch.tensor([[0.5]]), k=2)["coverage"] == 2 / 10


def test_identical_sets_score_one():
    """Fakes = reals: every fake on the manifold, every ball holding one; each real ball holds its
    own point and its k neighbours, so density is (k + 1)/k."""
    s = dl.precision_coverage(LINE, LINE.clone(), k=2)
    assert s == dict(precision=1.0, density=3 / 2, coverage=1.0)


def test_a_far_set_scores_zero():
    assert dl.precision_coverage(LINE, LINE + 100, k=2) == dict(precision=0.0, density=0.0,
                                                               coverage=0.0)


def test_one_point_repeated_keeps_precision_and_collapses_coverage():
    """Ten copies of the real point 0: all on the manifold (precision 1), each in the balls of 0
    and 1 (density 2/k = 1), which are 2 of the 10 (coverage 0.2)."""
    s = dl.precision_coverage(LINE, torch.zeros(10, 1), k=2)
    assert s == dict(precision=1.0, density=1.0, coverage=0.2)


def test_half_the_fakes_off_the_manifold():
    """Fakes at 0…4 and 100…104: half on the manifold; they hit the balls of 0…5 (4 is within 1 of
    5); the five on it lie in 2, 3, 4, 3, 3 balls."""
    fake = torch.cat([LINE[:5], LINE[:5] + 100])
    s = dl.precision_coverage(LINE, fake, k=2)
    assert s == dict(precision=0.5, density=15 / 20, coverage=0.6)


@pytest.mark.parametrize("real, fake", [(LINE[:2], LINE), (LINE, LINE[:0])],
                         ids=["no k-th neighbour", "no fakes"])
def test_undefined_cases_are_nan(real, fake):
    assert all(np.isnan(v) for v in dl.precision_coverage(real, fake, k=2).values())


def test_quality_scores_the_manifold_from_its_minimum_n():
    """quality gives precision, density and coverage to a set of MANIFOLD_MIN_N images and NaN,
    printed "n/a (n = …)", to one fewer; the reference needs more than MANIFOLD_K images."""
    torch.manual_seed(0)
    clf = dl.FruitClassifier(3, width=4).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(dl.MANIFOLD_MIN_N, 3, 16, 16, generator=g) * 2 - 1
    ref = dl.classify(clf, torch.rand(dl.MANIFOLD_K + 50, 3, 16, 16, generator=g) * 2 - 1)[0]
    at = dl.quality(clf, x, ref, None, 3, ffd=False)
    below = dl.quality(clf, x[1:], ref, None, 3, ffd=False)
    assert all(0 <= at[m] for m in dl.MANIFOLD) and at["precision"] > 0
    assert all(np.isnan(below[m]) for m in dl.MANIFOLD)
    assert dl.n_text(below["coverage"], below["n"]) == f"n/a (n = {dl.MANIFOLD_MIN_N - 1})"


def test_floors_sit_beside_their_measures_at_each_rows_n():
    """add_floors: ffd_floor, ffd_floor_std, ffd_ratio and ffd_ratio_std after ffd_std, and
    `<measure>_floor` after each manifold measure, each at the row's own n (ffd_floor's and
    manifold_floor's), NaN on a row without the measure; the ratio's spread combines the set's
    bootstrap std and the floor's std (ratio_spread)."""
    torch.manual_seed(0)
    clf = dl.FruitClassifier(3, width=4).eval()
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, 256, (300, 3, 16, 16), dtype=torch.uint8, generator=g)
    ref = dl.classify(clf, dl.to_float(train[:dl.MANIFOLD_K + 20]))[0]
    df = pd.DataFrame(dict(n=[100, 150, 40], ffd=[3.0, 2.0, np.nan], ffd_std=[0.3, 0.1, np.nan],
                           precision=[0.5, 0.6, np.nan], density=[0.4, 0.5, np.nan],
                           coverage=[0.3, 0.2, np.nan]))
    df = dl.add_floors(df, clf, train, ref)
    assert list(df.columns) == ["n", "ffd", "ffd_std", "ffd_floor", "ffd_floor_std", "ffd_ratio",
                                "ffd_ratio_std", "precision", "precision_floor", "density",
                                "density_floor", "coverage", "coverage_floor"]
    for i, n in ((0, 100), (1, 150)):
        floor, man = dl.ffd_floor(clf, train, ref, n), dl.manifold_floor(clf, train, ref, n)
        assert (df.ffd_floor[i], df.ffd_floor_std[i]) == floor
        assert df.ffd_ratio[i] == df.ffd[i] / floor[0]
        rel = np.hypot(df.ffd_std[i] / df.ffd[i], floor[1] / floor[0])
        assert df.ffd_ratio_std[i] == pytest.approx(df.ffd_ratio[i] * rel)
        assert df.ffd_ratio_std[i] > df.ffd_std[i] / floor[0]     # more than the bootstrap alone
        assert all(df[f"{m}_floor"][i] == man[m][0] for m in dl.MANIFOLD)
    assert df.iloc[2].drop("n").isna().all()


# -----------------------------------------------------------------------------------------------
# the real images, the committed classifier (cpu profile), at k = MANIFOLD_K against every test
# image. Measured at n = 500 (the floor: precision 0.97, coverage 0.99): blurred 0.38 / 0.28,
# colours shifted 0.07 / 0.03, noise 0.00 / 0.00, one image repeated 1.00 / 0.04; the drifting
# DDIM-50 at n = 100: 0.07 / 0.01 (floor at n = 100: 0.97 / 0.90).

N = dl.EVAL["cpu"]["n_samples"]                  # the one n of FFD (500)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real subset indexed into a temporary root that sees the committed checkpoints: its cpu
    config, the committed classifier, the training images (uint8), every test image's features,
    n seeded real training images (seed 99, apart from the floor's draws) and the floor at n."""
    if not (real_subset() / "Training").is_dir():
        pytest.skip(f"the real Fruits-360 subset is not at {real_subset()} (FRUITS360_DIR)")
    root = tmp_path_factory.mktemp("real")
    cli.prepare_data(real_subset(), out=root / "data")
    (root / "data" / "checkpoints").symlink_to(dl.ROOT / "data" / "checkpoints")
    cfg = dl.get_config("cpu", root=str(root))
    if not dl.classifier_path(cfg).exists():
        pytest.fail(f"{dl.classifier_path(cfg)} is committed but missing: restore it with "
                    f"`git checkout -- data/checkpoints/{dl.classifier_path(cfg).name}`")
    _, train_ds, test_imgs, clf, _ = dl.scoring_setup(cfg, progress=False)
    train, f_test = train_ds.images, dl.classify(clf, dl.to_float(test_imgs))[0]
    fresh = dl.to_float(train[torch.randperm(len(train),
                                             generator=torch.Generator().manual_seed(99))[:N]])
    return dict(cfg=cfg, clf=clf, train=train, f_test=f_test, fresh=fresh,
                floor=dl.manifold_floor(clf, train, f_test, N))


def score(real: dict, x: torch.Tensor) -> dict:
    """precision_coverage of images x against every test image."""
    return dl.precision_coverage(real["f_test"], dl.classify(real["clf"], x)[0])


def test_real_images_score_near_one_and_a_fresh_draw_sits_at_the_floor(real):
    """The floor (5 draws of N training images) is near 1 on precision and coverage, and another
    draw of N real images scores within 0.1 of it: the margins below are not the estimator's
    noise."""
    floor, s = real["floor"], score(real, real["fresh"])
    assert floor["precision"][0] >= 0.95 and floor["coverage"][0] >= 0.95
    assert all(abs(s[m] - floor[m][0]) <= 0.1 for m in ("precision", "coverage"))


def blurred(x):
    from torchvision.transforms.v2.functional import gaussian_blur
    return gaussian_blur(x, kernel_size=5, sigma=1.5)


def colour_shifted(x):
    return (x + torch.tensor([0.4, 0.0, -0.4]).view(1, 3, 1, 1)).clamp(-1, 1)


def noise(x):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)


def one_image_repeated(x):
    return x[:1].expand_as(x).clone()


# name → (what to do to the real images, the least drop below the floor of precision and of
# coverage; a negative margin: the most it may drop)
DAMAGE = {"blurred": (blurred, 0.4, 0.4), "colour-shifted": (colour_shifted, 0.6, 0.6),
          "pure noise": (noise, 0.9, 0.9), "one image repeated": (one_image_repeated, -0.05, 0.8)}


@pytest.mark.parametrize("name", DAMAGE)
def test_damaged_real_images_fall_below_the_floor(real, name):
    """Blurred, colour-shifted and noise images leave the real manifold (precision and coverage
    fall); one image repeated N times stays on it (precision within 0.05 of the floor) but covers
    almost nothing: coverage must collapse."""
    damage, drop_p, drop_c = DAMAGE[name]
    s, floor = score(real, damage(real["fresh"])), real["floor"]
    assert s["precision"] <= floor["precision"][0] - drop_p, (name, s)
    assert s["coverage"] <= floor["coverage"][0] - drop_c, (name, s)


def test_the_drifting_ddim_samples_fall_below_the_floor(real):
    """The report's U-Net sampled with DDIM-50 unclipped (its GEN_SAMPLERS row, seed 0), which
    drifts: at n = 100 precision and coverage are each at least 0.6 below the floor at n = 100."""
    n = 100
    key, method, kw = dl.GEN_SAMPLERS["DDIM-50 (η = 0), report's U-Net"]
    model, fp = dl.story_models(real["cfg"])[key]
    x, _ = dl.sample(model, fp, method, n, real["cfg"].image_size, seed=0, progress=False, **kw)
    s = score(real, x)
    floor = dl.manifold_floor(real["clf"], real["train"], real["f_test"], n)
    assert s["precision"] <= floor["precision"][0] - 0.6, s
    assert s["coverage"] <= floor["coverage"][0] - 0.6, s


def test_the_report_tables_show_precision_and_coverage_beside_their_floors(tmp_path):
    """The generation and guidance tables of the report get precision and coverage, each with
    its floor, after the FFD columns; the generation rows' fields carry them ("n/a" where not
    scored)."""
    gen = pd.DataFrame([dict(sampler=s, n=n, ffd=2.0, ffd_floor=1.0, ffd_ratio=2.0, precision=p,
                             precision_floor=0.97, coverage=c, coverage_floor=0.99, kid=0.1,
                             recognizability=0.9, classifier_test_acc=1.0)
                        for s, n, p, c in (("DDIM-50 (η = 0), preconditioned", 500, 0.56, 0.92),
                                           ("DDPM-1000, preconditioned", 16, np.nan, np.nan))])
    gd = pd.DataFrame([dict(set="real: test images", w=np.nan, n=500, accuracy=np.nan,
                            ffd=np.nan, ffd_vs_unconditional=np.nan, precision=np.nan,
                            precision_floor=np.nan, coverage=np.nan, coverage_floor=np.nan,
                            recognizability=1.0, nn_ssim_max=0.9),
                       dict(set="unconditional model", w=np.nan, n=500, accuracy=np.nan, ffd=2.0,
                            ffd_vs_unconditional=1.0, precision=0.5, precision_floor=0.97,
                            coverage=0.9, coverage_floor=0.99, recognizability=0.8,
                            nn_ssim_max=0.8),
                       dict(set="conditional model", w=1.0, n=500, accuracy=0.9, ffd=2.2,
                            ffd_vs_unconditional=1.1, precision=0.6, precision_floor=0.97,
                            coverage=0.8, coverage_floor=0.99, recognizability=0.9,
                            nn_ssim_max=0.8)]).assign(min_class_accuracy=0.5, kid=0.1,
                                                      kid_vs_unconditional=1.0, steps=50,
                                                      n_per_class=50, classifier_test_acc=1.0)
    dl.write_csv(gen, tmp_path / "generation_metrics.csv")
    dl.write_csv(gd, tmp_path / "guidance.csv")
    f = cli._report_fields(tmp_path)
    for table, ffd in (("generation_table", "ffd_ratio"),
                       ("guidance_table", "ffd_vs_unconditional")):
        names = [h.strip() for h in f[table].splitlines()[0].split("|") if h.strip()]
        assert names[names.index(ffd) + 1:][:5] == [*cli.MANIFOLD_COLUMNS, "kid"], table
    assert (f["ddim50_gen_precision"], f["ddim50_gen_coverage_floor"]) == ("0.56", "0.99")
    assert f["ddpm_gen_coverage"] == "n/a" and f["manifold_k"] == str(dl.MANIFOLD_K)
