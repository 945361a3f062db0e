import math

import pytest
import torch
from trainer_toys import StallingTask, ToyStreamTask, make_trainer

from rnnkit.train import TrainerConfig, TrainingInterrupted, learning_rate_at
from rnnkit.train.checkpoint import load_checkpoint


def parameters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_schedule_warms_up_then_decays_to_the_floor():
    config = TrainerConfig(learning_rate=1.0, warmup_steps=4, min_lr_fraction=0.1)
    rates = [learning_rate_at(step, 20, config) for step in range(20)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(rates[3:], rates[4:]))
    assert math.isclose(learning_rate_at(20, 20, config), 0.1)


def test_training_lowers_the_validation_loss():
    trainer = make_trainer(epochs=8, learning_rate=0.03)
    before = trainer.task.evaluate(trainer.model.eval())["loss"]
    state = trainer.fit()
    assert state.step == 24
    assert state.stop_reason == "epochs"
    assert len(state.history) == 8
    assert state.best_metric < before - 0.3


def test_carried_state_is_detached_and_reset_each_epoch():
    task = ToyStreamTask(seen_carries=[])
    make_trainer(task, epochs=2).fit()
    carries = task.seen_carries
    assert carries[0] is None and carries[3] is None  # epoch starts
    for carry in carries[1:3] + carries[4:6]:
        assert carry is not None and carry.grad_fn is None and not carry.requires_grad


def test_gradient_clipping_is_applied_and_reported():
    state = make_trainer(clip_grad_norm=1e-3, epochs=1).fit()
    record = state.history[0]
    assert record["clipped_fraction"] == 1.0
    assert record["grad_norm_mean"] > 1e-3
    unclipped = make_trainer(clip_grad_norm=None, epochs=1).fit().history[0]
    assert unclipped["clipped_fraction"] == 0.0


def test_max_steps_caps_training_mid_epoch():
    state = make_trainer(max_steps=4).fit()
    assert state.step == 4
    assert state.stop_reason == "max_steps"
    assert state.history[-1]["partial_epoch"]


def test_evaluations_every_n_steps_are_recorded_between_epoch_ends():
    state = make_trainer(epochs=2, eval_every=2).fit()
    assert [(r["step"], r["partial_epoch"]) for r in state.history] == [
        (2, True),
        (3, False),
        (4, True),
        (6, False),
    ]
    stopped = make_trainer(StallingTask(), epochs=10, eval_every=1, patience=2).fit()
    assert stopped.stop_reason == "early_stopping"
    assert [r["step"] for r in stopped.history] == [1, 2, 3]


def test_early_stopping_after_patience_evaluations_without_improvement():
    state = make_trainer(StallingTask(), epochs=10, patience=2).fit()
    assert state.stop_reason == "early_stopping"
    assert len(state.history) == 3
    assert state.best_step == 3


def test_best_weights_are_restored_at_the_end():
    trainer = make_trainer(StallingTask(), epochs=3, patience=None)
    best = {}

    def remember(trainer, step):
        if step == 3:  # the end of epoch 1, evaluated next: the best (first) evaluation
            best.update(parameters(trainer.model))

    trainer.on_step = remember
    trainer.fit()
    for name, value in parameters(trainer.model).items():
        assert torch.equal(value, best[name]), name


def test_seeded_runs_are_identical():
    first = make_trainer(epochs=2)
    first.fit()
    second = make_trainer(epochs=2)
    second.fit()
    for name, value in parameters(first.model).items():
        assert torch.equal(value, parameters(second.model)[name])


@pytest.mark.parametrize(
    "stop_at, cell, eval_every", [(2, "gru", None), (3, "gru", None), (2, "lstm", 2)]
)
def test_resume_after_interruption_is_bit_exact(tmp_path, stop_at, cell, eval_every):
    """N steps in one go == k steps, interrupt, resume to N (mid-epoch and at an epoch end)."""
    reference = make_trainer(epochs=3, cell=cell, eval_every=eval_every)
    reference_state = reference.fit()

    def interrupt(trainer, step):
        if step == stop_at:
            trainer.request_stop()

    interrupted = make_trainer(checkpoint_dir=tmp_path, epochs=3, cell=cell, eval_every=eval_every)
    interrupted.on_step = interrupt
    with pytest.raises(TrainingInterrupted):
        interrupted.fit()
    assert load_checkpoint(tmp_path).state.step == stop_at

    torch.manual_seed(123)  # resuming must not depend on the process's RNG state
    resumed = make_trainer(checkpoint_dir=tmp_path, epochs=3, cell=cell, eval_every=eval_every)
    resumed.resume()
    resumed_state = resumed.fit()
    assert resumed_state.step == reference_state.step == 9
    for name, value in parameters(reference.model).items():
        assert torch.equal(value, parameters(resumed.model)[name]), name
    assert [r["train_loss"] for r in resumed_state.history] == [
        r["train_loss"] for r in reference_state.history
    ]
    for key, value in reference.optimizer.state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, resumed.optimizer.state_dict()["state"][key][name])


def test_periodic_checkpoints_keep_only_the_latest(tmp_path):
    make_trainer(checkpoint_dir=tmp_path, epochs=2, checkpoint_every=2).fit()
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-00000006"]
    assert sorted(p.name for p in (tmp_path / "step-00000006").iterdir()) == [
        "state.json",
        "tensors.safetensors",
    ]
    assert load_checkpoint(tmp_path).state.finished


def test_trainer_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_steps"):
        TrainerConfig(max_steps=0)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainerConfig(learning_rate=0.0)
