"""`rnnkit serve` under many concurrent streams, and a transformer LM's cost per step beside it.

    python benchmarks/bench_serve.py [--seconds 5] [--streams 1 16 64 256] [--hidden 256]

1. A character LSTM language model (hidden 256, random weights: speed does not depend on
   training) is served by `rnnkit serve` on loopback, once batching (--max-batch 256) and once
   stepping each session alone (--max-batch 1). A separate driver process opens N WebSocket
   streams that each send one character per message and wait for the answer, for a bounded
   time; it reports steps per second and the p50/p99 latency of a step (send -> answer).
2. The server's resident memory after opening 1,000 sessions (idle) and after stepping each
   (active). Where a step's time goes: the CPU time per step of the server's event-loop thread
   (protocol, JSON, sessions, batch queue) and of its model thread under 64 streams, and the
   model thread's work for one batched step split into gather, model, scatter and entries.
   (py-spy attached to the server sampled too few stacks on the loaded 2-core machine to use.)
3. A torch.nn.TransformerEncoder LM of similar size, per-step latency and memory per stream as
   the stream grows: recomputing over the whole context, and with a key/value cache; the LSTM's
   step beside it (constant).

Prints tables and writes benchmarks/results/serve.json; asserts no times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results" / "serve.json"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n"


# -- the served run ---------------------------------------------------------------------------------
def make_lm_run(directory: Path, hidden: int) -> Path:
    """A run directory holding a character LSTM LM with seeded random weights."""
    from rnnkit.data import CharVocab
    from rnnkit.models import LanguageModel, LanguageModelConfig
    from rnnkit.train.io import atomic_write_json
    from rnnkit.train.lm import LanguageModelSettings
    from rnnkit.train.rundir import save_model, write_config

    vocab = CharVocab.build(TEXT + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ;'?-")
    torch.manual_seed(0)
    model = LanguageModel(LanguageModelConfig(len(vocab), 64, "lstm", hidden, 1))
    run_dir = directory / "lm"
    run_dir.mkdir(parents=True)
    settings = LanguageModelSettings(hidden=hidden)
    config = {
        "task": "lm",
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "model": {"class": "LanguageModel", "config": vars(model.config)},
    }
    write_config(run_dir, config)
    save_model(run_dir, model)
    atomic_write_json(run_dir / "vocab.json", {"level": "char", "vocab": vocab.to_dict()})
    return run_dir


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python -m rnnkit serve` in a subprocess on a free loopback port."""

    def __init__(self, run_dir: Path, *options: str) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "rnnkit", "serve", str(run_dir), "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, "--max-sessions", "5000", *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)

    def health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/v1/health", timeout=30).json()

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


# -- the driver (a separate process) ----------------------------------------------------------------
async def drive(url: str, streams: int, seconds: float) -> dict:
    """N WebSocket streams, one character per message each, closed loop, for `seconds`."""
    import httpx
    from websockets.asyncio.client import connect

    characters = "to be or not to be"
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        ids = [(await client.post("/v1/sessions")).json()["id"] for _ in range(streams)]
    latencies: list[float] = []
    socket_url = url.replace("http://", "ws://")
    start_gate = asyncio.Event()
    stop_at = [math.inf]

    async def stream(session: str, offset: int) -> None:
        async with connect(f"{socket_url}/v1/sessions/{session}/stream", max_size=None) as ws:
            for k in range(3):  # warm up: connect, first steps
                await ws.send(json.dumps({"input": characters[(offset + k) % len(characters)]}))
                await ws.recv()
            await start_gate.wait()
            k = 0
            while time.perf_counter() < stop_at[0]:
                sent = time.perf_counter()
                await ws.send(json.dumps({"input": characters[(offset + k) % len(characters)]}))
                answer = json.loads(await ws.recv())
                assert "outputs" in answer, answer
                latencies.append(time.perf_counter() - sent)
                k += 1

    tasks = [asyncio.create_task(stream(s, i)) for i, s in enumerate(ids)]
    await asyncio.sleep(0.5 + 0.01 * streams)
    began = time.perf_counter()
    stop_at[0] = began + seconds
    start_gate.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - began
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for session in ids:
            await client.delete(f"/v1/sessions/{session}")
    ordered = sorted(latencies)
    return {
        "streams": streams,
        "steps": len(latencies),
        "seconds": elapsed,
        "steps_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def run_driver(url: str, streams: int, seconds: float) -> dict:
    """The driver in its own process (the server's CPU is not the driver's)."""
    command = [sys.executable, __file__, "--drive", url, str(streams), str(seconds)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure_memory(server: Server, sessions: int = 1000) -> dict:
    """Resident memory of the server: before, after opening `sessions`, after stepping each."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as client:
        base = server.rss()
        ids = [client.post("/v1/sessions").json()["id"] for _ in range(sessions)]
        idle = server.rss()
        for session in ids:
            client.post(f"/v1/sessions/{session}/steps", json={"input": "t"})
        active = server.rss()
        state = client.get("/v1/model").json()["state"]["bytes_per_session"]
        for session in ids:
            client.delete(f"/v1/sessions/{session}")
    mib = 1024 * 1024
    return {
        "sessions": sessions,
        "rss_base_mib": base / mib,
        "idle_mib_per_1000": (idle - base) / mib * 1000 / sessions,
        "active_mib_per_1000": (active - base) / mib * 1000 / sessions,
        "state_mib_per_1000": state * 1000 / mib,
    }


def thread_cpu(server: Server) -> dict[str, float]:
    """CPU seconds so far of the server's event-loop thread (the main one) and of the others
    (the model thread; torch runs one intra-op thread, and nothing is saved meanwhile)."""
    import psutil

    process = psutil.Process(server.process.pid)
    times = {"event_loop": 0.0, "model_thread": 0.0}
    for thread in process.threads():
        key = "event_loop" if thread.id == process.pid else "model_thread"
        times[key] += thread.user_time + thread.system_time
    return times


def where_time_goes(server: Server, streams: int, seconds: float) -> dict:
    """Per step under `streams` streams: CPU ms of the event loop (HTTP/WebSocket protocol,
    JSON, sessions, batch queue) and of the model thread (the batched step and its entries)."""
    before, health = thread_cpu(server), server.health()["batching"]
    row = run_driver(server.url, streams, seconds)
    after, done = thread_cpu(server), server.health()["batching"]
    steps = max(done["steps"] - health["steps"], 1)
    return {
        "streams": streams,
        "steps_per_s": row["steps_per_s"],
        "event_loop_cpu_ms_per_step": 1000 * (after["event_loop"] - before["event_loop"]) / steps,
        "model_thread_cpu_ms_per_step": 1000
        * (after["model_thread"] - before["model_thread"])
        / steps,
        "model_thread_busy_ms_per_step": 1000
        * (done["model_seconds"] - health["model_seconds"])
        / steps,
    }


def batch_breakdown(run_dir: Path, batch: int, repeats: int = 200) -> dict:
    """In this process, the model thread's work for one batched step of `batch` sessions,
    split: gather states, the model step, scatter states, output entries (median ms)."""
    from rnnkit.serve.adapters import make_adapter
    from rnnkit.serve.batcher import StateTable
    from rnnkit.train.runs import load_run

    torch.set_num_threads(1)
    adapter = make_adapter(load_run(run_dir))
    table = StateTable(adapter)
    slots = torch.tensor([table.allocate() for _ in range(batch)])
    chunk = torch.full((batch, 1), 5, dtype=torch.int64)
    parts: dict[str, list[float]] = {"gather": [], "step": [], "scatter": [], "entries": []}
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            state = table.gather(slots)
            t1 = time.perf_counter()
            outputs, state = adapter.step(chunk, state)
            t2 = time.perf_counter()
            table.scatter(slots, state)
            t3 = time.perf_counter()
            adapter.entries(outputs, [None] * batch)
            t4 = time.perf_counter()
            for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[name].append(seconds)
    return {"batch": batch, **{f"{k}_ms": 1000 * statistics.median(v) for k, v in parts.items()}}


# -- a transformer LM beside it ---------------------------------------------------------------------
class TransformerLM(nn.Module):
    """A causal TransformerEncoder LM: token embeddings + sinusoidal positions, post-norm."""

    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, ff: int, context: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model)
        # Sinusoidal positions (Vaswani et al.): no parameters, so sizes compare fairly.
        steps = torch.arange(context).unsqueeze(1)
        rates = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        table = torch.zeros(context, d_model)
        table[:, 0::2], table[:, 1::2] = torch.sin(steps * rates), torch.cos(steps * rates)
        self.register_buffer("position", table)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)
        self.heads = heads

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(1, L) ids -> (1, L, V) logits, each position seeing only the ones before."""
        length = tokens.size(1)
        x = self.embedding(tokens) + self.position[:length]
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        return self.head(self.encoder(x, mask=mask, is_causal=True))

    def cached_step(self, token: int, position: int, cache: list) -> torch.Tensor:
        """One new token with per-layer (keys, values) caches (appended to) -> (V,) logits."""
        x = self.embedding.weight[token] + self.position[position]
        for layer, (keys, values) in zip(self.encoder.layers, cache):
            attention = layer.self_attn
            q, k, v = (x @ attention.in_proj_weight.t() + attention.in_proj_bias).chunk(3)
            keys[position], values[position] = k, v
            heads, width = self.heads, x.numel() // self.heads
            known_k = keys[: position + 1].view(-1, heads, width)
            known_v = values[: position + 1].view(-1, heads, width)
            scores = torch.einsum("hd,nhd->hn", q.view(heads, width), known_k) / math.sqrt(width)
            mixed = torch.einsum("hn,nhd->hd", scores.softmax(-1), known_v).reshape(-1)
            x = layer.norm1(x + attention.out_proj(mixed))
            x = layer.norm2(x + layer.linear2(layer.activation(layer.linear1(x))))
        return self.head(x)


def compare_with_transformer(run_dir: Path, lengths: list[int], repeats: int) -> dict:
    """Per-step latency and memory per stream vs stream length: LSTM step, transformer both ways."""
    from rnnkit.serve.adapters import make_adapter
    from rnnkit.train.runs import load_run

    torch.set_num_threads(1)
    adapter = make_adapter(load_run(run_dir))
    lstm = adapter.model
    vocab = lstm.config.vocab_size
    torch.manual_seed(0)
    context = max(lengths) + repeats + 1
    transformer = TransformerLM(vocab, 128, 2, 4, 512, context).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    tokens = torch.randint(2, vocab, (1, context))
    rows = []
    with torch.inference_mode():
        # The cache reproduces the full forward (a check of the comparison, not of speed).
        cache = [(torch.zeros(context, 128), torch.zeros(context, 128)) for _ in range(2)]
        for t in range(8):
            cached = transformer.cached_step(int(tokens[0, t]), t, cache)
        full = transformer(tokens[:, :8])[0, -1]
        assert torch.allclose(cached, full, atol=1e-4), (cached - full).abs().max()
        state = adapter.initial_state(1)
        lstm_times = []
        for t in range(200):
            started = time.perf_counter()
            _, state = adapter.step(tokens[:, t % context : t % context + 1], state)
            lstm_times.append(time.perf_counter() - started)
        lstm_ms = 1000 * statistics.median(lstm_times[20:])
        lstm_bytes = sum(t.numel() * t.element_size() for t in state)
        for length in lengths:
            recompute = []
            for _ in range(max(3, repeats // 10)):
                started = time.perf_counter()
                transformer(tokens[:, : length + 1])
                recompute.append(time.perf_counter() - started)
            cache = [(torch.zeros(context, 128), torch.zeros(context, 128)) for _ in range(2)]
            transformer(tokens[:, :length])  # (the prefill's cost is not a step's)
            for layer_cache in cache:  # a filled cache of `length` positions
                layer_cache[0][:length].normal_()
                layer_cache[1][:length].normal_()
            cached_times = []
            for step in range(repeats):
                started = time.perf_counter()
                transformer.cached_step(int(tokens[0, length + step]), length + step, cache)
                cached_times.append(time.perf_counter() - started)
            rows.append(
                {
                    "length": length,
                    "lstm_step_ms": lstm_ms,
                    "transformer_recompute_ms": 1000 * statistics.median(recompute),
                    "transformer_cached_ms": 1000 * statistics.median(cached_times),
                    "lstm_state_kib": lstm_bytes / 1024,
                    "transformer_cache_kib": 2 * 2 * length * 128 * 4 / 1024,
                }
            )
    return {
        "lstm_parameters": count(lstm),
        "transformer_parameters": count(transformer),
        "transformer": "TransformerEncoder d_model 128, 2 layers, 4 heads, ff 512, post-norm",
        "rows": rows,
    }


# -- main -------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per configuration")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--drive", nargs=3, metavar=("URL", "STREAMS", "SECONDS"))
    args = parser.parse_args()
    if args.drive:
        url, streams, seconds = args.drive
        print(json.dumps(asyncio.run(drive(url, int(streams), float(seconds)))))
        return

    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "hidden": args.hidden,
        "note": "the server uses 1 torch thread; the driver is another process on the same CPUs",
    }
    with tempfile.TemporaryDirectory() as directory:
        run_dir = make_lm_run(Path(directory), args.hidden)
        throughput = []
        servers = {
            "batched": ["--max-batch", "256", "--max-wait-ms", "2"],
            "alone": ["--max-batch", "1", "--max-wait-ms", "0"],
        }
        for name, options in servers.items():
            server = Server(run_dir, *options)
            try:
                if name == "batched":  # on a fresh server: nothing freed before to reuse
                    results["memory"] = measure_memory(server, 2000)
                for streams in args.streams:
                    before = server.health()["batching"]
                    row = run_driver(server.url, streams, args.seconds)
                    after = server.health()["batching"]
                    steps = after["steps"] - before["steps"]
                    batches = after["batches"] - before["batches"]
                    model = after["model_seconds"] - before["model_seconds"]
                    row.update(
                        server=name,
                        mean_batch=steps / max(batches, 1),
                        model_ms_per_step=1000 * model / max(steps, 1),
                        model_share=model / row["seconds"],
                    )
                    throughput.append(row)
                    print(
                        f"{name:8s} {streams:4d} streams: {row['steps_per_s']:8.0f} steps/s  "
                        f"p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
                        f"mean batch {row['mean_batch']:6.1f}",
                        flush=True,
                    )
                if name == "batched":
                    results["time_per_step_64_streams"] = where_time_goes(server, 64, args.seconds)
            finally:
                server.stop()
        results["throughput"] = throughput
        results["batch_breakdown"] = [batch_breakdown(run_dir, b) for b in (1, 64)]
        results["transformer"] = compare_with_transformer(run_dir, args.lengths, 50)

    print("\nstreams  server    steps/s   p50 ms   p99 ms  mean batch  model ms/step")
    for row in throughput:
        print(
            f"{row['streams']:7d}  {row['server']:8s} {row['steps_per_s']:8.0f} "
            f"{row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['mean_batch']:11.1f} "
            f"{row['model_ms_per_step']:13.3f}"
        )
    by = {(r["server"], r["streams"]): r["steps_per_s"] for r in throughput}
    for streams in args.streams:
        if ("batched", streams) in by and ("alone", streams) in by:
            ratio = by[("batched", streams)] / by[("alone", streams)]
            print(f"batched / alone at {streams} streams: {ratio:.2f}x")
    memory = results["memory"]
    print(
        f"\nresident memory per 1,000 sessions (2,000 opened): idle {memory['idle_mib_per_1000']:.2f} MiB, "
        f"active {memory['active_mib_per_1000']:.2f} MiB (state alone "
        f"{memory['state_mib_per_1000']:.2f} MiB)"
    )
    split = results["time_per_step_64_streams"]
    print(
        f"CPU per step under 64 streams: event loop (protocol, JSON, sessions) "
        f"{split['event_loop_cpu_ms_per_step']:.3f} ms, model thread "
        f"{split['model_thread_cpu_ms_per_step']:.3f} ms"
    )
    for row in results["batch_breakdown"]:
        print(
            f"one batched step of {row['batch']:3d}: gather {row['gather_ms']:.3f} ms, model "
            f"{row['step_ms']:.3f} ms, scatter {row['scatter_ms']:.3f} ms, entries "
            f"{row['entries_ms']:.3f} ms"
        )
    comparison = results["transformer"]
    print(
        f"\nLSTM LM {comparison['lstm_parameters']:,} parameters vs transformer LM "
        f"{comparison['transformer_parameters']:,} ({comparison['transformer']}), batch 1:"
    )
    print("length  lstm ms  tf recompute ms  tf cached ms  lstm state KiB  tf cache KiB")
    for row in comparison["rows"]:
        print(
            f"{row['length']:6d} {row['lstm_step_ms']:8.3f} {row['transformer_recompute_ms']:16.3f}"
            f" {row['transformer_cached_ms']:13.3f} {row['lstm_state_kib']:15.1f}"
            f" {row['transformer_cache_kib']:13.1f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
