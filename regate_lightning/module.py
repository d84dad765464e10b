"""``MLLMModule``: the LightningModule around a student HF model.

The module executes: it runs its model on the positions that ``batch["keep_mask"]`` keeps (all of
them when the batch has no keep mask, which is the exact baseline) and reports per-token losses.
It knows nothing about how the kept positions were chosen; that is the callback's policy.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric
from transformers import AutoConfig, PreTrainedModel

from regate_lightning._imports import import_object, is_dotted_path
from regate_lightning.elision import ElidedOutput, forward_active, packing_refusal
from regate_lightning.evaluation import OPTION_SCORES, ChoiceAccuracy, choose_options
from regate_lightning.families import (
    media_only_parameters,
    parameter_parts,
    resolve,
    unused_vision_modules,
    unwrap,
    vision_parts,
)
from regate_lightning.keys import (
    DATA_SKIPPED,
    DATA_SKIPPED_EPOCH,
    DATA_TRUNCATED,
    IMAGE,
    INPUT_IDS,
    KEEP_MASK,
    MEDIA_KINDS,
    QUESTION_IDX,
    TEST,
    TRAIN,
    TRAIN_AUX_LOSS,
    TRAIN_LOSS,
    VAL,
    acc_metric,
    loss_metric,
    media_gap_metric,
    option_loss_metric,
    skipped_questions_metric,
)
from regate_lightning.packed_sdpa import use_packed_sdpa
from regate_lightning.reliance import answer_rows, swap_media
from regate_lightning.shared import check_checkpoint, resuming_from

DECODER_LINEAR_NAMES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    # The gated delta-net layers of a hybrid decoder (Qwen3.5): query/key/value and gate in, and out.
    "in_proj_qkv",
    "in_proj_z",
    "out_proj",
)
"""The decoder's linear layers that LoRA adapts by default (:class:`LoraOptions`)."""


@dataclass
class LoraOptions:
    """LoRA adapters through peft on the student's language model.

    Attributes:
        r: rank of the adapters.
        alpha: scaling numerator (``lora_alpha``).
        dropout: dropout on the adapter input.
        target_modules: module names or a regex; None = the decoder's attention and MLP projections, and the
            gated delta-net projections of a hybrid decoder (:data:`DECODER_LINEAR_NAMES`; never the vision tower).
        modules_to_save: modules trained in full beside the adapters, e.g. ``["multi_modal_projector"]``.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)


def _default_optimizer(params: Iterable) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0)


def load_model(model: str | PreTrainedModel, model_kwargs: dict[str, Any] | None = None) -> PreTrainedModel:
    """Build the student from a spec.

    Args:
        model: an already-built ``PreTrainedModel``; a dotted path to a factory (e.g.
            ``regate_lightning.testing.tiny_llava``); or an HF id / local path, loaded with the class
            named in its config's ``architectures``. A dotted path (``package.module.name``) that is not a
            local folder is always a factory: it must import, so a typo fails here, naming the path.
        model_kwargs: keyword arguments of the factory or of ``from_pretrained`` (e.g. ``dtype``,
            ``attn_implementation``).

    Returns:
        The HF model.

    Raises:
        ValueError: a dotted path whose module does not import or lacks the name; ``model_kwargs`` with a
            built model.
        TypeError: a ``model`` of another type, or a dotted path to something that is not callable.
    """
    kwargs = dict(model_kwargs or {})
    if isinstance(model, nn.Module):
        if kwargs:
            raise ValueError("`model_kwargs` only applies when `model` is a factory path or an HF id/path")
        return model
    if not isinstance(model, str) or not model:
        raise TypeError(f"`model` must be an HF id/path, a factory's dotted path or a PreTrainedModel, got {model!r}")
    if not os.path.isdir(model) and is_dotted_path(model):  # a factory (an HF id has a "/", a path a folder)
        factory = import_object(model, "model")
        if not callable(factory):
            raise TypeError(f"`model` {model!r} names a {type(factory).__name__}, not a factory to call")
        return factory(**kwargs)
    import transformers

    config = AutoConfig.from_pretrained(model)
    architectures = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), None)
    if cls is None:
        raise ValueError(f"`model` {model!r}: its config names no transformers class ({architectures})")
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    return cls.from_pretrained(model, **kwargs)


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("module not found in model")


class MLLMModule(pl.LightningModule):
    """Fine-tune an HF multimodal (or text) model; run only kept positions when the batch says so.

    Args:
        model: HF id or local path, dotted path to a factory, or a built ``PreTrainedModel``.
        model_kwargs: keyword arguments for the factory or ``from_pretrained``.
        lora: LoRA options; None trains the weights themselves.
        freeze_vision_tower: keep the vision encoder's weights fixed.
        freeze_projector: keep the multimodal projector's weights fixed.
        gradient_checkpointing: recompute decoder activations in the backward pass.
        optimizer: callable from parameters to an optimizer (LightningCLI's ``optimizer:`` block);
            default AdamW at lr 2e-5.
        lr_scheduler: callable from the optimizer to a scheduler, stepped every optimizer step.
        option_score: how a multiple-choice option is scored from its token log-likelihoods:
            ``"sum"`` (default, the option's log-likelihood) or ``"mean"`` (per token, length-neutral).
        task_names: names of the multiple-choice tasks, for the per-task accuracy metric names.
        freeze_language_model: keep the language model's weights fixed (decoder, embeddings, LM head):
            train the projector (and the tower) only, as in LLaVA's first stage.
        vision_tower_lr: learning rate of the vision tower's parameters (LLaVA's ``mm_vision_tower_lr``);
            None = the optimizer's.
        projector_lr: learning rate of the projector's parameters (LLaVA's ``mm_projector_lr``); None =
            the optimizer's.
        language_model_lr: learning rate of the language model's parameters (adapters included); None =
            the optimizer's.
        lr_schedule: a transformers scheduler name (``"cosine"``, ``"linear"``, ``"constant_with_warmup"``,
            ...; ``transformers.get_scheduler``) over the run's optimizer steps, with ``warmup_ratio`` of
            them for warm-up; it scales every parameter group alike, so the per-part learning rates keep
            their ratios. Not with ``lr_scheduler``.
        warmup_ratio: fraction of the optimizer steps that warm the learning rate up (``lr_schedule``).
        media_gap: at validation, also run the correct answers with another sample's media and log the
            loss difference as ``val/video_gap`` / ``val/image_gap`` (see :mod:`regate_lightning.reliance`).
        packed: run each training batch as one packed row: the kept positions of every sample back to back,
            each attending to itself only, no padding computed (``forward_active(..., packed=True)``; exact).
            A decoder on ``sdpa`` switches to ``sdpa_varlen`` (:mod:`regate_lightning.packed_sdpa`: SDPA per
            sample instead of one block-diagonal mask; the same results). Refused for decoders with recurrent
            layers. Validation runs padded rows.
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        model_kwargs: dict[str, Any] | None = None,
        lora: LoraOptions | None = None,
        freeze_vision_tower: bool = False,
        freeze_projector: bool = False,
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        option_score: str = "sum",
        task_names: list[str] | None = None,
        freeze_language_model: bool = False,
        vision_tower_lr: float | None = None,
        projector_lr: float | None = None,
        language_model_lr: float | None = None,
        lr_schedule: str | None = None,
        warmup_ratio: float = 0.0,
        media_gap: bool = True,
        packed: bool = False,
    ) -> None:
        super().__init__()
        # Every check that needs no model runs before the model is loaded: a typo must not cost a download.
        if option_score not in OPTION_SCORES:
            raise ValueError(f"`option_score` must be one of {OPTION_SCORES}, got {option_score!r}")
        part_lrs = {"vision_tower": vision_tower_lr, "projector": projector_lr, "language_model": language_model_lr}
        for part, lr in part_lrs.items():
            if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0):
                raise ValueError(f"`{part}_lr` must be a positive number or null, got {lr!r}")
        _check_schedule(lr_schedule, warmup_ratio, lr_scheduler)
        if freeze_language_model and lora is not None:
            raise ValueError(
                "`freeze_language_model` and `lora` contradict each other: LoRA already keeps the language model's "
                "weights fixed and trains adapters in it; use one of them"
            )
        ignored = ["optimizer", "lr_scheduler"] + (["model"] if isinstance(model, nn.Module) else [])
        self.save_hyperparameters(ignore=ignored)
        net = load_model(model, model_kwargs)
        parts = resolve(net)  # refuses unsupported classes before anything else happens
        refusal = packing_refusal(parts) if packed else None
        if refusal is not None:
            raise ValueError(f"`packed`: {refusal}")
        if packed:
            use_packed_sdpa(parts.decoder)
        net.config.use_cache = False
        never = unused_vision_modules(parts)
        for module in never:
            module.requires_grad_(False)
        if never:  # once, at build: the model's own layout, not a choice of the user
            names = ", ".join(_module_name(net, m) for m in never)
            rank_zero_info(f"MLLMModule: froze the tower's parts that never reach the loss in this model: {names}")
        if freeze_vision_tower or freeze_projector:
            tower, projector = vision_parts(parts)
            if not tower:
                raise ValueError("`freeze_vision_tower` / `freeze_projector` need a multimodal model, got a causal LM")
            for module in (tower if freeze_vision_tower else []) + (projector if freeze_projector else []):
                module.requires_grad_(False)
        if freeze_language_model:
            groups = parameter_parts(parts)
            if not groups["vision_tower"] and not groups["projector"]:
                raise ValueError("`freeze_language_model` needs a multimodal model: a causal LM would train nothing")
            for param in groups["language_model"]:
                param.requires_grad_(False)
        if gradient_checkpointing:
            enable = getattr(net, "activation_checkpointing_enable", None)  # transformers >= 5.x name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None:
            net = self._apply_lora(net, lora)
        self.model = net
        self.option_score = option_score
        self.accuracy = ChoiceAccuracy(task_names)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.part_lrs = {part: float(lr) for part, lr in part_lrs.items() if lr is not None}
        self.lr_schedule = lr_schedule
        self.warmup_ratio = float(warmup_ratio)
        self.media_gap = media_gap
        self.packed = packed
        self.gaps = nn.ModuleDict({kind: MeanMetric() for kind in MEDIA_KINDS})
        trainable = {part: any(p.requires_grad for p in ps) for part, ps in parameter_parts(resolve(net)).items()}
        for part in self.part_lrs:
            if not trainable[part]:
                raise ValueError(
                    f"`{part}_lr` is set but the {part.replace('_', ' ')} has no trainable parameter (frozen, absent "
                    "in this model, or outside LoRA's adapters); remove it or unfreeze the part"
                )

    @staticmethod
    def _apply_lora(net: PreTrainedModel, lora: LoraOptions) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        for name, value, low in (("r", lora.r, 1), ("alpha", lora.alpha, 1)):
            if value < low:
                raise ValueError(f"`lora.{name}` must be >= {low}, got {value}")
        if not 0.0 <= lora.dropout < 1.0:
            raise ValueError(f"`lora.dropout` must be in [0, 1), got {lora.dropout}")
        targets = lora.target_modules
        if targets is None:
            prefix = _module_name(net, resolve(net).decoder)
            scope = rf"{re.escape(prefix)}\..*" if prefix else r"(.*\.)?"
            targets = rf"{scope}({'|'.join(DECODER_LINEAR_NAMES)})"
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            modules_to_save=lora.modules_to_save or None,
        )
        return get_peft_model(net, config)

    @property
    def hf_model(self) -> PreTrainedModel:
        """The HF model itself (inside peft's wrapper when LoRA is on)."""
        return unwrap(self.model)

    def run(self, batch: dict[str, Any]) -> ElidedOutput:
        """Forward on the positions ``batch[KEEP_MASK]`` keeps (all when absent), packed with ``packed``."""
        return forward_active(self.model, batch, batch.get(KEEP_MASK), packed=self.packed)

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> dict[str, Any] | None:
        """One step; returns ``loss`` and the detached per-position ``token_loss`` [B, L].

        A ``None`` batch (every sample of it skipped by the data's ``on_error="skip"`` policy, and
        counted there) skips the optimizer step.
        """
        if batch is None:
            return None
        out = self.run(batch)
        size = batch[INPUT_IDS].shape[0]
        self.log(TRAIN_LOSS, out.loss.detach(), prog_bar=True, batch_size=size)
        if out.aux_loss is not None:
            self.log(TRAIN_AUX_LOSS, out.aux_loss, batch_size=size)
        return out.step_output()

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        """Validation always sees every token; multiple-choice batches are scored by option likelihood."""
        self._evaluate(batch, VAL)

    def test_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        """Like validation, logged under ``test/``."""
        self._evaluate(batch, TEST)

    def on_validation_epoch_end(self) -> None:
        """Log multiple-choice accuracy, overall and per task, and the questions the data left out."""
        self._log_accuracy(VAL)
        self._log_skipped_questions(VAL)

    def on_test_epoch_end(self) -> None:
        """Log multiple-choice accuracy, overall and per task, and the questions the data left out."""
        self._log_accuracy(TEST)
        self._log_skipped_questions(TEST)

    def setup(self, stage: str) -> None:
        """Take the multiple-choice task names from the datamodule when none were given; before fitting, freeze
        what the training data never uses and check that every rank can read the checkpoint to resume from."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        names = getattr(datamodule, "task_names", None)
        if names and not self.accuracy.task_names:
            self.accuracy.task_names = list(names)
        if stage == "fit" and self._trainer is not None:
            check_checkpoint(self._trainer.strategy, resuming_from(self._trainer))
            freeze_unused_media(self.model, getattr(datamodule, "media_kinds", None), self._trainer.strategy)

    def _report_skips(self, stage: str) -> Any:
        """The data module's :meth:`report_skips` for ``stage`` (None when it has none)."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        report = getattr(datamodule, "report_skips", None)
        return report(stage, self.current_epoch) if callable(report) else None

    def on_train_epoch_end(self) -> None:
        """Report the inputs the data skipped (``on_error="skip"``) by reason; log this epoch's and the total, and
        the records cut to ``max_length`` so far."""
        report = self._report_skips(TRAIN)
        if report is not None:
            self.log(DATA_SKIPPED_EPOCH, float(sum(report.period.values())))
            self.log(DATA_SKIPPED, float(sum(report.total.values())))
            self.log(DATA_TRUNCATED, float(getattr(report, "truncated", 0)))

    def _log_skipped_questions(self, stage: str) -> None:
        report = self._report_skips(VAL)  # the validation data serve the test stage too
        if report is not None:
            self.log(skipped_questions_metric(stage), float(sum(report.period.values())))

    def _evaluate(self, batch: dict[str, Any] | None, stage: str) -> None:
        if batch is None:
            return
        out = forward_active(self.model, batch)  # no keep mask: evaluation sees every token
        size = batch[INPUT_IDS].shape[0]
        if QUESTION_IDX in batch:
            preds, answers, tasks = choose_options(out.token_loss, batch, self.option_score)
            self.log(option_loss_metric(stage), out.loss, sync_dist=True, batch_size=size)
            self.accuracy.update(preds, answers, tasks)
        else:
            self.log(loss_metric(stage), out.loss, prog_bar=True, sync_dist=True, batch_size=size)
        if self.media_gap:
            self._update_media_gap(batch, out.token_loss, answer_rows(batch))

    def _update_media_gap(self, batch: dict[str, Any], token_loss: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Per answer token: loss with another sample's media minus loss with its own (the media gap)."""
        for swap in swap_media(batch, resolve(self.model), rows):
            own = token_loss[swap.rows]
            swapped = forward_active(self.model, swap.swapped).token_loss
            supervised = ~own.isnan()
            self.gaps[swap.kind].update(swapped[supervised] - own[supervised])

    def _log_accuracy(self, stage: str) -> None:
        if self.media_gap:
            self._log_media_gap(stage)
        if self.accuracy.count == 0:
            return
        values = self.accuracy.compute()
        self.log(acc_metric(stage), values.pop("all"), prog_bar=True)
        for task, value in values.items():
            self.log(acc_metric(stage, task), value)
        self.accuracy.reset()

    def _log_media_gap(self, stage: str) -> None:
        """Log the media gap of each media kind the model takes, where any row measured it.

        ``compute`` synchronises across processes, so it runs on every rank for every kind the family
        takes (the same on all ranks), also where this rank measured nothing.
        """
        family = resolve(self.model).family
        for kind in MEDIA_KINDS:
            if (family.image_key if kind == IMAGE else family.video_key) is None:
                continue
            gap = self.gaps[kind]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                value = gap.compute()
            gap.reset()
            if torch.isfinite(value):
                self.log(media_gap_metric(stage, kind), value)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one per part of the model that has trainable parameters.

        Each group is ``{"name": part, "params": [...]}`` with ``"lr"`` when the part's learning rate is
        set (``vision_tower_lr``, ``projector_lr``, ``language_model_lr``); the other groups take the
        optimizer's own learning rate. Parts are those of :func:`~regate_lightning.families.parameter_parts`.
        """
        groups = []
        for part, params in parameter_parts(resolve(self.model)).items():
            trainable = [p for p in params if p.requires_grad]
            if trainable:
                group: dict[str, Any] = {"name": part, "params": trainable}
                if part in self.part_lrs:
                    group["lr"] = self.part_lrs[part]
                groups.append(group)
        return groups

    def configure_optimizers(self) -> Any:
        """The optimizer over the trainable parameters, by part, with the scheduler stepped per optimizer step."""
        groups = self.parameter_groups()
        if not groups:
            raise ValueError(
                "no trainable parameter: check `lora`, `freeze_vision_tower`, `freeze_projector` and "
                "`freeze_language_model`"
            )
        optimizer = self.optimizer_factory(groups)
        if self.lr_schedule is not None:
            from transformers import get_scheduler

            total = int(self.trainer.estimated_stepping_batches)
            warmup = round(self.warmup_ratio * total)
            scheduler = get_scheduler(self.lr_schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total)
        elif self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def freeze_unused_media(model: nn.Module, media_kinds: Iterable[str] | None, strategy: Strategy) -> list[str]:
    """Freeze the parameters only a media kind the training data never holds would use; warn plain DDP of the rest.

    A LLaVA-NeXT-Video fed only videos never uses ``image_newline``, a Video-LLaVA fed only videos never its
    ``image_tower`` (:func:`~regate_lightning.families.media_only_parameters`): without a gradient they stop
    plain DDP at its second step. A data module says what its training batches hold with ``media_kinds``
    (e.g. ``("video",)``; :class:`~regate_lightning.testing.RandomDataModule` does); the parameters of the
    other kinds are frozen, which changes no output. Where the data does not say, or holds several kinds
    (so that a batch may lack one), those parameters get a gradient only in some steps: under plain DDP
    one line at the start names them and the strategy to use.

    Args:
        model: the student (possibly peft-wrapped).
        media_kinds: the kinds a training batch may hold, or None when the data does not say.
        strategy: the trainer's strategy.

    Returns:
        The names of the parameters frozen now.
    """
    parts = resolve(model)
    by_kind = media_only_parameters(parts)
    paths = {kind: [path for k, path in parts.family.media_only if k == kind] for kind in by_kind}
    frozen = []
    absent = [] if media_kinds is None else [kind for kind in by_kind if kind not in set(media_kinds)]
    for kind in absent:
        for name, param in by_kind[kind]:
            if param.requires_grad:
                param.requires_grad_(False)
                frozen.append(name)
    if frozen:
        what = ", ".join(f"{'/'.join(paths[kind])} ({kind}s only)" for kind in absent)
        rank_zero_info(f"MLLMModule: froze {what}: the training data holds only {', '.join(media_kinds or ())}")
    sometimes = sorted(kind for kind, params in by_kind.items() if any(p.requires_grad for _, p in params))
    single = media_kinds is not None and len(set(media_kinds)) == 1
    plain_ddp = isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
    finds_unused = bool(getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters"))
    if sometimes and not single and plain_ddp and not finds_unused:
        what = ", ".join(f"{'/'.join(paths[kind])} ({kind}s)" for kind in sometimes)
        rank_zero_warn(
            f"MLLMModule: {what} get a gradient only in batches with that media; a batch without it stops plain "
            "DDP: use strategy=ddp_find_unused_parameters_true, or say what the training data holds with the data "
            "module's `media_kinds`"
        )
    return frozen


def _check_schedule(lr_schedule: str | None, warmup_ratio: float, lr_scheduler: Any) -> None:
    """Refuse a schedule name transformers does not know, a bad warm-up and two schedulers at once."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"`warmup_ratio` must be in [0, 1), got {warmup_ratio}")
    if lr_schedule is None:
        if warmup_ratio:
            raise ValueError("`warmup_ratio` needs `lr_schedule` (e.g. 'cosine')")
        return
    from transformers import SchedulerType

    names = [t.value for t in SchedulerType]
    if lr_schedule not in names:
        raise ValueError(f"`lr_schedule` must be one of transformers' schedulers {names}, got {lr_schedule!r}")
    if lr_scheduler is not None:
        raise ValueError("give either `lr_schedule` (a transformers schedule by name) or `lr_scheduler`, not both")
