"""The ``regate-lightning`` command: LightningCLI over ``MLLMModule`` and any LightningDataModule.

``regate-lightning fit --config recipes/debug.yaml`` trains; ``validate`` and ``test`` evaluate;
``--print_config`` shows the resolved recipe. ReGATE is on when ``trainer.callbacks`` holds a
``ReGATECallback``; from the command line, ``--trainer.callbacks+=regate_lightning.ReGATECallback``
adds it to any recipe without editing YAML.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from regate_lightning.module import MLLMModule


class ReGATECLI(LightningCLI):
    """LightningCLI with this package's module and the data module chosen in the recipe."""


def build_cli(args: list[str] | None = None, run: bool = True) -> ReGATECLI:
    """Build (and by default run) the CLI on ``args`` (``sys.argv[1:]`` when None)."""
    return ReGATECLI(
        MLLMModule,
        datamodule_class=None,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``regate-lightning`` console script."""
    build_cli(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
