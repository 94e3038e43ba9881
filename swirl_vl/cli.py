"""``python -m swirl_vl {fit,validate,test,predict}``: LightningCLI with the SWIRL schedule as a group."""

from __future__ import annotations

import importlib
import logging
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

from swirl_vl.predict import PredictionWriter
from swirl_vl.training.progress import use_stage_progress_bar
from swirl_vl.training.schedule import SwirlSchedule
from swirl_vl.training.swirl import SwirlModule

DESCRIPTION = (
    "SWIRL (self-improving world modelling with latent actions) on PyTorch Lightning: a forward world model (FWM) and "
    "an inverse dynamics model (IDM) are warm-started on labelled pairs (SFT), then trained in turns by GRPO on "
    "state-only pairs, each rewarded by the other, frozen model: Phase I trains the FWM, Phase II the IDM. Start from "
    "a config and override any key: swirl_vl fit --config configs/sprites.yaml --schedule.iterations 3. "
    "swirl_vl fit --help lists the schedule's arguments (--schedule.*) with Lightning's; "
    "swirl_vl fit --model.help swirl_vl.training.SwirlModule lists the SWIRL module's (group sizes, KL weights, "
    "learning rates, LoRA), and swirl_vl fit --data.help datamodules.trajectory.SpriteDataModule the data's."
)
MODEL_HELP = "--model.help swirl_vl.training.SwirlModule"
DATA_HELP = "--data.help datamodules.trajectory.SpriteDataModule"

CHECKPOINT_FIX = (
    "pass a checkpoint that fit wrote whole (RUN/checkpoints/last.ckpt, or another .ckpt of the run; copy it again if "
    "it was copied), or leave out --ckpt_path and point the config's model paths at save_pretrained folders "
    "(RUN/pretrained/...)"
)


class SwirlCLI(LightningCLI):
    """Adds ``--schedule.*`` (the ``SwirlSchedule`` callback) to Lightning's own arguments, and to ``predict`` the
    ``--predictions.*`` of the ``PredictionWriter`` that writes its outputs."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(SwirlSchedule, "schedule")
        # Lightning's base classes head these groups with their class name or the first line of their docstring.
        parser.groups["model"].title = f"The LightningModule to run, by class_path ({MODEL_HELP} lists its arguments)"
        parser.groups["data"].title = f"The DataModule, by class_path ({DATA_HELP} lists its arguments)"

    @override
    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        # The one place LightningCLI builds a single subcommand's parser: the writer is an argument of predict alone.
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_lightning_class_args(PredictionWriter, "predictions")
            # The writer writes each batch out; kept in memory too, a large split's images would fill it.
            parser.set_defaults(return_predictions=False)
        return parser

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # Before Lightning reads --ckpt_path's hyperparameters, and before any model loads.
        if not isinstance(args, (dict, Namespace)):
            argv = sys.argv[1:] if args is None else list(args)
            files = config_files(argv)
            for path in files:
                if (problem := yaml_problem(path)) is not None:
                    raise SystemExit(f"swirl_vl: {problem}")
            if (refused := optimizer_argument(argv, files)) is not None:
                raise SystemExit(f"swirl_vl: {refused} {OPTIMIZER_FIX}")
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and (problem := checkpoint_problem(str(ckpt_path))) is not None:
            raise SystemExit(f"swirl_vl {subcommand}: {problem}; nothing was run.\nFix: {CHECKPOINT_FIX}.")

    @override
    def before_instantiate_classes(self) -> None:
        # Settings no run can use, before any model loads (SwirlModule's own checks come after its two models have).
        config = self.config[self.subcommand] if self.subcommand else self.config
        if problems := setting_problems(config):
            raise SystemExit("\n".join(f"swirl_vl {self.subcommand}: {p}; nothing was run." for p in problems))
        if self.subcommand in ("validate", "test") and (run := checkpoint_run(config)) is not None:
            config.trainer.logger.init_args.update(Namespace(**run))  # log into the run that wrote the checkpoint
            # Beside the config that fit saved there, not over it.
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"{self.subcommand}_config.yaml"}

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_stage_progress_bar(trainer)
        return trainer

    @override
    def instantiate_classes(self) -> None:
        # Before any model loads (minutes for real checkpoints): every missing folder and shard split, at once.
        config = self.config[self.subcommand] if self.subcommand else self.config
        missing = list(dict.fromkeys(missing_inputs(config, self.subcommand or "")))  # FWM and IDM may share a folder
        if missing:
            raise SystemExit(
                f"swirl_vl {self.subcommand or ''}: missing inputs, nothing was run:\n"
                + "\n".join(f"  - {m}" for m in missing)
            )
        super().instantiate_classes()


OPTIMIZER_FIX = (
    "is not taken: the modules build their own optimisers and learning-rate schedules. SwirlModule has one optimiser "
    "per model (--model.init_args.fwm.init_args.optimizer, --model.init_args.idm.init_args.optimizer) and schedules "
    "their rates itself (--model.init_args.sft_lr_schedule, --model.init_args.rl_lr_schedule, "
    "--model.init_args.fwm_rl_lr, --model.init_args.idm_rl_lr)."
)


def optimizer_argument(args: list[str], configs: list[str]) -> str | None:
    """The first of Lightning's ``--optimizer`` / ``--lr_scheduler`` that ``args`` or a ``--config`` file sets, as
    the user wrote it, or None. LightningCLI would give them to one automatic optimiser that the modules do not use."""
    names = ("optimizer", "lr_scheduler")
    for arg in args:
        for name in names:
            if arg == f"--{name}" or arg.startswith((f"--{name}.", f"--{name}=")):
                return f"--{name}"
    for path in configs:
        loaded = yaml.safe_load(Path(path).read_text())
        for name in names:
            if isinstance(loaded, dict) and name in loaded:
                return f"{name} (in --config {path})"
    return None


# SwirlModule's counts and their lowest values, with what they count. The module refuses some of them itself, but
# only once the two models it is given have loaded (minutes for real checkpoints). None passes where it is taken.
SWIRL_MODULE_MINIMA = {
    "fwm_group_size": (2, "group-relative advantages compare a pair's samples with each other"),
    "idm_group_size": (2, "group-relative advantages compare a pair's samples with each other"),
    "rl_batch_size": (1, "pairs per RL step; null: the unlabelled loader's batch size"),
    "rl_micro_batch_size": (1, "pairs per sampling pass; null: the whole step"),
    "updates_per_rollout": (1, "optimiser steps per batch of rollouts"),
    "max_nonfinite_steps": (1, "skipped non-finite steps in a row before fit stops"),
    "sft_fwm_steps": (0, "SFT steps that train the FWM; null: all of them"),
    "sft_warmup_steps": (0, "steps of warm-up; 0: none"),
    "rl_warmup_steps": (0, "steps of warm-up; 0: none"),
}


def setting_problems(config: Namespace) -> list[str]:
    """Settings that no run can use, each naming the flag to change; read from the parsed ``config`` alone."""
    found = []
    model, data = config.get("model"), config.get("data")
    if isinstance(model, Namespace) and _is_subclass(model.get("class_path"), SwirlModule):
        for name, (lowest, what) in SWIRL_MODULE_MINIMA.items():
            value = (model.get("init_args") or Namespace()).get(name)
            if value is not None and value < lowest:
                found.append(f"--model.init_args.{name} must be ≥ {lowest} ({what}); got {value}")
    if isinstance(data, Namespace) and isinstance(data.get("init_args"), Namespace):
        # Any DataModule's batch sizes; the trajectory DataModules cut each epoch into whole batches.
        init = data.init_args
        for name in ("batch_size", "eval_batch_size", "unlabelled_batch_size"):
            if isinstance(init.get(name), int) and init[name] < 1:
                found.append(f"--data.init_args.{name} must be ≥ 1; got {init[name]}")
        epoch = init.get("pairs_per_epoch")
        sizes = {n: init.get(n) for n in ("batch_size", "unlabelled_batch_size") if isinstance(init.get(n), int)}
        if sizes and isinstance(epoch, int):
            name, batch = max(sizes.items(), key=lambda item: item[1])  # the larger stream batch
            if batch >= 1 and epoch < batch:
                found.append(
                    f"--data.init_args.pairs_per_epoch must be ≥ --data.init_args.{name} ({batch}): an epoch holds "
                    f"whole batches; got {epoch}"
                )
    schedule = config.get("schedule")
    if isinstance(schedule, Namespace):
        found += SwirlSchedule.problems(
            schedule.sft_steps,
            schedule.iterations,
            schedule.phase1_steps,
            schedule.phase2_steps,
            schedule.eval_max_batches,
        )
    return found


def checkpoint_run(config: Namespace) -> dict[str, Any] | None:
    """The logger settings (``save_dir``, ``name``, ``version``) of the TensorBoard run whose folder holds ``--ckpt_path``
    (``SAVE_DIR/NAME/version_K/checkpoints/*.ckpt``), or None: no such path, another logger, or a version already set."""
    ckpt, logger = config.get("ckpt_path"), (config.get("trainer") or Namespace()).get("logger")
    if ckpt is None or not isinstance(logger, Namespace) or not isinstance(logger.get("init_args"), Namespace):
        return None
    if not str(logger.get("class_path")).endswith("TensorBoardLogger") or logger.init_args.get("version") is not None:
        return None
    folder = Path(str(ckpt)).resolve().parent
    version = re.fullmatch(r"version_(\d+)", folder.parent.name)
    if folder.name != "checkpoints" or version is None:
        return None
    return {"save_dir": str(folder.parents[2]), "name": folder.parents[1].name, "version": int(version[1])}


def _is_subclass(class_path: Any, base: type) -> bool:
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    return isinstance(cls, type) and issubclass(cls, base)


def config_files(args: list[str]) -> list[str]:
    """The files that ``--config`` / ``-c`` name in ``args`` (not inline YAML, which the parser itself reads)."""
    found = []
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            found.append(arg.split("=", 1)[1])
        elif arg in ("--config", "-c") and i + 1 < len(args):
            found.append(args[i + 1])
    return [path for path in found if Path(path).is_file()]


def yaml_problem(path: str) -> str | None:
    """Where ``path`` breaks YAML syntax, with the offending line and what to do, or None if it parses."""
    text = Path(path).read_text()
    try:
        for _ in yaml.parse(text, Loader=yaml.SafeLoader):  # syntax only: events, no values constructed
            pass
    except yaml.MarkedYAMLError as exn:
        mark = exn.problem_mark or exn.context_mark
        where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        lines = text.splitlines()
        shown = ""
        if mark is not None and mark.line < len(lines):
            shown = f"\n    {lines[mark.line]}\n    {' ' * mark.column}^"
        context = f" ({exn.context})" if exn.context else ""
        return (
            f"--config {path} is not valid YAML{where}: {exn.problem}{context}{shown}\n"
            "Fix: correct that line of the file (keys of one mapping start in the same column, every [ and { is "
            "closed, a value holding ': ' or ' #' is quoted), then run again."
        )
    return None


def checkpoint_problem(path: str) -> str | None:
    """Why the file at ``path`` cannot be a checkpoint, from its structure and checksums alone, or None.

    A checkpoint Lightning writes is a zip archive (``torch.save``): a file that is not one is garbage, one whose end
    (the zip directory) is missing was cut short, one whose records fail their CRC-32 was damaged after it was written
    (torch itself does not check them and would load the changed bytes). Reads the file once; unpickles nothing.
    Folders (sharded checkpoints), Lightning's names (``last``, ``best``, ...) and legacy pickle files go to Lightning.
    """
    file = Path(path)
    if path in ("last", "best", "hpc") or path.startswith("registry") or "://" in path or file.is_dir():
        return None
    if not file.is_file():
        return f"--ckpt_path {path}: no such file"
    with file.open("rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":  # a pickle: torch.save's format before zip archives
        return None
    try:
        with zipfile.ZipFile(file) as archive:
            if not any(name.rpartition("/")[2] == "data.pkl" for name in archive.namelist()):
                return f"--ckpt_path {path} is a zip archive but not a PyTorch checkpoint (no data.pkl in it)"
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as exn:
        if head == b"PK\x03\x04":
            size = file.stat().st_size
            return f"--ckpt_path {path} is cut short ({size:,} bytes, the end of the archive is missing: {exn})"
        return f"--ckpt_path {path} is not a checkpoint: not a zip archive, as torch.save writes (it begins {head!r})"
    if damaged is not None:
        return (
            f"--ckpt_path {path} is damaged: record {damaged} does not match its checksum "
            "(its bytes changed after it was written: a disk, copy or transfer error)"
        )
    return None


def missing_inputs(config: Any, stage: str) -> list[str]:
    """What the classes named in ``config`` would find missing for ``stage``.

    Any class with a ``preflight(init_args, stage) -> list[str]`` classmethod is asked (model backends: their
    checkpoint folder; trajectory DataModules: the shards of the splits the stage reads); no weights are loaded.
    """
    found = []
    if isinstance(config, Namespace):
        class_path = config.get("class_path")
        if isinstance(class_path, str) and isinstance(config.get("init_args"), Namespace):
            module, _, name = class_path.rpartition(".")
            check = getattr(getattr(importlib.import_module(module), name), "preflight", None)
            if check is not None:
                found += check(config.init_args.as_dict(), stage)
        children = vars(config).values()
    elif isinstance(config, (list, tuple, dict)):
        children = config.values() if isinstance(config, dict) else config
    else:
        return found
    for child in children:
        found += missing_inputs(child, stage)
    return found


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


# Advertisements for Lightning's cloud services, logged (not warned) at every Trainer's start.
_LIGHTNING_TIPS = _DropMessages(r"💡 Tip: .*\[lit(logger|models)\]\(https://pypi\.org/")


def mute_known_noise() -> None:
    """Silence the messages of Lightning and torch that every run prints and that ask nothing of a SWIRL user."""
    # main() hands LightningCLI the command line itself when it resolves a packaged config.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
    # SwirlModule optimises manually, and a checkpoint holds the weights after a step together with the schedule's
    # count of that step, so a resumed run goes on at the next one: the state Lightning's warning (with its page
    # of example code, on every run) asks whether we meant.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # The frozen parts (a VQ tokenizer, the model that does not train in a phase) are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # The pair streams split their shards by worker and count each epoch per worker, so their length is exact.
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    # Lightning's own use of a torch API that newer torch deprecates; nothing to change on our side.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Logged through whichever of these two loggers lightning_utilities was given last (a filter is added once).
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_LIGHTNING_TIPS)


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
"""The configs shipped inside the package (the repository's ``configs/`` links here), so a plain ``pip install``
has them too."""

_RUN_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def with_packaged_configs(args: list[str]) -> list[str]:
    """``args`` with ``--config configs/NAME.yaml`` read from the package when no such file is in the working folder,
    and the embedded default (``configs/sprites.yaml``) given to a run subcommand that names no config at all."""
    out = list(args)
    for i, arg in enumerate(out):
        value, prefix = (out[i + 1], None) if arg == "--config" and i + 1 < len(out) else (None, None)
        if arg.startswith("--config="):
            value, prefix = arg.split("=", 1)[1], "--config="
        if value is None or Path(value).exists():
            continue
        packaged = PACKAGED_CONFIGS / Path(value).name
        if Path(value).parent.name == "configs" and packaged.is_file():
            if prefix is None:
                out[i + 1] = str(packaged)
            else:
                out[i] = prefix + str(packaged)
    if out and out[0] in _RUN_SUBCOMMANDS and not any(a == "--config" or a.startswith("--config=") for a in out):
        if not any(a in ("-h", "--help") or a.endswith(".help") for a in out):
            default = PACKAGED_CONFIGS / "sprites.yaml"
            print(f"[swirl] no --config given: running the embedded default, {default}", file=sys.stderr)
            out[1:1] = ["--config", str(PACKAGED_CONFIGS / "sprites.yaml")]
    return out


def main(args: list[str] | None = None) -> SwirlCLI:
    mute_known_noise()
    given = sys.argv[1:] if args is None else args
    resolved = with_packaged_configs(given)
    args = None if args is None and resolved == given else resolved
    subcommand_help = {
        "fit": f"SFT, then --schedule.iterations rounds of Phase I and Phase II. The SWIRL module's arguments: "
        f"{MODEL_HELP}; the data's: {DATA_HELP}."
    }
    return SwirlCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "prog": "swirl_vl",
            "description": DESCRIPTION,
            **{name: {"description": text} for name, text in subcommand_help.items()},
        },
        # The modules build their own optimisers (SwirlModule: one per model); see OPTIMIZER_FIX.
        auto_configure_optimizers=False,
        args=args,
    )


if __name__ == "__main__":
    main()


def run() -> None:
    """The ``swirl_vl`` console script: ``main`` with the command line; exit status 0 when the run succeeds (a
    console script exits with what its function returns, and ``main`` returns the CLI object)."""
    main()
