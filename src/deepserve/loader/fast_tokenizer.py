"""The served tokenizer without transformers on the start-up path.

Importing transformers and building its tokenizer took 0.8 s of every start, most of
it on the critical path to ready. ``FastTokenizer`` reads the same saved folder
(tokenizer.json, tokenizer_config.json, the chat template) with the ``tokenizers``
library, which is what transformers' fast tokenizers call for encode and decode, and
renders chat templates with jinja2 in the sandbox transformers sets up. Anything else,
and any option this class does not render itself, goes to transformers' own tokenizer,
loaded from the same folder on first use: ``tok.hf`` or any attribute not defined here.
Only folders whose tokenizer has no Python-side behaviour of its own qualify
(``open`` returns None for the rest, and the caller uses transformers), and folders in
deepserve's own cache that carry a certificate (``certify``): the Rust pipeline that
transformers' class actually runs (Qwen2Tokenizer rebuilds its own pre-tokenizer, for
one), saved after it encoded and decoded ``samples()`` exactly as that class did.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# transformers classes that add nothing in Python to the Rust tokenizer's encode/decode
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                 "cls_token", "mask_token")
# apply_chat_template options that only transformers renders
HF_ONLY = ("continue_final_message", "sanitize_control_tokens", "return_assistant_tokens_mask",
           "chat_template", "tokenizer_kwargs", "return_dict", "return_tensors", "padding",
           "truncation", "max_length")
# in a cache folder: transformers' live Rust pipeline, checked equal to it (``certify``)
CERTIFIED = "tokenizer.certified.json"
_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # a saved AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _plain(value: Any) -> Any:
    """Template inputs rebuilt from JSON types only, so the sandboxed template sees no
    object with methods of its own; anything else becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base, plain in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):  # enums and other subclasses, back to the base type
            return plain(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _messages(conversation: list[Any]) -> list[dict[str, Any]]:
    """Plain message dicts, keys whose value is None dropped (templates handle a missing
    key, not a None), and reasoning under each name templates read it by."""
    out = []
    for message in _plain(list(conversation)):
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be objects, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None),
                         None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


_env_lock = threading.Lock()
_compiled: dict[str, Any] = {}


def _compile(template: str) -> Any:
    """The template in a sandboxed jinja2 environment with the globals and filters chat
    templates are written against (tojson without HTML escaping, raise_exception,
    strftime_now, loop controls, trimmed blocks)."""
    with _env_lock:
        if template in _compiled:
            return _compiled[template]
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        class Namespace(jinja2.utils.Namespace):
            """A namespace that refuses underscore names (no reach into internals)."""

            def __init__(*args: Any, **kwargs: Any) -> None:
                self, rest = args[0], args[1:]
                attrs = dict(*rest, **kwargs)
                for name in attrs:
                    Namespace._check(name)
                jinja2.utils.Namespace.__init__(self, attrs)

            def __setitem__(self, name: str, value: Any) -> None:
                Namespace._check(name)
                jinja2.utils.Namespace.__setitem__(self, name, value)

            @staticmethod
            def _check(name: Any) -> None:
                if isinstance(name, str) and name.startswith("_"):
                    raise jinja2.exceptions.SecurityError(
                        f"chat templates cannot set underscore names ({name!r})")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt),
                           dict=lambda *a, **k: dict(*a, **k), namespace=Namespace)
        compiled = env.from_string(template)
        if len(_compiled) > 16:
            _compiled.clear()
        _compiled[template] = compiled
        return compiled


class FastTokenizer:
    """encode / decode / special tokens / chat templates from a saved tokenizer folder,
    with transformers' tokenizer for the same folder behind it (``hf``)."""

    def __init__(self, folder: Path, backend: Any, config: dict[str, Any],
                 chat_template: str | None, hf: Any = None) -> None:
        self.folder = folder
        self.backend_tokenizer = backend
        self.chat_template = chat_template
        self._hf = hf
        self._hf_lock = threading.Lock()
        self.special_tokens_map = {a: s for a in SPECIAL_ATTRS
                                   if (s := _token_str(config.get(a))) is not None}
        for attr in SPECIAL_ATTRS:
            token = self.special_tokens_map.get(attr)
            setattr(self, attr, token)
            setattr(self, attr + "_id", None if token is None else backend.token_to_id(token))
        self.all_special_tokens = list(dict.fromkeys(self.special_tokens_map.values()))
        self.all_special_ids = [backend.token_to_id(t) for t in self.all_special_tokens]
        self.name_or_path = str(folder)

    @classmethod
    def open(cls, folder: Path, hf: Any = None) -> FastTokenizer | None:
        """The folder's tokenizer, or None when it is not one this class reproduces
        exactly (then transformers loads it)."""
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text())
            if not (folder / "tokenizer.json").is_file():
                return None
        except (OSError, ValueError):
            return None
        template = config.get("chat_template")
        jinja = folder / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()
        if (folder / CERTIFIED).is_file() and (template is None or isinstance(template, str)):
            from tokenizers import Tokenizer

            try:
                backend = Tokenizer.from_file(str(folder / CERTIFIED))
                return cls(folder, backend, config, template, hf)
            except Exception as exc:  # a damaged certificate: transformers decides
                logger.info("tokenizer certificate %s unreadable (%s)", folder, exc)
        extra = [config.get("extra_special_tokens"), config.get("additional_special_tokens")]
        # transformers rebuilds the post-processor (BOS / EOS) or the pre-tokenizer from these
        rebuilt = [k for k in ("add_bos_token", "add_eos_token", "add_prefix_space")
                   if k in config]
        if (config.get("tokenizer_class") not in GENERIC_CLASSES or any(extra) or rebuilt
                or (folder / "chat_template.json").exists()
                or not (template is None or isinstance(template, str))):
            return None
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # any file the tokenizers library cannot read
            logger.info("tokenizers cannot read %s (%s); using transformers", folder, exc)
            return None
        cleanup = config.get("clean_up_tokenization_spaces", False)
        if cleanup and type(backend.model).__name__ != "BPE":
            return None  # transformers post-edits such tokenizers' text in Python
        if backend.post_processor is None:
            return None  # transformers adds one
        return cls(folder, backend, config, template, hf)

    @classmethod
    def certify(cls, folder: Path, hf: Any) -> bool:
        """Save ``hf``'s Rust pipeline in ``folder`` (a deepserve cache folder) as the
        certificate ``open`` reads, if a ``FastTokenizer`` on it encodes and decodes
        ``samples()`` exactly as ``hf`` does and has the same special tokens, size and
        chat template; returns whether it did."""
        import os

        from tokenizers import Tokenizer

        if getattr(hf, "clean_up_tokenization_spaces", False) or \
                getattr(hf, "backend_tokenizer", None) is None:
            return False  # transformers edits decoded text in Python
        config = json.loads((folder / "tokenizer_config.json").read_text())
        template = hf.chat_template if isinstance(hf.chat_template, (str, type(None))) \
            else None
        fast = cls(folder, Tokenizer.from_str(hf.backend_tokenizer.to_str()), config,
                   template, hf)
        if len(fast) != len(hf) or fast.chat_template != hf.chat_template or any(
                getattr(fast, a + "_id") != getattr(hf, a + "_id", None) for a in SPECIAL_ATTRS
                if a in fast.special_tokens_map or getattr(hf, a, None) is not None):
            return False
        for text in samples(list(hf.all_special_tokens)):
            for special in (True, False):
                ids = hf.encode(text, add_special_tokens=special)
                if fast.encode(text, add_special_tokens=special) != ids:
                    return False
                if fast.decode(ids, skip_special_tokens=special) != \
                        hf.decode(ids, skip_special_tokens=special):
                    return False
        tmp = folder / f"{CERTIFIED}.tmp{os.getpid()}"
        fast.backend_tokenizer.save(str(tmp))
        os.replace(tmp, folder / CERTIFIED)
        return True

    # -- transformers, for what is not here --------------------------------------------
    @property
    def hf(self) -> Any:
        with self._hf_lock:
            if self._hf is None:
                import transformers

                transformers.logging.set_verbosity_error()
                self._hf = transformers.AutoTokenizer.from_pretrained(str(self.folder))
                if self.chat_template is not None:
                    self._hf.chat_template = self.chat_template
            return self._hf

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.hf, name)

    # -- the Rust tokenizer ------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: int | list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if clean_up_tokenization_spaces:
            return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens,
                                  clean_up_tokenization_spaces=True)
        return self.backend_tokenizer.decode(list(token_ids),
                                             skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.backend_tokenizer.token_to_id(tokens)
        return [self.backend_tokenizer.token_to_id(t) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def tokenizer_json(self) -> str:
        """The Rust tokenizer as JSON, without padding or truncation (for llguidance)."""
        backend = copy.copy(self.backend_tokenizer)
        backend.no_padding()
        backend.no_truncation()
        return backend.to_str()

    # -- chat templates ----------------------------------------------------------------
    def apply_chat_template(self, conversation: list[Any], tools: list[Any] | None = None,
                            documents: list[Any] | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            **kwargs: Any) -> Any:
        template = self.chat_template
        if (tokenize or template is None or _GENERATION_TAG.search(template)
                or any(kwargs.get(k) for k in HF_ONLY)
                or any(not isinstance(t, dict) for t in tools or [])
                or (conversation and isinstance(conversation[0], (list, tuple)))):
            kwargs.setdefault("chat_template", template)  # this one's, if it was set later
            return self.hf.apply_chat_template(conversation, tools=tools, documents=documents,
                                               add_generation_prompt=add_generation_prompt,
                                               tokenize=tokenize, **kwargs)
        if not conversation:
            raise ValueError("cannot apply a chat template to an empty conversation")
        if documents is not None and any(not isinstance(d, dict) for d in documents):
            raise TypeError("documents must be a list of objects with title and text")
        for key in HF_ONLY:
            kwargs.pop(key, None)
        variables = {**self.special_tokens_map, **_plain(kwargs)}
        return _compile(template).render(messages=_messages(conversation),
                                         tools=_plain(tools), documents=_plain(documents),
                                         add_generation_prompt=add_generation_prompt,
                                         **variables)


def samples(special: list[str]) -> list[str]:
    """Texts a certificate must encode and decode as transformers does: prose, code,
    numbers, runs of spaces and newlines, many scripts, emoji, the special tokens inside
    text, and 200 strings drawn at random (fixed seed) from all of those characters."""
    import random

    fixed = ["Hello world", " leading space", "trailing space ", "don't I'll we've they'RE",
             "def f(x):\n    return x ** 2  # square\n\n\n\tprint(f(3))", "1234567 + 89 = 0.5e-3",
             "naïve café ünïcödé façade", "日本語のテキストと中文文本",
             "한국어 текст العربية हिन्दी",
             "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧", "a\n\n  b\t\tc\r\n d   \n\n\n e", "", " ", "\n",
             "<think>\nstep\n</think>\n\nanswer", "ÅΩ≈ç√∫ ∑∆ ½ ™ © ® ‰ ¶", "\u200b\u00a0\ufeff"]
    fixed += [f"x{t}y {t} {t}{t}\n{t}" for t in special[:32]]
    pool = "".join(fixed) + "abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789 .,;:!?'\"-_()[]{}"
    rng = random.Random(0)
    fixed += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 80))) for _ in range(200)]
    return fixed
