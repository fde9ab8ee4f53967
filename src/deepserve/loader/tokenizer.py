"""Tokenizer and chat template, taken from the checkpoint itself."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from deepserve.errors import DeepserveError, ModelLoadError
from deepserve.loader.fast_tokenizer import FastTokenizer

logger = logging.getLogger(__name__)


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "none"


def _cache_dir(path: Path) -> Path | None:
    """Where the tokenizer rebuilt from a GGUF is kept: keyed by the file (path, size,
    mtime) and the transformers version. Rebuilding takes about 2 s (imports included);
    reading it back 0.1 s."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|"
                       f"{_transformers_version()}".encode()).hexdigest()[:16]
    root = os.environ.get("DEEPSERVE_CACHE_DIR") or Path.home() / ".cache" / "deepserve"
    return Path(root) / "tokenizers" / key


def _hf_tokenizer(folder: Path, **kwargs: Any) -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs)


def _forced_hf() -> bool:
    return os.environ.get("DEEPSERVE_TOKENIZER", "auto") == "transformers"


# in a cache folder: transformers' pipeline differed from the tokenizers library's
UNCERTIFIED = "tokenizer.uncertified"


def _fast_or_hf(folder: Path, hf: Any = None, cache: bool = False) -> Any:
    """The ``tokenizers``-backed tokenizer where it reproduces transformers' exactly,
    otherwise transformers' own (``DEEPSERVE_TOKENIZER=transformers`` forces that). With
    ``cache`` (deepserve's cache folder, ``hf`` just built from the GGUF), a tokenizer
    only transformers opens is checked against the ``tokenizers`` library and, where
    equal, certified for later starts."""
    if _forced_hf():
        return hf if hf is not None else _hf_tokenizer(folder)
    fast = FastTokenizer.open(folder, hf)
    if fast is not None:
        return fast
    hf = hf if hf is not None else _hf_tokenizer(folder)
    if cache:
        try:
            certified = FastTokenizer.certify(folder, hf)
        except Exception as exc:  # never fatal: transformers serves as before
            logger.info("tokenizer %s not certified (%s)", folder.name, exc)
            certified = False
        if certified:
            logger.info("tokenizer %s certified: later starts read it without "
                        "transformers", folder.name)
        else:
            (folder / UNCERTIFIED).touch()
    return hf


def load_tokenizer(path: Path, kind: str) -> Any:
    """The checkpoint's tokenizer. A GGUF's is rebuilt by transformers from the file's
    metadata once, saved in deepserve's cache, and read back from there with the
    ``tokenizers`` library (``FastTokenizer``) on every later start. A cache entry that
    only transformers could read, saved before certificates existed, is rebuilt from the
    file once: transformers reading the saved folder can rebuild a class's pipeline
    differently from the one it built from the file (Qwen2Tokenizer's pre-tokenizer)."""
    try:
        if kind == "gguf":
            cached = _cache_dir(path)
            if cached is not None and (cached / "tokenizer_config.json").is_file():
                try:
                    if _forced_hf() or (cached / UNCERTIFIED).is_file():
                        return _fast_or_hf(cached)
                    fast = FastTokenizer.open(cached)
                    if fast is not None:
                        return fast
                except Exception as exc:  # a damaged cache: rebuild it
                    logger.warning("tokenizer cache %s unreadable (%s); rebuilding", cached, exc)
            try:
                tok = _gguf_tokenizer(path)
            except ValueError as exc:
                if "is not supported" not in str(exc):
                    raise
                tok = _tokenizer_only(path)
            if cached is not None:
                try:
                    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
                    tok.save_pretrained(str(tmp))
                    shutil.rmtree(cached, ignore_errors=True)
                    os.replace(tmp, cached)
                    return _fast_or_hf(cached, tok, cache=True)
                except OSError as exc:
                    logger.info("tokenizer not cached (%s)", exc)
            return tok
        return _fast_or_hf(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: cannot build a tokenizer from it ({exc}); a HF folder "
                             "needs tokenizer.json or tokenizer.model with its config") from exc


# GGUF architectures whose tokenizer transformers builds from the file's fields
# (tests/test_fast_tokenizer.py checks each against AutoTokenizer's, file for file)
DIRECT_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}


def _gguf_tokenizer(path: Path) -> Any:
    """transformers' tokenizer of a GGUF, from the file's ``tokenizer.*`` fields.
    AutoTokenizer first parses every field of the file with the gguf package only to
    learn the model type (about 3 of its 4-6 s); here the type comes from deepserve's
    own reader (0.15 s), and the class is the one AutoTokenizer picks for that type
    when, as in a GGUF, no tokenizer_config names one: its registered class, or
    ``TokenizersBackend`` where none is registered. Other architectures, and a
    transformers without ``TokenizersBackend``, take AutoTokenizer."""
    import transformers

    from deepserve.loader.gguf_file import GGUFFile

    fields = GGUFFile(path).fields
    model_type = DIRECT_ARCHS.get(str(fields.get("general.architecture", "")))
    if model_type == "llama" and "mistral" in str(fields.get("general.name", "")).lower():
        model_type = "mistral"  # as transformers reads such a file
    backend = getattr(transformers, "TokenizersBackend", None)
    if model_type is None or backend is None:
        return _hf_tokenizer(path.parent, gguf_file=path.name)
    from transformers.models.auto.tokenization_auto import (
        TOKENIZER_MAPPING_NAMES,
        tokenizer_class_from_name,
    )

    name = TOKENIZER_MAPPING_NAMES.get(model_type)
    cls = backend if name in (None, "TokenizersBackend") else \
        tokenizer_class_from_name(name) if isinstance(name, str) else None
    if cls is None:
        return _hf_tokenizer(path.parent, gguf_file=path.name)
    transformers.logging.set_verbosity_error()
    return cls.from_pretrained(str(path.parent), gguf_file=path.name)


def _tokenizer_only(path: Path) -> Any:
    """A GGUF whose architecture transformers does not read (deepseek2, ...): its
    tokenizer is built from a copy of only the ``tokenizer.*`` metadata under the llama
    architecture (transformers builds a tokenizer from those fields, whatever the model)."""
    import tempfile

    import gguf

    reader = gguf.GGUFReader(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tokenizer.gguf"
        writer = gguf.GGUFWriter(str(out), "llama")
        for field in reader.fields.values():
            if field.name.startswith("tokenizer."):
                vtype = field.types[0]
                sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return _hf_tokenizer(Path(tmp), gguf_file=out.name)


def eos_token_ids(tokenizer: Any, path: Path, kind: str) -> set[int]:
    """Every token id that ends a generation: the tokenizer's EOS and generation_config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if kind == "hf":
        gen = path / "generation_config.json"
        if gen.is_file():
            value = json.loads(gen.read_text()).get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
    return ids


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]],
                        tools: list[dict[str, Any]] | None = None,
                        add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """Render a conversation with the checkpoint's template, ready for the reply.
    ``tools`` (OpenAI tool objects) go to templates that render them; ``kwargs`` are
    the template's own variables (e.g. ``enable_thinking``)."""
    if not isinstance(messages, list) or not messages:
        raise DeepserveError("messages must be a non-empty list of {role, content} objects",
                             param="messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DeepserveError("this model has no chat template; use completions (a plain "
                             "prompt) instead of chat", param="messages")
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except Exception as exc:  # jinja2 raises many types for malformed conversations
        raise DeepserveError(f"the chat template rejected these messages: {exc}",
                             param="messages") from exc
