"""HTTPS on the public port, against the real gunicorn proxy with a certificate from a throwaway CA."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509

from appliance.runtime.supervisor_conf import GUNICORN_CONF
from tests.helpers import REPO, Proxy, stub_config, write_config
from tests.stub_llama import StubLlama
from tests.tls_certs import TestCA, served_certificate

KEY = "sk-over-tls"


class TLSProxy(Proxy):
    """tests.helpers.Proxy, spoken to over HTTPS with the test CA as the only trusted root."""

    def __init__(self, config_path: Path, port: int, ca_file: Path) -> None:
        super().__init__(config_path, port)
        self.url = f"https://127.0.0.1:{port}"
        self.ca_file = ca_file

    def start(self, wait_ready: bool = True) -> TLSProxy:
        env = {**os.environ, "APPLIANCE_CONFIG": str(self.config_path)}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1, verify=self.client_tls()).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"proxy did not become ready: {self.log.read_text()}")

    def client_tls(self, ca_file: Path | None = None) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=ca_file or self.ca_file)


def start_tls_proxy(tmp: Path, stubs: tuple[StubLlama, StubLlama], ca: TestCA) -> TLSProxy:
    cert, key = ca.issue(tmp / "tls", "server")
    keys = tmp / "keys"
    keys.write_text(f"tester: {KEY}\n")
    doc = stub_config(tmp, stubs[0].port, stubs[1].port, workers=1, api_keys_file=str(keys),
                      tls_cert_file=str(cert), tls_key_file=str(key))
    return TLSProxy(write_config(tmp / "appliance.toml", doc), doc["server"]["port"], ca.file).start()


@pytest.fixture(scope="module")
def tls_proxy(stubs: tuple[StubLlama, StubLlama], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSProxy]:
    tmp = tmp_path_factory.mktemp("tls")
    p = start_tls_proxy(tmp, stubs, TestCA(tmp / "ca"))
    yield p
    p.stop()


def test_openai_sdk_over_https(tls_proxy: TLSProxy, chat_stub: StubLlama) -> None:
    with httpx.Client(verify=tls_proxy.client_tls()) as http:
        client = openai.OpenAI(base_url=tls_proxy.url + "/v1", api_key=KEY, http_client=http, max_retries=0,
                               timeout=30)
        out = client.chat.completions.create(model="chat-a", messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].message.content == "h\u00e9llo"
        stream = client.chat.completions.create(model="chat-a", messages=[{"role": "user", "content": "hi"}],
                                                stream=True, extra_body={"stub": "stream", "n": 3, "delay": 0.01})
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "tok0 tok1 tok2 "
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=tls_proxy.url + "/v1", api_key="wrong", http_client=http,
                          max_retries=0).models.list()
    assert len(chat_stub.received) == 2


def test_a_client_that_does_not_trust_the_ca_refuses_the_server(tls_proxy: TLSProxy, tmp_path: Path) -> None:
    stranger = TestCA(tmp_path, "another CA")
    for verify in (True, tls_proxy.client_tls(stranger.file)):  # the system's roots; another private CA
        with httpx.Client(verify=verify) as http:
            client = openai.OpenAI(base_url=tls_proxy.url + "/v1", api_key=KEY, http_client=http, max_retries=0)
            with pytest.raises(openai.APIConnectionError) as e:
                client.models.list()
        assert "CERTIFICATE_VERIFY_FAILED" in repr(e.value.__cause__)


def test_plain_http_to_the_tls_port_is_not_served(tls_proxy: TLSProxy, chat_stub: StubLlama) -> None:
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
               "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}").encode()
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=5) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert not answer.startswith(b"HTTP/")  # at most a TLS alert, then the connection is closed
    assert chat_stub.received == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_proxy.port}/health", timeout=5)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_are_served(tls_proxy: TLSProxy, version: ssl.TLSVersion) -> None:
    ctx = tls_proxy.client_tls()
    ctx.minimum_version = ctx.maximum_version = version
    with httpx.Client(verify=ctx) as http:
        assert http.get(tls_proxy.url + "/livez").status_code == 200


def _handshake_in_memory(client: ssl.SSLContext, server: ssl.SSLContext) -> str | None:
    """The protocol version that ``client`` and ``server`` agree on, through memory buffers instead of sockets."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):  # waits for the other side's bytes
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return c.version()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_1_1_is_refused(tls_proxy: TLSProxy, tmp_path: Path) -> None:
    ctx = tls_proxy.client_tls()
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # lets this client offer TLS 1.1 at all
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    # Control: this client does speak TLS 1.1 to a server that allows it.
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lax.set_ciphers("DEFAULT:@SECLEVEL=0")
    lax.minimum_version = ssl.TLSVersion.TLSv1
    lax_ca = TestCA(tmp_path, "lax CA")
    lax.load_cert_chain(*lax_ca.issue(tmp_path, "lax"))
    ctx.load_verify_locations(lax_ca.file)
    assert _handshake_in_memory(ctx, lax) == "TLSv1.1"
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=5) as raw, \
            pytest.raises(ssl.SSLError) as e:
        ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    # The server ends the handshake (Python's asyncio server closes without an alert).
    assert e.value.reason in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNEXPECTED_EOF_WHILE_READING")


def test_reload_serves_a_certificate_rotated_in_place(stubs: tuple[StubLlama, StubLlama], tmp_path: Path) -> None:
    """What `appliance reload` does once the fingerprint changed: SIGHUP to the arbiter, new workers, new cert."""
    old_ca = TestCA(tmp_path / "old-ca", "old CA")
    p = start_tls_proxy(tmp_path, stubs, old_ca)
    try:
        assert p.proc is not None
        cert, key = tmp_path / "tls" / "server.crt", tmp_path / "tls" / "server.key"
        before = served_certificate(p.port)
        assert before.issuer.rfc4514_string() == "CN=old CA"
        new_ca = TestCA(tmp_path / "new-ca", "new CA")
        new_cert, new_key = new_ca.issue(tmp_path / "staged", "server")
        # In place: same paths, new contents (as certbot's deploy hook or Ansible's copy would leave them).
        key.write_bytes(new_key.read_bytes())
        cert.write_bytes(new_cert.read_bytes())
        assert served_certificate(p.port) == before  # nothing changes until the reload
        os.kill(p.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while served_certificate(p.port) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert served_certificate(p.port) == x509.load_pem_x509_certificate(new_cert.read_bytes())
        with httpx.Client(verify=p.client_tls(new_ca.file)) as http:
            assert http.get(p.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        with httpx.Client(verify=p.client_tls(old_ca.file)) as http, \
                pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            http.get(p.url + "/livez")
    finally:
        p.stop()
