"""The ``cmcl`` command line: parsing only; each command calls one library function.

Commands: ``extract`` (write the feature cache), ``train`` (run strategies over a protocol),
``evaluate`` (Table 2 from runs), ``info`` (describe a shard, cache or run), ``list`` (strategies,
protocols, backbones) and ``reproduce`` (the quickstart: all three on the synthetic default).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import click

from cmcl import __version__
from cmcl.errors import CMCLError, ConfigError

log = logging.getLogger("cmcl")


class UserError(click.ClickException):
    """A one-line error for the user; exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"cmcl: error: {self.format_message()}", err=True)


def user_errors(fn):
    """Turn :class:`CMCLError` into a one-line message without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CMCLError as exc:
            raise UserError(str(exc)) from None
        except OSError as exc:  # the machine, not the input: a full disk, an unwritable folder
            where = exc.filename or ""
            raise UserError(f"{where}: {exc.strerror or exc}" if where else str(exc)) from None
    return wrapper


def _setup_logging(quiet: bool) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.handlers[0].setStream(sys.stderr)  # the current stderr (it changes under click's test runner)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def parse_value(text: str) -> Any:
    """``-p`` values: true/false, none/null, int, float, else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_params(items: tuple[str, ...], strategies: list[str]) -> dict[str, dict[str, Any]]:
    """Split ``-p key=value`` / ``-p strategy.key=value`` into per-strategy overrides.

    An unscoped key applies to every selected strategy that accepts it; a key no selected strategy
    accepts is an error (naming the accepted parameters).
    """
    from cmcl.train.strategies import strategy_parameters

    out: dict[str, dict[str, Any]] = {s: {} for s in strategies}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"-p {item!r}: expected key=value (or strategy.key=value)")
        key, value = item.split("=", 1)
        key = key.strip()
        scope = None
        if "." in key:
            scope, key = key.split(".", 1)
            if scope not in out:
                raise ConfigError(f"-p {item!r}: strategy {scope!r} is not selected (selected: {', '.join(strategies)})")
        targets = [scope] if scope else [s for s in strategies if key in strategy_parameters(s)]
        if not targets or (scope and key not in strategy_parameters(scope)):
            accepted = {s: sorted(strategy_parameters(s)) for s in ([scope] if scope else strategies)}
            raise ConfigError(f"-p {item!r}: unknown parameter {key!r}; accepted: "
                              + "; ".join(f"{s}: {', '.join(p) or 'none'}" for s, p in accepted.items()))
        for s in targets:
            out[s][key] = parse_value(value)
    return out


def _split_list(text: str, what: str, cast=str) -> list:
    try:
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what}: cannot parse {text!r} as a comma-separated list") from None
    if not values:
        raise ConfigError(f"{what}: empty list")
    return values


def _seeds(text: str, what: str = "--seeds") -> list[int]:
    seeds = _split_list(text, what, int)
    if any(s < 0 for s in seeds):
        raise ConfigError(f"{what}: seeds must be non-negative integers, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{what}: a seed is listed twice in {text!r}")
    return seeds


class _OneLineGroup(click.Group):
    """Usage errors (a bad option value, a missing option, an unknown command) as one line, exit 2,
    like every other user error, instead of click's usage block."""

    @staticmethod
    def _one_line(exc: click.UsageError) -> UserError:
        where = exc.ctx.command_path if exc.ctx is not None else "cmcl"
        return UserError(f"{where}: {exc.format_message()} (see {where} --help)")

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise self._one_line(exc) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise self._one_line(exc) from None


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cmcl")
def cli() -> None:
    """Continual multimodal contrastive learning over frozen modality-binding encoders.

    \b
    1. cmcl extract   run a frozen encoder once and cache embeddings (HDF5)
    2. cmcl train     fit one linear learner per modality, step after step, with a strategy
    3. cmcl evaluate  Recall@k, zero-shot accuracy, backward transfer: the paper's Table 2
    Quickstart on the embedded synthetic backbone (no download, no GPU): cmcl reproduce
    """


# ------------------------------------------------------------------------------------- extract
@cli.command()
@click.option("--backbone", default=None,
              help="'synthetic' (simulated binding space, no weights) or a real encoder: imagebind, languagebind, unibind.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path),
              help="Feature-cache root; files go to OUT/<backbone>/<dataset>/<split>.h5.")
@click.option("--dataset", "dataset_list", multiple=True,
              help="Dataset(s) to embed, repeatable or comma-separated (synthetic: default all seven).")
@click.option("--datasets", default=None, hidden=True, help="Alias of --dataset (comma-separated).")
@click.option("--split", default="all", show_default=True, type=click.Choice(["train", "test", "all"]))
@click.option("--data-root", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Folder holding the datasets (docs/datasets.md gives the expected layouts).")
@click.option("--checkpoint", default=None, help="Weights file (imagebind, unibind) or folder (languagebind); "
              "default: $CMCL_<BACKBONE>_CHECKPOINT.")
@click.option("--random-weights", default=None, type=click.Choice(["tiny", "huge", "large"]),
              help="Build the encoder with random weights instead of loading them (smoke tests; shards say so).")
@click.option("--tokenizer", default=None, help="CLIP BPE merges file or tokenizer folder (default: $CMCL_CLIP_BPE "
              "or the checkpoint folder).")
@click.option("--text-checkpoint", default=None, help="languagebind: the text tower to use (recorded in the shard).")
@click.option("--trust-checkpoint-pickle", is_flag=True,
              help="Allow the full unpickler for checkpoints that need it (only for files you trust).")
@click.option("--check-checkpoint", is_flag=True,
              help="Only check that the checkpoint's parameter names and shapes fit the architecture, then exit.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda:LOCAL_RANK when available), cpu, cuda[:N].")
@click.option("--fp16", is_flag=True, help="Run the encoder in float16 (outputs are float32, renormalised).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=0),
              help="Processes decoding and preprocessing media.")
@click.option("--limit", type=click.IntRange(min=1), help="Embed only the first N records of each split (smoke runs).")
@click.option("--max-failures", default=0, show_default=True, type=click.IntRange(min=0),
              help="Bad media files tolerated (listed in <split>.failures.csv) before the run stops.")
@click.option("--num-shards", type=click.IntRange(min=1), help="Split the work into N shard files (job arrays); "
              "under torchrun the rank and world size are used.")
@click.option("--shard", type=click.IntRange(min=0), help="Which shard this process writes (with --num-shards).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where readers put media they derive (ESC-50 WAVs, VGGSound audio) [default: OUT/.media].")
@click.option("--reader-option", "-r", "reader_opts", multiple=True, metavar="KEY=VALUE",
              help="Reader option, repeatable; DATASET.KEY=VALUE scopes it (e.g. -r vggsound_s.manifest=ids.csv).")
@click.option("--verify", "verify_root", type=click.Path(file_okay=False, path_type=Path),
              help="Re-check every shard under this cache root (and, with --data-root, ids against the readers).")
@click.option("--scale", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="synthetic: multiply the paper's split sizes.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="synthetic: generator seed.")
@click.option("--dim", default=1024, show_default=True, type=click.IntRange(min=16),
              help="synthetic: embedding width (ImageBind and UniBind: 1024, LanguageBind: 768).")
@click.option("--overwrite", is_flag=True, help="Replace existing files instead of keeping or resuming them.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or info messages.")
@user_errors
def extract(backbone: str | None, out: Path | None, dataset_list: tuple[str, ...], datasets: str | None, split: str,
            data_root: Path | None, checkpoint: str | None, random_weights: str | None, tokenizer: str | None,
            text_checkpoint: str | None, trust_checkpoint_pickle: bool, check_checkpoint: bool, device: str,
            fp16: bool, batch_size: int, workers: int, limit: int | None, max_failures: int,
            num_shards: int | None, shard: int | None, cache_dir: Path | None, reader_opts: tuple[str, ...],
            verify_root: Path | None, scale: float, seed: int, dim: int, overwrite: bool, quiet: bool) -> None:
    """Run a frozen encoder once and write the feature cache.

    \b
    Synthetic default (no weights, no media):
      cmcl extract --backbone synthetic --out features
    A real encoder on a dataset (resumable; under torchrun every rank writes its own shard):
      cmcl extract --backbone imagebind --checkpoint imagebind_huge.pth \\
                   --dataset esc50 --data-root data --out features
    Check a checkpoint before a long run, or re-check a cache:
      cmcl extract --backbone imagebind --checkpoint imagebind_huge.pth --check-checkpoint
      cmcl extract --verify features
    """
    _setup_logging(quiet)
    names = [n for item in (*dataset_list, *([datasets] if datasets else [])) for n in _split_list(item, "--dataset")]
    if verify_root is not None:
        from cmcl.data.readers import parse_reader_options
        from cmcl.extract.verify import verify

        opts = {d: parse_reader_options(d, reader_opts) for d in names} if reader_opts else None
        report = verify(verify_root, backbone=backbone, datasets=names or None, data_root=data_root,
                        cache_dir=cache_dir, reader_options=opts)
        click.echo(report.format())
        if not report.ok:
            raise UserError(f"{verify_root}: the cache has problems (listed above)")
        return
    if not backbone:
        raise ConfigError("--backbone is required (or --verify FEATURES)")
    if backbone == "synthetic":
        if out is None:
            raise ConfigError("--out is required")
        from cmcl.extract.synthetic import SyntheticConfig, write_synthetic

        paths = write_synthetic(out, SyntheticConfig(dim=dim, scale=scale, seed=seed), datasets=names or None,
                                overwrite=overwrite, progress=not quiet)
        log.info("wrote %d splits under %s", len(paths), out / "synthetic")
        return
    from cmcl.extract.encoders import ENCODERS, check_checkpoint as check_ckpt, load_encoder

    if backbone not in ENCODERS:
        raise ConfigError(f"--backbone {backbone!r} is unknown (available: synthetic, {', '.join(sorted(ENCODERS))})")
    if check_checkpoint:
        report = check_ckpt(backbone, checkpoint, trust_pickle=trust_checkpoint_pickle)
        click.echo(report.summary())
        if not report.ok:
            raise UserError(f"{checkpoint or backbone}: the checkpoint does not fit the {backbone} architecture")
        return
    if out is None or not names or data_root is None:
        raise ConfigError("--out, --dataset and --data-root are required with a real backbone")
    from cmcl.data.catalog import DATASETS
    from cmcl.data.readers import parse_reader_options
    from cmcl.extract.engine import describe, extract as run_extract, local_device

    dev = local_device() if device == "auto" else _device(device)
    for name in names:
        options = {"modalities": DATASETS[name].modalities} if name in DATASETS else {}
        if tokenizer:
            options["tokenizer"] = tokenizer
        if text_checkpoint:
            options["text_checkpoint"] = text_checkpoint
        encoder = load_encoder(backbone, checkpoint=checkpoint, random_weights=random_weights, device=dev, fp16=fp16,
                               trust_pickle=trust_checkpoint_pickle, **options)
        for res in run_extract(encoder, name, split, data_root, out, limit=limit, overwrite=overwrite,
                               max_failures=max_failures, num_shards=num_shards, shard=shard, workers=workers,
                               batch_size=batch_size, cache_dir=cache_dir,
                               reader_options=parse_reader_options(name, reader_opts), progress=not quiet):
            click.echo(describe(res))


# ------------------------------------------------------------------------------------- train
def _expand(strategies: list[str]) -> list[str]:
    from cmcl.train.strategies import all_strategies

    if strategies == ["all"]:
        return all_strategies()
    if "all" in strategies:
        raise ConfigError("--strategy all cannot be combined with other strategies")
    return strategies


def _train(features: Path, backbone: str, strategies: list[str], seeds: list[int], runs: Path, protocol: str,
           overrides: dict[str, dict[str, Any]], label: str | None, resume: bool, overwrite: bool, device: str,
           quiet: bool, keep_states: str, **settings: Any) -> list[Path]:
    from cmcl.data.protocol import load_protocol
    from cmcl.train.config import TrainConfig, make_label
    from cmcl.train.strategies import resolve_params
    from cmcl.train.trainer import plan_run, train_run

    if label and len(strategies) > 1:
        raise ConfigError("--label names one run series; use it with a single --strategy")
    proto = load_protocol(protocol)
    device = _device(device)
    # Every run is validated (options, strategy parameters, protocol, feature files) before any is
    # started, so a bad value never leaves a run folder behind.
    plans, data = [], None
    for name in strategies:
        resolved = resolve_params(name, overrides[name], backbone)
        for seed in seeds:
            cfg = TrainConfig(features=str(features), backbone=backbone, strategy=name, params=resolved,
                              label=label or make_label(name, overrides[name]), seed=seed, protocol=protocol,
                              protocol_sha256=proto.sha256, device=device, **settings)
            plans.append(plan_run(cfg, data))
            data = plans[-1].data
    done = []
    for plan in plans:
        cfg = plan.cfg
        log.info("training %s seed %d on %s/%s (%d steps, device %s)", cfg.label, cfg.seed, features, backbone,
                 len(proto), device)
        done.append(train_run(plan, runs, resume=resume, overwrite=overwrite, keep_states=keep_states,
                              progress=not quiet))
    return done


def train_options(fn):
    """Options shared by ``train`` and ``reproduce``."""
    options = [
        click.option("--protocol", default="paper11", show_default=True,
                     help="Shipped protocol name or path to a protocol TOML file."),
        click.option("--epochs", default=5, show_default=True, type=click.IntRange(min=1), help="Epochs per step."),
        click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=2)),
        click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True), help="Learning rate [default: 1e-4; reference harness: 1e-3 for languagebind]."),
        click.option("--weight-decay", default=1e-3, show_default=True, type=click.FloatRange(min=0),
                     help="AdamW decoupled weight decay."),
        click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                     help="InfoNCE temperature."),
        click.option("--loss", default="a2b", show_default=True, type=click.Choice(["a2b", "symmetric"]),
                     help="a2b: rows are the step's first modality (the authors'); symmetric: both directions."),
        click.option("--harness", default="paper", show_default=True, type=click.Choice(["paper", "reference"]),
                     help="paper: constant lr, no clipping. reference: the authors' HF Trainer (linear decay, "
                          "clip 1.0, no bias decay, lr 1e-3 for languagebind)."),
        click.option("--optimizer", default="adamw", show_default=True, type=click.Choice(["adamw", "sgd"]),
                     help="adamw (the paper's) or sgd (plain gradient descent, the setting of DNS's guarantee)."),
        click.option("--recall-protocol", default="paper", show_default=True, type=click.Choice(["paper", "full"]),
                     help="paper: mean over 5 seeded pools of 1000 test pairs; full: the whole test split."),
        click.option("-p", "params", multiple=True, metavar="KEY=VALUE",
                     help="Strategy hyperparameter, repeatable; 'strategy.key=value' scopes it (see cmcl list strategies)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--keep-states", default="last", show_default=True, type=click.Choice(["last", "all"]),
                     help="Keep the strategy state of the last finished step only, or of every step."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars or info messages."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


@cli.command()
@click.option("--features", required=True, type=click.Path(file_okay=False, path_type=Path), help="Feature-cache root.")
@click.option("--backbone", required=True, help="Backbone folder in the cache (any name).")
@click.option("--strategy", "strategies", multiple=True, default=("dns",), show_default=True,
              help="Strategy to run, repeatable, or 'all' for every registered one in the paper's order.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds, one run each.")
@click.option("--runs", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Runs root; a run goes to RUNS/<backbone>/<label>/seed-<seed>/.")
@click.option("--label", default=None, help="Run label in Table 2 [default: strategy name, plus any -p overrides].")
@click.option("--resume", is_flag=True, help="Continue existing runs from their last finished step.")
@click.option("--overwrite", is_flag=True, help="Delete existing runs first.")
@train_options
@user_errors
def train(features: Path, backbone: str, strategies: tuple[str, ...], seeds: str, runs: Path, label: str | None,
          resume: bool, overwrite: bool, protocol: str, params: tuple[str, ...], device: str, quiet: bool,
          keep_states: str, **settings: Any) -> None:
    """Train one linear learner per modality over a protocol, step after step.

    Each step writes a checkpoint (learners, strategy state) and one row of the evaluation
    matrices; a killed run continues with --resume and ends with the same numbers.
    """
    _setup_logging(quiet)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    names = _expand([s for item in strategies for s in _split_list(item, "--strategy")])
    _train(features, backbone, names, _seeds(seeds), runs, protocol,
           parse_params(params, names), label, resume, overwrite, device, quiet, keep_states, **settings)


# ------------------------------------------------------------------------------------- evaluate
@cli.command()
@click.option("--runs", required=True, type=click.Path(file_okay=False, path_type=Path), help="Runs root.")
@click.option("--report", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Table 2 CSV to write; results.csv and <stem>_heatmaps/ go beside it.")
@click.option("--recall-protocol", default="paper", show_default=True, type=click.Choice(["paper", "full"]),
              help="Runs evaluated otherwise are re-scored from their checkpoints.")
@click.option("--features", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Feature cache for re-scoring [default: the one each run was trained on].")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-plots", is_flag=True, help="Skip the heatmap PNGs.")
@click.option("--quiet", "-q", is_flag=True)
@user_errors
def evaluate(runs: Path, report: Path, recall_protocol: str, features: Path | None, device: str, no_plots: bool,
             quiet: bool) -> None:
    """Score runs (Recall@1/5/10, zero-shot Acc, BWT) and write the paper's Table 2."""
    _setup_logging(quiet)
    from cmcl.evaluate.runs import evaluate_runs

    rep = evaluate_runs(runs, report, recall_protocol=recall_protocol, device=_device(device),
                        features=str(features) if features else None, plots=not no_plots)
    click.echo(rep.text)
    for s in rep.skipped:
        log.warning("skipped incomplete run: %s", s)
    log.info("wrote %s", ", ".join(str(f) for f in rep.files[:2])
             + (f" and {len(rep.files) - 2} heatmaps" if len(rep.files) > 2 else ""))


# ------------------------------------------------------------------------------------- info / list
@cli.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@user_errors
def info(path: Path) -> None:
    """Describe a shard file, a feature-cache folder or a run directory."""
    from cmcl.data.features import FeatureShard, list_cache
    from cmcl.train import checkpoint as ckpt

    if path.is_file():
        with FeatureShard(path) as shard:
            m = shard.meta
            click.echo(f"{path}\n  schema cmcl.features/1  backbone {m.backbone}  dataset {m.dataset}  split {m.split}")
            click.echo(f"  rows {len(shard)}  dim {m.dim}  modalities {', '.join(m.modalities)}  normalized {m.normalized}")
            cls = shard.classes()
            click.echo(f"  classes {len(cls[0]) if cls else 0}  text {'yes' if shard.text is not None else 'no'}  "
                       f"checkpoint {m.checkpoint or '-'}  created {m.created_utc}  cmcl {m.cmcl_version}")
            for k, v in sorted(m.extra.items()):
                click.echo(f"  {k}: {str(v)[:120]}")
            shard.check()
            click.echo("  check: ok")
        return
    if (path / "config.json").is_file():
        header = ckpt.read_json(path / "config.json")
        cfg = header["config"]
        steps = header["protocol"]["steps"]
        done = ckpt.finished_steps(path)
        last = done[-1] if done else 0
        click.echo(f"{path}\n  {cfg['label'] or cfg['strategy']} seed {cfg['seed']} on {cfg['backbone']} "
                   f"({cfg['features']}), protocol {cfg['protocol']}: {last}/{len(steps)} steps finished")
        click.echo(f"  params {json.dumps(cfg['params'])}  harness {cfg['harness']}  cmcl {header['cmcl_version']} "
                   f"git {header['git_sha'][:10] or '-'}")
        if (path / "summary.json").is_file():
            s = ckpt.read_json(path / "summary.json")
            click.echo("  " + "  ".join(f"{k} {v:.2f}" for k, v in s.items()))
        return
    entries = list_cache(path)
    runs = sorted(p.parent for p in path.rglob("config.json"))
    if not entries and not runs:
        raise ConfigError(f"{path}: neither a feature shard, a cache folder nor a run folder")
    for e in entries:
        rows = 0
        dims = set()
        for f in e.files:
            with FeatureShard(f) as shard:
                rows += len(shard)
                dims.add(shard.meta.dim)
                mods = shard.meta.modalities
        click.echo(f"{e.backbone}/{e.dataset}/{e.split}: {rows} rows, dim {','.join(map(str, dims))}, "
                   f"{', '.join(mods)}" + (f" ({len(e.files)} shards)" if len(e.files) > 1 else ""))
    for run in runs:
        done = ckpt.finished_steps(run)
        click.echo(f"run {run.relative_to(path)}: {done[-1] if done else 0} steps finished")


@cli.command("list")
@click.argument("what", type=click.Choice(["strategies", "protocols", "backbones"]))
def list_(what: str) -> None:
    """List registered strategies (with their parameters), shipped protocols or backbones."""
    if what == "strategies":
        from cmcl.train.strategies import STRATEGIES, all_strategies, strategy_parameters

        for name in all_strategies():
            params = ", ".join(f"{k}={v!r}" for k, v in strategy_parameters(name).items()) or "no parameters"
            doc = (STRATEGIES[name].__doc__ or "").strip().splitlines()[0]
            click.echo(f"{name:10s} {doc}\n{'':10s} {params}")
    elif what == "protocols":
        from cmcl.data.protocol import load_protocol, shipped_protocols

        for name in shipped_protocols():
            p = load_protocol(name)
            click.echo(f"{name}: {len(p)} steps: " + ", ".join(s.key for s in p.steps))
    else:
        from cmcl.extract.encoders import ENCODERS

        click.echo("synthetic (embedded default, no weights)")
        for name in sorted(ENCODERS):
            click.echo(name)


# ------------------------------------------------------------------------------------- reproduce
@cli.command()
@click.option("--out", "out", default=Path("cmcl-quickstart"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Folder for features, runs and the report.")
@click.option("--scale", default=0.2, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Synthetic dataset size relative to the paper's.")
@click.option("--dim", default=256, show_default=True, type=click.IntRange(min=64), help="Synthetic embedding width.")
@click.option("--data-seed", default=0, show_default=True, type=click.IntRange(min=0), help="Synthetic generator seed.")
@click.option("--strategy", "strategies", multiple=True, default=("vanilla", "dns"), show_default=True,
              help="Strategies to compare (repeatable, or 'all').")
@click.option("--seeds", default="0,1,2", show_default=True, help="Training seeds (trials).")
@train_options
@user_errors
def reproduce(out: Path, scale: float, dim: int, data_seed: int, strategies: tuple[str, ...], seeds: str,
              protocol: str, params: tuple[str, ...], device: str, quiet: bool, keep_states: str,
              **settings: Any) -> None:
    """Quickstart: extract the synthetic cache, train the strategies over the 11-step protocol, write Table 2.

    Everything goes under OUT: features/, runs/, table2.csv, results.csv and heatmaps. Finished
    runs are kept and interrupted ones resume, so re-running the command continues where it stopped.
    """
    _setup_logging(quiet)
    from cmcl.evaluate.runs import evaluate_runs
    from cmcl.extract.synthetic import SyntheticConfig, write_synthetic
    from cmcl.train import checkpoint as ckpt
    from cmcl.train.config import make_label

    features = out / "features"
    write_synthetic(features, SyntheticConfig(dim=dim, scale=scale, seed=data_seed), progress=not quiet)
    names = _expand([s for item in strategies for s in _split_list(item, "--strategy")])
    overrides = parse_params(params, names)
    for name in names:
        for seed in _seeds(seeds):
            run = ckpt.run_dir(out / "runs", "synthetic", make_label(name, overrides[name]), seed)
            if (run / "results.csv").is_file():
                log.info("%s: already complete", run)
                continue
            _train(features, "synthetic", [name], [seed], out / "runs", protocol, overrides, None,
                   (run / "config.json").is_file(), False, device, quiet, keep_states, **settings)
    rep = evaluate_runs(out / "runs", out / "table2.csv", recall_protocol=settings["recall_protocol"])
    click.echo(rep.text)
    log.info("Table 2: %s (long format: %s; heatmaps: %s)", out / "table2.csv", out / "results.csv",
             out / "table2_heatmaps")


def main() -> None:
    """Entry point of the ``cmcl`` command."""
    cli(prog_name="cmcl")


if __name__ == "__main__":
    main()
