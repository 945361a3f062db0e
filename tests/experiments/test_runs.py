"""Each experiment in smoke mode (tiny sizes): the files it writes and the shape of its results."""

import json
import math

import pytest
import torch

from rnnkit.experiments import EXPERIMENTS, run_experiment

PLOTS = {
    "vanishing": "vanishing.png",
    "memory": "memory.png",
    "lstm-vs-gru": "lstm_vs_gru.png",
    "rnn-vs-transformer": "rnn_vs_transformer.png",
    "bidirectional": "bidirectional.png",
    "depth": "depth.png",
}


@pytest.fixture(scope="module", params=EXPERIMENTS)
def smoke_run(request, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(request.param)
    return request.param, out_dir, run_experiment(request.param, False, out_dir, smoke=True)


def test_every_experiment_writes_report_plot_and_json(smoke_run):
    name, out_dir, results = smoke_run
    assert (out_dir / "report.md").read_text().startswith("# ")
    plot = out_dir / PLOTS[name]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size < 200_000
    saved = json.loads((out_dir / "results.json").read_text())
    assert saved["experiment"] == name and saved["mode"] == "smoke"
    assert {"config", "seed", "seconds", "machine"} <= set(saved)
    assert results["seed"] == saved["config"]["seed"]


def _check_vanishing(results):
    length = results["config"]["length"]
    for condition in ("init", "trained", "scaled"):
        cells = results["norms_by_distance"][condition]
        assert set(cells) == {"RNN", "LSTM", "GRU"}
        assert all(len(norms["h"]) == length for norms in cells.values())
    assert set(results["clipping"]) == {"clipped", "unclipped"}
    clipped = results["clipping"]["clipped"]
    assert len(clipped["losses"]) == results["config"]["clip_updates"]


def _check_memory(results):
    lengths = [str(t) for t in results["config"]["lengths"]]
    delays = [str(t) for t in results["config"]["copy_lengths"] or results["config"]["lengths"]]
    assert list(results["adding"]) == lengths and list(results["copy"]) == delays
    for length in lengths:
        for cell in ("RNN", "LSTM", "GRU"):
            adding = results["adding"][length][cell]
            assert adding["mse"] >= 0 and adding["baseline_mse"] > 0
    for length in delays:
        for cell in ("RNN", "LSTM", "GRU"):
            copy = results["copy"][length][cell]
            assert 0 <= copy["recall_accuracy"] <= 1
            assert copy["chance_cross_entropy"] == pytest.approx(
                10 * math.log(8) / (int(length) + 20)
            )


def _check_lstm_vs_gru(results):
    for counts in results["parameters"].values():
        assert counts["GRU"] / counts["LSTM"] == pytest.approx(0.75)
    config = results["config"]
    assert list(results["speed"]) == [
        "fused, BLAS as installed",
        "fused, BLAS 1 thread",
        "reference loop",
    ]
    for condition, cells in results["speed"].items():
        for cell in ("LSTM", "GRU"):
            assert cells[cell]["train_ms"] > 0 and cells[cell]["inference_ms"] > 0
            assert ("reference" in cells[cell]["backend"]) == (condition == "reference loop")
    assert list(results["tasks"]) == ["surnames", "shakespeare"]
    budgets = {"surnames": config["surname_updates"], "shakespeare": config["text_updates"]}
    for task, outcome in results["tasks"].items():
        lstm, gru = outcome["cells"]["LSTM"], outcome["cells"]["GRU"]
        assert gru["parameters"] < lstm["parameters"]
        for summary in (lstm, gru):
            assert [run["seed"] for run in summary["runs"]] == config["seeds"]
            values = [run["test"][outcome["metric"]] for run in summary["runs"]]
            assert summary["mean"] == pytest.approx(sum(values) / len(values))
            for run in summary["runs"]:
                assert run["steps"] == budgets[task]
                assert run["train_ms_per_step"] > 0 and run["test_seconds"] > 0
                assert math.isfinite(run["baseline"])
    for summary in results["tasks"]["surnames"]["cells"].values():
        assert all(0 <= run["test"]["accuracy"] <= 1 for run in summary["runs"])
    for summary in results["tasks"]["shakespeare"]["cells"].values():
        assert all(run["test"]["bits_per_char"] > 0 for run in summary["runs"])


def _check_rnn_vs_transformer(results):
    generation = results["generation"]
    contexts = [int(c) for c in generation]
    first, last = generation[str(contexts[0])], generation[str(contexts[-1])]
    assert first["rnn_bytes"] == last["rnn_bytes"]
    assert last["cache_bytes"] / first["cache_bytes"] == contexts[-1] / contexts[0]
    assert results["streaming_max_error"]["rnn"] < 1e-5
    assert results["streaming_max_error"]["transformer_cached"] < 1e-4
    for name in ("RNN", "Transformer"):
        assert results[name]["parameters"] > 0 and results[name]["train_tokens_per_second"] > 0


def _check_bidirectional(results):
    assert list(results["tasks"]) == ["left", "both sides", "digits"]
    for directions in results["tasks"].values():
        uni, bi = directions["unidirectional"], directions["bidirectional"]
        assert bi["parameters"] > uni["parameters"]
        assert 0 <= uni["accuracy"] <= 1 and 0 <= bi["accuracy"] <= 1


def _check_depth(results):
    assert len(results["settings"]) == 3
    for depths in results["settings"].values():
        counts = [depths[str(d)]["parameters"] for d in results["config"]["depths"]]
        assert counts == sorted(counts) and len(set(counts)) == len(counts)


CHECKS = {
    "vanishing": _check_vanishing,
    "memory": _check_memory,
    "lstm-vs-gru": _check_lstm_vs_gru,
    "rnn-vs-transformer": _check_rnn_vs_transformer,
    "bidirectional": _check_bidirectional,
    "depth": _check_depth,
}


def test_results_have_the_expected_shape(smoke_run):
    name, _, results = smoke_run
    CHECKS[name](results)


def test_unknown_experiment_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        run_experiment("attention", True, tmp_path)


def test_run_experiment_uses_one_thread_and_restores_the_count(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = run_experiment("bidirectional", False, tmp_path, smoke=True)
        assert results["machine"]["torch_threads"] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
