import torch

from rnnkit.experiments.networks import RecurrentReadout
from rnnkit.experiments.tasks import adding_problem
from rnnkit.experiments.vanishing import state_gradient_norms


def _norms(cell: str, scale: float = 1.0) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = RecurrentReadout(cell, 2, 16, 1)
    with torch.no_grad():
        model.recurrent.weight_hh_l0.mul_(scale)
    inputs, targets = adding_problem(8, 30, torch.Generator().manual_seed(0))
    return state_gradient_norms(model, inputs, targets)


def test_vanilla_rnn_gradient_decays_with_distance_at_init():
    norms = _norms("RNN")["h"]
    assert len(norms) == 30
    assert norms[0] < 1e-3 * norms[-1]
    assert norms[10] < norms[20] < norms[29]


def test_scaling_recurrent_weights_up_keeps_far_gradients_larger():
    plain, scaled = _norms("RNN")["h"], _norms("RNN", scale=4.0)["h"]
    assert scaled[0] / scaled[-1] > 100 * plain[0] / plain[-1]


def test_lstm_reports_the_cell_state_gradient_too():
    norms = _norms("LSTM")
    assert set(norms) == {"h", "c"} and len(norms["c"]) == 30
    assert norms["c"][-1] == 0.0  # the last cell state does not reach the readout


def test_norms_match_autograd_through_a_manual_loop():
    torch.manual_seed(0)
    model = RecurrentReadout("GRU", 2, 6, 1).double()
    inputs, targets = adding_problem(3, 5, torch.Generator().manual_seed(0))
    inputs, targets = inputs.double(), targets.double()
    cell = torch.nn.GRUCell(2, 6).double()
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(cell, name).data.copy_(getattr(model.recurrent, name + "_l0"))
    states = [torch.zeros(3, 6, dtype=torch.double, requires_grad=True)]
    for t in range(5):
        states.append(cell(inputs[:, t], states[-1]))
    loss = torch.nn.functional.mse_loss(model.readout(states[-1]), targets)
    grads = torch.autograd.grad(loss, states[1:])
    expected = [g.norm(dim=-1).mean().item() for g in grads]
    measured = state_gradient_norms(model, inputs, targets)["h"]
    torch.testing.assert_close(torch.tensor(measured), torch.tensor(expected))
