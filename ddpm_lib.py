"""
Denoising Diffusion Probabilistic Models on Fruits-360 — the one module the notebooks import.

It reproduces, and corrects, a course report that trained a DDPM with a custom U-Net on
Fruits-360 (5-fold training, one-step SSIM at t = 50…1000, generation experiments). Read top to
bottom it follows the method: settings → diffusion → U-Net → the report's own versions → data →
training → evaluation → generation → sample quality → plotting → files.

Where the papers' equations live (x in [-1, 1], t = 1..T)
  Eq. 4 [DDPM]: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (the report's Eq. 3)   Diffusion.q_sample
  ε̂ from the network's output (ε, scaled ε, or preconditioned)    Diffusion.eps_from_output, eps_hat
  Eq. 15: x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t                            Diffusion.predict_x0
  Eqs. 6–7: the posterior q(x_{t−1} | x_t, x0)                     Diffusion.q_posterior
  Algorithm 1: one training step on ‖ε − ε_θ(x_t, t)‖²            diffusion_loss, optimizer_step
  Algorithm 2: one sampling step                                   p_sample
  [DDIM] Eq. 12: one DDIM step (η = 0: deterministic)              ddim_step
  any step from x_T to x_0, keeping the trajectory                 sample_loop, sample
  [CFG] classifier-free guidance                                   Guided
  [EDM] Table 1: preconditioning, ε̂ = c_skip·x_t + c_out·F        Diffusion (sigma_data > 0)
  the report's target √(1−ᾱ_t)·ε                                   Diffusion (target='scaled_eps')
  the report's Eq. 5 scaler and its one-step decoding              report_scaler, report_x0
  the report's two samplers (its Sections 4–5)                     report_step, report_first_step
  the report's Table 1 protocol                                    one_step_eval, table1

Config.target switches between the corrected method ('eps': the network predicts ε, the noise
of Eq. 4) and the report's ('scaled_eps': it predicts √(1−ᾱ_t)·ε, decoded with Eq. 5).

Every number here is computed in fp32 unless a caller asks otherwise (sample's bf16); training
picks its precision by measuring (ddpm_train.speed_choice), and nothing else does. Companion
modules hold the rest: ddpm_io.py (files written whole, model files read safely), and what the
notebooks never call, ddpm_train.py (the training run: checkpoints, resuming, torchrun, SLURM,
speed measurement) and ddpm_cli.py (`python -m ddpm_cli …`, the data command's download and
unpacking, the fruit classifier's training, the report writer).

References
  [DDPM]  J. Ho, A. Jain, P. Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020.
  [DDIM]  J. Song, C. Meng, S. Ermon. Denoising Diffusion Implicit Models. ICLR 2021.
  [IDDPM] A. Nichol, P. Dhariwal. Improved Denoising Diffusion Probabilistic Models. ICML 2021.
  [EDM]   T. Karras, M. Aittala, T. Aila, S. Laine. Elucidating the Design Space of
          Diffusion-Based Generative Models. NeurIPS 2022 (preconditioning, Table 1).
  [MinSNR] T. Hang et al. Efficient Diffusion Training via Min-SNR Weighting Strategy. ICCV 2023.
  [CFG]   J. Ho, T. Salimans. Classifier-Free Diffusion Guidance. NeurIPS 2021 Workshop.
  [SSIM]  Z. Wang et al. Image quality assessment: from error visibility to structural
          similarity. IEEE TIP 2004 (computed as scikit-image's structural_similarity).
  Data:   H. Mureșan, M. Oltean. Fruit recognition from images using deep learning. 2018
          (Fruits-360, CC BY-SA 4.0).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm_io import (atomic_path, load_checkpoint, load_state, save_checkpoint, to_markdown,
                     write_csv)

# -----------------------------------------------------------------------------------------------
# settings: one Config per run, the profiles, the device


ROOT = Path(__file__).resolve().parent          # the repository: Config.root's default
SUBSET_CLASSES = ("Apple Golden 1", "Banana 1", "Grape White 1", "Kiwi 1", "Lemon 1", "Mango 1",
                  "Orange 1", "Pineapple 1", "Strawberry 1", "Tomato 1")


@dataclass
class Config:
    """Every setting of a run. A checkpoint stores it; resuming with another one is refused."""
    profile: str = "cpu"
    root: str = ""                  # where data/, runs/ and figures/ are ('': the repository)
    data_dir: str = "data"          # holds index.csv and fruits-360/ (relative to root)
    image_size: int = 32            # training resolution (the dataset's images are 100×100)
    width: int = 32                 # channels of the U-Net's first level (the report: 32)
    time_dim: int = 256             # sinusoidal time-embedding size
    heads: int = 4                  # attention heads at the bottleneck
    sigma_data: float = 0.0         # > 0: EDM preconditioning (Diffusion; not the report's)
    T: int = 1000                   # diffusion steps (the report: 1000)
    beta_1: float = 1e-3            # linear schedule ends (the report: 0.001 → 0.02)
    beta_T: float = 0.02
    schedule: str = "linear"        # 'linear' (the report) or 'cosine' [IDDPM]
    target: str = "eps"             # 'eps' (corrected) or 'scaled_eps' (report-faithful)
    split: str = "grouped"          # 'grouped' (leakage-free folds) or 'random' (the report's)
    batch_size: int = 64
    lr: float = 2e-4                # Adam, the report's (the peak, with a schedule)
    lr_warmup: int = 0              # steps of linear learning-rate warm-up (not the report's)
    lr_decay: str = "constant"      # 'constant' (the report) or 'cosine': to 0 at max_epochs
    min_snr_gamma: float = 0.0      # > 0: min-SNR-γ loss weighting [MinSNR] (not the report's)
    weight_decay: float = 1e-6
    max_epochs: int = 40            # the report's cap
    patience: int = 5               # early stopping on the validation loss (the report's)
    init: str = ""                  # a profile whose committed weights of the same run start
                                    # training (fine-tuning at another size); '': from scratch
    steps_per_epoch: int = 0        # 0: one pass over the training images
    val_images: int = 0             # 0: all validation images
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    flip: bool = True               # random horizontal flips
    bf16: bool | None = None        # training in bf16 autocast; None: measured (ddpm_train)
    channels_last: bool | None = None   # training in channels_last; None: measured too
    seed: int = 0
    snapshot_every: int = 0         # > 0: keep the EMA weights of every this many epochs
    n_classes: int = 0              # > 0: class-conditional, with a null class [CFG]
    p_uncond: float = 0.1           # conditional: share of training labels dropped to null

    def __post_init__(self):
        check_settings(dataclasses.asdict(self), whole=True)

    @property
    def home(self) -> Path:
        """The folder that data_dir, runs/, figures/ and data/checkpoints/ are relative to."""
        return Path(self.root) if self.root else ROOT

    def run_name(self, fold) -> str:
        """A run's subfolder, the same under runs/<profile>/ and data/checkpoints/runs/<profile>/."""
        name = ("all" if fold == "all" else f"fold{int(fold)}") + "_cond" * bool(self.n_classes)
        return f"{self.target}-{self.split}/{name}"

    def run_dir(self, fold) -> Path:
        return self.home / "runs" / self.profile / self.run_name(fold)

    def fig_dir(self) -> Path:
        """Where this profile's figures and tables go. The committed ones (figures/ for cpu,
        figures/<profile>/ for any other: native → figures/native/) have one writer: `make
        figures`, which sets DDPM_COMMIT_RESULTS=1 (commit_results). Any other run writes to
        runs/<profile>/figures (git-ignored) and says so once. The smoke profile always writes to
        runs/smoke/figures and smoke-native to runs/smoke/figures/native (tests and CI)."""
        smoke = self.home / "runs" / "smoke" / "figures"
        if self.profile in ("smoke", "smoke-native"):
            d = smoke if self.profile == "smoke" else smoke / "native"
        elif commit_results():
            d = self.committed_dir()
        else:
            d = self.home / "runs" / self.profile / "figures"
            if d not in _SCRATCH_SAID:
                _SCRATCH_SAID.add(d)
                print(f"note: results of this run go to {d} (scratch, not committed); only `make "
                      f"figures` (DDPM_COMMIT_RESULTS=1) writes {self.committed_dir()}")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def committed_dir(self) -> Path:
        """The committed figures and tables of this profile: figures/ for cpu, else
        figures/<profile>/ (read by the report; written only when commit_results())."""
        return self.home / "figures" / ("" if self.profile == "cpu" else self.profile)


_SCRATCH_SAID: set = set()                       # the scratch folders already announced


def commit_results() -> bool:
    """True when DDPM_COMMIT_RESULTS=1 (the Makefile's figures, train, notebooks and report
    targets export it): tables and figures then go to the committed figures/."""
    return os.environ.get("DDPM_COMMIT_RESULTS", "") == "1"


# Settings that may differ when a run is resumed (everything else must match the checkpoint);
# lr: a run that diverged continues with a lower one (its history's lr column records it).
RESUMABLE_KEYS = {"max_epochs", "patience", "profile", "snapshot_every", "root", "lr"}


# The one range check of every setting (issue 45): Config (so get_config and dataclasses.replace),
# the command line's --set and flags, and the notebooks' parameters cells (check_params) use it.
# A rule: ("int", lo, hi), ("float", lo, hi, lo_open), ("choice", values), ("bool", none_ok), ("str",)
BIG = 10**9
SETTING_RULES = {
    "profile": ("choice", "PROFILES"), "root": ("str",), "data_dir": ("str",),
    "image_size": ("int", 8, 1024), "width": ("int", 1, 1024), "time_dim": ("int", 2, 8192),
    "heads": ("int", 1, 64), "sigma_data": ("float", 0.0, 100.0, False),
    "T": ("int", 2, 100_000), "beta_1": ("float", 0.0, 1.0, True),
    "beta_T": ("float", 0.0, 1.0, True), "schedule": ("choice", ("linear", "cosine")),
    "target": ("choice", ("eps", "scaled_eps")), "split": ("choice", ("grouped", "random")),
    "batch_size": ("int", 1, 65_536), "lr": ("float", 0.0, 0.1, True),
    "lr_warmup": ("int", 0, BIG), "lr_decay": ("choice", ("constant", "cosine")),
    "min_snr_gamma": ("float", 0.0, 1e4, False), "weight_decay": ("float", 0.0, 1.0, False),
    "max_epochs": ("int", 1, 100_000), "patience": ("int", 1, 100_000),
    "init": ("choice", "PROFILES+''"), "steps_per_epoch": ("int", 0, BIG),
    "val_images": ("int", 0, BIG), "ema_decay": ("float", 0.0, 1.0, False),
    "grad_clip": ("float", 0.0, 1e6, True), "flip": ("bool", False), "bf16": ("bool", True),
    "channels_last": ("bool", True), "seed": ("int", 0, 2**63 - 1),
    "snapshot_every": ("int", 0, 100_000), "n_classes": ("int", 0, 100_000),
    "p_uncond": ("float", 0.0, 1.0, False),
}


def _rule_text(rule) -> str:
    kind = rule[0]
    if kind == "int":
        return (f"a whole number ≥ {rule[1]:,}" if rule[2] == BIG else
                f"a whole number in [{rule[1]:,}, {rule[2]:,}]")
    if kind == "float":
        return f"a number in {'(' if rule[3] else '['}{rule[1]:g}, {rule[2]:g}]"
    if kind == "choice":
        return "one of " + ", ".join(repr(c) for c in _choices(rule))
    if kind == "bool":
        return "True or False" + (" (or None: measured)" if rule[1] else "")
    return "text"


def _choices(rule) -> tuple:
    if rule[1] == "PROFILES":
        return tuple(sorted(PROFILES))
    if rule[1] == "PROFILES+''":
        return ("", *sorted(PROFILES))
    return tuple(rule[1])


def check_setting(name: str, value, rules: dict | None = None):
    """One setting against its rule (SETTING_RULES): the value, or a ValueError of one line that
    names the setting, its value and its allowed range."""
    import numbers
    rules = SETTING_RULES if rules is None else rules
    if name not in rules:
        raise ValueError(f"{name} is not a setting here: choose one of {', '.join(rules)}")
    rule, kind = rules[name], rules[name][0]
    ok = True
    if kind == "int":
        ok = (isinstance(value, numbers.Integral) and not isinstance(value, bool)
              and rule[1] <= value <= rule[2])
    elif kind == "float":
        ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
              and math.isfinite(value) and (rule[1] < value if rule[3] else rule[1] <= value)
              and value <= rule[2])
    elif kind == "choice":
        ok = isinstance(value, str) and value in _choices(rule)
    elif kind == "bool":
        ok = isinstance(value, bool) or (rule[1] and value is None)
    elif kind == "str":
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"{name} = {value!r} is out of range: it must be {_rule_text(rule)}")
    return value


def check_settings(settings: dict, whole: bool = False) -> dict:
    """check_setting of each item; whole=True (a complete Config) also checks the settings that
    depend on each other. Returns settings."""
    for k, v in settings.items():
        if k in SETTING_RULES or not whole:        # a new Config field without a rule yet passes
            check_setting(k, v)                    # (test_every_setting_has_a_rule says so)
    if whole:
        s = settings
        if not s["beta_1"] < s["beta_T"]:
            raise ValueError(f"beta_1 = {s['beta_1']!r} and beta_T = {s['beta_T']!r}: the noise "
                             f"schedule must rise, beta_1 < beta_T")
        if (4 * s["width"]) % s["heads"]:
            raise ValueError(f"heads = {s['heads']} must divide the attention's 4 × width = "
                             f"{4 * s['width']} channels: choose heads among "
                             f"{[h for h in range(1, 9) if (4 * s['width']) % h == 0]}")
        if s["time_dim"] % 2:
            raise ValueError(f"time_dim = {s['time_dim']} must be even (sines and cosines)")
    return settings


# The notebooks' parameters cells (papermill -p NAME VALUE): each notebook's second cell calls
# check_params(...) with its own, so a bad value stops there in one line, not in a later cell.
PARAM_RULES = {
    "PROFILE": ("choice", "PROFILES+None"), "SEED": SETTING_RULES["seed"],
    "IMAGE": ("int", 0, 7),                       # an index into eval_images(cfg, n=8)
    **{k: ("int", 1, BIG) for k in ("N_EVAL", "N_NATIVE", "N_SAMPLES", "N_REPORT", "N_FIG5",
                                    "N_GRID", "N_PROG", "N_PER_CLASS")},
    "N_FIG5_NATIVE": ("int", 0, BIG),             # 0: only the committed run's (make figures)
}


def check_params(**params) -> dict:
    """A notebook's parameters, checked: e.g. check_params(PROFILE=PROFILE, SEED=SEED,
    N_EVAL=N_EVAL). SEED a whole number ≥ 0, IMAGE in [0, 7], every N_* a whole number ≥ 1 (0
    is refused, never replaced by a default) but N_FIG5_NATIVE ≥ 0 (0: none of one's own).
    Raises a one-line ValueError naming the parameter, its value and its range; returns
    params."""
    for k, v in params.items():
        if k == "PROFILE":
            if v is not None and v not in PROFILES:
                raise ValueError(f"PROFILE = {v!r} is out of range: it must be None (DDPM_PROFILE) "
                                 f"or one of {', '.join(repr(p) for p in sorted(PROFILES))}")
            continue
        check_setting(k, v, PARAM_RULES)
    return params


# Settings of speed only (precision and memory layout): check_config passes them by default, and
# a resumed run keeps the checkpoint's (train).
SPEED_KEYS = {"bf16", "channels_last"}


# Profiles name a scale: the data, the network's size and how long it trains.
PROFILES = {
    # synthetic fruit, a tiny model, a few steps: seconds. For tests and nbval in CI.
    "smoke": dict(data_dir="runs/smoke/data", image_size=16, width=8, time_dim=32, heads=2,
                  batch_size=16, max_epochs=2, steps_per_epoch=3, val_images=32, bf16=False,
                  channels_last=False),
    # the real 10-class subset at 32×32 under the report's protocol (≤ 40 epochs, patience 5).
    "cpu": dict(image_size=32, width=32, batch_size=32),
    # the report's setup: 100×100, 40 epochs, 5 folds; for a GPU.
    "full": dict(image_size=100, width=32, batch_size=64, max_epochs=40),
    # the report's resolution on a CPU: fold 0 only (corrected and report-faithful), fine-tuned
    # at 100×100 from the cpu profile's 32×32 weights of the same run (the U-Net is
    # convolutional), under the report's protocol (lr 2e-4, patience 5) with fewer epochs.
    "native": dict(image_size=100, width=32, batch_size=32, init="cpu", max_epochs=12),
    # smoke's twin of native: smoke's fold-0 weights fine-tuned at 24×24, for tests and CI.
    "smoke-native": dict(data_dir="runs/smoke/data", image_size=24, width=8, time_dim=32, heads=2,
                         batch_size=16, max_epochs=1, steps_per_epoch=3, val_images=32, bf16=False,
                         channels_last=False, init="smoke"),
}


# The profile whose models work at the dataset's own resolution (100×100; smoke's synthetic
# stand-in at 24×24), fine-tuned from this one's: notebooks 04 and 05 score them beside it.
NATIVE = {"cpu": "native", "smoke": "smoke-native"}


# The generation model: the U-Net with EDM's preconditioning (σ_d = 0.7, the training images' RMS),
# from scratch on every training image ('all'), validated on Test/; cpu: min-SNR-5 [MinSNR], lr
# warmed up to 10⁻³ then a half cosine to 0 over 16 epochs, EMA snapshots every 4 (time_to_quality).
GENERATION = {
    "smoke": dict(max_epochs=2, sigma_data=0.7, snapshot_every=1, min_snr_gamma=5.0,
                  lr_warmup=2, lr_decay="cosine"),
    "cpu": dict(lr=1e-3, lr_warmup=250, lr_decay="cosine", min_snr_gamma=5.0, ema_decay=0.9995,
                max_epochs=16, patience=16, sigma_data=0.7, snapshot_every=4),
    "full": dict(max_epochs=40, patience=40, sigma_data=0.7),
}


# The class-conditional twin's recipe where it differs: cpu's is GENERATION's previous one.
GENERATION_COND = {
    "cpu": dict(lr=5e-4, ema_decay=0.9995, max_epochs=60, patience=60, sigma_data=0.7,
                snapshot_every=10),
}


# How much each profile evaluates: test images for Table 1; n_samples per DDIM set of the
# generation table; n_report per 1000-step set (DDPM, the report's method); n_min, the fewest
# samples a set gets an FFD from (always beside the floor at the set's own n: FFD is biased
# upward at small n; fewer samples: KID and recognizability only); classifier epochs.
EVAL = {
    "smoke": dict(n_eval=32, n_samples=16, n_report=8, n_min=8, clf_epochs=1),
    "cpu": dict(n_eval=500, n_samples=500, n_report=100, n_min=64, clf_epochs=20),
    "full": dict(n_eval=1000, n_samples=1000, n_report=500, n_min=64,
                 clf_epochs=20),                                                # untested (GPU)
    # fine-tuned fold-0 models only: Table 1 (n_eval test images), Figures 4 and 5 (n_report)
    "native": dict(n_eval=200, n_samples=0, n_report=8, n_min=0, clf_epochs=0),
    "smoke-native": dict(n_eval=32, n_samples=0, n_report=4, n_min=0, clf_epochs=0),
}


TABLE1_T = tuple(range(50, 1001, 50))            # the report's Table 1 timesteps


def default_profile() -> str:
    """DDPM_PROFILE if set, else 'cpu' (the profile with committed models).

    The user picks the profile; a GPU never does. CUDA
    speeds up whatever profile runs (get_device), so a
    student with a GPU who opens notebook 03 loads the
    committed cpu models instead of starting hours of
    100×100 training."""
    p = os.environ.get("DDPM_PROFILE") or "cpu"
    if p not in PROFILES:
        raise ValueError(f"unknown profile {p!r} (DDPM_PROFILE): choose one of {sorted(PROFILES)}")
    return p


def get_config(profile: str | None = None, generation: bool = False, conditional: bool = False,
               **overrides) -> Config:
    """The profile's settings (+ GENERATION's for the generation model), then `overrides`;
    conditional: the class-conditional generation model (GENERATION_COND's recipe where the
    profile has one), over the index's classes."""
    profile = profile or default_profile()
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: choose one of {sorted(PROFILES)}")
    if (generation or conditional) and profile not in GENERATION:
        raise ValueError(f"the {profile} profile has no generation model (its runs are fold "
                         f"0's only): choose one of {sorted(GENERATION)}")
    gen = (GENERATION_COND.get(profile, GENERATION[profile]) if conditional else
           GENERATION[profile] if generation else {})
    cfg = Config(profile=profile, **{**PROFILES[profile], **gen, **overrides})
    if conditional:
        cfg = dataclasses.replace(cfg, n_classes=load_index(cfg).label.nunique())
    return cfg


def get_device() -> torch.device:
    """CUDA when there is a GPU, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tqdm(*args, **kw):
    """tqdm.auto's progress bar; none where DDPM_PROGRESS=0 (`make figures` executes the notebooks
    so, leaving no stale bars in their stored outputs)."""
    from tqdm.auto import tqdm as bar
    if os.environ.get("DDPM_PROGRESS") == "0":
        kw["disable"] = True
    return bar(*args, **kw)


def bf16_fast(device: torch.device) -> bool:
    """Whether bf16 is native on `device`: CUDA, or a CPU with AVX512-BF16 or AMX (emulated on
    an AVX2 CPU, it is slower than fp32)."""
    return device.type == "cuda" or (device.type == "cpu"
                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast when `enabled` and bf16_fast(device); a no-op otherwise. Training passes its
    Config.bf16, sample its bf16 argument; evaluation never asks (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=bool(enabled) and bf16_fast(device))


# -----------------------------------------------------------------------------------------------
# diffusion [DDPM]: the schedule, q(x_t | x_0), the reverse step, sampling


def make_betas(T: int = 1000, schedule: str = "linear", beta_1: float = 1e-3,
               beta_T: float = 0.02) -> torch.Tensor:
    """β_1..β_T, exactly T of them (float64). The report's torch.arange(0.001, 0.02, step) could
    give T+1 values; linspace cannot."""
    if schedule == "linear":
        return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    if schedule == "cosine":                               # [IDDPM] Eq. 17, s = 0.008
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"schedule must be 'linear' or 'cosine', not {schedule!r}")


class Diffusion(nn.Module):
    """The Gaussian diffusion of [DDPM] (the report called its forward half ForwardProcess): the
    schedule, q(x_t | x_0), the network's output read as ε̂ and x̂0, and the posterior
    q(x_{t-1} | x_t, x_0) that the reverse step uses. Timesteps t are 1..T as in [DDPM]; the
    schedule tensors are buffers, so .to(device) carries them.

    Calling it on (x0, t) returns (x_t, target): x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε (Eq. 4),
    target = ε (corrected) or sqrt(1-ᾱ_t)·ε (report-faithful 'scaled_eps').

    sigma_data > 0 (not the report's) preconditions the network as EDM does [EDM]: ε̂ =
    c_skip(t)·x_t + c_out(t)·F(x_t, t), c_skip·x_t = E[ε | x_t] and c_out² the variance left were
    x0 ~ N(0, σ_d²·I); F's target (ε − c_skip·x_t)/c_out has unit variance at every t. At t = T,
    ε̂ ≈ x_t by construction, which the scale-blind UNet cannot produce. No c_in; t stays uniform.
    """

    def __init__(self, T: int = 1000, schedule: str = "linear", beta_1: float = 1e-3,
                 beta_T: float = 0.02, target: str = "eps", sigma_data: float = 0.0,
                 min_snr_gamma: float = 0.0):
        super().__init__()
        if target not in ("eps", "scaled_eps"):
            raise ValueError(f"target must be 'eps' or 'scaled_eps', not {target!r}")
        if sigma_data < 0 or (sigma_data and target != "eps"):
            raise ValueError(f"sigma_data (preconditioning) must be ≥ 0 and needs target='eps', "
                             f"got {sigma_data} with {target!r}: the report-faithful mode is the "
                             f"report's network without it (use a profile such as cpu)")
        if min_snr_gamma < 0 or (min_snr_gamma and target != "eps"):
            raise ValueError(f"min_snr_gamma must be ≥ 0 and needs target='eps', got "
                             f"{min_snr_gamma} with {target!r}")
        self.T, self.target, self.sigma_data = T, target, sigma_data
        self.min_snr_gamma = min_snr_gamma
        b = make_betas(T, schedule, beta_1, beta_T)
        ab = torch.cumprod(1 - b, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=b.dtype), ab[:-1]])
        reg = lambda name, v: self.register_buffer(name, v.float(), persistent=False)
        reg("betas", b)                                             # β_t
        reg("alphas", 1 - b)                                        # α_t = 1 - β_t
        reg("alpha_bar", ab)                                        # ᾱ_t = Π_{s≤t} α_s
        reg("alpha_bar_prev", ab_prev)                              # ᾱ_{t-1}, ᾱ_0 = 1
        reg("beta_tilde", b * (1 - ab_prev) / (1 - ab))             # β̃_t, Eq. 7
        reg("post_c0", ab_prev.sqrt() * b / (1 - ab))               # μ̃_t coefficient of x0 (Eq. 7)
        reg("post_ct", (1 - b).sqrt() * (1 - ab_prev) / (1 - ab))  # μ̃_t coefficient of x_t
        if sigma_data:            # EDM's preconditioning [EDM, Table 1]: ε̂ = c_skip·x_t + c_out·F
            v = ab * sigma_data ** 2 + 1 - ab                       # E[x_t²] if E[x0²] = σ_d²
            reg("c_skip", (1 - ab).sqrt() / v)                      # E[ε | x_t] if x0 ~ N(0, σ_d²)
            reg("c_out", ab.sqrt() * sigma_data / v.sqrt())         # sd(ε | x_t) then
        if min_snr_gamma:         # [MinSNR]: the x0-MSE weighted by min(SNR_t, γ), SNR = ᾱ/(1-ᾱ)
            snr = ab / (1 - ab)   # the ε-MSE is SNR·x0-MSE; F's is (SNR + 1/σ_d²)·x0-MSE
            reg("loss_weight", snr.clamp(max=min_snr_gamma) / (snr + (1 / sigma_data ** 2
                                                                      if sigma_data else 0)))

    @classmethod
    def from_config(cls, cfg: Config) -> "Diffusion":
        return cls(cfg.T, cfg.schedule, cfg.beta_1, cfg.beta_T, cfg.target, cfg.sigma_data,
                   cfg.min_snr_gamma)

    def at(self, buf: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """buf at timesteps t (1-based), shaped (B, 1, 1, 1). t is range-checked on the CPU only (on
        CUDA a check costs a host sync per call; an index out of range fails there anyway)."""
        if t.device.type == "cpu" and (t.min() < 1 or t.max() > self.T):
            raise IndexError(f"timesteps run from 1 to {self.T}, got {t.min().item()}..{t.max().item()}")
        return buf[t - 1].view(-1, 1, 1, 1)

    def sample_t(self, n: int, generator=None, device=None) -> torch.Tensor:
        return torch.randint(1, self.T + 1, (n,), generator=generator, device=device)

    def q_sample(self, x0, t, eps):
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε  (Eq. 4)."""
        ab = self.at(self.alpha_bar, t)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def forward(self, x0, t, eps=None):
        eps = torch.randn_like(x0) if eps is None else eps
        xt = self.q_sample(x0, t, eps)
        if self.sigma_data:                                         # F's target: unit variance
            target = (eps - self.at(self.c_skip, t) * xt) / self.at(self.c_out, t)
        else:
            target = eps if self.target == "eps" else (1 - self.at(self.alpha_bar, t)).sqrt() * eps
        return xt, target

    def eps_from_output(self, xt, t, out):
        """The network's output as ε̂ (the scaled target divided back out; with sigma_data,
        c_skip·x_t + c_out·out)."""
        if self.sigma_data:
            return self.at(self.c_skip, t) * xt + self.at(self.c_out, t) * out
        return out if self.target == "eps" else out / (1 - self.at(self.alpha_bar, t)).sqrt()

    def predict_x0(self, xt, t, eps):
        """x̂0 = (x_t - sqrt(1-ᾱ_t)·ε̂) / sqrt(ᾱ_t)  (Eq. 4 solved for x0; Eq. 15)."""
        ab = self.at(self.alpha_bar, t)
        return (xt - (1 - ab).sqrt() * eps) / ab.sqrt()

    def q_posterior(self, x0, xt, t):
        """Mean and variance of q(x_{t-1} | x_t, x0)  (Eqs. 6–7)."""
        mean = self.at(self.post_c0, t) * x0 + self.at(self.post_ct, t) * xt
        return mean, self.at(self.beta_tilde, t)


def noise_like(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """z ~ N(0, I) of x's shape, drawn on the CPU from g (the same numbers on any device)."""
    return torch.randn(x.shape, generator=g).to(x.device)


def eps_hat(model, diff: Diffusion, x, t):
    """ε̂ = ε_θ(x_t, t): the network's output read as ε (Diffusion.eps_from_output)."""
    return diff.eps_from_output(x, t, model(x, t).float())


def _t(x, t: int) -> torch.Tensor:
    return torch.full((len(x),), t, device=x.device, dtype=torch.long)            # (B,)


@torch.no_grad()
def p_sample(model, diff: Diffusion, x, t: int, t_prev: int, g, var: str = "beta",
             clip: bool = True):
    """One step of Algorithm 2 [DDPM], x_t → x_{t−1} (t_prev = t − 1):
    x_{t−1} = μ̃_t(x_t, x̂0) + σ_t·z, with σ_t² = β_t ('beta') or β̃_t ('beta_tilde'), no noise at
    t = 1. With x̂0 unclipped, μ̃_t (Eq. 7) is Algorithm 2's (x_t − β_t/√(1−ᾱ_t)·ε̂)/√α_t."""
    tt = _t(x, t)
    eps = eps_hat(model, diff, x, tt)                                   # ε_θ(x_t, t)
    x0 = diff.predict_x0(x, tt, eps)                                    # Eq. 15
    x0 = x0.clamp(-1, 1) if clip else x0
    mean, beta_tilde = diff.q_posterior(x0, x, tt)                      # μ̃_t, β̃_t (Eqs. 6–7)
    sigma2 = diff.at(diff.betas, tt) if var == "beta" else beta_tilde
    return mean + sigma2.sqrt() * noise_like(x, g) if t > 1 else mean


@torch.no_grad()
def ddim_step(model, diff: Diffusion, x, t: int, t_prev: int, g, eta: float = 0.0,
              clip: bool = True, recompute_eps: bool = False):
    """One DDIM step [DDIM] Eq. 12, x_t → x_{t_prev} (t_prev < t; 0: the end):
    x_{t_prev} = √ᾱ_{t_prev}·x̂0 + √(1 − ᾱ_{t_prev} − σ²)·ε̂ + σ·z, σ from η (Eq. 16).

    clip: x̂0 is clipped to [-1, 1]; ε̂ is then kept as the network gave it (recompute_eps=False,
    as diffusers' DDIMScheduler does) or re-derived from the clipped x̂0 (True, as
    improved-diffusion does; with η = 1 and every step this is DDPM's step with σ² = β̃_t). At
    η = 0 nothing corrects an error in ε̂ later, and x̂0 multiplies it by √((1−ᾱ_t)/ᾱ_t) (Eq. 15,
    up to ~190 at t = T): the report's U-Net, blind to ‖x_t‖ (UNet), drifts unclipped."""
    ab = diff.alpha_bar[t - 1]                                          # ᾱ_t
    ab_prev = diff.alpha_bar[t_prev - 1] if t_prev > 0 else torch.ones_like(ab)
    eps = eps_hat(model, diff, x, _t(x, t))                             # ε_θ(x_t, t)
    x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()                        # Eq. 15
    if clip:
        x0 = x0.clamp(-1, 1)
        if recompute_eps:
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()                # Eq. 4 solved for ε
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()   # Eq. 16
    x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp_min(0).sqrt() * eps
    return x + sigma * noise_like(x, g) if t_prev > 0 and eta > 0 else x


def timesteps(T: int, steps: int | None = None) -> list[int]:
    """The t a sampler visits: T, T−1, …, 1 (steps None), or `steps` of them evenly spaced."""
    if steps is None:
        return list(range(T, 0, -1))
    return [int(v) for v in np.linspace(T, 1, steps).round()]


@torch.no_grad()
def sample_loop(step, model, diff: Diffusion, x, ts, g, keep=(), progress: bool = False,
                desc: str = "sampling", **kw):
    """Run `step(model, diff, x, t, t_prev, g, **kw)` from x = x_T down the timesteps ts (each
    step goes from ts[i] to ts[i+1], the last to 0). Returns (x_0, {k: x at k}) for each k in
    keep, recorded at the first step that reaches or passes k (on the CPU)."""
    traj, ts = {}, [*ts, 0]
    for t, t_prev in tqdm(list(zip(ts[:-1], ts[1:])), desc=desc, disable=not progress,
                          leave=False):
        x = step(model, diff, x, t, t_prev, g, **kw)
        for k in keep:
            if t_prev <= k < t:
                traj[k] = x.cpu()
    return x, traj


class Guided(nn.Module):
    """Classifier-free guidance [CFG] of a conditional UNet, as a model of (x_t, t) that every
    sampler takes: out = out_∅ + w·(out_c − out_∅), the conditional (labels y) and the null-class
    pass in one batch. w = 0 is the unconditional model, w = 1 the plain conditional one (the
    paper's 1 + w is our w), exactly (torch.lerp). Guiding the raw output guides ε̂ alike: ε̂ is
    affine in it with the same coefficients for both passes (Diffusion.eps_from_output)."""

    def __init__(self, model: nn.Module, y: torch.Tensor, w: float):
        super().__init__()
        if not model.n_classes:
            raise ValueError("guidance needs a class-conditional model (Config.n_classes > 0; "
                             "`train --fold all --conditional`)")
        self.model, self.y, self.w = model, y, float(w)

    def forward(self, x, t):                                               # (B, 3, H, W), (B,)
        null = torch.full_like(self.y, self.model.n_classes)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.y, null]))
        c, u = out.chunk(2)                                                # 2 × (B, 3, H, W)
        return torch.lerp(u, c, self.w)


def sample(model, diff: Diffusion, method: str = "ddim", n: int = 64, size: int = 32,
           seed: int = 0, batch: int = 250, keep=(), progress: bool = True,
           y: torch.Tensor | None = None, w: float = 1.0, steps: int | None = None,
           bf16: bool = False, **kw):
    """n images in [-1, 1] from x_T ~ N(0, I) with a seeded generator, in batches.
    method: a key of SAMPLERS — 'ddpm' (p_sample: var, clip), 'ddim' (ddim_step: steps, default
    50, eta, clip, recompute_eps), 'report' and 'report-first' (the report's samplers). y: (n,)
    class labels for a conditional model, sampled with guidance weight w (Guided). bf16: the
    network in bf16 autocast where it is native (default fp32).
    Returns (x0 (n, 3, size, size) on the CPU, {t: x_t (n, …)} for t in keep)."""
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {sorted(SAMPLERS)}, not {method!r}")
    if y is not None and len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} samples: give one class label per sample")
    if steps is not None and method != "ddim":
        raise ValueError(f"steps is a DDIM setting ({method} runs every one of the T steps)")
    if kw.get("var", "beta") not in ("beta", "beta_tilde"):
        raise ValueError(f"var must be 'beta' or 'beta_tilde', not {kw['var']!r}")
    if kw.get("decode", "eps") not in ("eps", "report"):
        raise ValueError(f"decode must be 'eps' or 'report', not {kw['decode']!r}")
    ts = timesteps(diff.T, steps or 50 if method == "ddim" else None)
    device = next(model.parameters(), torch.empty(0)).device
    g = torch.Generator().manual_seed(seed)
    outs, trajs = [], []
    for i in tqdm(range(0, n, batch), desc=f"sampling {method}", disable=not progress or n <= batch):
        xT = noise_like(torch.empty(min(batch, n - i), 3, size, size, device=device), g)
        m = model if y is None else Guided(model, y[i:i + len(xT)].to(device), w)
        with autocast(device, bf16):
            x, traj = sample_loop(SAMPLERS[method], m, diff, xT, ts, g, keep, progress,
                                  desc=f"{method}-{len(ts)}", **kw)
        outs.append(x.clamp(-1, 1).cpu())
        trajs.append(traj)
    return torch.cat(outs), {k: torch.cat([tr[k] for tr in trajs]) for k in trajs[0]}


# -----------------------------------------------------------------------------------------------
# the U-Net: the report's network (its Section 3.1 and Figure 2)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the timestep t (as in Transformer positions) [DDPM §4]."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:               # (B,) → (B, dim)
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        a = t.float()[:, None] * freqs[None]
        return torch.cat([a.sin(), a.cos()], dim=1)


class DoubleConv(nn.Module):
    """3×3 conv → GroupNorm → GELU → 3×3 conv → GroupNorm (+ input, then GELU, if residual)."""

    def __init__(self, c_in: int, c_out: int, c_mid: int | None = None, residual: bool = False):
        super().__init__()
        c_mid = c_mid or c_out
        self.residual = residual
        self.net = nn.Sequential(
            nn.Conv2d(c_in, c_mid, 3, padding=1, bias=False), nn.GroupNorm(1, c_mid), nn.GELU(),
            nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False), nn.GroupNorm(1, c_out))

    def forward(self, x):
        return F.gelu(x + self.net(x)) if self.residual else self.net(x)


class Down(nn.Module):
    """2×2 max-pool, two double convs (the first residual), plus the projected time embedding."""

    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(c_in, c_in, residual=True),
                                  DoubleConv(c_in, c_out))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(t_dim, c_out))

    def forward(self, x, temb):
        return self.conv(x) + self.emb(temb)[:, :, None, None]


class Up(nn.Module):
    """Bilinear ×2 to the skip's exact size, concatenate, two double convs, time embedding."""

    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.conv = nn.Sequential(DoubleConv(c_in, c_in, residual=True),
                                  DoubleConv(c_in, c_out, c_in // 2))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(t_dim, c_out))

    def forward(self, x, skip, temb):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        x = self.conv(torch.cat([skip, x], dim=1))
        return x + self.emb(temb)[:, :, None, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H·W positions, with LayerNorm and a feed-forward,
    both residual. Uses the fused scaled_dot_product_attention kernel."""

    def __init__(self, c: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.ff = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c), nn.GELU(), nn.Linear(c, c))

    def forward(self, x):
        B, C, H, W = x.shape
        h = x.flatten(2).transpose(1, 2)                                   # (B, HW, C)
        q, k, v = self.qkv(self.ln(h)).view(B, H * W, 3, self.heads, C // self.heads) \
            .permute(2, 0, 3, 1, 4)                                        # 3 × (B, nh, HW, hs)
        a = F.scaled_dot_product_attention(q, k, v)                        # (B, nh, HW, hs)
        h = h + self.proj(a.transpose(1, 2).reshape(B, H * W, C))
        h = h + self.ff(h)
        return h.transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """The report's U-Net: 32→64→128→128 channels (width w = 32), attention at the bottleneck.
    Works at any size ≥ 8 (100 → 50 → 25 → 12 and back; 32 → 16 → 8 → 4).

    Its convs feed GroupNorm(1, C) without a bias and `inc` has no residual, so net(c·x, t) =
    net(x, t) for c > 0: it cannot see ‖x_t‖ (scale_response). EDM's preconditioning
    (Diffusion, sigma_data) supplies that part of ε̂ outside the network.

    n_classes > 0 (not the report's): a learned class embedding is added to the time embedding;
    label n_classes is the null class ("no class"), which y=None means [CFG].
    """

    def __init__(self, width: int = 32, time_dim: int = 256, heads: int = 4, n_classes: int = 0):
        super().__init__()
        w = width
        self.n_classes = n_classes
        self.temb = TimeEmbedding(time_dim)
        self.cemb = nn.Embedding(n_classes + 1, time_dim) if n_classes else None
        self.inc = DoubleConv(3, w)
        self.down1, self.down2, self.down3 = Down(w, 2 * w, time_dim), \
            Down(2 * w, 4 * w, time_dim), Down(4 * w, 4 * w, time_dim)
        self.attn = SelfAttention(4 * w, heads)
        self.up1, self.up2, self.up3 = Up(8 * w, 2 * w, time_dim), Up(4 * w, w, time_dim), \
            Up(2 * w, w, time_dim)
        self.outc = nn.Conv2d(w, 3, 1)

    def forward(self, x, t, y=None):                                       # (B, 3, H, W), (B,)
        e = self.temb(t)                                                   # (B, time_dim)
        if self.cemb is not None:                                          # y: (B,) or None
            e = e + self.cemb(torch.full_like(t, self.n_classes) if y is None else y)
        x1 = self.inc(x)                                                   # (B, w, H, W)
        x2 = self.down1(x1, e)                                             # (B, 2w, H/2, W/2)
        x3 = self.down2(x2, e)                                             # (B, 4w, H/4, W/4)
        x4 = self.attn(self.down3(x3, e))                                  # (B, 4w, H/8, W/8)
        x = self.up1(x4, x3, e)                                            # (B, 2w, H/4, W/4)
        x = self.up2(x, x2, e)                                             # (B, w, H/2, W/2)
        return self.outc(self.up3(x, x1, e))                               # (B, 3, H, W)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: Config, device: torch.device | None = None, verbose: bool = True) -> UNet:
    model = UNet(cfg.width, cfg.time_dim, cfg.heads, cfg.n_classes)
    if verbose:
        print(f"UNet(width={cfg.width}): {n_params(model):,} parameters")
    model = model.to(device or get_device())
    return model.to(memory_format=torch.channels_last) if channels_last(cfg) else model


def channels_last(cfg: Config) -> bool:
    """Whether cfg's tensors are in channels_last memory (Config.channels_last; None: no)."""
    return bool(cfg.channels_last)


# -----------------------------------------------------------------------------------------------
# the report's own versions, kept apart from the corrected method: its target (Diffusion with
# target='scaled_eps'), its Eq. 5 decoding, its two samplers and its Figure 5


def report_scaler(t, scaler: str = "eq5"):
    """The report's decoding scale s(t) at timesteps t (B,), float64. 'eq5': its Eq. 5,
    s(t) = (1/√α_t − 1)·8·(t/50)² + 1; 'alpha': 1/√α_t alone, "the 1/√α of the original
    literature" that Eq. 5 starts from (the report: images stayed too dark with it). α_t = 1 − β_t
    is the per-step α of the report's linear schedule (β from 1e-3 to 0.02, T = 1000) — [DDPM]
    Algorithm 2's 1/√α_t, not the cumulative ᾱ_t — whatever the model's own schedule."""
    a = (1 - make_betas(1000)).to(t.device)[t - 1]                          # α_t = 1 − β_t
    if scaler == "alpha":
        return 1 / a.sqrt()
    if scaler != "eq5":
        raise ValueError(f"scaler must be 'eq5' or 'alpha', not {scaler!r}")
    return (1 / a.sqrt() - 1) * 8 * (t.double() / 50) ** 2 + 1              # Eq. 5


def report_x0(xt, t, out, scaler: str = "eq5"):
    """The report-faithful one-step reconstruction, in [0, 1], read literally from its Appendix
    A: scaler · (noised image − predicted noise), with the network's raw output (trained on
    √(1−ᾱ_t)·ε) as the predicted noise and report_scaler's s(t). A network that learned its
    target exactly leaves x_t − out = √ᾱ_t·x0, which s(t) approximately divides back. Our
    reading where the text is silent: the scaling acts on [-1, 1] images (the network's scale, so
    x0 = 0 stays fixed), then the result is mapped to [0, 1] and clipped (to_unit). The report's
    code for this step is not public."""
    s = report_scaler(t, scaler).float().view(-1, 1, 1, 1)
    return to_unit(s * (xt - out))


@torch.no_grad()
def report_step(model, diff: Diffusion, x, t: int, t_prev: int, g, clip: bool = True,
                decode: str = "eps"):
    """One step of the report's iterative method (its Section 4, Figure 5): predict the noise,
    remove all of it (x̂0), then noise x̂0 afresh to t − 1: x_{t−1} = q_sample(x̂0, t − 1, z).
    It ignores the posterior q(x_{t−1} | x_t, x0), which is why it does not sample the data.
    decode: 'eps' forms x̂0 from ε̂ (Eq. 15); 'report' as the report did, from the raw output
    with Eq. 5's scaler (report_x0, always clipped)."""
    tt = _t(x, t)
    if decode == "report":
        x0 = 2 * report_x0(x, tt, model(x, tt).float()) - 1                 # [0, 1] → [-1, 1]
    else:
        x0 = diff.predict_x0(x, tt, eps_hat(model, diff, x, tt))
        x0 = x0.clamp(-1, 1) if clip else x0
    return diff.q_sample(x0, tt - 1, noise_like(x, g)) if t > 1 else x0


@torch.no_grad()
def report_first_step(model, diff: Diffusion, x, t: int, t_prev: int, g, clip: bool = False):
    """One step of the report's first sampler (its Section 5), read as Algorithm 2 [DDPM] with
    the network's raw output in place of ε: x_{t−1} = scaler·(x_t − noise_scaler·out) + σ_t·z,
    where we read its scaler as 1/√α_t, its noise_scaler as β_t/√(1−ᾱ_t), and σ_t² = β_t
    (Algorithm 2's coefficients; the report names them without formulas). With an ε-model this
    is DDPM; with the report-faithful model, out ≈ √(1−ᾱ_t)·ε̂, so every step removes too little
    noise. No x̂0 and no clipping, as in Algorithm 2 (clip=True clamps x_{t−1} to [-1, 1])."""
    tt = _t(x, t)
    beta, ab, a = diff.at(diff.betas, tt), diff.at(diff.alpha_bar, tt), diff.at(diff.alphas, tt)
    x = (x - beta / (1 - ab).sqrt() * model(x, tt).float()) / a.sqrt()
    x = x + beta.sqrt() * noise_like(x, g) if t > 1 else x
    return x.clamp(-1, 1) if clip else x


# sample's methods: the step each runs from x_T to x_0 (sample_loop)
SAMPLERS = {"ddpm": p_sample, "ddim": ddim_step, "report": report_step,
            "report-first": report_first_step}


# The report's Figure 5, honestly: its two samplers with its own (report-faithful) model, beside
# DDPM and DDIM with the corrected model of the same fold. name → (target, method, settings).
FIG5_SAMPLERS = {
    "report's first sampler (Algorithm 2, output as ε)": ("scaled_eps", "report-first", {}),
    "report's iterative method (Eq. 5 decoding)": ("scaled_eps", "report", dict(decode="report")),
    "DDPM-1000, corrected model": ("eps", "ddpm", {}),
    "DDIM-50 (η = 0), corrected model": ("eps", "ddim", dict(steps=50)),
}


# The report's Figure 4, honestly: name → (target, decoding) of each row's one-step x̂0
# (reconstruct), after the ground truth and x_t.
FIG4_ROWS = {
    "x̂0 corrected (ε model)": ("eps", "eps"),
    "x̂0 scaled-ε model, 1/√α_t alone (where the report started: too dark)": ("scaled_eps", "alpha"),
    "x̂0 report-faithful (scaled-ε model, its decoding + Eq. 5)": ("scaled_eps", "eq5"),
    "x̂0 scaled-ε model, decoded correctly": ("scaled_eps", "eps"),
}


@torch.no_grad()
def figure4(cfg: Config, ts, image: int = 0, seed: int = 0, fold: int = 0) -> dict:
    """The rows of the report's Figure 4 for one seeded test image (eval_images' `image`): the
    ground truth, x_t at each t in ts (noise drawn with `seed`, the same x_t for every model),
    and each FIG4_ROWS model's one-step x̂0 (fold `fold`), all in [0, 1]: {title: (len(ts), 3,
    H, W)}."""
    dev = get_device()
    x0 = to_float(eval_images(cfg, n=max(8, image + 1))[image:image + 1])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(ts, device=dev)
    x0s, epss = (v.expand(len(ts), -1, -1, -1).to(dev) for v in (x0, eps))
    xt = Diffusion.from_config(cfg).to(dev).q_sample(x0s, t, epss)
    rows = {"ground truth x0": to_unit(x0s), "forward process x_t": to_unit(xt)}
    for name, (target, decode) in FIG4_ROWS.items():
        c = dataclasses.replace(cfg, target=target)
        rows[name] = reconstruct(load_model(c, fold).to(dev), Diffusion.from_config(c).to(dev),
                                 xt, t, decode)
    return rows


def figure5(cfg: Config, n: int = 16, seed: int = 0, fold: int = 0,
            keep=tuple(range(900, -1, -100)), progress: bool = True, samplers=None):
    """Every FIG5_SAMPLERS set (or those named in `samplers`) from the same x_T (seed): the
    report-faithful and the corrected model of one fold (the same training images and protocol;
    trained first where missing, see trained). Returns ({name: x0}, {name: {t: x_t}} for t in
    keep, a table per set with the mean and spread of its pixels in [0, 1] and its share of dark
    pixels (all channels < 0.1), the real test images' row first)."""
    dev = get_device()
    chosen = {k: v for k, v in FIG5_SAMPLERS.items() if samplers is None or k in samplers}
    rows = [_pixel_stats("real test images", to_float(eval_images(cfg, n=max(n, 64))))]
    models = {}                                        # target → (model, its Diffusion)
    for target in dict.fromkeys(t for t, _, _ in chosen.values()):
        c = dataclasses.replace(cfg, target=target)
        trained(c, fold, progress=False)
        models[target] = load_model(c, fold).to(dev), Diffusion.from_config(c).to(dev)
    xs, trajs = {}, {}
    for name, (target, method, kw) in chosen.items():
        model, fp = models[target]
        xs[name], trajs[name] = sample(model, fp, method, n, cfg.image_size, seed=seed,
                                       keep=keep, progress=progress, **kw)
        rows.append(_pixel_stats(name, xs[name]))
    return xs, trajs, pd.DataFrame(rows)


# Figure 5 at the dataset's 100×100 (the native profile): the report's two samplers with its own
# report-faithful model, beside DDIM-50 with the corrected one. 1000 network evaluations a sample
# at 100×100 in fp32 are too slow for `make figures`: `make figure5-native` runs it once (the
# figure5 command) and `make figures` reads its tables (read_result).
FIG5_NATIVE_SETS = [name for name in FIG5_SAMPLERS if name.startswith("report's")] + \
                   ["DDIM-50 (η = 0), corrected model"]
FIG5_NATIVE_TABLES = ("figure5_brightness", "figure5_brightness_by_t", "figure5_run")


def result_file(cfg: Config, name: str, command: str) -> Path:
    """A file (table or picture) that a run-once command (`command`, its own make target) wrote
    for cfg's profile: this run's own (in cfg.fig_dir()) where there is one, else the committed
    one (cfg.committed_dir()). Missing: one line naming the command."""
    for folder in dict.fromkeys((cfg.fig_dir(), cfg.committed_dir())):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{name} is not in {cfg.fig_dir()}: run `{command}` first (it writes it "
                    f"once; `make figures` only reads it)")


def read_result(cfg: Config, name: str, command: str) -> pd.DataFrame:
    """The table <name>.csv of result_file."""
    return pd.read_csv(result_file(cfg, f"{name}.csv", command))


def brightness_by_t(trajs: dict) -> pd.DataFrame:
    """The mean brightness (x_t shown in [0, 1], clipped) of each figure5 set at each kept t: one
    row per t in sampling order (T first), one column per set."""
    ts = sorted(next(iter(trajs.values())), reverse=True)
    return pd.DataFrame({"t": ts, **{name: [to_unit(tr[t]).mean().item() for t in ts]
                                     for name, tr in trajs.items()}})


def _pixel_stats(name: str, x: torch.Tensor) -> dict:
    """Brightness of images in [-1, 1] once shown ([0, 1]): mean, the mean per-image standard
    deviation, and the share of dark pixels (every channel below 0.1)."""
    u = to_unit(x)
    return dict(images=name, n=len(x), mean=u.mean().item(),
                std_within_image=u.flatten(1).std(1).mean().item(),
                dark_share=(u < 0.1).all(1).float().mean().item())


# -----------------------------------------------------------------------------------------------
# data: Fruits-360's own Training/ and Test/, folds without leakage


class DataError(ValueError):
    """Bad input data, with a message that says which file and what to do."""


# File names: `N_100.jpg` (first video), `r_N_100.jpg`, `r2_…`, and newer `r0_…`, `r1_…`.
NAME_RE = re.compile(r"^(?:(?P<video>[a-z]+\d*)_)?(?P<frame>\d+)(?:_\d+)?$", re.IGNORECASE)


def parse_name(filename: str) -> tuple[str, int]:
    """'r2_117_100.jpg' → ('r2', 117); '5_100.jpg' → ('', 5). Unknown names → (stem, -1)."""
    stem = Path(filename).stem
    m = NAME_RE.match(stem)
    if not m:
        return stem, -1
    return (m.group("video") or "").lower(), int(m.group("frame"))


def _decode(path: Path) -> torch.Tensor:
    """The one image decoder of the library (torchvision): any mode → uint8 RGB (3, H, W); a
    16-bit image keeps its high byte; a transparent PNG is composited on white (`data` says so).
    """
    from torchvision.io import ImageReadMode, decode_image
    with warnings.catch_warnings():         # torchvision 0.29 announces a move of its decoders
        warnings.simplefilter("ignore", DeprecationWarning)
        img = decode_image(str(path), mode=ImageReadMode.RGB)
    if img.dtype == torch.uint16:
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    a = png_alpha(path)
    if a is not None:                       # transparency: on white, Fruits-360's background
        a = a.to(torch.int32)
        img = ((img.to(torch.int32) * a + 255 * (255 - a) + 127) // 255).to(torch.uint8)
    return img


def png_alpha(path: Path) -> torch.Tensor | None:
    """A PNG's alpha (1, H, W) uint8 where some pixel is not opaque, else None (PIL reads it:
    torchvision's RGB_ALPHA mode misreads palette images)."""
    if Path(path).suffix.lower() != ".png":
        return None
    from PIL import Image
    with Image.open(path) as im:
        if "A" not in im.getbands() and "transparency" not in im.info:
            return None
        a = torch.from_numpy(np.asarray(im.convert("RGBA"))[..., 3].copy())[None]
    return a if (a < 255).any() else None


def assign_folds(df: pd.DataFrame, n_folds: int = 5, split: str = "grouped",
                 seed: int = 0) -> pd.DataFrame:
    """Give every training row a fold (0..n-1) and a leakage group; test rows get fold -1.
    grouped: each video of each class is cut, in frame order, into n contiguous blocks (the
    leakage unit, `group`) that go to the n folds in a seeded order, so every fold gets 1/n of
    every video; `fold_rows` purges block-edge neighbours (±k frames) from the training side.
    random: the report's split — frames scattered over folds at random (stratified by class)."""
    rng = np.random.default_rng(seed)
    df = df.copy()
    df["fold"], df["group"] = -1, ""
    train = df[df.split == "train"].sort_values(["label", "video", "frame", "path"])
    for (label, video), rows in train.groupby(["label", "video"], sort=True):
        idx = rows.index.to_numpy()
        if split == "random":
            folds = rng.permutation(np.arange(len(idx)) % n_folds)
            groups = [f"{label}/{video}/#{i}" for i in idx]
        elif split == "grouped":
            block = np.arange(len(idx)) * n_folds // len(idx)      # 0..n-1 in frame order
            folds = rng.permutation(n_folds)[block]
            groups = [f"{label}/{video}/{b}" for b in block]
        else:
            raise ValueError(f"split must be 'grouped' or 'random', not {split!r}")
        df.loc[idx, "fold"] = folds
        df.loc[idx, "group"] = groups
    df.loc[df.split == "test", "group"] = [f"{l}/{v}/test" for l, v in
                                            zip(df.label[df.split == "test"], df.video[df.split == "test"])]
    return df


PURGE_K = 10


def fold_rows(index: pd.DataFrame, fold, k: int = PURGE_K) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val) rows for one fold ('all': every training row, validated on Test/). Training
    rows within ±k frames of a validation frame of the same class and video are purged (k=10:
    the subset's README measures SSIM 0.23–0.71 at k=10, against 0.79–0.94 at k=1)."""
    tr = index[index.split == "train"]
    if fold == "all":
        return tr, index[index.split == "test"]
    val = tr[tr.fold == int(fold)]
    rest = tr[tr.fold != int(fold)]
    if len(val) == 0:
        raise ValueError(f"fold {fold} has no rows: the index has folds {sorted(tr.fold.unique())}")
    vf = val.groupby(["label", "video"]).frame.apply(np.sort).to_dict()
    keep = np.ones(len(rest), bool)
    for i, (lab, vid, fr) in enumerate(zip(rest.label, rest.video, rest.frame)):
        f = vf.get((lab, vid))
        if f is not None and fr >= 0:
            j = np.searchsorted(f, fr)
            near = [f[m] for m in (j - 1, j) if 0 <= m < len(f)]
            keep[i] = all(abs(fr - x) > k for x in near)
    return rest[keep], val


def leaking_pairs(train: pd.DataFrame, val: pd.DataFrame, k: int = PURGE_K) -> int:
    """How many validation images have a training frame of the same class and video within ±k
    (0 for the grouped folds; most of them for the random split)."""
    tf = train.groupby(["label", "video"]).frame.apply(np.sort).to_dict()
    n = 0
    for lab, vid, fr in zip(val.label, val.video, val.frame):
        f = tf.get((lab, vid))
        if f is not None and fr >= 0:
            j = np.searchsorted(f, fr)
            n += any(abs(fr - f[m]) <= k for m in (j - 1, j) if 0 <= m < len(f))
    return n


def load_index(cfg: Config) -> pd.DataFrame:
    """Read data_dir/index.csv. Missing, it is an error
    naming the command that makes it (`make data`, or
    `data --synthetic` for the smoke profiles): the
    library never calls the command line."""
    d = cfg.home / cfg.data_dir
    path = d / "index.csv"
    if not path.exists():
        make = ("--synthetic --synthetic-size 32" if cfg.profile.startswith("smoke")
                else "--from ../shared/fruits-360-subset")
        raise DataError(f"{path} not found: make it with `python -m ddpm_cli data "
                        f"{make} --out {d}` (or `make data`)")
    if (d / SWITCHING).exists():
        raise DataError(f"{d}: a `data` run was stopped while switching index.csv and "
                        f"fruits-360 to new images, so the two may not match: run "
                        f"`python -m ddpm_cli data` with its --from again")
    index = read_index(path)
    if cfg.split != "grouped":                 # index.csv holds the grouped folds
        index = assign_folds(index, split=cfg.split, seed=cfg.seed)
    return index


SWITCHING = ".switching"     # in a data folder while `data` switches index.csv and its images
INDEX_COLUMNS = ["path", "label", "split", "video", "frame", "group", "fold"]


def read_index(path: Path) -> pd.DataFrame:
    """index.csv, checked: every column present, no row cut short, numbers where numbers go."""
    redo = ("rebuild it with `python -m ddpm_cli data --from ../shared/fruits-360-subset` "
            "(or your --from folder)")
    text = path.read_bytes()
    if text and not text.endswith(b"\n"):
        raise DataError(f"{path} ends in the middle of a row (cut short?): {redo}")
    try:
        index = pd.read_csv(path, keep_default_na=False, dtype={"video": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a readable index ({e}): {redo}") from None
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise DataError(f"{path} lacks the column(s) {missing} (an index from an older version or "
                        f"another tool): {redo}")
    blank = index[["path", "label", "split", "group", "frame", "fold"]].astype(str).eq("").any(axis=1)
    nums = index[["frame", "fold"]].apply(pd.to_numeric, errors="coerce")
    bad = blank | nums.isna().any(axis=1) | ~index.split.isin(["train", "test"])
    if bad.any():
        raise DataError(f"{path} has {int(bad.sum())} incomplete or malformed row(s) (first: line "
                        f"{int(np.flatnonzero(bad)[0]) + 2}): {redo}")
    return index.astype({"frame": int, "fold": int})


def read_image(path: Path, size: int) -> torch.Tensor:
    """One image → uint8 (3, size, size): any mode converted to RGB, resized with antialiasing."""
    from torchvision.transforms.v2.functional import resize
    try:
        img = _decode(path)                                          # (3, H, W) uint8
    except Exception as e:
        raise DataError(f"cannot decode {path}: {e}. Rebuild the index with `python -m ddpm_cli "
                        f"data … --skip-bad`, or replace the file") from e
    if img.shape[-2:] != (size, size):
        img = resize(img, [size, size], antialias=True)
    return img


class Fruits(torch.utils.data.Dataset):
    """Fruits-360 images of an index (the report's name). Items are (x, label): x float32 in
    [-1, 1] (Normalize(0.5, 0.5)), (3, size, size). All images are decoded once into an in-memory
    uint8 cache, so an epoch on the CPU decodes no JPEG."""

    def __init__(self, rows: pd.DataFrame, root: Path | str, size: int = 32, flip: bool = False,
                 classes=None):
        self.rows = rows.reset_index(drop=True)
        self.root = Path(root)
        self.size, self.flip = size, flip
        self.classes = list(classes) if classes is not None else sorted(rows.label.unique())
        self.labels = torch.tensor([self.classes.index(c) for c in self.rows.label])
        self._cache = None

    def __len__(self):
        return len(self.rows)

    @property
    def images(self) -> torch.Tensor:
        """uint8 (N, 3, size, size), decoded on first use."""
        if self._cache is None:
            out = torch.empty(len(self), 3, self.size, self.size, dtype=torch.uint8)
            for i, p in enumerate(tqdm(self.rows.path, desc=f"loading {len(self)} images",
                                       leave=False, disable=len(self) < 500)):
                out[i] = read_image(self.root / p, self.size)
            self._cache = out
        return self._cache

    def __getitem__(self, i):
        x = to_float(self.images[i])
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1]: ToTensor then Normalize(0.5, 0.5)."""
    return x.float().div(127.5).sub(1.0)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], clamped."""
    return x.add(1).div(2).clamp(0, 1)


def split_data(cfg: Config, split: str, classes=None) -> Fruits:
    """The images of the dataset's own split ('train': Training/, 'test': Test/) at the
    profile's size, unflipped; labels indexed by `classes` (default: sorted class names)."""
    index = load_index(cfg)
    rows = index[index.split == split]
    return Fruits(rows, cfg.home / cfg.data_dir / "fruits-360", cfg.image_size, classes=classes)


# -----------------------------------------------------------------------------------------------
# training: Algorithm 1, EMA, early stopping; which weights a run uses


class EMA:
    """Exponential moving average of the weights with warm-up, decay_n = min(decay,
    (1+n)/(10+n)); buffers are copied, not averaged. Used for validation, evaluation, sampling."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        import copy
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "n": self.n}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.n = s["n"]


def diffusion_loss(model, fp: Diffusion, x0, t, eps, y=None) -> torch.Tensor:
    """Algorithm 1 [DDPM]: ‖target − net(x_t, t)‖², target ε (or the report's scaled ε, or with
    sigma_data F's target: the ε-MSE weighted by 1/c_out², see Diffusion); y: class labels
    of a conditional model (None: unconditional). With min_snr_gamma, each image's MSE is
    weighted by loss_weight(t) [MinSNR]."""
    xt, target = fp(x0, t, eps)
    out = (model(xt, t) if y is None else model(xt, t, y)).float()
    if not fp.min_snr_gamma:
        return F.mse_loss(out, target)
    return (fp.at(fp.loss_weight, t) * (out - target) ** 2).mean()


def learning_rate(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step `step` (0-based): a linear warm-up over lr_warmup steps
    to cfg.lr, then constant, or (lr_decay 'cosine') half a cosine down to 0 at max_epochs."""
    if step < cfg.lr_warmup:
        return cfg.lr * (step + 1) / cfg.lr_warmup
    if cfg.lr_decay not in ("constant", "cosine"):
        raise ValueError(f"lr_decay must be 'constant' or 'cosine', not {cfg.lr_decay!r}")
    if cfg.lr_decay == "constant":
        return cfg.lr
    total = max(cfg.max_epochs * steps_per_epoch - cfg.lr_warmup, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min((step - cfg.lr_warmup) / total, 1.0)))


def optimizer_step(model: nn.Module, ema: "EMA", opt: torch.optim.Optimizer, loss: torch.Tensor,
                   cfg: Config) -> None:
    """Algorithm 1's update after the loss: backward, gradient clipping, Adam, EMA."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    ema.update(model)


def train_step(model: nn.Module, ema: "EMA",
               opt: torch.optim.Optimizer,
               fp: Diffusion, x0: torch.Tensor,
               cfg: Config, *,
               g: torch.Generator | None = None,
               t=None, eps=None, y=None,
               lr: float | None = None,
               net: nn.Module | None = None,
               check=None) -> torch.Tensor | None:
    """One step of Algorithm 1 [DDPM], on a batch x0:

        t ~ Uniform({1, …, T}),  ε ~ N(0, I)
        loss = ‖ε − ε_θ(x_t, t)‖²   (diffusion_loss)
        Adam step on ∇loss, then the EMA update

    t and ε are drawn here from the generator g (how
    notebook 03 runs it), or come already drawn: the
    training loop takes them from epoch_batches, which
    draws them in the epoch generator's order so that
    a resumed run repeats them exactly.

    y: class labels (conditional models); lr: this
    step's learning rate (None: leave it); net: the
    module that computes the loss (DDP's wrapper when
    distributed; default model); check(loss): False
    skips the update (the loop's stop signal), and it
    may raise (a non-finite loss). Returns the loss,
    computed before the update, or None if skipped.
    """
    if t is None:
        t = fp.sample_t(len(x0), g).to(x0.device)
    if eps is None:
        eps = torch.randn(x0.shape, generator=g)
        eps = eps.to(x0.device)
    with autocast(x0.device, cfg.bf16):
        loss = diffusion_loss(net or model, fp,
                              x0, t, eps, y)
    if check is not None and not check(loss):
        return None
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr
    optimizer_step(model, ema, opt, loss, cfg)
    return loss


def planned_runs(profile: str | None = None) -> list[tuple[dict, object]]:
    """(config overrides, fold) of every run the notebooks use: the 5 corrected folds, the
    generation model (on every training image), and on fold 0 the report-faithful target and
    the report's random split, then the class-conditional generation model. Fold 0 and the
    generation model come first: they are what the later notebooks need most when a CPU run is
    cut short. A fine-tuned profile (Config.init, e.g. native) has fold 0's corrected and
    report-faithful runs only."""
    if profile is not None and PROFILES[profile].get("init"):
        return [({}, 0), (dict(target="scaled_eps"), 0)]
    return ([({}, 0), ({}, "all")] + [({}, k) for k in range(1, 5)]
            + [(dict(target="scaled_eps"), 0), (dict(split="random"), 0),
               (dict(conditional=True), "all")])


def describe_run(cfg: Config, seed: int | None = None,
                 runs=None) -> str:
    """The settings a notebook runs with, to print in
    its setup cell: the profile (and where it came
    from), the seed, the device and precision, and
    for each run the weights it loads — committed or
    local, with the path — or that it is missing.

    runs: (config overrides, fold) pairs, default
    planned_runs(cfg.profile)."""
    env = os.environ.get("DDPM_PROFILE")
    src = ("DDPM_PROFILE" if env == cfg.profile else
           "the default" if not env and cfg.profile == "cpu"
           else "PROFILE")
    prec = os.environ.get("DDPM_PRECISION") or "measured"
    seed = cfg.seed if seed is None else seed
    lines = [f"profile {cfg.profile} (from {src}), "
             f"seed {seed}, device {get_device()}; "
             f"evaluation and sampling in fp32, "
             f"training precision {prec} (DDPM_PRECISION)"]
    for over, fold in (planned_runs(cfg.profile)
                       if runs is None else runs):
        try:
            c = get_config(cfg.profile, generation=fold == "all",
                           **{**dict(root=cfg.root), **over})
        except DataError as e:        # a conditional run counts the classes
            lines.append(f"  {over} {fold}: {e}")
            continue
        w = weights(c, fold)
        export = committed_dir(c, fold) / "ema_fp16.pt"
        kind = ("missing" if not w.exists() else
                "committed" if w == export else
                "local, preferred to the committed export"
                if export.exists() else "local")
        try:
            shown = w.relative_to(c.home)
        except ValueError:
            shown = w
        lines.append(f"  {c.run_name(fold):24s} {kind}: {shown}")
    return "\n".join(lines)


def train_command(cfg: Config, fold, out: Path | str | None = None) -> str:
    """The command line that trains (and with --resume continues) this run."""
    cmd = f"python -m ddpm_cli train --profile {cfg.profile} --fold {fold}"
    cmd += f" --target {cfg.target}" * (cfg.target != "eps")
    cmd += f" --split {cfg.split}" * (cfg.split != "grouped")
    cmd += " --conditional" * bool(cfg.n_classes)
    if out is not None and Path(out).resolve() != cfg.run_dir(fold).resolve():
        cmd += f" --out {out}"
    return cmd


def committed_dir(cfg: Config, fold) -> Path:
    """Where a run's committed export lives: data/checkpoints/runs/<profile>/ + its run_name,
    holding ema_fp16.pt (ddpm_train.export_ema) and history.csv."""
    return cfg.home / "data" / "checkpoints" / "runs" / cfg.profile / cfg.run_name(fold)


def weights(cfg: Config, fold, committed: bool = False) -> Path:
    """The one answer to "which weights does this run use?": the local run's best.pt where it
    exists, else the committed export (committed=True: the committed export first). The path
    may not exist; load_model then says how to train it."""
    local, export = cfg.run_dir(fold) / "best.pt", committed_dir(cfg, fold) / "ema_fp16.pt"
    return next((p for p in ((export, local) if committed else (local, export)) if p.exists()),
                local)


def uses_committed(cfg: Config, fold, retrain: bool = False) -> bool:
    """Whether a run is taken from its committed export instead of trained: the export exists,
    no local run has started (runs/…/checkpoint.pt), and retrain is False."""
    return (not retrain and (committed_dir(cfg, fold) / "ema_fp16.pt").exists()
            and not (cfg.run_dir(fold) / "checkpoint.pt").exists())


def run_history(cfg: Config, fold) -> pd.DataFrame | None:
    """A run's history: the local run's, else the committed one, else None."""
    for d in (cfg.run_dir(fold), committed_dir(cfg, fold)):
        if (d / "history.csv").exists():
            return pd.read_csv(d / "history.csv")
    return None


def load_model(cfg: Config, fold=0, path: Path | str | None = None) -> UNet:
    """The EMA weights of a trained run in eval mode, on the CPU: `path` (a best.pt or an
    export), else weights(cfg, fold)."""
    path = Path(path) if path is not None else weights(cfg, fold)
    if not path.exists():
        ckpt = path.parent / "checkpoint.pt"
        advice = (f"{ckpt} exists: continue that run with `{train_command(cfg, fold, path.parent)}"
                  f" --resume` (if it had finished, its best weights are gone: delete "
                  f"{path.parent} and train again)" if ckpt.exists() else
                  f"train it first with `{train_command(cfg, fold, path.parent)}`")
        raise FileNotFoundError(f"{path} not found: {advice}")
    ck = load_checkpoint(path, need=("config", "ema"))
    check_config(ck["config"], cfg, path)
    model = build_model(cfg, torch.device("cpu"), verbose=False)
    load_state(model, ck["ema"], path)                    # fp16 exports are cast to fp32
    model.classes = ck.get("classes")                    # a conditional model's class names
    return model.eval().requires_grad_(False)


def trained(cfg: Config, fold, progress: bool = True, retrain: bool = False
            ) -> pd.DataFrame | None:
    """A run's history; it never trains.

    Where uses_committed: the committed history (None
    where none is committed). Otherwise the local run's
    history, if its weights (best.pt) exist. A run not
    trained yet is an error naming the command that
    trains it (the command line trains: `train`,
    `train-all`, `make train`); retrain=True refuses
    the committed export. `progress` is unused (kept
    for callers)."""
    if uses_committed(cfg, fold, retrain):
        return run_history(cfg, fold)
    run = cfg.run_dir(fold)
    if (run / "best.pt").exists():
        return run_history(cfg, fold)
    cmd = train_command(cfg, fold)
    if (run / "checkpoint.pt").exists():
        cmd += " --resume"
    raise FileNotFoundError(
        f"{run} has no trained model: train it with "
        f"`{cmd}` (at most {cfg.max_epochs} epochs"
        f"{time_hint(cfg, fold)}), or every run of "
        f"the profile with "
        f"`python -m ddpm_cli train-all --profile "
        f"{cfg.profile}`")


def time_hint(cfg: Config, fold) -> str:
    """', about N min' from a history of the same run
    (local, else committed: its minutes per epoch ×
    max_epochs), or '' where there is none."""
    h = run_history(cfg, fold)
    if h is None or not len(h) or "seconds" not in h:
        return ""
    minutes = h.seconds.mean() * cfg.max_epochs / 60
    return f", up to about {minutes:.0f} min at the last run's speed"


def run_summary(cfg: Config, fold, history: pd.DataFrame) -> dict:
    """One row of the training table: the run, its epochs, its best epoch (whose EMA weights are
    kept in best.pt), whether early stopping ended it, and its time."""
    best = history.loc[history.val_loss.idxmin()]
    return dict(run=cfg.run_name(fold),
                epochs=len(history), best_epoch=int(best.epoch), best_val_loss=best.val_loss,
                final_train_loss=history.train_loss.iloc[-1],
                early_stopped=len(history) < cfg.max_epochs, minutes=history.seconds.sum() / 60,
                images_per_s=history.images_per_s.median())


def training_summary(runs: list[tuple[Config, object, pd.DataFrame | None]],
                     cfg: Config) -> pd.DataFrame:
    """The training table (figures/training_summary.csv): a run_summary row per (config, fold,
    history); a run without a history (a committed model whose history is not committed) keeps
    its row from the table already in cfg.fig_dir(), if it has one."""
    path = cfg.fig_dir() / "training_summary.csv"
    if not path.exists() and (cfg.committed_dir() / path.name).exists():
        path = cfg.committed_dir() / path.name                # a scratch run starts from it
    old = pd.read_csv(path).set_index("run") if path.exists() else pd.DataFrame()
    rows = []
    for c, fold, h in runs:
        if h is not None:
            rows.append(run_summary(c, fold, h))
        elif (name := c.run_name(fold)) in old.index:
            rows.append(dict(run=name, **old.loc[name].to_dict()))
    return pd.DataFrame(rows)


# -----------------------------------------------------------------------------------------------
# evaluation: the report's Table 1 (one-step x̂0, SSIM) and leakage


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win: int = 7) -> torch.Tensor:
    """SSIM per image of two batches (B, C, H, W) in [0, data_range], computed as scikit-image's
    structural_similarity(x, y, channel_axis=0, data_range=data_range) with its defaults: a 7×7
    uniform window, sample covariance, K1 = 0.01, K2 = 0.03, averaged over the valid region
    (skimage crops the (win-1)/2 border) and the channels. A test checks it against skimage."""
    x, y = x.double(), y.double()
    mu = lambda z: F.avg_pool2d(z, win, stride=1)                       # valid region only
    ux, uy = mu(x), mu(y)
    n = win * win / (win * win - 1)                                     # sample covariance
    vx, vy, vxy = n * (mu(x * x) - ux * ux), n * (mu(y * y) - uy * uy), n * (mu(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).float()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    mse = (x.double() - y.double()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return (10 * torch.log10(data_range ** 2 / mse)).float()


def nearest_train(x: torch.Tensor, train: torch.Tensor, batch: int = 64):
    """For each image (N, 3, H, W) in [-1, 1]: its nearest training image (uint8 (M, 3, H, W)),
    nearest by pixel L2 distance → (SSIM to it (N,), its index in train (N,)). SSIM near 1
    means a copy; compare with real test images."""
    tr = to_float(train).flatten(1)                                    # (M, D)
    sims, idx = [], []
    for i in range(0, len(x), batch):
        q = x[i:i + batch].float()
        j = torch.cdist(q.flatten(1), tr).argmin(1)
        sims.append(ssim(to_unit(q), to_unit(tr[j].view_as(q))))
        idx.append(j)
    return torch.cat(sims), torch.cat(idx)


def nearest_ssim(x: torch.Tensor, train: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The SSIM of each image to its nearest training image (see nearest_train)."""
    return nearest_train(x, train, batch)[0]


def decode_x0(fp: Diffusion, xt: torch.Tensor, t: torch.Tensor, out: torch.Tensor,
              decode: str = "eps") -> torch.Tensor:
    """The one-step x̂0 of Table 1 from the network's output `out`, in [0, 1]. decode: 'eps'
    reads the output as ε and solves Eq. 4 for x0 (Eq. 15); 'eq5' is the report's
    scaler·(x_t − output) (report_x0); 'alpha' the same with 1/√α_t alone, where the report
    started (too dark)."""
    if decode in ("eq5", "alpha"):
        return report_x0(xt, t, out, decode)
    return to_unit(fp.predict_x0(xt, t, fp.eps_from_output(xt, t, out)))


@torch.no_grad()
def reconstruct(model, fp: Diffusion, xt: torch.Tensor, t: torch.Tensor,
                decode: str = "eps") -> torch.Tensor:
    """The one-step x̂0 of Table 1, in [0, 1], in fp32: the model's output decoded (decode_x0)."""
    return decode_x0(fp, xt, t, model(xt, t).float(), decode)


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images in [0, 1] resized to size×size, bilinear (align_corners=False), clamped."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


# Table 1's yardsticks that need no network: x̂0 = x_t/√ᾱ_t as it is (the noise left in), and
# scikit-image's total-variation denoiser (Chambolle) of it with weight c·σ_t, where
# σ_t = ½·√((1−ᾱ_t)/ᾱ_t) is the noise's standard deviation in x_t/√ᾱ_t on the [0, 1] scale and
# the factor c is chosen on training images, never on the test images Table 1 scores
# (tv_weight_choice).
YARDSTICKS = ("x_t/√ᾱ_t", "TV denoiser")
TV_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)             # the factors c that tv_weight_choice tries


def yardstick_x0(fp: Diffusion, xt: torch.Tensor, t: torch.Tensor, how: str,
                 tv_weight: float = 1.0) -> torch.Tensor:
    """A one-step x̂0 in [0, 1] without a network (YARDSTICKS): 'x_t/√ᾱ_t', or 'TV denoiser'
    (denoise_tv_chambolle of the unclipped x_t/√ᾱ_t, weight tv_weight·σ_t, then clipped)."""
    ab = fp.at(fp.alpha_bar, t).cpu()
    u = (xt.cpu().float() / ab.sqrt() + 1) / 2                # x_t/√ᾱ_t on the [0, 1] scale
    if how == "x_t/√ᾱ_t":
        return u.clamp(0, 1)
    if how != "TV denoiser":
        raise ValueError(f"a yardstick is one of {YARDSTICKS}, not {how!r}")
    from skimage.restoration import denoise_tv_chambolle
    sigma = 0.5 * ((1 - ab) / ab).sqrt().flatten()
    out = [denoise_tv_chambolle(x.permute(1, 2, 0).numpy(), weight=tv_weight * s.item(),
                                channel_axis=-1) for x, s in zip(u, sigma)]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().clamp(0, 1)


@torch.no_grad()
def one_step_eval(model, fp: Diffusion, images: torch.Tensor, ts=TABLE1_T, seed: int = 0,
                  decode: str | tuple = "eps", batch: int = 8,
                  hires: torch.Tensor | None = None, tv_weight: float = 1.0) -> pd.DataFrame:
    """The report's Table 1 protocol for one model: noise the images (uint8) to each t with fixed
    seeded noise, predict x̂0 in one step (decode_x0, `decode`), and score SSIM and PSNR
    against the ground truth in [0, 1]; brightness is x̂0's mean. A tuple of decodings scores
    each from one network evaluation, in a `decode` column. model None: `decode` names a
    yardstick (yardstick_x0, with tv_weight) that sees the same x_t. hires: the same images at
    the dataset's resolution (uint8, e.g. 100×100): x̂0 is also upsampled to it (upsample) and
    scored against them (ssim_hr, psnr_hr). One row per image and t (and decoding). batch 8:
    on 2 cores, batches that fit the cache run fastest (fp32 at 100×100, AMX Xeon: 32 img/s at 8,
    22 at 250; at 32×32 276 against 215); the noise is drawn in the same order at any batch."""
    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    decodes = (decode,) if isinstance(decode, str) else tuple(decode)
    rows = []
    for t_val in ts:
        g = torch.Generator().manual_seed(seed * 100_003 + t_val)
        for i in range(0, len(images), batch):
            x0 = to_float(images[i:i + batch])
            t = torch.full((len(x0),), t_val, dtype=torch.long)
            xt = fp.q_sample(x0, t, torch.randn(x0.shape, generator=g)).to(device)
            out = model(xt, t.to(device)).float() if model is not None else None
            gt = to_unit(x0)
            for dec in decodes:
                rec = (decode_x0(fp, xt, t.to(device), out, dec) if model is not None
                       else yardstick_x0(fp, xt, t, dec, tv_weight)).cpu()
                r = dict(t=t_val, ssim=ssim(rec, gt), psnr=psnr(rec, gt),
                         brightness=rec.mean(dim=(1, 2, 3)))
                if hires is not None:
                    up = upsample(rec, hires.shape[-1])
                    gt_hr = to_unit(to_float(hires[i:i + batch]))
                    r.update(ssim_hr=ssim(up, gt_hr), psnr_hr=psnr(up, gt_hr))
                r = pd.DataFrame({k: v if k == "t" else v.numpy() for k, v in r.items()})
                rows.append(r if isinstance(decode, str) else r.assign(decode=dec))
    return pd.concat(rows, ignore_index=True)


def by_decoding(methods: dict) -> dict:
    """{target: {method: decoding}} of a TABLE1_METHODS-like dict: the methods that share one
    model, so that one network evaluation serves all its decodings (one_step_eval)."""
    out = {}
    for method, (target, decode) in methods.items():
        out.setdefault(target, {})[method] = decode
    return out


def upsampling_ceiling(cfg: Config, size: int = 100, n: int | None = None) -> pd.DataFrame:
    """What a perfect x̂0 at cfg's image size scores at the dataset's size×size: each evaluation
    image read at cfg.image_size (read_image's antialiased resize), upsampled back (upsample)
    and scored against its size×size original. One row: ssim_hr_mean, ssim_hr_std, psnr_hr_mean,
    n."""
    small, big = eval_images(cfg, n), eval_images(cfg, n, size)
    up, gt = upsample(to_unit(to_float(small)), size), to_unit(to_float(big))
    s, p = ssim(up, gt), psnr(up, gt)
    return pd.DataFrame([dict(ssim_hr_mean=s.mean().item(), ssim_hr_std=s.std().item(),
                              psnr_hr_mean=p.mean().item(), n=len(s))])


@torch.no_grad()
def scale_response(model, fp: Diffusion, images: torch.Tensor, ts=(100, 300, 500, 700, 900,
                   1000), c: float = 1.1, seed: int = 0) -> pd.DataFrame:
    """Whether ε̂ follows the scale of its input: images (uint8) noised to each t (Eq. 4), the
    mean of ‖ε̂(c·x_t, t)‖ / ‖ε̂(x_t, t)‖. At large t the ideal ε̂ ≈ x_t grows with it (ratio →
    c); the report's U-Net (bias-free convolutions into GroupNorm(1, C)) gives ratio 1. fp on
    the model's device. One row per t: t, ratio, and c."""
    device = next(model.parameters(), torch.empty(0)).device
    x0 = to_float(images).to(device)
    rows = []
    for t_val in ts:
        g = torch.Generator().manual_seed(seed * 100_003 + t_val)
        t = torch.full((len(x0),), t_val, dtype=torch.long, device=device)
        xt = fp.q_sample(x0, t, torch.randn(x0.shape, generator=g).to(device))
        a, b = eps_hat(model, fp, c * xt, t), eps_hat(model, fp, xt, t)
        ratio = (a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).mean().item()
        rows.append(dict(t=t_val, ratio=ratio, c=c))
    return pd.DataFrame(rows)


def eval_images(cfg: Config, n: int | None = None, size: int | None = None) -> torch.Tensor:
    """A seeded subset of the test images (uint8) at cfg.image_size (or `size`), the same for
    every model of a profile."""
    index = load_index(cfg)
    test = index[index.split == "test"]
    n = n or EVAL[cfg.profile]["n_eval"]
    test = test.sample(n=min(n, len(test)), random_state=cfg.seed).sort_index()
    return Fruits(test, cfg.home / cfg.data_dir / "fruits-360", size or cfg.image_size).images


def split_leakage(cfg: Config, fold: int = 0) -> pd.DataFrame:
    """For every validation image of a fold: the SSIM of its nearest training image under the
    report's random split and under the grouped split. High under 'random' means near-copies of
    validation images were trained on (leakage). One row per split and validation image:
    split, path, ssim (the two splits' validation sets differ in size)."""
    index = load_index(cfg)
    root = cfg.home / cfg.data_dir / "fruits-360"
    parts = []
    for split in ("random", "grouped"):
        idx = index if split == "grouped" else assign_folds(index, split="random", seed=cfg.seed)
        tr, val = fold_rows(idx, fold, PURGE_K if split == "grouped" else 0)
        val = val.sort_values("path")
        x = to_float(Fruits(val, root, cfg.image_size).images)
        sims = nearest_ssim(x, Fruits(tr, root, cfg.image_size).images).numpy()
        parts.append(pd.DataFrame(dict(split=split, path=val.path.to_numpy(), ssim=sims)))
    return pd.concat(parts, ignore_index=True)


def leakage_table(histories: dict) -> pd.DataFrame:
    """Per split ({name: history}), the validation and the Test/ loss (both with fixed noise and
    t) at the best epoch and at the last, and Test/ ÷ validation: above 1, the validation loss
    is optimistic about images the model has not seen."""
    rows = []
    for name, h in histories.items():
        for when, r in (("best epoch", h.loc[h.val_loss.idxmin()]), ("last epoch", h.iloc[-1])):
            rows.append(dict(split=name, when=when, epoch=int(r.epoch), val_loss=r.val_loss,
                             test_loss=r.test_loss, test_over_val=r.test_loss / r.val_loss))
    return pd.DataFrame(rows)


def summarise(per_image: pd.DataFrame, by=("t",), batch: int = 64) -> pd.DataFrame:
    """Per group, for each score column (ssim, psnr, brightness, ssim_hr, psnr_hr where present):
    its mean, its std over the images (_std) and its std over the means of consecutive batches
    of `batch` images in the order evaluated (_std_batch; NaN where a group has one batch) — the
    report's "±" may be either spread. n: images per group."""
    by = list(by)
    cols = [c for c in ("ssim", "psnr", "brightness", "ssim_hr", "psnr_hr") if c in per_image]
    g = per_image.groupby(by)
    out = g[cols].agg(["mean", "std"])
    out.columns = [f"{c}_{a}" for c, a in out.columns]
    out["n"] = g.size()
    spread = per_image.groupby(by + [g.cumcount() // batch])[cols].mean()
    spread = spread.groupby(level=list(range(len(by)))).std().add_suffix("_std_batch")
    return out.reset_index().merge(spread.reset_index(), on=by)


# Table 1's methods: name → (the model's target, the decoding of its output; DECODINGS).
TABLE1_METHODS = {"corrected": ("eps", "eps"), "report-faithful": ("scaled_eps", "eq5"),
                  "report-faithful, 1/√α_t decoding": ("scaled_eps", "alpha")}


def table1(cfg: Config, folds=range(5), ts=TABLE1_T, progress: bool = True,
           n: int | None = None) -> pd.DataFrame:
    """Table 1 for every trained fold model (weights: local or committed) under each of
    TABLE1_METHODS, in fp32, on n test images (default EVAL's n_eval). Below 100×100 the reconstructions are also scored upsampled to the
    dataset's 100×100 (one_step_eval's hires). Long format: method, fold, t, then summarise's
    columns."""
    images = eval_images(cfg, n)
    hires = eval_images(cfg, n, 100) if cfg.image_size < 100 else None
    parts = []
    for target, methods in by_decoding(TABLE1_METHODS).items():
        c = dataclasses.replace(cfg, target=target)
        fp = Diffusion.from_config(c)
        for k in tqdm(folds, desc=f"Table 1, {target} models", disable=not progress):
            if weights(c, k).exists():
                per = one_step_eval(load_model(c, k), fp, images, ts, c.seed,
                                    tuple(methods.values()), hires=hires)
                for method, decode in methods.items():
                    parts.append(summarise(per[per.decode == decode].drop(columns="decode"))
                                 .assign(method=method, fold=k))
    if not parts:
        raise FileNotFoundError(f"no trained fold under {cfg.run_dir(0).parent}: train first")
    df = pd.concat(parts, ignore_index=True)
    return df[["method", "fold"] + [c for c in df.columns if c not in ("method", "fold")]]


def table1_wide(df: pd.DataFrame, method: str = "corrected") -> pd.DataFrame:
    """The report's layout: one row per t, one column per fold ('mean ± std'), and the mean."""
    d = df[df.method == method]
    wide = d.pivot(index="t", columns="fold", values="ssim_mean")
    std = d.pivot(index="t", columns="fold", values="ssim_std")
    out = pd.DataFrame(index=wide.index)
    for k in wide.columns:
        out[f"fold {k}"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(wide[k], std[k])]
    out["mean over folds"] = [f"{m:.3f} ± {s:.3f}" if np.isfinite(s) else f"{m:.3f}"
                              for m, s in zip(wide.mean(axis=1), wide.std(axis=1))]
    return out.reset_index()


def report_table1() -> pd.DataFrame:
    """The report's own Table 1, every cell: t, fold (0–4), ssim_mean, ssim_std, typed from the
    report (data/report_table1.csv says where)."""
    return pd.read_csv(ROOT / "data" / "report_table1.csv", comment="#")


def table1_vs_report(df: pd.DataFrame, report: pd.DataFrame,
                     ceiling: pd.DataFrame | None = None) -> pd.DataFrame:
    """Ours beside the report's at every t: the report's mean over its folds and its lowest and
    highest fold; per method of ours, the mean over folds (fold range in the by-fold tables) at
    our resolution and, where scored, upsampled to 100×100 (_100); the upsampling ceiling."""
    rep = report.groupby("t").ssim_mean.agg(["mean", "min", "max"])
    out = pd.DataFrame({"t": rep.index, "report": rep["mean"].to_numpy(),
                        "report lowest": rep["min"].to_numpy(),
                        "report highest": rep["max"].to_numpy()})
    for method, d in df.groupby("method", sort=False):
        m = d.groupby("t")
        out[method] = out.t.map(m.ssim_mean.mean())
        if "ssim_hr_mean" in d:
            out[f"{method} 100"] = out.t.map(m.ssim_hr_mean.mean())
    if ceiling is not None:
        out["ceiling 100"] = ceiling.ssim_hr_mean.iloc[0]
    return out



def save_table1(cfg: Config, df: pd.DataFrame) -> pd.DataFrame:
    """Write a table1 frame where notebook 04 and `evaluate --what table1` both put it:
    table1_ssim, the report's layout for the corrected and report-faithful methods
    (table1_*_by_fold), the comparison with the report at every t (table1_vs_report, with the
    upsampling ceiling where scored) and its figure (04_ssim_vs_t). Returns the comparison."""
    import matplotlib.pyplot as plt
    save_table(df, "table1_ssim", cfg)
    for method in ("corrected", "report-faithful"):
        if method in df.method.values:
            save_table(table1_wide(df, method), f"table1_{method.replace('-', '_')}_by_fold", cfg)
    ceiling = upsampling_ceiling(cfg, n=int(df.n.iloc[0])) if "ssim_hr_mean" in df else None
    vs = table1_vs_report(df, report_table1(), ceiling)
    save_table(vs.round(6), "table1_vs_report", cfg)
    axes = plot_table1(df, report_table1(), None if ceiling is None else ceiling.ssim_hr_mean[0])
    save_fig(axes[0].figure, "04_ssim_vs_t", cfg)
    plt.close(axes[0].figure)
    return vs

# The native Table 1's methods: TABLE1_METHODS, and the report-faithful model decoded as the
# corrected method decodes (its output divided by √(1−ᾱ_t) read as ε, Eq. 15), so that the
# target and the decoding can be told apart.
NATIVE_METHODS = {**TABLE1_METHODS, "scaled-ε model, decoded as ε": ("scaled_eps", "eps")}


def tv_weight_choice(cfg: Config, n: int = 32, ts=(50, 200, 400, 600, 800),
                     grid=TV_GRID) -> pd.DataFrame:
    """The TV yardstick's weight factor c (yardstick_x0), chosen where Table 1 never looks: on n
    seeded training images of fold 0 at cfg's size, the mean SSIM over `ts` of each c in grid.
    One row per c (tv_weight, ssim_mean, n), the best first."""
    tr, _ = fold_rows(load_index(cfg), 0)
    tr = tr.sample(n=min(n, len(tr)), random_state=cfg.seed).sort_index()
    images = Fruits(tr, cfg.home / cfg.data_dir / "fruits-360", cfg.image_size).images
    fp = Diffusion.from_config(cfg)
    rows = [dict(tv_weight=c, ssim_mean=one_step_eval(None, fp, images, ts, cfg.seed + 1,
                                                      "TV denoiser", tv_weight=c).ssim.mean(),
                 n=len(images)) for c in grid]
    return pd.DataFrame(rows).sort_values("ssim_mean", ascending=False, ignore_index=True)


def table1_native(cfg: Config, small: Config, tv_weight: float, fold: int = 0,
                  n: int | None = None, ts=TABLE1_T, progress: bool = True) -> pd.DataFrame:
    """Table 1 at cfg's resolution (the native profile: the dataset's 100×100) for one fold, every
    row on the same n test images (eval_images) and, at cfg's size, the same noise: cfg's models
    under NATIVE_METHODS; `small`'s models of that fold (the cpu profile's 32×32) scored upsampled
    to cfg's size (one_step_eval's hires); a perfect small x̂0 upsampled (the ceiling, the same at
    every t); and YARDSTICKS (TV with tv_weight, see tv_weight_choice). All in fp32. Long format:
    method, resolution, kind ('native', 'upsampled', 'ceiling' or 'no network'), t, then
    summarise's columns."""
    n = n or EVAL[cfg.profile]["n_eval"]
    images, low = eval_images(cfg, n), eval_images(small, n)         # the same rows, two sizes
    size, parts = cfg.image_size, []

    def add(per, method, res):
        kind = ("no network" if "no network" in res else "ceiling" if method.startswith("ceiling")
                else "upsampled" if "upsampled" in res else "native")
        parts.append(summarise(per).assign(method=method, resolution=res, kind=kind))

    groups = by_decoding(NATIVE_METHODS)
    bar = tqdm(total=2 * len(groups) + 1 + len(YARDSTICKS), disable=not progress,
               desc=f"Table 1 at {size}×{size}")
    for base in (cfg, small):
        for target, methods in groups.items():
            c = dataclasses.replace(base, target=target)
            if weights(c, fold).exists():
                model, fp = load_model(c, fold), Diffusion.from_config(c)
                decodes = tuple(methods.values())
                if c.image_size == size:
                    per, res = one_step_eval(model, fp, images, ts, c.seed, decodes), f"{size}×{size}"
                else:                                  # scored at `size`: its x̂0 upsampled
                    per = one_step_eval(model, fp, low, ts, c.seed, decodes, hires=images)
                    per = per.drop(columns=["ssim", "psnr"]).rename(
                        columns={"ssim_hr": "ssim", "psnr_hr": "psnr"})
                    res = f"{c.image_size}×{c.image_size} upsampled"
                for method, decode in methods.items():
                    add(per[per.decode == decode].drop(columns="decode"), method, res)
            bar.update()
    up, gt = upsample(to_unit(to_float(low)), size), to_unit(to_float(images))
    s, p = ssim(up, gt).numpy(), psnr(up, gt).numpy()
    add(pd.concat([pd.DataFrame(dict(t=t, ssim=s, psnr=p, brightness=up.mean(dim=(1, 2, 3))
                                     .numpy())) for t in ts], ignore_index=True),
        "ceiling: a perfect x̂0", f"{small.image_size}×{small.image_size} upsampled")
    bar.update()
    fp = Diffusion.from_config(cfg)
    for how in YARDSTICKS:
        add(one_step_eval(None, fp, images, ts, cfg.seed, how, tv_weight=tv_weight),
            how + (f" (weight {tv_weight:g}·σ_t)" if how == "TV denoiser" else ""),
            f"{size}×{size}, no network")
        bar.update()
    bar.close()
    df = pd.concat(parts, ignore_index=True)
    first = ["method", "resolution", "kind"]
    return df[first + [c for c in df.columns if c not in first]]


def table1_native_wide(df: pd.DataFrame, report: pd.DataFrame) -> pd.DataFrame:
    """table1_native beside the report: one row per t; the report's five folds, then each row of
    ours as 'mean ± std' over the test images."""
    ts = sorted(set(df.t))
    out = report.pivot(index="t", columns="fold", values="ssim_mean").loc[ts]
    std = report.pivot(index="t", columns="fold", values="ssim_std").loc[ts]
    wide = pd.DataFrame(index=out.index)
    for k in out.columns:
        wide[f"report fold {k}"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(out[k], std[k])]
    for (method, res), d in df.groupby(["method", "resolution"], sort=False):
        d = d.set_index("t")
        wide[f"{method} ({res})"] = [f"{d.ssim_mean[t]:.3f} ± {d.ssim_std[t]:.3f}"
                                     for t in wide.index]
    return wide.reset_index()


def native_findings(df: pd.DataFrame, report: pd.DataFrame, ts=(50, 250, 500, 800, 1000),
                    low=(50, 250)) -> tuple[pd.DataFrame, list[str]]:
    """What table1_native decides about the report's Table 1, from its numbers: a table at `ts`
    (the report's fold 0 and fold range, then each row of ours), and sentences on resolution
    (native vs upsampled corrected model), target (the scaled-ε model decoded as ε vs the
    corrected one), decoding (Eq. 5 vs Eq. 15 on the scaled-ε model), which row follows the
    report's fold mean closest at low t (`low`: the report's plateau, inclusive) and over all t,
    and the network-free yardsticks."""
    rep = report.groupby("t").ssim_mean.agg(["mean", "min", "max"]).loc[sorted(set(df.t))]
    ts = [t for t in ts if t in rep.index]
    rows = {}
    for (method, res, kind), d in df.groupby(["method", "resolution", "kind"], sort=False):
        rows[f"{method}, {res}"] = d.set_index("t").ssim_mean
    table = pd.DataFrame({"report fold 0": report.query("fold == 0").set_index("t").ssim_mean[rep.index],
                          "report range": [f"{a:.3f}–{b:.3f}" for a, b in zip(rep["min"], rep["max"])],
                          **rows}).loc[list(ts)]
    get = {(m, k): d.set_index("t").ssim_mean for (m, k), d in df.groupby(["method", "kind"])}
    C, U = get[("corrected", "native")], get.get(("corrected", "upsampled"))
    F, E = get.get(("report-faithful", "native")), get.get(("scaled-ε model, decoded as ε", "native"))
    A = get.get(("report-faithful, 1/√α_t decoding", "native"))
    tv = next(v for (m, k), v in get.items() if m.startswith("TV denoiser"))
    raw = get[("x_t/√ᾱ_t", "no network")]
    res = df.groupby("kind").resolution.first()            # e.g. '100×100', '32×32 upsampled'
    big, small = res["native"], res.get("upsampled", "").removesuffix(" upsampled")
    t0, t1 = ts[0], ts[2]
    say = [f"At t = {t0} the report's five folds score {rep['mean'][t0]:.3f} ({rep['min'][t0]:.3f}–"
           f"{rep['max'][t0]:.3f}); our corrected model trained at {big} scores {C[t0]:.3f}"
           + (f", the {small} one upsampled {U[t0]:.3f}" if U is not None else "") + "."]
    if U is not None:
        say.append(f"Resolution: seeing {big} pixels moves the corrected model by {C[t0] - U[t0]:+.3f} "
                   f"at t = {t0} and {C[t1] - U[t1]:+.3f} at t = {t1} against the upsampled {small} "
                   f"model.")
    if E is not None:
        say.append(f"Target: the model trained on the report's √(1−ᾱ_t)·ε, decoded as ε (Eq. 15), "
                   f"scores {E[t0]:.3f} at t = {t0} and {E[t1]:.3f} at t = {t1}, {E[t0] - C[t0]:+.3f} and "
                   f"{E[t1] - C[t1]:+.3f} from the corrected model.")
    if E is not None and F is not None:
        say.append(f"Decoding: the same model decoded the report's way (Eq. 5) scores {F[t0]:.3f} and "
                   f"{F[t1]:.3f}, {F[t0] - E[t0]:+.3f} and {F[t1] - E[t1]:+.3f} from Eq. 15"
                   + (f"; with 1/√α_t alone {A[t0]:.3f} and {A[t1]:.3f}." if A is not None else "."))
    nets = {name: v for name, v in rows.items() if "no network" not in name
            and not name.startswith("ceiling")}
    near = lambda sel: sorted((float((v[sel] - rep["mean"][sel]).abs().mean()), name)
                              for name, v in nets.items())
    lo = [t for t in rep.index if low[0] <= t <= low[1]]
    (d_lo, n_lo), (d_all, n_all) = near(lo)[0], near(list(rep.index))[0]
    say.append(f"Closest to the report: at t = {low[0]}–{low[1]} (its plateau) the row nearest the "
               f"report's fold mean is {n_lo} (mean |ΔSSIM| {d_lo:.3f}); over all {len(rep)} t it is "
               f"{n_all} ({d_all:.3f}).")
    beats = [int(t) for t in rep.index if tv[t] > rep["max"][t]]
    say.append(f"Without a network: x_t/√ᾱ_t scores {raw[t0]:.3f} at t = {t0} and the TV denoiser "
               f"{tv[t0]:.3f}; TV is above the report's best fold at {len(beats)} of {len(rep)} t"
               + (f" (t = {', '.join(map(str, beats))})" if beats else "") + f" and above our corrected "
               f"{big} model at {int((tv > C).sum())}.")
    return table.round(3).reset_index(names="t"), say


def native_verdict(df: pd.DataFrame, report: pd.DataFrame, t0: int = 50, low=(50, 250)) -> str:
    """The verdict of table1_native on the report's plateau (its flat SSIM at low t), in one or
    two sentences from the numbers at t0: the gap between the report's fold mean and our
    corrected model at the native size, what the target (scaled-ε model decoded as ε against the
    corrected one) and the decoding (Eq. 5 against Eq. 15 on the scaled-ε model) move there,
    and which row of ours follows the report closest at `low` t."""
    rep = report.groupby("t").ssim_mean.mean()
    get = {(m, k): d.set_index("t").ssim_mean for (m, k), d in df.groupby(["method", "kind"])}
    C, E = get[("corrected", "native")], get[("scaled-ε model, decoded as ε", "native")]
    F = get[("report-faithful", "native")]
    gap, target, decoding = C[t0] - rep[t0], E[t0] - C[t0], F[t0] - E[t0]
    lo = [t for t in sorted(set(df.t)) if low[0] <= t <= low[1]]
    rows = {f"{m}, {r}": d.set_index("t").ssim_mean for (m, r, k), d in
            df.groupby(["method", "resolution", "kind"]) if k in ("native", "upsampled")}
    dist, near = min((float((v[lo] - rep[lo]).abs().mean()), name) for name, v in rows.items())
    small = max(abs(target), abs(decoding)) < 0.5 * abs(gap)
    say = (f"At t = {t0} the report's folds average {rep[t0]:.3f}, {abs(gap):.3f} "
           f"{'below' if gap > 0 else 'above'} our corrected model trained at the same "
           f"resolution ({C[t0]:.3f}); there the report's target moves "
           f"our model by {target:+.3f} and its decoding by {decoding:+.3f}, so "
           + ("neither accounts for the report's plateau" if small else
              "they account for a share of the gap") + ".")
    return say + (f" The report's values at t = {low[0]}–{low[1]} are followed closest by {near} "
                  f"(mean |ΔSSIM| {dist:.3f})" + (": reconstructions without the finer detail "
                  f"of the native resolution. What kept the report's own models there is not "
                  f"decided by this table." if "upsampled" in near else "."))


def save_table1_native(cfg: Config, df: pd.DataFrame, choice: pd.DataFrame) -> pd.DataFrame:
    """The one writer of the native Table 1 files in cfg's figure folder: table1_native (long,
    numeric), table1_native_wide (beside the report's folds), tv_weight_choice, and the figure
    04_ssim_vs_t_native. Returns the wide table."""
    import matplotlib.pyplot as plt
    save_table(df, "table1_native", cfg)
    save_table(choice, "tv_weight_choice", cfg)
    wide = table1_native_wide(df, report_table1())
    save_table(wide, "table1_native_wide", cfg)
    ax = plot_table1_native(df, report_table1())
    save_fig(ax.figure, "04_ssim_vs_t_native", cfg)
    plt.close(ax.figure)
    return wide


# -----------------------------------------------------------------------------------------------
# generation: the models of notebook 05


def generation_config(cfg: Config, conditional: bool = False) -> Config:
    """The Config of cfg's profile's generation model (GENERATION's recipe; conditional: its
    class-conditional twin), with cfg's root and data."""
    return get_config(cfg.profile, generation=True, conditional=conditional,
                      data_dir=cfg.data_dir, root=cfg.root)


# The profiles whose generation models are committed (data/checkpoints/): never trained implicitly.
COMMITTED_PROFILES = ("cpu",)


def generation_model(cfg: Config, conditional: bool = False, committed: bool = False) -> UNet:
    """The profile's generation model (conditional: the class-conditional one) on the device:
    weights() of its run ('all'). Where it has none it is an error naming the command that
    makes it: restoring the committed file (COMMITTED_PROFILES), else training (trained)."""
    gcfg = generation_config(cfg, conditional)
    path = weights(gcfg, "all", committed)
    if not path.exists():
        export = committed_dir(gcfg, "all") / "ema_fp16.pt"
        if cfg.profile in COMMITTED_PROFILES:
            rel = export.relative_to(gcfg.home)
            raise FileNotFoundError(f"the committed generation model {rel} is missing: "
                                    f"restore it with `git checkout -- {rel}`, or train it "
                                    f"with `{train_command(gcfg, 'all')}`")
        trained(gcfg, "all")                         # raises: the library never trains
    model = load_model(gcfg, "all", path)
    if conditional:                                  # its labels index the classes it stores
        check_model_classes(model.classes, sorted(load_index(gcfg).label.unique()), path,
                            gcfg.home / gcfg.data_dir / "index.csv")
    return model.to(get_device())


def check_model_classes(saved, classes: list, path: Path, index: Path) -> None:
    """Refuse a conditional model whose stored class names are not the index's (a class renamed,
    added or left out): its label i would draw another fruit than the index's i-th class."""
    if saved is None or list(saved) == list(classes):
        return
    only_model = [c for c in saved if c not in classes]
    only_index = [c for c in classes if c not in saved]
    what = (f"the model has {', '.join(only_model) or 'no other class'}, the index "
            f"{', '.join(only_index) or 'no other class'}" if only_model or only_index else
            "the same names in another order")
    raise DataError(f"{path} was trained on other classes than {index} ({what}): its labels would "
                    f"draw other fruit. Index the images it was trained on (`python -m ddpm_cli "
                    f"data --from ../shared/fruits-360-subset`), or train it on this index")


def story_models(cfg: Config) -> dict:
    """The two models of GEN_SAMPLERS, each as (model, its Diffusion) on the device:
    'fold0', the corrected fold-0 run (the report's U-Net under the report's protocol; where it
    is missing, trained names the command that trains it), and 'generation', the preconditioned
    generation_model."""
    dev = get_device()
    c = dataclasses.replace(cfg, target="eps", split="grouped")
    trained(c, 0, progress=False)
    return {"fold0": (load_model(c, 0).to(dev), Diffusion.from_config(c).to(dev)),
            "generation": (generation_model(cfg),
                           Diffusion.from_config(generation_config(cfg)).to(dev))}


# The rows of generation_metrics in the order of notebook 05's story: name → (model of
# story_models, method, sampler settings). The report's U-Net samples with DDPM, but its
# deterministic DDIM drifts (it cannot see ‖x_t‖), which clipping x̂0 hides; preconditioning
# fixes DDIM without clipping.
GEN_SAMPLERS = {
    "report's method, report's U-Net": ("fold0", "report", {}),
    "DDPM-1000, report's U-Net": ("fold0", "ddpm", {}),
    "DDIM-50 (η = 0), report's U-Net, x̂0 clipped": ("fold0", "ddim", dict(steps=50)),
    "DDIM-50 (η = 0), report's U-Net": ("fold0", "ddim", dict(steps=50, clip=False)),
    "DDPM-1000, preconditioned": ("generation", "ddpm", {}),
    "DDIM-50 (η = 0), preconditioned": ("generation", "ddim", dict(steps=50, clip=False)),
    "DDIM-20 (η = 0), preconditioned": ("generation", "ddim", dict(steps=20, clip=False)),
}


# The report's generation failure taken apart: from its U-Net, target and sampler as it wrote
# them, one change at a time. name → (model of cause_models, method, settings, the row it changes,
# the change). The report's decoding clips (report_x0), so clipping stays on until the row that
# takes it off; DDPM's Algorithm 2 as printed has no clipping, Ho et al.'s code clips x̂0.
# Sampled by `make generation-seeds` (generation_seeds: 64 samples a row, seeds 1–3).
CAUSES = {
    "report as written": ("report", "report", dict(decode="report"), "",
                          "trained on √(1−ᾱ_t)·ε; its iterative sampler (re-noise x̂0 to t−1), "
                          "x̂0 by its Eq. 5 (clipped)"),
    "ε target": ("fold0", "report", {}, "report as written",
                 "trained on ε, x̂0 by Eq. 15 (clipped); the same sampler"),
    "DDPM sampler": ("fold0", "ddpm", {}, "ε target",
                     "Algorithm 2: x_{t−1} from the posterior mean μ̃_t(x_t, x̂0) + √β_t·z"),
    "x̂0 not clipped": ("fold0", "ddpm", dict(clip=False), "DDPM sampler",
                        "x̂0 not clipped (Algorithm 2 exactly as printed)"),
    "preconditioning": ("generation", "ddpm", {}, "DDPM sampler",
                        "the generation model: EDM preconditioning, with its own recipe (every "
                        "training image, min-SNR-5, lr warm-up and cosine decay)"),
    "DDIM-50": ("generation", "ddim", dict(steps=50), "preconditioning",
                "deterministic DDIM-50 (η = 0), x̂0 clipped"),
    "DDIM-50, x̂0 not clipped": ("generation", "ddim", dict(steps=50, clip=False), "DDIM-50",
                                 "x̂0 not clipped: the committed sampler"),
    "DDIM-50 without preconditioning": ("fold0", "ddim", dict(steps=50), "DDPM sampler",
                                        "deterministic DDIM-50 (η = 0) with the report's U-Net, "
                                        "x̂0 clipped"),
    "DDIM-50 without preconditioning, not clipped": (
        "fold0", "ddim", dict(steps=50, clip=False), "DDIM-50 without preconditioning",
        "x̂0 not clipped: the drift"),
}


# CAUSES' main line, from the report as written to the committed sampler (each changes the one
# before it); the other rows branch off it.
CAUSE_CHAIN = ("report as written", "ε target", "DDPM sampler", "preconditioning", "DDIM-50",
               "DDIM-50, x̂0 not clipped")


def cause_models(cfg: Config) -> dict:
    """CAUSES' models: story_models' two and 'report', the report-faithful fold-0 model (its
    U-Net trained on √(1−ᾱ_t)·ε under its protocol; where it is missing, trained names the
    command that trains it)."""
    c = dataclasses.replace(cfg, target="scaled_eps", split="grouped")
    trained(c, 0, progress=False)
    return {**story_models(cfg), "report": (load_model(c, 0).to(get_device()),
                                            Diffusion.from_config(c).to(get_device()))}


# -----------------------------------------------------------------------------------------------
# sample quality: a fruit classifier's features instead of Inception (nothing to download)


class FruitClassifier(nn.Module):
    """A small CNN trained on the training split; its 128-d penultimate features stand in for
    Inception's in FID/KID ('FFD': Fréchet fruit distance)."""

    def __init__(self, n_classes: int, width: int = 32):
        super().__init__()
        w = width
        block = lambda a, b: nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b),
                                           nn.ReLU(), nn.Conv2d(b, b, 3, padding=1),
                                           nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, n_classes)

    def features(self, x):                                             # (B, 3, H, W) → (B, 4w)
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def classifier_path(cfg: Config) -> Path:
    """The profile's fruit classifier (fp16): committed, data/checkpoints/classifier_<profile>.pt,
    for a profile of COMMITTED_PROFILES; runs/<profile>/classifier.pt for any other."""
    if cfg.profile in COMMITTED_PROFILES:
        return cfg.home / "data" / "checkpoints" / f"classifier_{cfg.profile}.pt"
    return cfg.home / "runs" / cfg.profile / "classifier.pt"


def load_classifier(cfg: Config) -> tuple[FruitClassifier, list, float]:
    """The one yardstick of sample quality: (classifier, its classes, its test accuracy) from
    classifier_path. Missing, it is an error naming the
    command that trains it (the library never trains)."""
    path = classifier_path(cfg)
    if not path.exists():
        restore = (f"restore it with `git checkout -- {path.relative_to(cfg.home)}`, or "
                   if cfg.profile in COMMITTED_PROFILES else "")
        raise FileNotFoundError(f"the fruit classifier {path} is missing: {restore}train it "
                                f"with `python -m ddpm_cli classifier --profile {cfg.profile}`")
    ck = load_checkpoint(path)
    classes = sorted(load_index(cfg).label.unique())
    if (ck["classes"], ck["image_size"]) != (classes, cfg.image_size):
        raise ValueError(f"{path} was trained on other classes or another image size "
                         f"({len(ck['classes'])} classes, {ck['image_size']}px) than "
                         f"{cfg.data_dir}/index.csv at {cfg.image_size}px: retrain it with "
                         f"`python -m ddpm_cli classifier --profile {cfg.profile}`")
    clf = FruitClassifier(len(classes))
    clf.load_state_dict({k: v.float() if v.is_floating_point() else v
                         for k, v in ck["model"].items()})
    return clf.eval(), classes, ck["test_acc"]


@torch.no_grad()
def classify(clf: FruitClassifier, x: torch.Tensor, batch: int = 500):
    """(features (N, d) float64, probabilities (N, classes)) for images x in [-1, 1]."""
    fs, ps = [], []
    for i in range(0, len(x), batch):
        f = clf.features(x[i:i + batch].float())
        fs.append(f.double())
        ps.append(clf.head(f).softmax(1))
    return torch.cat(fs), torch.cat(ps)


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) between two feature sets (as FID, on our features)."""
    from scipy import linalg
    a, b = f1.double().numpy(), f2.double().numpy()
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eye = np.eye(len(s1)) * 1e-6                    # keeps sqrtm stable for small sample sets,
    s1, s2 = s1 + eye, s2 + eye                     # on both sides of the trace (else it is < 0)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# The fewest samples per set that KID is computed from (below: NaN, printed "n/a (n = …)"). Its
# unbiased estimate divides by m·(m−1): at m = 1 it is 0/0 (a RuntimeWarning), at m = 2 it read
# −3.3 (issue 44: one pair per set is noise).
KID_MIN_N = 4


def kid(f1: torch.Tensor, f2: torch.Tensor, subsets: int = 50, subset_size: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018) on our features: the unbiased MMD² with
    the cubic polynomial kernel k(x, y) = (x·y/d + 1)³, mean and std over random subsets; NaN
    (no warning) where a set has fewer than KID_MIN_N samples."""
    m = min(subset_size, len(f1), len(f2))
    if m < KID_MIN_N:                     # m·(m−1) samples pairs: below KID_MIN_N it reads noise
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    a, b = f1.double().numpy(), f2.double().numpy()
    d = a.shape[1]
    vals = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) +
                    (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def ratio_spread(a, a_std, b, b_std):
    """The std of a / b where a and b are independent estimates with stds a_std and b_std (first
    order): (a/b)·√((a_std/a)² + (b_std/b)²). For FFD ÷ its floor: the set's own spread (its
    bootstrap, or its spread over sampling seeds) and the floor's spread over its real draws."""
    return a / b * np.sqrt((a_std / a) ** 2 + (b_std / b) ** 2)


def ratio_of_positive(a, b):
    """a / b where both are > 0, else NaN: an unbiased KID can be ≤ 0 (at its noise level) and
    a ratio of it reads as nonsense (a "−3.12×")."""
    if np.isscalar(a):
        return a / b if a > 0 and b > 0 else float("nan")
    a = pd.Series(a, dtype=float)
    return (a / b).where((a > 0) & (b > 0))


def n_text(value, n, spec: str = ".3f", unit: str = "") -> str:
    """A metric for a sentence: the value formatted with spec (and unit), or "n/a (n = n)" where
    it is NaN (below its minimum n: KID_MIN_N, FFD's EVAL n_samples)."""
    if value is None or pd.isna(value):
        return f"n/a (n = {int(n)})"
    return f"{value:{spec}}{unit}"


def ffd_bootstrap_std(f: torch.Tensor, fr: torch.Tensor, boots: int = 20, seed: int = 0) -> float:
    """The spread of an FFD over its sample set: the std of the FFD of `boots` resamples of f
    (with replacement, the same size) against fr."""
    g = torch.Generator().manual_seed(seed)
    return float(np.std([frechet_distance(f[torch.randint(len(f), (len(f),), generator=g)], fr)
                         for _ in range(boots)]))


def floor_draws(clf: FruitClassifier, train: torch.Tensor, n: int, repeats: int = 5,
                seed: int = 0) -> list[torch.Tensor]:
    """The real sets a floor scores: classify features of `repeats` random subsets of n real
    training images (uint8), subset i drawn with seed seed+1+i (so independent of a row drawn
    with `seed`)."""
    return [classify(clf, to_float(train[torch.randperm(
        len(train), generator=torch.Generator().manual_seed(seed + 1 + i))[:n]]))[0]
        for i in range(repeats)]


def ffd_floor(clf: FruitClassifier, train: torch.Tensor, real_test: torch.Tensor, n: int,
              repeats: int = 5, seed: int = 0) -> tuple[float, float]:
    """What a perfect generator scores with n samples: the FFD of n real training images (uint8)
    against real_test (images, or their classify features), (mean, std) over floor_draws'
    `repeats` subsets. Like FID, FFD is biased upward for small n: compare a set with the floor at
    its own n."""
    fr = real_test if real_test.dim() == 2 else classify(clf, real_test)[0]
    d = [frechet_distance(f, fr) for f in floor_draws(clf, train, n, repeats, seed)]
    return float(np.mean(d)), float(np.std(d))


# Fidelity and coverage on k-nearest-neighbour manifolds of the real test images' classifier
# features (precision_coverage). Chosen by measurement with the committed classifier (cpu profile,
# n = 500 real training images against the reference, 20 draws, mean ± std): the test images are
# frames of one video per class, so a test image's nearest neighbours are its own neighbouring
# frames and small k makes tiny balls that other videos miss: k = 3 on 500 test images gives real
# images precision 0.44, density 0.30, coverage 0.29. A ball must reach across much of its class's
# video, and stay inside the class (else everything is inside: k = 50 of 500 test images, about
# 50 a class, gives the drifting DDIM-50 precision 0.48). The reference is FFD's, all 1714 test
# images (the smallest class has 156), with k = 100: real-vs-real precision 0.973 ± 0.006,
# coverage 0.984 ± 0.012 (density 0.80 ± 0.02: training and test are other videos); k = 50:
# 0.90 / 0.83, k = 75: 0.94 / 0.96; k = 30 of 500 test images: 0.958 / 0.971, spread 0.92–1.00.
# At k = 100, n = 500 (precision / coverage): the committed generation model's (preconditioned)
# DDIM-50 0.56 / 0.92, the report's U-Net's DDIM-50 unclipped (drifting) 0.03 / 0.12, clipped
# 0.28 / 0.16, one training image repeated 1.00 / 0.04, blurred (5×5, σ = 1.5) 0.38 / 0.28,
# colours shifted (±0.4 on red and blue) 0.07 / 0.03, Gaussian noise 0.00 / 0.00. Improved
# recall (Kynkäänniemi et al.'s, on the samples' own balls) is left out: it gives 1.00 to real
# images, the model and the drift alike (the drift's wide balls cover every test image).
MANIFOLD_K = 100
# The fewest samples a set gets precision, density and coverage from (below: NaN, printed
# "n/a (n = …)"): coverage falls with n (precision does not, 0.97 at any n), and real images
# reach 0.87 ± 0.04 at n = 64 (20 draws; 0.91 ± 0.03 at n = 100, 0.83 ± 0.05 at n = 50, 0.96 ±
# 0.02 at n = 200): below it coverage says more about n than about the samples. 64 is the cause
# table's n (its 1000-step samplers are slow: `make generation-seeds`).
MANIFOLD_MIN_N = 64
MANIFOLD = ("precision", "density", "coverage")          # precision_coverage's measures


def precision_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = MANIFOLD_K) -> dict:
    """Fidelity and coverage of fake features (M, d) on the real ones (N, d), from one k-NN
    radius per real point: B_j is the ball around real r_j whose radius is the distance to r_j's
    k-th nearest other real point, and with 1[·] an indicator
    precision (Kynkäänniemi et al. 2019) = (1/M) Σ_i 1[f_i ∈ ∪_j B_j], the share of fakes on
    the real manifold; density (Naeem et al. 2020) = (1/kM) Σ_i Σ_j 1[f_i ∈ B_j], how many real
    balls hold a fake, ÷ k (about 1 for fakes drawn like the reals, above 1 where they crowd);
    coverage (Naeem et al. 2020) = (1/N) Σ_j 1[∃ i: f_i ∈ B_j], the share of real balls holding
    a fake. Returns {MANIFOLD's name: value}; NaN where there are no fakes or not more than k
    reals (no k-th neighbour)."""
    if len(fake) == 0 or len(real) <= k:
        return dict.fromkeys(MANIFOLD, float("nan"))
    real, fake = real.double(), fake.double()
    radius = torch.cdist(real, real).kthvalue(k + 1, dim=1).values    # the 1st is r_j itself
    inside = torch.cdist(fake, real) <= radius                         # (M, N): f_i ∈ B_j
    return dict(precision=inside.any(1).double().mean().item(),
                density=inside.sum(1).double().mean().item() / k,
                coverage=inside.any(0).double().mean().item())


def manifold_floor(clf: FruitClassifier, train: torch.Tensor, real_test: torch.Tensor, n: int,
                   repeats: int = 5, seed: int = 0) -> dict:
    """What a perfect generator scores with n samples on precision_coverage's measures: those of
    n real training images (uint8) against real_test (images, or their classify features), as
    {measure: (mean, std)} over floor_draws' `repeats` subsets. Coverage falls with n: compare a
    set with the floor at its own n."""
    fr = real_test if real_test.dim() == 2 else classify(clf, real_test)[0]
    scores = [precision_coverage(fr, f) for f in floor_draws(clf, train, n, repeats, seed)]
    return {m: (float(np.mean([s[m] for s in scores])), float(np.std([s[m] for s in scores])))
            for m in MANIFOLD}


def add_floors(df: pd.DataFrame, clf: FruitClassifier, train: torch.Tensor,
               real_test: torch.Tensor, seed: int = 0) -> pd.DataFrame:
    """Insert into df (quality's rows; in place, and return it) each measure's floor at the row's
    own n, on the rows that have the measure (NaN on the others): after ffd_std, ffd_floor and
    ffd_floor_std (ffd_floor), ffd_ratio = ffd ÷ ffd_floor and its full spread ffd_ratio_std
    (ratio_spread of the set's bootstrap std and the floor's std); after each of MANIFOLD's
    columns `<measure>_floor` (manifold_floor's mean). real_test: images or classify features."""
    fr = real_test if real_test.dim() == 2 else classify(clf, real_test)[0]
    ns = {int(n) for n in df.n[df.ffd.notna() | df.precision.notna()]}
    ffd0 = {n: ffd_floor(clf, train, fr, n, seed=seed) for n in ns}
    man0 = {n: manifold_floor(clf, train, fr, n, seed=seed) for n in ns}
    has = df.ffd.notna()
    floor = pd.Series([ffd0[int(n)][0] if ok else np.nan for n, ok in zip(df.n, has)], df.index)
    floor_std = pd.Series([ffd0[int(n)][1] if ok else np.nan for n, ok in zip(df.n, has)], df.index)
    at = df.columns.get_loc("ffd_std") + 1
    df.insert(at, "ffd_floor", floor)
    df.insert(at + 1, "ffd_floor_std", floor_std)
    df.insert(at + 2, "ffd_ratio", df.ffd / floor)
    df.insert(at + 3, "ffd_ratio_std", ratio_spread(df.ffd, df.ffd_std, floor, floor_std))
    for m in MANIFOLD:
        df.insert(df.columns.get_loc(m) + 1, f"{m}_floor",
                  [man0[int(n)][m][0] if ok else np.nan
                   for n, ok in zip(df.n, df[m].notna())])
    return df


def quality(clf: FruitClassifier, x: torch.Tensor, real_test: torch.Tensor | None,
            train: torch.Tensor | None, n_classes: int, seed: int = 0, ffd: bool = True) -> dict:
    """The sample-quality numbers of one set x (in [-1, 1]): FFD (ffd=True; with its bootstrap
    std; compare it with ffd_floor at the same n: add_floors), precision, density and coverage
    (precision_coverage; at least MANIFOLD_MIN_N images)
    and KID against real_test, recognizability (share of images the classifier gives p ≥ 0.9 for
    some class), classes covered by those, and the SSIM to the nearest training image. real_test
    may be given as its classify features (N, d), computed once where many sets are scored
    against it. Pass None to skip a reference (real test images against themselves; training
    images against the training set)."""
    f, p = classify(clf, x)
    conf, pred = p.max(1)
    covered = torch.bincount(pred[conf >= 0.9], minlength=n_classes)
    q = dict(n=len(x), ffd=np.nan, ffd_std=np.nan, **dict.fromkeys(MANIFOLD, np.nan), kid=np.nan,
             kid_std=np.nan, recognizability=float((conf >= 0.9).float().mean()),
             classes_covered=int((covered > 0).sum()), nn_ssim_mean=np.nan, nn_ssim_max=np.nan)
    if real_test is not None:
        fr = real_test if real_test.dim() == 2 else classify(clf, real_test)[0]
        if ffd:
            q["ffd"], q["ffd_std"] = frechet_distance(f, fr), ffd_bootstrap_std(f, fr, seed=seed)
        if len(x) >= MANIFOLD_MIN_N:
            q.update(precision_coverage(fr, f))
        q["kid"], q["kid_std"] = kid(f, fr, subset_size=min(100, len(x)), seed=seed)
    if train is not None:
        nn_s = nearest_ssim(x, train)
        q["nn_ssim_mean"], q["nn_ssim_max"] = float(nn_s.mean()), float(nn_s.max())
    return q


def scoring_setup(cfg: Config, progress: bool = True):
    """What scoring samples needs: (classes, training Fruits, test images (uint8), classifier,
    its test accuracy)."""
    classes = sorted(load_index(cfg).label.unique())
    train_ds, test_imgs = split_data(cfg, "train", classes), split_data(cfg, "test").images
    clf, _, acc = load_classifier(cfg)
    return classes, train_ds, test_imgs, clf, acc


def generation_metrics(cfg: Config, models: dict, n: int | None = None, n_slow: int | None = None,
                       progress: bool = True, seed: int | None = None
                       ) -> tuple[pd.DataFrame, dict]:
    """Every GEN_SAMPLERS row sampled with its model (story_models) and scored, after real
    training and test images: n per DDIM row, n_slow per 1000-step row (defaults EVAL's). A set
    of at least EVAL's n_min gets an FFD (bootstrap std), one of at least MANIFOLD_MIN_N
    precision, density and coverage, each beside its floor at the set's own n (add_floors: the
    FFD's ratio to it with the full spread); all get KID and recognizability. seed: every draw (x_T
    and z of each sampler, the real training subset, the floors' subsets); None: cfg.seed.
    Returns (a row per set, {name: samples}, also saved to runs/<profile>/samples.pt)."""
    seed = cfg.seed if seed is None else seed
    ev = EVAL[cfg.profile]
    n, n_slow, n_ffd = n or ev["n_samples"], n_slow or ev["n_report"], ev["n_min"]
    classes, train_ds, test_imgs, clf, acc = scoring_setup(cfg, progress)
    train_imgs = train_ds.images
    rows, samples = [], {}
    g = torch.Generator().manual_seed(seed)
    real_train = to_float(train_imgs[torch.randperm(len(train_imgs), generator=g)[:n]])
    real_test = to_float(test_imgs)
    f_test = classify(clf, real_test)[0]                     # the reference of every FFD and KID
    # the references: real training images against the test set (a real set at the same n, drawn
    # apart from the floor's), real test images against the training set (how near a real unseen
    # image comes to a copy)
    rows.append(dict(sampler="real: training images", seconds_per_image=np.nan,
                     **quality(clf, real_train, f_test, None, len(classes), seed,
                             ffd=n >= n_ffd)))
    rows.append(dict(sampler="real: test images", seconds_per_image=np.nan,
                     **quality(clf, real_test, None, train_imgs, len(classes), seed)))
    for name, (key, method, kw) in GEN_SAMPLERS.items():
        model, fp = models[key]
        k = n if method == "ddim" else n_slow
        t0 = time.perf_counter()
        x, _ = sample(model, fp, method, k, cfg.image_size, seed=seed, progress=progress, **kw)
        secs = (time.perf_counter() - t0) / k
        samples[name] = x
        rows.append(dict(sampler=name, seconds_per_image=secs, **quality(
            clf, x, f_test, train_imgs, len(classes), seed, ffd=k >= n_ffd)))
    df = add_floors(pd.DataFrame(rows), clf, train_imgs, f_test, seed)
    real_rec = df.set_index("sampler").recognizability["real: test images"]
    df.insert(df.columns.get_loc("recognizability") + 1, "recognizability_ratio",
              df.recognizability / real_rec)            # against real test images
    df["classifier_test_acc"] = acc          # the feature extractor's own accuracy on Test/
    df["seed"] = seed
    save_checkpoint(samples, cfg.home / "runs" / cfg.profile / "samples.pt")
    return df, samples


# The sampling seeds that score the story's headline sets a second time (`make generation-seeds`):
# every choice (the recipe, pick_w) was made on seed 0, so these report what the choice never saw.
HELD_OUT_SEEDS = (1, 2, 3)
# generation_seeds' tables: name → the sets it scores (names of CAUSES, GEN_SAMPLERS, guidance)
SEED_TABLES = {
    "causes": list(CAUSES),                                        # EVAL's n_min samples a set
    "generation": [k for k, (_, m, _) in GEN_SAMPLERS.items() if m == "ddim"],    # n_samples
    "guidance": ["guidance"],                # every set of guidance_metrics, 10 a class (smoke: 1)
}


# `make generation-seeds`' tables in the figure folder (`seeds`, run once; notebook 05 and the
# report read them, read_result): the rows (a set per seed, floors added), one row per set
# (seed_summary), and the run (its cells, CPU seconds, CPU and threads, the weights' digest).
SEED_FILES = ("generation_seeds", "generation_seeds_summary", "generation_seeds_run")


def seed_set(cfg: Config, models: dict, table: str, name: str, seed: int,
             progress: bool = False) -> tuple[list[dict], torch.Tensor | None]:
    """One set of SEED_TABLES drawn with `seed` and scored (quality against every test image; no
    floors: add_floors, once for all seeds, with seed 0's draws): rows with the table, set, seed,
    seconds per image and mean brightness ([0, 1]). causes: CAUSES[name] with cause_models'
    `models`, EVAL's n_min samples; generation: GEN_SAMPLERS[name] with n_samples; guidance:
    every set of guidance_metrics (its accuracy columns too; no brightness), 10 samples a class
    (smoke: 1). Returns (rows, the first 8 samples of a causes set, else None)."""
    classes, train_ds, test_imgs, clf, _ = scoring_setup(cfg, progress)
    f_test = classify(clf, to_float(test_imgs))[0]
    ev, t0 = EVAL[cfg.profile], time.perf_counter()
    if table == "guidance":
        per_class = 1 if cfg.profile.startswith("smoke") else 10
        df = guidance_metrics(cfg, per_class, progress=progress, seed=seed, real=False)[0]
        df = df.drop(columns=[
            c for c in df.columns if c.endswith(("_floor", "_floor_std", "_ratio", "_ratio_std"))])
        secs = (time.perf_counter() - t0) / df.n.sum()
        return [dict(table=table, set=nm, seed=seed, seconds_per_image=secs, brightness=np.nan,
                     **{k: v for k, v in r.items() if k not in ("set", "seed")})
                for nm, r in zip(guidance_names(df), df.to_dict("records"))], None
    key, method, kw = (CAUSES[name][:3] if table == "causes" else GEN_SAMPLERS[name])
    n = ev["n_min"] if table == "causes" else ev["n_samples"]
    x, _ = sample(*models[key], method, n, cfg.image_size, seed, progress=progress, **kw)
    secs = (time.perf_counter() - t0) / n
    q = quality(clf, x, f_test, None, len(classes), seed, ffd=n >= ev["n_min"])
    return [dict(table=table, set=name, seed=seed, seconds_per_image=secs,
                 brightness=to_unit(x).mean().item(), **q)], (x[:8] if table == "causes" else None)


def guidance_names(df: pd.DataFrame) -> list[str]:
    """guidance_metrics' rows by one name each, as generation_seeds names them: the set, and
    ', w = …' for the conditional model's."""
    return [s if pd.isna(w) else f"{s}, w = {w:g}" for s, w in zip(df.set, df.w)]


def seed_summary(df: pd.DataFrame) -> pd.DataFrame:
    """generation_seeds' rows (a set per seed, floors added by add_floors) as one row per set, in
    their order: n, the seeds, and the mean over the seeds of FFD's ratio to its floor,
    precision, coverage and brightness, each with its spread: the std over the seeds (ddof 1;
    NaN for one seed); for the ratio that std combined with the floor's (ratio_spread of the
    seeds' FFD std and the floor's std over its real draws). Floors beside precision and
    coverage; guidance rows keep w and accuracy (mean)."""
    rows = []
    for (table, name), d in df.groupby(["table", "set"], sort=False):
        ffd, floor, floor_std = d.ffd.mean(), d.ffd_floor.iloc[0], d.ffd_floor_std.iloc[0]
        r = dict(table=table, set=name, n=int(d.n.iloc[0]),
                 seeds=", ".join(str(int(v)) for v in d.seed), ffd=ffd, ffd_std=d.ffd.std(),
                 ffd_floor=floor, ffd_ratio=ffd / floor,
                 ffd_ratio_std=ratio_spread(ffd, d.ffd.std(), floor, floor_std))
        for m in ("precision", "coverage"):
            r.update({m: d[m].mean(), f"{m}_std": d[m].std(), f"{m}_floor": d[f"{m}_floor"].iloc[0]})
        r.update(brightness=d.brightness.mean(), brightness_std=d.brightness.std())
        if "w" in d and d.w.notna().any():
            r.update(w=d.w.iloc[0], accuracy=d.accuracy.mean(), accuracy_std=d.accuracy.std())
        rows.append(r)
    return pd.DataFrame(rows)


def pm(value, spread, spec: str = ".2f") -> str:
    """value ± spread for a sentence (no ± where the spread is NaN: one seed, no floor draws)."""
    return f"{value:{spec}}" + ("" if pd.isna(spread) else f" ± {spread:{spec}}")


def quality_text(r) -> str:
    """A set's quality for a sentence, from a row of generation_metrics, guidance_metrics or
    seed_summary: FFD ÷ its floor ± the full spread (else KID), precision and coverage (± over
    the seeds where given) beside real images' at the same n, and n (and the seeds)."""
    parts = [f"FFD {pm(r.ffd_ratio, r.ffd_ratio_std, '.3g')}× the floor" if pd.notna(r.ffd) else
             "KID " + n_text(r.kid, r.n) if "kid" in r else "no FFD"]
    parts += [f"{m} {pm(r[m], r.get(m + '_std'))} (real images {r[m + '_floor']:.2f})"
              for m in ("precision", "coverage") if pd.notna(r[m])]
    seeds = f", seeds {r.seeds}" if "seeds" in r else ""
    return ", ".join(parts) + f" (n = {int(r.n)}{seeds})"


def beside_held_out(rows: pd.DataFrame, names: list, summary: pd.DataFrame, table: str,
                    seed: int) -> pd.DataFrame:
    """This run's rows (of generation_metrics or guidance_metrics; `names`: each row's set as
    seed_summary names it) that seed_summary's `table` also scored, beside those: FFD ÷ floor,
    precision and coverage on this run's seed, then mean ± std over the held-out seeds, each
    with its n. A generation row that the cause table samples alike (cause_twin: its 1000-step
    rows) is shown with that row's held-out scores."""
    held = summary[summary.table == table].set_index("set")
    causes = summary[summary.table == "causes"].set_index("set")
    out = []
    for name, (_, r) in zip(names, rows.iterrows()):
        twin = cause_twin(name) if table == "generation" else None
        if name not in held.index and twin is None:
            continue
        h = held.loc[name] if name in held.index else causes.loc[twin]
        out.append({"set": name + (f" (cause table: {twin})" if name not in held.index else ""),
                    f"n, seed {seed}": int(r.n),
                    f"FFD ÷ floor, seed {seed}": pm(r.ffd_ratio, r.ffd_ratio_std, ".3g"),
                    f"precision, seed {seed}": f"{r.precision:.2f}",
                    f"coverage, seed {seed}": f"{r.coverage:.2f}",
                    "n, held out": int(h.n),
                    f"FFD ÷ floor, seeds {h.seeds}": pm(h.ffd_ratio, h.ffd_ratio_std, ".3g"),
                    f"precision, seeds {h.seeds}": pm(h.precision, h.precision_std),
                    f"coverage, seeds {h.seeds}": pm(h.coverage, h.coverage_std)})
    return pd.DataFrame(out)


def cause_twin(name: str) -> str | None:
    """The CAUSES row that samples GEN_SAMPLERS[name] alike (the same model, sampler and
    settings), or None."""
    return next((k for k, v in CAUSES.items() if v[:3] == GEN_SAMPLERS.get(name)), None)


def change_word(before, after, m: str) -> str:
    """What a change did to measure m (seed_summary rows before and after it, with `<m>_std`):
    'better' or 'worse' where the two differ by more than their spreads over the seeds added
    (FFD ÷ floor: lower is better; precision, coverage: higher), else 'within the spread'. Both
    rows are at one n, so they share the floor: FFD ÷ floor is compared through FFD and its
    spread over the seeds, without the floor's spread (which moves both alike)."""
    m_std = "ffd_std" if m == "ffd_ratio" else f"{m}_std"
    scale = before.ffd_floor if m == "ffd_ratio" else 1.0
    gap, spread = after[m] - before[m], (after[m_std] + before[m_std]) / scale
    if pd.isna(spread):
        return "no spread: one seed"
    if abs(gap) <= spread:
        return "within the spread"
    return "better" if (gap < 0) == (m == "ffd_ratio") else "worse"


def cause_table(summary: pd.DataFrame) -> pd.DataFrame:
    """seed_summary's causes rows as the cause table, in CAUSES' order: each row's change and the
    row it changes, FFD ÷ its floor, precision, coverage and mean brightness (mean ± std over the
    seeds; the ratio's ± includes the floor's spread), and what the change did: each measure
    from the row it changes to this one, called better or worse where the two differ by more
    than their spreads added, else "within the spread"."""
    c = summary[summary.table == "causes"].set_index("set").loc[list(CAUSES)]
    rows = []
    for name, r in c.iterrows():
        frm, change = CAUSES[name][3], CAUSES[name][4]
        did = []
        if frm:
            b = c.loc[frm]
            for m, spec in (("ffd_ratio", ".3g"), ("precision", ".2f"), ("coverage", ".2f")):
                if pd.notna(r[m]) and pd.notna(b[m]):
                    label = "FFD ÷ floor" if m == "ffd_ratio" else m
                    did.append(f"{label} {b[m]:{spec}} → {r[m]:{spec}} ({change_word(b, r, m)})")
            did.append(f"brightness {b.brightness:.2f} → {r.brightness:.2f}")
        rows.append({"row": name, "from": frm or "—", "change": change,
                     "FFD ÷ floor": pm(r.ffd_ratio, r.ffd_ratio_std, ".3g"),
                     "precision": pm(r.precision, r.precision_std),
                     "coverage": pm(r.coverage, r.coverage_std),
                     "brightness": pm(r.brightness, r.brightness_std),
                     "what it did": "; ".join(did) or "the report as it wrote it"})
    return pd.DataFrame(rows)


def cause_chain(summary: pd.DataFrame) -> str:
    """The cause table's main line (CAUSE_CHAIN) as one sentence: FFD ÷ floor, precision and
    coverage along it; the steps after which all three are better (change_word), those after
    which FFD ÷ floor is, and the step that divided FFD ÷ floor the most."""
    c, chain = summary[summary.table == "causes"].set_index("set"), CAUSE_CHAIN
    steps = [f"{k} {c.loc[k].ffd_ratio:.3g}× ({c.loc[k].precision:.2f} / {c.loc[k].coverage:.2f})"
             for k in chain]
    words = {k: {m: change_word(c.loc[CAUSES[k][3]], c.loc[k], m)
                 for m in ("ffd_ratio", "precision", "coverage")} for k in chain[1:]}
    factor = {k: c.loc[CAUSES[k][3]].ffd_ratio / c.loc[k].ffd_ratio for k in chain[1:]}
    big = max(factor, key=factor.get)
    all3 = [k for k, w in words.items() if set(w.values()) == {"better"}]
    ffd = [k for k, w in words.items() if w["ffd_ratio"] == "better" and k not in all3]
    name = lambda ks: ", ".join(f"*{k}*" for k in ks)
    return (f"FFD ÷ floor (precision / coverage) along the main line: {' → '.join(steps)}. "
            f"Beyond their spreads, FFD ÷ floor, precision and coverage all improve at "
            f"{name(all3) or 'no step'}" + (f"; FFD ÷ floor alone at {name(ffd)}" if ffd else "")
            + f"; the largest step is *{big}* (FFD ÷ floor divided by {factor[big]:.3g})")


def class_shares(clf: FruitClassifier, classes: list, sets: dict, p_min: float = 0.9
                 ) -> pd.DataFrame:
    """The classifier's label for each image of each set ({name: images in [-1, 1]}): its most
    likely class where p ≥ p_min, else 'unrecognized'; as shares of each set (a column per
    set, a row per label)."""
    out = {}
    for name, x in sets.items():
        conf, pred = classify(clf, x)[1].max(1)
        labels = [classes[j] if c >= p_min else "unrecognized" for c, j in zip(conf, pred)]
        out[name] = pd.Series(labels).value_counts(normalize=True)
    return pd.DataFrame(out).fillna(0.0).reindex([*classes, "unrecognized"]).fillna(0.0)


# Classifier-free guidance weights scored by guidance_metrics (0: unconditional, 1: conditional).
GUIDANCE_W = (0, 1, 2, 3, 5)


def guidance_metrics(cfg: Config, n_per_class: int = 50, ws=GUIDANCE_W, steps: int = 50,
                     progress: bool = True, seed: int | None = None, real: bool = True
                     ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """n_per_class images of every class at each guidance weight w from the class-conditional
    model (DDIM, η = 0, not clipped, one x_T for every w), scored: accuracy on the requested
    class, recognizability, KID (per class and over all), FFD where the k·n samples reach EVAL's
    n_min, precision, density and coverage where they reach MANIFOLD_MIN_N, each beside its
    floor at that n (add_floors), nearest-training SSIM; beside as many unconditional
    samples (same seed) and (real=True) the real test images. seed: x_T of every set (None:
    cfg.seed).
    Returns (a row per set, a row per (w, class), {w: samples, class-major})."""
    seed = cfg.seed if seed is None else seed
    dev = get_device()
    ccfg = generation_config(cfg, conditional=True)
    cond = generation_model(cfg, conditional=True).to(dev)
    fp = Diffusion.from_config(ccfg).to(dev)
    classes, train_ds, test_imgs, clf, acc = scoring_setup(cfg, progress)
    k = len(classes)
    test = split_data(cfg, "test", classes)
    real_test, train_imgs = to_float(test.images), train_ds.images
    y = torch.arange(k).repeat_interleave(n_per_class)                   # (k·n,) class-major
    ffd = len(y) >= EVAL[cfg.profile]["n_min"]
    rows = [dict(set="real: test images", w=np.nan, accuracy=np.nan,
                 **quality(clf, real_test, None, train_imgs, k, seed))] if real else []
    unc, _ = sample(generation_model(cfg).to(dev), fp, "ddim", len(y), cfg.image_size,
                    seed, steps=steps, clip=False, progress=progress)
    f_all = classify(clf, real_test)[0]                      # the reference of every set
    rows.append(dict(set="unconditional model", w=np.nan, accuracy=np.nan,
                     **quality(clf, unc, f_all, train_imgs, k, seed, ffd=ffd)))
    f_test = [classify(clf, real_test[test.labels == c])[0] for c in range(k)]    # per class
    by_class, samples = [], {}
    for w in tqdm(ws, desc="guidance weights", disable=not progress):
        x, _ = sample(cond, fp, "ddim", len(y), cfg.image_size, seed, y=y, w=w,
                      steps=steps, clip=False, progress=progress)
        samples[w] = x
        f, p = classify(clf, x)
        hit = (p.argmax(1) == y).float()
        for c in range(k):
            m = y == c
            by_class.append(dict(w=w, cls=classes[c], accuracy=hit[m].mean().item(),
                                 recognizability=(p[m].max(1).values >= 0.9).float().mean().item(),
                                 kid=kid(f[m], f_test[c], subset_size=min(100, int(m.sum())))[0]))
        rows.append(dict(set="conditional model", w=w, accuracy=hit.mean().item(),
                         **quality(clf, x, f_all, train_imgs, k, seed, ffd=ffd)))
    df = add_floors(pd.DataFrame(rows), clf, train_imgs, f_all, seed)
    per = pd.DataFrame(by_class)
    worst = per.groupby("w").accuracy.min()
    df.insert(df.columns.get_loc("accuracy") + 1, "min_class_accuracy", df.w.map(worst))
    unc_row = df.set_index("set").loc["unconditional model"]
    df.insert(df.columns.get_loc("ffd") + 1, "ffd_vs_unconditional", df.ffd / unc_row.ffd)
    df.insert(df.columns.get_loc("ffd_vs_unconditional") + 1, "ffd_vs_unconditional_std",
              ratio_spread(df.ffd, df.ffd_std, unc_row.ffd, unc_row.ffd_std))
    df.insert(df.columns.get_loc("kid") + 1, "kid_vs_unconditional", ratio_of_positive(
        df.kid, unc_row.kid))                    # a KID ≤ 0 (at noise level) has no ratio
    df["steps"], df["n_per_class"], df["classifier_test_acc"] = steps, n_per_class, acc
    df["seed"] = seed
    return df, per, samples



def save_guidance(cfg: Config, df: pd.DataFrame, per: pd.DataFrame, samples: dict,
                  classes: list, seed: int | None = None) -> float:
    """Write guidance_metrics' results where notebook 05 and `evaluate --what guidance` both put
    them (guidance, guidance_by_class, 05_guidance, 05_guidance_grid at pick_w's w); returns w.
    seed: the one the samples were drawn with, for the grid's title (None: cfg.seed)."""
    import matplotlib.pyplot as plt
    save_table(df, "guidance", cfg)
    save_table(per, "guidance_by_class", cfg)
    w = pick_w(df)
    for name, fig in (("05_guidance", plot_guidance(df, per)[0].figure),
                      ("05_guidance_grid", plot_class_grid(samples[w], classes, title=f"requested "
                                                           f"class per row, w = {w:g}, DDIM-50, "
                                                           f"seed {cfg.seed if seed is None else seed}"
                                                           ))):
        save_fig(fig, name, cfg)
        plt.close(fig)
    return w

def pick_w(df: pd.DataFrame, ffd_max: float = 1.5) -> float:
    """The guidance weight to show: of guidance_metrics' conditional rows whose FFD (where none
    was scored, KID) is at most ffd_max × the unconditional model's, the one with the highest
    accuracy (the smaller w on a tie); the highest accuracy of all where none is."""
    g = df[df.set == "conditional model"]
    ratio = g.ffd_vs_unconditional if g.ffd_vs_unconditional.notna().any() else g.kid_vs_unconditional
    ok = g[ratio <= ffd_max]
    g = ok if len(ok) else g
    return float(g.sort_values(["accuracy", "w"], ascending=[False, True]).w.iloc[0])


# -----------------------------------------------------------------------------------------------
# plotting: every figure reads at notebook width (legible, applied by save_fig)

NOTEBOOK_WIDTH = 6.8                     # inches: JupyterLab shows a figure ~680 px wide (100 dpi)


def legible(fig, min_pt: float = 10.0):
    """Raise every text of fig to min_pt as the notebook shows it (scaled down to NOTEBOOK_WIDTH
    when wider), lay it out (constrained, unless it has a layout) and wrap each axes title that
    is wider than its axes at spaces; returns fig."""
    import textwrap
    from matplotlib.text import Text
    floor = min_pt * max(1.0, fig.get_figwidth() / NOTEBOOK_WIDTH)
    for t in fig.findobj(Text):                              # tick labels drawn later copy the first's
        t.set_fontsize(max(t.get_fontsize(), floor))
    if fig.get_layout_engine() is None:
        fig.set_layout_engine("constrained")
    fig.draw_without_rendering()
    for ax in fig.axes:
        for t in (ax.title, ax._left_title, ax._right_title):
            if t.get_text() and (w := t.get_window_extent().width) > ax.bbox.width:
                n = max(map(len, t.get_text().split("\n"))) * ax.bbox.width / w
                t.set_text(textwrap.fill(t.get_text(), int(n), break_long_words=False))
    return fig


def image_grid(x: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """A batch (B, 3, H, W), uint8 or in [-1, 1], as one (H', W', 3) array for imshow."""
    from torchvision.utils import make_grid
    x = to_float(x) if x.dtype == torch.uint8 else x.float()
    return make_grid(to_unit(x), nrow=nrow, padding=1, pad_value=1.0).permute(1, 2, 0).numpy()


def show_grid(x: torch.Tensor, nrow: int = 8, ax=None, title: str | None = None):
    import matplotlib.pyplot as plt
    ax = ax or plt.subplots(figsize=(nrow, max(1, math.ceil(len(x) / nrow))))[1]
    ax.imshow(image_grid(x, nrow))
    ax.set_axis_off()
    ax.set_title(title or "")
    return ax


def plot_xt(fp: Diffusion, x0: torch.Tensor, eps: torch.Tensor, ts, fig=None):
    """One image x0 (1, 3, H, W) in [-1, 1] noised to each t (0: x0 itself) with the noise eps
    (Eq. 4), above the histogram of its pixels against N(0, 1)."""
    import matplotlib.pyplot as plt
    fig = fig or plt.figure(figsize=(1.6 * len(ts), 3.8))
    axes = fig.subplots(2, len(ts), squeeze=False, gridspec_kw=dict(height_ratios=[1.2, 1]))
    grid = np.linspace(-4, 4, 200)
    for j, tv in enumerate(ts):
        x = x0 if tv == 0 else fp.q_sample(x0, torch.tensor([tv]), eps)
        ab = 1.0 if tv == 0 else fp.alpha_bar[tv - 1].item()
        axes[0, j].imshow(image_grid(x, nrow=1))
        axes[0, j].set_title(f"t = {tv}\nᾱ_t = {ab:.3f}")
        axes[0, j].set_axis_off()
        axes[1, j].hist(x.flatten().numpy(), bins=50, range=(-4, 4), density=True, alpha=0.7)
        axes[1, j].plot(grid, np.exp(-grid ** 2 / 2) / np.sqrt(2 * np.pi), "k-", lw=1)
        axes[1, j].set(xticks=(-3, 0, 3), yticks=[])
    return fig


def plot_history(histories: dict, ax=None, title: str = "loss per epoch",
                 max_epochs: int | None = None):
    """The report's Figure 3: training (dashed) and validation (solid) loss per fold, the best
    epoch marked ● and, when a run ended before max_epochs, its early stop ×."""
    import matplotlib.pyplot as plt
    ax = ax or plt.subplots(figsize=(7, 4))[1]
    for i, (name, h) in enumerate(histories.items()):
        c = f"C{i}"
        ax.plot(h.epoch, h.train_loss, "--", color=c, alpha=0.6)
        ax.plot(h.epoch, h.val_loss, "-", color=c, label=f"{name} (val)")
        b = h.loc[h.val_loss.idxmin()]
        ax.plot([b.epoch], [b.val_loss], "o", color=c)
        if max_epochs and len(h) < max_epochs:
            ax.plot(h.epoch.iloc[-1], h.val_loss.iloc[-1], "x", color=c, ms=9, mew=2)
    ax.set(xlabel="epoch", ylabel="ε-MSE", yscale="log", title=title)
    ax.legend()
    return ax


def plot_table1(df: pd.DataFrame, report: pd.DataFrame | None = None, ceiling: float | None = None,
                axes=None):
    """SSIM against t per method of a table1 frame (left: at our resolution; right: upsampled
    to 100×100, where scored, with the upsampling ceiling dashed), the mean over folds with a band
    from the lowest to the highest fold; the report's five folds (report_table1) as thin black
    lines in both panels; one legend below."""
    import matplotlib.pyplot as plt
    hr = "ssim_hr_mean" in df
    axes = axes if axes is not None else plt.subplots(1, 1 + hr, figsize=(4.5 + 4.5 * hr, 4.8),
                                                      layout="constrained", squeeze=False)[1][0]
    for ax, col in zip(axes, ("ssim_mean", "ssim_hr_mean")):
        for (method, d), c in zip(df.groupby("method", sort=False), ("C0", "C3", "C1")):
            a = d.groupby("t")[col].agg(["mean", "min", "max"])
            n = d.fold.nunique()
            ax.plot(a.index, a["mean"], "o-", ms=3, color=c, label=f"ours: {method} ({n} fold{'s' * (n > 1)})")
            ax.fill_between(a.index, a["min"], a["max"], color=c, alpha=0.2)
        if report is not None:
            for k, r in report.groupby("fold"):
                ax.plot(r.t, r.ssim_mean, "-", color="k", lw=0.8, alpha=0.7,
                        label="the report, its 5 folds" if k == 0 else None)
        ax.set(xlabel="t", ylabel="SSIM", ylim=(0, 1))
    if hr and ceiling is not None:
        axes[1].axhline(ceiling, ls="--", color="0.4", label="ceiling: a perfect 32×32 x̂0")
    axes[0].set_title("one-step x̂0 vs the ground truth, at our resolution")
    if hr:
        axes[1].set_title("the same x̂0 upsampled (bilinear) to 100×100")
    fig = axes[0].figure
    fig.legend(*axes[-1].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    legible(fig)                                               # notebook 04 shows it unsaved
    return axes


def plot_table1_native(df: pd.DataFrame, report: pd.DataFrame | None = None, ax=None):
    """SSIM against t of every row of table1_native (networks solid, the ceiling dashed, the
    yardsticks dotted), with the report's five folds as thin black lines; one legend below."""
    import matplotlib.pyplot as plt
    ax = ax if ax is not None else plt.subplots(figsize=(NOTEBOOK_WIDTH, 5.6),
                                                layout="constrained")[1]
    for i, ((method, res), d) in enumerate(df.groupby(["method", "resolution"], sort=False)):
        style = ":" if "no network" in res else "--" if method.startswith("ceiling") else "o-"
        ax.plot(d.t, d.ssim_mean, style, ms=3, color=f"C{i}", label=f"{method}, {res}")
    if report is not None:
        for k, r in report.groupby("fold"):
            ax.plot(r.t, r.ssim_mean, "-", color="k", lw=0.8, alpha=0.7,
                    label="the report, its 5 folds (100×100)" if k == 0 else None)
    ax.set(xlabel="t", ylabel="SSIM", ylim=(0, 1),
           title="one-step x̂0 at the dataset's 100×100, the same test images for every line")
    ax.figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2)
    legible(ax.figure)
    return ax


def plot_figure4(rows: dict, ts):
    """The report's Figure 4: one row of images per entry of `rows` ({title: (len(ts), 3, H, W)
    in [0, 1]}), one column per timestep in ts, labelled 't = …'."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.8 * len(ts), 1.3 * len(rows)),
                             layout="constrained", squeeze=False)
    for ax, (name, x) in zip(axes[:, 0], rows.items()):
        s = x.shape[-1] + 1                                         # image_grid pads by 1 pixel
        ax.imshow(image_grid(x.cpu() * 2 - 1, nrow=len(ts)))         # image_grid takes [-1, 1]
        ax.set_title(name, loc="left")
        ax.set_xticks([1 + s * i + s / 2 for i in range(len(ts))], [f"t = {v}" for v in ts])
        ax.set_yticks([])
    return fig


def plot_figure5(xs: dict, trajs: dict, n_show: int = 4):
    """The report's Figure 5, one row per sampler of figure5: one sample's x_t at the kept t
    (left, shown clipped to [-1, 1]; the last column is the sample), n_show final samples
    (middle), and the mean brightness of the set at each kept t (right)."""
    import matplotlib.pyplot as plt
    bright = brightness_by_t(trajs)
    ts = bright.t.tolist()
    k = len(next(iter(xs.values()))[:n_show])
    fig, axes = plt.subplots(len(xs), 3, figsize=(10, 1.5 * len(xs) + 0.5), layout="constrained",
                             gridspec_kw=dict(width_ratios=(len(ts), k, 4.5)), squeeze=False)
    for i, (row, name) in enumerate(zip(axes, xs)):
        show_grid(torch.cat([trajs[name][t][:1].clamp(-1, 1) for t in ts]), nrow=len(ts), ax=row[0])
        row[0].set_title(name, loc="left")
        show_grid(xs[name][:n_show], nrow=n_show, ax=row[1])
        row[2].plot(ts, bright[name], "o-", ms=3)
        row[2].set(ylim=(0, 1), yticks=(0, 0.5, 1), xlim=(max(ts) + 50, -50), ylabel="brightness")
        row[2].locator_params(axis="x", nbins=3)
        row[2].tick_params(labelbottom=i == len(xs) - 1)
    axes[-1][2].set_xlabel("t (sampling →)")                     # the t axis runs from T to 0
    fig.suptitle(f"one sample at t = {ts[0]} … {ts[-1]}, {k} final samples, mean brightness by t")
    return fig


def plot_leakage(histories: dict, axes=None):
    """Leakage as the report should have measured it: per split (e.g. {'grouped': h, 'random':
    h}), the validation loss and the loss on Test/ by epoch (both with fixed noise and t), and
    their ratio Test/ ÷ validation (> 1: validation is optimistic about unseen images)."""
    import matplotlib.pyplot as plt
    axes = axes if axes is not None else plt.subplots(1, 2, figsize=(9, 3.8), layout="constrained")[1]
    for i, (name, h) in enumerate(histories.items()):
        c = f"C{i}"
        axes[0].plot(h.epoch, h.val_loss, "-", color=c)
        axes[0].plot(h.epoch, h.test_loss, ":", color=c)
        axes[1].plot(h.epoch, h.test_loss / h.val_loss, "-", color=c, label=name)
    axes[0].set(xlabel="epoch", ylabel="loss (fixed noise and t)", yscale="log",
                title="validation (solid) vs Test/ (dotted)")
    axes[1].axhline(1, color="grey", lw=0.8)
    axes[1].set(xlabel="epoch", ylabel="Test/ ÷ validation",
                title="how optimistic validation is")
    axes[1].legend()
    return axes


def plot_causes(summary: pd.DataFrame, real_brightness: float, axes=None):
    """The cause table (seed_summary's causes rows, CAUSES' order, top to bottom): FFD ÷ its
    floor (log scale, ± the full spread), precision and coverage (± over the seeds; their floors
    dotted) and mean brightness (real test images' dashed), one row per CAUSES entry."""
    import matplotlib.pyplot as plt
    c = summary[summary.table == "causes"].set_index("set").loc[list(CAUSES)]
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(NOTEBOOK_WIDTH * 1.5, 0.42 * len(c) + 1.6),
                                 sharey=True, layout="constrained", width_ratios=(1.2, 1, 0.8))
        fig.get_layout_engine().set(wspace=0.06)
    y = np.arange(len(c))
    axes[0].errorbar(c.ffd_ratio, y, xerr=c.ffd_ratio_std, fmt="o", capsize=3)
    axes[0].axvline(1, ls="--", color="0.6")
    axes[0].set(xscale="log", xlabel="FFD ÷ floor")
    for m, mark in (("precision", "o"), ("coverage", "s")):
        line = axes[1].errorbar(c[m], y, xerr=c[f"{m}_std"], fmt=mark, capsize=3)
        axes[1].axvline(c[f"{m}_floor"].iloc[0], ls=":", color=line[0].get_color())
    axes[1].set(xlim=(0, 1.02), xlabel="precision ●\ncoverage ■")
    axes[2].errorbar(c.brightness, y, xerr=c.brightness_std, fmt="o", capsize=3)
    axes[2].axvline(real_brightness, ls="--", color="0.6")
    axes[2].set(xlim=(0, 1), xlabel="brightness")
    axes[0].set_yticks(y, list(c.index), fontsize=9)
    axes[0].invert_yaxis()
    axes[0].figure.suptitle(f"one change at a time ({int(c.n.iloc[0])} samples a row, seeds "
                            f"{c.seeds.iloc[0]}); dashed and dotted: real images")
    return axes


def plot_guidance(df: pd.DataFrame, per: pd.DataFrame, axes=None):
    """guidance_metrics' tables against w: accuracy on the requested class (mean, and each class
    faintly) and FFD over all classes (KID where no FFD was scored), the unconditional model's as
    a dashed line."""
    import matplotlib.pyplot as plt
    axes = axes if axes is not None else plt.subplots(1, 2, figsize=(9, 4), layout="constrained")[1]
    g = df[df.set == "conditional model"]
    for _, c in per.groupby("cls"):
        axes[0].plot(c.w, c.accuracy, "-", color="grey", lw=0.6, alpha=0.6)
    axes[0].plot(g.w, g.accuracy, "o-", lw=2)
    axes[0].set(ylim=(0, 1.02), ylabel="accuracy on the requested class",
                title="fidelity (grey: each class)")
    key = "ffd" if g.ffd.notna().any() else "kid"
    axes[1].plot(g.w, g[key], "o-", label="conditional model")
    axes[1].axhline(df.set_index("set")[key]["unconditional model"], ls="--", color="grey",
                    label="unconditional model")
    axes[1].set(ylabel=f"{key.upper()} (all classes)", title="diversity and realism")
    for ax in axes:
        ax.set_xlabel("w (0: unconditional, 1: conditional)")
    axes[1].legend()
    legible(axes[0].figure)                                    # notebook 05 shows it unsaved
    return axes


def plot_class_grid(x: torch.Tensor, classes: list, n_show: int = 8, title: str | None = None):
    """Class-major samples (len(classes)·n each, as guidance_metrics draws them): a row of the
    first n_show per class, labelled with the class; with fewer than 5 per class a column per
    class instead (labels below), so the grid and its title keep a readable width at any n."""
    import matplotlib.pyplot as plt
    k = len(classes)
    x = x.view(k, -1, *x.shape[1:])[:, :n_show]
    n, s = x.shape[1], x.shape[-1] + 1                                  # image_grid pads by 1
    ticks = [1 + s * i + s / 2 for i in range(k)]
    if n < 5:                                                           # classes across
        fig, ax = plt.subplots(figsize=(0.75 * k + 1.0, 0.75 * n + 2.2), layout="constrained")
        ax.imshow(image_grid(x.transpose(0, 1).flatten(0, 1), nrow=k))
        ax.set_xticks(ticks, classes, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks([])
    else:
        fig, ax = plt.subplots(figsize=(max(0.7 * n + 1.6, 5.0), 0.7 * k + 0.5),
                               layout="constrained")
        ax.imshow(image_grid(x.flatten(0, 1), nrow=n))
        ax.set_yticks(ticks, classes)
        ax.set_xticks([])
    ax.set_title(title or "", loc="left")
    return legible(fig)                                        # notebook 05 shows it unsaved


# -----------------------------------------------------------------------------------------------
# files: tables, figures and checkpoints written whole or not at all


def save_table(df: pd.DataFrame, name: str, cfg: Config) -> Path:
    """<name>.csv and .md in cfg.fig_dir() (see save_fig), written atomically."""
    path = cfg.fig_dir() / f"{name}.csv"
    write_csv(df, path)
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text(to_markdown(df))
    return path


def save_fig(fig, name: str, cfg: Config, folder: Path | str | None = None) -> Path:
    """<name>.png in folder, by default cfg.fig_dir(): figures/ (or figures/<profile>/) under
    `make figures`, else runs/<profile>/figures (smoke: runs/smoke/figures), made legible first (as the notebook then shows it)."""
    path = Path(folder or cfg.fig_dir()) / f"{name}.png"
    legible(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    return path


def check_config(saved: dict, cfg: Config, path: Path, keys=None,
                 advice: str = "Resume with the checkpoint's settings, or start a new run in "
                               "another --out folder") -> None:
    """Refuse a checkpoint whose config differs from cfg in `keys` (default: all but
    RESUMABLE_KEYS and SPEED_KEYS), saying `advice`. A setting newer than the checkpoint counts as its
    default."""
    default = {f.name: f.default for f in dataclasses.fields(Config)}
    diff = {k: (saved.get(k, default[k]), v) for k, v in dataclasses.asdict(cfg).items()
            if (k in keys if keys else k not in RESUMABLE_KEYS | SPEED_KEYS)
            and saved.get(k, default[k]) != v}
    profile = saved.get("profile", cfg.profile)
    if diff and profile != cfg.profile:                 # one difference explains the others
        raise ValueError(f"{path} belongs to the {profile} profile, not {cfg.profile}: pass "
                         f"--profile {profile} (or DDPM_PROFILE={profile}) to use it, or use "
                         f"another run folder for {cfg.profile}")
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{path} was made with another config ({lines}). {advice}")
