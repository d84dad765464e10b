"""The ``regate-lightning`` command: LightningCLI over ``MLLMModule`` and any LightningDataModule.

``regate-lightning fit --config recipes/debug.yaml`` trains; ``validate`` and ``test`` evaluate;
``--print_config`` shows the resolved recipe. ReGATE is on when ``trainer.callbacks`` holds a
``ReGATECallback``; from the command line, ``--trainer.callbacks+=regate_lightning.ReGATECallback``
adds it to any recipe without editing YAML.

``regate-lightning score --config recipe.yaml`` reads the same recipe (same classes, same
overrides, plus ``--score.*`` options, see :class:`regate_lightning.score.ScoreOptions`) and runs the
ReGATE teacher over the training set once, writing the callback's ``ref_cache`` file so that ``fit``
never runs the teacher (see ``docs/scoring.md``).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from regate_lightning.module import MLLMModule

SCORE = "score"
"""The subcommand that scores the training set offline."""


class ReGATECLI(LightningCLI):
    """LightningCLI with this package's module and the data module chosen in the recipe.

    Adds one top-level key, ``torch_threads``: torch's intra-op threads for this process (0 keeps torch's
    default). Small models on few cores spend their time in OpenMP synchronisation: on this project's
    2-core test machines one thread runs the demo's language model 8 to 18 times faster than two.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``torch_threads``."""
        parser.add_argument("--torch_threads", type=int, default=0, help="torch intra-op threads (0: default)")

    def before_instantiate_classes(self) -> None:
        """Apply ``torch_threads`` before any model is built."""
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        threads = config.get("torch_threads", 0)
        if threads < 0:
            raise ValueError(f"`torch_threads` must be >= 0, got {threads}")
        if threads:
            torch.set_num_threads(threads)


class ScoreCLI(ReGATECLI):
    """The parser of ``regate-lightning score``: the recipe's keys (no subcommand) plus ``--score.*``.

    Its trainer is built from the recipe's trainer settings for scoring alone
    (:data:`~regate_lightning.score.SCORING_TRAINER`: no callbacks, loggers or progress bar, no inference
    mode); the recipe's callbacks, among them the ReGATE callback that names the teacher, are kept in
    :attr:`recipe_callbacks`.
    """

    recipe_callbacks: list[Callback]

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the :class:`~regate_lightning.score.ScoreOptions` group as ``score``."""
        from regate_lightning.score import ScoreOptions

        super().add_arguments_to_parser(parser)
        parser.add_class_arguments(ScoreOptions, "score", instantiate=False)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The scoring trainer; the recipe's callbacks go to :attr:`recipe_callbacks`."""
        from regate_lightning.score import SCORING_TRAINER

        callbacks = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        self.recipe_callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        return super().instantiate_trainer(**{**kwargs, **SCORING_TRAINER})


def build_cli(
    args: list[str] | None = None, run: bool = True, cli_class: type[ReGATECLI] = ReGATECLI, **kwargs: Any
) -> ReGATECLI:
    """Build (and by default run) the CLI on ``args`` (``sys.argv[1:]`` when None).

    Args:
        args: command-line arguments.
        run: parse a subcommand (``fit``, ...) and run it; False parses a recipe without subcommand and
            only instantiates the trainer, model and data.
        cli_class: the LightningCLI class.
        kwargs: overrides of the LightningCLI arguments below.
    """
    options: dict[str, Any] = {
        "datamodule_class": None,
        "subclass_mode_data": True,
        "save_config_kwargs": {"overwrite": True},
        "args": args,
        "run": run,
        "auto_configure_optimizers": False,
    }
    options.update(kwargs)
    return cli_class(MLLMModule, **options)


def score_main(args: list[str]) -> Any:
    """``regate-lightning score``: parse the recipe in ``args`` and score its training set.

    Returns:
        The :class:`~regate_lightning.score.ScoreResult`.
    """
    from regate_lightning.score import ScoreOptions, find_callback, score

    with warnings.catch_warnings():  # `args` is sys.argv without "score": the mix it warns about is intended
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = build_cli(args, run=False, cli_class=ScoreCLI, save_config_callback=None)
    assert isinstance(cli, ScoreCLI)
    options = ScoreOptions(**cli.config[SCORE].as_dict())
    result = score(cli.trainer, cli.model, cli.datamodule, find_callback(cli.recipe_callbacks), options)
    if cli.trainer.is_global_zero:
        print(
            f"regate-lightning score: {result.num_samples} samples in {result.path} (teacher ran on {result.scored}, "
            f"{result.reused} already scored) in {result.seconds:.1f} s",
            file=sys.stderr,
        )
    return result


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``regate-lightning`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == SCORE:
        score_main(args[1:])
    else:
        build_cli(argv)


if __name__ == "__main__":
    main()
