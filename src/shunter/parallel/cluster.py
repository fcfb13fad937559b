"""An emulated cluster on one Linux machine: N hosts as network namespaces joined by a switch, each
host's port shaped to its own bandwidth. `shunter.parallel.launch` runs one rank per host on it.

Layout of one run (tag = "shnt" + the owner's pid in base 36 + a counter, e.g. "shnt00ks1a"):

    namespace <tag>-sw   the switch: bridge <tag>br and, per host, veth end <tag>b<i> on it
    namespace <tag>-h<i> host i: veth end <tag>h<i> with 10.x.y.(i+1)/24, and lo

The switch lives in its own namespace rather than the root one, so the machine's firewall (Docker's
FORWARD policy DROP with bridge-nf-call-iptables=1 is common) never sees the hosts' traffic and the
root namespace's `ip link` does not change while a cluster exists. Deleting the namespaces deletes
every link: a veth pair dies with either end's namespace, the bridge with the switch's.

Shaping: a token bucket (tbf) at host i's rate on both directions of its port: egress of <tag>h<i>
(what host i sends) and egress of <tag>b<i> (what host i receives). TCP goodput comes out about 3-4%
under the rate, the Ethernet/IP/TCP headers that tbf counts. A latency is a netem qdisc under the
receiving port's tbf, so every packet is delayed once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType

from shunter.errors import FieldError, ShunterError
from shunter.units import parse_rates, parse_seconds

PREFIX = "shnt"
MAX_HOSTS = 254  # host i is 10.x.y.(i+1) in one /24
DEFAULT_PORT = 29511
# tbf releases at most `burst` bytes per timer wakeup. 4 ms of the rate is one tick at HZ=250;
# with less, tbf undershoots at high rates (measured: 1 Gbit/s with a 32 KiB burst gives 97.5 MB/s of
# 125). The 64 KiB floor lets one whole GSO packet (up to 64 KiB on a veth) through unsplit.
BURST_TIME_S = 0.004
BURST_MIN_BYTES = 64 * 1024
# tbf's queue: packets waiting longer than this are dropped, as a switch's shallow buffer would.
QUEUE_LATENCY_S = 0.05
# Every host's TCP congestion control. Loss-based, as Linux's default (cubic) and most clusters run;
# cubic itself is not allowed inside namespaces on every machine, reno is. BBR sizes its window from
# the smallest round trip it saw (~10 us on a veth), so whenever queues at busy ports delay its ACKs
# it stalls: on 400/320/200/160 Mbit/s ports the 160 Mbit/s host sent at 0.3-0.6 of its rate while it
# also received, and a mixed layer's scheduled dispatch took 1.21x the bound under BBR, 1.14x under reno.
DEFAULT_CONGESTION_CONTROL = "reno"
ALLOWED_CONGESTION_CONTROL = "/proc/sys/net/ipv4/tcp_allowed_congestion_control"

_TAG_PATTERN = rf"{PREFIX}([0-9a-z]{{5}})[0-9a-z]"
_NAMESPACE_RE = re.compile(rf"({_TAG_PATTERN})-(?:sw|h\d+)")
_counter = itertools.count()


def check_environment() -> None:
    """Raise ShunterError unless this process can make namespaces and shape links: root, `ip`, `tc`."""
    if os.geteuid() != 0:
        raise ShunterError("shunter cluster run needs root (network namespaces and tc); run it with sudo")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise ShunterError(
                f"`{tool}` not found on PATH: install iproute2 (e.g. apt-get install iproute2)"
            )


def parse_host_bandwidths(text: str, num_hosts: int, field: str = "--bandwidth") -> list[float]:
    """[num_hosts] bytes/s from '1Gbit/s' (every host) or 'a,b,...' (one per host, host 0 first)."""
    return parse_rates(text, num_hosts, field, "hosts")


def parse_latency(text: str, field: str = "--latency") -> float:
    """Seconds from '0', '5ms', '200us', '0.01s' (a plain number is seconds)."""
    return parse_seconds(text, field)


def tbf_burst_bytes(rate_bytes_s: float) -> int:
    """The tbf bucket size for a rate: 4 ms of it, at least 64 KiB (see BURST_TIME_S)."""
    return max(int(rate_bytes_s * BURST_TIME_S), BURST_MIN_BYTES)


def run_net_tool(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one `ip` or `tc` command; with check, a failure raises ShunterError with it and its stderr."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise ShunterError(f"`{' '.join(argv)}` could not start: {exc}") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().replace("\n", "; ")
        raise ShunterError(f"`{' '.join(argv)}` failed (status {result.returncode}): {detail}")
    return result


def list_namespaces() -> list[str]:
    """Names of the named network namespaces (`ip netns list`)."""
    lines = run_net_tool(["ip", "netns", "list"]).stdout.splitlines()
    return [line.split()[0] for line in lines if line.strip()]


class ClusterInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a cluster existed; raised so that the ranks are stopped and the
    cluster removed on the way out. signum: the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """SIGINT/SIGTERM raise ClusterInterrupted, except while held (spawning ranks, cleaning up), when
    they are remembered instead: an exception in the middle of either would leak processes or links."""

    held = 0
    pending: int | None = None

    @classmethod
    def handle(cls, signum: int, frame: FrameType | None) -> None:
        if cls.held:
            cls.pending = cls.pending or signum
            return
        raise ClusterInterrupted(signum)

    @classmethod
    @contextlib.contextmanager
    def hold(cls, raise_after: bool) -> Iterator[None]:
        """Hold signals for the block; with raise_after, one that arrived is raised at its end."""
        cls.held += 1
        try:
            yield
        except BaseException:
            # Already failing: a signal that arrived meanwhile changes nothing, so forget it.
            cls.held -= 1
            if cls.held == 0:
                cls.pending = None
            raise
        cls.held -= 1
        if cls.held == 0 and cls.pending is not None:
            signum, cls.pending = cls.pending, None
            if raise_after:
                raise ClusterInterrupted(signum)


class EmulatedCluster:
    """N hosts in network namespaces behind one switch, host i's port shaped to bandwidth_bytes_s[i]
    in both directions; latency_s (one way: every packet is delayed once, on the switch port of the
    host it goes to, so a round trip takes twice it) is added with netem when > 0; every host's TCP
    runs congestion_control (see DEFAULT_CONGESTION_CONTROL).

    `with EmulatedCluster(...) as cluster:` creates everything (or nothing: a failed setup is rolled
    back) and removes it on the way out, on an exception, and on SIGINT/SIGTERM, which raise
    ClusterInterrupted while the cluster exists (when entered from the main thread).

    Attributes, one entry per host: namespaces (names), addresses ('10.x.y.z'), interfaces (the
    host's interface name inside its namespace), bandwidth_bytes_s."""

    def __init__(
        self,
        num_hosts: int,
        bandwidth_bytes_s: float | Sequence[float],
        latency_s: float = 0.0,
        congestion_control: str = DEFAULT_CONGESTION_CONTROL,
    ):
        if not 1 <= num_hosts <= MAX_HOSTS:
            raise FieldError("hosts", f"need between 1 and {MAX_HOSTS} hosts, got {num_hosts}")
        rates = (
            [float(bandwidth_bytes_s)] * num_hosts
            if isinstance(bandwidth_bytes_s, int | float)
            else [float(rate) for rate in bandwidth_bytes_s]
        )
        if len(rates) != num_hosts:
            raise FieldError("bandwidth", f"{len(rates)} bandwidths for {num_hosts} hosts")
        for host, rate in enumerate(rates):
            if not rate > 0:
                raise FieldError("bandwidth", f"bandwidth must be positive, got {rate}", f"(host {host})")
        if not latency_s >= 0:
            raise FieldError("latency", f"must not be negative, got {latency_s}")
        self.num_hosts = num_hosts
        self.bandwidth_bytes_s = rates
        self.latency_s = float(latency_s)
        if not re.fullmatch(r"[a-z0-9_]+", congestion_control):
            raise FieldError("congestion_control", f"not a congestion control name: {congestion_control!r}")
        self.congestion_control = congestion_control
        self.tag = ""
        self.switch_namespace = ""
        self.bridge = ""
        self.namespaces: list[str] = []
        self.interfaces: list[str] = []
        self.addresses: list[str] = []
        self._created: list[str] = []  # namespaces this object may have created, in order
        self._old_handlers: dict[int, object] = {}

    def __enter__(self) -> EmulatedCluster:
        check_environment()
        try:
            self._install_handlers()
            with _Signals.hold(raise_after=True):
                self._name()
                self._create()
        except BaseException:
            self._destroy(quiet=True)
            self._restore_handlers()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._destroy(quiet=exc_type is not None)
        finally:
            self._restore_handlers()

    def rank_environment(self, rank: int, port: int = DEFAULT_PORT) -> dict[str, str]:
        """The variables torchrun gives a rank (one rank per host), plus SHUNTER_CLUSTER_BANDWIDTHS:
        every host's shaped rate in bytes/s, comma-separated, host 0 first."""
        return {
            "RANK": str(rank),
            "WORLD_SIZE": str(self.num_hosts),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": self.addresses[0],
            "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": self.interfaces[rank],
            "SHUNTER_CLUSTER_BANDWIDTHS": ",".join(f"{rate:.15g}" for rate in self.bandwidth_bytes_s),
        }

    def _name(self) -> None:
        """A tag no namespace uses yet; the subnet is derived from it (cosmetic: the hosts can only
        reach their own switch, so two runs could even share one)."""
        existing = set(list_namespaces())
        for _ in range(36):
            tag = f"{PREFIX}{_base36(os.getpid(), 5)}{_base36(next(_counter) % 36, 1)}"
            if not any(name.startswith(tag) for name in existing):
                break
        else:
            raise ShunterError(
                f"leftover namespaces {PREFIX}{_base36(os.getpid(), 5)}*: run `shunter cluster clean`"
            )
        crc = zlib.crc32(tag.encode())
        subnet = f"10.{64 + crc % 128}.{(crc >> 8) % 256}"
        self.tag = tag
        self.switch_namespace = f"{tag}-sw"
        self.bridge = f"{tag}br"
        self.namespaces = [f"{tag}-h{i}" for i in range(self.num_hosts)]
        self.interfaces = [f"{tag}h{i}" for i in range(self.num_hosts)]  # at most 14 characters
        self.addresses = [f"{subnet}.{i + 1}" for i in range(self.num_hosts)]

    def _create(self) -> None:
        switch, bridge = self.switch_namespace, self.bridge
        self._add_namespace(switch)
        run_net_tool(["ip", "-n", switch, "link", "add", bridge, "type", "bridge"])
        run_net_tool(["ip", "-n", switch, "link", "set", bridge, "up"])
        for host in range(self.num_hosts):
            namespace, inside, port = self.namespaces[host], self.interfaces[host], f"{self.tag}b{host}"
            self._add_namespace(namespace)
            veth = ["type", "veth", "peer", "name", inside, "netns", namespace]
            run_net_tool(["ip", "-n", switch, "link", "add", port, *veth])
            run_net_tool(["ip", "-n", switch, "link", "set", port, "master", bridge, "up"])
            run_net_tool(["ip", "-n", namespace, "addr", "add", f"{self.addresses[host]}/24", "dev", inside])
            run_net_tool(["ip", "-n", namespace, "link", "set", inside, "up"])
            run_net_tool(["ip", "-n", namespace, "link", "set", "lo", "up"])
            self._set_congestion_control(namespace)
            rate = self.bandwidth_bytes_s[host]
            self._shape(namespace, inside, rate, 0.0)  # what host i sends
            # What host i receives. The delay goes here, past the veth, and not on the sender's own
            # egress: there a held packet still counts against its socket's TCP Small Queues budget
            # (about 1 ms of data), which would cap throughput far below the rate.
            self._shape(switch, port, rate, self.latency_s)

    def _add_namespace(self, name: str) -> None:
        # Remembered before it exists: interrupted half way, `ip netns add` may still have made it.
        self._created.append(name)
        run_net_tool(["ip", "netns", "add", name])

    def _set_congestion_control(self, namespace: str) -> None:
        setting = f"net.ipv4.tcp_congestion_control={self.congestion_control}"
        result = run_net_tool(["ip", "netns", "exec", namespace, "sysctl", "-qw", setting], check=False)
        if result.returncode != 0:
            try:
                with open(ALLOWED_CONGESTION_CONTROL) as allowed_file:
                    allowed = allowed_file.read().strip()
            except OSError:
                allowed = "unknown"
            raise FieldError(
                "congestion_control",
                f"the hosts cannot use {self.congestion_control!r} (this machine "
                f"allows: {allowed}, from {ALLOWED_CONGESTION_CONTROL})",
            )

    def _shape(self, namespace: str, device: str, rate_bytes_s: float, latency_s: float) -> None:
        rate = f"{max(round(rate_bytes_s * 8), 1)}bit"
        burst = tbf_burst_bytes(rate_bytes_s)
        tbf = ["tbf", "rate", rate, "burst", str(burst), "latency", f"{QUEUE_LATENCY_S * 1e3:g}ms"]
        run_net_tool(["tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "handle", "1:", *tbf])
        if latency_s > 0:
            # netem as tbf's child (instead of its default fifo) delays packets after the bucket; its
            # queue must hold everything in flight during the delay, plus the fifo tbf would have had.
            in_flight = rate_bytes_s * (latency_s + QUEUE_LATENCY_S) + burst
            limit = max(1000, int(in_flight / 1500) + 1)
            argv = ["tc", "-n", namespace, "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:"]
            argv += ["netem", "delay", f"{round(latency_s * 1e6)}us", "limit", str(limit)]
            result = run_net_tool(argv, check=False)
            if result.returncode != 0:
                if "unknown" in result.stderr.lower():
                    raise FieldError(
                        "latency",
                        "this kernel has no netem qdisc (module sch_netem); "
                        "try `modprobe sch_netem`, or run without a latency",
                    )
                run_net_tool(argv)  # raises with the command and its stderr

    def _destroy(self, quiet: bool) -> None:
        """Delete every namespace this object created (their links go with them). Problems raise
        ShunterError, or with quiet (an exception is already on its way) become a line on stderr."""
        if not self._created:
            return
        with _Signals.hold(raise_after=False):
            # The switch is deleted first: with it go the bridge and every veth pair.
            for name in self._created:
                run_net_tool(["ip", "netns", "delete", name], check=False)
            self._created, wanted = [], self._created
            left = sorted(set(wanted) & set(list_namespaces()))
        if left:
            message = f"could not delete network namespaces {', '.join(left)}; try `shunter cluster clean`"
            if not quiet:
                raise ShunterError(message)
            print(f"shunter: warning: {message}", file=sys.stderr)

    def _install_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[signum] = signal.signal(signum, _Signals.handle)

    def _restore_handlers(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._old_handlers = {}


@dataclass
class Leftovers:
    """What clean_leftovers did: namespaces removed, namespaces kept (their run is alive), and the
    pids of processes it killed because they were still running in a removed namespace."""

    removed: list[str] = dataclasses.field(default_factory=list)
    kept: list[str] = dataclasses.field(default_factory=list)
    killed: list[int] = dataclasses.field(default_factory=list)


def clean_leftovers(force: bool = False) -> Leftovers:
    """Delete the namespaces that Shunter clusters left behind (their run was SIGKILLed, say), with
    their links, killing any rank still running in them. Those of a run whose process is still
    alive (its pid is in the name) are kept unless force."""
    report = Leftovers()
    names = [name for name in list_namespaces() if _NAMESPACE_RE.fullmatch(name)]
    names.sort(key=lambda name: not name.endswith("-sw"))  # a switch first: its links go with it
    for name in names:
        match = _NAMESPACE_RE.fullmatch(name)
        assert match is not None
        if not force and _alive(int(match.group(2), 36)):
            report.kept.append(name)
            continue
        for pid in map(int, run_net_tool(["ip", "netns", "pids", name], check=False).stdout.split()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                report.killed.append(pid)
        if run_net_tool(["ip", "netns", "delete", name], check=False).returncode == 0:
            report.removed.append(name)
    return report


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _base36(number: int, width: int) -> str:
    digits = ""
    while number:
        number, digit = divmod(number, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[digit] + digits
    return digits.rjust(width, "0")[-width:]
