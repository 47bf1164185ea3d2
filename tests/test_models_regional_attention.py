"""Regional cross-attention on tiny diffusers UNets (image and AnimateDiff): each subject's tokens are attended
only from its region, rows stay distributions, and the processors come off without a trace."""

from __future__ import annotations

import pytest
import torch

from adaface.models.regional_attention import (
    Region,
    RegionalAttention,
    layer_grid,
    spatial_cross_attention_layers,
)
from adaface.models.unet_feature_capture import UNetFeatureCapture, cross_attention_layers
from adaface.testing.tiny_models import tiny_motion_adapter, tiny_unet

LATENT = (6, 10)  # odd halving: the mid block runs at 3x5
SLOTS = {"z": 5, "y": 21}
N = 16
REGIONS = {"z": Region.parse("left"), "y": Region.parse("0.5,0.2,1,0.9")}


def test_region_parsing_and_cells():
    assert Region.parse("left") == Region(0, 0, 0.5, 1) and Region.parse(" Bottom ") == Region(0, 0.5, 1, 1)
    assert Region.parse("0.1, 0.2, 0.3, 0.4") == Region(0.1, 0.2, 0.3, 0.4)
    for bad, message in [("1.2,0,1.5,1", r"fraction in \[0, 1\]"), ("0.5,0,0.5,1", "is empty"),
                         ("0.6,0,0.4,1", "is empty"), ("middle", "expected left, right, top, bottom"),
                         ("0,0,1", "x0,y0,x1,y1"), ("nan,0,1,1", r"fraction in \[0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            Region.parse(bad)
    left, right = Region.parse("left"), Region.parse("right")
    assert not left.overlaps(right) and left.overlaps(Region(0.4, 0, 0.6, 1))
    assert not Region.parse("top").overlaps(Region.parse("bottom"))
    for h, w in [(1, 1), (3, 5), (8, 8), (7, 3)]:  # left and right split every grid exactly
        assert torch.equal(left.cells(h, w) ^ right.cells(h, w), torch.ones(h * w, dtype=torch.bool))
    assert left.cells(2, 4).tolist() == [True, True, False, False] * 2
    assert layer_grid(60, (6, 10)) == (6, 10) and layer_grid(15, (6, 10)) == (3, 5)
    with pytest.raises(ValueError, match="no downsampling"):
        layer_grid(7, (6, 10))


def _context(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 77, 512, generator=torch.Generator().manual_seed(seed))


def _check_layers(features: dict, layers: list[str], guided: bool, per_row: int = 1) -> int:
    """Every layer: zero probability from outside a subject's region to its slots in the subject rows, rows that
    sum to 1, and the layer's real output equal to those probabilities applied to its values."""
    assert sorted(features) == sorted(layers)
    checked = 0
    for name, f in features.items():
        attn = f.attn
        probs = f.maps()  # [B, heads, N, S] from the mask the wrapped processor received
        b = probs.shape[0]
        h, w = layer_grid(f.num_positions, LATENT)
        subject_rows = range(b // 2, b) if guided else range(b)
        for placeholder, start in SLOTS.items():
            inside = REGIONS[placeholder].cells(h, w)
            assert inside.any() and (~inside).any()
            mass = probs[list(subject_rows)][:, :, :, start:start + N].sum(-1)  # [rows, heads, positions]
            assert mass[:, :, ~inside].abs().max().item() == 0.0, name
            assert mass[:, :, inside].min().item() > 0, name
            if guided:  # the negative prompt's rows are not confined
                assert probs[: b // 2, :, ~inside, start:start + N].sum(-1).min().item() > 0
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5, rtol=0)
        value = attn.head_to_batch_dim(attn.to_v(f.context))
        mixed = attn.batch_to_head_dim(torch.bmm(probs.reshape(-1, *probs.shape[2:]), value))
        torch.testing.assert_close(f.output, attn.to_out[1](attn.to_out[0](mixed)), atol=1e-5, rtol=1e-5)
        checked += 1
    return checked


@pytest.mark.parametrize("guided", [True, False])
def test_unet_outside_region_mass_is_zero_and_removal_restores(guided):
    unet = tiny_unet()
    batch = 2 if guided else 1
    x = torch.randn(batch, 4, *LATENT, generator=torch.Generator().manual_seed(1))
    t, ctx = torch.tensor(500), _context(batch)
    originals = dict(unet.attn_processors)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx).sample

        layers = spatial_cross_attention_layers(unet)
        assert sorted(layers) == sorted(cross_attention_layers(unet)) and len(layers) == 4
        capture = UNetFeatureCapture(unet, layers)  # under the regional processors: it sees their mask
        regional = RegionalAttention(unet, REGIONS)
        assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample, plain)  # not configured: pass-through
        regional.configure({"z": 5}, N, LATENT, guided)
        regional.configure({}, N, LATENT, guided)  # no subject of the prompt has a region: pass-through
        assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample, plain)

        regional.configure(SLOTS, N, LATENT, guided)
        with capture.recording() as features:
            confined = unet(x, t, encoder_hidden_states=ctx).sample
        assert _check_layers(features, layers, guided) == 4
        assert (confined - plain).abs().max() > 0

        regional.remove()
        capture.remove()
        after = dict(unet.attn_processors)
        assert after.keys() == originals.keys() and all(after[k] is originals[k] for k in originals)
        assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample, plain)


def test_animatediff_spatial_cross_attention_is_confined():
    from diffusers import UNetMotionModel

    unet = UNetMotionModel.from_unet2d(tiny_unet(), tiny_motion_adapter()).eval()
    layers = spatial_cross_attention_layers(unet)
    assert len(layers) == 4 and not any("motion_modules" in n for n in layers)
    frames = 3
    x = torch.randn(2, 4, frames, *LATENT, generator=torch.Generator().manual_seed(2))
    t, ctx = torch.tensor(300), _context(2, seed=3).repeat_interleave(frames, 0)  # as AnimateDiffPipeline does
    originals = dict(unet.attn_processors)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx).sample
        capture = UNetFeatureCapture(unet, layers)
        with RegionalAttention(unet, REGIONS) as regional:
            regional.configure(SLOTS, N, LATENT, guided=True)
            with capture.recording() as features:
                unet(x, t, encoder_hidden_states=ctx)
            assert _check_layers(features, layers, guided=True) == 4
            assert all(f.hidden_states.shape[0] == 2 * frames for f in features.values())
        capture.remove()
        assert all(unet.attn_processors[k] is v for k, v in originals.items())
        assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample, plain)


def test_regions_must_be_regions_and_installed_once():
    unet = tiny_unet()
    with pytest.raises(TypeError, match="region of 'z' must be a Region"):
        RegionalAttention(unet, {"z": "left"})
    regional = RegionalAttention(unet, REGIONS)
    with pytest.raises(ValueError, match="already has regional attention"):
        RegionalAttention(unet, REGIONS)
    regional.remove()
    regional.remove()  # twice is harmless


def test_benchmark_script_runs_and_reports_zero_out_of_region_mass(tmp_path, capsys):
    import json
    from pathlib import Path

    from adaface.testing.scripts import load_script

    bench = load_script(Path(__file__).resolve().parents[1] / "bench" / "bench_regional_attention.py")
    out = tmp_path / "regional.json"
    assert bench.main(["--runs", "1", "--steps", "1", "--size", "16", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["out_of_region_mass_max"] == 0.0 and result["in_region_mass_min"] > 0
    assert result["layers"] == 4 and result["row_sum_error_max"] < 1e-5
    assert all(v > 0 for v in result["median_seconds"].values())
    assert "out-of-region attention mass" in capsys.readouterr().out
