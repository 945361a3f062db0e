"""The benchmark scripts' argument checks: bad values are refused with a message naming them."""

from __future__ import annotations

import json
import sys
import types
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


def test_variants_run_every_section_on_either_device_and_refuse_unknown_ones(capsys):
    import bench_variants

    for device in ("cpu", "cuda"):
        args = bench_variants.parse_args(["--device", device])
        assert args.section_list == list(bench_variants.SECTIONS)
    with pytest.raises(SystemExit):
        bench_variants.parse_args(["--sections", "layer_norm,lstm"])
    assert "--sections: each must be one of" in capsys.readouterr().err


def test_barrier_benchmark_refuses_no_repeats_and_skips_without_cuda(capsys, monkeypatch, tmp_path):
    import bench_gpu_barrier

    with pytest.raises(SystemExit):
        bench_gpu_barrier.main(["--repeats", "0"])
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setattr(bench_gpu_barrier.torch.cuda, "is_available", lambda: False)
    assert bench_gpu_barrier.main(["--json", str(tmp_path / "barrier.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "barrier.json").exists()


def test_decoder_benchmark_refuses_unknown_cells_and_no_steps(capsys):
    import bench_decoder

    assert bench_decoder.parse_args(["--cells", "gru, lstm"]).cell_list == ["gru", "lstm"]
    with pytest.raises(SystemExit):
        bench_decoder.parse_args(["--cells", "gru,transformer"])
    assert "--cells: each must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_decoder.parse_args(["--steps", "0"])
    assert "--steps, --chunk and --repeats must be >= 1, got 0, 1 and 15" in capsys.readouterr().err


def test_decoder_benchmark_checks_its_implementations_agree_and_writes_json(
    tmp_path, capsys, monkeypatch
):
    import bench_decoder

    monkeypatch.setattr(bench_decoder, "CONFIGS", [(2, 8)])
    path = tmp_path / "decoder.json"
    arguments = ["--cells", "gru", "--steps", "5", "--chunk", "2", "--repeats", "1"]
    arguments += ["--json", str(path)]
    assert bench_decoder.main(arguments) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(row["cell"], row["mode"]) for row in rows] == [
        ("gru", "inference"),
        ("gru", "training"),
    ]
    assert set(rows[0]["ms"]) == set(bench_decoder.IMPLEMENTATIONS)
    assert "torch/auto" in capsys.readouterr().out


def test_peers_benchmark_checks_its_arguments(capsys):
    import bench_peers

    args = bench_peers.parse_args(["--cells", "rnn", "--configs", "0,3", "--repeats", "2"])
    assert (args.cell_list, args.config_list) == (
        ["rnn"],
        [bench_layers.CONFIGS[0]] + [bench_layers.CONFIGS[3]],
    )
    for bad, message in (
        (["--cells", "rnn,transformer"], "--cells: each must be one of"),
        (["--configs", "4"], "--configs: indices 0-3 (PEERS.md's four sizes)"),
        (["--configs", "a"], "--configs: comma-separated integers"),
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--warm-rounds", "-1"], "--warm-rounds must be >= 0, got -1"),
    ):
        with pytest.raises(SystemExit):
            bench_peers.parse_args(bad)
        assert message in capsys.readouterr().err


def test_peers_benchmark_says_what_to_install_without_flax(monkeypatch):
    import bench_peers

    monkeypatch.setitem(sys.modules, "flax", None)  # an import of it raises ImportError
    monkeypatch.setitem(sys.modules, "flax.linen", None)
    with pytest.raises(SystemExit, match="needs JAX and Flax, which rnnkit does not: pip install"):
        bench_peers.main(["--cells", "rnn", "--configs", "0", "--repeats", "1"])


def test_peers_benchmark_runs_all_three_where_flax_is_installed(tmp_path, monkeypatch):
    pytest.importorskip("flax.linen", reason="JAX and Flax are optional, for this script only")
    import bench_peers

    monkeypatch.setattr(bench_peers, "CONFIGS", [(2, 5, 3, 4)] * 4)
    path = tmp_path / "peers.json"
    assert bench_peers.main(["--cells", "gru", "--configs", "0", "--repeats", "1",
                             "--json", str(path)]) == 0  # fmt: skip
    rows = json.loads(path.read_text())["rows"]
    assert [sorted(row["times"]) for row in rows] == [["flax", "rnnkit", "torch.nn"]] * 2


@pytest.mark.parametrize("warm_rounds, expected", [(0, 1.0), (2, 0.001)])
def test_peers_rounds_time_only_after_the_untimed_rounds(monkeypatch, warm_rounds, expected):
    import bench_peers

    # A fake clock: each name's first five calls take 1 s, later ones 1 ms. One call sizes the
    # sample (one call at 1 s); each round is one warm-up call and one timed call.
    clock = {"now": 0.0}
    counts = {"a": 0, "b": 0}

    def make(name):
        def call():
            counts[name] += 1
            clock["now"] += 1.0 if counts[name] <= 5 else 0.001

        return call

    monkeypatch.setattr(
        bench_peers, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"])
    )
    times = bench_peers.time_rounds({"a": make("a"), "b": make("b")}, 3, warm_rounds)
    assert counts == {"a": 1 + 2 * (warm_rounds + 3)} | {"b": 1 + 2 * (warm_rounds + 3)}
    assert times == pytest.approx({"a": expected, "b": expected})
