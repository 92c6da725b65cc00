"""The bubblewrap sandbox: normal programs run; each escape attempt is contained.

Every escape case asserts what the host sees afterwards (files absent, processes gone,
servers not contacted, the test process and a sentinel process alive), not only the
sandbox's own report. Run: `pytest -q tests/test_sandbox.py` (about 15 s).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
import uuid
from dataclasses import replace

import pytest

from rewards.sandbox import Limits, RunResult, Sandbox, SandboxUnavailable, _check_available

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap missing: apt-get install bubblewrap"
)

# A roomy wall clock where a run should end by itself (a loaded machine must not fail it),
# a short one where the wall clock is what ends the run.
LIMITS = Limits(cpu_seconds=2, memory_mb=256, file_size_mb=8, processes=8, wall_seconds=10.0)
SHORT = replace(LIMITS, wall_seconds=1.5)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(LIMITS, max_concurrent=2)


@pytest.fixture(scope="module")
def short() -> Sandbox:
    return Sandbox(SHORT, max_concurrent=2)


def run(sandbox: Sandbox, code: str, stdin: str = "") -> RunResult:
    return sandbox.run(textwrap.dedent(code), stdin)


def host_processes_with(marker: str) -> list[int]:
    """Pids of live host processes whose command line holds `marker` (a /proc scan)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def assert_no_survivors(marker: str, within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while host_processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host_processes_with(marker) == []


# --- programs that should just work ---------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "stdin", "stdout", "returncode"),
    [
        ("print('hello')", "", "hello\n", 0),
        ("import sys; print(sys.stdin.read().upper(), end='')", "abc\ndef\n", "ABC\nDEF\n", 0),
        ("import sys; print(sum(map(int, sys.stdin.read().split())))", "1 2 3", "6\n", 0),
        ("import sys; print('partial'); sys.exit(3)", "", "partial\n", 3),
        ("open('/tmp/f', 'w').write('x' * 10); print(len(open('/tmp/f').read()))", "", "10\n", 0),
    ],
)
def test_normal_programs(sandbox, code, stdin, stdout, returncode):
    result = run(sandbox, code, stdin)
    assert (result.stdout, result.returncode) == (stdout, returncode), result.stderr
    assert not result.timed_out and not result.truncated
    assert result.ok == (returncode == 0)


def test_stderr_kept_and_status():
    result = Sandbox(LIMITS).run("raise ValueError('boom')")
    assert (result.returncode, result.status) == (1, "exit status 1")
    assert (
        'File "/sandbox/main.py", line 1' in result.stderr and "ValueError: boom" in result.stderr
    )


def test_identity_inside_is_unprivileged(sandbox):
    result = run(
        sandbox,
        """
        import ctypes, os
        status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read().splitlines())
        print(os.getuid(), os.getpid(), status['CapEff'].strip(), status['NoNewPrivs'].strip())
        print(ctypes.CDLL(None).unshare(0x10000000))  # CLONE_NEWUSER: no nested user namespace
        """,
    )
    assert result.stdout.split() == ["65534", "2", "0000000000000000", "1", "-1"], result.stderr


def test_run_many_keeps_order_and_bounds_concurrency(sandbox):
    codes = [f"import time; time.sleep(0.2); print({i})" for i in range(6)]
    start = time.monotonic()
    results = sandbox.run_many(codes)
    elapsed = time.monotonic() - start
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    assert elapsed >= 3 * 0.2  # 6 runs, 2 at a time: at least three rounds of 0.2 s


@pytest.mark.parametrize(
    ("field", "value"),
    [("cpu_seconds", 0), ("memory_mb", -1), ("processes", 1), ("output_bytes", 1.5)]
    + [("wall_seconds", 0), ("file_size_mb", True)],
)
def test_limits_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=f"Limits.{field}"):
        Limits(**{field: value})


def test_missing_bwrap_or_python_is_actionable(monkeypatch, tmp_path):
    with pytest.raises(SandboxUnavailable, match="does not exist"):
        Sandbox(python=str(tmp_path / "python3"))
    monkeypatch.setenv("PATH", str(tmp_path))
    _check_available.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
            Sandbox()
    finally:
        _check_available.cache_clear()


# --- escape attempts ------------------------------------------------------------------------


def test_network_is_unreachable(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    code = f"""
        import socket
        for family, kind, address in [(socket.AF_INET, socket.SOCK_STREAM, ("1.1.1.1", 53)),
                                      (socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", {port})),
                                      (socket.AF_INET, socket.SOCK_DGRAM, ("8.8.8.8", 53))]:
            s = socket.socket(family, kind)
            s.settimeout(1)
            try:
                s.connect(address)
                s.send(b"hello")
                print("reached", address)
            except OSError as err:
                print("blocked", address, err)
        """
    result = run(sandbox, code)
    try:
        with pytest.raises(TimeoutError):
            server.accept()  # the host's loopback server saw no connection
    finally:
        server.close()
    assert result.stdout.count("blocked") == 3 and "reached" not in result.stdout, result.stdout


def test_writes_outside_do_not_reach_the_host(sandbox, tmp_path):
    name = f"escape-{uuid.uuid4().hex}"
    targets = ["/work/main", "/root", "/etc", "/usr", str(tmp_path), "/"]
    code = f"""
        import os
        for folder in {targets!r}:
            try:
                os.makedirs(folder, exist_ok=True)
                open(os.path.join(folder, {name!r}), "w").write("escaped")
                print("wrote", folder)
            except OSError as err:
                print("failed", folder, type(err).__name__)
        """
    result = run(sandbox, code)
    assert result.returncode == 0, result.stderr
    for folder in targets:
        assert not os.path.exists(os.path.join(folder, name))
    # Read-only root and /usr; the private /tmp accepts the write but it never reaches the host.
    assert "failed /usr OSError" in result.stdout and "failed / OSError" in result.stdout


@pytest.mark.parametrize(
    "code",
    [
        "open('/tmp/big', 'wb').write(b'x' * (9 << 20))",  # one file above file_size_mb
        "for i in range(20): open(f'/tmp/f{i}', 'wb').write(b'x' * (1 << 20))",  # tmpfs full
        "for i in range(20): open(f'/dev/shm/f{i}', 'wb').write(b'x' * (1 << 20))",
        "open('/dev/escape', 'w')",  # /dev is read-only
    ],
)
def test_disk_filling_is_bounded(sandbox, code):
    result = run(sandbox, code)
    assert result.returncode != 0 and "Error" in result.stderr


def test_host_files_are_invisible(sandbox, tmp_path):
    secret = f"secret-{uuid.uuid4().hex}"
    (tmp_path / "secret.txt").write_text(secret)
    paths = [
        str(tmp_path / "secret.txt"),
        "/work/main/pyproject.toml",
        "/root/.bashrc",
        "/etc/hostname",
    ]
    code = f"""
        import os
        for path in {paths!r}:
            try:
                print("read", path, open(path).read())
            except OSError as err:
                print("denied", path, type(err).__name__)
        print(*os.listdir("/"))
        """
    result = run(sandbox, code)
    *lines, listing = result.stdout.splitlines()
    assert secret not in result.stdout and [line.split()[0] for line in lines] == ["denied"] * 4
    # The sandbox's root holds only what the allow-list binds (lib32 etc. where the host has them).
    allowed = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc"}
    assert {"usr", "tmp", "sandbox"} <= set(listing.split()) <= allowed | {"tmp", "sandbox"}


def test_host_environment_is_invisible(sandbox, monkeypatch):
    secret = f"env-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", secret)
    code = """
        import os
        print(dict(os.environ))
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                print(pid, open(f"/proc/{pid}/environ").read())
            except OSError as err:
                print(pid, err)
        """
    result = run(sandbox, code)
    assert result.returncode == 0 and "1 PATH=" in result.stdout  # pid 1's environ was read
    assert secret not in result.stdout + result.stderr
    assert "POSTTRAIN_TEST_SECRET" not in result.stdout


def test_fork_bomb_is_contained(short):
    marker = f"bomb-{uuid.uuid4().hex}"
    code = f"""
        import os, sys
        bomb = "import os\\nwhile True:\\n  try: os.fork()\\n  except OSError: pass"
        while True:
            try:
                if os.fork() == 0:
                    os.execv(sys.executable, [sys.executable, "-c", bomb, {marker!r}])
            except OSError:
                pass
        """
    result = run(short, code)
    assert result.timed_out and result.seconds < SHORT.wall_seconds + 1.5
    assert_no_survivors(marker)
    assert subprocess.run(["true"]).returncode == 0  # the host can still fork


def test_process_count_is_bounded_as_any_user(sandbox):
    code = """
        import os, time
        children = 0
        for _ in range(50):
            try:
                if os.fork() == 0:
                    time.sleep(5)
                    os._exit(0)
                children += 1
            except OSError:
                break
        print(children)
        """
    result = run(sandbox, code)
    # RLIMIT_NPROC = 8: bwrap's init, the program and six children.
    assert result.stdout == "6\n", result.stderr


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(1 << 30)", "a = []\nwhile True: a.append(bytearray(1 << 20))"],
)
def test_memory_bomb_fails_inside(sandbox, code):
    result = run(sandbox, code)
    assert result.returncode == 1 and "MemoryError" in result.stderr and not result.timed_out


@pytest.mark.parametrize(
    ("limits", "returncode", "timed_out", "status"),
    [
        (Limits(cpu_seconds=1, wall_seconds=30), 128 + signal.SIGKILL, False, "CPU-time limit"),
        (Limits(cpu_seconds=30, wall_seconds=1), -signal.SIGKILL, True, "timed out"),
    ],
)
def test_infinite_loop_is_killed(limits, returncode, timed_out, status):
    result = Sandbox(limits).run("while True: pass")
    assert (result.returncode, result.timed_out) == (returncode, timed_out)
    assert status in result.status and not result.ok and result.seconds < 30


@pytest.mark.parametrize(
    "code",
    [
        "while True: print('x' * 1000)",
        "import sys\nwhile True: sys.stderr.write('y' * 1000)",
        "import os\nwhile True: os.write(1, b'z' * 65536)",
    ],
)
def test_endless_output_is_truncated(code):
    limits = Limits(output_bytes=100_000, wall_seconds=5)
    result = Sandbox(limits).run(code)
    assert result.truncated and not result.timed_out and not result.ok
    assert len(result.stdout.encode()) + len(result.stderr.encode()) == limits.output_bytes
    assert result.seconds < 2


@pytest.mark.parametrize(
    "code",
    [
        "import time; time.sleep(100)",
        "import os, time; os.close(1); os.close(2); time.sleep(100)",  # no pipe to wait on
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(100)",
    ],
)
def test_sleeping_past_the_timeout(short, code):
    result = run(short, code)
    assert result.timed_out and SHORT.wall_seconds <= result.seconds < SHORT.wall_seconds + 1.5


@pytest.mark.parametrize(
    "spawn",
    [
        # double fork + setsid, stdio closed: a classic daemon
        "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        os.closerange(0, 3)\n"
        "        os.execv(sys.executable, child)\n    os._exit(0)",
        # a new session through subprocess, like `setsid nohup cmd &`
        "subprocess.Popen(child, start_new_session=True, stdout=subprocess.DEVNULL,"
        " stderr=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))",
        # a child that keeps the output pipe open
        "subprocess.Popen(child)",
    ],
)
def test_detached_children_do_not_survive(sandbox, spawn):
    marker = f"detached-{uuid.uuid4().hex}"
    child = ["/usr/bin/python3", "-c", "import time; time.sleep(5); print('survived')", marker]
    code = (
        f"import os, signal, subprocess, sys, time\nchild = {child!r}\n{spawn}\ntime.sleep(0.3)\n"
    )
    result = sandbox.run(code)
    assert result.returncode == 0 and not result.timed_out, result.stderr
    # Neither waited for (the child would take 5 s) nor left behind.
    assert "survived" not in result.stdout and result.seconds < 3
    assert_no_survivors(marker, within=1.0)


def test_signals_do_not_reach_the_host(sandbox):
    sentinel = subprocess.Popen(["sleep", "30"])
    try:
        code = f"""
            import os, signal
            print("pid", os.getpid(), "parent", os.getppid())
            for target in (os.getppid(), 1, {os.getpid()}, {sentinel.pid}, {os.getppid()}, -1):
                try:
                    os.kill(target, signal.SIGKILL)
                    print("sent", target)
                except OSError as err:
                    print("refused", target, type(err).__name__)
            print("still here")
            """
        result = run(sandbox, code)
        assert sentinel.poll() is None  # the host process the code aimed at lives on
    finally:
        sentinel.kill()
        sentinel.wait()
    assert result.stdout.startswith("pid 2 parent 1\n"), result.stdout  # its own PID namespace
    assert result.stdout.endswith("still here\n") and result.returncode == 0
