"""`shunter cluster run`: argument checks anywhere; with root and iproute2, real namespaces: a run's
output and exit status, shaping, and that nothing is left behind however the run ends."""

from __future__ import annotations

import io
import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from shunter.cli import main as cli_main
from shunter.commands import cluster as cluster_command
from shunter.errors import ShunterError
from shunter.parallel.cluster import (
    ALLOWED_CONGESTION_CONTROL,
    BURST_MIN_BYTES,
    DEFAULT_CONGESTION_CONTROL,
    PREFIX,
    EmulatedCluster,
    clean_leftovers,
    parse_host_bandwidths,
    parse_latency,
    tbf_burst_bytes,
)
from shunter.parallel.launch import run_on_cluster

ROOT = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="needs root and iproute2 (ip, tc) to make network namespaces",
)

# `shunter` with only the cluster command, for runs in a subprocess (so they can be signalled).
ENTRY = textwrap.dedent(
    """
    import argparse, sys
    from shunter.commands import cluster
    from shunter.errors import ShunterError
    parser = argparse.ArgumentParser(prog="shunter")
    cluster.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    try:
        sys.exit(args.func(args))
    except ShunterError as exc:
        print(f"shunter: error: {exc}", file=sys.stderr)
        sys.exit(2)
    """
)

# Rank 0 receives argv[1] bytes over TCP from rank 1 and prints the rate; the port is MASTER_PORT.
TRANSFER = textwrap.dedent(
    """
    import os, socket, sys, time
    size, port = int(sys.argv[1]), int(os.environ["MASTER_PORT"])
    if os.environ["RANK"] == "0":
        server = socket.create_server(("0.0.0.0", port))
        conn, _ = server.accept()
        got, start = 0, None
        while got < size:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            start = start or time.perf_counter()
            got += len(chunk)
        print(f"received {got} bytes at {got / (time.perf_counter() - start):.0f} B/s")
    else:
        for _ in range(200):
            try:
                sock = socket.create_connection((os.environ["MASTER_ADDR"], port))
                break
            except OSError:
                time.sleep(0.02)
        sock.sendall(b"x" * size)
        sock.close()
    """
)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """cli.main, as the command line runs it."""
    code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def network_state(ignore_other_runs: bool = True) -> tuple[list[str], list[str]]:
    """(named network namespaces, links of the root namespace). Namespaces of clusters made by other
    processes (another test session, a benchmark) are left out unless ignore_other_runs is False;
    those of this process and its children count."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    names = [line.split()[0] for line in namespaces.stdout.splitlines() if line.strip()]
    if ignore_other_runs:
        names = [name for name in names if not name.startswith(PREFIX) or owner(name) in OUR_PIDS]
    return sorted(names), sorted(line.split(":")[1].strip() for line in links.stdout.splitlines())


def owner(namespace: str) -> int:
    """The pid of the process whose cluster made a namespace (it is in the name)."""
    return int(namespace[len(PREFIX) : len(PREFIX) + 5], 36)


OUR_PIDS = {os.getpid()}


@pytest.fixture
def unchanged_network():
    """Fails the test if it leaves a namespace or link behind."""
    before = network_state()
    yield
    assert network_state() == before


def start_entry(argv: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", ENTRY, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    OUR_PIDS.add(proc.pid)
    return proc


def wait_for_lines(proc: subprocess.Popen[str], count: int, timeout_s: float = 20.0) -> list[str]:
    """The first `count` lines of proc's stdout (read by a thread, so a silent process cannot hang
    the test)."""
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout
    threading.Thread(
        target=lambda: [lines.put(line) for line in iter(stdout.readline, "")], daemon=True
    ).start()
    got = []
    for _ in range(count):
        try:
            got.append(lines.get(timeout=timeout_s))
        except queue.Empty:
            pytest.fail(f"only {got} after {timeout_s} s")
    return got


def namespaces_of(pid: int) -> list[str]:
    return [name for name in network_state()[0] if name.startswith(PREFIX) and owner(name) == pid]


def gone(pid: int) -> bool:
    """Whether a process has exited (a zombie waiting for init to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


# --- anywhere -------------------------------------------------------------------------------------


def test_bandwidth_one_for_all_and_one_per_host() -> None:
    assert parse_host_bandwidths("80Mbit/s", 3) == [10e6] * 3
    assert parse_host_bandwidths("1Gbit/s, 10MB/s", 2) == [125e6, 10e6]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1Gbit/s,1Gbit/s,1Gbit/s", "--bandwidth: 3 bandwidths for 2 hosts"),
        ("1Gbit/s,0", "--bandwidth (host 1): bandwidth must be positive, got '0'"),
        ("0", "--bandwidth: bandwidth must be positive, got '0'"),
        ("1Gbit/s,-5Mbit/s", "--bandwidth (host 1): bandwidth must be positive, got '-5Mbit/s'"),
        ("fast", "--bandwidth: cannot read 'fast' as a bandwidth"),
        ("1Gbit/s,", "--bandwidth (host 1): cannot read ''"),
    ],
)
def test_bad_bandwidths_name_the_field(text: str, expected: str) -> None:
    with pytest.raises(ShunterError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        parse_host_bandwidths(text, 2)


def test_latency_and_burst() -> None:
    assert parse_latency("0ms") == 0.0
    assert parse_latency("5ms") == pytest.approx(5e-3)
    assert parse_latency("200us") == pytest.approx(2e-4)
    with pytest.raises(ShunterError, match="--latency: a duration must be finite and not negative"):
        parse_latency("-1ms")
    assert tbf_burst_bytes(10e6) == BURST_MIN_BYTES  # 4 ms would be 40 kB
    assert tbf_burst_bytes(125e6) == 500_000  # 4 ms of 1 Gbit/s


def test_not_root_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, _, err = run_cli(["cluster", "run", "--hosts", "2", "--bandwidth", "1Gbit/s", "--", "true"], capsys)
    assert code == 2
    assert err == (
        "shunter: error: shunter cluster run needs root (network namespaces and tc); run it with sudo\n"
    )
    with pytest.raises(ShunterError, match="needs root"), EmulatedCluster(2, 1e6):
        pass


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--hosts", "0", "--bandwidth", "1Gbit/s", "--", "true"], "--hosts: need at least 1 host, got 0"),
        (
            ["--hosts", "2", "--bandwidth", "1Gbit/s,2Gbit/s,3Gbit/s", "--", "true"],
            "3 bandwidths for 2 hosts",
        ),
        (["--hosts", "2", "--bandwidth=-1Gbit/s", "--", "true"], "--bandwidth: bandwidth must be positive"),
        (["--hosts", "2", "--bandwidth", "1Gbit/s", "--"], "COMMAND: nothing to run"),
        (["--hosts", "2", "--bandwidth", "1Gbit/s"], "COMMAND: nothing to run"),
        (["--hosts", "2", "--bandwidth", "1Gbit/s", "--latency", "soon", "--", "true"], "--latency"),
        (
            ["--hosts", "2", "--bandwidth", "1Gbit/s", "--congestion-control", "x; y", "--", "true"],
            "--congestion-control: not a congestion control name: 'x; y'",
        ),
    ],
)
def test_bad_arguments(argv: list[str], expected: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(cluster_command, "check_environment", lambda: None)
    code, out, err = run_cli(["cluster", "run", *argv], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("shunter: error: ") and expected in err and err.count("\n") == 1


# --- with root: real namespaces -------------------------------------------------------------------


@needs_root
def test_run_prefixes_every_rank_and_sets_torchrun_variables(unchanged_network, capsys, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    program = (
        "import os, sys; e = os.environ; "
        "print('rank', e['RANK'], 'of', e['WORLD_SIZE'], e['LOCAL_RANK'], e['LOCAL_WORLD_SIZE'], "
        "e['MASTER_ADDR'], e['MASTER_PORT'], e['SHUNTER_CLUSTER_BANDWIDTHS'], "
        "os.path.exists('/sys/class/net/' + e['GLOO_SOCKET_IFNAME']), e['OMP_NUM_THREADS']); "
        "print('to stderr', file=sys.stderr)"
    )
    argv = ["cluster", "run", "--hosts", "2", "--bandwidth", "1Gbit/s,80Mbit/s", "--port", "29600"]
    code, out, err = run_cli([*argv, "--", sys.executable, "-c", program], capsys)
    assert code == 0, err
    lines = sorted(out.splitlines())
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        prefix = f"[host {rank}] rank {rank} of 2 0 1 10."
        assert line.startswith(prefix), line
        threads = max(1, (os.cpu_count() or 1) // 2)  # the hosts' share of the cores, as torchrun sets
        assert line.endswith(f" 29600 125000000,10000000 True {threads}"), line
    assert lines[0].split()[8] == lines[1].split()[8]  # one MASTER_ADDR
    assert sorted(err.splitlines()) == ["[host 0] to stderr", "[host 1] to stderr"]


@needs_root
def test_hosts_run_the_chosen_congestion_control(unchanged_network, capsys) -> None:
    read = "print(open('/proc/sys/net/ipv4/tcp_congestion_control').read().strip())"
    program = [sys.executable, "-c", read]
    allowed = Path(ALLOWED_CONGESTION_CONTROL).read_text().split()
    for name in [None, *allowed]:
        chosen = [] if name is None else ["--congestion-control", name]
        argv = ["cluster", "run", "--hosts", "2", "--bandwidth", "100Mbit/s", *chosen, "--", *program]
        code, out, err = run_cli(argv, capsys)
        assert code == 0, err
        expected = name or DEFAULT_CONGESTION_CONTROL
        assert sorted(out.splitlines()) == [f"[host 0] {expected}", f"[host 1] {expected}"]
    code, out, err = run_cli(
        ["cluster", "run", "--hosts", "2", "--bandwidth", "100Mbit/s", "--congestion-control", "nosuch", "--",
         *program], capsys,
    )  # fmt: skip
    assert (code, out) == (2, "")
    assert err == (
        f"shunter: error: --congestion-control: the hosts cannot use 'nosuch' (this machine allows: "
        f"{' '.join(allowed)}, from {ALLOWED_CONGESTION_CONTROL})\n"
    )


@needs_root
def test_failed_rank_sets_status_and_the_others_are_killed(unchanged_network) -> None:
    # Rank 0 would sleep 30 s; it is killed once the 1 s grace period after rank 1's failure ends.
    program = "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(30)"
    err = io.StringIO()
    with EmulatedCluster(2, 125e6) as cluster:
        code = run_on_cluster(cluster, [sys.executable, "-c", program], grace_s=1.0, err=err)
    assert code == 3  # and the message below says host 0 was killed, not left to finish its sleep
    assert (
        err.getvalue()
        == "shunter: host 1 failed with exit status 3; killed host 0, still running 1 s later\n"
    )


@needs_root
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_stops_ranks_and_removes_everything(unchanged_network, signum: int) -> None:
    # Each rank starts a child in its process group and waits; both must die with the run.
    program = "sleep 60 & echo started $!; wait"
    proc = start_entry(
        ["cluster", "run", "--hosts", "2", "--bandwidth", "1Gbit/s", "--", "sh", "-c", program]
    )
    try:
        lines = wait_for_lines(proc, 2)
        assert len(namespaces_of(proc.pid)) == 3  # 2 hosts + switch
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum
    assert f"interrupted by {signal.Signals(signum).name}" in err
    children = [int(line.split()[-1]) for line in lines]
    assert all(gone(pid) for pid in children)


@needs_root
def test_clean_removes_what_a_killed_run_left(unchanged_network) -> None:
    proc = start_entry(
        ["cluster", "run", "--hosts", "2", "--bandwidth", "1Gbit/s", "--", "sh", "-c", "echo up; sleep 60"]
    )
    try:
        wait_for_lines(proc, 2)
    finally:
        proc.kill()
        proc.communicate()
    left = namespaces_of(proc.pid)
    assert len(left) == 3
    report = clean_leftovers()
    assert set(left) <= set(report.removed)
    assert len(report.killed) >= 2  # the two ranks, orphaned in their namespaces


@needs_root
def test_shaping_limits_send_and_receive(unchanged_network, tmp_path: Path) -> None:
    """Host 1 sends 4 MB to host 0. 80 Mbit/s is 10 MB/s; TCP gets ~96% of it (headers)."""
    script = tmp_path / "transfer.py"
    script.write_text(TRANSFER)
    rates = {}
    for bandwidth in ("80Mbit/s", "400Mbit/s,80Mbit/s", "80Mbit/s,400Mbit/s", "400Mbit/s"):
        out = io.StringIO()
        with EmulatedCluster(2, parse_host_bandwidths(bandwidth, 2)) as cluster:
            assert run_on_cluster(cluster, [sys.executable, str(script), "4000000"], out=out) == 0
        (line,) = out.getvalue().splitlines()
        rates[bandwidth] = float(line.split()[-2])
    # Sender-limited, receiver-limited, both: all 10 MB/s within 25%.
    for bandwidth in ("80Mbit/s", "400Mbit/s,80Mbit/s", "80Mbit/s,400Mbit/s"):
        assert rates[bandwidth] == pytest.approx(10e6, rel=0.25), rates
    assert rates["400Mbit/s"] > 3 * rates["80Mbit/s"], rates


@needs_root
@pytest.mark.slow
def test_gloo_all_reduce_runs_unchanged(unchanged_network, capsys) -> None:
    """A program written for torchrun: init_process_group from the environment, one all_reduce."""
    program = (
        "import torch, torch.distributed as dist; dist.init_process_group('gloo'); "
        "x = torch.full((4,), float(dist.get_rank() + 1)); dist.all_reduce(x); "
        "print('sum', x.tolist()); dist.destroy_process_group()"
    )
    argv = ["cluster", "run", "--hosts", "2", "--bandwidth", "1Gbit/s", "--", sys.executable, "-c", program]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert sorted(out.splitlines()) == [
        "[host 0] sum [3.0, 3.0, 3.0, 3.0]",
        "[host 1] sum [3.0, 3.0, 3.0, 3.0]",
    ]


def test_the_library_names_the_field_and_the_command_line_the_flag() -> None:
    """Used as a library, an error names the parameter; through the CLI, the flag that set it."""
    with pytest.raises(ShunterError, match=r"^congestion_control: not a congestion control name"):
        EmulatedCluster(2, 1e9, congestion_control="x; y")
