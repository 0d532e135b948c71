"""Speed benchmark of ddpm_lib's U-Net on the CPU (not a test: pytest does not collect it).

    python tests/bench.py [--quick] [--out figures]

One run measures, with warm-up and repeats (medians are quoted):
  * training images/s (forward + backward + clip + Adam + EMA, the step of ddpm_lib.train, on
    synthetic batches) and sampling images/s (one no-grad network evaluation, the cost of one
    denoising step) at 32×32 and 100×100, for
      (a) ddpm_lib.UNet in fixed settings: bf16 autocast + channels_last (fp32 + channels_last
          on a CPU without native bf16, where autocast stays off);
      (a*) ddpm_lib.UNet as training runs it: the precision and memory layout that
          ddpm_lib.speed_choice picks for the cpu profile at that size and batch (measured, or
          from its cache, or forced by DDPM_PRECISION / DDPM_MEMORY), with the time it took;
      (b) the plain reference (tests/reference_unet.py): fp32, NCHW, nn.MultiheadAttention;
      (c) diffusers' UNet2DModel of similar size (block_out_channels (32, 64, 128, 128), one
          ResNet layer per block, attention only in the mid block at the lowest resolution), in
          fp32 and in bf16 autocast + channels_last; sizes not divisible by 8 are zero-padded
          (100 → 104) and cropped back. Skipped with a message if diffusers is not installed
          (`pip install -e .[bench]`);
      (a), (b) once more at 32×32 with batch 64, to show how the ratio moves with the batch;
      (a)/(b) and (a*)/(b) also measured in pairs: one step of each back to back, 15 rounds, median of the
          per-round ratios (steadier on a machine whose speed drifts);
      (a') torch.compile of (a): cold compile time and steady-state speed, at 32×32 (the cpu
          profile's training size; --compile-sizes to change; not in --quick: a cold compile
          of the training and sampling graphs takes minutes on 2 cores);
  * FLOPs per image (torch.utils.flop_counter), the achieved FLOP/s and the MFU against this
    machine's matmul peak, measured in the same run (2048² matmul, fp32, and bf16 where native);
  * the allocator: (a)'s sampling step at batch 250 before and after
    ddpm_lib.keep_freed_memory() (images/s, minor page faults per step);
  * seconds per generated image of DDPM-1000 and DDIM-50 with ddpm_lib.sample (random weights:
    the cost does not depend on them).
Writes <out>/bench.csv (atomically) and <out>/bench.png, and prints markdown tables.
Threads: OMP_NUM_THREADS if set, else every core (os.cpu_count()).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# torch.compile's time is measured cold: inductor gets a fresh cache folder (removed at exit),
# so neither an earlier run's cache nor this one's is reused or left behind
if __name__ == "__main__" and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import ddpm_lib as dl  # noqa: E402
import ddpm_train as dt  # noqa: E402
import reference_unet  # noqa: E402

CPU = torch.device("cpu")
T0 = time.perf_counter()
LIB, REF, DIFF, COMPILED = "ddpm_lib", "reference", "diffusers", "ddpm_lib compiled"
SELECTED = "ddpm_lib selected"
# (a)'s mode: bf16 autocast runs only where bf16 is native (ddpm_lib.autocast); else it is fp32
FAST = "bf16+CL" if dl.bf16_fast(CPU) else "fp32+CL"


# -----------------------------------------------------------------------------------------------
# settings


def settings(quick: bool) -> dict:
    if quick:
        return dict(warmup=1, repeats=2, batch={32: 16, 100: 4}, more_batch={32: (32,)},
                    sampler_n=8, ddim_repeats=1, ddpm_steps=50, compile_sizes=(), peak_repeats=3,
                    paired_rounds=3)
    # batch: the cpu profile's (32 at 32×32); more_batch: (a) and (b) once more at a larger one
    return dict(warmup=3, repeats=7, batch={32: 32, 100: 8}, more_batch={32: (64,)},
                sampler_n=16, ddim_repeats=3, ddpm_steps=1000, compile_sizes=(32,), peak_repeats=5,
                paired_rounds=15)


def timed(fn, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """(median seconds of one call, every timing) after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def paired_ratio(step_a, step_b, warmup: int, rounds: int,
                 clock=time.perf_counter) -> tuple[float, float, float]:
    """(a)/(b) speed-up measured in pairs: each round times one step of each, back to back
    (alternating which goes first), and the ratio of that round is t_b / t_a. On a shared machine
    whose speed drifts by ±30 % over minutes, a pair sees the same load, so the median of the
    per-round ratios is steadier than the ratio of two medians taken minutes apart.
    Returns (median, 25th, 75th percentile)."""
    for _ in range(warmup):
        step_a(), step_b()
    ratios = []
    for r in range(rounds):
        t = {}
        for name, fn in ((("a", step_a), ("b", step_b)) if r % 2 == 0 else
                         (("b", step_b), ("a", step_a))):
            t0 = clock()
            fn()
            t[name] = clock() - t0
        ratios.append(t["b"] / t["a"])
    q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
    return float(q50), float(q25), float(q75)


def matmul_peak(dtype: torch.dtype, repeats: int, n: int = 2048) -> float:
    """GFLOP/s of an n×n @ n×n matmul (2n³ FLOPs): the best of `repeats` (a peak, so the
    fastest run, not the median)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    _, ts = timed(lambda: torch.mm(a, b), 1, repeats)
    return 2 * n ** 3 / min(ts) / 1e9


def measure_peak(repeats: int, threads: int, when: str = "") -> dict:
    """The fp32 and bf16 matmul peaks; bf16 only where it is native (emulated on an AVX2 CPU it
    ran at ~1.3 GFLOP/s, one 2048² matmul taking 13 s, and nothing in (a) runs in bf16 there)."""
    peak = {"fp32": matmul_peak(torch.float32, repeats),
            "bf16": matmul_peak(torch.bfloat16, repeats) if dl.bf16_fast(CPU) else math.nan}
    print(f"matmul peak{' ' + when if when else ''} (2048², best of {repeats}, {threads} "
          f"thread{'s' if threads > 1 else ''}): {_peaks(peak)}", flush=True)
    return peak


def _peaks(peak: dict) -> str:
    bf16 = f"{peak['bf16']:.0f} GFLOP/s" if math.isfinite(peak["bf16"]) else "not native, not measured"
    return f"fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {bf16}"


# -----------------------------------------------------------------------------------------------
# models


class DiffusersEps(nn.Module):
    """diffusers' UNet2DModel as an ε-network with ddpm_lib's call signature model(x, t): pads
    H and W up to a multiple of 8 (its three stride-2 downsamplings need it) and crops back."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        H, W = x.shape[-2:]
        ph, pw = (-H) % 8, (-W) % 8
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return self.unet(x, t).sample[..., :H, :W]


def diffusers_model():
    """UNet2DModel near our parameter count, or None (with a message) without diffusers."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import diffusers
            from diffusers import UNet2DModel
        diffusers.utils.logging.set_verbosity_error()
    except Exception as e:  # ImportError, or a broken install
        print(f"diffusers is not importable ({type(e).__name__}: {e}): skipping its columns "
              f"(install with `pip install -e .[bench]`)")
        return None, None
    unet = UNet2DModel(in_channels=3, out_channels=3, block_out_channels=(32, 64, 128, 128),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 4,
                       up_block_types=("UpBlock2D",) * 4, norm_num_groups=32,
                       attention_head_dim=32, add_attention=True)
    return DiffusersEps(unet), diffusers.__version__


# -----------------------------------------------------------------------------------------------
# one training step and one sampling step, as ddpm_lib does them


def synthetic_batches(cfg, fp, size: int, bs: int, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(bs, 3, size, size, generator=g) * 2 - 1, fp.sample_t(bs, g),
             torch.randn(bs, 3, size, size, generator=g)) for _ in range(n)]


def make_train_step(net: nn.Module, fwd, cfg: dl.Config, size: int, bs: int, library: bool):
    """The inner loop of ddpm_lib.train: to_device → autocast → diffusion_loss → zero_grad →
    backward → clip_grad_norm_ → Adam step → EMA update → loss.item(). `fwd` is what is called
    (net itself, or its torch.compile), `net` owns the parameters. library=True: ddpm_lib's
    optimizer (fused Adam); else plain torch.optim.Adam, as the report's code had it."""
    fp = dl.Diffusion.from_config(cfg)
    opt = dt.make_optimizer(net, cfg) if library else \
        torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = dl.EMA(net, cfg.ema_decay)
    batches = synthetic_batches(cfg, fp, size, bs)
    it = [0]

    def step():
        x0, t, eps = batches[it[0] % len(batches)]
        it[0] += 1
        x0, t, eps = dt.to_device(x0, cfg, CPU), t, eps
        with dl.autocast(CPU, cfg.bf16):
            loss = dl.diffusion_loss(fwd, fp, x0, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(net)
        return loss.item()
    return step


def make_sample_step(fwd, cfg: dl.Config, size: int, bs: int, library: bool):
    """One denoising step's network call, no grad. library=True: exactly ddpm_lib's samplers'
    call (ddpm_lib.eps_hat under sample's autocast(bf16=cfg.bf16), NCHW noise into the model);
    else the column's own precision and memory format."""
    fp = dl.Diffusion.from_config(cfg)
    x = torch.randn(bs, 3, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.full((bs,), 500, dtype=torch.long)
    if library:
        def lib_step():
            with torch.no_grad(), dl.autocast(CPU, cfg.bf16):
                return dl.eps_hat(fwd, fp, x, t)
        return lib_step
    x = dt.to_device(x, cfg, CPU)

    def step():
        with torch.no_grad(), dl.autocast(CPU, cfg.bf16):
            return fwd(x, t).float()
    return step


def count_flops(net: nn.Module, size: int, bs: int = 2) -> tuple[float, float]:
    """(FLOPs per image of forward + backward of the loss, FLOPs per image of a forward), fp32."""
    m = copy.deepcopy(net).float().train()
    if hasattr(m, "unet"):          # diffusers: its classic bmm attention, which is counted
        from diffusers.models.attention_processor import Attention, AttnProcessor
        for mod in m.modules():
            if isinstance(mod, Attention):
                mod.set_processor(AttnProcessor())
    x, t = torch.randn(bs, 3, size, size), torch.randint(1, 1001, (bs,))
    with FlopCounterMode(display=False) as fc:
        F.mse_loss(m(x, t), torch.zeros_like(x)).backward()
    train = fc.get_total_flops() / bs
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m.eval()(x, t)
    return train, fc.get_total_flops() / bs


# -----------------------------------------------------------------------------------------------
# the benchmark


def bench_column(name, mode, net, cfg, size, bs, S, flops, library=False, fwd=None,
                 note="") -> dict:
    fwd = net if fwd is None else fwd
    net.train()
    train_s, train_all = timed(make_train_step(net, fwd, cfg, size, bs, library), S["warmup"],
                               S["repeats"])
    net.eval()
    samp_s, _ = timed(make_sample_step(fwd, cfg, size, bs, library), S["warmup"], S["repeats"])
    train_img_s, sample_img_s = bs / train_s, bs / samp_s
    row = dict(model=name, size=size, batch=bs, mode=mode, n_params=dl.n_params(net),
               train_img_s=train_img_s, train_ms_step=1e3 * train_s,
               train_spread=(max(train_all) - min(train_all)) / train_s,
               sample_img_s=sample_img_s,
               gflop_per_img=flops[0] / 1e9, gflop_fwd_per_img=flops[1] / 1e9,
               achieved_gflops=flops[0] * train_img_s / 1e9,
               sample_gflops=flops[1] * sample_img_s / 1e9, precision="bf16" if cfg.bf16 and dl.bf16_fast(CPU)
               else "fp32", s_per_img=np.nan, compile_s=np.nan, note=note)
    print(f"  [{time.perf_counter() - T0:4.0f} s] {name:17s} {mode:16s} {size:3d}px b{bs:<3d} "
          f"train {train_img_s:7.1f} img/s  sample {sample_img_s:7.1f} img/s  "
          f"({row['achieved_gflops']:.0f} GFLOP/s training)", flush=True)
    return row


def add_paired(row_a: dict, lib, ref, cfg, cfg32, size: int, bs: int, S) -> None:
    """Adds the paired (a)/(b) training ratio (paired_ratio) to (a)'s row."""
    q50, q25, q75 = paired_ratio(make_train_step(lib, lib, cfg, size, bs, True),
                                 make_train_step(ref, ref, cfg32, size, bs, False),
                                 S["warmup"], S["paired_rounds"])
    row_a.update(paired_ratio=q50, paired_ratio_q25=q25, paired_ratio_q75=q75)
    print(f"  [{time.perf_counter() - T0:4.0f} s] (a)/(b) training, paired over "
          f"{S['paired_rounds']} rounds: {q50:.2f}× (quartiles {q25:.2f}–{q75:.2f})", flush=True)


def bench_selected(lib, ref, cfg, cfg32, size: int, bs: int, S, flops) -> dict:
    """(a*): (a)'s weights in what ddpm_lib.speed_choice picks for cfg's network at this size and
    batch, with the paired (a*)/(b) ratio; the note says how it was chosen and how long that
    took."""
    pick = dt.speed_choice(dataclasses.replace(cfg, bf16=None, channels_last=None), CPU)
    c = dataclasses.replace(cfg, bf16=pick["precision"] == "bf16",
                            channels_last=pick["memory"] == "channels_last")
    net = copy.deepcopy(lib).to(memory_format=torch.channels_last if c.channels_last
                                else torch.contiguous_format)
    print(f"  [{time.perf_counter() - T0:4.0f} s] speed_choice ({pick['seconds']:.1f} s): "
          f"{dt.speed_line(pick)}", flush=True)
    mode = f"{pick['precision']}+{'CL' if c.channels_last else 'NCHW'}"
    row = bench_column(SELECTED, mode, net, c, size, bs, S, flops, library=True,
                       note=f"speed_choice, {pick['seconds']:.1f} s: {pick['how']}")
    add_paired(row, net, ref, c, cfg32, size, bs, S)
    return row


def bench_compiled(cfg, size, bs, S, flops, eager_row) -> dict | None:
    """torch.compile of (a): compile time (first training step + first sampling call) and
    steady-state speed; None (with a message) if it fails."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = dl.build_model(cfg, CPU, verbose=False)
    try:
        fwd = torch.compile(net, dynamic=False)
        step = make_train_step(net, fwd, cfg, size, bs, library=True)
        net.train()
        t0 = time.perf_counter()
        step()
        c_train = time.perf_counter() - t0
        net.eval()
        sstep = make_sample_step(fwd, cfg, size, bs, library=True)
        t0 = time.perf_counter()
        sstep()
        c_sample = time.perf_counter() - t0
        row = bench_column(COMPILED, f"{FAST} compiled", net, cfg, size, bs, S, flops,
                           library=True, fwd=fwd, note=f"compile: train {c_train:.0f} s + "
                                                       f"sample {c_sample:.0f} s")
    except Exception as e:  # inductor needs a C++ compiler; any failure just skips the column
        msg = (str(e).splitlines() or [""])[0][:200]
        print(f"  torch.compile failed at {size}px ({type(e).__name__}: {msg}): no compiled column")
        return None
    row["compile_s"] = c_train + c_sample
    gain = 1 / row["train_ms_step"] - 1 / eager_row["train_ms_step"]         # steps/ms gained
    if gain > 0:
        saved_per_step = eager_row["train_ms_step"] - row["train_ms_step"]
        verdict = (f"pays: {row['train_img_s'] / eager_row['train_img_s']:.2f}× training speed; "
                   f"the compile time is repaid after ~{1e3 * c_train / saved_per_step:.0f} steps")
    else:
        verdict = (f"does not pay: {row['train_img_s'] / eager_row['train_img_s']:.2f}× training "
                   f"speed (slower than eager) after {c_train:.0f} s of compiling")
    print(f"  [{time.perf_counter() - T0:4.0f} s] torch.compile at {size}px {verdict}")
    row["note"] += f"; {verdict}"
    return row


def bench_allocator(S, bs: int = 250) -> list[dict]:
    """(a)'s sampling step at the samplers' batch (250), first with glibc's malloc as it comes,
    then after ddpm_lib.keep_freed_memory() (which training, evaluation and sampling get through
    get_device): images/s and minor page faults per step. Run first, since the setting cannot be
    undone in a process, and so every column after it runs with it, as training does; sequential,
    not paired."""
    import resource
    cfg = dl.get_config("cpu")
    torch.manual_seed(0)
    net = dl.build_model(cfg, CPU, verbose=False).eval()
    step = make_sample_step(net, cfg, cfg.image_size, bs, True)
    out = []
    for label in ("glibc default", "keep_freed_memory"):
        if label == "keep_freed_memory" and not dl.keep_freed_memory():
            print("  keep_freed_memory not applied (no glibc, or mallopt refused): not measured")
            break
        for _ in range(S["warmup"]):
            step()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        sec, _ = timed(step, 0, S["repeats"])
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / S["repeats"]
        print(f"  [{time.perf_counter() - T0:4.0f} s] malloc {label:17s} sampling step b{bs}: "
              f"{bs / sec:6.1f} img/s, {faults:,.0f} minor page faults per step", flush=True)
        out.append(dict(model=LIB, size=cfg.image_size, batch=bs, mode=f"malloc: {label}",
                        n_params=dl.n_params(net), sample_img_s=bs / sec, minflt_per_step=faults))
    return out


def bench_samplers(S) -> list[dict]:
    """Seconds per image of DDPM-1000 and DDIM-50 (ddpm_lib.sample, 32×32, the cpu profile's
    model in eval mode, random weights). In --quick mode DDPM-1000 is estimated from a 50-step
    run of the same loop (ForwardProcess with T=50) × 20, and says so."""
    cfg = dl.get_config("cpu")
    torch.manual_seed(0)
    model = dl.build_model(cfg, CPU, verbose=False).eval().requires_grad_(False)
    n, rows = S["sampler_n"], []
    fp = dl.Diffusion.from_config(cfg)
    steps = S["ddpm_steps"]
    fp_run = fp if steps == cfg.T else dl.Diffusion(steps, cfg.schedule, cfg.beta_1,
                                                          cfg.beta_T, cfg.target)
    dl.sample(model, fp, "ddim", n, cfg.image_size, progress=False, steps=5)        # warm-up
    t0 = time.perf_counter()
    dl.sample(model, fp_run, "ddpm", n, cfg.image_size, progress=False)
    sec = (time.perf_counter() - t0) * cfg.T / steps
    note = "measured" if steps == cfg.T else f"estimated: {steps}-step run × {cfg.T // steps}"
    rows.append(("DDPM-1000", sec / n, note))
    ddim, _ = timed(lambda: dl.sample(model, fp, "ddim", n, cfg.image_size, progress=False,
                                      steps=50), 0, S["ddim_repeats"])
    rows.append(("DDIM-50", ddim / n, f"measured, median of {S['ddim_repeats']}"))
    out = []
    for name, spi, note in rows:
        print(f"  [{time.perf_counter() - T0:4.0f} s] {name}: {spi:.3f} s per image ({n} images at 32×32, {note})", flush=True)
        out.append(dict(model=LIB, size=cfg.image_size, batch=n, mode=f"sampler {name}",
                        n_params=dl.n_params(model), s_per_img=spi, note=note))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 repeats, small batches")
    ap.add_argument("--out", default=str(ROOT / "figures"), help="folder for bench.csv/.png")
    ap.add_argument("--compile-sizes", type=int, nargs="*", choices=[32, 100], default=None,
                    help="sizes to time torch.compile at (default: 32, the cpu profile's "
                    "training size; none with --quick: a cold compile takes minutes on 2 cores)")
    ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers' UNet2DModel")
    a = ap.parse_args(argv)
    S = settings(a.quick)
    if a.compile_sizes is not None:
        S["compile_sizes"] = tuple(a.compile_sizes)
    threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") \
        else os.cpu_count()
    torch.set_num_threads(threads)
    print(f"# ddpm_lib speed benchmark ({'quick' if a.quick else 'full'}): torch "
          f"{torch.__version__}, {platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''}, "
          f"warm-up {S['warmup']}, median of {S['repeats']}")

    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{'yes' if dl.bf16_fast(CPU) else 'no, so bf16 autocast is off and (a) runs in fp32'}")
    peak = measure_peak(S["peak_repeats"], threads)
    print("allocator:", flush=True)
    rows = bench_allocator(S)

    diff, diff_version = (None, None) if a.no_diffusers else diffusers_model()
    if a.no_diffusers:
        print("diffusers skipped (--no-diffusers)")
    for size in (32, 100):
        bs = S["batch"][size]
        cfg = dl.get_config("cpu", image_size=size, batch_size=bs, bf16=dl.bf16_fast(CPU),
                            channels_last=True)                     # (a): fixed, as FAST says
        cfg32 = dataclasses.replace(cfg, bf16=False, channels_last=False)
        print(f"{size}×{size}, batch {bs}:", flush=True)
        torch.manual_seed(0)
        lib = dl.build_model(cfg, CPU, verbose=False)
        ref = reference_unet.load_from_library(lib)
        # FlopCounterMode does not count the CPU's fused attention kernel: the reference (the
        # same architecture, attention as bmm) gives the count for both.
        f_ref = count_flops(ref, size)
        rows.append(row_a := bench_column(LIB, FAST, lib, cfg, size, bs, S, f_ref,
                                          library=True))
        rows.append(bench_column(REF, "fp32", ref, cfg32, size, bs, S, f_ref))
        add_paired(row_a, lib, ref, cfg, cfg32, size, bs, S)
        rows.append(bench_selected(lib, ref, cfg, cfg32, size, bs, S, f_ref))
        del ref
        if diff is not None:
            f_d = count_flops(diff, size)
            pad = "" if size % 8 == 0 else f"padded to {size + (-size) % 8}"
            for c, mode in ((cfg32, "fp32"), (cfg, FAST)):
                torch.manual_seed(0)
                net = copy.deepcopy(diff)
                net = net.to(memory_format=torch.channels_last) if c.channels_last else net
                rows.append(bench_column(DIFF, mode, net, c, size, bs, S, f_d, note=pad))
                del net
        if size in S["compile_sizes"]:
            r = bench_compiled(cfg, size, bs, S, f_ref, row_a)
            if r is not None:
                rows.append(r)
        for b in S["more_batch"].get(size, ()):          # how the ratio moves with the batch
            print(f"{size}×{size}, batch {b}:", flush=True)
            c, c32 = (dataclasses.replace(x, batch_size=b) for x in (cfg, cfg32))
            rows.append(row_b := bench_column(LIB, FAST, lib, c, size, b, S, f_ref,
                                              library=True))
            ref = reference_unet.load_from_library(lib)
            rows.append(bench_column(REF, "fp32", ref, c32, size, b, S, f_ref))
            add_paired(row_b, lib, ref, c, c32, size, b, S)
            rows.append(bench_selected(lib, ref, c, c32, size, b, S, f_ref))
            del ref
        del lib
        gc.collect()
    print("samplers:", flush=True)
    if not S["compile_sizes"]:
        print("torch.compile not timed (--quick, or --compile-sizes with no size): pass "
              "--compile-sizes 32 to time it")
    rows += bench_samplers(S)

    # the peak once more at the end (the best of both is kept: a peak, not a typical speed)
    end = measure_peak(S["peak_repeats"], threads, "at the end")
    peak = {k: max(v, end[k]) for k, v in peak.items()}
    df = pd.DataFrame(rows)
    df["peak_gflops"] = [peak.get(p, np.nan) for p in df.precision.fillna("")]
    df.insert(df.columns.get_loc("achieved_gflops") + 1, "mfu", df.achieved_gflops / df.peak_gflops)
    df.insert(df.columns.get_loc("sample_gflops") + 1, "sample_mfu",
              df.sample_gflops / df.peak_gflops)
    df.insert(0, "threads", threads)
    df.insert(1, "cpu", torch.backends.cpu.get_cpu_capability())
    df.insert(2, "bf16_native", dl.bf16_fast(CPU))
    df["quick"] = a.quick
    df["torch"] = torch.__version__
    df["diffusers"] = diff_version or ""
    out = Path(a.out)
    dl.write_csv(df, out / "bench.csv")
    png = plot(df, out / "bench.png")
    report(df, peak, threads, a.quick)
    print(f"\n→ {out / 'bench.csv'}, {png}  ({time.perf_counter() - T0:.0f} s in all)")


# -----------------------------------------------------------------------------------------------
# output


def _fmt(v, spec):
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def report(df: pd.DataFrame, peak: dict, threads: int, quick: bool) -> None:
    speed = df[df.train_img_s.notna()]
    tab = pd.DataFrame({
        "model": speed.model, "size": speed["size"].map(lambda s: f"{s}×{s}"),
        "batch": speed.batch, "mode": speed["mode"],
        "params": speed.n_params.map(lambda n: f"{n / 1e6:.2f} M"),
        "train img/s": speed.train_img_s.map(lambda v: _fmt(v, ".1f")),
        "sample img/s": speed.sample_img_s.map(lambda v: _fmt(v, ".1f")),
        "GFLOP/img (f+b)": speed.gflop_per_img.map(lambda v: _fmt(v, ".2f")),
        "achieved GFLOP/s": speed.achieved_gflops.map(lambda v: _fmt(v, ".0f")),
        "MFU": speed.mfu.map(lambda v: _fmt(100 * v, ".1f") + " %"),
        "sample MFU": speed.sample_mfu.map(lambda v: _fmt(100 * v, ".1f") + " %"),
    })
    print(f"\n## Results ({threads} thread{'s' if threads > 1 else ''}{', --quick' if quick else ''}; MFU against the "
          f"measured 2048² matmul peak: {_peaks(peak)})\n")
    print(dl.to_markdown(tab))
    notes = speed[speed.note.astype(bool)]
    for _, r in notes.iterrows():
        print(f"- {r.model} {r['mode']} {r['size']}px: {r.note}")

    def get(model, mode, size, batch, col):
        s = speed[(speed.model == model) & ((speed["mode"] == mode) if mode else True)
                  & (speed["size"] == size) & (speed.batch == batch)]
        return s[col].iloc[0] if len(s) else np.nan

    ratios = []
    pairs = [(f"(a) {LIB} {FAST} / (b) reference fp32", (LIB, FAST), (REF, "fp32")),
             ("(a*) selected (speed_choice) / (b) reference fp32", (SELECTED, None),
              (REF, "fp32")),
             (f"(a) {LIB} {FAST} / (c) diffusers fp32", (LIB, FAST), (DIFF, "fp32")),
             (f"(a) {LIB} {FAST} / (c) diffusers {FAST}", (LIB, FAST), (DIFF, FAST)),
             ("(a') compiled / (a) eager", (COMPILED, f"{FAST} compiled"), (LIB, FAST))]
    for size, batch in speed[["size", "batch"]].drop_duplicates().itertuples(index=False):
        for label, num, den in pairs:
            if num[1] is None and math.isfinite(get(*num, size, batch, "train_img_s")):
                label = label.replace("selected", f"selected {get(*num, size, batch, 'mode')}")
            tr = get(*num, size, batch, "train_img_s") / get(*den, size, batch, "train_img_s")
            sa = get(*num, size, batch, "sample_img_s") / get(*den, size, batch, "sample_img_s")
            if math.isfinite(tr):
                ratios.append({"ratio (speed-up, >1: numerator faster)": label,
                               "size": f"{size}×{size}", "batch": batch,
                               "training": f"{tr:.2f}×", "sampling step": f"{sa:.2f}×"})
            if num[0] in (LIB, SELECTED) and den == (REF, "fp32") and "paired_ratio" in speed:
                q = [get(*num, size, batch, c) for c in
                     ("paired_ratio", "paired_ratio_q25", "paired_ratio_q75")]
                if math.isfinite(q[0]):
                    ratios.append({"ratio (speed-up, >1: numerator faster)":
                                   label + ", paired (median of rounds, quartiles)",
                                   "size": f"{size}×{size}", "batch": batch,
                                   "training": f"{q[0]:.2f}× ({q[1]:.2f}–{q[2]:.2f})",
                                   "sampling step": "–"})
    if ratios:
        print("\n## Ratios\n")
        print(dl.to_markdown(pd.DataFrame(ratios)))
    mal = df[df["mode"].str.startswith("malloc")]
    if len(mal):
        print("\n## Allocator (sampling step of (a), 32×32, batch 250)\n")
        print(dl.to_markdown(pd.DataFrame({
            "malloc": mal["mode"].str.replace("malloc: ", "", regex=False),
            "sample img/s": mal.sample_img_s.map(lambda v: f"{v:.1f}"),
            "minor page faults / step": mal.minflt_per_step.map(lambda v: f"{v:,.0f}")})))
    samp = df[df.s_per_img.notna()]
    if len(samp):
        print(f"## Sampling (ddpm_lib.sample, 32×32, {'bf16 autocast' if dl.bf16_fast(CPU) else 'fp32'})\n")
        print(dl.to_markdown(pd.DataFrame({
            "sampler": samp["mode"].str.replace("sampler ", "", regex=False),
            "images": samp.batch, "s / image": samp.s_per_img.map(lambda v: f"{v:.3f}"),
            "how": samp.note})))


def plot(df: pd.DataFrame, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    speed = df[df.train_img_s.notna()]
    labels = list(dict.fromkeys(f"{m}\n{mode}" for m, mode in zip(speed.model, speed["mode"])))
    panels = list(speed[["size", "batch"]].drop_duplicates().itertuples(index=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (size, batch) in zip(axes[0], panels):
        s = speed[(speed["size"] == size) & (speed.batch == batch)]
        lab = [f"{m}\n{mode}" for m, mode in zip(s.model, s["mode"])]
        colours = [f"C{labels.index(x)}" for x in lab]
        bars = ax.bar(range(len(s)), s.train_img_s, color=colours)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(s)), lab, fontsize=7)
        ax.set(title=f"{size}×{size}, batch {batch}", ylabel="training images / s")
    n = int(df.threads.iloc[0])
    fig.suptitle(f"training throughput (fwd+bwd+Adam), {n} CPU thread{'s' if n > 1 else ''}"
                 + (" — quick run" if bool(df["quick"].iloc[0]) else ""))
    fig.tight_layout()
    with dl.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
