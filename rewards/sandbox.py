"""Run untrusted Python code in a bubblewrap sandbox with resource limits.

`Sandbox.run(code, stdin)` writes `code` to `/sandbox/main.py` inside a fresh bubblewrap
(`bwrap`) sandbox and runs it with the system interpreter; `run_many` runs several at once,
never more than `max_concurrent`. What the sandbox sees and may do:

- filesystem: an empty read-only root holding only `/usr` (plus the `/bin`, `/lib`, ...
  links or directories) and `/etc/ld.so.cache`, all read-only; a private `/tmp` and
  `/dev/shm` (tmpfs, size-bounded); a minimal `/dev`; a `/proc` of its own PID namespace.
  No host home, work, data or temp directory exists in it (an allow-list, not a block-list);
- namespaces: its own user, PID, network (loopback only), IPC, UTS and cgroup namespaces;
  no nested user namespaces; a new session (no terminal to inject keystrokes into);
- identity: an unprivileged uid without capabilities. When the host runs as root, bwrap is
  started as `nobody` (65534): a process whose host uid is 0 ignores RLIMIT_NPROC, so a fork
  bomb could not otherwise be bounded without cgroups;
- limits, set inside the sandbox before the program starts: RLIMIT_CPU (soft = hard, so the
  kernel sends SIGKILL), RLIMIT_AS (memory), RLIMIT_FSIZE, RLIMIT_NPROC (processes and threads,
  counted per user namespace, so concurrent sandboxes do not share the budget), RLIMIT_CORE 0;
- environment: only PATH, HOME, LANG; the host's variables never reach bwrap or the program;
- wall clock and output: past `wall_seconds`, or once stdout + stderr exceed
  `output_bytes`, the host kills bwrap's process group; `--die-with-parent` then kills the
  namespace's init, and the kernel kills every process left in the PID namespace, detached
  (double-forked, setsid) children included. The same happens when the program exits.

The interpreter is `/usr/bin/python3` by default, not `sys.executable`: the system Python
lives under `/usr`, which the sandbox already binds, is readable by `nobody`, and carries only
the standard library, whereas a virtual environment usually lives in a home or work directory
the sandbox must not see. Pass `python=` (and `ro_paths=` for its prefix) to use another.

Simplifications: memory is bounded per process (RLIMIT_AS), not per sandbox, so the worst
case is `processes x memory_mb`; there is no seccomp filter. Needs Linux, bubblewrap >= 0.8
and unprivileged user namespaces. Test: `pytest -q tests/test_sandbox.py` (the escape suite).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

INSTALL_HINT = (
    "install it with `apt-get install bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap`"
)
NOBODY = 65534
"""Host uid and gid that bwrap runs as when the host process is root."""
MAIN = "/sandbox/main.py"
"""Where the program's source lies inside the sandbox (read-only)."""
_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}

# Runs first inside the sandbox: sets the limits, then replaces itself with the program.
_BOOT = (
    "import os,resource as r,sys\n"
    "c,m,f,n=map(int,sys.argv[1:5])\n"
    "for k,v in ((r.RLIMIT_CPU,c),(r.RLIMIT_AS,m),(r.RLIMIT_FSIZE,f),(r.RLIMIT_NPROC,n),"
    "(r.RLIMIT_CORE,0)):r.setrlimit(k,(v,v))\n"
    "os.execv(sys.executable,[sys.executable,'-I','-u',*sys.argv[5:]])\n"
)


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create a sandbox on this machine."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run."""

    cpu_seconds: int = 5
    """CPU time per process; the kernel SIGKILLs a process that uses more."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS), MiB; past it allocations fail (MemoryError)."""
    file_size_mb: int = 16
    """Largest file a process may write, and the size of the private /tmp and /dev/shm, MiB."""
    processes: int = 16
    """Processes and threads of the sandbox's user, bwrap's init included (RLIMIT_NPROC)."""
    wall_seconds: float = 10.0
    """Wall-clock time (sandbox start-up included, ~0.1 s) after which the sandbox is killed."""
    output_bytes: int = 1_000_000
    """stdout + stderr kept; one byte more and the sandbox is killed, the output truncated."""

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "memory_mb", "file_size_mb", "processes", "output_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.wall_seconds, int | float) or not self.wall_seconds > 0:
            raise ValueError(f"Limits.wall_seconds must be > 0, got {self.wall_seconds!r}")
        if self.processes < 2:
            raise ValueError(
                f"Limits.processes must be >= 2 (bwrap's init and the program), got {self.processes}"
            )


@dataclass(frozen=True)
class RunResult:
    """What one sandboxed run produced."""

    returncode: int
    """Exit status; 128 + N when signal N ended the program (e.g. 137: SIGKILL from the CPU
    limit); negative when the host killed the sandbox (wall clock or output limit)."""
    stdout: str
    stderr: str
    timed_out: bool = False
    """The wall-clock limit was reached and the sandbox killed."""
    truncated: bool = False
    """The output limit was reached, the output cut there and the sandbox killed."""
    seconds: float = 0.0
    """Wall-clock duration of the run, sandbox start-up included."""

    @property
    def ok(self) -> bool:
        """The program exited by itself with status 0."""
        return self.returncode == 0 and not self.timed_out and not self.truncated

    @property
    def status(self) -> str:
        """A short human-readable account of how the run ended."""
        if self.timed_out:
            return f"timed out (wall clock, {self.seconds:.1f} s)"
        if self.truncated:
            return "killed: output limit reached"
        if self.returncode > 128:
            name = signal.Signals(self.returncode - 128).name if self.returncode < 193 else "?"
            hint = " (CPU-time limit)" if self.returncode == 128 + signal.SIGKILL else ""
            return f"killed by {name}{hint}"
        return f"exit status {self.returncode}"


def bwrap_argv(
    bwrap: str, python: str, limits: Limits, code_fd: int, ro_paths: Sequence[str] = ()
) -> list[str]:
    """The bubblewrap command line that runs `MAIN`, read from `code_fd`, under `limits`."""
    tmpfs_bytes = str(limits.file_size_mb << 20)
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--hostname", "sandbox"]
    argv += ["--die-with-parent", "--new-session", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    argv += ["--ro-bind", "/usr", "/usr"]
    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):  # merged /usr: recreate the link, e.g. /bin -> usr/bin
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    for path in ro_paths:
        argv += ["--ro-bind", path, path]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", tmpfs_bytes, "--tmpfs", "/dev/shm"]
    argv += ["--remount-ro", "/dev", "--size", tmpfs_bytes, "--tmpfs", "/tmp"]
    argv += ["--perms", "0444", "--ro-bind-data", str(code_fd), MAIN, "--remount-ro", "/"]
    argv += ["--chdir", "/tmp", "--clearenv"]
    for key, value in _ENV.items():
        argv += ["--setenv", key, value]
    limit_args = [
        limits.cpu_seconds,
        limits.memory_mb << 20,
        limits.file_size_mb << 20,
        limits.processes,
    ]
    return [*argv, python, "-I", "-S", "-c", _BOOT, *map(str, limit_args), MAIN]


class Sandbox:
    """Runs Python programs in bubblewrap sandboxes, at most `max_concurrent` at a time."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        max_concurrent: int = 4,
        python: str = "/usr/bin/python3",
        ro_paths: Sequence[str] = (),
    ) -> None:
        if not isinstance(max_concurrent, int) or max_concurrent < 1:
            raise ValueError(f"max_concurrent must be a positive integer, got {max_concurrent!r}")
        self.limits = limits or Limits()
        self.max_concurrent = max_concurrent
        self.python = python
        self.ro_paths = tuple(ro_paths)
        self.bwrap = _check_available(python, self.ro_paths, self.limits)
        self._slots = threading.BoundedSemaphore(max_concurrent)

    def run(self, code: str, stdin: str = "") -> RunResult:
        """Run `code` as a Python program with `stdin` as its standard input."""
        with self._slots:
            return _run(self.bwrap, self.python, self.ro_paths, self.limits, code, stdin)

    def run_many(
        self, codes: Sequence[str], stdins: Sequence[str] | None = None
    ) -> list[RunResult]:
        """Run several programs, `max_concurrent` at a time; results in the order of `codes`."""
        stdins = [""] * len(codes) if stdins is None else list(stdins)
        if len(stdins) != len(codes):
            raise ValueError(f"run_many: {len(codes)} programs but {len(stdins)} stdin texts")
        if not codes:
            return []
        with ThreadPoolExecutor(min(self.max_concurrent, len(codes))) as pool:
            return list(pool.map(self.run, codes, stdins))


@functools.cache
def _check_available(python: str, ro_paths: tuple[str, ...], limits: Limits) -> str:
    """The path of bwrap, after checking once that it runs `python` under `limits`."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"bubblewrap (`bwrap`) is not on PATH; {INSTALL_HINT}")
    if not os.path.isfile(python):
        raise SandboxUnavailable(
            f"the sandbox interpreter {python!r} does not exist; install the system python3 "
            "(`apt-get install python3`) or pass python= and ro_paths= for another one"
        )
    roomy = replace(limits, wall_seconds=max(limits.wall_seconds, 30.0))  # start-up may be slow
    result = _run(bwrap, python, ro_paths, roomy, "print('ok')", "")
    if result.stdout != "ok\n":
        raise SandboxUnavailable(
            f"bubblewrap could not start a sandbox ({result.status}): {result.stderr.strip()!r}. "
            "It needs unprivileged user namespaces: check `sysctl user.max_user_namespaces` "
            "(> 0), `kernel.unprivileged_userns_clone` (1) where it exists, and AppArmor's "
            "bwrap profile on Ubuntu >= 23.10; inside a container, allow user namespaces"
        )
    return bwrap


def _run(
    bwrap: str, python: str, ro_paths: Sequence[str], limits: Limits, code: str, stdin: str
) -> RunResult:
    start = time.monotonic()
    code_fd = _sealed_memfd("main.py", code)
    stdin_fd = _sealed_memfd("stdin", stdin) if stdin else subprocess.DEVNULL
    drop = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}
    try:
        proc = subprocess.Popen(
            bwrap_argv(bwrap, python, limits, code_fd, ro_paths),
            stdin=stdin_fd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(code_fd,),
            env=dict(_ENV),  # bwrap's init is visible in /proc/1/environ inside the sandbox
            cwd="/",
            start_new_session=True,
            **drop,
        )
    finally:
        os.close(code_fd)
        if stdin:
            os.close(stdin_fd)
    try:
        out, err, timed_out, truncated = _collect(proc, limits, start + limits.wall_seconds)
    finally:
        if proc.returncode is None:  # still running: kill bwrap; the namespace dies with it
            _kill(proc)
        proc.stdout.close()
        proc.stderr.close()
    return RunResult(
        returncode=proc.returncode,
        stdout=out.decode("utf-8", errors="replace"),
        stderr=err.decode("utf-8", errors="replace"),
        timed_out=timed_out,
        truncated=truncated,
        seconds=time.monotonic() - start,
    )


def _collect(
    proc: subprocess.Popen, limits: Limits, deadline: float
) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout and stderr until both close, the deadline passes or the output overflows."""
    chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    budget = limits.output_bytes
    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return *_joined(chunks, proc), True, False
            for key, _ in selector.select(remaining):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fd)
                    continue
                chunks[key.fd].append(data[:budget])
                if len(data) > budget:
                    return *_joined(chunks, proc), False, True
                budget -= len(data)
    try:  # both pipes closed; the program may still run (it can close them itself)
        proc.wait(max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        return *_joined(chunks, proc), True, False
    return *_joined(chunks, proc), False, False


def _joined(chunks: dict[int, list[bytes]], proc: subprocess.Popen) -> tuple[bytes, bytes]:
    return b"".join(chunks[proc.stdout.fileno()]), b"".join(chunks[proc.stderr.fileno()])


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL bwrap's process group; --die-with-parent takes the PID namespace down with it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _sealed_memfd(name: str, text: str) -> int:
    """An in-memory file holding `text`, sealed so that no one can change it, at offset 0."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    data = text.encode("utf-8", errors="replace")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
