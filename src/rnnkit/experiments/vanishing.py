"""Vanishing and exploding gradients: the norm of dL/dh_t against the distance from the loss.

Claim (Hochreiter 1991; Bengio et al. 1994; Pascanu et al. 2013): in a vanilla tanh RNN the
gradient of a loss at the last step with respect to earlier hidden states shrinks geometrically
with the distance; the gated cells (LSTM, GRU) keep it larger; scaling the recurrent weights up
makes it explode, and clipping the gradient norm keeps training from being thrown off by it.

Data: the adding problem of length T (`tasks.adding_problem`), a fixed measurement batch.
Models: rnnkit RNN (tanh), LSTM and GRU, hidden H, torch's default init, a linear readout of
the last hidden state, MSE loss.
Measurement: the layer runs one step at a time in float64 (reference backend), every state is
kept, the loss at the last step is backpropagated and ||dL/dh_t|| (mean over the batch) is read
for every t. For the LSTM, dL/dc_t (the cell state, where the "constant error carousel" lives)
is recorded as well.
Conditions: (a) at initialisation; (b) after `updates` Adam updates on the task; (c) at
initialisation with every recurrent weight matrix multiplied by `scale`.
Clipping: the scaled-up RNN is trained twice with plain SGD (as in Pascanu et al.), once with the
gradient norm clipped to `clip_norm` and once without, on the same batches. An update whose
gradient is not finite is skipped (and counted) rather than written into the weights.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from rnnkit.experiments import reporting
from rnnkit.experiments.networks import CELLS, RecurrentReadout
from rnnkit.experiments.tasks import adding_problem
from rnnkit.experiments.training import train


@dataclass(frozen=True)
class Config:
    """Sizes and budget; `CONFIGS` holds the full, quick and smoke variants."""

    length: int = 100
    hidden_size: int = 64
    batch: int = 128
    updates: int = 500
    learning_rate: float = 1e-2
    scale: float = 4.0
    clip_norm: float = 1.0
    clip_updates: int = 300
    clip_learning_rate: float = 0.05
    seed: int = 0


CONFIGS = {
    "full": Config(),
    "quick": Config(length=50, updates=300, clip_updates=100),
    "smoke": Config(length=12, hidden_size=8, batch=4, updates=3, clip_updates=3),
}


def state_gradient_norms(
    model: RecurrentReadout, inputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, list[float]]:
    """(B, T, I), (B, 1) -> {"h": [||dL/dh_t||]_t} (+ "c" for LSTM), mean over the batch, float64."""
    model = copy.deepcopy(model).double()
    # The autograd loop is the oracle, and one step at a time gains nothing from a fused kernel.
    model.recurrent.backend = "reference"
    inputs, targets = inputs.double(), targets.double()
    state = None
    kept = []
    for t in range(inputs.size(1)):
        _, state = model.recurrent(inputs[:, t : t + 1], state)
        parts = state if isinstance(state, tuple) else (state,)
        for part in parts:
            part.retain_grad()
        kept.append(parts)
    loss = F.mse_loss(model.readout(kept[-1][0][-1]), targets)
    loss.backward()
    names = ["h", "c"][: len(kept[0])]
    norms = {}
    for index, name in enumerate(names):
        norms[name] = [
            0.0 if parts[index].grad is None else parts[index].grad.norm(dim=-1).mean().item()
            for parts in kept
        ]
    return norms


def _by_distance(norms: list[float]) -> list[float]:
    """Reorder per-time-step norms so index d is the distance T - 1 - t from the loss."""
    return norms[::-1]


def _scaled(model: RecurrentReadout, scale: float) -> RecurrentReadout:
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, weight in model.recurrent.named_parameters():
            if name.startswith("weight_hh"):
                weight.mul_(scale)
    return model


def run(config: Config, out_dir: Path) -> dict:
    """Measure, train, measure again, plot; returns the results dict (also in results.json)."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    measure_inputs, measure_targets = adding_problem(
        config.batch, config.length, torch.Generator().manual_seed(config.seed + 1)
    )
    conditions: dict[str, dict[str, dict[str, list[float]]]] = {
        "init": {},
        "trained": {},
        "scaled": {},
    }
    training_loss = {}
    for cell in CELLS:
        torch.manual_seed(config.seed)
        model = RecurrentReadout(cell, 2, config.hidden_size, 1)
        conditions["init"][cell] = state_gradient_norms(model, measure_inputs, measure_targets)
        scaled = _scaled(model, config.scale)
        conditions["scaled"][cell] = state_gradient_norms(scaled, measure_inputs, measure_targets)
        generator = torch.Generator().manual_seed(config.seed + 2)
        log = train(
            model,
            lambda g=generator: adding_problem(config.batch, config.length, g),
            F.mse_loss,
            config.updates,
            config.learning_rate,
            config.clip_norm,
            f"vanishing {cell}",
        )
        training_loss[cell] = log.final_loss()
        conditions["trained"][cell] = state_gradient_norms(model, measure_inputs, measure_targets)

    clipping = {}
    for label, clip in (("clipped", config.clip_norm), ("unclipped", None)):
        torch.manual_seed(config.seed)
        model = _scaled(RecurrentReadout("RNN", 2, config.hidden_size, 1), config.scale)
        generator = torch.Generator().manual_seed(config.seed + 3)
        log = train(
            model,
            lambda g=generator: adding_problem(config.batch, config.length, g),
            F.mse_loss,
            config.clip_updates,
            config.clip_learning_rate,
            clip,
            f"vanishing clipping ({label})",
            optimizer_name="sgd",
        )
        clipping[label] = {
            "losses": log.losses,
            "gradient_norms": log.gradient_norms,
            "final_loss": log.final_loss(),
            "max_gradient_norm": max(log.gradient_norms, default=math.nan),
            "skipped_updates": log.skipped_updates,
        }

    results = {
        "experiment": "vanishing",
        "config": asdict(config),
        "seed": config.seed,
        "norms_by_distance": {
            condition: {
                cell: {name: _by_distance(values) for name, values in norms.items()}
                for cell, norms in cells.items()
            }
            for condition, cells in conditions.items()
        },
        "training_final_loss": training_loss,
        "clipping": clipping,
    }
    results["summary"] = _summary(results, config)
    _plot(results, config, out_dir / "vanishing.png")
    results["seconds"] = time.perf_counter() - start
    results["machine"] = reporting.machine()
    return results


def _summary(results: dict, config: Config) -> list[dict]:
    """One row per condition and cell: the norm at a few distances and last / first."""
    rows = []
    far = config.length - 1
    probes = sorted({0, min(10, far), far // 2, far})
    for condition, cells in results["norms_by_distance"].items():
        for cell, norms in cells.items():
            for state, by_distance in norms.items():
                # dL/dc at distance 0 is zero (the readout sees h only): compare with distance 1.
                near = 0 if state == "h" else 1
                first, last = by_distance[near], by_distance[far]
                rows.append(
                    {
                        "condition": condition,
                        "cell": cell if state == "h" else f"{cell} (dL/dc)",
                        "norm_at_distance": {str(d): by_distance[d] for d in probes},
                        "far_over_near": last / first if first > 0 else math.nan,
                    }
                )
    return rows


def _plot(results: dict, config: Config, path: Path) -> None:
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    titles = {
        "init": "(a) at initialisation",
        "trained": f"(b) after {config.updates} Adam updates",
        "scaled": f"(c) init, recurrent weights x{config.scale:g}",
    }
    colours = {"RNN": "tab:red", "LSTM": "tab:blue", "GRU": "tab:green"}
    for axis, (condition, title) in zip(axes.flat, titles.items()):
        for cell, norms in results["norms_by_distance"][condition].items():
            axis.semilogy(norms["h"], color=colours[cell], label=f"{cell} dL/dh")
            if "c" in norms:
                distances = range(1, len(norms["c"]))
                axis.semilogy(
                    distances,
                    norms["c"][1:],
                    color=colours[cell],
                    linestyle="--",
                    label="LSTM dL/dc",
                )
        axis.set_title(title)
        axis.set_xlabel("distance from the loss (steps)")
        axis.set_ylabel("mean ||dL/dh_t||")
        axis.legend(fontsize=7)
    axis = axes[1, 1]
    for label, run_log in results["clipping"].items():
        axis.semilogy(run_log["losses"], label=f"RNN x{config.scale:g}, SGD, {label}")
    axis.set_title(f"(d) training loss, clip norm {config.clip_norm:g}")
    axis.set_xlabel("update")
    axis.set_ylabel("MSE")
    axis.legend(fontsize=7)
    figure.suptitle(
        f"Adding problem, T={config.length}, H={config.hidden_size}, seed {config.seed}"
    )
    figure.tight_layout()
    reporting.save_figure(figure, path)


def report(results: dict, out_dir: Path) -> None:
    """Write report.md and results.json and print the tables."""
    config = results["config"]
    probes = list(results["summary"][0]["norm_at_distance"])
    rows = [
        [row["condition"], row["cell"], *row["norm_at_distance"].values(), row["far_over_near"]]
        for row in results["summary"]
    ]
    table = reporting.markdown_table(
        ["condition", "cell", *[f"d={d}" for d in probes], f"d={probes[-1]} / d=0 (dL/dc: / d=1)"],
        rows,
    )
    clip_rows = [
        [label, run["final_loss"], run["max_gradient_norm"], run["skipped_updates"]]
        for label, run in results["clipping"].items()
    ]
    clip_table = reporting.markdown_table(
        [
            "scaled RNN, SGD",
            "final loss (mean of last 20)",
            "max grad norm",
            "skipped (non-finite grad)",
        ],
        clip_rows,
    )
    losses = ", ".join(f"{c} {v:.4f}" for c, v in results["training_final_loss"].items())
    sections = [
        __doc__.split("\n\n")[1],
        f"## ||dL/dh_t|| by distance d from the loss (adding problem, T={config['length']})\n\n"
        + table,
        f"Training MSE after {config['updates']} updates (chance ~0.167): {losses}.",
        f"## Clipping (recurrent weights x{config['scale']:g}, SGD lr "
        f"{config['clip_learning_rate']:g})\n\n" + clip_table,
        "![gradient norms](vanishing.png)",
    ]
    reporting.write_report(out_dir, "Vanishing and exploding gradients", sections, results)
