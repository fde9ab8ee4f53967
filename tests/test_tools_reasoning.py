"""Tool-call formats, forced-call grammars, history rendering and the reasoning parser,
on scripted text (no model) and through the real tokenizer's templates."""

from __future__ import annotations

import json

import jsonschema
import pytest

from deepserve.protocol.models import ChatCompletionRequest
from deepserve.server.chat_output import ChatContext, ChoiceStream, shape
from deepserve.server.reasoning import ReasoningParser, prompt_opens_thinking, split_reasoning
from deepserve.server.tools import (
    constraint,
    parse_tool_calls,
    plan_tools,
    render_history,
    tool_format,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"]}}}
# A minimal template in the style of models that render tools and <tool_call> blocks.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n{{ {'name': "
    "c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def request(**kw) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}]} | kw
    return ChatCompletionRequest.model_validate(body)


def test_format_detection():
    assert tool_format(HERMES_TEMPLATE) == ("hermes", True)
    assert tool_format("{{ '<|python_tag|>' }}{% if tools %}{% endif %}") == ("llama3", True)
    assert tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") == (
        "generic", False)


@pytest.mark.parametrize("text,names", [
    ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}',
     ["get_weather"]),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
     '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>',
     ["add", "get_weather"]),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 3, "b": 4}}', ["add"]),
    ('[{"name": "add", "arguments": {"a": 3, "b": 4}}]', ["add"]),
])
def test_each_format_parses(text, names):
    plan = plan_tools(request(tools=[WEATHER, ADD]), None)
    content, calls = parse_tool_calls(text, plan)
    assert content is None
    assert [c["function"]["name"] for c in calls] == names
    for c in calls:
        assert c["id"].startswith("call_") and c["type"] == "function"
        assert isinstance(json.loads(c["function"]["arguments"]), dict)


@pytest.mark.parametrize("text", [
    "Paris is sunny today.",
    '{"tool_calls": [{"name": "unknown_tool", "arguments": {}}]}',
    '{"answer": 42}',
])
def test_text_that_is_not_a_call_stays_content(text):
    plan = plan_tools(request(tools=[WEATHER, ADD]), None)
    assert parse_tool_calls(text, plan) == (text, [])


def test_a_turn_cut_by_max_tokens_keeps_its_complete_calls():
    plan = plan_tools(request(tools=[WEATHER, ADD], tool_choice="required"), None)
    text = ('{"tool_calls":[{"name":"add","arguments":{"a":1,"b":2}},{"name":"get_weather",'
            '"arguments":{"city":"Rome"}},{"name":"add","arguments":{"a":1')
    out = shape(ChatContext(tools=plan), text)
    assert out.content is None  # never the format's own text
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in out.tool_calls] == [("add", {"a": 1, "b": 2}),
                                         ("get_weather", {"city": "Rome"})]
    assert out.finish_reason("length") == "length"
    # cut before any call closed: no calls, and still no raw text as content
    cut = shape(ChatContext(tools=plan), '{"tool_calls":[{"name":"add","argu')
    assert cut.content is None and cut.tool_calls == []
    auto = plan_tools(request(tools=[WEATHER, ADD]), None)
    assert shape(ChatContext(tools=auto), '{"tool_calls": [{"name": "add", "argum').content \
        is None


def test_a_forced_turn_stops_at_a_repeated_call():
    plan = plan_tools(request(tools=[ADD], tool_choice="required"), None)
    one = '{"name":"add","arguments":{"a":12,"b":30}}'
    other = '{"name":"add","arguments":{"a":12,"b":31}}'
    text = '{"tool_calls":[' + ",".join([one, other, other, one]) + "]}"
    stream = ChoiceStream(ChatContext(tools=plan))
    deltas = []
    for i in range(0, len(text), 3):
        deltas += stream.feed(text[i:i + 3], final=False)
        if stream.repeated:
            break
    assert stream.repeated and i < len(text) - 3 - len(one)
    result = stream.result()
    assert [json.loads(c["function"]["arguments"]) for c in result.tool_calls] == [
        {"a": 12, "b": 30}, {"a": 12, "b": 31}]
    assert result.finish_reason("stop") == "tool_calls"
    # the repeat was held back while it matched: only two calls ever went out
    assert {d["tool_calls"][0]["index"] for d in deltas} == {0, 1}
    streamed = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas
                       if d["tool_calls"][0]["index"] == 1)
    assert streamed == result.tool_calls[1]["function"]["arguments"]


def test_plan_errors_and_choices():
    with pytest.raises(ValueError, match="tool_choice names function"):
        plan_tools(request(tools=[WEATHER], tool_choice={"type": "function",
                                                          "function": {"name": "nope"}}), None)
    with pytest.raises(ValueError, match="needs tools"):
        plan_tools(request(tool_choice="required"), None)
    assert plan_tools(request(tools=[WEATHER], tool_choice="none"), None) is None
    named = plan_tools(request(tools=[WEATHER, ADD], tool_choice={
        "type": "function", "function": {"name": "add"}}), None)
    assert named.forced and named.name == "add" and not named.parallel
    assert not plan_tools(request(tools=[WEATHER]), None).forced


def test_forced_grammar_accepts_valid_calls_only():
    plan = plan_tools(request(tools=[WEATHER, ADD], tool_choice="required",
                              parallel_tool_calls=False), None)
    kind, schema = constraint(plan)
    assert kind == "json"
    good = {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}
    jsonschema.validate(good, schema)
    for bad in ({"tool_calls": []},
                {"tool_calls": [{"name": "add", "arguments": {"a": "x", "b": 2}}]},
                {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2, "c": 3}}]},
                {"tool_calls": [good["tool_calls"][0], good["tool_calls"][0]]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    hermes = plan_tools(request(tools=[ADD], tool_choice="required"), HERMES_TEMPLATE)
    kind, lark = constraint(hermes)
    assert kind == "grammar" and "<tool_call>" in lark and "%json" in lark


def test_forced_grammars_compile_in_llguidance(default_gguf):
    from deepserve.engine.structured import GrammarCompiler
    from deepserve.loader.tokenizer import load_tokenizer

    tok = load_tokenizer(default_gguf, "gguf")
    compiler = GrammarCompiler(tok, 49152, {tok.eos_token_id})
    for template in (None, HERMES_TEMPLATE, "{{ '<|python_tag|>' }}{{ tools }}"):
        plan = plan_tools(request(tools=[WEATHER, ADD], tool_choice="required"), template)
        compiler.matcher(compiler.compile(*constraint(plan)))


def test_generic_history_renders_calls_and_results(default_gguf):
    from deepserve.loader.tokenizer import apply_chat_template, load_tokenizer

    tok = load_tokenizer(default_gguf, "gguf")
    req = request(tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}])
    plan = plan_tools(req, tok.chat_template)
    assert plan.fmt == "generic" and not plan.native
    prompt = apply_chat_template(tok, render_history(req, plan, tok.chat_template))
    assert '"name": "get_weather"' in prompt and "reply with only a JSON object" in prompt
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}' in prompt
    assert "Result of tool call call_1 (get_weather): 18 C and sunny" in prompt
    named = render_history(request(messages=[{"role": "user", "content": "hi", "name": "ann"}]),
                           None, None)
    assert named == [{"role": "user", "content": "hi", "name": "ann"}]  # not dropped
    with pytest.raises(ValueError, match="tool_call_id"):
        render_history(request(messages=[{"role": "tool", "content": "x"}]), None, None)


def test_native_template_gets_tools_and_structured_history(default_gguf):
    from deepserve.loader.tokenizer import apply_chat_template, load_tokenizer

    tok = load_tokenizer(default_gguf, "gguf")
    tok.chat_template = HERMES_TEMPLATE
    req = request(tools=[ADD], messages=[
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "tool_calls": [{"id": "c9", "type": "function", "function": {
            "name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c9", "content": "3"}])
    plan = plan_tools(req, tok.chat_template)
    assert plan.native and plan.fmt == "hermes"
    messages = render_history(req, plan, tok.chat_template)
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert messages[2] == {"role": "tool", "content": "3", "tool_call_id": "c9",
                           "name": "add"}
    prompt = apply_chat_template(tok, messages, tools=plan.tools)
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nTools:") and '"name": "add"' in system
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in prompt
    assert "<|im_start|>tool\n3<|im_end|>" in prompt
    assert "reply with only a JSON object" not in prompt  # no generic preamble


def test_streamed_tool_calls_come_as_argument_fragments_while_generated():
    plan = plan_tools(request(tools=[ADD], tool_choice="required"), None)
    stream = ChoiceStream(ChatContext(tools=plan))
    text = '{"tool_calls":[{"name":"add","arguments":{"a":12,"b":30}}]}'
    deltas, early = [], 0
    for i in range(0, len(text), 5):  # token-sized pieces
        deltas += stream.feed(text[i:i + 5], final=False)
        if i + 5 < len(text) - 3:
            early = len(deltas)
    assert early >= 3  # the header and fragments came before the last piece
    deltas += stream.feed("", final=True)
    first = deltas[0]["tool_calls"][0]
    assert first["index"] == 0 and first["id"].startswith("call_")
    assert first["function"] == {"name": "add", "arguments": ""}
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:])
    assert json.loads(args) == {"a": 12, "b": 30}
    assert args == stream.result().tool_calls[0]["function"]["arguments"]
    assert all(set(d["tool_calls"][0]) == {"index", "function"} for d in deltas[1:])
    assert stream.finish_reason("stop") == "tool_calls"


def test_auto_streams_plain_answers_at_once():
    plan = plan_tools(request(tools=[ADD]), None)
    stream = ChoiceStream(ChatContext(tools=plan))
    assert stream.feed("  ", final=False) == []  # too early to tell
    assert stream.feed("Hello", final=False) == [{"content": "  Hello"}]
    assert stream.feed(" there", final=False) == [{"content": " there"}]
    assert stream.finish_reason("stop") == "stop"


# -- reasoning ---------------------------------------------------------------------------
def feed_all(pieces, starts_inside=False):
    p = ReasoningParser(starts_inside)
    parts = [p.feed(x) for x in pieces] + [p.feed("", final=True)]
    return "".join(x.reasoning for x in parts), "".join(x.content for x in parts)


@pytest.mark.parametrize("pieces", [
    ["<think>", "I add 2 and 2.", "</think>", "\n\n4"],
    ["<th", "ink>I add ", "2 and 2.</th", "ink>\n", "\n4"],
    ["<", "t", "h", "i", "n", "k", ">", "I add 2 and 2.", "<", "/", "think", ">", "4"],
    ["  <think>I add 2 and 2.</think>4"],
])
def test_think_tags_split_across_pieces(pieces):
    assert feed_all(pieces) == ("I add 2 and 2.", "4")


def test_no_closing_tag_is_all_reasoning_and_no_tag_is_all_content():
    assert feed_all(["<think>still ", "thinking"]) == ("still thinking", "")
    assert feed_all(["just ", "an answer <think> here"]) == ("", "just an answer <think> here")
    assert split_reasoning("no tags at all") == (None, "no tags at all")


def test_prompt_that_opens_the_block_starts_inside():
    assert prompt_opens_thinking("<|Assistant|><think>\n")
    assert not prompt_opens_thinking("<think>old</think> new turn")
    assert feed_all(["step one ", "</think>", "answer"], starts_inside=True) == (
        "step one ", "answer")
    assert feed_all(["a <b> not a tag ", "</think>x"], starts_inside=True) == (
        "a <b> not a tag ", "x")


def test_reasoning_then_tool_call():
    plan = plan_tools(request(tools=[ADD]), None)
    out = shape(ChatContext(tools=plan, reasoning=True),
                '<think>I should add.</think>{"tool_calls": [{"name": "add", '
                '"arguments": {"a": 1, "b": 1}}]}')
    assert out.reasoning == "I should add." and out.content is None
    assert out.tool_calls[0]["function"]["name"] == "add"
    assert out.message()["reasoning_content"] == "I should add."


# -- the Responses API's translation, and reasoning_effort --------------------------------
def test_reasoning_effort_switches_the_templates_thinking():
    from deepserve.server.chat_setup import template_options, thinking_switch

    qwen3 = ("{%- if enable_thinking is defined and enable_thinking is false %}"
             "<think>\n\n</think>{%- endif %}")
    assert thinking_switch(qwen3) == "enable_thinking"
    assert thinking_switch("{% if thinking %}<think>{% endif %}") == "thinking"
    assert thinking_switch("{{ messages }}") is None
    for effort, on in (("none", False), ("minimal", False), ("low", True), ("high", True)):
        assert template_options(request(reasoning_effort=effort), None, qwen3)[
            "enable_thinking"] is on
    # the request's own template kwargs win; a template without a switch gets nothing
    assert template_options(request(reasoning_effort="none", chat_template_kwargs={
        "enable_thinking": True}), None, qwen3)["enable_thinking"] is True
    assert "enable_thinking" not in template_options(request(reasoning_effort="low"), None,
                                                     "{{ messages }}")


def test_responses_events_from_chat_chunks_with_reasoning_and_a_call():
    from deepserve.server.responses import ResponsesRequest, envelope
    from deepserve.server.responses_stream import EventStream

    req = ResponsesRequest.model_validate({"input": "x", "tools": [
        {"type": "function", "name": "add", "parameters": {}}]})
    events = EventStream(envelope(req, "resp_1", "m", 0.0), None)
    out = events.start()
    for delta in ({"reasoning_content": "I add."}, {"reasoning_content": " Done."},
                  {"content": "Sure."},
                  {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": "add", "arguments": ""}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}):
        out += events.feed({"choices": [{"index": 0, "delta": delta}]})
    call = {"id": "call_1", "type": "function", "function": {"name": "add",
                                                             "arguments": '{"a":1}'}}
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
             "prompt_tokens_details": {"cached_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": 4}}
    tail, final = events.end([call], "tool_calls", usage)
    kinds = [json.loads(e.split("data: ", 1)[1])["type"] for e in out + tail]
    assert kinds[:3] == ["response.created", "response.in_progress",
                         "response.output_item.added"]
    assert kinds.count("response.reasoning_text.delta") == 2
    assert kinds.count("response.function_call_arguments.delta") == 2
    assert kinds[-1] == "response.completed"
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "I add. Done."
    assert final["output"][2]["arguments"] == '{"a":1}'
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 4
    # a call the cut dropped is not in the final output, and its item says incomplete
    events = EventStream(envelope(req, "resp_2", "m", 0.0), None)
    events.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_9", "type": "function",
         "function": {"name": "add", "arguments": '{"a'}}]}}]})
    tail, final = events.end([], "length", usage)
    assert final["status"] == "incomplete" and final["output"] == []
    assert '"status": "incomplete"' in tail[-2]
    # not streamed: the chat message's parts, in the same order
    from deepserve.server.responses import output_items

    items = output_items({"reasoning_content": "r", "content": "c", "tool_calls": [call]},
                         None)
    assert [i["type"] for i in items] == ["reasoning", "message", "function_call"]
    assert items[2]["call_id"] == "call_1" and items[2]["arguments"] == '{"a":1}'
    assert len(output_items({"tool_calls": [call] * 3}, 1)) == 1  # max_tool_calls
