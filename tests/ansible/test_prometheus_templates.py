"""The Prometheus configs of the fleet: an agent scrapes the appliance's exporter on an appliance host and HAProxy's on
a load balancer; the central Prometheus scrapes HAProxy's itself when it runs on the load balancer. promtool checks
each one (the container tests deploy only the central-on-the-load-balancer layout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.ansible.test_tls_templates import ANSIBLE, ROLES

PLAYBOOK = """
- name: Render the Prometheus configs
  hosts: all
  gather_facts: false
  tasks:
    - name: Load the roles' variables as the roles see them
      ansible.builtin.include_vars:
        file: "{{ item }}"
      loop: [ROLES/appliance_metrics_agent/vars/main.yml, ROLES/appliance_metrics_central/vars/main.yml]
    - name: Render the agent's config
      ansible.builtin.template:
        src: ROLES/appliance_metrics_agent/templates/prometheus-agent.yml.j2
        dest: "{{ lookup('ansible.builtin.env', 'OUT') }}/{{ inventory_hostname }}-agent.yml"
        mode: "0644"
      when: inventory_hostname != 'central'
    - name: Render the central config
      ansible.builtin.template:
        src: ROLES/appliance_metrics_central/templates/prometheus-central.yml.j2
        dest: "{{ lookup('ansible.builtin.env', 'OUT') }}/{{ inventory_hostname }}-central.yml"
        mode: "0644"
      when: inventory_hostname == 'central'
"""


def test_agents_and_central_scrape_the_right_exporters(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    defaults: dict[str, object] = {}
    for role in ("appliance_metrics_agent", "appliance_metrics_central"):
        defaults |= yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {"all": {"vars": {**defaults, "appliance_metrics_agent_remote_write_url": "http://192.0.2.9:9090/"
                                  "api/v1/write", "playbook_dir": str(ANSIBLE)},
                         "children": {"gpu_hosts": {"hosts": {"gpu": local}},
                                      "appliance_lb": {"hosts": {"lb": {**local, "appliance_lb_exporter_port": 8406},
                                                                 "central": local}},
                                      "appliance_metrics_central": {"hosts": {"central": local}}}}}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "play.yml").write_text(PLAYBOOK.replace("ROLES", str(ROLES)))
    r = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(tmp_path / "hosts.yml"),
                        str(tmp_path / "play.yml")], capture_output=True, text=True, cwd=ANSIBLE, timeout=240,
                       env={**os.environ, "OUT": str(out), "ANSIBLE_NOCOLOR": "1"})
    assert r.returncode == 0, r.stdout + r.stderr

    def jobs(name: str) -> dict[str, list[str]]:
        doc = yaml.safe_load((out / name).read_text())
        return {j["job_name"]: j["static_configs"][0]["targets"] for j in doc.get("scrape_configs") or []}

    assert jobs("gpu-agent.yml") == {"appliance": ["127.0.0.1:9464"]}
    assert jobs("lb-agent.yml") == {"haproxy": ["127.0.0.1:8406"]}
    assert jobs("central-central.yml") == {"haproxy": ["127.0.0.1:8405"]}
    relabel = yaml.safe_load((out / "lb-agent.yml").read_text())["scrape_configs"][0]["metric_relabel_configs"]
    assert relabel == [{"source_labels": ["proxy"], "regex": "[mad]_(.+)", "target_label": "model"}]
    for name in ("gpu-agent.yml", "lb-agent.yml", "central-central.yml"):
        args = ["promtool", "check", "config", "--syntax-only", str(out / name)]
        check = subprocess.run(args, capture_output=True, text=True)
        assert check.returncode == 0, name + check.stdout + check.stderr
