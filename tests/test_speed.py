"""ddpm_lib.speed_choice: precision and memory layout picked by measuring (here with injected
timings), cached per machine, forced by DDPM_PRECISION / DDPM_MEMORY, kept by a resumed run."""
import json

import pandas as pd
import numpy as np
import pytest
import torch

import ddpm_lib as dl
import ddpm_train as dt

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    """An empty cache folder and memo, and nothing forced (conftest forces fp32, NCHW)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DDPM_PRECISION", raising=False)
    monkeypatch.delenv("DDPM_MEMORY", raising=False)
    monkeypatch.setattr(dt, "_SPEED_MEMO", {})


def fake_timer(rates: dict, calls: list):
    """A timer that answers rates['precision/memory'] and records what it was asked."""
    def timer(cfg, precision, memory, device, seconds=1.0):
        calls.append(f"{precision}/{memory}")
        return rates[f"{precision}/{memory}"]
    return timer


RATES = {"fp32/nchw": 72.0, "fp32/channels_last": 54.0, "bf16/nchw": 36.0,
         "bf16/channels_last": 80.0}
AUTO = dict(bf16=None, channels_last=None)


def test_picks_the_fastest_candidate_bf16_only_where_native(monkeypatch):
    calls = []
    monkeypatch.setattr(dt, "bf16_fast", lambda d: True)
    c = dt.speed_choice(dl.get_config("cpu"), CPU, timer=fake_timer(RATES, calls))
    assert (c["precision"], c["memory"]) == ("bf16", "channels_last")
    assert sorted(calls) == sorted(RATES) and c["img_s"] == RATES
    assert "measured 80 vs 72 vs 54 vs 36 img/s" in dt.speed_line(c)
    monkeypatch.setattr(dt, "bf16_fast", lambda d: False)          # emulated bf16: never timed
    monkeypatch.setattr(dt, "_SPEED_MEMO", {})
    calls.clear()
    c = dt.speed_choice(dl.get_config("cpu", batch_size=8), CPU, timer=fake_timer(RATES, calls))
    assert (c["precision"], c["memory"]) == ("fp32", "nchw")
    assert sorted(calls) == ["fp32/channels_last", "fp32/nchw"]
    assert dt.speed_line(c).startswith("precision: fp32, memory: NCHW — measured 72 vs 54 img/s")


def test_the_choice_is_cached_in_a_json_file_and_reused(capsys, monkeypatch):
    calls, cfg = [], dl.get_config("cpu")
    monkeypatch.setattr(dt, "bf16_fast", lambda d: False)
    first = dt.speed_choice(cfg, CPU, timer=fake_timer(RATES, calls))
    path = dt.speed_cache_path()
    assert path.parent.parent == dl.Path(dl.os.environ["XDG_CACHE_HOME"])
    assert str(path) in capsys.readouterr().out                  # the path, printed once
    data = json.loads(path.read_text())
    entry = data[dt.speed_key(cfg)]
    assert (entry["precision"], entry["memory"]) == ("fp32", "nchw")
    assert entry["img_s"] == {k: v for k, v in RATES.items() if k.startswith("fp32")}
    key = dt.speed_key(cfg)
    assert dt.cpu_name() in key and torch.__version__ in key and "32px, width 32, batch 32" in key

    def no_timer(*a, **k):
        raise AssertionError("measured again")
    again = dt.speed_choice(cfg, CPU, timer=no_timer)              # this process: memo
    monkeypatch.setattr(dt, "_SPEED_MEMO", {})
    later = dt.speed_choice(cfg, CPU, timer=no_timer)              # another process: the file
    assert (again["precision"], again["memory"]) == (later["precision"], later["memory"]) \
        == (first["precision"], first["memory"])
    assert "measured earlier" in later["how"] and capsys.readouterr().out == ""
    calls.clear()                                # another batch is another key: measured
    dt.speed_choice(dl.get_config("cpu", batch_size=64), CPU, timer=fake_timer(RATES, calls))
    assert len(calls) == 2 and len(json.loads(path.read_text())) == 2
    path.write_text("{not json")                 # a damaged cache is measured again, rewritten
    monkeypatch.setattr(dt, "_SPEED_MEMO", {})
    calls.clear()
    dt.speed_choice(cfg, CPU, timer=fake_timer(RATES, calls))
    assert len(calls) == 2 and dt.speed_key(cfg) in json.loads(path.read_text())


def test_environment_forces_the_choice_and_the_profile_wins(monkeypatch):
    calls = []
    timer = fake_timer(RATES, calls)
    monkeypatch.setattr(dt, "bf16_fast", lambda d: True)
    monkeypatch.setenv("DDPM_PRECISION", "fp32")
    monkeypatch.setenv("DDPM_MEMORY", "channels_last")
    c = dt.speed_choice(dl.get_config("cpu"), CPU, timer=timer)
    assert (c["precision"], c["memory"]) == ("fp32", "channels_last") and calls == []
    assert "forced by DDPM_PRECISION" in c["how"] and "forced by DDPM_MEMORY" in c["how"]
    monkeypatch.delenv("DDPM_MEMORY")                            # one forced: the other measured
    c = dt.speed_choice(dl.get_config("cpu"), CPU, timer=timer)
    assert (c["precision"], c["memory"]) == ("fp32", "nchw")
    assert sorted(calls) == ["fp32/channels_last", "fp32/nchw"]
    calls.clear()                                # the smoke profile sets both: nothing measured
    c = dt.speed_choice(dl.get_config("smoke"), CPU, timer=timer)
    assert (c["precision"], c["memory"]) == ("fp32", "nchw") and calls == []
    c = dt.speed_choice(dl.get_config("cpu"), torch.device("cuda"), timer=timer)  # CUDA: never
    assert (c["precision"], c["memory"]) == ("fp32", "channels_last") and calls == []
    monkeypatch.delenv("DDPM_PRECISION")
    c = dt.speed_choice(dl.get_config("cpu"), torch.device("cuda"), timer=timer)
    assert (c["precision"], c["memory"], c["how"]) == ("bf16", "channels_last", "CUDA")
    monkeypatch.setenv("DDPM_MEMORY", "NHWC")
    with pytest.raises(dt.SpeedError, match="DDPM_MEMORY='NHWC'.*nchw, channels_last"):
        dt.speed_choice(dl.get_config("cpu"), CPU, timer=timer)


def test_forced_bf16_without_native_bf16_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(dt, "bf16_fast", lambda d: d.type == "cuda")
    monkeypatch.setenv("DDPM_PRECISION", "bf16")
    with pytest.raises(dt.SpeedError, match="DDPM_PRECISION.*no native bf16"):
        dt.speed_choice(dl.get_config("cpu"), CPU, timer=fake_timer(RATES, []))
    with pytest.raises(dt.SpeedError, match="bf16=True.*no native bf16"):
        dt.speed_choice(dl.get_config("smoke", bf16=True), CPU)
    with pytest.raises(dt.SpeedError, match="no native bf16"):      # train() stops at once
        dt.train(dl.get_config("smoke", **AUTO), 0, out=tmp_path / "run", progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]   # nothing else


def test_time_train_steps_measures_and_leaves_the_rng_alone():
    cfg = dl.get_config("smoke", batch_size=4)
    before = torch.get_rng_state()
    rate = dt.time_train_steps(cfg, "fp32", "channels_last", CPU, seconds=0.05)
    assert 0 < rate < float("inf")
    assert torch.equal(torch.get_rng_state(), before)


def test_evaluation_and_sampling_never_measure_and_run_in_fp32(monkeypatch, tmp_path):
    """A fresh machine (no speed cache) where bf16 would be chosen: loading a model, Table 1's
    one-step evaluation and sampling run no training benchmark, write no cache, and give the
    same numbers whatever DDPM_PRECISION says (evaluation is fp32; only training measures)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(dt, "_SPEED_MEMO", {})
    monkeypatch.setattr(dt, "bf16_fast", lambda d: True)
    monkeypatch.setattr(dl, "bf16_fast", lambda d: True)
    monkeypatch.setattr(dt, "time_train_steps", lambda *a, **k: pytest.fail("benchmark ran"))
    cfg = dl.get_config("smoke")
    dl.trained(cfg, 0, progress=False)                    # the smoke run (fp32 fixed by its profile)
    results = []
    for precision in ("bf16", "fp32"):
        monkeypatch.setenv("DDPM_PRECISION", precision)
        model, fp = dl.load_model(cfg, 0), dl.Diffusion.from_config(cfg)
        per = dl.one_step_eval(model, fp, dl.eval_images(cfg, n=8), ts=(50, 500))
        x, _ = dl.sample(model, fp, "ddim", 2, cfg.image_size, steps=3, progress=False)
        results.append((per.ssim.to_numpy(), x))
    assert np.array_equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not (tmp_path / "cache").exists()
    with dl.autocast(CPU, False):
        assert not torch.is_autocast_enabled("cpu")


def test_train_records_the_choice_and_a_resumed_run_keeps_it(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(dt, "bf16_fast", lambda d: d.type == "cuda")
    monkeypatch.setattr(dt, "time_train_steps", fake_timer(
        {"fp32/nchw": 50.0, "fp32/channels_last": 60.0}, calls))
    cfg, out = dl.get_config("smoke", max_epochs=1, **AUTO), tmp_path / "run"
    dt.train(cfg, 0, out=out, progress=True)
    assert "precision: fp32, memory: channels_last — measured 60 vs 50 img/s" \
        in capsys.readouterr().out
    ck = dl.load_checkpoint(out / "checkpoint.pt")
    assert (ck["config"]["bf16"], ck["config"]["channels_last"]) == (False, True)
    assert (ck["speed"]["precision"], ck["speed"]["memory"]) == ("fp32", "channels_last")
    h = pd.read_csv(out / "history.csv")
    assert list(h.precision) == ["fp32"] and list(h.memory) == ["channels_last"]
    # the cache now says NCHW (another machine's state, or a fresh measurement): not re-measured
    # and not followed by the resumed run
    monkeypatch.setattr(dt, "time_train_steps", fake_timer(
        {"fp32/nchw": 90.0, "fp32/channels_last": 60.0}, calls))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-cache"))
    monkeypatch.setattr(dt, "_SPEED_MEMO", {})
    calls.clear()
    h = dt.train(dl.get_config("smoke", max_epochs=2, **AUTO), 0, out=out, resume=True,
                 progress=True)
    assert "kept from" in capsys.readouterr().out
    assert list(h.memory) == ["channels_last"] * 2 and calls == []
    assert dl.load_checkpoint(out / "checkpoint.pt")["config"]["channels_last"] is True
    with pytest.raises(ValueError, match="channels_last=True, not False"):
        dt.train(dl.get_config("smoke", max_epochs=3, bf16=None, channels_last=False), 0,
                 out=out, resume=True, progress=False)
    # a checkpoint older than speed_choice (bf16=True: bf16 where native) loads and resumes
    assert dt.resumed_speed({"bf16": True, "channels_last": True}, cfg, CPU, out)["precision"] \
        == "fp32"
    old = dict(dl.dataclasses.asdict(dl.get_config("cpu")), bf16=True, channels_last=True)
    dl.check_config(old, dl.get_config("cpu"), out)
    with pytest.raises(ValueError, match="bf16"):                  # only when asked for
        dl.check_config(old, dl.get_config("cpu"), out, keys=dl.SPEED_KEYS)
