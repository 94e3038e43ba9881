"""``python -m swirl_vl {fit,validate,test,predict}``: LightningCLI with the SWIRL schedule as a group."""

from __future__ import annotations

import importlib
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

from swirl_vl.predict import PredictionWriter
from swirl_vl.training.schedule import SwirlSchedule

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
            for path in config_files(sys.argv[1:] if args is None else list(args)):
                if (problem := yaml_problem(path)) is not None:
                    raise SystemExit(f"swirl_vl: {problem}")
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and (problem := checkpoint_problem(str(ckpt_path))) is not None:
            raise SystemExit(f"swirl_vl {subcommand}: {problem}; nothing was run.\nFix: {CHECKPOINT_FIX}.")

    @override
    def instantiate_classes(self) -> None:
        # Before any model loads (minutes for real checkpoints): every missing folder and shard split, at once.
        config = self.config[self.subcommand] if self.subcommand else self.config
        missing = missing_inputs(config, self.subcommand or "")
        if missing:
            raise SystemExit(
                f"swirl_vl {self.subcommand or ''}: missing inputs, nothing was run:\n"
                + "\n".join(f"  - {m}" for m in missing)
            )
        super().instantiate_classes()


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


def main(args: list[str] | None = None) -> SwirlCLI:
    # SwirlModule optimises manually, and a checkpoint holds the weights after a step together with the schedule's
    # count of that step, so a resumed run goes on at the next one: the state Lightning's warning (with its page
    # of example code, on every run) asks whether we meant.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    return SwirlCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
