"""Two hosts on one machine: network namespaces joined by a veth pair (made here), each running its
own DeepSpeed launcher (`--no_ssh --node_rank i`), must train to the same losses as one host with
two ranks. Where the sandbox refuses namespaces, the test says so in its skip reason."""

import os
import shutil
import subprocess
import uuid

import pytest
from conftest import ROOT
from runs import MULTINODE_ARGS, VENV_BIN, command, env, free_port, train_records

pytestmark = [pytest.mark.multirank, pytest.mark.multinode, pytest.mark.slow]

ARGS = MULTINODE_ARGS  # 4 steps


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """{'names': [ns0, ns1], 'addresses': [...], 'interfaces': [...]}; removed afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip); not available here")
    tag = uuid.uuid4().hex[:6]
    names, interfaces = [f"dsllm-{tag}-h{i}" for i in range(2)], [f"dl{tag}a", f"dl{tag}b"]
    subnet = 100 + int(tag[:2], 16) % 100
    addresses = [f"10.213.{subnet}.1", f"10.213.{subnet}.2"]
    steps = [
        ("ip", "netns", "add", names[0]),
        ("ip", "netns", "add", names[1]),
        ("ip", "link", "add", interfaces[0], "type", "veth", "peer", "name", interfaces[1]),
    ]
    for i in range(2):
        steps += [
            ("ip", "link", "set", interfaces[i], "netns", names[i]),
            ("ip", "-n", names[i], "addr", "add", f"{addresses[i]}/24", "dev", interfaces[i]),
            ("ip", "-n", names[i], "link", "set", interfaces[i], "up"),
            ("ip", "-n", names[i], "link", "set", "lo", "up"),
        ]
    try:
        for step in steps:
            result = sh(*step)
            if result.returncode != 0:
                pytest.skip(f"the sandbox refused network namespaces ({' '.join(step)}: {result.stderr.strip()})")
        yield {"names": names, "addresses": addresses, "interfaces": interfaces}
    finally:
        for name in names:
            sh("ip", "netns", "del", name)


def test_two_hosts_train_like_one_host_with_two_ranks(dataset_dir, tmp_path, shared_run, two_hosts):
    single = shared_run(*ARGS, ranks=2)  # one host, two ranks: the session's (test_launchers.py's reference too)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{address} slots=1\n" for address in two_hosts["addresses"]))
    out, port = tmp_path / "multi", free_port()
    train_args = command(dataset_dir, out, *ARGS)[1:]  # launch/pretrain.py and its options
    launchers = []
    for rank, (name, interface) in enumerate(zip(two_hosts["names"], two_hosts["interfaces"])):
        launcher = [
            "ip",
            "netns",
            "exec",
            name,
            str(VENV_BIN / "deepspeed"),
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--num_nodes",
            "2",
            "--node_rank",
            str(rank),
            "--master_addr",
            two_hosts["addresses"][0],
            "--master_port",
            str(port),
            *train_args,
        ]
        node_env = {**env(), "GLOO_SOCKET_IFNAME": interface}  # gloo talks over this host's own interface
        launchers.append(
            subprocess.Popen(
                launcher, cwd=ROOT, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "on 2 rank(s)" in outputs[0]
    config = (out / "config.json").read_text()
    assert '"world_size": 2' in config
    reference, multi = train_records(single), train_records(out)
    assert sorted(multi) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert multi[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), step
