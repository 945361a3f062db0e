"""The BLAS thread limit the lstm-vs-gru experiment trains under, and its application settings."""

from threadpoolctl import threadpool_info

from rnnkit.experiments import lstm_vs_gru
from rnnkit.train.classify import ClassifySettings
from rnnkit.train.lm import LanguageModelSettings


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_blas_threads_limits_every_blas_pool_and_restores_it():
    before = _blas_threads()
    assert before, "numpy's OpenBLAS (the fused kernels' fallback BLAS) should be loaded"
    with lstm_vs_gru.blas_threads(1):
        assert set(_blas_threads()) == {1}
    assert _blas_threads() == before


def test_blas_threads_none_leaves_the_pools_as_installed():
    before = _blas_threads()
    with lstm_vs_gru.blas_threads(None):
        assert _blas_threads() == before


def test_both_cells_get_the_same_budget_and_data_under_a_seed():
    config = lstm_vs_gru.CONFIGS["full"]
    for task, kind in (("surnames", ClassifySettings), ("shakespeare", LanguageModelSettings)):
        lstm = lstm_vs_gru.application_settings(task, "LSTM", 1, config)
        gru = lstm_vs_gru.application_settings(task, "GRU", 1, config)
        assert isinstance(lstm, kind) and (lstm.cell, gru.cell) == ("lstm", "gru")
        lstm.cell = gru.cell
        assert lstm == gru
        assert lstm.seed == 1 and lstm.patience is None
    surnames = lstm_vs_gru.application_settings("surnames", "GRU", 0, config)
    text = lstm_vs_gru.application_settings("shakespeare", "GRU", 0, config)
    assert (surnames.max_steps, text.max_steps) == (config.surname_updates, config.text_updates)
