"""The API agents use, against a real server with the real default model: tool calling
with every tool_choice (streaming and not), a two-turn tool loop with the openai SDK and
with LangChain, structured outputs, logit_bias, echo with prompt logprobs, tokenize,
reasoning output, and the strict request contract."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from server_utils import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "add": ADD["function"]["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess("--reasoning-parser", "deepseek_r1",
                        log_dir=tmp_path_factory.mktemp("agents"))
    yield srv
    assert srv.stop() == 0, srv.log_path.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


def valid_calls(calls) -> list[tuple[str, dict]]:
    out = []
    for c in calls:
        assert c.id.startswith("call_") and c.type == "function"
        args = json.loads(c.function.arguments)
        jsonschema.validate(args, SCHEMAS[c.function.name])
        out.append((c.function.name, args))
    return out


def test_required_tool_choice_gives_calls_that_validate(client):
    # Room for the most calls a turn may hold (8): a small model tends to repeat them.
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, ADD],
                                       tool_choice="required", temperature=0, max_tokens=400)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert 1 <= len(valid_calls(choice.message.tool_calls)) <= 8


def test_named_tool_choice_calls_that_function_only(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, ADD], temperature=0.8, seed=seed,
            tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=60)
        calls = valid_calls(r.choices[0].message.tool_calls)
        assert [name for name, _ in calls] == ["add"]
        assert r.choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_gives_one_call(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                       tool_choice="required", parallel_tool_calls=False,
                                       temperature=0, max_tokens=60)
    assert len(valid_calls(r.choices[0].message.tool_calls)) == 1


def test_none_and_auto_answer_in_prose_or_valid_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                       tool_choice="none", temperature=0, max_tokens=20)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                       temperature=0, max_tokens=20)
    m = r.choices[0].message
    if m.tool_calls:
        valid_calls(m.tool_calls)
        assert r.choices[0].finish_reason == "tool_calls"
    else:
        assert m.content and r.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_calls_assemble_into_valid_calls(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, ADD], tool_choice="required",
        temperature=0, max_tokens=400, stream=True, stream_options={"include_usage": True})
    calls: dict[int, dict] = {}
    finish = None
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            assert not ch.delta.content
            for d in ch.delta.tool_calls or []:
                if d.id is not None:  # the first delta of a call: id, type and name
                    assert d.index not in calls and d.type == "function"
                    assert d.function.name and d.function.arguments == ""
                    calls[d.index] = {"id": d.id, "name": d.function.name, "args": ""}
                else:
                    assert d.function.name is None
                    calls[d.index]["args"] += d.function.arguments
    assert finish == "tool_calls" and calls
    for c in calls.values():
        jsonschema.validate(json.loads(c["args"]), SCHEMAS[c["name"]])
    assert usage.completion_tokens > 0


def test_two_turn_tool_loop_with_the_sdk(client, server):
    messages = list(ASK)
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = first.choices[0].message
    messages.append(message)  # the SDK's own message object, as agent code appends it
    for call in message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id,
                         "content": "18 degrees and sunny"})
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                           tool_choice="none", temperature=0, max_tokens=40)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    # The call and its result are in the prompt the model saw.
    body = {"messages": [m if isinstance(m, dict) else m.model_dump(exclude_none=True)
                         for m in messages]}
    ids = httpx.post(f"{server.url}/tokenize", json=body).json()["tokens"]
    prompt = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '"name": "get_weather"' in prompt
    assert f"Result of tool call {message.tool_calls[0].id} (get_weather): 18 degrees" in prompt


def test_langchain_agent_tool_loop(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="x", model=MODEL, temperature=0,
                     max_tokens=60, max_retries=0)
    agent = llm.bind_tools([multiply], tool_choice="required", parallel_tool_calls=False)
    messages = [HumanMessage("What is 6 times 7? Use the multiply tool.")]
    ai = agent.invoke(messages)
    assert len(ai.tool_calls) == 1 and ai.tool_calls[0]["name"] == "multiply"
    args = ai.tool_calls[0]["args"]
    assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    messages.append(ai)
    messages.append(ToolMessage(str(multiply.invoke(args)), tool_call_id=ai.tool_calls[0]["id"]))
    final = llm.bind_tools([multiply], tool_choice="none").invoke(messages)
    assert isinstance(final.content, str) and final.content and not final.tool_calls


class City(BaseModel):
    # Bounded, so a 135M model cannot spin out an endless number before the token limit.
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population: int = Field(ge=0, le=100_000_000)


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City, temperature=0, max_tokens=100)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, City) and 0 <= parsed.population <= 100_000_000


def test_logit_bias_banning_the_greedy_token_changes_the_output(client):
    ask = dict(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0)
    first = client.completions.create(**ask, logprobs=1)
    greedy = first.choices[0].logprobs.tokens[0]
    ids = httpx.post(f"{client.base_url}".replace("/v1/", "") + "/tokenize",
                     json={"prompt": "The capital of France is" + greedy}).json()["tokens"]
    base = httpx.post(f"{client.base_url}".replace("/v1/", "") + "/tokenize",
                      json={"prompt": "The capital of France is"}).json()["tokens"]
    token = ids[len(base)]
    banned = client.completions.create(**ask, logit_bias={str(token): -100}, logprobs=1)
    assert banned.choices[0].logprobs.tokens[0] != greedy
    assert banned.choices[0].text != first.choices[0].text
    boosted = client.completions.create(**ask, logit_bias={"28": 100})  # "=" everywhere
    assert boosted.choices[0].text == client.completions.create(
        **ask, logit_bias={"28": 100}).choices[0].text


def test_unknown_and_unimplemented_fields_are_400(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2,
                                       extra_body={"frobnicate": True})
    assert "Unrecognized request argument supplied: frobnicate" in str(info.value)
    for field, value in (("audio", {"voice": "alloy", "format": "wav"}),
                         ("prediction", {"type": "content", "content": "x"}),
                         ("reasoning_effort", "extreme"), ("metadata", {"k": 5}),
                         ("store", True)):
        r = httpx.post(f"{server.url}/v1/chat/completions",
                       json={"messages": ASK, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith(field), r.text
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "best_of": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "suffix": "b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    ok = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, n=1,
                                        extra_body={"best_of": 1, "store": False})
    assert ok.choices[0].message.content is not None


@pytest.mark.parametrize("extra,check", [
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"guided_regex": "[0-9]{3}-[0-9]{4}"}, lambda t: len(t) == 8 and t[3] == "-"),
    ({"structured_outputs": {"grammar": 'start: "cat" | "dog" | "bird"'}},
     lambda t: t in ("cat", "dog", "bird")),
    ({"structured_outputs": {"choice": ["red", "green"]}}, lambda t: t in ("red", "green")),
    # a bounded integer and no other keys, so the object closes well inside max_tokens
    # whatever is sampled (unbounded, 4 of 15 seeds ran on digits or extra keys past 40
    # tokens; with bounds, 20 of 20 closed)
    ({"guided_json": {"type": "object",
                      "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 999}},
                      "required": ["x"], "additionalProperties": False}},
     # compact JSON by default: no whitespace for a sampled model to ramble in
     lambda t: 0 <= json.loads(t)["x"] <= 999 and not any(c.isspace() for c in t)),
])
def test_guided_decoding(client, extra, check):
    r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=40, temperature=0.9,
                                  seed=1, extra_body=extra)
    assert check(r.choices[0].text), r.choices[0].text


def test_guided_errors_name_the_field(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "guided_regex": "("})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"
    r = httpx.post(f"{server.url}/v1/completions", json={
        "prompt": "a", "guided_regex": "a", "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "give only one" in r.json()["error"]["message"]


def test_echo_with_prompt_logprobs(client):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0,
                                  echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text.startswith(prompt)
    lp = c.logprobs
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert "".join(lp.tokens) == c.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(t) <= 3 for t in lp.top_logprobs[1:])  # the chosen one plus top 2
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]


def test_tokenize_and_detokenize(server):
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world",
                                                   "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == 2 and r["max_model_len"] == 8192
    assert r["token_strs"][0] == "Hello"
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": "Hello world"}
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": ASK}).json()
    assert chat["count"] > 10
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(f"{server.url}/tokenize", json={"text": "x"}).status_code == 400


def test_reasoning_content_split_streamed_and_counted(client):
    # The default model does not think by itself; a regex makes it write a <think> block.
    extra = {"guided_regex": "<think>[a-z ]{10,40}</think>\n\n[A-Za-z ]{3,30}"}
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=0,
                                       extra_body=extra)
    m = r.choices[0].message
    reasoning = m.model_extra["reasoning_content"]
    assert reasoning and "<think>" not in reasoning and "</think>" not in m.content
    assert m.content and "<think>" not in m.content
    assert 0 < r.usage.completion_tokens_details.reasoning_tokens < r.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60,
                                            temperature=0, extra_body=extra, stream=True)
    got_reasoning = got_content = ""
    for chunk in stream:
        for ch in chunk.choices:
            got_reasoning += (ch.delta.model_extra or {}).get("reasoning_content") or ""
            got_content += ch.delta.content or ""
    assert got_reasoning == reasoning and got_content == m.content
