"""ddpm_lib.UNet against the plain reference of the report's U-Net (tests/reference_unet.py).

Weights are copied from a seeded ddpm_lib.UNet into the reference, then:
  (a) fp32, NCHW and channels_last: outputs (eval and train mode) and gradients agree to
      atol = rtol = 1e-5 (measured: max |Δ| ≈ 2e-6 NCHW, ≈ 6e-6 channels_last, |out| ≤ ~3);
  (b) the library in bf16 autocast + channels_last (as training runs where speed_choice picks
      them, through ddpm_lib.autocast / ddpm_lib.to_device) agrees with the fp32 reference to a
      relative error ‖Δ‖/‖ref‖ ≤ 3e-2 and max |Δ| ≤ 0.1 (measured: ≈ 0.8–1.2e-2 and ≈ 0.03, bf16's 8-bit
      mantissa through ~20 layers);
  (c) the diffusion loss of one seeded batch under bf16 autocast is within 0.3 % (relative) of
      the fp32 loss (measured: 1–3e-4 over three seeds).
One CPU thread (conftest); the whole file runs in a few seconds.
"""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ddpm_lib as dl  # noqa: E402
import ddpm_train as dt  # noqa: E402
import reference_unet as R  # noqa: E402

CPU = torch.device("cpu")
# (width, time_dim, heads, image size): the smoke profile's model, and the report's width at 32×32
SIZES = [pytest.param(8, 32, 2, 16, id="smoke-w8-16px"), pytest.param(32, 256, 4, 32, id="w32-32px")]

# ddpm_lib.autocast runs bf16 only where it is native; elsewhere (b) and (c) would compare fp32
needs_bf16 = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                reason="this CPU has no native bf16 (AVX512-BF16/AMX), so "
                                       "ddpm_lib.autocast trains in fp32 here")
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_REL_TOL = 3e-2
BF16_ABS_TOL = 0.1
LOSS_REL_TOL = 3e-3


def _pair(width, time_dim, heads, seed=0):
    torch.manual_seed(seed)
    lib = dl.UNet(width, time_dim, heads)
    return lib, R.load_from_library(lib)


def _inputs(size, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g),
            torch.randint(1, 1001, (n,), generator=g))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_mapping_covers_every_parameter():
    lib, ref = _pair(8, 32, 2)
    mapped = R.from_library_state_dict(lib.state_dict())
    assert set(mapped) == set(ref.state_dict())
    assert R.ReferenceUNet(8, 32, 2).state_dict().keys() == ref.state_dict().keys()
    assert dl.n_params(lib) == dl.n_params(ref)


@pytest.mark.parametrize("width,time_dim,heads,size", SIZES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fp32_matches_reference(width, time_dim, heads, size, channels_last):
    lib, ref = _pair(width, time_dim, heads)
    if channels_last:
        lib = lib.to(memory_format=torch.channels_last)
    x, t = _inputs(size)
    xl = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    for train in (False, True):
        lib.train(train), ref.train(train)
        with torch.no_grad():
            torch.testing.assert_close(lib(xl, t), ref(x, t), **FP32_TOL)
    # gradients of the same scalar (train mode)
    lib.zero_grad(), ref.zero_grad()
    lib(xl, t).square().mean().backward()
    ref(x, t).square().mean().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in lib.named_parameters():
        q = ref_params[R.LIBRARY_TO_REFERENCE.get(name, name)]
        scale = q.grad.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(p.grad / scale, q.grad / scale, **FP32_TOL, msg=name)


@needs_bf16
@pytest.mark.parametrize("width,time_dim,heads,size", SIZES)
def test_training_precision_matches_reference(width, time_dim, heads, size):
    """bf16 autocast + channels_last (what speed_choice may pick), through ddpm_lib's helpers."""
    cfg = dl.get_config("cpu", width=width, time_dim=time_dim, heads=heads, image_size=size,
                        bf16=True, channels_last=True)
    torch.manual_seed(0)
    lib = dl.build_model(cfg, CPU, verbose=False)
    ref = R.load_from_library(lib)
    x, t = _inputs(size)
    for train in (False, True):
        lib.train(train), ref.train(train)
        with torch.no_grad():
            want = ref(x, t)
            with dl.autocast(CPU, cfg.bf16):
                got = lib(dt.to_device(x, cfg, CPU), t)
        assert got.dtype == torch.bfloat16              # autocast really ran in bf16
        rel, mx = _rel(got, want), (got.float() - want).abs().max().item()
        assert rel <= BF16_REL_TOL, f"relative error {rel:.3g} > {BF16_REL_TOL}"
        assert mx <= BF16_ABS_TOL, f"max abs error {mx:.3g} > {BF16_ABS_TOL}"
        assert rel > 1e-4, "bf16 output identical to fp32: autocast did not take effect?"


@needs_bf16
def test_diffusion_loss_bf16_vs_fp32():
    """One seeded batch of the cpu profile: ddpm_lib.diffusion_loss in bf16+channels_last vs
    fp32 NCHW with the same weights, inputs, timesteps and noise."""
    cfg = dl.get_config("cpu", bf16=True, channels_last=True)
    cfg32 = dataclasses.replace(cfg, bf16=False, channels_last=False)
    torch.manual_seed(0)
    m16 = dl.build_model(cfg, CPU, verbose=False)
    m32 = dl.build_model(cfg32, CPU, verbose=False)
    m32.load_state_dict(m16.state_dict())
    fp = dl.Diffusion.from_config(cfg)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(16, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    t, eps = fp.sample_t(16, g), torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        with dl.autocast(CPU, cfg.bf16):
            l16 = dl.diffusion_loss(m16, fp, dt.to_device(x0, cfg, CPU), t, eps).item()
        with dl.autocast(CPU, cfg32.bf16):
            l32 = dl.diffusion_loss(m32, fp, dt.to_device(x0, cfg32, CPU), t, eps).item()
        lref = dl.diffusion_loss(R.load_from_library(m16), fp, x0, t, eps).item()
    assert abs(l32 - lref) <= 1e-5 * abs(lref)
    assert abs(l16 - l32) <= LOSS_REL_TOL * abs(l32), (l16, l32)
    assert l16 != l32
