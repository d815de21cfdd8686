"""TLS settings: validation of the certificate and key, relative paths, and the warnings check-config prints."""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from appliance.config import ConfigError, config_warnings, load, parse
from appliance.config.tls import certificate_validity
from appliance.runtime.supervisor_conf import proxy_fingerprint
from tests.config.test_config import base_doc, with_
from tests.helpers import REPO, free_port, render_toml
from tests.tls_certs import TestCA


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """What validation checks exists: the binary, a model file, an API keys file, and a CA with one server cert."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "llama-server").write_text("#!/bin/sh\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "keys").write_text("sk-1\n")
    ca = TestCA(tmp_path / "ca")
    ca.issue(tmp_path / "tls", "server")
    ca.issue(tmp_path / "tls", "other")
    return tmp_path


def tls(tree: Path, cert: str = "tls/server.crt", key: str = "tls/server.key", **server: Any) -> dict[str, Any]:
    return with_(base_doc(tree), "server", tls_cert_file=str(tree / cert) if cert else "",
                 tls_key_file=str(tree / key) if key else "", **server)


def problems(tree: Path, doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(doc, tree)
    return e.value.problems


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "check-config", str(path)], capture_output=True,
                          text=True, cwd=REPO)


def test_a_certificate_and_its_key_are_accepted(tree: Path) -> None:
    cfg = parse(tls(tree), tree)
    assert cfg.server.tls_cert_file == str(tree / "tls" / "server.crt")
    assert cfg.server.tls_key_file == str(tree / "tls" / "server.key")
    assert config_warnings(cfg) == []


@pytest.mark.parametrize(("cert", "key", "missing"), [("tls/server.crt", "", "server.tls_key_file"),
                                                      ("", "tls/server.key", "server.tls_cert_file")])
def test_only_one_set_names_the_missing_key(tree: Path, cert: str, key: str, missing: str) -> None:
    [problem] = problems(tree, tls(tree, cert, key))
    assert problem.startswith(f"{missing}: must be set too")
    assert "set both" in problem and "or neither for plain HTTP" in problem


def test_relative_paths_are_taken_from_the_config_file(tree: Path) -> None:
    doc = with_(base_doc(tree), "server", tls_cert_file="tls/server.crt", tls_key_file="tls/../tls/server.key")
    path = tree / "appliance.toml"
    path.write_text(render_toml(doc))
    cfg = load(path)
    assert cfg.server.tls_cert_file == str(tree / "tls" / "server.crt")
    assert cfg.server.tls_key_file == str(tree / "tls" / "server.key")
    # Taken from the config file's directory, not from the working directory.
    assert run_check(path).returncode == 0


@pytest.mark.parametrize("which", ["cert", "key"])
def test_a_missing_file_names_its_key(tree: Path, which: str) -> None:
    doc = tls(tree, cert="tls/gone.crt") if which == "cert" else tls(tree, key="tls/gone.key")
    [problem] = problems(tree, doc)
    assert problem.startswith(f"server.tls_{which}_file: cannot read {tree / 'tls'}/gone.")
    assert "No such file or directory" in problem


def test_a_key_of_another_certificate_is_refused(tree: Path) -> None:
    [problem] = problems(tree, tls(tree, key="tls/other.key"))
    assert problem.startswith(f"server.tls_key_file: {tree / 'tls' / 'other.key'} is not the private key of the "
                              f"certificate in server.tls_cert_file ({tree / 'tls' / 'server.crt'})")


def test_swapped_files_name_what_each_lacks(tree: Path) -> None:
    got = problems(tree, tls(tree, cert="tls/server.key", key="tls/server.crt"))
    assert len(got) == 2
    assert got[0].startswith("server.tls_cert_file:") and "no PEM certificate" in got[0]
    assert got[1].startswith("server.tls_key_file:") and "holds no PEM private key" in got[1]


def test_a_passphrase_protected_key_is_refused_without_prompting(tree: Path) -> None:
    # Without a password callback OpenSSL would prompt on the terminal (and block Ansible's validate).
    TestCA(tree / "ca2").issue(tree / "tls", "locked", key_password=b"secret")
    [problem] = problems(tree, tls(tree, "tls/locked.crt", "tls/locked.key"))
    assert problem.startswith(f"server.tls_key_file: {tree / 'tls' / 'locked.key'} is encrypted with a passphrase")
    assert "openssl pkey" in problem


def test_validity_is_read_from_the_certificate(tree: Path) -> None:
    ca = TestCA(tree / "ca3")
    # Until 2049 a certificate carries UTCTime, from 2050 on GeneralizedTime: both are read.
    for days in (10, 40 * 365):
        cert, _ = ca.issue(tree / "tls", f"days{days}", valid_until_days=days)
        want = x509.load_pem_x509_certificate(cert.read_bytes())
        got = certificate_validity(cert.read_text())
        assert got == (want.not_valid_before_utc, want.not_valid_after_utc)


def test_an_expired_certificate_is_a_warning_not_an_error(tree: Path) -> None:
    TestCA(tree / "ca4").issue(tree / "tls", "old", valid_from_days=-60, valid_until_days=-1)
    path = tree / "appliance.toml"
    path.write_text(render_toml(tls(tree, "tls/old.crt", "tls/old.key")))
    r = run_check(path)
    assert r.returncode == 0, r.stderr
    [warning] = r.stderr.splitlines()
    assert warning.startswith(f"warning: server.tls_cert_file: {tree / 'tls' / 'old.crt'} expired on ")
    assert "run `appliance reload`" in warning


def test_expiry_soon_and_not_yet_valid_are_warnings(tree: Path) -> None:
    cfg = parse(tls(tree), tree)
    now = dt.datetime.now(dt.UTC)
    [soon] = config_warnings(cfg, now + dt.timedelta(days=25))  # the certificate is valid for 30 days
    assert "expires on" in soon and "(in 4 day(s))" in soon
    [early] = config_warnings(cfg, now - dt.timedelta(days=2))
    assert "is valid only from" in early and "check the host's clock" in early


def test_check_config_warns_that_keys_travel_in_clear_on_a_lan_bind(tree: Path) -> None:
    path = tree / "appliance.toml"
    path.write_text(render_toml(with_(base_doc(tree), "server", bind=["192.0.2.10"], api_keys_file=str(tree / "keys"))))
    r = run_check(path)
    assert r.returncode == 0 and "OK: proxy (http) on 192.0.2.10" in r.stdout
    [warning] = r.stderr.splitlines()
    assert warning.startswith("warning: server.bind: 192.0.2.10 is reachable from the network and serves plain HTTP")
    assert "API keys (and prompts) travel in clear text" in warning
    assert "set server.tls_cert_file and server.tls_key_file" in warning

    path.write_text(render_toml(tls(tree, bind=["192.0.2.10"], api_keys_file=str(tree / "keys"))))
    r = run_check(path)
    assert r.returncode == 0 and r.stderr == "" and "OK: proxy (https) on 192.0.2.10" in r.stdout


def test_no_clear_text_warning_on_loopback_or_without_keys(tree: Path) -> None:
    keyed_loopback = with_(base_doc(tree), "server", api_keys_file=str(tree / "keys"))
    open_lan = with_(base_doc(tree), "server", bind=["192.0.2.10"], allow_unauthenticated_lan=True)
    for doc in (keyed_loopback, open_lan):
        assert config_warnings(parse(doc, tree)) == []


def test_rotating_the_certificate_or_key_in_place_changes_the_proxy_fingerprint(tree: Path) -> None:
    """What makes `appliance reload` replace the proxy's workers, which then load the new files."""
    cfg = parse(tls(tree), tree)
    before = proxy_fingerprint(cfg)
    cert, key = Path(cfg.server.tls_cert_file), Path(cfg.server.tls_key_file)
    new_cert, new_key = TestCA(tree / "ca5").issue(tree / "new", "server")
    cert.write_bytes(new_cert.read_bytes())
    after_cert = proxy_fingerprint(cfg)
    key.write_bytes(new_key.read_bytes())
    after_key = proxy_fingerprint(cfg)
    assert len({before, after_cert, after_key}) == 3
    plain = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, tls_cert_file="", tls_key_file=""))
    assert proxy_fingerprint(plain) != after_key


def test_up_prints_the_warnings_before_it_starts(tree: Path) -> None:
    # 192.0.2.10 (TEST-NET-1) is no address of this host: up stops at its port check, after the warnings.
    path = tree / "appliance.toml"
    path.write_text(render_toml(with_(base_doc(tree), "server", bind=["192.0.2.10"], api_keys_file=str(tree / "keys"),
                                      port=free_port()) | {"supervision": {"runtime_dir": str(tree / "run")}}))
    r = subprocess.run([sys.executable, "-m", "appliance", "up", "--config", str(path)], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1
    first, *rest = r.stderr.splitlines()
    assert first.startswith("[appliance] warning: server.bind: 192.0.2.10 is reachable from the network")
    assert "travel in clear text" in first
    assert any("cannot listen on 192.0.2.10" in line for line in rest)
