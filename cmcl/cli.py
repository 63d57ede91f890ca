"""The ``cmcl`` command line: parsing only; each command calls one library function.

Commands: ``extract`` (write the feature cache), ``train`` (run strategies over a protocol),
``evaluate`` (Table 2 from runs), ``info`` (describe a shard, cache or run), ``list`` (strategies,
protocols, backbones) and ``reproduce`` (the quickstart: all three on the synthetic default);
``import`` (a split from embeddings computed elsewhere), ``export`` (a run's learners as a plain
adapter) and ``index build`` / ``index search`` (retrieval in a run's adapted space).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from pathlib import Path
from typing import Any

import click

from cmcl import __version__
from cmcl.errors import CMCLError, ConfigError
from cmcl.keyvalue import parse_value, split_assignment

log = logging.getLogger("cmcl")


class UserError(click.ClickException):
    """A one-line error for the user; exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"cmcl: error: {self.format_message()}", err=True)


class _SweepError(click.ClickException):
    """Some runs of a sweep failed (listed); exit status 2 (the user's) or 1 (a bug)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

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


def _job_device(name: str, gpus: int) -> str:
    """The device of a submitted job: checked for form only (the submitting machine may have no GPU)."""
    if name == "auto":
        return "cuda" if gpus else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def parse_params(items: tuple[str, ...], strategies: list[str]) -> dict[str, dict[str, Any]]:
    """Split ``-p key=value`` / ``-p strategy.key=value`` into per-strategy overrides.

    An unscoped key applies to every selected strategy that accepts it; a key no selected strategy
    accepts is an error (naming the accepted parameters).
    """
    from cmcl.train.strategies import strategy_parameters

    out: dict[str, dict[str, Any]] = {s: {} for s in strategies}
    for item in items:
        try:
            scope, key, value = split_assignment(item)
        except ValueError:
            raise ConfigError(f"-p {item!r}: expected key=value (or strategy.key=value)") from None
        if scope and scope not in out:
            raise ConfigError(f"-p {item!r}: strategy {scope!r} is not selected (selected: {', '.join(strategies)})")
        targets = [scope] if scope else [s for s in strategies if key in strategy_parameters(s)]
        if not targets or (scope and key not in strategy_parameters(scope)):
            accepted = {s: sorted(strategy_parameters(s)) for s in ([scope] if scope else strategies)}
            raise ConfigError(f"-p {item!r}: unknown parameter {key!r}; accepted: "
                              + "; ".join(f"{s}: {', '.join(p) or 'none'}" for s, p in accepted.items()))
        for s in targets:
            out[s][key] = parse_value(value)
    return out


def parse_grid(items: tuple[str, ...], strategies: list[str],
               fixed: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, list[Any]]]:
    """Split ``--grid key=v1,v2`` / ``--grid strategy.key=v1,v2`` into per-strategy value lists.

    Scoped like ``-p`` (same parser, same checks): an unscoped key applies to every selected
    strategy that accepts it. A key given twice, a repeated value, or a key also fixed by ``-p`` is
    an error.
    """
    out: dict[str, dict[str, list[Any]]] = {s: {} for s in strategies}
    for item in items:
        try:
            scope, key, text = split_assignment(item)
        except ValueError:
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,... (or strategy.key=v1,v2,...)") from None
        values = [parse_value(v) for v in _split_list(text, f"--grid {item!r}")]
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"--grid {item!r}: a value is listed twice")
        # the -p checks (scope selected, parameter known), on one value
        targets = [s for s, p in parse_params((f"{scope}.{key}={text.split(',')[0]}" if scope else
                                                f"{key}={text.split(',')[0]}",), strategies).items() if p]
        for s in targets:
            if key in out[s]:
                raise ConfigError(f"--grid {item!r}: {s}.{key} is already on the grid")
            if fixed and key in fixed.get(s, {}):
                raise ConfigError(f"--grid {item!r}: {s}.{key} is also fixed with -p")
            out[s][key] = values
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
def extract(backbone: str | None, out: Path | None, dataset_list: tuple[str, ...], split: str,
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
    names = [n for item in dataset_list for n in _split_list(item, "--dataset")]
    if verify_root is not None:
        return _verify(verify_root, backbone, names, data_root, cache_dir, reader_opts)
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
    from cmcl.extract.encoders import ENCODERS

    if backbone not in ENCODERS:
        raise ConfigError(f"--backbone {backbone!r} is unknown (available: synthetic, {', '.join(sorted(ENCODERS))})")
    if check_checkpoint:
        return _check_checkpoint(backbone, checkpoint, trust_checkpoint_pickle)
    if out is None or not names or data_root is None:
        raise ConfigError("--out, --dataset and --data-root are required with a real backbone")
    _extract_real(backbone, names, split, data_root, out, checkpoint=checkpoint, random_weights=random_weights,
                  tokenizer=tokenizer, text_checkpoint=text_checkpoint, trust_pickle=trust_checkpoint_pickle,
                  device=device, fp16=fp16, batch_size=batch_size, workers=workers, limit=limit,
                  max_failures=max_failures, num_shards=num_shards, shard=shard, cache_dir=cache_dir,
                  reader_opts=reader_opts, overwrite=overwrite, progress=not quiet)


def _verify(root: Path, backbone: str | None, names: list[str], data_root: Path | None, cache_dir: Path | None,
            reader_opts: tuple[str, ...]) -> None:
    """``extract --verify``: re-check every shard of a cache (and ids against the readers)."""
    from cmcl.data.readers import parse_reader_options
    from cmcl.extract.verify import verify

    opts = {d: parse_reader_options(d, reader_opts) for d in names} if reader_opts else None
    report = verify(root, backbone=backbone, datasets=names or None, data_root=data_root, cache_dir=cache_dir,
                    reader_options=opts)
    click.echo(report.format())
    if not report.ok:
        raise UserError(f"{root}: the cache has problems (listed above)")


def _check_checkpoint(backbone: str, checkpoint: str | None, trust_pickle: bool) -> None:
    """``extract --check-checkpoint``: do the checkpoint's names and shapes fit the architecture?"""
    from cmcl.extract.encoders import check_checkpoint

    report = check_checkpoint(backbone, checkpoint, trust_pickle=trust_pickle)
    click.echo(report.summary())
    if not report.ok:
        raise UserError(f"{checkpoint or backbone}: the checkpoint does not fit the {backbone} architecture")


def _extract_real(backbone: str, names: list[str], split: str, data_root: Path, out: Path, *, checkpoint, random_weights,
                  tokenizer, text_checkpoint, trust_pickle, device, fp16, reader_opts, progress, **engine) -> None:
    """Embed datasets with a real encoder through the resumable engine."""
    from cmcl.data.readers import READERS, parse_reader_options
    from cmcl.extract.encoders import load_encoder
    from cmcl.extract.engine import describe, extract as run_extract, local_device

    dev = local_device() if device == "auto" else _device(device)
    for name in names:
        options = {"modalities": READERS[name].modalities} if name in READERS else {}
        if tokenizer:
            options["tokenizer"] = tokenizer
        if text_checkpoint:
            options["text_checkpoint"] = text_checkpoint
        encoder = load_encoder(backbone, checkpoint=checkpoint, random_weights=random_weights, device=dev, fp16=fp16,
                               trust_pickle=trust_pickle, **options)
        for res in run_extract(encoder, name, split, data_root, out, reader_options=parse_reader_options(name, reader_opts),
                               progress=progress, **engine):
            click.echo(describe(res))


# ------------------------------------------------------------------------------------- train
def _expand(strategies: list[str]) -> list[str]:
    from cmcl.train.strategies import all_strategies

    if strategies == ["all"]:
        return all_strategies()
    if "all" in strategies:
        raise ConfigError("--strategy all cannot be combined with other strategies")
    return strategies


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
@click.option("--resume", is_flag=True, help="Continue existing runs from their last finished step; with a --protocol that "
              "appends steps to the run's, train only the new steps.")
@click.option("--overwrite", is_flag=True, help="Delete existing runs first.")
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2,...",
              help="Strategy hyperparameter grid, repeatable, scoped like -p (e.g. --grid dns.lambda_min=0,0.1,0.01,0.001): "
                   "one run series per combination, labelled by its values.")
@click.option("--jobs", "-j", default=1, show_default=True, type=click.IntRange(min=1),
              help="Train the runs in N worker processes; a failed run does not stop the others.")
@click.option("--log", "loggers", multiple=True, type=click.Choice(["tensorboard", "wandb"]),
              help="Also send every step's records to TensorBoard (RUN/tensorboard/) or W&B (offline in RUN/wandb/ "
                   "unless WANDB_MODE=online); repeatable. Extras: cmcl[tensorboard], cmcl[wandb].")
@click.option("--launcher", default=None, type=click.Choice(["slurm", "local"]),
              help="Submit one job per run (a job array) through submitit instead of training here: slurm, or local "
                   "(submitit's local executor). Job ids go to RUNS/.jobs/; see cmcl status RUNS. Extra: cmcl[slurm].")
@click.option("--slurm-partition", default=None, help="SLURM partition of the jobs.")
@click.option("--slurm-time", default=60, show_default=True, type=click.IntRange(min=1), help="Minutes per job.")
@click.option("--slurm-gpus", default=0, show_default=True, type=click.IntRange(min=0), help="GPUs per job.")
@click.option("--slurm-cpus", default=1, show_default=True, type=click.IntRange(min=1),
              help="CPUs per job (its torch threads).")
@click.option("--slurm-mem", default=None, type=click.FloatRange(min=0, min_open=True), help="GB of memory per job.")
@click.option("--slurm-account", default=None, help="SLURM account to charge.")
@click.option("--slurm-array-parallelism", default=256, show_default=True, type=click.IntRange(min=1),
              help="Jobs of the array running at once.")
@click.option("--wait", is_flag=True, help="With --launcher: wait for the jobs to end and report failures.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="Torch threads per run [default: the cores divided between the jobs]. CPU numbers depend on it: "
                   "--jobs N --threads T equals --jobs 1 --threads T bit for bit.")
@train_options
@user_errors
def train(features: Path, backbone: str, strategies: tuple[str, ...], seeds: str, runs: Path, label: str | None,
          resume: bool, overwrite: bool, grid: tuple[str, ...], jobs: int, loggers: tuple[str, ...],
          launcher: str | None, slurm_partition: str | None, slurm_time: int, slurm_gpus: int, slurm_cpus: int,
          slurm_mem: float | None, slurm_account: str | None, slurm_array_parallelism: int, wait: bool,
          threads: int | None, protocol: str,
          params: tuple[str, ...], device: str, quiet: bool, keep_states: str, **settings: Any) -> None:
    """Train one linear learner per modality over a protocol, step after step.

    Each step writes a checkpoint (learners, strategy state) and one row of the evaluation
    matrices; a killed run continues with --resume and ends with the same numbers.
    """
    _setup_logging(quiet)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    names = _expand([s for item in strategies for s in _split_list(item, "--strategy")])
    from cmcl.pipeline import train_runs
    from cmcl.sweep import SweepFailed

    fixed = parse_params(params, names)
    cluster = None
    if launcher:
        from cmcl.launch import ClusterOptions

        if overwrite:
            raise ConfigError("--launcher submits resumable jobs; remove old runs yourself instead of --overwrite")
        cluster = ClusterOptions(slurm_partition, slurm_time, slurm_gpus, slurm_cpus, slurm_mem,
                                 slurm_array_parallelism, slurm_account)
    try:
        train_runs(features, backbone, names, _seeds(seeds), runs, protocol, fixed, label=label, resume=resume,
                   overwrite=overwrite, device=_job_device(device, slurm_gpus) if launcher else _device(device),
                   progress=not quiet and jobs == 1,
                   keep_states=keep_states, grid=parse_grid(grid, names, fixed), jobs=jobs, threads=threads,
                   log=loggers, launcher=launcher, cluster=cluster, wait=wait, **settings)
    except SweepFailed as exc:
        raise _SweepError(str(exc), exc.exit_code) from None


# ------------------------------------------------------------------------------------- evaluate
@cli.command()
@click.option("--runs", required=True, type=click.Path(file_okay=False, path_type=Path), help="Runs root.")
@click.option("--report", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Table 2 CSV to write; results.csv and <stem>_heatmaps/ go beside it.")
@click.option("--recall-protocol", default="paper", show_default=True, type=click.Choice(["paper", "full"]),
              help="Runs evaluated otherwise are re-scored from their checkpoints.")
@click.option("--features", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Feature cache for re-scoring [default: the one each run was trained on].")
@click.option("--rescore", is_flag=True, help="Re-score every run from its checkpoints with this version's "
              "evaluator instead of reading its stored rows (run folders are not changed).")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-plots", is_flag=True, help="Skip the heatmap PNGs.")
@click.option("--figures", is_flag=True, help="Also write the paper's Fig. 3a/3b per strategy, Table 3 (seconds per "
              "step) and a score-against-BWT comparison into <stem>_figures/ (PNG and CSV each).")
@click.option("--quiet", "-q", is_flag=True)
@user_errors
def evaluate(runs: Path, report: Path, recall_protocol: str, features: Path | None, rescore: bool, device: str,
             no_plots: bool, figures: bool, quiet: bool) -> None:
    """Score runs (Recall@1/5/10, zero-shot Acc, BWT) and write the paper's Table 2."""
    _setup_logging(quiet)
    from cmcl.pipeline import report as make_report

    rep = make_report(runs, report, recall_protocol=recall_protocol, device=_device(device),
                      features=str(features) if features else None, plots=not no_plots, figures=figures,
                      rescore=rescore)
    click.echo(rep.text)
    if rep.table3 is not None and not rep.table3.empty:
        from cmcl.evaluate.figures import format_table3

        click.echo("\nTable 3: seconds per training step, mean ± std (the strategy's own per-step work)")
        click.echo(format_table3(rep.table3))
    for s in rep.skipped:
        log.warning("skipped incomplete run: %s", s)
    log.info("wrote %s", ", ".join(str(f) for f in rep.files[:2])
             + (f" and {len(rep.files) - 2} heatmaps" if len(rep.files) > 2 else ""))


@cli.command()
@click.argument("runs", type=click.Path(file_okay=False, path_type=Path))
@user_errors
def status(runs: Path) -> None:
    """Which runs under RUNS are finished, running, failed or missing (submitted jobs and run folders)."""
    from cmcl.launch import format_status, status as run_status

    click.echo(format_status(run_status(runs)))


# ------------------------------------------------------------------------------------- info / list
@cli.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@user_errors
def info(path: Path) -> None:
    """Describe a shard file, a feature-cache folder or a run directory."""
    from cmcl.data.features import describe_cache, describe_shard
    from cmcl.data.runs import describe_run, find_runs, finished_steps

    if path.is_file():
        click.echo(describe_shard(path))
    elif (path / "config.json").is_file():
        click.echo(describe_run(path))
    else:
        lines = describe_cache(path)
        lines += [f"run {run.relative_to(path)}: {(finished_steps(run) or [0])[-1]} steps finished"
                  for run in find_runs(path)]
        if not lines:
            raise ConfigError(f"{path}: neither a feature shard, a cache folder nor a run folder")
        click.echo("\n".join(lines))


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
    from cmcl.data.runs import run_dir
    from cmcl.extract.synthetic import SyntheticConfig, write_synthetic
    from cmcl.pipeline import report as make_report, train_runs
    from cmcl.train.config import make_label

    features = out / "features"
    write_synthetic(features, SyntheticConfig(dim=dim, scale=scale, seed=data_seed), progress=not quiet)
    names = _expand([s for item in strategies for s in _split_list(item, "--strategy")])
    overrides = parse_params(params, names)
    for name in names:
        for seed in _seeds(seeds):
            run = run_dir(out / "runs", "synthetic", make_label(name, overrides[name]), seed)
            if (run / "results.csv").is_file():
                log.info("%s: already complete", run)
                continue
            train_runs(features, "synthetic", [name], [seed], out / "runs", protocol, overrides,
                       resume=(run / "config.json").is_file(), device=_device(device), progress=not quiet,
                       keep_states=keep_states, **settings)
    rep = make_report(out / "runs", out / "table2.csv", recall_protocol=settings["recall_protocol"])
    click.echo(rep.text)
    log.info("Table 2: %s (long format: %s; heatmaps: %s)", out / "table2.csv", out / "results.csv",
             out / "table2_heatmaps")


# ------------------------------------------------------------------ import / export / index (issue 12)
def _assignments(items: tuple[str, ...], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"{option} {item!r}: expected MODALITY=FILE")
        if key in out:
            raise ConfigError(f"{option} {key}: given twice")
        out[key] = value
    return out


@cli.command("import")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Feature-cache root.")
@click.option("--backbone", required=True, help="Backbone folder to write under (the encoder that made the embeddings).")
@click.option("--dataset", required=True, help="Dataset name.")
@click.option("--split", required=True, help="Split name (train, test, ...).")
@click.option("--emb", "emb", multiple=True, required=True, metavar="MODALITY=FILE",
              help="Embeddings of one modality (.npy, .npz, .safetensors, .parquet), one row per sample; repeatable.")
@click.option("--ids", type=click.Path(dir_okay=False, path_type=Path), help="Text file, one id per line [default: row numbers].")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), help="Integer class per row (.npy; -1: none).")
@click.option("--class-names", type=click.Path(dir_okay=False, path_type=Path), help="Text file, one class name per line.")
@click.option("--class-emb", "class_emb", multiple=True, metavar="MODALITY=FILE",
              help="Prototypes of the class names (text: the zero-shot ones), one row per class.")
@click.option("--normalize", is_flag=True, help="L2-normalise rows (default: require normalised rows).")
@click.option("--overwrite", is_flag=True, help="Replace an existing split.")
@user_errors
def import_(out: Path, backbone: str, dataset: str, split: str, emb: tuple[str, ...], ids: Path | None,
            labels: Path | None, class_names: Path | None, class_emb: tuple[str, ...], normalize: bool,
            overwrite: bool) -> None:
    """Write a feature-cache split from embeddings another tool computed."""
    from cmcl.data.importer import import_embeddings

    path = import_embeddings(out, backbone, dataset, split, _assignments(emb, "--emb"), ids=ids, labels=labels,
                             class_names=class_names, class_emb=_assignments(class_emb, "--class-emb"),
                             normalize=normalize, overwrite=overwrite)
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--step", type=click.IntRange(min=1), default=None, help="Finished step to export [default: the last].")
@user_errors
def export(run_dir: Path, out: Path, step: int | None) -> None:
    """Write a run's learners as OUT/learners.safetensors and OUT/adapter.json (usable without cmcl)."""
    from cmcl.api import export_run

    click.echo(f"wrote {export_run(run_dir, out, step)}")


@cli.group(cls=_OneLineGroup)
def index() -> None:
    """Retrieval in a run's adapted space: build a FAISS index, search it."""


def _split_options(fn):
    options = [
        click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Run folder whose learners map the embeddings."),
        click.option("--features", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Feature-cache root (the run's backbone is read from it)."),
        click.option("--dataset", required=True),
        click.option("--split", required=True),
        click.option("--modality", required=True),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


@index.command("build")
@_split_options
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Index folder to write.")
@click.option("--kind", default="flat", show_default=True, type=click.Choice(["flat", "hnsw", "ivf"]),
              help="flat: exact search; hnsw or ivf: approximate, for large collections.")
@click.option("--step", type=click.IntRange(min=1), default=None, help="Finished step [default: the last].")
@click.option("--nlist", type=click.IntRange(min=1), default=None, help="ivf: cells [default: sqrt(N)].")
@user_errors
def index_build(run_dir: Path, features: Path, dataset: str, split: str, modality: str, out: Path, kind: str,
                step: int | None, nlist: int | None) -> None:
    """Index a split's MODALITY rows through the run's learner."""
    from cmcl.api import build_index

    click.echo(f"wrote {build_index(run_dir, features, dataset, split, modality, out, kind=kind, step=step, nlist=nlist)}")


@index.command("search")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_split_options
@click.option("--k", default=10, show_default=True, type=click.IntRange(min=1), help="Hits per query.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="hits CSV to write.")
@user_errors
def index_search(index_dir: Path, run_dir: Path, features: Path, dataset: str, split: str, modality: str, k: int,
                 out: Path) -> None:
    """Query INDEX_DIR with a split's MODALITY rows through the same run; writes query_id, rank, hit_id, score."""
    from cmcl.api import search_index, write_hits

    hits = search_index(index_dir, run_dir, features, dataset, split, modality, k=k)
    click.echo(f"wrote {write_hits(hits, out)} ({hits['query_id'].nunique()} queries x {k} hits)")


def main() -> None:
    """Entry point of the ``cmcl`` command."""
    cli(prog_name="cmcl")


if __name__ == "__main__":
    main()
