"""The container lab itself: boot, isolation, SSH, stop/start, and that nothing is left behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.deploy import lab

HOSTS = {"node1": "198.18.0.11", "node2": "198.18.0.12"}

# lab_image fails (never skips) where the lab cannot run: not root, or no image can be built.
pytestmark = pytest.mark.usefixtures("lab_image")


def test_sweep_removes_leaked_bridge_and_mount() -> None:
    leak = lab.WORK_ROOT / "sweeptest.leak" / "mnt"
    bridge = f"{lab.BRIDGE_PREFIX}sweeptest"
    with lab.lab_lock(timeout=600):
        leak.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "leak", str(leak)], check=True)
        assert {f"bridge {bridge}", f"mount {leak}"} <= set(lab.leftovers())
        lab.sweep()
        assert lab.leftovers() == []
    assert not leak.parent.exists()


@pytest.mark.timeout(900)
def test_two_containers(lab_image: Path, tmp_path: Path) -> None:
    with lab.Lab("labtest", HOSTS) as lb:
        cfg = lb.ssh_config()
        machine_ids = {}
        for name, address in HOSTS.items():
            assert lb.address(name) == address
            assert lb.run(name, ["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
            assert Path(f"/proc/{lb.pid1(name)}/comm").read_text().strip() == "systemd"
            state = lb.run(name, "systemctl is-system-running", check=False).stdout.strip()
            assert state in ("running", "degraded"), lb.run(name, "systemctl --failed --no-pager").stdout
            assert lb.run(name, "hostname").stdout.strip() == name
            # Only the lab network: no default route, no address outside 198.18.0.0/15.
            assert lb.run(name, "ip route show default; ip -6 route show default").stdout.strip() == ""
            addrs = lb.run(name, "ip -o -4 addr show scope global | awk '{print $4}'").stdout.split()
            assert addrs == [f"{address}/24"]
            ssh = subprocess.run(["ssh", "-F", str(cfg), name, "hostname"], capture_output=True, text=True, timeout=30)
            assert (ssh.returncode, ssh.stdout.strip()) == (0, name), ssh.stderr
            machine_ids[name] = lb.run(name, ["cat", "/etc/machine-id"]).stdout.strip()
        assert len(set(machine_ids.values())) == len(HOSTS)

        # node1 reaches node2's sshd by name (from the lab's /etc/hosts).
        banner = lb.run("node1", "exec 3<>/dev/tcp/node2/22 && head -c 4 <&3", timeout=15).stdout
        assert banner == "SSH-"

        src = tmp_path / "payload"
        (src / "sub").mkdir(parents=True)
        (src / "sub" / "f.txt").write_text("hello\n")
        lb.copy_in("node1", src, "/opt/payload")
        out = lb.run("node1", "cat /opt/payload/sub/f.txt; stat -c %U /opt/payload/sub/f.txt").stdout
        assert out == "hello\nroot\n"

        inventory = lb.inventory({"web": ["node1"], "db": ["node2"]}, {"x": 1}).read_text()
        assert "198.18.0.12" in inventory and f"-F {cfg}" in inventory

        # Stopping a container leaves no process of it; starting it again boots it with its overlay kept.
        lb.run("node2", "echo kept > /root/marker")
        lb.stop("node2")
        assert lb.processes("node2") == []
        with pytest.raises(lab.LabError):
            lb.pid1("node2")
        down = lb.run("node1", "timeout 3 bash -c 'exec 3<>/dev/tcp/node2/22'", check=False)
        assert down.returncode != 0
        lb.start("node2")
        assert lb.run("node2", "cat /root/marker; cat /etc/machine-id").stdout.split() == ["kept", machine_ids["node2"]]
        assert lb.processes("node2")

    # Another lab may start as soon as this one releases the lock: look for this lab's resources only.
    assert [r for r in lab.leftovers() if "labtest" in r] == []
