"""`appliance up` serving HTTPS with the real llama-server, and `appliance reload` after a certificate rotation."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import openai
from cryptography import x509

from tests.e2e.conftest import chat_model, start_appliance
from tests.e2e.test_reload import reload_cli, wait_for
from tests.helpers import free_port
from tests.tls_certs import TestCA, served_certificate

KEY = "sk-e2e-tls"


def test_up_serves_https_and_reload_serves_a_certificate_rotated_in_place(tmp_path: Path) -> None:
    first_ca = TestCA(tmp_path / "ca", "first CA")
    cert, key = first_ca.issue(tmp_path / "tls", "server")
    (tmp_path / "keys").write_text(f"{KEY}\n")
    app = start_appliance(tmp_path, [chat_model(free_port(), "chat")], {"server": {
        "api_keys_file": str(tmp_path / "keys"), "tls_cert_file": str(cert), "tls_key_file": str(key)}})
    url = f"https://127.0.0.1:{app.doc['server']['port']}"
    try:
        # up probes its own /health over HTTPS to report progress, and says where clients connect.
        wait_for(lambda: f"ready: every model serves at {url}/v1" in app.log.read_text() or app.proc.poll() is not None,
                 180, "appliance up never reported ready over https")
        assert app.proc.poll() is None, app.log.read_text()[-3000:]
        log = app.log.read_text()
        assert f"OpenAI API: {url}/v1  health: {url}/health" in log
        assert "warning" not in log  # loopback bind, valid certificate
        with httpx.Client(verify=ssl.create_default_context(cafile=first_ca.file)) as http:
            client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, http_client=http, max_retries=0, timeout=120)
            out = client.chat.completions.create(model="chat", max_tokens=4,
                                                 messages=[{"role": "user", "content": "Say hi"}])
            assert out.choices[0].message.content is not None

        second_ca = TestCA(tmp_path / "ca2", "second CA")
        new_cert, new_key = second_ca.issue(tmp_path / "staged", "server")
        key.write_bytes(new_key.read_bytes())
        cert.write_bytes(new_cert.read_bytes())
        r = reload_cli(app)
        assert r.returncode == 0, r.stderr
        assert "reload: replaced the proxy workers (in-flight requests finish on the old ones)\n" in r.stdout
        # Once reload returns, the old workers no longer accept: every new connection gets the new certificate.
        wanted = x509.load_pem_x509_certificate(new_cert.read_bytes())
        served = [served_certificate(app.doc["server"]["port"]) for _ in range(20)]
        assert all(c == wanted for c in served), [c.issuer.rfc4514_string() for c in served]
        with httpx.Client(verify=ssl.create_default_context(cafile=second_ca.file)) as http:
            assert http.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    finally:
        app.stop()
