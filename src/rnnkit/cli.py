"""The rnnkit command line: parses options and calls the library (rnnkit.train.runs).

Bad input (missing or unusable data, a run directory that would be overwritten) prints one
line on stderr and exits with 2; an interrupted training run exits with 130 after saving a
checkpoint; anything unexpected exits with 1. `rnnkit --debug ...` (or RNNKIT_DEBUG=1) prints the
traceback of any error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from rnnkit.train.classify import ClassifySettings
from rnnkit.train.forecast import ForecastSettings
from rnnkit.train.lm import LanguageModelSettings
from rnnkit.train.music import MusicSettings
from rnnkit.train.seq2seq import Seq2SeqSettings
from rnnkit.train.tag import TagSettings

EXIT_BAD_INPUT = 2
EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int) -> None:
    click.echo(f"rnnkit: error: {message}", err=True)
    sys.exit(code)


def handle_errors(command: Callable) -> Callable:
    """Map the library's errors to messages and exit codes instead of tracebacks."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from rnnkit.data import DataError
        from rnnkit.train.rundir import RunError
        from rnnkit.train.trainer import TrainingInterrupted

        try:
            return command(*args, **kwargs)
        except (DataError, RunError) as error:
            if _debugging():
                traceback.print_exc()
            _fail(str(error), EXIT_BAD_INPUT)
        except TrainingInterrupted as error:
            click.echo(f"rnnkit: {error}; continue with --resume", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader went away (`rnnkit ... | head`): stop quietly, as Unix tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as error:
            if _debugging():
                traceback.print_exc()
            _fail(
                f"unexpected {type(error).__name__}: {error} (--debug shows the traceback)",
                EXIT_UNEXPECTED,
            )

    return wrapper


def _debugging() -> bool:
    """Whether `rnnkit --debug` or RNNKIT_DEBUG=1 asked for tracebacks."""
    context = click.get_current_context(silent=True)
    flag = context is not None and bool(context.find_root().params.get("debug"))
    return flag or os.environ.get("RNNKIT_DEBUG", "") not in ("", "0")


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rnnkit")
@click.option("--debug", is_flag=True, help="Print the traceback of any error (or RNNKIT_DEBUG=1).")
def main(debug: bool) -> None:
    """rnnkit: recurrent networks (RNN, LSTM, GRU) from their equations, trained on real data."""


# -- train ------------------------------------------------------------------------------------
@main.group()
def train() -> None:
    """Train a model on the shipped data set of a task, or on your own file (--data)."""


def common_train_options(command: Callable) -> Callable:
    """Options every `train` task takes (None = the task's default)."""
    options = [
        click.option("--data", type=str, default=None, help="Data file."),
        click.option(
            "--cell",
            type=click.Choice(["lstm", "gru", "rnn"]),
            default=None,
            help="Recurrent cell.",
        ),
        click.option("--hidden", type=click.IntRange(min=1), default=None, help="Hidden size."),
        click.option("--layers", type=click.IntRange(min=1), default=None, help="Stacked layers."),
        click.option(
            "--bidirectional/--no-bidirectional",
            default=None,
            help="Read sequences both ways (classify, tag).",
        ),
        click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs at most."),
        click.option(
            "--max-steps", type=click.IntRange(min=1), default=None, help="Optimizer steps at most."
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=None,
            help="Global batch size (split over torchrun processes).",
        ),
        click.option(
            "--learning-rate",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Peak AdamW learning rate.",
        ),
        click.option("--seed", type=int, default=None, help="Seed for splits, init and order."),
        click.option(
            "--out",
            type=click.Path(path_type=Path),
            default=None,
            help="Run directory [default: runs/<task>-<time>].",
        ),
        click.option(
            "--resume",
            type=click.Path(path_type=Path),
            default=None,
            help="Continue the interrupted run in this directory.",
        ),
        click.option("--force", is_flag=True, help="Replace a run already in --out."),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            help="Torch CPU threads per process; the fused kernels run parts of a batch on "
            "them. [default: torch's: OMP_NUM_THREADS if set (torchrun sets 1 a process), "
            "else one per core]",
        ),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        click.option(
            "--on-nan",
            type=click.Choice(["skip", "stop"]),
            default=None,
            help="On a NaN/inf loss or gradient: skip the step and halve the learning rate "
            "(reported, counted in metrics.json), or save the last good state and stop (exit 2).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def show_task_defaults(settings_class: type) -> Callable:
    """Append each option's default for this task (from its settings dataclass) to its help."""

    def decorate(command: click.Command) -> click.Command:
        defaults = {f.name: f.default for f in dataclasses.fields(settings_class)}
        for param in command.params:
            if isinstance(param, click.Option) and param.name in defaults and param.help:
                if "[default:" not in param.help:
                    value = defaults[param.name]
                    shown = "the shipped set" if param.name == "data" and value is None else value
                    param.help = f"{param.help} [default: {shown}]"
        return command

    return decorate


def _train(task: str, options: dict[str, Any]) -> None:
    import torch

    from rnnkit.train.rundir import RunError
    from rnnkit.train.runs import train_run

    out, resume, force = options.pop("out"), options.pop("resume"), options.pop("force")
    threads, quiet = options.pop("threads"), options.pop("quiet")
    if resume is not None and (out is not None or force):
        raise RunError("--resume continues a run in its own directory; drop --out/--force")
    if threads is not None:
        torch.set_num_threads(threads)
    summary = train_run(task, options, out=out, force=force, resume=resume, progress=not quiet)
    if summary:
        _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    if "sample" in summary:
        click.echo(
            "--- generated notes ---" if summary["task"] == "music" else "--- generated text ---"
        )
        click.echo(summary["sample"])
        click.echo("----------------------")
    if "sample_midi" in summary:
        click.echo(f"MIDI: {summary['sample_midi']}")
    test, baseline = summary["test"], summary["baseline"]
    shown = {k: v for k, v in test.items() if isinstance(v, float)}
    click.echo(
        f"run directory: {summary['run_dir']}  ({summary['steps']} steps, "
        f"stopped by {summary['stop_reason']})"
    )
    click.echo("test: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    base = {k: v for k, v in baseline.items() if isinstance(v, float)}
    click.echo(
        f"baseline ({baseline['name']}): " + ", ".join(f"{k} {v:.4f}" for k, v in base.items())
    )


@show_task_defaults(ClassifySettings)
@train.command("classify")
@common_train_options
@click.option(
    "--level",
    type=click.Choice(["char", "word"]),
    default=None,
    help="Text tokens.",
)
@click.option(
    "--pooling",
    type=click.Choice(["last", "mean", "max"]),
    default=None,
    help="Sequence summary: final states, or mean/max over valid steps.",
)
@handle_errors
def train_classify(**options) -> None:
    """Sequence classification: surnames -> language by default, `--data digits` for 8x8 digits,
    or a CSV/TSV/JSONL file with `text` and `label` columns."""
    _train("classify", options)


# lm and music both train with truncated BPTT over chunks of a token stream.
SEQ_LEN_OPTION = click.option(
    "--seq-len",
    type=click.IntRange(min=1),
    default=None,
    help="Truncated-BPTT chunk length.",
)


@show_task_defaults(LanguageModelSettings)
@train.command("lm")
@common_train_options
@SEQ_LEN_OPTION
@handle_errors
def train_lm(**options) -> None:
    """Character-level language model: Shakespeare by default, or a UTF-8 text file."""
    _train("lm", options)


@show_task_defaults(MusicSettings)
@train.command("music")
@common_train_options
@SEQ_LEN_OPTION
@handle_errors
def train_music(**options) -> None:
    """Note-level language model: Bach chorale melodies by default, or a text file with one
    piece per line of pitch:duration tokens ("67:1 69:0.5 rest:1"); writes sample.mid."""
    _train("music", options)


@show_task_defaults(ForecastSettings)
@train.command("forecast")
@common_train_options
@click.option(
    "--horizon",
    type=click.IntRange(min=1),
    default=None,
    help="Steps forecast at once [default: half the seasonal period, or 8].",
)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=None,
    help="Input steps [default: 3 x horizon, at least one period].",
)
@handle_errors
def train_forecast(**options) -> None:
    """Multi-step forecasting: yearly sunspots by default, `--data co2`, or a numeric CSV."""
    _train("forecast", options)


@show_task_defaults(TagSettings)
@train.command("tag")
@common_train_options
@click.option(
    "--tagset",
    type=click.Choice(["upos", "xpos", "ner"]),
    default=None,
    help="Tags: universal or Penn POS (UD English-EWT, or a CoNLL-U file's column), or "
    "entities (Universal NER English-EWT, or a column file's IOB2 tags).",
)
@click.option("--crf/--no-crf", default=None, help="Linear-chain CRF output, Viterbi decoding.")
@click.option(
    "--max-train-sentences",
    type=click.IntRange(min=1),
    default=None,
    help="Train on the first N training sentences only.",
)
@handle_errors
def train_tag(**options) -> None:
    """Sequence tagging (a tag per token): UD English-EWT part-of-speech tags by default,
    `--tagset ner` for entities, or a CoNLL-U / column (token tag) file with --data.
    Epochs default to 5 for part-of-speech tags and 20 for ner (a smaller training set)."""
    _train("tag", options)


@show_task_defaults(Seq2SeqSettings)
@train.command("seq2seq")
@common_train_options
@click.option(
    "--attention",
    type=click.Choice(["bahdanau", "luong-dot", "luong-general"]),
    default=None,
    help="Attention: additive (Bahdanau) or multiplicative (Luong dot / general).",
)
@click.option(
    "--source-tokens",
    type=click.Choice(["char", "space"]),
    default=None,
    help="Source tokens: characters, or space-separated tokens.",
)
@click.option(
    "--target-tokens",
    type=click.Choice(["char", "space"]),
    default=None,
    help="Target tokens: characters, or space-separated tokens.",
)
@click.option(
    "--teacher-forcing",
    type=click.FloatRange(0, 1),
    default=None,
    help="Teacher-forcing ratio at the first step (decays linearly to --teacher-forcing-end).",
)
@click.option(
    "--teacher-forcing-end",
    type=click.FloatRange(0, 1),
    default=None,
    help="Teacher-forcing ratio at the last step.",
)
@click.option(
    "--beam", type=click.IntRange(min=1), default=None, help="Beam size for the test scores."
)
@click.option(
    "--length-penalty",
    type=click.FloatRange(min=0),
    default=None,
    help="GNMT length penalty alpha for beam search.",
)
@handle_errors
def train_seq2seq(**options) -> None:
    """Sequence to sequence with attention: CMUdict spelling -> pronunciation by default, or a
    UTF-8 file of `source<TAB>target` lines with --data."""
    _train("seq2seq", options)


# -- using a finished run ---------------------------------------------------------------------
RUN_DIR = click.argument("run_dir", type=click.Path(path_type=Path))


@main.command("eval")
@RUN_DIR
@click.option("--data", type=str, default=None, help="Evaluate on all of this file instead.")
@handle_errors
def eval_command(run_dir: Path, data: str | None) -> None:
    """Quality figures of a trained run on its test split (or on --data)."""
    from rnnkit.train.runs import evaluate_run

    _echo_json(evaluate_run(run_dir, data))


@main.command("predict")
@RUN_DIR
@click.argument("texts", nargs=-1, required=True)
@click.option(
    "--beam",
    type=click.IntRange(min=1),
    default=None,
    help="seq2seq: beam size [default: the run's].",
)
@click.option(
    "--attention",
    "attention_png",
    type=click.Path(path_type=Path),
    default=None,
    help="seq2seq: write the attention weights of each text to this PNG.",
)
@handle_errors
def predict_command(
    run_dir: Path, texts: tuple[str, ...], beam: int | None, attention_png: Path | None
) -> None:
    """Classify TEXTS with a trained `classify` run: label and probability per text; or tag
    them with a `tag` run: token/TAG per token (split on whitespace and punctuation); or
    translate them with a `seq2seq` run: output and score per text (--beam, --attention PNG)."""
    from rnnkit.train.classify import predict_texts
    from rnnkit.train.runs import load_run

    run = load_run(run_dir, expect=("classify", "tag", "seq2seq"))
    if run.task == "seq2seq":
        from rnnkit.train.seq2seq import predict_seq2seq

        for line in predict_seq2seq(run, list(texts), beam, attention_png):
            click.echo(line)
        return
    if beam is not None or attention_png is not None:
        from rnnkit.train.rundir import RunError

        raise RunError(f"--beam and --attention need a `seq2seq` run; {run_dir} is `{run.task}`")
    if run.task == "tag":
        from rnnkit.train.tag import tag_texts

        for tagged in tag_texts(run.model, run.state, list(texts)):
            click.echo(" ".join(f"{token}/{tag}" for token, tag in tagged))
        return
    for result in predict_texts(run.model, run.state, list(texts)):
        click.echo(f"{result['label']}\t{result['probability']:.3f}\t{result['text']}")


@main.command("generate")
@RUN_DIR
@click.option(
    "--prompt",
    type=str,
    default=None,
    help="Text to continue (lm), or note tokens to start the piece with (music: "
    "'67:1 69:0.5') [default: a newline / a new piece].",
)
@click.option(
    "--length",
    type=click.IntRange(min=0),
    default=400,
    show_default=True,
    help="Characters (lm), or notes at most (music: the piece may end sooner).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=0.8,
    show_default=True,
    help="0 = greedy.",
)
@click.option(
    "--top-k", type=click.IntRange(min=1), default=None, help="Sample among the k likeliest."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--midi",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the piece to this MIDI file (music runs).",
)
@click.option("--force", is_flag=True, help="Replace an existing --midi file.")
@handle_errors
def generate_command(run_dir: Path, prompt, length, temperature, top_k, seed, midi, force) -> None:
    """Generate text with a trained `lm` run, or a piece of music with a `music` run."""
    from rnnkit.train.rundir import RunError
    from rnnkit.train.runs import load_run

    run = load_run(run_dir, expect=("lm", "music"))
    if run.task == "lm":
        from rnnkit.data import CharVocab
        from rnnkit.train.lm import sample_text

        if midi is not None:
            raise RunError(f"--midi needs a `music` run; {run_dir} is an `lm` run")
        vocab = CharVocab.from_dict(run.state["vocab"])
        click.echo(sample_text(run.model, vocab, prompt, length, temperature, top_k, seed))
        return
    from rnnkit.data import write_midi
    from rnnkit.train.music import NoteVocab, sample_piece

    if midi is not None:
        if midi.exists() and not force:
            raise RunError(f"--midi {midi} already exists; pass --force to replace it")
        if not midi.parent.is_dir():
            raise RunError(f"--midi {midi}: directory {midi.parent} does not exist")
    vocab = NoteVocab.from_dict(run.state["vocab"])
    notes = prompt.split() if prompt else None
    piece = sample_piece(run.model, vocab, notes, length, temperature, top_k, seed)
    click.echo(" ".join(piece))
    if midi is not None:
        write_midi(piece, midi)
        click.echo(f"MIDI: {midi} ({len(piece)} notes and rests)", err=True)


@main.command("forecast")
@RUN_DIR
@click.option(
    "--horizon",
    type=click.IntRange(min=1),
    default=None,
    help="Steps to forecast [default: the trained horizon].",
)
@handle_errors
def forecast_command(run_dir: Path, horizon: int | None) -> None:
    """Forecast past the end of a `forecast` run's series; writes forecast_future.png."""
    from rnnkit.train.forecast import forecast_future
    from rnnkit.train.runs import load_run

    run = load_run(run_dir, expect="forecast")
    steps = horizon or run.model.config.horizon
    predicted = forecast_future(run.model, run.state, steps, run_dir)
    columns = run.state["columns"]
    click.echo("step\t" + "\t".join(columns))
    for index, row in enumerate(predicted, start=1):
        click.echo(f"+{index}\t" + "\t".join(f"{v:.4f}" for v in row))
    click.echo(f"plot: {run_dir / 'forecast_future.png'}", err=True)


@main.command("stream")
@RUN_DIR
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Predictions shown per line (the likeliest first).",
)
@click.option(
    "--newlines",
    is_flag=True,
    help="lm runs: feed each line's newline too (the lines continue one text, as in a file).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@handle_errors
def stream_command(run_dir: Path, top_k: int, newlines: bool, as_json: bool) -> None:
    """Read standard input line by line and print a prediction after each line, the model's
    state carried from line to line: lm, the likeliest next characters; music, the next notes
    (a line holds note tokens); classify, the class probabilities of all read so far (a line
    is text, or for digits one row of 8 pixel values in [0, 1]). A blank line starts anew."""
    import torch

    from rnnkit import Stream
    from rnnkit.train.runs import load_run
    from rnnkit.train.serving import stream_input_encoder, top_predictions

    torch.set_num_threads(1)
    run = load_run(run_dir, expect=("lm", "music", "classify"))
    encode, names = stream_input_encoder(run, newlines)
    stream = Stream(run.model)
    stdin = sys.stdin
    for number, line in enumerate(iter(stdin.readline, ""), start=1):
        text = line.rstrip("\r\n")
        if not text.strip():
            stream.reset()
            click.echo(json.dumps({"line": number, "reset": True}) if as_json else "")
            continue
        output = stream.step(encode(text, number))
        probabilities = torch.softmax(output[0, -1].float(), dim=-1)
        top = top_predictions(probabilities, names, top_k)
        if as_json:
            entries = [{"prediction": name, "probability": p} for name, p in top]
            click.echo(json.dumps({"line": number, "steps": stream.steps, "top": entries}))
        else:
            shown = [name if run.task == "classify" else json.dumps(name) for name, _ in top]
            click.echo("\t".join(f"{name} {p:.3f}" for name, (_, p) in zip(shown, top)))


@main.command("serve")
@RUN_DIR
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Save sessions here (idle ones, every --persist-every steps, all on SIGTERM) and "
    "restore them after a restart [default: sessions live in memory only].",
)
@click.option("--max-sessions", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--token", default=None, help="Require `Authorization: Bearer TOKEN` on every /v1 route."
)
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="How long a step waits for steps of other sessions to batch with.",
)
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--persist-every",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Save a session after this many steps since its last save (0: only when idle or "
    "on shutdown).",
)
@click.option("--idle-seconds", type=click.FloatRange(min=0), default=60.0, show_default=True)
@click.option(
    "--session-lifetime",
    type=click.FloatRange(min=0, min_open=True),
    default=86400.0,
    show_default=True,
    help="Seconds after which a session is closed.",
)
@click.option("--max-message-bytes", type=click.IntRange(min=64), default=65536, show_default=True)
@click.option(
    "--max-chunk",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Most steps in one message.",
)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@handle_errors
def serve_command(run_dir: Path, host: str, port: int, **options) -> None:
    """Serve a trained run over HTTP and WebSocket to many concurrent streams, with a live
    page at /. The API is in docs/serve.md."""
    from rnnkit.serve import Limits, ServeOptions, serve

    limits = Limits(
        max_sessions=options["max_sessions"],
        max_chunk=options["max_chunk"],
        max_message_bytes=options["max_message_bytes"],
        session_lifetime_s=options["session_lifetime"],
        idle_seconds=options["idle_seconds"],
        persist_every=options["persist_every"],
    )
    serve_options = ServeOptions(
        limits=limits,
        token=options["token"],
        state_dir=options["state_dir"],
        max_batch=options["max_batch"],
        max_wait_ms=options["max_wait_ms"],
        top_k=options["top_k"],
    )
    serve(run_dir, host, port, serve_options, threads=options["threads"])


@main.command("export")
@RUN_DIR
@click.option(
    "--onnx",
    "onnx_path",
    type=click.Path(path_type=Path),
    required=True,
    help="ONNX file to write.",
)
@click.option(
    "--opset", type=click.IntRange(9, 20), default=17, show_default=True, help="ONNX opset."
)
@click.option("--force", is_flag=True, help="Replace an existing --onnx file.")
@handle_errors
def export_command(run_dir: Path, onnx_path: Path, opset: int, force: bool) -> None:
    """Export a trained run's model to an ONNX file. Its recurrent layers become the standard
    ONNX RNN/LSTM/GRU operators; batch size and (but for forecasters) sequence length are
    dynamic; lm models also take and return their state (h0[, c0] -> h_n[, c_n])."""
    from rnnkit.export import export_onnx
    from rnnkit.train.rundir import RunError
    from rnnkit.train.runs import load_run
    from rnnkit.train.serving import onnx_signature

    if onnx_path.exists() and not force:
        raise RunError(f"--onnx {onnx_path} already exists; pass --force to replace it")
    if not onnx_path.parent.is_dir():
        raise RunError(f"--onnx {onnx_path}: directory {onnx_path.parent} does not exist")
    run = load_run(run_dir)
    if run.task in ("tag", "seq2seq"):
        raise RunError(
            f"export: {run_dir} is a `train {run.task}` run; ONNX export covers lm, music, "
            "classify and forecast runs (rnnkit.export_onnx exports any rnnkit layer)"
        )
    example, names = onnx_signature(run.model)
    inputs, outputs, axes = names
    export_onnx(
        run.model,
        example,
        onnx_path,
        lengths="lengths" in inputs,
        opset=opset,
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=axes,
    )
    click.echo(f"wrote {onnx_path} (inputs: {', '.join(inputs)}; outputs: {', '.join(outputs)})")
    for name in ("vocab.json", "preprocessing.json"):
        if (run_dir / name).is_file():
            click.echo(f"its input preprocessing: {run_dir / name}")


# -- other parts of rnnkit --------------------------------------------------------------------
@main.command("import-torch")
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="safetensors file to write.",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow reading SOURCE, a pickle (torch.save's .pt/.pth): unpickling can run code "
    "hidden in the file, so pass this only for files from a source you trust.",
)
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@handle_errors
def import_torch_command(source: Path, out: Path, trust_pickle: bool, force: bool) -> None:
    """Convert a torch.nn state_dict saved with torch.save (e.g. an nn.LSTM's) to safetensors,
    which rnnkit's layers of the same shape load: `layer.load_state_dict(load_file(OUT))`."""
    from rnnkit.convert import load_torch_state_dict
    from rnnkit.train.io import atomic_save_tensors
    from rnnkit.train.rundir import RunError

    if out.is_dir() or not out.parent.is_dir():
        raise RunError(f"--out {out} must be a file in an existing directory")
    if out.exists() and not force:
        raise RunError(f"--out {out} already exists; pass --force to replace it")
    state_dict = load_torch_state_dict(source, trust_pickle=trust_pickle)
    atomic_save_tensors(out, {name: t.clone() for name, t in state_dict.items()})
    for name, tensor in state_dict.items():
        click.echo(f"{name}\t{tuple(tensor.shape)}\t{str(tensor.dtype).removeprefix('torch.')}")
    click.echo(f"wrote {out} ({len(state_dict)} tensors)", err=True)


@main.command("warmup")
@handle_errors
def warmup_command() -> None:
    """Compile the fused kernels now (numba and Triton cache them on disk for later runs)."""
    import torch

    from rnnkit.kernels.cpu import warmup

    warmup()
    click.echo("CPU kernels compiled.")
    if torch.cuda.is_available():
        from rnnkit.kernels.gpu import warmup as gpu_warmup

        gpu_warmup()
        click.echo("GPU kernels compiled.")


@main.command("experiment")
@click.argument("name")
@click.option("--quick", is_flag=True, help="Small sizes: minutes instead of hours.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output directory [default: runs/experiments/NAME].",
)
@handle_errors
def experiment_command(name: str, quick: bool, out: Path | None) -> None:
    """Run one of rnnkit's experiments by NAME (an unknown name lists them)."""
    from rnnkit.experiments import EXPERIMENTS, run_experiment
    from rnnkit.train.rundir import RunError

    if name not in EXPERIMENTS:
        raise RunError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    out_dir = out or Path("runs") / "experiments" / name
    run_experiment(name, quick, out_dir)
    click.echo(f"report, plots and results.json in {out_dir}")
