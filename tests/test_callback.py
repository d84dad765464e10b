"""ReGATECallback on a real Lightning Trainer with tiny real HF models."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from regate_lightning import MLLMModule, ReGATECallback
from regate_lightning.keys import IGNORE_INDEX, KEEP_MASK, SAMPLE_IDX
from regate_lightning.policy import ReGATEPolicy
from regate_lightning.schedule import Schedule, expected_kept_fraction
from regate_lightning.scoring import fuse_scores, gather_candidates, scatter_candidates, select_keep
from regate_lightning.targets import candidate_mask, shift_targets
from regate_lightning.teacher import Teacher, check_tokenizers
from regate_lightning.testing import tiny
from regate_lightning.testing.datamodule import RandomDataModule


def trainer(max_steps: int, callbacks: list | None = None, **kwargs) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "deterministic": True,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks or [], **options)


def module(factory=tiny.tiny_llava, lr: float = 1e-3) -> MLLMModule:
    return MLLMModule(factory(), optimizer=lambda p: torch.optim.AdamW(p, lr=lr))


def weights(m: MLLMModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Construction errors.


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_ratio": 1.5}, r"`keep_ratio` must be in \(0, 1\], got 1.5"),
        ({"keep_ratio": 0.0}, r"`keep_ratio` must be in \(0, 1\]"),
        ({"ema_decay": -0.1}, r"`ema_decay` must be in \[0, 1\]"),
        ({"ref_weight": 2}, r"`ref_weight` must be in \[0, 1\]"),
        ({"warmup_steps": -1}, r"`warmup_steps` must be >= 0"),
        ({"cycle_steps": 0}, r"`cycle_steps` must be >= 1"),
        ({"cycle_steps": 8, "full_steps": 9}, r"`full_steps`"),
        ({"min_keep": -1}, r"`min_keep` must be >= 0"),
        ({"fallback": "zero"}, r"`fallback` must be one of"),
        ({"selection": "best"}, r"`selection` must be one of"),
        ({"teacher": ""}, r"`teacher` must be"),
    ],
)
def test_refused_configuration(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ReGATECallback(**kwargs)


def test_batch_without_sample_idx_is_refused():
    class NoIdx(RandomDataModule):
        def train_dataloader(self):
            loader = super().train_dataloader()
            return [{k: v for k, v in b.items() if k != SAMPLE_IDX} for b in loader]

    with pytest.raises(KeyError, match="needs `batch\\['sample_idx'\\]`"):
        trainer(2, [ReGATECallback(warmup_steps=0, full_steps=0)]).fit(module(), NoIdx(num_samples=4))


def test_teacher_with_another_tokenizer_is_refused():
    def tok(words):
        vocab = {w: i for i, w in enumerate(words)}
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token=words[0])))

    check_tokenizers(tok(["<unk>", "a", "b"]), tok(["<unk>", "a", "b", "c"]), ())
    with pytest.raises(ValueError, match="does not match the student's: 2 of 3 tokens differ"):
        check_tokenizers(tok(["<unk>", "a", "b"]), tok(["<unk>", "b", "a"]), ())
    check_tokenizers(tok(["<unk>", "a", "<image>"]), tok(["<unk>", "a"]), (2,))  # placeholders are exempt


# ------------------------------------------------------------------------------------------------
# Which tokens are kept.


def train_template_lm(steps: int = 150):
    """A tiny LM that learns a template: answer words at even slots are fixed, odd slots random.

    Returns the model and a batch: the prompt, then the answer ``T0 x T1 y T2 z ...`` where ``Ti`` are
    fixed template ids and ``x, y, z`` are drawn from 40 ids. The LM predicts template ids well and
    slot ids at no better than chance (about log 40).
    """
    torch.manual_seed(0)
    lm = tiny.tiny_llama(vocab_size=128)
    template = torch.arange(10, 22)

    def batch(n: int, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        slots = torch.randint(60, 100, (n, 12), generator=g)
        answer = torch.stack([template.expand(n, -1), slots], dim=2).flatten(1)  # T0 s0 T1 s1 ...
        prompt = torch.full((n, 4), 5)
        ids = torch.cat([torch.ones(n, 1, dtype=torch.long), prompt, answer], dim=1)
        labels = ids.clone()
        labels[:, :5] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, SAMPLE_IDX: torch.arange(n)}

    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    for step in range(steps):
        b = batch(16, step)
        loss = lm(input_ids=b["input_ids"], labels=b["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.eval()
    return lm, batch(4, 10_000)


@pytest.fixture(scope="module")
def template_lm():
    return train_template_lm()


def prepare(policy: ReGATEPolicy, model: torch.nn.Module) -> ReGATEPolicy:
    """Set the policy up on the CPU, as the callback's ``setup`` and ``on_fit_start`` do."""
    policy.setup(model)
    policy.start(torch.device("cpu"))
    return policy


def test_reference_only_keeps_the_unpredictable_tokens(template_lm):
    lm, batch = template_lm
    batch = dict(batch)  # the fixture's batch is shared: the keep mask goes into a copy
    policy = prepare(ReGATEPolicy(keep_ratio=0.5, ref_weight=1.0, warmup_steps=0, full_steps=0, min_keep=0), lm)
    policy.plan(batch, step=0).apply(batch)
    keep = batch[KEEP_MASK]
    cand = candidate_mask(batch["labels"])
    targets = shift_targets(batch["labels"])
    slot_target = (targets >= 60) & cand  # positions that predict a random slot word
    # 24 answer tokens give 23 candidates: 12 predict a slot word, 11 a template word; k = ceil(11.5) = 12.
    assert int(cand[0].sum()) == 23
    assert torch.equal(keep & cand, slot_target), "kept candidates must be exactly those predicting slot words"
    ref = policy.bank.get_ref(batch[SAMPLE_IDX], cand.sum(1))
    ref_grid = scatter_candidates(ref, cand)
    assert float(ref_grid[slot_target].min()) > float(ref_grid[cand & ~slot_target].max())


def test_fused_selection_matches_hand_computation(template_lm):
    lm, batch = template_lm
    policy = prepare(ReGATEPolicy(keep_ratio=0.3, ref_weight=0.5, warmup_steps=0, full_steps=0, min_keep=2), lm)
    cand = candidate_mask(batch["labels"])
    counts = cand.sum(1)
    # Give the EMA store known values for sample 0 and 2; samples 1 and 3 fall back to the vocab EMA/ref.
    plan = policy.plan(dict(batch), step=0)
    losses = torch.linspace(0.0, 6.0, int(counts.sum()))
    token_loss = scatter_candidates(losses, cand)
    token_loss[1] = float("nan")
    token_loss[3] = float("nan")
    policy.observe(plan, token_loss)
    b = dict(batch)
    policy.plan(b, step=1).apply(b)
    ref = policy.bank.get_ref(batch[SAMPLE_IDX], counts)
    target_ids = gather_candidates(shift_targets(batch["labels"]), cand)
    flat_loss = gather_candidates(token_loss, cand)
    vocab = {}
    for tid, loss in zip(target_ids.tolist(), flat_loss.tolist(), strict=True):
        if not math.isnan(loss):
            vocab.setdefault(tid, []).append(loss)
    m = []
    for i, (tid, loss) in enumerate(zip(target_ids.tolist(), flat_loss.tolist(), strict=True)):
        if not math.isnan(loss):
            m.append(loss)  # first measurement initialises the EMA
        elif tid in vocab:
            m.append(sum(vocab[tid]) / len(vocab[tid]))
        else:
            m.append(float(ref[i]))
    expected = select_keep(scatter_candidates(fuse_scores(torch.tensor(m), ref, 0.5), cand), cand, 0.3, 2)
    assert torch.equal(b[KEEP_MASK], expected)
    assert int((b[KEEP_MASK] & cand)[0].sum()) == max(2, math.ceil(0.3 * 23))


# ------------------------------------------------------------------------------------------------
# Teacher cost.


class FileStates(pl.Callback):
    """After ReGATE's hooks: the file's (inode, mtime, size) at every epoch end and at the end of fitting.

    The cache is written atomically (a new file renamed over the old one), so a write changes the inode.
    """

    def __init__(self, path) -> None:
        self.path = path
        self.states: list[tuple[int, int, int] | None] = []

    def _note(self) -> None:
        stat = self.path.stat() if self.path.exists() else None
        self.states.append(None if stat is None else (stat.st_ino, stat.st_mtime_ns, stat.st_size))

    def on_train_epoch_end(self, trainer, pl_module):
        self._note()

    def on_fit_end(self, trainer, pl_module):
        self._note()


def test_teacher_runs_once_per_sample_and_cache_equals_fresh(tmp_path):
    student = module()
    callback = ReGATECallback(warmup_steps=1, cycle_steps=2, full_steps=1, ref_cache=str(tmp_path / "ref.pt"))
    calls: list[int] = []
    head_rows: list[int] = []

    class Count(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            callback.teacher.decoder.register_forward_hook(lambda m, a, o: calls.append(o.last_hidden_state.shape[0]))
            callback.teacher.lm_head.register_forward_hook(lambda m, a, o: head_rows.append(o.shape[0]))

    data = RandomDataModule(num_samples=8, batch_size=4, answer_len=16)
    files = FileStates(tmp_path / "ref.pt")
    trainer(6, [callback, Count(), files], max_epochs=3).fit(student, data)
    assert sum(calls) == 8, "one teacher row per sample over three epochs"
    # Written after the first epoch, when the teacher had scored every sample; never again, as nothing changed.
    assert len(files.states) == 4 and files.states[0] is not None and len(set(files.states)) == 1
    assert callback.totals["teacher_samples"] == 8
    # Logits only at candidates: each LM-head call sees at most the candidates of a batch, never B x L.
    assert max(head_rows) <= 4 * 15
    # The cached losses equal a fresh computation.
    teacher = Teacher.from_student(student.model)
    samples = data.train_set.items
    from regate_lightning.families import resolve
    from regate_lightning.teacher import text_mask

    parts = resolve(student.model)
    fresh_teacher = Teacher.from_student(module().model)  # same seed, same initial weights
    for item in samples:
        text = text_mask(parts.media_token_ids, item["input_ids"], item["attention_mask"])
        cand = candidate_mask(item["labels"]) & text
        fresh = fresh_teacher.reference_losses(item["input_ids"], item["labels"], text, cand)
        cached = callback.bank.get_ref(item[SAMPLE_IDX], cand.sum(1))
        assert torch.allclose(gather_candidates(fresh, cand), cached, atol=1e-6)
    del teacher
    # A second run reads the cache file and never runs the teacher.
    calls.clear()
    callback2 = ReGATECallback(warmup_steps=1, cycle_steps=2, full_steps=1, ref_cache=str(tmp_path / "ref.pt"))
    callback = callback2
    files2 = FileStates(tmp_path / "ref.pt")
    trainer(4, [callback2, Count(), files2], max_epochs=2).fit(
        module(), RandomDataModule(num_samples=8, batch_size=4, answer_len=16)
    )
    assert calls == [] and callback2.totals["teacher_samples"] == 0
    assert set(files2.states) == {files.states[0]}, "a run that only read the cache leaves the file as it was"


def test_cache_from_another_teacher_is_refused(tmp_path):
    cache = str(tmp_path / "ref.pt")
    trainer(2, [ReGATECallback(ref_cache=cache)]).fit(module(), RandomDataModule(num_samples=8))
    other = MLLMModule(tiny.tiny_llava(seed=1))
    with pytest.raises(ValueError, match="was made for another setup"):
        trainer(2, [ReGATECallback(ref_cache=cache)]).fit(other, RandomDataModule(num_samples=8))


# ------------------------------------------------------------------------------------------------
# Schedule arithmetic, baseline equality, resume.


def test_kept_share_matches_schedule():
    schedule = Schedule(warmup_steps=3, cycle_steps=8, full_steps=2)
    callback = ReGATECallback(keep_ratio=0.5, warmup_steps=3, cycle_steps=8, full_steps=2, min_keep=0)
    steps = 21
    # answer_len 33: 32 candidates per sample, so p * n is a whole number in every sparse step.
    data = RandomDataModule(num_samples=8, batch_size=2, answer_len=33, prompt_len=4)
    trainer(steps, [callback], max_epochs=100).fit(module(), data)
    measured = callback.totals["kept"] / callback.totals["candidates"]
    assert measured == pytest.approx(expected_kept_fraction(steps, schedule, 0.5), abs=1e-12)
    print(
        f"kept share over {steps} steps: measured {measured:.6f}, "
        f"schedule {expected_kept_fraction(steps, schedule, 0.5):.6f}"
    )


def test_keep_ratio_one_is_the_baseline():
    data = dict(num_samples=8, batch_size=4, seed=3)
    pl.seed_everything(0)
    base = module()
    trainer(4).fit(base, RandomDataModule(**data))
    pl.seed_everything(0)
    regate = module()
    trainer(4, [ReGATECallback(keep_ratio=1.0, warmup_steps=0, full_steps=0)]).fit(regate, RandomDataModule(**data))
    a, b = weights(base), weights(regate)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_no_interruption(tmp_path):
    def run(max_epochs: int, ckpt: str | None = None, save: bool = False):
        pl.seed_everything(0)
        m = module()
        cb = ReGATECallback(keep_ratio=0.5, warmup_steps=1, cycle_steps=3, full_steps=1)
        extra = [pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)] if save else []
        t = trainer(-1, [cb, *extra], enable_checkpointing=save, max_epochs=max_epochs)
        t.fit(m, RandomDataModule(num_samples=8, batch_size=4, shuffle=False), ckpt_path=ckpt)
        return m, cb

    full_model, full_cb = run(3)
    run(2, save=True)  # two epochs of two batches, checkpoint written at the end of each
    resumed_model, resumed_cb = run(3, ckpt=str(tmp_path / "last.ckpt"))
    # Counters continue; teacher_samples stays 8, so the resumed run took the references from the checkpoint.
    assert resumed_cb.totals == full_cb.totals and full_cb.totals["teacher_samples"] == 8
    a, b = weights(full_model), weights(resumed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = full_cb.bank.state_dict(), resumed_cb.bank.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k].nan_to_num(-1), sb[k].nan_to_num(-1)), k
    assert full_cb.totals == resumed_cb.totals


def test_resume_with_another_teacher_is_refused():
    cb = ReGATECallback()
    state = cb.state_dict()
    with pytest.raises(ValueError, match="`teacher` saved 'student', now 'other/model'"):
        ReGATECallback(teacher="other/model").load_state_dict(state)


def test_resume_with_another_keep_ratio_says_so_once(tmp_path, caplog):
    """Issue 11, item 3: a changed keep_ratio applies from the resume on, and the log says so once."""

    def run(keep_ratio: float, max_epochs: int, ckpt: str | None = None) -> ReGATECallback:
        pl.seed_everything(0)
        cb = ReGATECallback(keep_ratio=keep_ratio, warmup_steps=0, cycle_steps=2, full_steps=0)
        save = [] if ckpt else [pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)]
        t = trainer(-1, [cb, *save], enable_checkpointing=ckpt is None, max_epochs=max_epochs)
        t.fit(module(), RandomDataModule(num_samples=4, batch_size=2, shuffle=False), ckpt_path=ckpt)
        return cb

    run(0.5, 1)
    with caplog.at_level("INFO", logger="lightning.pytorch.utilities.rank_zero"):
        resumed = run(0.25, 2, ckpt=str(tmp_path / "last.ckpt"))
    said = [r.getMessage() for r in caplog.records if "resuming with changed settings" in r.getMessage()]
    expected = "ReGATE: resuming with changed settings (`keep_ratio` 0.5 -> 0.25); from here on the new values apply"
    assert said == [expected]
    assert resumed.policy.keep_ratio == 0.25 and resumed.last_plan is not None and resumed.last_plan.sparse
    # The resumed steps kept the new share of each sample's candidates.
    assert resumed.last_plan.kept == sum(math.ceil(0.25 * n) for n in resumed.last_plan.counts.tolist())
