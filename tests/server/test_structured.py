"""Structured outputs, tool calls and logprobs through `serve` with the official OpenAI client.

The model is the tiny random-weight fixture: it "wants" garbage, so the grammar does all the work.
Each proof runs 50 seeds as one request's 50 choices (choice i samples with seed + i). A bias on the
quote, `]` and `}` tokens makes it close strings and containers soon enough to end within
max_tokens; outputs are checked with `jsonschema`, an independent validator.
"""

import json
from typing import Literal

import jsonschema
import pydantic
import pytest

SEEDS = 50
CLOSING_BIAS = {"1": 4, "60": 4, "92": 4}


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    floor: int = pydantic.Field(ge=0, le=99)


class Order(pydantic.BaseModel):
    size: Literal["S", "M", "L"]
    count: int = pydantic.Field(ge=1, le=9)
    gift: bool
    tags: list[str] = pydantic.Field(max_length=3)
    address: Address


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}


def messages(text):
    return [{"role": "user", "content": text}]


def test_json_schema_outputs_validate_for_50_seeds(tools_server):
    client = tools_server.client()
    response = client.chat.completions.parse(
        model="tiny", messages=messages("An order, please."), response_format=Order, n=SEEDS, seed=1,
        temperature=1, max_tokens=120, logit_bias=CLOSING_BIAS,
    )
    schema = Order.model_json_schema()
    for seed, choice in enumerate(response.choices):
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert isinstance(choice.message.parsed, Order), seed
    # json_object: any object.
    response = client.chat.completions.create(
        model="tiny", messages=messages("JSON please."), response_format={"type": "json_object"}, n=SEEDS, seed=1,
        temperature=1, max_tokens=120, logit_bias=CLOSING_BIAS,
    )
    for choice in response.choices:
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content


def test_required_tool_calls_validate_for_50_seeds(tools_server):
    client = tools_server.client()
    tools = [WEATHER, TIME]
    options = dict(model="tiny", messages=messages("Weather in Paris?"), tools=tools, tool_choice="required", seed=7,
                   temperature=1, max_tokens=60, logit_bias=CLOSING_BIAS, parallel_tool_calls=False)
    response = client.chat.completions.create(n=SEEDS, **options)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for seed, choice in enumerate(response.choices):
        assert choice.finish_reason == "tool_calls", (seed, choice.message)
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])

    # Streamed: the same call, as tool-call deltas before the finish chunk.
    chunks = list(client.chat.completions.create(stream=True, **options))
    deltas = [tc for c in chunks for choice in c.choices for tc in (choice.delta.tool_calls or [])]
    first = response.choices[0].message.tool_calls[0]
    assert [(d.index, d.id, d.function.name, d.function.arguments) for d in deltas] == [(0, deltas[0].id, first.function.name, first.function.arguments)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]

    # A named function: every call is of it.
    named = client.chat.completions.create(n=4, **{**options, "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert {c.message.tool_calls[0].function.name for c in named.choices} == {"get_time"}
    assert {c.message.tool_calls[0].function.arguments for c in named.choices} == {"{}"}


def test_logprobs(tools_server):
    client = tools_server.client()
    options = dict(model="tiny", messages=messages("Hi"), temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    response = client.chat.completions.create(**options)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert b"".join(bytes(t.bytes) for t in content).decode(errors="replace") == response.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        # Greedy: the token is the most likely one.
        assert token.top_logprobs[0].logprob == token.logprob
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob >= token.top_logprobs[2].logprob
    streamed = [t for c in client.chat.completions.create(stream=True, **options) for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    # The same tokens; the prompt, cached this time, is computed in another split, so the last digits may differ.
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)

    completion = client.completions.create(model="tiny", prompt="Once upon", temperature=0, max_tokens=6, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
