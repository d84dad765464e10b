"""Files on disk -> records -> rendered samples -> batches that the tiny students train on."""

from __future__ import annotations

import pytest
import torch
from data_fixtures import llava_record, messages_record, tokenizer, write_image, write_records, write_video

from regate_lightning.data import (
    VIDEO_MARKER,
    ChatRenderer,
    Collator,
    ConversationDataset,
    DataError,
    FrameSampling,
    SkipCounter,
    Turn,
    VisionSpec,
    load_image,
    qwen_patchify,
    read_choice_records,
    read_records,
)
from regate_lightning.data.datasets import sample_key
from regate_lightning.data.render import FALLBACK_CHAT_TEMPLATE
from regate_lightning.keys import IGNORE_INDEX, SAMPLE_IDX
from regate_lightning.testing import tiny

FRAMES = FrameSampling(num_frames=4)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_video(root / "a.mp4", num_frames=6, seed=0)
    write_video(root / "b.mp4", num_frames=3, seed=1)  # shorter than FRAMES.num_frames
    write_image(root / "c.png", "RGBA", size=(50, 40))
    write_image(root / "d.jpg", "L", size=(30, 30))
    return root


def _files(root, kind, names):
    llava = write_records(
        root / f"{kind}_llava.json",
        [llava_record(f"l{i}", kind, n) for i, n in enumerate(names)],
        jsonl=False,
    )
    msgs = write_records(root / f"{kind}_msgs.jsonl", [messages_record(f"m{i}", kind, n) for i, n in enumerate(names)])
    return llava, msgs


def _train_step(model, batch):
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != SAMPLE_IDX}
    loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss)
    towers = ("vision_tower", "visual", "video_tower", "image_tower")
    grads = [p.grad for n, p in model.named_parameters() if p.grad is not None and any(t in n for t in towers)]
    assert grads and all(torch.isfinite(g).all() for g in grads)  # gradients reach the vision tower
    return loss


def _expected_tokens(spec, kind, num_frames):
    """Placeholder tokens per media, written from the model configs' documented formulas."""
    if spec.is_qwen:
        t = 1 if kind == "image" else -(-num_frames // spec.temporal_patch_size)
        return t * (spec.size[0] // spec.patch_size) * (spec.size[1] // spec.patch_size) // spec.merge_size**2
    return spec.tokens_per_image if kind == "image" else num_frames * spec.tokens_per_frame


CASES = [
    (tiny.tiny_llava_next_video, "video", 4 * (4 // 2) ** 2),
    (tiny.tiny_video_llava, "video", 4 * (16 + 1)),
    (tiny.tiny_video_llava, "image", 16),
    (tiny.tiny_qwen2_vl, "video", 2 * 4 * 4 // 4),
    (tiny.tiny_qwen2_vl, "image", 4 * 4 // 4),
    (tiny.tiny_qwen2_5_vl, "video", 2 * 4 * 4 // 4),
    (tiny.tiny_llava, "image", 16),
    (lambda: tiny.tiny_llava(vision="siglip"), "image", 16),
]


@pytest.mark.parametrize(("factory", "kind", "tokens"), CASES)
def test_both_formats_train_the_tiny_students(media, factory, kind, tokens):
    model = factory()
    spec = VisionSpec.from_model(model, size=(32, 32) if "qwen" in type(model).__name__.lower() else None)
    renderer = ChatRenderer(tokenizer(), spec)
    names = ["a.mp4", "b.mp4"] if kind == "video" else ["c.png", "d.jpg"]
    llava_file, msgs_file = _files(media, kind, names)
    collate = Collator(tokenizer())
    for prefix, path in (("l", llava_file), ("m", msgs_file)):
        dataset = ConversationDataset(path, renderer, FRAMES)
        batch = collate([dataset[0], dataset[1]])
        token = spec.image_token_id if kind == "image" else spec.video_token_id
        assert (batch["input_ids"] == token).sum(1).tolist() == [tokens, tokens]
        assert _expected_tokens(spec, kind, FRAMES.num_frames) == tokens
        assert batch[SAMPLE_IDX].tolist() == [sample_key(f"id {prefix}0"), sample_key(f"id {prefix}1")]
        _train_step(model, batch)


def test_batch_keys_are_exactly_the_models_own(media):
    llava_file, _ = _files(media, "video", ["a.mp4", "b.mp4"])
    expected = {
        tiny.tiny_llava_next_video: {"pixel_values_videos"},
        tiny.tiny_video_llava: {"pixel_values_videos"},
        tiny.tiny_qwen2_vl: {"pixel_values_videos", "video_grid_thw", "mm_token_type_ids"},
        tiny.tiny_qwen2_5_vl: {
            "pixel_values_videos",
            "video_grid_thw",
            "mm_token_type_ids",
            "second_per_grid_ts",
        },
    }
    for factory, extra in expected.items():
        spec = VisionSpec.from_model(factory())
        batch = Collator(0)(list(ConversationDataset(llava_file, ChatRenderer(tokenizer(), spec), FRAMES)))
        assert set(batch) == {"input_ids", "attention_mask", "labels", SAMPLE_IDX} | extra
        if "second_per_grid_ts" in batch:  # 4 frames sampled over 1.5 s: temporal_patch_size / sampled fps
            assert batch["second_per_grid_ts"][0].item() == pytest.approx(2 / (4 / 1.5))


def test_mixed_image_and_video_in_one_sample(media):
    model = tiny.tiny_qwen2_vl()
    spec = VisionSpec.from_model(model, size=(32, 32))
    record = {
        "id": "mix",
        "image": "c.png",
        "video": "a.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nCompare with <image> please."},
            {"from": "gpt", "value": "They differ."},
        ],
    }
    path = write_records(media / "mix.jsonl", [record])
    batch = Collator(tokenizer())([ConversationDataset(path, ChatRenderer(tokenizer(), spec), FRAMES)[0]])
    types = batch["mm_token_type_ids"][0]
    assert (types == 2).sum() == 8 and (types == 1).sum() == 4
    assert int((types == 2).nonzero()[0]) < int((types == 1).nonzero()[0])  # the video's marker comes first
    _train_step(model, batch)


def test_labels_cover_exactly_the_assistant_turns_token_by_token(media):
    tok = tokenizer()
    spec = VisionSpec.from_model(tiny.tiny_llava_next_video())
    path = write_records(media / "two_turns.jsonl", [llava_record("two", "video", "a.mp4", turns=2)])
    sample = ConversationDataset(path, ChatRenderer(tok, spec), FRAMES)[0]

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    video = [spec.video_token_id] * (FRAMES.num_frames * spec.tokens_per_frame)
    prompt1 = [tok.bos_token_id, *ids("USER: "), *video, *ids("\nWhat is moving in the video? ASSISTANT:")]
    answer1 = [*ids(" The video shows two red circles moving left."), tok.eos_token_id]
    prompt2 = ids("USER: And what colour is it 1? ASSISTANT:")
    answer2 = [*ids(" It is yellow."), tok.eos_token_id]
    expected_ids = prompt1 + answer1 + prompt2 + answer2
    ignore = [IGNORE_INDEX]
    expected_labels = ignore * len(prompt1) + answer1 + ignore * len(prompt2) + answer2
    assert sample.input_ids.tolist() == expected_ids
    assert sample.labels.tolist() == expected_labels
    assert sample.visual_end == 1 + len(ids("USER: ")) + len(video)


def test_chat_template_of_the_tokenizer_is_used_and_spans_include_end_of_turn():
    tok = tokenizer()
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    spec = VisionSpec.from_model(tiny.tiny_llava())
    renderer = ChatRenderer(tok, spec, chat_template=template)
    turns = [
        Turn("user", "Hi <image>"),
        Turn("assistant", "Hello."),
        Turn("user", "Bye"),
        Turn("assistant", "Ok"),
    ]
    image = spec.process_image(torch.zeros(3, 32, 32, dtype=torch.uint8))
    sample = renderer.render(turns, [image])
    supervised = sample.labels[sample.labels != IGNORE_INDEX].tolist()
    assert tok.decode(supervised) == "Hello.<|end|>\nOk<|end|>\n"
    answers_only = renderer.render(turns, [image], end_of_turn=False)
    assert tok.decode(answers_only.labels[answers_only.labels != IGNORE_INDEX].tolist()) == "Hello.Ok"


def test_tokenizer_without_template_uses_the_documented_fallback():
    tok = tokenizer()
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE
    spec = VisionSpec.from_model(tiny.tiny_llava())
    plain = ChatRenderer(type("Tok", (), {"chat_template": None})(), spec)
    assert plain.chat_template == FALLBACK_CHAT_TEMPLATE
    rendered = ChatRenderer(tok, spec, system_prompt="Be brief.")._text(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
        ],
        generation_prompt=False,
    )
    assert rendered == "<s>Be brief. USER: Q ASSISTANT: A</s>"


def test_qwen_patchify_matches_hf_image_processor(media):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    spec = VisionSpec.from_model(tiny.tiny_qwen2_vl(), size=(32, 48))
    image = load_image(media / "c.png", spec.size)
    ours = spec.process_image(image)
    hf = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, do_resize=False)(
        images=[image.permute(1, 2, 0).numpy()], return_tensors="pt"
    )
    assert torch.equal(ours.tensors["image_grid_thw"], hf["image_grid_thw"])
    assert torch.allclose(ours.tensors["pixel_values"], hf["pixel_values"], atol=1e-5)
    assert ours.num_tokens == 4 * 6 // 4


def test_qwen_video_patch_layout():
    """Row order (t, h/m, w/m, m, m); inside a row (channel, temporal, P, P); odd T repeats the last frame."""
    frames = torch.randn(3, 3, 32, 16)
    patches, grid = qwen_patchify(frames, patch_size=8, temporal_patch_size=2, merge_size=2)
    assert grid.tolist() == [2, 4, 2] and patches.shape == (16, 3 * 2 * 8 * 8)
    padded = torch.cat([frames, frames[-1:]])
    for t, bh, bw, mh, mw in [(0, 0, 0, 0, 0), (0, 1, 0, 1, 1), (1, 1, 0, 0, 1), (1, 0, 0, 1, 0)]:
        row = ((t * 2 + bh) * 1 + bw) * 4 + mh * 2 + mw
        y, x = (bh * 2 + mh) * 8, (bw * 2 + mw) * 8
        expected = padded[2 * t : 2 * t + 2, :, y : y + 8, x : x + 8].permute(1, 0, 2, 3).reshape(-1)
        assert torch.equal(patches[row], expected)


def test_vision_spec_from_configs():
    assert VisionSpec.from_model(tiny.tiny_llava()).mean == (0.48145466, 0.4578275, 0.40821073)
    assert VisionSpec.from_model(tiny.tiny_llava(vision="siglip")).std == (0.5, 0.5, 0.5)
    model = tiny.tiny_llava()
    model.config.vision_feature_select_strategy = "full"
    assert VisionSpec.from_model(model.config).tokens_per_image == 17  # CLIP keeps its CLS token
    assert VisionSpec.from_model(tiny.tiny_llava(), mean=(0.1, 0.2, 0.3)).mean == (0.1, 0.2, 0.3)
    with pytest.raises(ValueError, match="size"):
        VisionSpec.from_model(tiny.tiny_llava(), size=(64, 64))
    with pytest.raises(ValueError, match="multiples"):
        VisionSpec.from_model(tiny.tiny_qwen2_vl(), size=(40, 32))
    with pytest.raises(ValueError, match="not supported"):
        VisionSpec.from_model(tiny.tiny_llama())


def test_unsupported_media_kinds_are_refused_with_the_fix(media):
    llava_video, _ = _files(media, "video", ["a.mp4"])
    llava_image, _ = _files(media, "image", ["c.png"])
    next_video = ChatRenderer(tokenizer(), VisionSpec.from_model(tiny.tiny_llava_next_video()))
    with pytest.raises(DataError, match="anyres") as info:
        ConversationDataset(llava_image, next_video, FRAMES)
    assert info.value.reason == "unsupported_media" and "l0" in str(info.value)
    image_only = ChatRenderer(tokenizer(), VisionSpec.from_model(tiny.tiny_llava()))
    counter = SkipCounter()
    refused = r"video_llava\.json: none of its 1 records can be used \(unsupported_media 1\)"
    with pytest.raises(DataError, match=refused):
        ConversationDataset(llava_video, image_only, FRAMES, on_error="skip", counter=counter)
    assert counter.counts()["unsupported_media"] == 1


def test_tokenizer_model_mismatch_is_caught():
    spec = VisionSpec.from_model(tiny.tiny_llava(vocab_size=300, image_token_id=299))
    with pytest.raises(ValueError, match="vocab_size"):
        ChatRenderer(tokenizer(), spec).render(
            [
                Turn("user", "What is moving in the video?"),
                Turn("assistant", "The video shows two red circles."),
            ],
            [],
        )


def test_slow_tokenizer_path_gives_the_same_labels(media):
    """A tokenizer without offsets tokenizes the supervised spans separately; here that changes nothing."""
    fast = tokenizer()

    class Slow:
        is_fast = False
        chat_template = fast.chat_template

        def __call__(self, text, add_special_tokens=False):
            return fast(text, add_special_tokens=add_special_tokens)

        def apply_chat_template(self, *args, **kwargs):
            return fast.apply_chat_template(*args, **kwargs)

    spec = VisionSpec.from_model(tiny.tiny_llava_next_video())
    path = write_records(media / "slow.jsonl", [llava_record("slow", "video", "a.mp4", turns=3)])
    a = ConversationDataset(path, ChatRenderer(fast, spec), FRAMES)[0]
    b = ConversationDataset(path, ChatRenderer(Slow(), spec), FRAMES)[0]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


# ------------------------------------------------------------------------------------------------
# Issue 11: public data sets' conventions (items 6 and 7).


def test_image_marker_on_a_video_record_is_matched_to_the_video(media):
    """LLaVA-Video-178K / LLaVA-NeXT write `<image>` in the text of records whose media is a `video`."""
    record = llava_record("lv", "video", "a.mp4", turns=2)
    record["conversations"][0]["value"] = "<image>\nWhat is moving in the video?"
    path = write_records(media / "llava_video_178k.jsonl", [record])
    (parsed,) = read_records(path)
    assert [m.kind for m in parsed.media] == ["video"]
    assert parsed.turns[0].text.startswith(VIDEO_MARKER)
    spec = VisionSpec.from_model(tiny.tiny_llava_next_video())
    sample = ConversationDataset(path, ChatRenderer(tokenizer(), spec), FRAMES)[0]
    assert int((sample.input_ids == spec.video_token_id).sum()) == FRAMES.num_frames * spec.tokens_per_frame
    # Markers that cannot be matched are still refused, naming what was found.
    both = {**llava_record("mixed", "video", "a.mp4"), "image": "c.png"}
    both["conversations"][0]["value"] = "<image>\n<image>\nWhat is it?"
    bad = write_records(media / "mixed.jsonl", [both])
    with pytest.raises(DataError, match=r"2 <image> and 0 <video> placeholder\(s\) in the turns but 1 image"):
        read_records(bad)


def test_mvbench_files_answer_by_text_and_name_their_task(media):
    rows = [
        {"video": "a.mp4", "question": "What moves?", "candidates": ["a circle", "a square"], "answer": "a square"},
        {"video": "b.mp4", "question": "Which way?", "candidates": ["left", "right"], "answer": "up"},
    ]
    path = write_records(media / "action_sequence.json", rows, jsonl=False)
    with pytest.raises(
        DataError,
        match=r"action_sequence\.json, record 2 of the list: `answer` 'up' matches none of the options "
        r"\['left', 'right'\]",
    ):
        read_choice_records(path)
    counter = SkipCounter()
    (first,) = read_choice_records(path, on_error="skip", counter=counter)
    assert (first.answer, first.task, first.key) == (1, "action_sequence", "at action_sequence.json#0")
    assert counter.records()["bad_record"] == 1
    assert read_choice_records(path, on_error="skip", task="other")[0].task == "other"
