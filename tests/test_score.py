"""``regate-lightning score``: the offline reference cache, resumable, sharded, read by ``fit``."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from script_loader import load_script, recipe
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from regate_lightning.bank import ScoreBank
from regate_lightning.cache import load_cache, load_into, reference_fingerprint, save_cache
from regate_lightning.cli import build_cli, main, score_main
from regate_lightning.score import ScoreOptions, find_callback, part_files, part_path, training_loader
from regate_lightning.teacher import Teacher

ROOT = Path(__file__).resolve().parents[1]


def cache(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def same_fingerprint(a: dict, b: dict) -> bool:
    """Equal as ``load_cache`` compares them (a missing key reads as None)."""
    return all(a.get(k) == b.get(k) for k in set(a) | set(b))


def assert_same(a: dict, b: dict, exact: bool = True) -> None:
    assert same_fingerprint(a["fingerprint"], b["fingerprint"]), (a["fingerprint"], b["fingerprint"])
    assert torch.equal(a["sample_idx"], b["sample_idx"]) and torch.equal(a["counts"], b["counts"])
    if exact:
        assert torch.equal(a["ref"], b["ref"])
    else:
        assert torch.allclose(a["ref"], b["ref"], atol=1e-6, rtol=0), float((a["ref"] - b["ref"]).abs().max())


def child_env() -> dict[str, str]:
    """Environment of a scorer subprocess: this checkout first on the path, one thread (see one_thread)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def teacher_calls(monkeypatch) -> list[int]:
    """Rows the teacher scores, across every Teacher in this process."""
    calls: list[int] = []
    original = Teacher.reference_losses

    def counting(self, input_ids, *args, **kwargs):
        calls.append(int(input_ids.shape[0]))
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Teacher, "reference_losses", counting)
    return calls


# ------------------------------------------------------------------------------------------------
# The command against the callback.


def test_score_equals_fit_and_fit_then_never_runs_the_teacher(tmp_path, teacher_calls):
    scored = tmp_path / "scored.pt"
    result = score_main(["--config", str(recipe(tmp_path, "score.yaml", scored)), "--score.progress", "false"])
    assert (result.num_samples, result.scored, result.reused) == (32, 32, 0)
    assert sum(teacher_calls) == 32 and len(teacher_calls) == 8  # batched: 8 batches of 4

    # (a) The callback computing the references itself during fit writes the same cache.
    fitted = tmp_path / "fitted.pt"
    cli = build_cli(["fit", "--config", str(recipe(tmp_path, "fit_fresh.yaml", fitted))])
    assert find_callback(cli.trainer).totals["teacher_samples"] == 32
    assert_same(cache(scored), cache(fitted), exact=False)
    assert same_fingerprint(cache(scored)["fingerprint"], find_callback(cli.trainer).fingerprint)

    # (d) A fit reading the scored cache never runs the teacher.
    teacher_calls.clear()
    cli = build_cli(["fit", "--config", str(recipe(tmp_path, "fit_cached.yaml", scored))])
    callback = find_callback(cli.trainer)
    assert cli.trainer.global_step == 8
    assert teacher_calls == [] and callback.totals["teacher_samples"] == 0
    assert callback.totals["kept"] < callback.totals["candidates"], "sparse steps ran on the cached references"

    # Scoring again finds everything cached: the teacher does not run, the file is unchanged.
    before = cache(scored)
    teacher_calls.clear()
    result = score_main(["--config", str(recipe(tmp_path, "score.yaml", scored)), "--score.progress", "false"])
    assert (result.scored, result.reused, teacher_calls) == (0, 32, [])
    assert_same(before, cache(scored))


@pytest.mark.parametrize(
    ("source", "samples"), [("debug_internvl.yaml", 4), ("debug_llava_onevision.yaml", 4), ("debug_qwen3_vl.yaml", 6)]
)
def test_score_runs_the_student_teacher_on_the_familys_recipe(tmp_path, source, samples):
    """``score`` on a family's debug recipe: the student's own text backbone scores every sample into the cache."""
    config = recipe(tmp_path, "score.yaml", tmp_path / "refs.pt", source, num_samples=samples)
    result = score_main(["--config", str(config), "--score.progress", "false"])
    assert result.num_samples == samples and result.scored == samples and (tmp_path / "refs.pt").exists()


def test_scoring_in_bf16_matches_fitting_in_bf16(tmp_path):
    """The teacher runs under the recipe's precision plugin, as in fit; the stored losses stay float32."""
    scored, fitted = tmp_path / "scored.pt", tmp_path / "fitted.pt"
    bf16 = ["--trainer.precision", "bf16-true"]
    score_main(["--config", str(recipe(tmp_path, "score.yaml", scored, num_samples=8)), *bf16])
    cli = build_cli(["fit", "--config", str(recipe(tmp_path, "fit.yaml", fitted, num_samples=8)), *bf16])
    assert next(cli.model.parameters()).dtype == torch.bfloat16
    assert cache(scored)["ref"].dtype == torch.float32
    assert_same(cache(scored), cache(fitted), exact=False)


def test_scoring_in_bf16_mixed_matches_fitting_in_bf16_mixed(tmp_path):
    """Mixed precision: one teacher path (bf16 weights, the autocast dtype, under CPU autocast) in both."""
    scored, fitted = tmp_path / "scored.pt", tmp_path / "fitted.pt"
    mixed = ["--trainer.precision", "bf16-mixed"]
    score_main(["--config", str(recipe(tmp_path, "score.yaml", scored, num_samples=8)), *mixed])
    cli = build_cli(["fit", "--config", str(recipe(tmp_path, "fit.yaml", fitted, num_samples=8)), *mixed])
    assert next(cli.model.parameters()).dtype == torch.float32, "mixed precision leaves the student in float32"
    assert find_callback(cli.trainer).totals["teacher_samples"] == 8
    assert_same(cache(scored), cache(fitted), exact=False)


def test_cache_for_another_setup_is_refused(tmp_path):
    path = tmp_path / "ref.pt"
    config = recipe(tmp_path, "score.yaml", path, num_samples=8)
    main(["score", "--config", str(config), "--score.progress", "false"])
    before = path.read_bytes()
    other_teacher = ["--model.model_kwargs", '{"hidden_size": 64, "seed": 1}']
    with pytest.raises(ValueError, match=r"was made for another setup \(teacher_weights: cache"):
        main(["score", "--config", str(config), *other_teacher])
    # A stray part file from another setup is refused too, and nothing is overwritten.
    part = part_path(path, 1, 2)
    part.write_bytes(before)
    path.unlink()
    with pytest.raises(ValueError, match="was made for another setup"):
        main(["score", "--config", str(config), *other_teacher])
    assert part.read_bytes() == before and not path.exists()


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL at a random point while every batch is flushed; the restart completes the same cache."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    samples = 48
    path = tmp_path / "ref.pt"
    config = recipe(tmp_path, "score.yaml", path, num_samples=samples, batch_size=1, answer_len=16)
    args = ["score", "--config", str(config), "--score.flush_every", "1", "--score.progress", "false"]
    target = rng.randint(1, samples // 2)
    child = subprocess.Popen(
        [sys.executable, "-m", "regate_lightning.cli", *args],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seen = 0
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if path.exists():
            seen = int(cache(path)["sample_idx"].numel())  # atomic renames: always a whole file
            if seen >= target:
                time.sleep(rng.uniform(0.0, 0.02))
                break
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    _, err = child.communicate()
    tail = err.decode()[-2000:]
    assert child.returncode == -signal.SIGKILL, f"the scorer ended before the kill (seed {seed}): {tail}"
    partial = load_cache(path, cache(path)["fingerprint"])  # loads: not truncated, not corrupt
    assert partial is not None
    done = int(partial["sample_idx"].numel())
    assert 0 < done < samples, f"kill landed after {done} of {samples} samples (seed {seed})"

    resumed = score_main(args[1:])
    assert (resumed.reused, resumed.scored, resumed.num_samples) == (done, samples - done, samples), seed
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "stale temporaries are cleaned"

    whole = tmp_path / "whole.pt"
    score_main([*args[1:], "--score.ref_cache", str(whole)])
    assert_same(cache(path), cache(whole), exact=True)


def test_parts_of_an_interrupted_multi_process_run_are_reused_and_merged(tmp_path, teacher_calls):
    path = tmp_path / "ref.pt"
    config = recipe(tmp_path, "score.yaml", path, num_samples=12, batch_size=2)
    args = ["--config", str(config), "--score.progress", "false"]
    score_main(args)
    whole = cache(path)
    # What two ranks had flushed when killed: rank 0 samples 0, 2, 4; rank 1 samples 1, 3. No main file yet.
    bank = ScoreBank(vocab_size=whole["fingerprint"]["vocab_size"])
    load_into(bank, whole)
    save_cache(part_path(path, 0, 2), bank, whole["fingerprint"], samples=torch.tensor([0, 2, 4]))
    save_cache(part_path(path, 1, 2), bank, whole["fingerprint"], samples=torch.tensor([1, 3]))
    path.unlink()
    teacher_calls.clear()
    result = score_main(args)  # resumed on one process
    assert (result.reused, result.scored, sum(teacher_calls)) == (5, 7, 7)
    assert_same(whole, cache(path), exact=False)
    assert part_files(path) == []


# ------------------------------------------------------------------------------------------------
# Pieces.


def test_options_are_checked():
    with pytest.raises(ValueError, match="`flush_every` must be >= 0"):
        ScoreOptions(flush_every=-1)
    with pytest.raises(ValueError, match="`batch_size` must be >= 1"):
        ScoreOptions(batch_size=0)
    with pytest.raises(ValueError, match="`flush_seconds` must be >= 0"):
        ScoreOptions(flush_seconds=float("nan"))


def test_recipe_without_callback_or_path_is_refused(tmp_path):
    config = recipe(tmp_path, "no_path.yaml", None, num_samples=4)
    with pytest.raises(ValueError, match="set the ReGATECallback's `ref_cache`"):
        main(["score", "--config", str(config)])
    plain = yaml.safe_load((ROOT / "recipes" / "debug.yaml").read_text())
    plain["trainer"]["logger"] = False
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    with pytest.raises(ValueError, match=r"exactly one regate_lightning\.ReGATECallback"):
        main(["score", "--config", str(tmp_path / "plain.yaml")])


def test_training_loader_is_unshuffled_and_complete():
    data = TensorDataset(torch.arange(10))
    shuffled = DataLoader(data, batch_size=3, shuffle=True, drop_last=True, collate_fn=lambda b: b)
    loader = training_loader(shuffled)
    assert not isinstance(loader.sampler, RandomSampler) and loader.collate_fn is shuffled.collate_fn
    assert [int(x[0]) for batch in loader for x in batch] == list(range(10))
    assert training_loader(shuffled, batch_size=4).batch_size == 4
    custom = DataLoader(data, batch_sampler=[[0, 1], [2]])
    with pytest.raises(ValueError, match=r"--score\.batch_size"):
        training_loader(custom)
    with pytest.raises(TypeError, match="one torch DataLoader"):
        training_loader({"a": shuffled})


def test_part_files_and_partial_save(tmp_path):
    path = tmp_path / "ref.pt"
    assert part_path(path, 1, 4).name == "ref.pt.part1of4"
    for name in ("ref.pt.part0of2", "ref.pt.part1of2", "ref.pt.part0of2.abc123.tmp", "ref.pt.partial", "x.pt.part0of2"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in part_files(path)] == ["ref.pt.part0of2", "ref.pt.part1of2"]

    bank = ScoreBank(vocab_size=8)
    idx, counts = torch.tensor([0, 3, 5]), torch.tensor([2, 0, 3])
    bank.register(idx, counts)
    bank.set_ref(idx, torch.arange(5, dtype=torch.float32), counts)
    fingerprint = {"teacher": "t"}
    assert save_cache(path, bank, fingerprint, samples=torch.tensor([5, 3, 9])) == 2
    payload = load_cache(path, fingerprint)
    assert payload["sample_idx"].tolist() == [3, 5] and payload["counts"].tolist() == [0, 3]
    assert payload["ref"].tolist() == [2.0, 3.0, 4.0]


def test_fingerprint_tells_teachers_tokenizers_and_data_apart(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from regate_lightning.testing import tiny

    def tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
        vocab = {w: i for i, w in enumerate(words)}
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token=words[0])))

    class Data:
        def __init__(self, version: str, words: list[str]) -> None:
            self.version, self.tokenizer = version, tokenizer(words)

        def fingerprint(self) -> str:
            return self.version

    teacher = Teacher.from_student(tiny.tiny_llava())
    base = reference_fingerprint("student", teacher, Data("v1", ["<unk>", "a", "b"]))
    assert set(base) == {"teacher", "teacher_weights", "vocab_size", "tokenizer", "data"}
    assert base["vocab_size"] == teacher.vocab_size and base["data"] == "v1"
    assert base == reference_fingerprint("student", teacher, Data("v1", ["<unk>", "a", "b"]))
    assert reference_fingerprint("student", teacher, None)["data"] is None
    assert reference_fingerprint("student", teacher, None)["tokenizer"] is None
    path = tmp_path / "ref.pt"
    save_cache(path, ScoreBank(vocab_size=8), base)
    others = {
        "tokenizer": reference_fingerprint("student", teacher, Data("v1", ["<unk>", "b", "a"])),
        "data": reference_fingerprint("student", teacher, Data("v2", ["<unk>", "a", "b"])),
        "teacher_weights": reference_fingerprint("student", Teacher.from_student(tiny.tiny_llava(seed=1)), None),
    }
    for field, other in others.items():
        with pytest.raises(ValueError, match=rf"another setup \(.*{field}: cache"):
            load_cache(path, other)


def test_pretrained_teacher_and_its_tokenizer_check(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from regate_lightning import ReGATECallback
    from regate_lightning.testing import tiny

    student = tiny.tiny_llava(vocab_size=64)
    words = [f"w{i}" for i in range(64)]
    vocab = {w: i for i, w in enumerate(words)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w0")))
    folder = tmp_path / "teacher"
    tiny.tiny_llama(vocab_size=64, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    callback = ReGATECallback(teacher=str(folder), teacher_kwargs={"dtype": "float32"})
    with pytest.raises(ValueError, match="its tokenizer must be checked"):
        callback.policy.build_teacher(student, datamodule=None)

    class Data:
        pass

    data = Data()
    data.tokenizer = tokenizer
    teacher = callback.policy.build_teacher(student, data)
    assert teacher.vocab_size == 64 and not any(p.requires_grad for p in teacher.parameters())
    assert reference_fingerprint(str(folder), teacher, data)["tokenizer"] is not None
    data.tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({w: 63 - i for w, i in vocab.items()}, unk_token="w0"))
    )
    with pytest.raises(ValueError, match="does not match the student's"):
        callback.policy.build_teacher(student, data)


def test_memory_benchmark_smoke(tmp_path, capsys):
    """benchmarks/memory.py --smoke (what CI runs): measured sizes agree with the formulas."""
    report = load_script("benchmarks/memory.py").main(["--smoke", "--out", str(tmp_path)])
    assert report.bank_used == report.bank_used_formula
    assert report.bank_used <= report.bank_allocated < 2 * report.bank_used + 8 * 1024
    assert 0 <= report.cache_file - report.cache_file_formula < 4096  # the zip container
    assert 0 <= report.state_file - report.state_file_formula < 4096
    out = capsys.readouterr().out
    assert "| bank in memory, used" in out and "| **start of a fit with the cache** (`open_cache`" in out
    # The start with the cache, a first-epoch step reading it, and the policy per batch size and thread count.
    assert report.open_s is not None and report.first_meet is not None and report.first_meet.median_ms > 0
    threads = torch.get_num_threads()
    assert set(report.policy) == {(threads, 64), (threads, 8)}
    assert all(t.median_ms > 0 and set(t.parts_ms) == {"plan", "observe"} for t in report.policy.values())


@pytest.mark.slow
def test_two_processes_write_the_single_process_cache(tmp_path):
    """DDP on two CPU processes (gloo): each rank scores its shard, rank 0 merges; equals one process."""
    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    config = recipe(tmp_path, "score.yaml", single, num_samples=12, batch_size=2)
    score_main(["--config", str(config), "--score.progress", "false"])
    command = [sys.executable, "-m", "regate_lightning.cli", "score", "--config", str(config)]
    command += ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--score.ref_cache", str(double)]
    start = time.monotonic()
    done = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"two-process scoring: {time.monotonic() - start:.1f} s")
    assert_same(cache(single), cache(double), exact=False)
    assert part_files(double) == []
