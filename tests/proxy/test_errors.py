"""The error bodies the proxy writes itself (appliance/proxy/errors.py)."""

from __future__ import annotations

import json

import pytest

from appliance.proxy.errors import error_body


def test_a_refused_key_is_an_authentication_error_as_llama_server_writes_it() -> None:
    # llama.cpp's own server tests check the type of a 401 (test_security.py::test_incorrect_api_key).
    assert json.loads(error_body(401, "missing or invalid API key", "invalid_api_key")) == {
        "error": {"message": "missing or invalid API key", "type": "authentication_error", "param": None,
                  "code": "invalid_api_key"}}


@pytest.mark.parametrize(("status", "kind"), [(400, "invalid_request_error"), (404, "invalid_request_error"),
                                              (429, "rate_limit_error"), (502, "server_error"), (503, "server_error")])
def test_other_statuses_keep_openais_types(status: int, kind: str) -> None:
    assert json.loads(error_body(status, "m", "c"))["error"]["type"] == kind
