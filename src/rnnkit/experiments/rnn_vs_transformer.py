"""An RNN against a Transformer of about the same size: throughput, streaming latency, memory.

Claim: a Transformer trains faster per token (all positions in parallel) while an RNN must step
through time; when generating or streaming token by token, the RNN's cost per token and its
state are constant, while a Transformer's per-token cost and memory grow with the context (its
key/value cache, or a full recomputation without one).

Data: the adding problem of length T (`tasks.adding_problem`), read at the last step.
Models: an rnnkit GRU (hidden H, linear readout; the cell that learned the adding problem
fastest in `memory`) and a causal torch.nn.TransformerEncoder
(post-norm, ReLU, sinusoidal positions, linear readout of the last position) sized to about the
same parameter count. Both trained with the same Adam budget and clipping.
Throughput: training tokens per second over the whole run.
Latency: batch 1, per-token time at context length L for (i) the GRU stepping its state, (ii) the
Transformer stepping against a key/value cache of L tokens (`CausalTransformer.step`, checked
against the full forward), (iii) the Transformer recomputing all L positions (how
nn.TransformerEncoder is used without a cache). Timing does not depend on the values, so the
state and cache hold random numbers of the right shapes. Median over repeated tokens.
Memory: bytes of what must be kept per sequence after L tokens: the GRU state h; the
key/value cache; for recomputation, the L x L attention scores of one layer (all heads), the
largest intermediate. Counted from tensor shapes, not from the allocator.
Streaming: the largest difference between step-by-step outputs and the whole-sequence forward.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from rnnkit.experiments import reporting
from rnnkit.experiments.networks import CausalTransformer, RecurrentReadout, parameter_count
from rnnkit.experiments.tasks import adding_problem
from rnnkit.experiments.training import median_ms, train


@dataclass(frozen=True)
class Config:
    """Sizes and budget; `CONFIGS` holds the full, quick and smoke variants."""

    length: int = 100
    rnn_cell: str = "GRU"
    rnn_hidden: int = 64
    width: int = 32
    heads: int = 4
    feedforward: int = 32
    layers: int = 2
    batch: int = 128
    updates: int = 1000
    learning_rate: float = 1e-2
    clip_norm: float = 1.0
    eval_batch: int = 512
    context_lengths: tuple[int, ...] = (16, 64, 256, 1024, 4096)
    timed_tokens: int = 20
    recompute_repeats: int = 3
    seed: int = 0


CONFIGS = {
    "full": Config(),
    "quick": Config(length=50, updates=250, eval_batch=256, context_lengths=(16, 256, 1024, 4096)),
    "smoke": Config(
        length=6,
        rnn_hidden=8,
        width=8,
        heads=2,
        feedforward=8,
        layers=1,
        batch=4,
        updates=2,
        eval_batch=8,
        context_lengths=(4, 16),
        timed_tokens=2,
        recompute_repeats=1,
    ),
}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def generation_cost(
    rnn: RecurrentReadout, transformer: CausalTransformer, context: int, config: Config
) -> dict:
    """Per-token latency (ms) and kept bytes at context length L, batch 1, for the three ways."""
    token = torch.rand(1, 1, 2)
    kept = tuple(
        torch.randn(1, 1, config.rnn_hidden) for _ in range(2 if config.rnn_cell == "LSTM" else 1)
    )
    rnn_state = kept if len(kept) == 2 else kept[0]
    rnn_ms = median_ms(lambda: rnn.recurrent(token, rnn_state), config.timed_tokens)

    head_width = config.width // config.heads
    cache = [(torch.randn(1, config.heads, context, head_width),) * 2 for _ in range(config.layers)]
    cached_ms = median_ms(
        lambda: transformer.step(token[:, 0], context, cache), config.timed_tokens
    )

    prefix = torch.rand(1, context, 2)
    recompute_ms = median_ms(lambda: transformer.encode(prefix), config.recompute_repeats)
    return {
        "rnn_ms": rnn_ms,
        "cached_ms": cached_ms,
        "recompute_ms": recompute_ms,
        "rnn_bytes": _bytes(kept),
        "cache_bytes": _bytes([t for pair in cache for t in pair]),
        "attention_bytes": config.heads * context * context * 4,
    }


@torch.no_grad()
def streaming_error(rnn: RecurrentReadout, transformer: CausalTransformer, inputs) -> dict:
    """Max |step-by-step - whole-sequence| output of each model on (B, T, I) inputs."""
    whole_rnn, _ = rnn.recurrent(inputs)
    state, stepped = None, []
    for t in range(inputs.size(1)):
        output, state = rnn.recurrent(inputs[:, t : t + 1], state)
        stepped.append(output)
    rnn_error = (torch.cat(stepped, dim=1) - whole_rnn).abs().max().item()

    whole = transformer.encode(inputs)
    cache = transformer.empty_cache(inputs.size(0))
    errors = []
    for t in range(inputs.size(1)):
        encoded, cache = transformer.step(inputs[:, t], t, cache)
        errors.append((encoded - whole[:, t]).abs().max().item())
    return {"rnn": rnn_error, "transformer_cached": max(errors)}


def run(config: Config, out_dir: Path) -> dict:
    """Train both models, time generation over growing contexts, plot; returns the results."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    rnn = RecurrentReadout(config.rnn_cell, 2, config.rnn_hidden, 1)
    torch.manual_seed(config.seed)
    transformer = CausalTransformer(
        2, config.width, config.heads, config.feedforward, config.layers, 1
    )
    results = {"experiment": "rnn-vs-transformer", "config": asdict(config), "seed": config.seed}
    eval_inputs, eval_targets = adding_problem(
        config.eval_batch, config.length, torch.Generator().manual_seed(config.seed + 10_000)
    )
    models = {"RNN": rnn, "Transformer": transformer}
    for name, model in models.items():
        generator = torch.Generator().manual_seed(config.seed + 1)
        log = train(
            model,
            lambda g=generator: adding_problem(config.batch, config.length, g),
            F.mse_loss,
            config.updates,
            config.learning_rate,
            config.clip_norm,
            f"rnn-vs-transformer {name}",
        )
        with torch.no_grad():
            mse = F.mse_loss(model(eval_inputs), eval_targets).item()
        results[name] = {
            "parameters": parameter_count(model),
            "mse": mse,
            "baseline_mse": eval_targets.var(unbiased=False).item(),
            "train_tokens_per_second": config.updates * config.batch * config.length / log.seconds,
            "train_seconds": log.seconds,
            "losses": log.losses,
        }
    results["generation"] = {
        str(context): generation_cost(rnn, transformer, context, config)
        for context in config.context_lengths
    }
    results["streaming_max_error"] = streaming_error(rnn, transformer, eval_inputs[:4])
    _plot(results, config, out_dir / "rnn_vs_transformer.png")
    results["seconds"] = time.perf_counter() - start
    results["machine"] = reporting.machine()
    return results


def _plot(results: dict, config: Config, path: Path) -> None:
    figure, (latency_axis, memory_axis, loss_axis) = plt.subplots(1, 3, figsize=(13, 3.8))
    contexts = list(config.context_lengths)
    rows = [results["generation"][str(c)] for c in contexts]
    lines = {
        f"{config.rnn_cell} step": ("rnn_ms", "rnn_bytes", "tab:blue"),
        "Transformer, KV cache": ("cached_ms", "cache_bytes", "tab:orange"),
        "Transformer, recompute": ("recompute_ms", "attention_bytes", "tab:red"),
    }
    for label, (time_key, bytes_key, colour) in lines.items():
        latency_axis.loglog(
            contexts, [r[time_key] for r in rows], marker="o", color=colour, label=label
        )
        memory_axis.loglog(
            contexts, [r[bytes_key] for r in rows], marker="o", color=colour, label=label
        )
    latency_axis.set(
        xlabel="context length L", ylabel="ms per generated token", title="latency, batch 1"
    )
    memory_axis.set(xlabel="context length L", ylabel="bytes kept per sequence", title="memory")
    for name, colour in (("RNN", "tab:blue"), ("Transformer", "tab:orange")):
        label = config.rnn_cell if name == "RNN" else name
        loss_axis.semilogy(results[name]["losses"], color=colour, label=label)
    loss_axis.axhline(1 / 6, color="grey", linestyle="--", label="baseline 1/6")
    loss_axis.set(xlabel="update", ylabel="training MSE", title=f"adding problem T={config.length}")
    for axis in (latency_axis, memory_axis, loss_axis):
        axis.legend(fontsize=7)
    figure.tight_layout()
    reporting.save_figure(figure, path)


def report(results: dict, out_dir: Path) -> None:
    """Write report.md and results.json and print the tables."""
    config = results["config"]
    model_rows = [
        [
            config["rnn_cell"] if name == "RNN" else name,
            results[name]["parameters"],
            results[name]["mse"],
            results[name]["baseline_mse"],
            results[name]["train_tokens_per_second"],
            results["streaming_max_error"]["rnn" if name == "RNN" else "transformer_cached"],
        ]
        for name in ("RNN", "Transformer")
    ]
    generation_rows = [
        [
            context,
            row["rnn_ms"],
            row["cached_ms"],
            row["recompute_ms"],
            row["rnn_bytes"],
            row["cache_bytes"],
            row["attention_bytes"],
        ]
        for context, row in results["generation"].items()
    ]
    sections = [
        __doc__.split("\n\n")[1],
        f"## Training on the adding problem, T={config['length']} ({config['updates']} Adam "
        f"updates, batch {config['batch']})\n\n"
        + reporting.markdown_table(
            [
                "model",
                "parameters",
                "held-out MSE",
                "baseline MSE",
                "train tokens/s",
                "streaming max abs(step - whole)",
            ],
            model_rows,
        ),
        "## Generation, batch 1: ms per token and bytes kept, by context length L\n\n"
        + reporting.markdown_table(
            [
                "L",
                f"{config['rnn_cell']} ms",
                "Transformer KV-cache ms",
                "Transformer recompute ms",
                f"{config['rnn_cell']} state B",
                "KV cache B",
                "attention scores B",
            ],
            generation_rows,
        ),
        "![RNN vs Transformer](rnn_vs_transformer.png)",
    ]
    reporting.write_report(out_dir, "RNN vs Transformer", sections, results)
