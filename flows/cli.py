"""The `lanpo` command line.

    lanpo train --config configs/tiny-cpu.yaml        # the training flow, in this process (ephemeral Prefect)
    lanpo evaluate --model runs/<run>/checkpoints/step-000010
    lanpo pool show runs/<run>                        # lessons and contexts of a run
    lanpo prepare --config configs/tiny-cpu.yaml      # models and data ready, with a summary
    lanpo data inspect configs/tiny-cpu.yaml          # counts, samples, gold-answer parse rate
    lanpo verify responses.jsonl --out scored.jsonl   # score model outputs against gold answers
    lanpo config show configs/tiny-cpu.yaml --set grpo.learning_rate=1e-5
    lanpo trainer --channel runs/trainer --num_processes 2 --cpu   # the update on an `accelerate launch` trainer

Errors that are the user's to fix (config, data, model, a damaged checkpoint, a full disk) print one clear message
and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, TextIO

import typer
import yaml

from lanpo_core.checkpoint import CheckpointDamaged, DiskFull, disk_full_error
from lanpo_core.config import ConfigError, RunConfig, load_config
from lanpo_core.data import DataError, ProblemSet, load_problems
from lanpo_core.models import ModelNotFoundError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LANPO: GRPO with language feedback from an experience pool.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect problem sets.")
config_app = typer.Typer(no_args_is_help=True, help="Show resolved run configurations.")
services_app = typer.Typer(no_args_is_help=True, help="Local Prefect server, deployments and MLflow UI.")
pool_app = typer.Typer(no_args_is_help=True, help="Browse a run's experience pool.")
app.add_typer(pool_app, name="pool")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(services_app, name="services")

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML run config (default: configs/tiny-cpu.yaml).")
SetOpt = typer.Option(None, "--set", "-s", help="Dotted override KEY=VALUE, repeatable.")


@contextmanager
def user_errors(console: TextIO | None = None) -> Iterator[None]:
    """Turn the errors a user can fix into one message and exit status 2 (no stack trace)."""
    try:
        yield
    except (ConfigError, DataError, ModelNotFoundError, FileNotFoundError, CheckpointDamaged, DiskFull) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, file=console or sys.stderr)
        raise typer.Exit(2) from None


def _config(path: Optional[Path], overrides: Optional[list[str]]) -> RunConfig:
    return load_config(path or DEFAULT_CONFIG, overrides or [])


def _datasets(cfg: RunConfig) -> list[tuple[str, ProblemSet]]:
    from lanpo_core.runtime import data_dir

    base = data_dir(cfg)
    out = [("train", load_problems(cfg.data.train, base))]
    out += [("eval", load_problems(spec, base)) for spec in cfg.data.eval]
    return out


def _gold_parse_rate(problem_set: ProblemSet, timeout: float) -> float:
    """Share of gold answers math-verify can parse and that verify against themselves."""
    from lanpo_core.verify import Verifier

    with Verifier(["boxed"], timeout_seconds=timeout) as verifier:
        scores = verifier.score_batch((f"\\boxed{{{p.answer}}}", p.answer) for p in problem_set)
    return sum(s.status == "correct" for s in scores) / max(len(scores), 1)


@app.command()
def prepare(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Prepare the policy and embedding models and the data of a config, then print a summary."""
    with user_errors():
        cfg = _config(config, set_)
        typer.echo(f"config: {cfg.source}  (digest {cfg.digest()})")
        from lanpo_core.models import load_embedder, resolve_policy

        started = time.perf_counter()
        policy = resolve_policy(cfg.model.name_or_path, cfg.paths.cache_dir)
        typer.echo(f"policy:   {cfg.model.name_or_path} -> {policy.path} ({policy.kind}, "
                   f"{time.perf_counter() - started:.1f}s)")
        if policy.kind != "hub":
            from transformers import AutoConfig

            mc = AutoConfig.from_pretrained(policy.path)
            typer.echo(f"          {mc.model_type}, {mc.num_hidden_layers} layers, hidden {mc.hidden_size}, "
                       f"vocab {mc.vocab_size}")
        started = time.perf_counter()
        embedder = load_embedder(cfg.pool.embedding_model)
        dim = embedder.encode(["warm-up"]).shape[1]
        typer.echo(f"embedder: {cfg.pool.embedding_model} (dim {dim}, {time.perf_counter() - started:.1f}s)")
        _print_datasets(cfg, samples=1)
        typer.secho("ready.", fg=typer.colors.GREEN)


def _print_datasets(cfg: RunConfig, samples: int) -> None:
    for role, problem_set in _datasets(cfg):
        report = problem_set.report
        rate = _gold_parse_rate(problem_set, cfg.verify.timeout_seconds)
        typer.echo(f"{role:5} {problem_set.name}: {len(problem_set)} problems from {report.origin} "
                   f"({report.rows} rows read, {len(report.missing_gold)} without gold, "
                   f"{len(report.duplicates)} duplicates); gold answers parsable: {rate:.1%}")
        for warning in report.warnings():
            typer.secho(f"      warning: {warning}", fg=typer.colors.YELLOW)
        for problem in problem_set.problems[:samples]:
            question = " ".join(problem.question.split())
            typer.echo(f"      [{problem.id}] {question[:100]}{'...' if len(question) > 100 else ''}"
                       f"  -> {problem.answer}")


def _quiet_prefect(verbose: bool) -> None:
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        for name in ("prefect", "httpx", "mlflow", "transformers", "vllm"):
            logging.getLogger(name).setLevel(logging.WARNING)


@app.command()
def train(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
          run_name: Optional[str] = typer.Option(None, help="Run name (default: the config's name)."),
          verbose: bool = typer.Option(False, "--verbose", "-v",
                                       help="Show Prefect's task logs and library output here, not in the log file.")
          ) -> None:
    """Run the LANPO training flow (plain GRPO with configs/grpo-tiny-cpu.yaml) to the end, with progress."""
    with user_errors():
        cfg = _config(config, set_)  # fail on a bad config before Prefect starts
    from tqdm import tqdm

    from flows import train as train_flow

    steps = cfg.grpo.steps
    if verbose:
        log = None
    else:
        with user_errors():  # a missing data file or model is reported here, before the log file exists
            log = train_flow.run_folder(cfg, run_name, train_flow.check_inputs(cfg).provenance) / "lanpo.log"
    out, err = (sys.stdout, sys.stderr) if log is None else _output_to_log(log)
    if log is not None:
        typer.echo(f"lanpo train: {steps} step(s); library logs go to {log}", file=out)
        _lanpo_logs(err)

    def show(event: train_flow.StageEvent) -> None:
        bar.set_description_str(f"step {event.step}/{steps} {event.stage}", refresh=False)
        bar.set_postfix_str(", ".join(f"{name} {value:.2f}" for name, value in
                                      (("reward", event.reward), ("held-out", event.accuracy)) if value is not None))
        if event.finished:
            bar.update(1)

    from prefect.exceptions import TerminationSignal

    from tasks.processes import exit_status, guard_ephemeral_server, stop_on_signals

    started = time.perf_counter()
    try:  # the bar closes before an error is printed under it
        with stop_on_signals(), user_errors(err), tqdm(total=train_flow.total_stages(cfg), desc="starting",
                                                       unit="stage", file=err) as bar, train_flow.reporting(show):
            guard_ephemeral_server()  # dies with this process, even on SIGKILL
            summary = train_flow.lanpo_train(str(config or DEFAULT_CONFIG), list(set_ or []), run_name)
    except typer.Exit:
        raise
    except (KeyboardInterrupt, TerminationSignal) as e:  # SIGINT, SIGTERM (tasks/processes.py)
        typer.echo("interrupted: the same command resumes the run at its first unfinished stage", file=err)
        raise typer.Exit(exit_status(e)) from None
    except Exception as e:
        try:
            traceback.print_exc()  # into the log file (on the terminal with --verbose)
        except OSError:
            pass  # the log is on the full disk
        where = log.parent if log else Path(cfg.paths.runs_dir).resolve()
        full = disk_full_error(e, where, "writing the run's files")
        if full is not None:  # e.g. a stage result (Prefect) or the pool (LanceDB) under the run folder
            typer.secho(f"error: {full}", fg=typer.colors.RED, file=err)
            raise typer.Exit(2) from None
        typer.secho(f"error: {type(e).__name__}: {e}" + (f"\n  full log: {log}" if log else ""),
                    fg=typer.colors.RED, file=err)
        raise typer.Exit(1) from None
    _print_run(summary, time.perf_counter() - started, log, out, cfg.eval.samples)


def _output_to_log(log: Path) -> tuple[TextIO, TextIO]:
    """Point file descriptors 1 and 2 at `log` and return streams on the terminal's stdout and stderr.

    Whatever libraries print, from Python or C, in this process or in the processes it starts (the vLLM engine, the
    ephemeral Prefect server, verifier workers), then lands in the log, and only what lanpo writes to the returned
    streams reaches the terminal. Kept until the process exits: what libraries print at exit belongs in the log too.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = (open(os.dup(fd), "w", buffering=1, encoding="utf-8") for fd in (1, 2))
    with open(log, "a", encoding="utf-8") as handle:  # append: the log of a resumed run keeps the earlier attempts
        handle.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} lanpo {shlex.join(sys.argv[1:])}\n")
        handle.flush()
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
    return out, err


def _lanpo_logs(console: TextIO) -> None:
    """lanpo's own log records go to the log file from INFO up (through the root logger, as Prefect set it up) and,
    from WARNING up, to the terminal above the progress bar."""
    from tqdm import tqdm

    class Console(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            tqdm.write(f"{record.levelname.lower()}: {record.getMessage()}", file=console)

    for name in ("lanpo_core", "tasks"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(Console(logging.WARNING))


def _print_run(summary: dict, seconds: float, log: Path | None, out: TextIO, samples: int) -> None:
    """The end of `lanpo train`: accuracy before and after (mean@k with k = `samples`), time by stage, and where
    everything is."""
    from flows.train import ACCURACY

    def echo(text: str = "") -> None:
        typer.echo(text, file=out)

    typer.secho(f"done in {seconds / 60:.1f} min: {summary['steps']} step(s), run {summary['run_key']}",
                fg=typer.colors.GREEN, file=out)
    before = summary.get("eval_before", {})
    label = {"mean_at_k": f"mean@{samples}", "feedback_greedy": "feedback greedy"}
    rows = [(f"{m.group(1)} {label.get(m.group(2), m.group(2))}", before.get(k), v)
            for k, v in summary.items() if (m := ACCURACY.fullmatch(k))]
    if rows:
        width = max(len(name) for name, _, _ in rows)
        echo(f"\n  {'held-out accuracy':{width}}  before   after")
        for name, was, now in rows:
            echo(f"  {name:{width}}  {'-' if was is None else f'{was:.3f}':>6}  {now:6.3f}")
    seconds_by_stage = summary.get("stage_seconds", {})
    if seconds_by_stage:
        echo("\n  seconds by stage (MLflow time/*_seconds summed over steps; the first stage to use the rollout "
             "engine includes its start)")
        for name, value in sorted(seconds_by_stage.items(), key=lambda kv: -kv[1]):
            echo(f"  {name:14} {value:8.1f}")
        echo(f"  {'total':14} {sum(seconds_by_stage.values()):8.1f}")
    echo(f"\n  checkpoint  {summary['checkpoint'] or 'none (no step run)'}")
    echo(f"  MLflow run  {summary['mlflow_run_id']} in {summary['mlflow_tracking_uri']}")
    if summary.get("mlflow_ui_command"):  # no UI serves the run's store
        echo(f"  MLflow UI   {summary['mlflow_ui_command']}")
        echo(f"              then open {summary['mlflow_run_url']}")
    else:
        echo(f"  MLflow UI   {summary['mlflow_run_url']}")
    if log is not None:
        echo(f"  log         {log}")


def _print_summary(summary: dict) -> None:
    typer.secho("done.", fg=typer.colors.GREEN)
    for key, value in summary.items():
        typer.echo(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")


@app.command()
def evaluate(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
             model: Optional[str] = typer.Option(None, help="Checkpoint/model folder, bundled or hub name."),
             verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Zero-shot accuracy of a model on the config's held-out benchmarks (its own MLflow run)."""
    _quiet_prefect(verbose)
    with user_errors():
        cfg = _config(config, set_)
        from lanpo_core.models import resolve_policy

        resolve_policy(model or cfg.model.name_or_path, cfg.paths.cache_dir)  # a damaged checkpoint: one line
        from flows.evaluate import lanpo_evaluate

        summary = lanpo_evaluate(str(config or DEFAULT_CONFIG), model, list(set_ or []))
    _print_summary(summary)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def trainer(ctx: typer.Context,
            channel: Path = typer.Option(..., "--channel", help="The folder of the runs' update.trainer.channel."),
            poll_seconds: float = typer.Option(0.5, help="How often rank 0 looks for a request.")) -> None:
    """The long-lived trainer of `update.placement: trainer`: `accelerate launch` with the other flags given (e.g.
    `--num_processes 2 --cpu`, or `--config_file configs/accelerate/ddp-4gpu.yaml`) running lanpo_core.trainer,
    which answers the flow's update requests on CHANNEL until the run's last step (docs/scale-out.md)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *ctx.args, "-m", "lanpo_core.trainer",
               "--channel", str(channel), "--poll-seconds", str(poll_seconds)]
    os.execv(sys.executable, command)


@app.command()
def serve() -> None:
    """Register the deployments (lanpo, grpo, evaluate) with the Prefect server at PREFECT_API_URL and serve them."""
    from flows.serve import serve_deployments

    serve_deployments()


@services_app.command("up")
def services_up(prefect_port: int = typer.Option(4200, help="Prefect server port (127.0.0.1)."),
                mlflow_port: int = typer.Option(5000, help="MLflow UI port (127.0.0.1).")) -> None:
    """Start a Prefect server, the deployment server and the MLflow UI on 127.0.0.1 (stop with `services down`)."""
    from flows.serve import services_up as up

    try:
        urls = up(prefect_port, mlflow_port)
    except RuntimeError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    for name, url in urls.items():
        typer.echo(f"{name}: {url}")
    typer.echo(f"trigger a run from the UI, or: PREFECT_API_URL={urls['prefect_api']} "
               "prefect deployment run lanpo-train/lanpo")


@services_app.command("down")
def services_down() -> None:
    """Stop what `lanpo services up` started."""
    from flows.serve import services_down as down

    stopped = down()
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@pool_app.command("show")
def pool_show(run_dir: Path = typer.Argument(..., help="A run folder, runs/<run>."),
              step: Optional[int] = typer.Option(None, help="Only this step (default: the last one)."),
              limit: int = typer.Option(5, help="Rollouts and lesson sets to show.")) -> None:
    """Counts, rewards by rollout kind, the latest lessons and context-conditioned rollouts of a run."""
    from lanpo_core.pool import ExperiencePool

    with user_errors():
        cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
        if cfg is None:
            raise DataError(f"{run_dir} is not a lanpo run folder (no config.yaml)")
        uri = cfg.pool.uri or str(run_dir / "pool")
        if "://" not in uri and not Path(uri).is_dir():
            raise DataError(f"{run_dir}: no pool at {uri} (has the run written a step yet?)")
        pool = ExperiencePool(uri, run_id=run_dir.resolve().name, read_only=True)
        stats = pool.stats()
        typer.echo(f"pool {uri} (version {stats['version']}): {stats['rows']} rollouts of {stats['problems']} "
                   f"problems over {stats['steps']} steps, {stats['lessons']} lesson sets")
        for kind, row in stats["by_kind"].items():
            mean = "-" if row["reward_mean"] is None else f"{row['reward_mean']:.3f}"
            typer.echo(f"  {kind:12} {row['rows']:6d} rollouts, reward mean {mean}")
        frame = pool.table.to_pandas()
        frame = frame[frame["run_id"] == pool.run_id]
        if frame.empty:
            return
        shown = frame[frame["step"] == (frame["step"].max() if step is None else step)]
        lessons = shown[shown["kind"] == "lesson"].head(limit)
        for _, row in lessons.iterrows():
            typer.echo(f"\nlessons (step {row['step']}, from {len(row['context_ids'])} experiences):")
            for lesson in row["lessons"]:
                typer.echo(f"  - {lesson}")
        rollouts = shown[shown["kind"].isin(["reflection", "abstraction"])].head(limit)
        for _, row in rollouts.iterrows():
            response = " ".join(str(row["response"]).split())
            typer.echo(f"\n[{row['kind']} step {row['step']}] {row['problem_text'][:80]}\n"
                       f"  context from {list(row['context_ids'])[:4]}\n  -> {response[:160]}  "
                       f"(answer {row['extracted_answer']}, reward {row['reward']})")


@data_app.command("inspect")
def data_inspect(config: Optional[Path] = typer.Argument(None, help="YAML run config."),
                 set_: Optional[list[str]] = SetOpt,
                 samples: int = typer.Option(3, help="Problems to show per dataset.")) -> None:
    """Counts, skipped rows, samples and the gold-answer parse rate of every dataset in a config."""
    with user_errors():
        cfg = _config(config, set_)
        _print_datasets(cfg, samples)


@app.command()
def verify(responses: Path = typer.Argument(..., help="JSONL with a response and a gold answer per line."),
           response_field: str = typer.Option("response", help="Field holding the model's response."),
           gold_field: str = typer.Option("answer", help="Field holding the gold answer."),
           out: Optional[Path] = typer.Option(None, help="Write each row plus its score here (JSONL)."),
           config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Score a JSONL of responses against gold answers with the config's extraction and time limit."""
    from lanpo_core.data import read_jsonl
    from lanpo_core.verify import Verifier, summarize

    with user_errors():
        cfg = _config(config, set_)
        rows = list(read_jsonl(responses))
        for line, row in rows:
            for name in (response_field, gold_field):
                if name not in row:
                    raise DataError(f"{responses}:{line}: no field '{name}' (fields: {', '.join(row)})")
        with Verifier.from_config(cfg.verify) as verifier:
            scores = verifier.score_batch((str(r[response_field]), str(r[gold_field])) for _, r in rows)
        if out is not None:
            with open(out, "w", encoding="utf-8") as handle:
                for (_, row), score in zip(rows, scores):
                    handle.write(json.dumps({**row, "score": score.as_dict()}) + "\n")
        summary = summarize(scores)
        typer.echo(" ".join(f"{k}={v:.4g}" for k, v in summary.items()))


@config_app.command("show")
def config_show(config: Optional[Path] = typer.Argument(None, help="YAML run config (default: tiny-cpu)."),
                set_: Optional[list[str]] = SetOpt) -> None:
    """Print the fully resolved config (defaults filled in, overrides applied)."""
    with user_errors():
        cfg = _config(config, set_)
        typer.echo(f"# {cfg.source}  digest {cfg.digest()}")
        typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())


def main() -> None:  # `python -m flows.cli`
    app(prog_name="lanpo")


if __name__ == "__main__":
    sys.exit(main())
