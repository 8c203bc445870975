#!/usr/bin/env bash
# virtio I/O benchmark: the same guest workloads on Hostvisor (--accel soft) and on QEMU TCG,
# side by side in one run, with the same virtio devices (virtio-blk-pci on a raw image file,
# virtio-net-pci on a TAP), alternating VMM run by run. Prints throughput per workload and the
# ratio ours/QEMU (throughput, so > 1 means Hostvisor is faster).
#
#   scripts/bench-virtio.sh [--runs N] [--hostvisor PATH] [--disk-mib N] [--net-mib N]
#                           [--no-offloads] [--nic virtio|e1000|rtl8139[,...]] [--keep]
#
# --nic e1000 puts an emulated Intel 82540EM on the TAP instead of virtio-net on both VMMs
# (Hostvisor's `--net ...,model=e1000`, QEMU's `-device e1000`), --nic rtl8139 a Realtek
# RTL8139 (Hostvisor's `model=rtl8139`, an RTL8139C that Linux drives with 8139too; QEMU's
# `-device rtl8139`, an RTL8139C+ that Linux drives with 8139cp), and boot the generic kernel
# (.cache/guest-generic; the cloud kernel has neither driver); the disk stays virtio-blk.
#
# A list (--nic virtio,e1000,rtl8139: the seed's table) runs only the two network workloads,
# for every NIC on both VMMs in each run, all on the generic kernel, and ends with the
# virtio/emulated throughput ratios of each VMM.
#
# Workloads (each timed by the host around one guest shell command, see docs/benchmarks.md):
#   blk-write  dd if=/dev/zero of=/dev/vda bs=1M count=N oflag=direct conv=fsync
#   blk-read   dd if=/dev/vda of=/dev/null bs=1M count=N iflag=direct
#   net-rx     host -> guest TCP: busybox nc in the guest receives N MiB of random bytes from a
#              host server into tmpfs; byte count and MD5 checked in the guest afterwards
#   net-tx     guest -> host TCP: the guest sends the received file back with busybox nc;
#              the host counts the bytes and checks the MD5
# Each is reported per wall second and per CPU second of the VMM process. Untimed, the file is
# also written to the disk and read back (MD5 in the guest, and in the image afterwards).
# The VMMs, their TAP and the host's TCP server live in a network namespace made here.
# Needs root (network namespace, TAP), python3 and qemu-system-x86_64.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3
hostvisor=.build/release/hostvisor
disk_mib=256
net_mib=32
qemu_offloads=1
nic=virtio
keep=0
usage="usage: $0 [--runs N] [--hostvisor PATH] [--disk-mib N] [--net-mib N] [--no-offloads] [--nic virtio|e1000|rtl8139[,...]] [--keep]"
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --hostvisor) hostvisor="$2"; shift 2 ;;
    --disk-mib) disk_mib="$2"; shift 2 ;;
    --net-mib) net_mib="$2"; shift 2 ;;
    --no-offloads) qemu_offloads=0; shift ;;
    --nic) nic="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
for one in ${nic//,/ }; do
  case "$one" in
    virtio | e1000 | rtl8139) ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
case "$nic" in
  virtio) guest=.cache/guest ;;
  *) guest=.cache/guest-generic ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "bench-virtio: needs root (network namespace and TAP device)" >&2; exit 1; }
[ -x "$hostvisor" ] || { echo "bench-virtio: missing $hostvisor: run 'make build' or pass --hostvisor PATH" >&2; exit 1; }
[ -f $guest/vmlinuz ] || scripts/make-default-guest.sh $([ "$nic" != virtio ] && echo --generic) $guest
command -v qemu-system-x86_64 >/dev/null || { echo "bench-virtio: missing qemu-system-x86_64: apt-get install qemu-system-x86" >&2; exit 1; }
command -v python3 >/dev/null || { echo "bench-virtio: missing python3" >&2; exit 1; }
[ -c /dev/net/tun ] || { echo "bench-virtio: missing /dev/net/tun" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/hostvisor-bench-virtio.XXXXXX")
netns=hvbench$$
tap=hvbtap0
cleanup() {
  # Every process in the namespace: the driver and the VMM it started (in its own session).
  if [ -n "$(ip netns pids "$netns" 2>/dev/null)" ]; then
    ip netns pids "$netns" | xargs -r kill 2>/dev/null || true
    sleep 1
    ip netns pids "$netns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  fi
  ip netns del "$netns" 2>/dev/null || true # deletes the TAP inside it too
  if [ $keep -eq 1 ]; then echo "bench-virtio: logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$netns"
ip -n "$netns" link set lo up
# A persistent TAP that both VMMs attach to in turn; the host side has 10.77.0.1/24.
ip -n "$netns" tuntap add dev $tap mode tap
ip -n "$netns" addr add 10.77.0.1/24 dev $tap
ip -n "$netns" link set $tap up

# Raw disk image, fully allocated so neither VMM pays for block allocation on the host.
image=$work/disk.img
# It also takes the data check: the network file written at 8 MiB and read back.
image_mib=$((disk_mib > net_mib + 8 ? disk_mib : net_mib + 8))
dd if=/dev/zero of="$image" bs=1M count=$((image_mib + 16)) status=none

cat >"$work/driver.py" <<'PYTHON'
"""Boots a guest on a pseudo-terminal console, types commands into its shell and times them."""
import fcntl, hashlib, os, pty, re, select, signal, socket, subprocess, sys, termios, threading, time, tty

work, image, tap, runs, disk_mib, net_mib = sys.argv[1:7]
runs, disk_mib, net_mib = int(runs), int(disk_mib), int(net_mib)
hostvisor, kernel, initrd, qemu_offloads, nic_list = sys.argv[7:12]
nics = nic_list.split(",")
table = len(nics) > 1  # the seed's table: network workloads only, every NIC in each run
host_ip, guest_ip = "10.77.0.1", "10.77.0.2"
# The cloud kernel (virtio only) has no e1000/8139 modules; the generic kernel loads them all
# (8139too binds Hostvisor's RTL8139C, 8139cp QEMU's RTL8139C+; each refuses the other chip).
modules = "virtio_pci,virtio_blk,virtio_net" + ("" if nic_list == "virtio" else ",e1000,8139too,8139cp")
cmdline = "console=ttyS0 panic=-1 hostvisor.modules=" + modules
mac = "52:54:00:12:34:56"


class GuestConsole:
    """A VMM whose serial console is a pseudo-terminal (its controlling terminal, foreground)."""

    def __init__(self, name, argv, log_path):
        self.name = name
        master, slave = pty.openpty()
        tty.setraw(slave)
        self.log = open(log_path, "wb")

        def become_terminal_owner():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=self.log,
                                        preexec_fn=become_terminal_owner, close_fds=True)
        os.close(slave)
        self.master = master
        self.seen = b""
        self.counter = 0

    def _read_some(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        ready, _, _ = select.select([self.master], [], [], min(remaining, 1.0))
        if not ready:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.process.returncode}")
            return
        try:
            data = os.read(self.master, 65536)
        except OSError:
            data = b""
        if not data:
            raise RuntimeError(f"{self.name}: console closed (status {self.process.poll()})")
        self.log.write(data)
        self.log.flush()
        self.seen += data

    def wait_for(self, pattern, timeout):
        """Consumes console output up to and including the first match of `pattern` (bytes regex)."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.seen)
            if match:
                self.seen = self.seen[match.end():]
                return match
            self._read_some(deadline)

    def type(self, text):
        # Small chunks: a 16550 receive FIFO is 16 bytes deep; neither VMM should need this, but
        # it keeps the typing identical and safe for both.
        data = text.encode()
        for i in range(0, len(data), 16):
            os.write(self.master, data[i:i + 16])
            time.sleep(0.005)

    def cpu_seconds(self):
        """User + system CPU time of the VMM process so far (all its threads)."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def run(self, command, timeout):
        """Types `command`; returns (host wall seconds from the final newline to the end marker,
        VMM CPU seconds over the same span, the command's output, its exit status)."""
        self.counter += 1
        tag = f"HVB{self.counter}"
        # The typed line echoes as  ...; echo "HVB1""-END:$?"  which the pattern does not match.
        self.type(f'{command}; echo "{tag}""-END:$?"')
        try:
            self.wait_for(re.escape(f'"{tag}""-END:$?"').encode(), 30)
        except TimeoutError:  # the echo was garbled (e.g. by a kernel message); go on anyway
            print(f"  {self.name}: no clean echo of command {self.counter}", flush=True)
        cpu_start = self.cpu_seconds()
        start = time.monotonic()
        os.write(self.master, b"\r")
        match = self.wait_for(rb"(?s)(.*?)" + tag.encode() + rb"-END:(\d+)", timeout)
        elapsed = time.monotonic() - start
        cpu = self.cpu_seconds() - cpu_start
        self.wait_for(rb"hostvisor:[^#\r\n]*# ", 30)  # the next prompt: type only after it
        return elapsed, cpu, match.group(1).decode(errors="replace"), int(match.group(2))

    def stop(self):
        if self.process.poll() is None:
            try:
                self.type("poweroff -f\r")
                self.process.wait(timeout=20)
            except Exception:
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
        self.log.close()


class Server:
    """One TCP connection on host_ip:port: either sends `payload` or receives and digests."""

    def __init__(self, port, payload=None):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host_ip, port))
        self.listener.listen(1)
        self.listener.settimeout(900)
        self.payload = payload
        self.received = 0
        self.digest = hashlib.md5()
        self.error = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            connection, _ = self.listener.accept()
            with connection:
                if self.payload is not None:
                    connection.sendall(self.payload)
                    connection.shutdown(socket.SHUT_WR)
                while True:
                    data = connection.recv(1 << 20)
                    if not data:
                        break
                    self.received += len(data)
                    self.digest.update(data)
        except Exception as error:  # reported by finish()
            self.error = error
        finally:
            self.listener.close()

    def finish(self):
        self.thread.join(timeout=60)
        if self.error:
            raise RuntimeError(f"host server: {self.error}")


def hostvisor_argv(nic):
    return [hostvisor, "run", "--no-sandbox", "--accel", "soft", "--memory", "512M", "--serial", "stdio",
            "--kernel", kernel, "--initrd", initrd, "--cmdline", cmdline,
            "--disk", image, "--net", f"tap={tap},mac={mac}" + ("" if qemu_offloads == "1" else ",offloads=off")
            + ("" if nic == "virtio" else f",model={nic}")]


def qemu_argv(nic):
    # Buffered host I/O with fdatasync on guest flushes, as Hostvisor's RawFileBlockBackend.
    drive = f"file={image},format=raw,if=none,id=d0,cache=writeback,aio=threads"
    # Both VMMs offer checksum and TCP segmentation offloads (QEMU's defaults). --no-offloads
    # turns them off on both sides: QEMU's csum, guest_csum, TSO/ECN/UFO properties, and
    # Hostvisor's `--net ...,offloads=off` (no F_CSUM/F_GUEST_CSUM/TSO features offered).
    net = {"virtio": "virtio-net-pci", "e1000": "e1000", "rtl8139": "rtl8139"}[nic] + ",netdev=n0,mac=" + mac
    if qemu_offloads != "1" and nic == "virtio":
        net += ",csum=off,guest_csum=off" + "".join(
            f",{side}_{what}=off" for side in ("host", "guest") for what in ("tso4", "tso6", "ecn", "ufo"))
    return ["qemu-system-x86_64", "-accel", "tcg", "-m", "512M", "-display", "none",
            "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nodefaults",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
            "-drive", drive, "-device", "virtio-blk-pci,drive=d0",
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no", "-device", net]


def tcp_counters(text):
    """(segments sent, segments retransmitted) from /proc/net/snmp text."""
    lines = [line.split() for line in text.splitlines() if line.strip().startswith("Tcp:")]
    if len(lines) < 2:
        return None
    values = dict(zip(lines[-2][1:], lines[-1][1:]))
    return int(values["OutSegs"]), int(values["RetransSegs"])


def host_tcp_counters():
    with open("/proc/net/snmp") as snmp:  # this process lives in the benchmark's namespace
        return tcp_counters(snmp.read())


def tap_transmit_drops():
    """Frames the host's TAP dropped on the way to the VMM (its queue was full)."""
    with open(f"/sys/class/net/{tap}/statistics/tx_dropped") as counter:
        return int(counter.read())


def one_run(name, argv, run_index, nic):
    """Boots one VMM and runs the workloads (the network ones only for the table); returns
    {workload: (wall s, CPU s, bytes)} plus notes."""
    print(f"  {name} ({nic}): booting", flush=True)
    log = f"{work}/{name}-{nic}-{run_index}.log"
    guest = GuestConsole(name, argv, log)
    results = {}
    check_image = None
    try:
        guest.wait_for(rb"HOSTVISOR-GUEST-READY", 300)
        time.sleep(1.0)
        # A wide terminal, so busybox's line editing never wraps the echo of a typed command.
        # Kernel messages off the console (e.g. "random: crng init done"), so none garbles the
        # echo of a typed line.
        guest.type("stty cols 1000; dmesg -n 1\r")
        time.sleep(0.5)
        _, _, out, status = guest.run(
            f"ip link set eth0 up && ip addr add {guest_ip}/24 dev eth0 && "
            f"basename $(readlink /sys/class/net/eth0/device/driver) && "
            f"{'echo' if nic != 'virtio' else 'cat /sys/class/net/eth0/device/features'} && "
            f"ping -c 1 -W 10 {host_ip} >/dev/null", 60)
        if status != 0:
            raise RuntimeError(f"guest set-up failed: {out.strip()}")
        if run_index == 1:
            # The driver's name, then the virtio features (virtio) or an empty line (emulated).
            lines = out.strip().splitlines()
            position = -2 if nic == "virtio" else -1
            print(f"  {name}: eth0 driver {lines[position].strip() if len(lines) >= -position else '?'}", flush=True)
        if run_index == 1 and nic == "virtio":
            bits = out.strip().splitlines()[-1].strip()
            names = {0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC", 7: "GUEST_TSO4", 11: "HOST_TSO4",
                     15: "MRG_RXBUF", 16: "STATUS", 17: "CTRL_VQ", 18: "CTRL_RX", 19: "CTRL_VLAN", 21: "GUEST_ANNOUNCE",
                     22: "MQ", 23: "CTRL_MAC_ADDR", 28: "INDIRECT", 29: "EVENT_IDX", 32: "VERSION_1", 40: "RING_RESET"}
            print(f"  {name}: virtio-net features negotiated: "
                  + " ".join(names.get(i, str(i)) for i, bit in enumerate(bits) if bit == "1"), flush=True)
        # Host-observed cost of typing a trivial command and seeing its marker (not subtracted).
        results["overhead-ms"] = min(guest.run("true", 30)[0] for _ in range(3)) * 1000
        bytes_disk = disk_mib << 20
        bytes_net = net_mib << 20

        def timed(label, command, size):
            seconds, cpu, out, status = guest.run(command, 1800)
            if status != 0:
                raise RuntimeError(f"{label}: guest command failed (status {status}): {out.strip()[-300:]}")
            results[label] = (seconds, cpu, size)
            return out

        def guest_tcp_counters():
            _, _, out, _ = guest.run("cat /proc/net/snmp", 60)
            return tcp_counters(out)

        if not table:
            timed("blk-write", f"dd if=/dev/zero of=/dev/vda bs=1M count={disk_mib} oflag=direct conv=fsync", bytes_disk)
            timed("blk-read", f"dd if=/dev/vda of=/dev/null bs=1M count={disk_mib} iflag=direct", bytes_disk)

        payload = os.urandom(bytes_net)
        expected = hashlib.md5(payload).hexdigest()
        before = guest_tcp_counters(), host_tcp_counters()
        drops_before = tap_transmit_drops()
        server = Server(5001, payload)
        timed("net-rx", f"nc {host_ip} 5001 </dev/null >/tmp/blob", bytes_net)
        server.finish()
        after = guest_tcp_counters(), host_tcp_counters()
        results["net-rx-retrans"] = after[1][1] - before[1][1]  # the host is the sender
        results["net-rx-tap-drops"] = tap_transmit_drops() - drops_before
        _, _, out, status = guest.run("wc -c </tmp/blob; md5sum /tmp/blob", 600)
        if status != 0 or str(bytes_net) not in out or expected not in out:
            del results["net-rx"]
            raise RuntimeError(f"net-rx: guest received wrong data: {out.strip()} (expected {bytes_net} bytes, md5 {expected})")

        before = after
        server = Server(5002)
        timed("net-tx", f"nc {host_ip} 5002 </tmp/blob", bytes_net)
        server.finish()
        after = guest_tcp_counters(), host_tcp_counters()
        results["net-tx-retrans"] = after[0][1] - before[0][1]  # the guest is the sender
        results["net-tx-segments"] = after[0][0] - before[0][0]
        if server.received != bytes_net or server.digest.hexdigest() != expected:
            del results["net-tx"]
            raise RuntimeError(f"net-tx: host received {server.received} bytes, md5 {server.digest.hexdigest()} "
                               f"(expected {bytes_net}, {expected})")

        # Data check, untimed: the random file onto the disk at 8 MiB and back through the guest;
        # the host reads the image after the VMM has exited.
        if table:
            return results
        _, _, out, status = guest.run(
            f"dd if=/tmp/blob of=/dev/vda bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null && "
            f"dd if=/dev/vda bs=1M skip=8 count={net_mib} iflag=direct 2>/dev/null | md5sum", 900)
        if status != 0 or expected not in out:
            raise RuntimeError(f"blk data check: guest read back {out.strip()} (expected md5 {expected})")
        check_image = expected
    except Exception as error:
        print(f"  {name}: FAILED: {error!r} (console log {log})", flush=True)
        results["failed"] = True
    finally:
        guest.stop()
    if not results.get("failed") and check_image is not None:
        with open(image, "rb") as disk:
            disk.seek(8 << 20)
            on_host = hashlib.md5(disk.read(bytes_net)).hexdigest()
        if on_host != check_image:
            print(f"  {name}: FAILED: the image holds md5 {on_host} at 8 MiB after the run (expected {check_image})",
                  flush=True)
            results["failed"] = True
    return results


def wall_rate(result):
    return result[2] / result[0] / 2**20


def cpu_rate(result):
    return result[2] / result[1] / 2**20 if result[1] > 0 else float("inf")


def cell(results, key, rate):
    return f"{rate(results[key]):8.2f}" if key in results else "    fail"


def ratio(ours_run, theirs_run, key, rate):
    if key not in ours_run or key not in theirs_run:
        return "    -"
    return f"{rate(ours_run[key]) / rate(theirs_run[key]):5.3f}"


workloads = ["net-rx", "net-tx"] if table else ["blk-write", "blk-read", "net-rx", "net-tx"]
ours = {nic: [] for nic in nics}
theirs = {nic: [] for nic in nics}
for run_index in range(1, runs + 1):
    print(f"run {run_index}/{runs}", flush=True)
    for nic in nics:
        ours[nic].append(one_run("hostvisor", hostvisor_argv(nic), run_index, nic))
        theirs[nic].append(one_run("qemu", qemu_argv(nic), run_index, nic))
        o, q = ours[nic][-1], theirs[nic][-1]
        print(f"  {nic}: MiB/s  wall: hostvisor     qemu  ratio |  per VMM CPU s: hostvisor     qemu  ratio")
        for w in workloads:
            print(f"  {w:9s}        {cell(o, w, wall_rate)} {cell(q, w, wall_rate)}  {ratio(o, q, w, wall_rate)} |"
                  f"                 {cell(o, w, cpu_rate)} {cell(q, w, cpu_rate)}  {ratio(o, q, w, cpu_rate)}",
                  flush=True)
        print("  TCP retransmissions: net-rx (host sends) hostvisor "
              f"{o.get('net-rx-retrans', '-')} qemu {q.get('net-rx-retrans', '-')} (TAP queue drops hostvisor "
              f"{o.get('net-rx-tap-drops', '-')} qemu {q.get('net-rx-tap-drops', '-')}); net-tx (guest sends) hostvisor "
              f"{o.get('net-tx-retrans', '-')}/{o.get('net-tx-segments', '-')} qemu "
              f"{q.get('net-tx-retrans', '-')}/{q.get('net-tx-segments', '-')} segments", flush=True)


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def medians(results, w):
    """(wall MiB/s, CPU MiB/s) medians of workload `w` over the runs that completed it, or None."""
    done = [r[w] for r in results if w in r]
    if not done:
        return None
    return median([wall_rate(x) for x in done]), median([cpu_rate(x) for x in done])


failed = False
for nic in nics:
    print("command round trip (typing 'true' to its marker, best of 3, ms) on " + nic + ": hostvisor "
          + " ".join(f"{r['overhead-ms']:.0f}" for r in ours[nic] if "overhead-ms" in r) + "; qemu "
          + " ".join(f"{r['overhead-ms']:.0f}" for r in theirs[nic] if "overhead-ms" in r))
for nic in nics:
    print(f"median of {runs} runs ({'' if table else f'disk {disk_mib} MiB, '}net {net_mib} MiB on {nic}; "
          "ratio = ours/QEMU throughput):")
    print("  MiB/s         wall: hostvisor     qemu  ratio |  per VMM CPU s: hostvisor     qemu  ratio")
    for w in workloads:
        if any(len([r for r in side[nic] if w in r]) < runs for side in (ours, theirs)) or any(
                r.get("failed") for r in ours[nic] + theirs[nic]):
            failed = True
        mo, mq = medians(ours[nic], w), medians(theirs[nic], w)
        if mo is None or mq is None:
            print(f"  {w:9s} no complete result")
            continue
        print(f"  {w:9s}        {mo[0]:8.2f} {mq[0]:8.2f}  {mo[0] / mq[0]:5.3f} |"
              f"                 {mo[1]:8.2f} {mq[1]:8.2f}  {mo[1] / mq[1]:5.3f}")
if "virtio" in nics and len(nics) > 1:
    print("virtio-net / emulated NIC throughput (medians; > 1: virtio-net is faster):")
    print("  workload  NIC            wall: hostvisor     qemu |  per VMM CPU s: hostvisor     qemu")
    for w in workloads:
        for nic in nics:
            if nic == "virtio":
                continue
            cells = []
            for rate_index in (0, 1):
                for side in (ours, theirs):
                    virtio, emulated = medians(side["virtio"], w), medians(side[nic], w)
                    cells.append(f"{virtio[rate_index] / emulated[rate_index]:8.2f}" if virtio and emulated
                                 else "       -")
            print(f"  {w:9s} {nic:8s}              {cells[0]} {cells[1]} |                 {cells[2]} {cells[3]}")
if not failed:
    print("data checks passed: net-rx and net-tx MD5" + ("" if table else
          ", disk write/read-back MD5 in the guest and on the host"))
sys.exit(1 if failed else 0)
PYTHON

# In the background, so an INT/TERM to this script runs the traps at once.
ip netns exec "$netns" python3 "$work/driver.py" "$work" "$image" $tap "$runs" "$disk_mib" "$net_mib" \
  "$(realpath "$hostvisor")" "$(realpath $guest/vmlinuz)" "$(realpath $guest/initramfs.cpio.gz)" $qemu_offloads $nic &
wait $!
