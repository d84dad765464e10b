"""The ``regate-lightning`` command: LightningCLI over ``MLLMModule`` and any LightningDataModule.

``regate-lightning fit --config recipes/debug.yaml`` trains; ``validate`` and ``test`` evaluate;
``--print_config`` shows the resolved recipe. A value that a class refuses (``keep_ratio: 0``, a
``full_steps`` above ``cycle_steps``, ...) ends the command with one line naming the class and the
argument, not with the parser's trace. ReGATE is on when ``trainer.callbacks`` holds a
``ReGATECallback``; from the command line, ``--trainer.callbacks+=regate_lightning.ReGATECallback``
adds it to any recipe without editing YAML.

``regate-lightning score --config recipe.yaml`` reads the same recipe (same classes, same
overrides, plus ``--score.*`` options, see :class:`regate_lightning.score.ScoreOptions`) and runs the
ReGATE teacher over the training set once, writing the callback's ``ref_cache`` file so that ``fit``
never runs the teacher (see ``docs/scoring.md``).
"""

from __future__ import annotations

import re
import sys
import traceback
import warnings
from datetime import timedelta
from typing import Any, NoReturn

import torch
from jsonargparse.typing import register_type, timedelta_deserializer
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from regate_lightning.module import MLLMModule

SCORE = "score"
"""The subcommand that scores the training set offline."""
SCORE_HELP = "Run the ReGATE teacher over the training set once, offline, into the callback's ref_cache."
DESCRIPTION = (
    "regate-lightning: fine-tune multimodal LLMs with ReGATE (reference-guided adaptive token elision) on "
    "PyTorch Lightning. `fit`, `validate`, `test` and `predict` are LightningCLI's; `score` runs the ReGATE "
    "teacher offline. Each takes a recipe: --config recipes/<name>.yaml."
)


def duration(value: Any) -> timedelta:
    """A duration in a recipe (e.g. the strategy's ``timeout``): seconds, or ``"h:m:s"`` / ``"d days, h:m:s"``.

    jsonargparse reads a ``timedelta`` only from ``"h:m:s"``; ``timeout: 600`` or ``--...timeout=600`` is what a
    user writes first.

    Example:
        >>> [duration(v).total_seconds() for v in (600, "90.5", "1:30:00", "1 day, 0:00:00")]
        [600.0, 90.5, 5400.0, 86400.0]
    """
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d*)?\s*", value):
        return timedelta(seconds=float(value))
    return timedelta_deserializer(value)


register_type(timedelta, serializer=str, deserializer=duration)


def refused_value(error: BaseException) -> tuple[str, BaseException] | None:
    """The class that refused its arguments while the CLI built it, and its own error, if that is what happened.

    jsonargparse reports a constructor's ``ValueError`` inside a trace of every type it tried (e.g. "Not a
    valid subclass of Callback"); the constructor's error is in the exception's context chain, raised under
    jsonargparse's instantiator. Returns ``(dotted class name, the constructor's error)`` or None.
    """
    seen: set[int] = set()
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    for exc in reversed(chain):  # the innermost first: the constructor's own words
        if not isinstance(exc, (ValueError, TypeError)):
            continue
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            if frame.f_code.co_name == "default_class_instantiator" and "class_type" in frame.f_locals:
                cls = frame.f_locals["class_type"]
                return f"{cls.__module__}.{cls.__qualname__}", exc
    return None


class ReGATECLI(LightningCLI):
    """LightningCLI with this package's module and the data module chosen in the recipe.

    Adds one top-level key, ``torch_threads``: torch's intra-op threads for this process (0 keeps torch's
    default). Small models on few cores spend their time in OpenMP synchronisation: on this project's
    2-core test machines one thread runs the demo's language model 8 to 18 times faster than two.

    The ``score`` subcommand is listed in ``--help``, the usage line and the parser's errors beside
    LightningCLI's; :func:`main` runs it (:func:`score_main`).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``torch_threads``."""
        parser.add_argument("--torch_threads", type=int, default=0, help="torch intra-op threads (0: default)")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """LightningCLI's subcommands, and ``score`` (its parser: the recipe's keys plus ``--score.*``)."""
        super()._add_subcommands(parser, **kwargs)
        from regate_lightning.score import ScoreOptions

        score = self.init_parser(description=SCORE_HELP)
        self._add_arguments(score)
        score.add_class_arguments(ScoreOptions, SCORE, instantiate=False)
        assert parser._subcommands_action is not None
        parser._subcommands_action.add_subcommand(SCORE, score, help=SCORE_HELP)

    def instantiate_classes(self) -> None:
        """Build the classes; a value a class refuses ends the command with that class's one-line error."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            refused = refused_value(err)
            if refused is None:
                raise
            exit_with_error(f"{refused[0]} refused its arguments: {refused[1]}")

    def before_instantiate_classes(self) -> None:
        """Apply ``torch_threads`` before any model is built."""
        if self.subcommand == SCORE:
            exit_with_error("give `score` first: regate-lightning score --config RECIPE [options]")
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
        "parser_kwargs": {"description": DESCRIPTION},
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


def exit_with_error(message: str) -> NoReturn:
    """Print ``regate-lightning: error: <message>`` on stderr and exit with status 2 (a usage error)."""
    print(f"regate-lightning: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``regate-lightning`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == SCORE:
        score_main(args[1:])
    else:
        build_cli(argv)


if __name__ == "__main__":
    main()
