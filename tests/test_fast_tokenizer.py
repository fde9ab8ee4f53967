"""The served tokenizer (tokenizers + jinja2, no transformers at start) against
transformers' own tokenizer for the same saved folder: token ids, text, special tokens,
vocabulary and rendered chat templates must be identical."""

import subprocess
import sys

import pytest

from deepserve.loader.fast_tokenizer import FastTokenizer

TEXTS = ["Hello world", " leading space", "<|im_start|>user\nhi<|im_end|>", "trailing  ",
         "émoji 🎉 and 中文 and عربى", "a\n\n\tb\r\n", "", "<|endoftext|><|endoftext|>",
         "def f(x):\n    return x ** 2  # comment", "1234567890 3.14159"]

# Written for these tests: each construct chat templates use (namespace, loop controls,
# tojson with options, raise_exception, strftime_now, tools, documents, reasoning,
# caller variables, special tokens).
RICH_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(sys=none, n=0) %}"
    "{% if messages[0].role == 'system' %}{% set ns.sys = messages[0].content %}{% endif %}"
    "<|im_start|>system\n{{ ns.sys or 'Default system.' }} Year {{ strftime_now('%Y')|length }}"
    "{% if tools %}\nTools:{% for t in tools %}\n{{ t | tojson(indent=2) }}{% endfor %}{% endif %}"
    "{% if documents %}{% for d in documents %}\n[{{ loop.index }}] {{ d.title }}: {{ d.text }}"
    "{% endfor %}{% endif %}{% if enable_thinking is defined and not enable_thinking %}"
    "\n/no_think{% endif %}<|im_end|>\n"
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{% if m.role not in ['user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{% if m.reasoning_content %}<think>{{ m.reasoning_content }}"
    "</think>{% endif %}{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}{% if m.name is defined %}"
    " ({{ m.name }}){% endif %}<|im_end|>\n{% if ns.n > 20 %}{% break %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ça va? 🎉"},
     {"role": "assistant", "content": "Oui.", "reasoning": "french"},
     {"role": "user", "content": "<tag> & \"quotes\"", "name": "ann"}],
    [{"role": "user", "content": "1+2?"},
     {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
      "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
     {"role": "tool", "content": "3", "tool_call_id": "c1"}],
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Adds é",
          "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]


def tokenizer_gguf(default_gguf, folder, arch: str):
    """A GGUF of architecture ``arch`` holding only the default model's tokenizer fields."""
    import gguf
    from tiny_models import _tokenizer_fields

    path = folder / f"{arch}-tokenizer.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    for name, value, vtype, sub in _tokenizer_fields(default_gguf):
        w.add_key_value(name, value, vtype, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def outcome(fn, *args, **kwargs):
    """The rendered text, or the error's type and message: a template that fails must
    fail the same way in both."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # compared, not handled
        return type(exc).__name__, str(exc)


@pytest.fixture(scope="module")
def pair(default_gguf):
    from deepserve.loader.tokenizer import load_tokenizer

    fast = load_tokenizer(default_gguf, "gguf")
    assert isinstance(fast, FastTokenizer)
    return fast, fast.hf


def test_ids_text_and_special_tokens_match_transformers(pair):
    fast, hf = pair
    for text in TEXTS:
        for special in (True, False):
            ids = hf.encode(text, add_special_tokens=special)
            assert fast.encode(text, add_special_tokens=special) == ids, text
            for skip in (True, False):
                assert fast.decode(ids, skip_special_tokens=skip) == \
                    hf.decode(ids, skip_special_tokens=skip)
            assert fast.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert fast.decode(2) == hf.decode(2) == "<|im_end|>"
    assert fast.get_vocab() == hf.get_vocab() and len(fast) == len(hf)
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id", "eos_token",
                 "special_tokens_map"):
        assert getattr(fast, attr) == getattr(hf, attr), attr
    assert sorted(fast.all_special_ids) == sorted(hf.all_special_ids)
    assert fast.chat_template == hf.chat_template
    assert fast.padding_side == hf.padding_side  # anything else comes from transformers


@pytest.mark.parametrize("template", [None, RICH_TEMPLATE], ids=["model", "rich"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_templates_render_as_transformers_does(pair, template, conversation):
    fast, hf = pair
    messages = CONVERSATIONS[conversation]
    saved = fast.chat_template
    try:
        if template is not None:
            fast.chat_template = template
        kwargs_sets = [{}, {"enable_thinking": False, "bos_token": "<override>"}]
        rendered = 0
        for gen in (True, False):
            for tools in (None, TOOLS):
                for extra in kwargs_sets:
                    docs = [{"title": "T", "text": "body"}] if extra else None
                    ours = outcome(fast.apply_chat_template, messages, tools=tools,
                                   documents=docs, add_generation_prompt=gen, tokenize=False,
                                   **extra)
                    theirs = outcome(hf.apply_chat_template, messages, tools=tools,
                                     documents=docs, add_generation_prompt=gen, tokenize=False,
                                     chat_template=fast.chat_template, **extra)
                    assert ours == theirs
                    rendered += isinstance(ours, str)
        # the model's own template reads every message's content, which a call lacks
        assert rendered >= 4 or (template is None and conversation == 2)
    finally:
        fast.chat_template = saved


def test_template_errors_and_transformers_only_options(pair):
    import jinja2

    fast, hf = pair
    saved = fast.chat_template
    try:
        fast.chat_template = RICH_TEMPLATE
        with pytest.raises(jinja2.TemplateError, match="unknown role robot"):
            fast.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
        with pytest.raises(jinja2.exceptions.SecurityError):
            fast.chat_template = "{% set ns = namespace() %}{% set ns._x = 1 %}"
            fast.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    finally:
        fast.chat_template = saved
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Par"}]
    # continue_final_message and tokenize=True are rendered by transformers itself
    assert fast.apply_chat_template(messages, continue_final_message=True, tokenize=False) == \
        hf.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert fast.apply_chat_template(messages, add_generation_prompt=True) == \
        hf.apply_chat_template(messages, add_generation_prompt=True)
    saved = fast.chat_template
    try:  # a template set after load reaches transformers too
        fast.chat_template = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
        assert fast.apply_chat_template(messages, continue_final_message=True,
                                        tokenize=False) == "[hi][Par"
    finally:
        fast.chat_template = saved


def test_llguidance_tokenizer_from_the_fast_one(pair):
    from deepserve.engine.structured import GrammarCompiler

    fast, _ = pair
    compiler = GrammarCompiler(fast, 49152, {fast.eos_token_id})
    grammar = compiler.compile("choice", ["Paris", "London"])
    matcher = compiler.matcher(grammar)
    assert matcher is not None


def test_a_start_does_not_import_transformers(default_gguf, pair):
    """The point of the class: the cached tokenizer loads without transformers."""
    code = ("import sys; from deepserve.loader.tokenizer import load_tokenizer; "
            f"t = load_tokenizer(__import__('pathlib').Path({str(default_gguf)!r}), 'gguf'); "
            "print(type(t).__name__, 'transformers' in sys.modules, t.encode('hi'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[:2] == ["FastTokenizer", "False"]


def test_folders_it_cannot_reproduce_go_to_transformers(pair, tmp_path, monkeypatch):
    import json
    import shutil

    from deepserve.loader.tokenizer import load_tokenizer

    fast, _ = pair
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(fast.folder / name, tmp_path / name)
    assert isinstance(load_tokenizer(tmp_path, "hf"), FastTokenizer)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        config | {"tokenizer_class": "LlamaTokenizerFast"}))
    assert FastTokenizer.open(tmp_path) is None
    assert not isinstance(load_tokenizer(tmp_path, "hf"), FastTokenizer)
    for key in ("add_bos_token", "add_eos_token", "add_prefix_space"):  # transformers acts
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {key: True}))
        assert FastTokenizer.open(tmp_path) is None, key
    monkeypatch.setenv("DEEPSERVE_TOKENIZER", "transformers")
    assert not isinstance(load_tokenizer(fast.folder, "hf"), FastTokenizer)


def test_a_class_that_rebuilds_its_pipeline_is_certified_then_served_fast(
        default_gguf, tmp_path, monkeypatch):
    """A qwen3 GGUF's tokenizer is transformers' Qwen2Tokenizer: read back from a saved
    folder it rebuilds its own pre-tokenizer (newlines split otherwise) instead of the
    one it built from the file. The first start checks the file's pipeline against the
    tokenizers library and saves it; later starts serve it without transformers, with
    the ids and text of the first start on every sample and these tests' texts. A
    cache entry from before certificates is rebuilt from the file once."""
    from deepserve.loader import tokenizer as T
    from deepserve.loader.fast_tokenizer import CERTIFIED, samples

    path = tokenizer_gguf(default_gguf, tmp_path, "qwen3")
    monkeypatch.setenv("DEEPSERVE_CACHE_DIR", str(tmp_path / "cache"))
    hf = T.load_tokenizer(path, "gguf")
    assert type(hf).__name__ == "Qwen2Tokenizer"
    folder = T._cache_dir(path)
    assert (folder / CERTIFIED).is_file()
    texts = TEXTS + samples(list(hf.all_special_tokens))
    reread = T._hf_tokenizer(folder)
    assert any(reread.encode(t) != hf.encode(t) for t in texts)  # why the file decides
    for rebuilt in (False, True):
        if rebuilt:  # a cache saved before certificates: rebuilt, certified again
            (folder / CERTIFIED).unlink()
            assert type(T.load_tokenizer(path, "gguf")).__name__ == "Qwen2Tokenizer"
            assert (folder / CERTIFIED).is_file()
        fast = T.load_tokenizer(path, "gguf")
        assert isinstance(fast, FastTokenizer)
        for text in texts:
            ids = hf.encode(text)
            assert fast.encode(text) == ids, text
            assert fast.decode(ids) == hf.decode(ids)
        assert (fast.eos_token_id, fast.chat_template) == (hf.eos_token_id, hf.chat_template)


def test_no_certificate_where_transformers_differs(pair, tmp_path):
    """One sample encoded differently and nothing is saved: transformers keeps
    serving that folder."""
    import shutil

    from deepserve.loader.fast_tokenizer import CERTIFIED

    fast, hf = pair
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(fast.folder / name, tmp_path / name)

    class Off:  # transformers' tokenizer, one id off on one text
        def __getattr__(self, name):
            return getattr(hf, name)

        def __len__(self):
            return len(hf)

        def encode(self, text, add_special_tokens=True):
            ids = hf.encode(text, add_special_tokens=add_special_tokens)
            return [*ids, 0] if text == "1234567 + 89 = 0.5e-3" else ids

    assert FastTokenizer.certify(tmp_path, hf)
    (tmp_path / CERTIFIED).unlink()
    assert not FastTokenizer.certify(tmp_path, Off())
    assert not (tmp_path / CERTIFIED).exists()



def test_grammar_masks_leave_exactly_the_tokens_llguidance_allows(pair):
    """apply_grammar_masks unpacks llguidance's bitmask with plain torch ops (no
    torch.compile kernel): the finite logits are exactly the set bits, read one by one
    in Python, for two constrained rows of three; the unconstrained row is untouched."""
    import llguidance.torch as lt
    import torch

    from deepserve.engine.structured import GrammarCompiler, apply_grammar_masks

    fast, _ = pair
    compiler = GrammarCompiler(fast, 49152, {fast.eos_token_id})
    matchers = [compiler.matcher(compiler.compile("choice", ["Paris", "London"])),
                compiler.matcher(compiler.compile("json", {"type": "integer"}))]
    bits = lt.allocate_token_bitmask(2, 49152)
    for k, m in enumerate(matchers):
        lt.fill_next_token_bitmask(m, bits, k)
    words = bits.tolist()
    want = [{32 * w + b for w, word in enumerate(row) for b in range(32)
             if (word >> b) & 1 and 32 * w + b < 49152} for row in words]
    assert all(0 < len(w) < 49152 for w in want)
    logits = torch.randn(3, 49152)
    before = logits[1].clone()
    apply_grammar_masks(logits, [(0, matchers[0]), (2, matchers[1])])
    for row, allowed in ((0, want[0]), (2, want[1])):
        assert set(torch.isfinite(logits[row]).nonzero().flatten().tolist()) == allowed
    assert torch.equal(logits[1], before)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3moe"])
def test_gguf_tokenizer_is_autotokenizers_without_its_full_parse(arch, default_gguf, tmp_path,
                                                                 monkeypatch):
    """A first start builds a GGUF's tokenizer with the class AutoTokenizer picks for the
    file's architecture, straight from the tokenizer fields (AutoTokenizer itself first
    parses every field with the gguf package, 2-3 s for the default model's vocabulary):
    the same class and, saved, the same files byte for byte as AutoTokenizer's."""
    import transformers

    from deepserve.loader import tokenizer as T

    path = tokenizer_gguf(default_gguf, tmp_path, arch)
    want = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)

    def refuse(*args, **kwargs):
        raise AssertionError("AutoTokenizer was asked")

    with monkeypatch.context() as m:
        m.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
        got = T._gguf_tokenizer(path)
    assert type(got) is type(want)
    got.save_pretrained(str(tmp_path / "got"))
    want.save_pretrained(str(tmp_path / "want"))
    names = sorted(p.name for p in (tmp_path / "want").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "got").iterdir())
    assert "tokenizer.json" in names
    for name in names:
        assert (tmp_path / "got" / name).read_bytes() == \
            (tmp_path / "want" / name).read_bytes(), name
