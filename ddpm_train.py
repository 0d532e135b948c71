"""
The training run of ddpm_lib (what `python -m ddpm_cli train` and the notebooks' `trained` call):
one fold trained under the report's protocol with resumable, atomic checkpoints, a lock on its
folder, SIGINT/SIGTERM handled at a safe point, torch.distributed (torchrun) data parallelism,
SLURM job arrays, and the precision and memory layout chosen by measuring where training starts.
The method itself (the loss, the step, EMA, early stopping) is in ddpm_lib.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import random
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import torch.nn as nn
import torch.nn.functional as F

from ddpm_lib import (PURGE_K, RESUMABLE_KEYS, SPEED_KEYS, channels_last, ROOT, Config, EMA, Diffusion, Fruits, atomic_path, autocast,
                      bf16_fast, build_model, check_config, committed_dir, diffusion_loss,
                      eval_images, fold_rows, get_config, get_device,
                      load_checkpoint, learning_rate, load_index, load_state, optimizer_step, planned_runs,
                      save_checkpoint, seed_everything, to_float, tqdm, train_command, train_step,
                      weights,
                      write_csv)

# -----------------------------------------------------------------------------------------------
# precision and memory layout, chosen by measuring where training starts


# speed_choice's candidates (the first of each: the plain form) and how the train line names them
PRECISIONS, MEMORIES = ("fp32", "bf16"), ("nchw", "channels_last")


MEMORY_NAMES = {"nchw": "NCHW", "channels_last": "channels_last"}


_SPEED_MEMO: dict = {}           # (cache file, speed_key) → its entry, read or measured once


class SpeedError(ValueError):
    """A precision or memory layout that cannot be used as asked (bf16 where it is emulated)."""


def speed_cache_path() -> Path:
    """Where speed_choice keeps its measurements: $XDG_CACHE_HOME (else ~/.cache) /
    ddpm-fruits360/speed.json, outside the repository."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddpm-fruits360" / "speed.json"


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo; platform.processor() where there is none)."""
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def speed_key(cfg: Config) -> str:
    """What a measurement holds for: this CPU, its core and thread counts, torch's version, and
    the network, image size and batch of cfg."""
    return (f"{cpu_name()} | {os.cpu_count()} cpus, {torch.get_num_threads()} threads | torch "
            f"{torch.__version__} | {cfg.image_size}px, width {cfg.width}, batch {cfg.batch_size}")


def _speed_fixed(cfg: Config, device: torch.device) -> dict:
    """{'precision'/'memory': (value, why)} for what is not left to measuring: the Config's
    bf16/channels_last where set, else DDPM_PRECISION/DDPM_MEMORY. bf16 where it is not native
    is refused."""
    fixed = {}
    for name, attr, values in (("precision", "bf16", PRECISIONS),
                               ("memory", "channels_last", MEMORIES)):
        var, v = f"DDPM_{name.upper()}", getattr(cfg, attr)
        if v is not None:
            fixed[name] = (values[bool(v)], f"the profile's {attr}={v}")
        elif os.environ.get(var):
            if os.environ[var] not in values:
                raise SpeedError(f"{var}={os.environ[var]!r}: choose one of {', '.join(values)}, "
                                 f"or unset it to have it measured")
            fixed[name] = (os.environ[var], f"forced by {var}")
    if fixed.get("precision", ("",))[0] == "bf16" and not bf16_fast(device):
        raise SpeedError(f"bf16 asked for ({fixed['precision'][1]}), but this CPU ({cpu_name()}, "
                         f"{torch.backends.cpu.get_cpu_capability()}) has no native bf16 "
                         f"(AVX512-BF16 or AMX): emulated, it runs many times slower than fp32. "
                         f"Use DDPM_PRECISION=fp32, or unset it to have it measured")
    return fixed


def _read_speed_cache(path: Path) -> dict:
    import json
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _speed_entry(path: Path, key: str) -> dict:
    """The cache's entry for key; one not shaped like speed_choice writes it (edited by hand,
    another version) is reported, naming the file, and measured again (then replaced)."""
    entry = _read_speed_cache(path).get(key, {})
    img_s = entry.get("img_s", {}) if isinstance(entry, dict) else None
    if isinstance(img_s, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                       for v in img_s.values()):
        return entry
    warnings.warn(f"{path}: the entry for this machine is malformed (expected "
                  f"{{\"img_s\": {{\"fp32/nchw\": <images/s>, …}}}}, found {str(entry)[:80]!r}): "
                  f"measuring again and replacing it (or delete the file)")
    return {}


def speed_choice(cfg: Config, device: torch.device | None = None, timer=None,
                 seconds: float = 1.0) -> dict:
    """How to train cfg's network fastest on `device`: {'precision': 'fp32'|'bf16', 'memory':
    'nchw'|'channels_last', 'how': why, in words, 'img_s': {'precision/memory': images/s measured},
    'seconds': time spent measuring now}.

    What the Config sets (bf16, channels_last not None) is kept; what it leaves open,
    DDPM_PRECISION / DDPM_MEMORY force; bf16 forced where it is not native is refused
    (SpeedError). On CUDA the rest is bf16 + channels_last. On a CPU the rest is measured:
    `timer(cfg, precision, memory, device, seconds)` (default time_train_steps) gives the
    training images/s of each candidate (bf16 only where native), the fastest is taken, and the
    numbers are kept in speed_cache_path() under speed_key(cfg), so a machine measures once."""
    device = device or get_device()
    fixed = _speed_fixed(cfg, device)
    why = [w for _, w in fixed.values()]
    if device.type == "cuda" or len(fixed) == 2:
        p, m = fixed.get("precision", ("bf16",))[0], fixed.get("memory", ("channels_last",))[0]
        return dict(precision=p, memory=m, how="; ".join(dict.fromkeys(why)) or "CUDA",
                    img_s={}, seconds=0.0)
    cands = [f"{p}/{m}" for p in PRECISIONS[:1 + bf16_fast(device)] for m in MEMORIES
             if fixed.get("precision", (p,))[0] == p and fixed.get("memory", (m,))[0] == m]
    path, key = speed_cache_path(), speed_key(cfg)
    entry = _SPEED_MEMO.get((str(path), key)) or _speed_entry(path, key)
    img_s, t0 = dict(entry.get("img_s", {})), time.perf_counter()
    todo = [c for c in cands if c not in img_s]
    for c in todo:
        img_s[c] = float((timer or time_train_steps)(cfg, *c.split("/"), device, seconds))
    secs = time.perf_counter() - t0
    best = max(cands, key=lambda c: img_s[c])
    if todo:
        import json
        full = max(img_s, key=img_s.get)
        data = _read_speed_cache(path)
        data[key] = entry = dict(img_s=img_s, precision=full.split("/")[0],
                                 memory=full.split("/")[1], seconds=round(secs, 1))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            print(f"speed: measured {', '.join(todo)} in {secs:.1f} s → {path}", flush=True)
        except OSError as e:
            warnings.warn(f"could not write {path} ({e}): the choice is measured again next time")
    _SPEED_MEMO[(str(path), key)] = entry
    ranked = sorted(cands, key=lambda c: -img_s[c])
    why.insert(0, ("measured " if todo else "measured earlier ")
               + " vs ".join(f"{img_s[c]:.3g}" for c in ranked) + " img/s ("
               + ", ".join(c.replace("/", " ") for c in ranked) + ")")
    p, m = best.split("/")
    return dict(precision=p, memory=m, how="; ".join(why), img_s={c: img_s[c] for c in cands},
                seconds=secs)


def speed_line(choice: dict) -> str:
    """The line train() prints where it starts: precision, memory layout and why."""
    return (f"precision: {choice['precision']}, memory: {MEMORY_NAMES[choice['memory']]} — "
            f"{choice['how']}")


def time_train_steps(cfg: Config, precision: str, memory: str, device: torch.device,
                     seconds: float = 1.0) -> float:
    """Images/s of train()'s step (forward, backward, clip, Adam, EMA) of cfg's network at its
    image size and batch, on one random batch, in `precision` and `memory`: one warm-up step,
    then steps for about `seconds` (at least one). The global RNG states are left as they were."""
    c = dataclasses.replace(cfg, bf16=precision == "bf16", channels_last=memory == "channels_last")
    with torch.random.fork_rng(devices=[]), torch.enable_grad():    # also when sampling asks
        model = build_model(c, device, verbose=False).train()
        ema, opt = EMA(model, c.ema_decay), make_optimizer(model, c)
        fp = Diffusion.from_config(c).to(device)
        g = torch.Generator().manual_seed(0)
        x0 = torch.rand(c.batch_size, 3, c.image_size, c.image_size, generator=g) * 2 - 1
        t, eps = fp.sample_t(c.batch_size, g), torch.randn(x0.shape, generator=g)
        x0, t, eps = to_device(x0, c, device), t.to(device), eps.to(device)
        n, t0 = -1, 0.0
        while n < 1 or time.perf_counter() - t0 < seconds:
            with autocast(device, c.bf16):
                loss = diffusion_loss(model, fp, x0, t, eps)
            optimizer_step(model, ema, opt, loss, c)
            loss.item()
            n += 1
            if n == 0:                                  # the warm-up step is not counted
                t0 = time.perf_counter()
    return n * c.batch_size / (time.perf_counter() - t0)


def resumed_speed(saved: dict, cfg: Config, device: torch.device, path: Path) -> dict:
    """A resumed run's precision and memory layout: those it started with, from its checkpoint's
    config (which holds them as bf16/channels_last; bf16 runs only where native, as it did in
    checkpoints older than speed_choice). A Config that sets others is refused."""
    p = "bf16" if saved.get("bf16", True) and bf16_fast(device) else "fp32"
    m = "channels_last" if saved.get("channels_last", True) else "nchw"
    for attr, v in (("bf16", p == "bf16"), ("channels_last", m == "channels_last")):
        if getattr(cfg, attr) not in (None, v):
            raise ValueError(f"{path} was trained with {attr}={v}, not {getattr(cfg, attr)}: a run "
                             f"keeps its precision and memory layout. Resume it with {attr}={v} "
                             f"(or unset), or start a new run in another --out folder")
    return dict(precision=p, memory=m, how=f"kept from {path} (the run started with it)",
                img_s={}, seconds=0.0)


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep the memory a step frees for the next step (mmap only above
    32 MiB, give memory back to the OS only above 1 GiB free) instead of returning it and
    page-faulting it in again (tests/bench.py measures what it buys). The process keeps its
    peak memory. Returns False where there is no glibc (macOS, musl) or mallopt refuses
    a setting. Called where training (_train) and the command line (ddpm_cli.main) start."""
    import ctypes
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3              # <malloc.h>
    return all([mallopt(k, v) == 1 for k, v in ((M_MMAP_THRESHOLD, 32 << 20),    # try each
                                                 (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))])


# -----------------------------------------------------------------------------------------------
# a run's safety: one writer, stop signals, RNG states


class RunLocked(RuntimeError):
    """Another process is writing the same run folder."""


@contextlib.contextmanager
def run_lock(folder: Path | str):
    """Hold an exclusive lock on folder/.lock (fcntl.flock, with our pid in the file) for the
    block, or raise RunLocked naming the process that holds it. The kernel drops the lock
    when its process dies, so the lock of a killed run never blocks the next one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:                      # no flock (Windows): run unlocked
        yield
        return
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise RunLocked(f"{folder} is in use by another process (pid {pid}): wait for it to "
                            f"finish or stop it (kill {pid}), or use another --out folder") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM arrived during training; `signum` says which."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum = signum


@contextlib.contextmanager
def catch_stop_signals():
    """For the block, SIGINT and SIGTERM (what Ctrl-C and a SLURM time limit send) set
    flag["signum"], so the caller can stop at a safe point; while flag["at_once"] is true
    (stop_at_once) they also raise KeyboardInterrupt where they land. Outside the main thread:
    a no-op."""
    import signal
    import threading
    flag = {"signum": 0, "at_once": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def caught(signum, frame):
        flag["signum"] = signum
        if flag["at_once"]:
            raise KeyboardInterrupt     # not an Exception: no `except Exception` holds it up

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, caught)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def stop_at_once(stop: dict, what: str):
    """Within catch_stop_signals (stop: its flag), for a block that keeps nothing (a run's
    start: its checks, the speed measurement, loading the data), SIGINT and SIGTERM stop the
    block where they land instead of at the next training step, and raise Interrupted, whose
    message is the signal's name followed by `what`. The block may end the mode early by
    setting stop["at_once"] = False."""
    import signal
    stop["at_once"] = True
    try:
        if stop["signum"]:                        # arrived just before the block
            raise KeyboardInterrupt
        yield
    except KeyboardInterrupt:
        if not stop["signum"]:
            raise
        raise Interrupted(f"interrupted by {signal.Signals(stop['signum']).name} {what}",
                          stop["signum"]) from None
    finally:
        stop["at_once"] = False


def rng_state() -> dict:
    """The global RNG states as tensors and lists (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(mt), gauss_next]}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, mt, gauss_next = s["python"]
    random.setstate((version, tuple(mt), gauss_next))


def _fold_seed(cfg: Config, fold, epoch: int) -> int:
    return cfg.seed * 1_000_003 + (99 if fold == "all" else int(fold)) * 1009 + epoch


# -----------------------------------------------------------------------------------------------
# torch.distributed (torchrun): one process per GPU


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_setup() -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL with CUDA, gloo on the CPU, one
    GPU per process); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as tdist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), local)


def _all_sum(d: Dist, x: torch.Tensor) -> torch.Tensor:
    """x summed over the processes of d (x itself for one process)."""
    if d.world > 1:
        import torch.distributed as tdist
        tdist.all_reduce(x)
    return x


def _from_rank0(d: Dist, v):
    """Rank 0's value of v on every process, so all take the same decisions (early stopping,
    precision)."""
    if d.world == 1:
        return v
    import torch.distributed as tdist
    x = [v]
    tdist.broadcast_object_list(x, src=0)
    return x[0]


def to_device(x: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    """x on the device, in cfg's memory layout."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last(cfg) else x


# -----------------------------------------------------------------------------------------------
# one epoch: the batches, the validation loss, early stopping


@dataclass
class EarlyStopping:
    """Stop when the validation loss has not *decreased* for `patience` epochs (the report's
    'did not increase' is a slip)."""
    patience: int = 5
    best: float = math.inf
    bad_epochs: int = 0

    def step(self, val_loss: float) -> bool:
        """Record one epoch; True when it is a new best."""
        if val_loss < self.best:
            self.best, self.bad_epochs = val_loss, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad_epochs >= self.patience


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Adam:
    """The report's Adam, as the fused kernel (one pass over all parameters; on this CPU
    6.4 ms a step against 11.5 ms for the default foreach form, clip included)."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=True)


def epoch_batches(images: torch.Tensor, cfg: Config, fp: Diffusion, g: torch.Generator,
                  labels: torch.Tensor | None = None):
    """One epoch of (x0, t, ε, y) from the uint8 cache; every draw comes from the epoch's
    generator, so an epoch is reproduced exactly after a resume. y: None, or for a conditional
    config the labels with a share p_uncond replaced by the null class n_classes [CFG]."""
    n, bs = len(images), min(cfg.batch_size, len(images))
    steps = cfg.steps_per_epoch or n // bs
    perm = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-steps * bs // n))])
    for s in range(steps):
        idx = perm[s * bs:(s + 1) * bs]
        x0 = to_float(images[idx])                                         # (B, 3, H, W)
        if cfg.flip:
            x0 = torch.where(torch.rand(bs, 1, 1, 1, generator=g) < 0.5, x0.flip(-1), x0)
        t, eps = fp.sample_t(bs, g), torch.randn(x0.shape, generator=g)
        y = None
        if cfg.n_classes:                                                  # (B,) label dropout
            y = torch.where(torch.rand(bs, generator=g) < cfg.p_uncond, cfg.n_classes, labels[idx])
        yield x0, t, eps, y


@torch.no_grad()
def validation_loss(model, fp: Diffusion, images: torch.Tensor, cfg: Config,
                    device: torch.device, batch: int = 256) -> float:
    """The loss training optimises (diffusion_loss), over the validation images, with fixed,
    seeded noise and timesteps so that epochs are comparable: the mean squared error to the
    training target (ε; √(1-ᾱ_t)·ε for 'scaled_eps'; F's target with sigma_data, not
    comparable with the others), each image's error weighted by loss_weight(t) where the
    run trains with min_snr_gamma [MinSNR]. A conditional model is validated with the null
    class."""
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    total, count = 0.0, 0
    for i in range(0, len(images), batch):
        x0 = to_float(images[i:i + batch])
        t, eps = fp.sample_t(len(x0), g), torch.randn(x0.shape, generator=g)
        x0, t, eps = to_device(x0, cfg, device), t.to(device), eps.to(device)
        with autocast(device, cfg.bf16):
            xt, target = fp(x0, t, eps)
            out = model(xt, t).float()
        if fp.min_snr_gamma:                                   # as diffusion_loss weighs it
            err = fp.at(fp.loss_weight, t) * (out - target) ** 2
            total += err.sum().item()
        else:
            total += F.mse_loss(out, target, reduction="sum").item()
        count += target.numel()
    return total / count


def fold_datasets(cfg: Config, fold) -> tuple[Fruits, Fruits]:
    index = load_index(cfg)
    tr, val = fold_rows(index, fold, PURGE_K if cfg.split == "grouped" else 0)
    root = cfg.home / cfg.data_dir / "fruits-360"
    classes = sorted(index.label.unique())
    return (Fruits(tr, root, cfg.image_size, cfg.flip, classes),
            Fruits(val, root, cfg.image_size, False, classes))


# The settings a run's weights must share with the run they start from (Config.init).
INIT_KEYS = ("width", "time_dim", "heads", "n_classes", "sigma_data", "T", "beta_1", "beta_T",
             "schedule", "target", "split")


def init_weights(cfg: Config, fold) -> Path:
    """The weights that a cfg.init run starts from: those of the same run (target, split, fold)
    of profile cfg.init (weights(): local, else committed), checked to share INIT_KEYS."""
    src_cfg = dataclasses.replace(get_config(cfg.init), root=cfg.root,
                                  **{k: getattr(cfg, k) for k in INIT_KEYS})
    src = weights(src_cfg, fold)
    if not src.exists():
        raise FileNotFoundError(f"{src} not found: a {cfg.profile} run starts from the {cfg.init} "
                                f"run of the same fold and target. Train it first: "
                                f"`{train_command(src_cfg, fold)}`")
    check_config(load_checkpoint(src, need=("config", "ema"))["config"], src_cfg, src,
                 keys=INIT_KEYS)
    return src


def remove_partial(folder: Path | str) -> list[Path]:
    """Delete the temporary files atomic_path leaves when a process is killed mid-write."""
    left = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for p in left:
        p.unlink(missing_ok=True)
    return left


# -----------------------------------------------------------------------------------------------
# the training run: resumable, checkpointed, early-stopped


def train(cfg: Config, fold=0, resume: bool = False, out: Path | str | None = None,
          progress: bool = True) -> pd.DataFrame:
    """Train one fold ('all': every training image, validated on Test/) and return its history.

    After every epoch an atomic checkpoint (model, EMA, optimizer, epoch, early-stopping state,
    history, RNG states, fold, config) goes to out/checkpoint.pt, the best EMA weights to
    out/best.pt and the history to out/history.csv. resume=True continues a stopped run (and
    returns at once when it has finished); a killed and resumed run ends with the same weights
    as an unbroken one. The run folder is locked for the run (run_lock); SIGINT and SIGTERM
    stop it at the next step with the last epoch's checkpoint kept, or, before the first step
    (checks, speed measurement, data), where they land (raises Interrupted either way).

    Under torchrun (WORLD_SIZE > 1) every process draws the same global batch of cfg.batch_size
    and trains on its 1/WORLD_SIZE slice with DistributedDataParallel, so an update is the
    single-process update of that batch; rank 0 alone writes checkpoints and history.
    """
    out = Path(out) if out else cfg.run_dir(fold)
    d = dist_setup()
    with run_lock(out) if d.main else contextlib.nullcontext(), catch_stop_signals() as stop:
        if d.main:
            remove_partial(out)
        with stop_at_once(stop, f"while fold {fold}'s run was starting (its checks, the speed "
                                f"measurement, loading the data): nothing new was written. "
                                f"Continue with `{run_command(cfg, fold, out)} --resume`"):
            return _train(cfg, fold, resume, out, progress and d.main, stop, d)


# -----------------------------------------------------------------------------------------------
# what a run was made from (issue 45): its index, its fold's images, its classes


def _digest(lines) -> str:
    import hashlib
    return hashlib.sha1("\n".join(sorted(lines)).encode()).hexdigest()[:16]


def data_fingerprint(cfg: Config, fold) -> dict:
    """What a run is trained on: digests of the index (every image, its split and fold) and of
    this fold's assignment (which images train, which validate), the class names, the counts,
    and the folder its images came from (data_dir/fruits-360's target)."""
    index = load_index(cfg)
    tr, val = fold_rows(index, fold, PURGE_K if cfg.split == "grouped" else 0)
    link = cfg.home / cfg.data_dir / "fruits-360"
    return {"index": _digest(index.path + "|" + index.label + "|" + index.split + "|"
                             + index.fold.astype(str)),
            "folds": _digest(list("train|" + tr.path) + list("val|" + val.path)),
            "classes": sorted(index.label.unique()), "n_train": len(tr), "n_val": len(val),
            "source": str(link.resolve()) if link.exists() else ""}


def run_command(cfg: Config, fold, out: Path | str) -> str:
    """train_command with the run's folder and every recipe setting it was given (--set, flags)
    beyond its profile's, so that the line, run as printed, trains or resumes this very run."""
    cmd = train_command(cfg, fold)
    from ddpm_lib import GENERATION, GENERATION_COND, PROFILES
    p = cfg.profile
    gen = ((GENERATION_COND.get(p, GENERATION[p]) if cfg.n_classes else GENERATION[p])
           if fold == "all" else {})
    base = dataclasses.asdict(Config(profile=p, **{**PROFILES[p], **gen}))
    for k, v in dataclasses.asdict(cfg).items():
        if k in ("max_epochs", "patience") and v != base[k]:
            cmd += f" --{k.replace('_', '-')} {v}"
        elif (k not in RESUMABLE_KEYS | SPEED_KEYS | {"target", "split", "n_classes", "profile",
                                                      "root"} and v != base[k]):
            cmd += f" --set {shlex.quote(f'{k}={v}')}"
    return f"{cmd} --out {shlex.quote(str(out))}"


def check_data(saved: dict, now: dict, ckpt_path: Path, cfg: Config, fold, out: Path) -> None:
    """Refuse to resume a run on other data than it was made from (saved: its checkpoint's
    data_fingerprint), naming what changed and both ways out."""
    if saved is None or all(saved.get(k) == now.get(k) for k in ("index", "folds", "classes")):
        return
    what = []
    added = sorted(set(now["classes"]) - set(saved["classes"]))
    removed = sorted(set(saved["classes"]) - set(now["classes"]))
    if added or removed:
        what.append("classes" + (f" added: {', '.join(added)}" if added else "")
                    + (";" if added and removed else "")
                    + (f" removed: {', '.join(removed)}" if removed else ""))
    if saved.get("folds") != now.get("folds"):
        what.append(f"fold {fold}'s images changed (training {saved['n_train']:,} → "
                    f"{now['n_train']:,}, validation {saved['n_val']:,} → {now['n_val']:,}): "
                    f"resuming would train on images it validated on")
    elif saved.get("index") != now.get("index"):
        what.append("the index lists other images")
    data = cfg.home / cfg.data_dir
    back = (f"index its data again — `python -m ddpm_cli data --from {saved['source']} --out "
            f"{data}` — and rerun this command" if saved.get("source") else
            f"index the data it was trained on again (`python -m ddpm_cli data --from … --out "
            f"{data}`) and rerun this command")
    fresh = out.with_name(out.name + "-new")
    raise ValueError(f"{ckpt_path} was trained on other data than {data / 'index.csv'} holds now "
                     f"({'; '.join(what)}). Either {back}, or start a fresh run on the new data "
                     f"in another folder: `{run_command(cfg, fold, fresh)}`")


# What a training checkpoint holds that resuming needs (an export or a best.pt lacks most).
RESUME_KEYS = ("config", "model", "ema", "optimizer", "epoch", "best_val", "bad_epochs",
               "history", "rng")


def _train(cfg: Config, fold, resume: bool, out: Path, progress: bool, stop: dict,
           d: Dist) -> pd.DataFrame:
    device = get_device()
    keep_freed_memory()
    if cfg.batch_size % d.world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {d.world} "
                         f"processes (torchrun --nproc_per_node): pick a count that divides it")
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not resume:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume (resume=True) to continue it, "
                              f"or delete {out} to start over")
    ck = load_checkpoint(ckpt_path, need=RESUME_KEYS) if resume and ckpt_path.exists() else None
    if ck and str(ck.get("fold", fold)) != str(fold):
        raise ValueError(f"{ckpt_path} is a run of fold {ck['fold']}, not of fold {fold}: "
                         f"resume it with --fold {ck['fold']}, or start fold {fold} in "
                         f"another --out folder")
    if ck:
        check_config(ck["config"], cfg, ckpt_path)
    data = data_fingerprint(cfg, fold)
    if ck:
        check_data(ck.get("data"), data, ckpt_path, cfg, fold, out)
    speed = resumed_speed(ck["config"], cfg, device, ckpt_path) if ck else \
        speed_choice(cfg, device)
    if not ck and d.world > 1:                       # one choice for all processes: rank 0's
        speed = _from_rank0(d, speed)
    cfg = dataclasses.replace(cfg, bf16=speed["precision"] == "bf16",
                              channels_last=speed["memory"] == "channels_last")
    if progress:
        print(speed_line(speed), flush=True)
    seed_everything(cfg.seed)
    model = build_model(cfg, device, verbose=progress)
    ema = EMA(model, cfg.ema_decay)
    opt = make_optimizer(model, cfg)
    if cfg.init and not ck:                          # fine-tuning: another profile's weights
        src = init_weights(cfg, fold)
        load_state(model, load_checkpoint(src, need=("config", "ema"))["ema"], src)
        ema = EMA(model, cfg.ema_decay)
        if progress:
            print(f"starting from {src}", flush=True)
    fp = Diffusion.from_config(cfg).to(device)
    stopper, history, start = EarlyStopping(cfg.patience), [], 0
    if ck:
        for part, key in ((model, "model"), (ema, "ema"), (opt, "optimizer")):
            load_state(part, ck[key], ckpt_path)
        for group in opt.param_groups:                # lr may change on resume (RESUMABLE_KEYS)
            group["lr"] = cfg.lr
        if progress and ck["config"].get("lr", cfg.lr) != cfg.lr:
            print(f"learning rate {ck['config']['lr']:g} → {cfg.lr:g} from epoch {ck['epoch'] + 1} "
                  f"(the history's lr column records it)", flush=True)
        stopper = EarlyStopping(cfg.patience, ck["best_val"], ck["bad_epochs"])
        history, start = ck["history"], ck["epoch"]
        set_rng_state(ck["rng"])
    if stopper.stop or start >= cfg.max_epochs:
        if not (out / "best.pt").exists():
            raise FileNotFoundError(
                f"{out / 'best.pt'} is missing, but {ckpt_path} says the run finished (epoch "
                f"{start}): its best weights are gone. Delete {out} and train again: "
                f"{train_command(cfg, fold, out)}")
        return pd.DataFrame(history)

    train_ds, val_ds = fold_datasets(cfg, fold)
    # a conditional model's labels are indexes into these names: every model file keeps them
    # (what it was trained on; issue 44)
    names = {"classes": list(train_ds.classes)}
    images = train_ds.images.pin_memory() if device.type == "cuda" else train_ds.images
    val_images = val_ds.images
    if cfg.val_images and len(val_images) > cfg.val_images:
        sel = torch.randperm(len(val_images), generator=torch.Generator().manual_seed(cfg.seed))
        val_images = val_images[sel[:cfg.val_images]]
    # the same Test/ images for every fold (fixed noise and t): how optimistic validation is
    test_images = eval_images(cfg) if fold != "all" else None
    steps = cfg.steps_per_epoch or len(images) // min(cfg.batch_size, len(images))
    if d.world > 1:                                  # after loading: DDP broadcasts rank 0's
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda"
                                      else None)
    else:
        net = model
    stop["at_once"] = False       # from here a signal stops the run at the next step (check)
    for epoch in range(start, cfg.max_epochs):
        g = torch.Generator().manual_seed(_fold_seed(cfg, fold, epoch))
        model.train()
        t0, losses = time.perf_counter(), []

        def check(loss) -> bool:
            """Between the loss and the update: one collective a step (the global batch's
            loss and whether any process was signalled, so that all processes stop, or raise,
            at the same step); records the step's loss."""
            both = _all_sum(d, torch.stack([loss.detach().float().cpu(),
                                            torch.tensor(float(stop["signum"]))]))
            if both[1] > 0:
                stop["signum"] = stop["signum"] or 15                    # SIGTERM elsewhere
                return False
            step_loss = both[0] / d.world
            if not torch.isfinite(step_loss):
                raise FloatingPointError(
                    f"loss is {step_loss.item()} at fold {fold}, epoch {epoch + 1}, step "
                    f"{len(losses) + 1}: training stopped. The last good checkpoint ({ckpt_path}, "
                    f"epoch {start if not history else history[-1]['epoch']}) is intact: lower "
                    f"the learning rate and continue from it, "
                    f"`{run_command(cfg, fold, out)} --resume --set lr={cfg.lr / 10:g}`, or "
                    f"check the data")
            losses.append(step_loss.item())
            return True

        bar = tqdm(epoch_batches(images, cfg, fp, g, train_ds.labels), total=steps,
                   disable=not progress, desc=f"fold {fold} epoch {epoch + 1}/{cfg.max_epochs}",
                   unit="step")
        for x0, t, eps, y in bar:
            if d.world > 1:                                       # this process's slice
                b = len(x0) // d.world
                x0, t, eps, y = (v if v is None else v[d.rank * b:(d.rank + 1) * b]
                                 for v in (x0, t, eps, y))
            x0, t, eps = to_device(x0, cfg, device), t.to(device), eps.to(device)
            y = y if y is None else y.to(device)
            lr = (learning_rate(cfg, epoch * steps + len(losses), steps)
                  if cfg.lr_warmup or cfg.lr_decay != "constant" else None)
            if train_step(model, ema, opt, fp, x0, cfg, t=t, eps=eps, y=y, lr=lr,
                          net=net, check=check) is None:
                break                                     # a process was signalled
            rate = len(losses) * len(x0) * d.world / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", img_s=f"{rate:.0f}")
        if stop["signum"]:
            import signal
            last = history[-1]["epoch"] if history else 0
            kept = f"{ckpt_path} (epoch {last}) is kept" if last else "nothing was saved yet"
            raise Interrupted(f"interrupted by {signal.Signals(stop['signum']).name} in epoch "
                              f"{epoch + 1} of fold {fold}: {kept}. Continue with "
                              f"`{train_command(cfg, fold, out)} --resume`", stop["signum"])
        train_secs = time.perf_counter() - t0
        model.eval()
        val = _from_rank0(d, validation_loss(ema.model, fp, val_images, cfg, device))
        if not math.isfinite(val):
            raise FloatingPointError(f"validation loss is {val} after epoch {epoch + 1}; the last "
                                     f"good checkpoint {ckpt_path} is intact")
        improved = stopper.step(val)
        test = (validation_loss(ema.model, fp, test_images, cfg, device)
                if test_images is not None else val)
        secs = time.perf_counter() - t0
        history.append(dict(epoch=epoch + 1, train_loss=float(np.mean(losses)), val_loss=val,
                            test_loss=test,
                            seconds=secs, lr=opt.param_groups[0]["lr"],
                            images_per_s=len(losses) * cfg.batch_size / train_secs,
                            best=improved, precision=speed["precision"],
                            memory=speed["memory"], processes=d.world, cpu=cpu_name(),
                            threads=torch.get_num_threads()))
        if progress:
            left = (cfg.max_epochs - epoch - 1) * np.mean([h["seconds"] for h in history[start:]])
            print(f"fold {fold} epoch {epoch + 1}: train {history[-1]['train_loss']:.4f} "
                  f"val {val:.4f}{' *' if improved else ''}  {secs:.0f}s "
                  f"(≤{left / 60:.0f} min left)", flush=True)
        if improved and d.main:
            save_checkpoint({"config": dataclasses.asdict(cfg), "ema": ema.model.state_dict(),
                             "epoch": epoch + 1, "val_loss": val, **names}, out / "best.pt")
        if cfg.snapshot_every and (epoch + 1) % cfg.snapshot_every == 0 and d.main:
            save_checkpoint({"config": dataclasses.asdict(cfg), "epoch": epoch + 1,
                             "ema": {k: v.half() for k, v in ema.model.state_dict().items()}},
                            out / f"ema_epoch{epoch + 1:04d}.pt")
        if d.main:
            save_checkpoint({"config": dataclasses.asdict(cfg), "model": model.state_dict(),
                             "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                             "epoch": epoch + 1, "best_val": stopper.best,
                             "bad_epochs": stopper.bad_epochs, "history": history,
                             "fold": str(fold), "rng": rng_state(), "speed": speed,
                             "data": data, **names},
                            ckpt_path)
            write_csv(pd.DataFrame(history), out / "history.csv")
        if stopper.stop:
            break
    return pd.DataFrame(history)


def export_ema(cfg: Config, fold, path: Path | str | None = None) -> Path:
    """Write the best EMA weights in half precision (≈ 2 bytes a parameter) for committing, by
    default with the run's history to committed_dir(cfg, fold): the history goes inside the
    weights file (one file, so never a mismatched pair) and beside it as history.csv, whose
    temporary is complete before the weights are replaced and renamed right after them."""
    best = cfg.run_dir(fold) / "best.pt"
    if not best.exists():
        raise FileNotFoundError(f"{best} not found: fold {fold} of this profile has no trained "
                                f"weights to export. Train it first with "
                                f"`{train_command(cfg, fold)}`, then export")
    ck = load_checkpoint(best, need=("config", "ema"))
    ck["ema"] = {k: v.half() for k, v in ck["ema"].items()}
    if path is not None:
        save_checkpoint(ck, Path(path))
        return Path(path)
    path = committed_dir(cfg, fold) / "ema_fp16.pt"
    remove_partial(path.parent)                          # of an export that was killed
    history = pd.read_csv(cfg.run_dir(fold) / "history.csv")
    ck["history"] = history.to_dict("records")
    with atomic_path(path.parent / "history.csv") as tmp:
        history.to_csv(tmp, index=False)
        save_checkpoint(ck, path)
    return path


# -----------------------------------------------------------------------------------------------
# SLURM: every planned run as one job array


def run_args(over: dict, fold) -> list[str]:
    """The `train` flags of one planned run (see planned_runs)."""
    return (["--fold", str(fold)] + [a for k in ("target", "split") if k in over
                                     for a in (f"--{k}", over[k])]
            + ["--conditional"] * over.get("conditional", False))


def run_out(base: Path | None, cfg: Config, fold) -> Path:
    """A run's folder: its usual one (base None), or the same subfolder under base."""
    d = cfg.run_dir(fold)
    return d if base is None else Path(base) / cfg.run_name(fold)


@dataclass
class Slurm:
    """The sbatch settings of `submit` (each is a flag of the command; '' leaves it to the
    cluster's default)."""
    partition: str = ""
    account: str = ""
    time: str = "04:00:00"          # per array task; a task that hits it is requeued
    cpus_per_task: int = 2
    gpus_per_task: int = 0          # > 1: the task runs torchrun with one process per GPU
    mem: str = ""
    signal_secs: int = 180          # SIGTERM this long before the time limit (--signal)


def slurm_script(profile: str, sl: Slurm, out: Path | None = None, max_epochs: int | None = None,
                 log_dir: Path | None = None, tasks: str = "") -> str:
    """An sbatch script: one array task per planned run, each `train … --resume`. SLURM's
    warning signal (--signal=B:TERM) reaches the task; train() stops at the next step with the
    last epoch's checkpoint kept, and the task requeues itself to continue where it stopped.
    out: a base folder for the runs instead of runs/<profile>/ (each run in its usual subfolder);
    tasks: which of them (sbatch's --array syntax, e.g. '0,6'; default all)."""
    import shlex
    runs = planned_runs()
    log_dir = log_dir or ROOT / "runs" / profile / "slurm"
    opts = dict(job_name=f"ddpm-{profile}", array=tasks or f"0-{len(runs) - 1}", time=sl.time,
                cpus_per_task=sl.cpus_per_task, partition=sl.partition, account=sl.account,
                mem=sl.mem, gpus_per_task=sl.gpus_per_task or "",
                signal=f"B:TERM@{sl.signal_secs}", output=f"{log_dir}/%A_%a.out")
    head = [f"#SBATCH --{k.replace('_', '-')}={v}" for k, v in opts.items() if v != ""]
    head += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
    py = shlex.quote(sys.executable)
    launch = (f"{py} -m torch.distributed.run --standalone --nproc_per_node={sl.gpus_per_task}"
              if sl.gpus_per_task > 1 else py)
    cases = []
    for i, (over, fold) in enumerate(runs):
        args = run_args(over, fold)
        if out is not None:
            args += ["--out", str(run_out(out, get_config(profile, fold == "all", **over), fold))]
        args += ["--max-epochs", str(max_epochs)] if max_epochs else []
        cases.append(f"  {i}) args=({' '.join(shlex.quote(a) for a in args)}) ;;")
    return "\n".join(["#!/bin/bash", *head, "",
                      f"# written by `python -m ddpm_cli submit --profile {profile}`; the runs of "
                      f"`train-all`, one per task", f"cd {shlex.quote(str(ROOT))}",
                      "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
                      "case $SLURM_ARRAY_TASK_ID in", *cases, "esac",
                      f"{launch} -m ddpm_cli train --profile {profile} \"${{args[@]}}\" --resume &",
                      "pid=$! term=0",
                      "trap 'term=1; kill -TERM $pid' TERM     # SLURM's warning before the limit",
                      "wait $pid; rc=$?",
                      "while kill -0 $pid 2>/dev/null; do wait $pid; rc=$?; done",
                      'if [ $term = 1 ]; then',
                      '  echo "requeued to continue (train --resume)"',
                      '  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
                      "fi", "exit $rc", ""])


def submit(profile: str, sl: Slurm, out: Path | None = None, max_epochs: int | None = None,
           wait: bool = False, dry_run: bool = False, tasks: str = "") -> str:
    """Write the array script to runs/<profile>/slurm/array.sh and sbatch it; returns the job
    id (dry_run: the script, nothing submitted)."""
    import subprocess
    log_dir = (Path(out) if out else ROOT / "runs" / profile) / "slurm"
    script = slurm_script(profile, sl, out, max_epochs, log_dir, tasks)
    if dry_run:
        return script
    if shutil.which("sbatch") is None:
        raise FileNotFoundError("sbatch not found: `submit` needs a SLURM cluster (run it on a "
                                "login node). On one machine use `python -m ddpm_cli train-all`; "
                                "`submit --dry-run` prints the script")
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "array.sh"
    with atomic_path(path) as tmp:
        tmp.write_text(script)
    r = subprocess.run(["sbatch", "--parsable", *(["--wait"] * wait), str(path)],
                       capture_output=True, text=True)
    if r.returncode and not (wait and r.stdout.strip()):
        raise RuntimeError(f"sbatch {path} failed (exit {r.returncode}): {r.stderr.strip()}")
    return r.stdout.strip().split(";")[0]

