"""OpenAI's Responses API (`/v1/responses`) through `serve` with the official OpenAI client: the same
tokens as the chat completion of the same turns, streamed as Responses events, continued with
previous_response_id, function calls and their outputs as input items, structured outputs, logprobs,
and errors that name the Responses field.
"""

import json
import re

import jsonschema
import openai
import pydantic
import pytest

from conftest import http
from test_openai_client import error_of, raw_post
from test_structured import CLOSING_BIAS, WEATHER


def chat_text(client, messages, **options):
    response = client.chat.completions.create(model="tiny", messages=messages, **options)
    return response.choices[0].message.content, response


def events_of(stream):
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def test_a_response_is_the_chat_completion_of_its_turns_streamed_or_not(client):
    options = dict(max_output_tokens=8, temperature=0)
    response = client.responses.create(model="tiny", instructions="Be brief.", input="Hello", **options)
    text, chat = chat_text(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], max_tokens=8, temperature=0)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == text
    assert (response.status, response.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert (response.usage.input_tokens, response.usage.output_tokens) == (chat.usage.prompt_tokens, 8)
    assert (response.instructions, response.max_output_tokens, response.temperature) == ("Be brief.", 8, 0)
    [message] = response.output
    assert (message.type, message.role, message.id.startswith("msg_")) == ("message", "assistant", True)

    events = events_of(client.responses.create(model="tiny", instructions="Be brief.", input="Hello", stream=True, **options))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    final = events[-1].response
    assert (final.output_text, final.output[0].id, final.usage.output_tokens) == (text, events[2].item.id, 8)


def test_previous_response_id_continues_the_stored_conversation(server, client):
    first = client.responses.create(model="tiny", input="Hi", max_output_tokens=4, temperature=0)
    second = client.responses.create(model="tiny", previous_response_id=first.id, input="Tell me more.", max_output_tokens=4, temperature=0)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "Tell me more."}]
    text, chat = chat_text(client, turns, max_tokens=4, temperature=0)
    assert second.output_text == text
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    # The first turns' KV pages are shared with the new request.
    assert second.usage.input_tokens_details.cached_tokens >= 16

    assert client.responses.retrieve(first.id).output_text == first.output_text
    # The items the second was given: the first's input and output, then its own input. The
    # client's iterator pages through them one at a time (after the last id each time).
    items = list(client.responses.input_items.list(second.id, order="asc", limit=1))
    assert [(i.type, i.role) for i in items] == [("message", "user"), ("message", "assistant"), ("message", "user")]
    assert (items[0].content[0].text, items[1].id, items[2].content[0].text) == ("Hi", first.output[0].id, "Tell me more.")
    newest = client.responses.input_items.list(second.id, include=["message.output_text.logprobs"])
    assert ([i.id for i in newest.data], newest.has_more) == ([i.id for i in reversed(items)], False)
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.input_items.list(second.id, limit=0)
    assert bad.value.body["param"] == "limit"
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_nothing")
    assert client.responses.delete(first.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="tiny", previous_response_id=first.id, input="And?")
    assert missing.value.body["param"] == "previous_response_id" and missing.value.body["code"] == "previous_response_not_found"
    unstored = client.responses.create(model="tiny", input="Hi", max_output_tokens=2, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    # Operators see the store in the metrics.
    metrics = http("GET", f"{server.url}/metrics").text
    assert re.search(r"^llama_webgpu_responses_stored [1-9]", metrics, re.M) and re.search(r"^llama_webgpu_response_store_bytes [1-9]", metrics, re.M), metrics


class Answer(pydantic.BaseModel):
    ok: bool


def test_structured_output_and_logprobs(client):
    response = client.responses.parse(model="tiny", input="Is it ok?", text_format=Answer, temperature=0, max_output_tokens=20,
                                      include=["message.output_text.logprobs"], top_logprobs=2)
    assert response.status == "completed"
    assert isinstance(response.output_parsed, Answer)
    logprobs = response.output[0].content[0].logprobs
    # Every token of the text; the end-of-turn token after them is not in it.
    assert len(logprobs) == response.usage.output_tokens - 1
    assert b"".join(bytes(t.bytes) for t in logprobs).decode() == response.output_text
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in logprobs)
    # The stream helper checks the events' order and builds the same response.
    with client.responses.stream(model="tiny", input="Is it ok?", text_format=Answer, temperature=0, max_output_tokens=20) as stream:
        final = stream.get_final_response()
    assert final.output_text == response.output_text and final.output_parsed == response.output_parsed


def test_function_calls_and_their_outputs_round_trip(tools_server):
    client = tools_server.client()
    tool = {"type": "function", **WEATHER["function"]}
    options = dict(model="tiny", tools=[tool], tool_choice="required", parallel_tool_calls=False, temperature=1, max_output_tokens=60,
                   extra_body={"seed": 7, "logit_bias": CLOSING_BIAS})
    question = [{"role": "user", "content": "Weather in Paris?"}]
    response = client.responses.create(input=question, **options)
    [call] = response.output
    assert (call.type, call.name, call.status, response.status) == ("function_call", "get_weather", "completed", "completed")
    assert response.model == "tools-model"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    chat = client.chat.completions.create(model="tiny", messages=question, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                          temperature=1, max_tokens=60, seed=7, logit_bias=CLOSING_BIAS)
    [chat_call] = chat.choices[0].message.tool_calls
    assert (call.name, call.arguments) == (chat_call.function.name, chat_call.function.arguments)

    events = events_of(client.responses.create(input=question, stream=True, **options))
    kinds = [e.type for e in events]
    assert kinds[2:6] == ["response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done"]
    assert events[-1].response.output[0].arguments == call.arguments

    # The call and its output as input items: the chat of the same turns.
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    answer = client.responses.create(model="tiny", input=[*question, call.model_dump(), output], temperature=0, max_output_tokens=6)
    turns = [*question, {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
             {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    text, _ = chat_text(client, turns, temperature=0, max_tokens=6)
    assert answer.output_text == text


def test_bad_requests_name_the_responses_field(server, client):
    for body, status, param, code in [
        ({"model": "tiny"}, 400, "input", None),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input", "unsupported_parameter"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools", "unsupported_parameter"),
        ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens", None),
        ({"input": "x", "previous_response_id": "resp_nothing"}, 404, "previous_response_id", "previous_response_not_found"),
        # Longer than the fixture's context: the engine blames the input.
        ({"input": "word " * 400}, 400, "input", "context_length_exceeded"),
        ({"input": "word " * 400, "stream": True}, 400, "input", "context_length_exceeded"),
    ]:
        error = error_of(raw_post(server, "/v1/responses", body), status)
        assert (error["param"], error["code"]) == (param, code), (body, error)
    missing = http("DELETE", f"{server.url}/v1/responses/resp_nothing")
    assert error_of(missing, 404)["code"] == "not_found"
