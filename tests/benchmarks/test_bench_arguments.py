"""The benchmark scripts' argument checks: bad values are refused with a message naming them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import bench_layers  # noqa: E402


@pytest.mark.parametrize("value", ["1,2", "16,64,32,x,4,3"])
def test_gpu_tile_must_be_six_integers(value, capsys):
    with pytest.raises(SystemExit):
        bench_layers.parse_args(["--device", "cuda", "--gpu-tile", value])
    assert "--gpu-tile: six comma-separated integers" in capsys.readouterr().err


def test_gpu_tile_and_the_cuda_grid_are_taken():
    args = bench_layers.parse_args(["--device", "cuda", "--gpu-tile", "16,64,32,64,4,3"])
    assert args.gpu_tile == (16, 64, 32, 64, 4, 3)
    assert args.config_list == bench_layers.CUDA_CONFIGS


def test_variants_on_cuda_run_only_the_sections_with_gpu_kernels(capsys):
    import bench_variants

    args = bench_variants.parse_args(["--device", "cuda"])
    assert args.section_list == ["indrnn_min", "min_scan"]
    with pytest.raises(SystemExit):
        bench_variants.parse_args(["--device", "cuda", "--sections", "layer_norm"])
    assert "--device cuda: sections must be of" in capsys.readouterr().err
    assert bench_variants.parse_args([]).section_list == list(bench_variants.SECTIONS)


def test_barrier_benchmark_refuses_no_repeats_and_skips_without_cuda(capsys, monkeypatch, tmp_path):
    import bench_gpu_barrier

    with pytest.raises(SystemExit):
        bench_gpu_barrier.main(["--repeats", "0"])
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setattr(bench_gpu_barrier.torch.cuda, "is_available", lambda: False)
    assert bench_gpu_barrier.main(["--json", str(tmp_path / "barrier.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "barrier.json").exists()
