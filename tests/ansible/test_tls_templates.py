"""The roles' TLS pieces without a deployment: the templates rendered by ansible-playbook on this machine, and the
controller-side preflight script. (tests/deploy runs the roles for real against containers.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from appliance.config import load
from tests.helpers import REPO
from tests.tls_certs import TestCA

ANSIBLE = REPO / "ansible"
ROLES = ANSIBLE / "roles"

PLAYBOOK = """
- name: Render the TLS-dependent templates
  hosts: all
  gather_facts: false
  vars:
    out: "{{ lookup('ansible.builtin.env', 'OUT') }}"
  tasks:
    - name: Load the roles' variables as the roles see them
      ansible.builtin.include_vars:
        file: "{{ item }}"
      loop: ROLE_VARS
    - name: Render the appliance config
      ansible.builtin.template:
        src: ROLES/appliance/templates/appliance.toml.j2
        dest: "{{ out }}/{{ inventory_hostname }}.toml"
        mode: "0644"
      when: inventory_hostname in groups['gpu_hosts']
    - name: Write the health check URL
      ansible.builtin.copy:
        content: "{{ __appliance_health_url }}"
        dest: "{{ out }}/{{ inventory_hostname }}.health"
        mode: "0644"
      when: inventory_hostname in groups['gpu_hosts']
    - name: Render the HAProxy config
      ansible.builtin.template:
        src: ROLES/appliance_lb/templates/haproxy.cfg.j2
        dest: "{{ out }}/haproxy.cfg"
        mode: "0644"
      when: inventory_hostname in groups['appliance_lb']
"""


def render(tmp: Path, inventory: dict[str, dict[str, object]]) -> Path:
    out = tmp / "out"
    out.mkdir()
    roles = ("appliance", "appliance_lb")
    # Defaults as group variables, below the hosts' own (as role defaults are); the fixed vars/ above them.
    defaults: dict[str, object] = {}
    for role in roles:
        defaults |= yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())
    role_vars = [str(ROLES / role / "vars" / "main.yml") for role in roles]
    (tmp / "play.yml").write_text(PLAYBOOK.replace("ROLE_VARS", json.dumps(role_vars)).replace("ROLES", str(ROLES)))
    (tmp / "hosts.yml").write_text(yaml.safe_dump({"all": {**inventory["all"], "vars": defaults}}))
    r = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(tmp / "hosts.yml"),
                        str(tmp / "play.yml")], capture_output=True, text=True, cwd=ANSIBLE, timeout=240,
                       env={**os.environ, "OUT": str(out), "ANSIBLE_NOCOLOR": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture()
def certs(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue(tmp_path / "tls", "server", ips=("192.0.2.1",))
    return ca.file, cert, key


def test_hosts_with_tls_get_it_in_the_config_health_check_and_load_balancer(
        tmp_path: Path, certs: tuple[Path, Path, Path]) -> None:
    ca, cert, key = certs
    keys = tmp_path / "api_keys"
    keys.write_text("sk-1\n")
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {"all": {"children": {
        "gpu_hosts": {"hosts": {
            "secure": {**local, "appliance_server_bind": ["192.0.2.1"], "appliance_api_keys": ["sk-1"],
                       "appliance_tls_cert_src": str(cert), "appliance_tls_key_src": str(key),
                       # Where the validation below finds them, as the role's copies would be on a host.
                       "appliance_server_tls_cert_file": str(cert), "appliance_server_tls_key_file": str(key),
                       "appliance_server_api_keys_file": str(keys)},
            "plain": {**local, "appliance_server_bind": ["192.0.2.2"], "appliance_server_port": 9000,
                      "appliance_server_allow_unauthenticated_lan": True}}},
        "appliance_lb": {"hosts": {"lb": {**local, "appliance_lb_bind": ["192.0.2.100"],
                                          "appliance_lb_backend_ca_src": str(ca)}}},
    }}}
    out = render(tmp_path, inventory)

    secure = load(out / "secure.toml", check_files=False)  # validates the certificate and key as check-config does
    assert (secure.server.tls_cert_file, secure.server.tls_key_file) == (str(cert), str(key))
    plain = load(out / "plain.toml", check_files=False)
    assert (plain.server.tls_cert_file, plain.server.tls_key_file) == ("", "")
    assert (out / "secure.health").read_text() == "https://192.0.2.1:8080/health"
    assert (out / "plain.health").read_text() == "http://192.0.2.2:9000/health"

    # Each host is a server of several backends (every host, its model's, ...): TLS on every line of the secure one.
    servers = [line.split() for line in (out / "haproxy.cfg").read_text().splitlines()
               if line.strip().startswith("server ")]
    tls = ["ssl", "verify", "required", "ca-file", "/etc/haproxy/appliance-backend-ca.pem", "ssl-min-ver", "TLSv1.2"]
    assert {s[1:3] == ["secure", "192.0.2.1:8080"] for s in servers if s[1] == "secure"} == {True}
    assert {s[1:3] == ["plain", "192.0.2.2:9000"] for s in servers if s[1] == "plain"} == {True}
    assert all((s[-len(tls):] == tls) == (s[1] == "secure") for s in servers), servers
    assert ["server", "plain", "192.0.2.2:9000"] in servers and len(servers) >= 6


def run_tls_check(cert: Path, key: Path) -> subprocess.CompletedProcess[str]:
    doc = json.dumps({"cert": cert.read_text(), "key": key.read_text()})
    return subprocess.run([sys.executable, str(ROLES / "appliance" / "files" / "tls_check.py")], input=doc,
                          capture_output=True, text=True, timeout=60)


def test_preflight_script_accepts_a_certificate_with_its_key(certs: tuple[Path, Path, Path]) -> None:
    _, cert, key = certs
    r = run_tls_check(cert, key)
    assert r.returncode == 0 and r.stdout.startswith("valid until "), r.stdout + r.stderr


def test_preflight_script_refuses_what_the_proxy_could_not_serve(tmp_path: Path,
                                                                 certs: tuple[Path, Path, Path]) -> None:
    _, cert, key = certs
    other_ca = TestCA(tmp_path / "other", "other CA")
    _, other_key = other_ca.issue(tmp_path / "other", "other")
    old_cert, old_key = other_ca.issue(tmp_path / "other", "old", valid_from_days=-30, valid_until_days=-1)
    locked_cert, locked_key = other_ca.issue(tmp_path / "other", "locked", key_password=b"pw")
    cases = {
        (cert, other_key): "appliance_tls_key_src is not the private key of the certificate in appliance_tls_cert_src",
        (old_cert, old_key): "appliance_tls_cert_src expired on ",
        (locked_cert, locked_key): "appliance_tls_key_src is encrypted with a passphrase",
        (key, cert): "appliance_tls_cert_src and appliance_tls_key_src must be a PEM certificate chain",
    }
    for (c, k), reason in cases.items():
        r = run_tls_check(c, k)
        assert r.returncode == 1 and r.stdout.startswith(reason), (c, k, r.stdout, r.stderr)
        assert "PRIVATE KEY" not in r.stdout + r.stderr


TLS_PREFLIGHT = ("Check the TLS certificate and key are given together",
                 "Check the TLS key belongs to the certificate, and the certificate is valid now",
                 "Report a TLS certificate or key the proxy could not serve")


def vault_password(tmp: Path) -> Path:
    path = tmp / "vault-pass"
    path.write_text("test-vault-password\n")
    return path


def run_tls_preflight(tmp: Path, cert: str, key: str) -> subprocess.CompletedProcess[str]:
    """The role's TLS preflight tasks, exactly as preflight.yml has them, run on the controller alone."""
    preflight = yaml.safe_load((ROLES / "appliance" / "tasks" / "preflight.yml").read_text())
    tasks = [t for t in preflight if t["name"] in TLS_PREFLIGHT]
    assert len(tasks) == len(TLS_PREFLIGHT)
    defaults = yaml.safe_load((ROLES / "appliance" / "defaults" / "main.yml").read_text())
    variables = {"role_path": str(ROLES / "appliance"), "appliance_tls_cert_src": cert, "appliance_tls_key_src": key,
                 **{k: defaults[k] for k in ("appliance_server_tls_cert_file", "appliance_server_tls_key_file")}}
    play = [{"name": "TLS preflight", "hosts": "localhost", "gather_facts": False, "vars": variables, "tasks": tasks}]
    (tmp / "preflight.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    return subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", "-c", "local",
                           "--vault-password-file", str(vault_password(tmp)), str(tmp / "preflight.yml")],
                          capture_output=True, text=True, cwd=ANSIBLE, timeout=240,
                          env={**os.environ, "ANSIBLE_NOCOLOR": "1",
                               "ANSIBLE_PYTHON_INTERPRETER": sys.executable})


def test_preflight_accepts_a_pair_with_a_vault_encrypted_key(tmp_path: Path, certs: tuple[Path, Path, Path]) -> None:
    _, cert, key = certs
    subprocess.run([str(Path(sys.executable).with_name("ansible-vault")), "encrypt", "--vault-password-file",
                    str(vault_password(tmp_path)), str(key)], check=True, capture_output=True, timeout=120)
    assert key.read_text().startswith("$ANSIBLE_VAULT;")
    r = run_tls_preflight(tmp_path, str(cert), str(key))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BEGIN" not in r.stdout  # the key stays out of the output


def test_preflight_allows_neither_but_refuses_one_alone_and_a_foreign_key(tmp_path: Path,
                                                                          certs: tuple[Path, Path, Path]) -> None:
    _, cert, _ = certs
    r = run_tls_preflight(tmp_path, "", "")  # plain HTTP
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_tls_preflight(tmp_path, str(cert), "")
    assert r.returncode != 0 and "set both appliance_tls_cert_src and appliance_tls_key_src" in r.stdout
    _, foreign_key = TestCA(tmp_path / "other", "other CA").issue(tmp_path / "other", "other")
    r = run_tls_preflight(tmp_path, str(cert), str(foreign_key))
    assert r.returncode != 0
    assert "localhost: appliance_tls_key_src is not the private key of the certificate" in r.stdout
    assert "PRIVATE KEY" not in r.stdout
