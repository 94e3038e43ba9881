"""``python -m swirl_vl {fit,validate,test,predict}``: LightningCLI with the SWIRL schedule as a group."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from swirl_vl.training.schedule import SwirlSchedule


class SwirlCLI(LightningCLI):
    """Adds ``--schedule.*`` (the ``SwirlSchedule`` callback) to Lightning's own arguments."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(SwirlSchedule, "schedule")


def main(args: list[str] | None = None) -> SwirlCLI:
    return SwirlCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
