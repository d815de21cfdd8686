"""Rendering a collected snapshot: plain aligned columns, JSON, rich tables; the token sampler's rate."""

from __future__ import annotations

import io
import json

from rich.console import Console

from appliance.status import render
from appliance.status.collect import Memory, ModelStatus, ProgramStatus, Snapshot, TokenSampler

NOW = 1_700_000_000.0


def snapshot(problems: tuple[str, ...] = ()) -> Snapshot:
    ready = ModelStatus(name="chat", kind="chat", load="always", port=8081, state="ready", since=NOW - 125,
                        restarts=0, pid=4242, slots_busy=1, slots_total=2, waiting=0, tokens_per_s=41.25,
                        memory=(Memory("CPU", 337, "rss"), Memory("CUDA0", 1200, "estimate")), last_error="")
    failed = ModelStatus(name="big", kind="chat", load="on_demand", port=8082, state="failed", since=NOW - 4000,
                         restarts=3, pid=None, slots_busy=None, slots_total=4, waiting=2, tokens_per_s=None,
                         memory=(), last_error="load_model: failed to load model")
    programs = (ProgramStatus("proxy", "RUNNING", 100, 90_000.0, "2 workers, 0.0.0.0 port 8080"),
                ProgramStatus("exporter", "FATAL", None, None, "127.0.0.1 port 9464"))
    return Snapshot(taken_at=NOW, host="gpu1", config="/etc/appliance/appliance.toml",
                    health_url="https://127.0.0.1:8080/health", health="unhealthy", tokens_window_s=1.0,
                    models=(ready, failed), programs=programs, problems=problems,
                    notes=("cannot read /run/appliance/inflight/slots: permission denied",))


def test_plain_output_is_aligned_columns_with_every_field() -> None:
    text = render.plain(snapshot(("model big: failed",)))
    lines = text.splitlines()
    assert lines[0].startswith("gpu1  health: unhealthy  (https://127.0.0.1:8080/health)  tok/s over 1s")
    header, chat, big = lines[2], lines[3], lines[4]
    assert header.split() == ["MODEL", "STATE", "SINCE", "RESTARTS", "PID", "SLOTS", "WAITING", "TOK/S", "MEMORY",
                              "LAST", "ERROR"]
    # Every column starts where its header does.
    for column in ("STATE", "SINCE", "SLOTS", "TOK/S", "MEMORY", "LAST ERROR"):
        at = header.index(column)
        assert chat[at] != " " and chat[at - 2:at] == "  " and big[at] != " "
    assert chat.split()[:8] == ["chat", "ready", "2m05s", "0", "4242", "1/2", "0", "41.2"]
    assert "CPU 337 MiB, CUDA0 ~1200 MiB" in chat and chat.endswith("-")
    assert big.split()[:9] == ["big", "(on", "demand)", "failed", "1h06m", "3", "-", "-/4", "2"]
    assert big.endswith("load_model: failed to load model")
    assert lines[6].split() == ["PROGRAM", "STATE", "PID", "UPTIME", "DETAIL"]
    assert lines[7].split()[:4] == ["proxy", "RUNNING", "100", "1d01h"]
    assert lines[8].split()[:4] == ["exporter", "FATAL", "-", "-"]
    assert lines[-3:] == ["NOT HEALTHY:", "  model big: failed",
                          "note: cannot read /run/appliance/inflight/slots: permission denied"]


def test_plain_output_of_a_healthy_host_says_so() -> None:
    lines = render.plain(snapshot()).splitlines()
    assert "healthy" in lines and "NOT HEALTHY:" not in lines


def test_json_is_one_document_with_the_snapshot() -> None:
    doc = json.loads(render.to_json(snapshot(("model big: failed",))))
    assert doc["healthy"] is False and doc["problems"] == ["model big: failed"]
    chat, big = doc["models"]
    assert chat["memory"] == [{"device": "CPU", "mib": 337, "source": "rss"},
                              {"device": "CUDA0", "mib": 1200, "source": "estimate"}]
    assert chat["slots_busy"] == 1 and chat["tokens_per_s"] == 41.25 and chat["since"] == NOW - 125
    assert big["pid"] is None and big["waiting"] == 2 and big["last_error"] == "load_model: failed to load model"
    assert doc["programs"][0] == {"name": "proxy", "state": "RUNNING", "pid": 100, "uptime_s": 90_000.0,
                                  "detail": "2 workers, 0.0.0.0 port 8080"}
    assert json.loads(render.to_json(snapshot()))["healthy"] is True


def test_rich_view_renders_both_tables() -> None:
    console = Console(file=io.StringIO(), width=200, record=True, color_system=None)
    console.print(render.rich_view(snapshot(("model big: failed",))))
    text = console.export_text()
    assert "LAST ERROR" in text and "UPTIME" in text and "NOT HEALTHY" in text
    assert "CUDA0 ~1200 MiB" in text and "1d01h" in text


def test_the_sampler_averages_over_its_window_and_skips_a_restart() -> None:
    sampler = TokenSampler(window_s=60)
    assert sampler.rate("m") is None and sampler.span_s() == 0
    sampler.add("m", 0, 100.0)
    sampler.add("m", 2, 180.0)
    assert sampler.rate("m") == 40.0 and sampler.rate("absent") is None
    sampler.add("m", 4, 5.0)  # restarted: the interval across the restart counts nothing
    assert sampler.rate("m") == 20.0
    for t in range(6, 200, 2):
        sampler.add("m", t, 5.0 + 10 * (t - 4))
    assert sampler.span_s() <= 62 and sampler.rate("m") == 10.0
    sampler.add("m", 202, None)  # not answering: no rate rather than an old one
    assert sampler.rate("m") is None and sampler.span_s() == 0
