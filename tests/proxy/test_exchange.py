"""Reading token usage from what passed through, without keeping text."""

from __future__ import annotations

from appliance.proxy.exchange import STREAM_TAIL, Exchange


def test_usage_from_a_json_body() -> None:
    ex = Exchange("r", 0.0)
    ex.keep(b'{"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":3,"completion_tokens":2,')
    ex.keep(b'"total_tokens":5,"prompt_tokens_details":{"cached_tokens":0}}}')
    assert ex.usage() == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_usage_from_the_last_events_of_a_stream() -> None:
    ex = Exchange("r", 0.0, stream=True)
    for i in range(2000):
        ex.keep(b'data: {"choices":[{"delta":{"content":"tok%d"}}]}\n\n' % i)
    ex.keep(b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2000,"total_tokens":2009}}\n\n')
    ex.keep(b"data: [DONE]\n\n")
    assert len(ex.kept) <= 2 * STREAM_TAIL  # bounded: never more than twice the tail
    assert ex.usage() == {"prompt_tokens": 9, "completion_tokens": 2000, "total_tokens": 2009}


def test_no_usage() -> None:
    ex = Exchange("r", 0.0, stream=True)
    ex.keep(b'data: {"choices":[{"delta":{"content":"usage"}}]}\n\ndata: [DONE]\n\n')
    assert ex.usage() is None
