"""``python -m swirl_vl {fit,validate,test,predict}``: LightningCLI with the SWIRL schedule as a group."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from swirl_vl.predict import PredictionWriter
from swirl_vl.training.schedule import SwirlSchedule


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
