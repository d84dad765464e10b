"""The ``regate-lightning`` command: LightningCLI over ``MLLMModule`` and any LightningDataModule.

``regate-lightning fit --config recipes/debug.yaml`` trains; ``validate`` and ``test`` evaluate;
``--print_config`` shows the resolved recipe. A value that a class refuses (``keep_ratio: 0``, a
``full_steps`` above ``cycle_steps``, ...) ends the command with one line naming the class and the
argument, not with the parser's trace. ReGATE is on when ``trainer.callbacks`` holds a
``ReGATECallback``; from the command line, ``--trainer.callbacks+=regate_lightning.ReGATECallback``
adds it to any recipe without editing YAML.

**Errors in one line.** Bad data under ``on_error: raise`` (a
:class:`~regate_lightning.data.errors.DataError`: file, line or record, id, what is wrong and the fix) and a
class path or dotted path that names nothing (with the closest existing path) end the command with one
``regate-lightning: error: ...`` line on stderr instead of a traceback or a usage dump; set
``REGATE_LIGHTNING_TRACEBACK=1`` to get the traceback as well. Modules of an earlier layout
(``regate_lightning.tiny``, ``regate_lightning.data.debug``, ...) still import, with a warning that names
the new path, and the data modules may be named by class name alone (``class_path: ConversationDataModule``).

``regate-lightning score --config recipe.yaml`` reads the same recipe (same classes, same
overrides, plus ``--score.*`` options, see :class:`regate_lightning.score.ScoreOptions`) and runs the
ReGATE teacher over the training set once, writing the callback's ``ref_cache`` file so that ``fit``
never runs the teacher (see ``docs/scoring.md``).
"""

from __future__ import annotations

import importlib
import os
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

from regate_lightning._imports import closest_path, new_path
from regate_lightning.data.errors import DataError
from regate_lightning.module import MLLMModule

TRACEBACK_ENV = "REGATE_LIGHTNING_TRACEBACK"
"""Set to 1 to see the traceback behind a one-line error of the command (bad data, a refused value)."""
NAMED_CLASSES = (
    "regate_lightning.callback",
    "regate_lightning.visual_callback",
    "regate_lightning.data.datamodule",
    "regate_lightning.testing.datamodule",
)
"""Modules imported before a recipe is parsed, so that their classes may be named by class name alone."""

SCORE = "score"
"""The subcommand that scores the training set offline."""
SCORE_HELP = "Run the ReGATE teacher over the training set once, offline, into the callback's ref_cache."
DESCRIPTION = (
    "regate-lightning: fine-tune multimodal LLMs with ReGATE (reference-guided adaptive token elision) on "
    "PyTorch Lightning. `fit`, `validate`, `test` and `predict` are LightningCLI's; `score` runs the ReGATE "
    "teacher offline. Each takes a recipe: --config recipes/<name>.yaml. Bad data, a refused value and a "
    f"class path that names nothing end the command with one line; {TRACEBACK_ENV}=1 adds the traceback."
)


def show_traceback() -> bool:
    """Whether :data:`TRACEBACK_ENV` asks for tracebacks instead of one-line errors."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def data_error_line(error: DataError) -> str:
    """The one line of a data error: its own message, also when a DataLoader worker raised it.

    torch re-raises a worker's exception in the main process with the worker's formatted traceback as its
    message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."); its last line is
    the error's own.
    """
    message = str(error)
    if "Original Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        message = re.sub(r"^[\w.]*(DataError|MediaError): ", "", last)
    return " ".join(message.split())


_UNRESOLVED = (
    re.compile(r"Problem with given class_path '(?P<path>[^']+)':\s*\n\s*(?P<why>[^\n]+)"),
    re.compile(r"Expected a dot import path string: (?P<path>\S+)"),
)


def _resolves(path: str) -> bool:
    """Whether ``path`` names an object (a dotted path; a short name never does on its own)."""
    module, _, name = path.rpartition(".")
    if not module:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hasattr(importlib.import_module(module), name)
    except Exception:  # any failure to import means it does not resolve
        return False


def _subclass_paths(message: str) -> set[str]:
    """The dotted paths of the imported subclasses of the base classes a parser message names."""
    paths: set[str] = set()
    for base_path in set(re.findall(r"<class '([\w.]+)'>", message)):
        module, _, name = base_path.rpartition(".")
        base = getattr(sys.modules.get(module), name, None)
        stack = list(base.__subclasses__()) if isinstance(base, type) else []
        while stack:
            cls = stack.pop()
            try:
                paths.add(new_path(cls.__module__, cls.__qualname__))  # its package's export, if any
            except Exception:  # a class of a module that cannot be re-imported: its own path
                paths.add(f"{cls.__module__}.{cls.__qualname__}")
            stack += cls.__subclasses__()
    return paths


def unresolved_class_path(message: str) -> str | None:
    """One line for a parser error about a class path that names nothing, with the closest existing path.

    Args:
        message: the parser's error message (jsonargparse's, several lines).

    Returns:
        The line, or None when the message is about something else (a class path that resolves but whose
        arguments are wrong, say).
    """
    for pattern in _UNRESOLVED:
        found = pattern.search(message)
        if found is None or _resolves(found["path"]):
            continue
        path = found["path"]
        key = re.search(r'Parser key "([^"]+)"', message)
        where = f"`{key[1]}`: " if key else ""
        why = found.groupdict().get("why") or "no imported class has this name"
        closest = closest_path(path, _subclass_paths(message))
        hint = f"; closest existing path: {closest}" if closest else "; give the full dotted path of the class"
        return f"{where}class path {path!r} cannot be resolved ({why.strip()}){hint}"
    return None


class ReGATEArgumentParser(LightningArgumentParser):
    """LightningCLI's parser; a class path that names nothing is one line (:func:`unresolved_class_path`)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """One line for an unresolvable class path; jsonargparse's usage and message otherwise."""
        line = unresolved_class_path(message) if self.exit_on_error and not show_traceback() else None
        if line is not None:
            exit_with_error(line)
        super().error(message, ex)


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
            # jsonargparse's instantiator (subclass mode) or LightningCLI's (the module, the trainer)
            cls = frame.f_locals.get("class_type") if frame.f_code.co_name in _INSTANTIATORS else None
            if isinstance(cls, type):
                return f"{cls.__module__}.{cls.__qualname__}", exc
    return None


_INSTANTIATORS = ("default_class_instantiator", "__call__")


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
            if refused is None or show_traceback():
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
    for module in NAMED_CLASSES:  # jsonargparse resolves a short class name among the imported subclasses
        importlib.import_module(module)
    options: dict[str, Any] = {
        "parser_class": ReGATEArgumentParser,
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
    """Entry point of the ``regate-lightning`` console script.

    Bad data (:class:`~regate_lightning.data.errors.DataError`) ends it with one line on stderr and exit
    status 1 (:data:`TRACEBACK_ENV` set: the exception propagates, traceback and all).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if args and args[0] == SCORE:
            score_main(args[1:])
        else:
            build_cli(argv)
    except DataError as err:
        if show_traceback():
            raise
        print(
            f"regate-lightning: error: {data_error_line(err)} ({TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr
        )
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
