"""A reasoning model's thought apart from its answer, through `serve` with the official OpenAI client.

The server runs the tiny random-weight fixture as a reasoning model (conftest's `thinking_server`):
its template opens the thought, a bias on `</think>` makes the random model end it within a few
dozen tokens, and the answer follows.
"""

import json

from conftest import THINK_END

CHOICES = 4
# `</think>` raised, and the quote, `]` and `}` (which close JSON soon) for the structured answer.
BIAS = {str(THINK_END): 3, "1": 4, "60": 4, "92": 4}


def request(**extra):
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "n": CHOICES,
        "seed": 5,
        "temperature": 1.0,
        "max_tokens": 60,
        "logit_bias": BIAS,
        **extra,
    }


def thought_of(message):
    extra = message.model_extra or {}
    assert extra.get("reasoning") == extra.get("reasoning_content"), "both names carry the thought"
    return extra.get("reasoning_content")


def test_thoughts_stream_apart_from_the_answer(thinking_server):
    client = thinking_server.client()
    whole = client.chat.completions.create(**request())
    thoughts = [thought_of(choice.message) for choice in whole.choices]
    assert all(isinstance(thought, str) for thought in thoughts), thoughts
    ended = [THINK_END in choice.model_extra["token_ids"] for choice in whole.choices]
    assert any(ended), "the bias ends a thought"
    for choice, done in zip(whole.choices, ended):
        if not done:
            assert choice.message.content == "", "a thought cut short leaves no answer"
    assert 0 < whole.usage.completion_tokens_details.reasoning_tokens <= whole.usage.completion_tokens

    # The same seeds streamed: each choice's deltas of thought and of answer join into its message.
    streamed = {i: {"reasoning": "", "content": ""} for i in range(CHOICES)}
    for chunk in client.chat.completions.create(**request(), stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            extra = delta.model_extra or {}
            streamed[choice.index]["reasoning"] += extra.get("reasoning_content") or ""
            streamed[choice.index]["content"] += delta.content or ""
            assert not (extra.get("reasoning_content") and delta.content), "a delta is thought or answer"
    for i, choice in enumerate(whole.choices):
        assert streamed[i] == {"reasoning": thoughts[i], "content": choice.message.content}, i

    # The answer's message sent back as the client got it (both names of the thought) is taken.
    answered = whole.choices[ended.index(True)].message
    again = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}, answered.model_dump(exclude_none=True), {"role": "user", "content": "More?"}],
        max_tokens=2,
    )
    assert again.choices[0].finish_reason in ("length", "stop")


def test_a_json_answer_follows_a_free_thought(thinking_server):
    client = thinking_server.client()
    whole = client.chat.completions.create(**request(response_format={"type": "json_object"}))
    answers = [choice for choice in whole.choices if THINK_END in choice.model_extra["token_ids"] and choice.finish_reason == "stop"]
    assert answers, "a thought ends and its answer is complete"
    for choice in answers:
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content


def test_a_response_gives_its_thought_as_a_reasoning_item(thinking_server):
    client = thinking_server.client()
    options = dict(model="tiny", input="Why is the sky blue?", max_output_tokens=60, temperature=1.0, extra_body={"seed": 7, "logit_bias": BIAS})
    events = list(client.responses.create(**options, stream=True))
    kinds = [event.type for event in events]
    assert kinds[2] == "response.output_item.added" and events[2].item.type == "reasoning", kinds
    thought = "".join(event.delta for event in events if event.type == "response.reasoning_text.delta")
    response = events[-1].response
    item = response.output[0]
    assert item.type == "reasoning" and item.content[0].text == thought
    assert response.usage.output_tokens_details.reasoning_tokens > 0
    # Given back as input, as clients pass a response's output on.
    follow_up = client.responses.create(
        model="tiny", input=[*[entry.model_dump(exclude_none=True) for entry in response.output], {"role": "user", "content": "More?"}], max_output_tokens=2
    )
    assert follow_up.status in ("completed", "incomplete")
