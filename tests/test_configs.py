"""Every YAML in configs/ parses through the CLI (no training): a typo in a key or a class_path fails here."""

from pathlib import Path

import pytest

from swirl_vl.cli import SwirlCLI

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


class _ParseOnlyCLI(SwirlCLI):
    def instantiate_classes(self) -> None:  # validate the config against the signatures, build nothing
        pass


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_parses(config: Path):
    cli = _ParseOnlyCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=["--config", str(config)])
    assert cli.config["model"]["class_path"]
    assert cli.config["data"]["class_path"]


def test_configs_exist():
    names = {c.name for c in CONFIGS}
    assert {"sprites.yaml", "sprites_diffusion.yaml"} <= names
