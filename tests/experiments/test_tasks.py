import math

import pytest
import torch
import torch.nn.functional as F

from rnnkit.experiments.tasks import (
    COPY_LENGTH,
    COPY_SYMBOLS,
    adding_problem,
    context_tagging,
    copy_chance_cross_entropy,
    copy_task,
)


def test_adding_problem_marks_one_value_per_half_and_sums_them():
    inputs, targets = adding_problem(64, 10, torch.Generator().manual_seed(0))
    assert inputs.shape == (64, 10, 2) and targets.shape == (64, 1)
    markers = inputs[..., 1]
    assert torch.equal(markers[:, :5].sum(1), torch.ones(64))
    assert torch.equal(markers[:, 5:].sum(1), torch.ones(64))
    torch.testing.assert_close(targets[:, 0], (inputs[..., 0] * markers).sum(1))


def test_adding_problem_mean_predictor_mse_is_one_sixth():
    _, targets = adding_problem(20_000, 20, torch.Generator().manual_seed(1))
    baseline = F.mse_loss(torch.full_like(targets, 1.0), targets).item()
    assert abs(baseline - 1 / 6) < 0.01


def test_copy_task_targets_repeat_the_symbols_after_the_delay():
    inputs, targets = copy_task(8, 5, torch.Generator().manual_seed(0))
    tokens = inputs.argmax(-1)
    assert inputs.shape == (8, 25, COPY_SYMBOLS + 2) and targets.shape == (8, 25)
    assert torch.equal(targets[:, -COPY_LENGTH:], tokens[:, :COPY_LENGTH])
    assert torch.all(targets[:, :-COPY_LENGTH] == 0)
    assert torch.all(tokens[:, COPY_LENGTH + 4] == COPY_SYMBOLS + 1)


def test_copy_chance_matches_the_blank_then_uniform_predictor():
    delay = 7
    _, targets = copy_task(16, delay, torch.Generator().manual_seed(0))
    log_probs = torch.full((16, delay + 20, COPY_SYMBOLS + 2), -1e9)
    log_probs[:, : delay + 10, 0] = 0.0
    log_probs[:, delay + 10 :, 1 : COPY_SYMBOLS + 1] = -math.log(COPY_SYMBOLS)
    measured = F.nll_loss(log_probs.reshape(-1, COPY_SYMBOLS + 2), targets.reshape(-1)).item()
    assert measured == pytest.approx(copy_chance_cross_entropy(delay), rel=1e-6)


def test_context_tagging_sums_the_tokens_at_the_offsets():
    inputs, tags = context_tagging(4, 9, (-2, 1), 5, torch.Generator().manual_seed(0))
    tokens = inputs.argmax(-1)
    for b in range(4):
        for t in range(9):
            left = tokens[b, t - 2].item() if t >= 2 else 0
            right = tokens[b, t + 1].item() if t + 1 < 9 else 0
            assert tags[b, t].item() == (left + right) % 5


@pytest.mark.parametrize(
    "call",
    [
        lambda g: adding_problem(0, 10, g),
        lambda g: adding_problem(4, 1, g),
        lambda g: copy_task(4, 0, g),
        lambda g: context_tagging(4, 5, (), 3, g),
        lambda g: context_tagging(4, 5, (5,), 3, g),
    ],
)
def test_bad_sizes_raise_value_error(call):
    with pytest.raises(ValueError):
        call(torch.Generator().manual_seed(0))


def test_left_to_right_ceiling_counts_the_padded_end():
    from rnnkit.experiments.bidirectional import left_to_right_ceiling

    assert left_to_right_ceiling((-2, -1), 20, 4) == 1.0
    assert left_to_right_ceiling((-2, 2), 20, 4) == pytest.approx((2 + 18 / 4) / 20)
