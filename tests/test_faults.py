"""Faults: a conversion killed at any moment, a full disk, two processes writing or verifying the same files at
once, a server that dies mid-download. Each leaves either nothing or something complete, and the next run works.

The kills are real SIGKILLs of a real `zoo convert` process; the child only sleeps at named moments (printed on
stdout) so the kill lands where the test means it to. Nothing else in zoo is changed for the test.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from zoo.weights.reader import sha256_file

import zoo
from tests.helpers import tiny_qwen2

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# `zoo convert ARGS`, saying on stdout when it reaches each moment a kill is aimed at, and sleeping there for the
# seconds PAUSES gives that moment; with GO (a path) it waits for that file to exist before converting
SLOW_CONVERT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import zoo.conversion.engine as engine
    import zoo.weights.writer as writer
    from zoo.cli import main
    from zoo.conversion import formats

    pauses, go = json.loads(sys.argv[1]), sys.argv[2]
    def say(what):
        print(what, flush=True)
        time.sleep(pauses.get(what, 0))

    real_write, real_fsync, real_remove = writer._Output.write, engine._fsync_tree, engine._remove
    said = set()
    def write(self, data):
        if "writing" not in said:
            said.add("writing")
            say("writing")
        real_write(self, data)
    def fsync(root):  # every file written, the directory not yet in place
        say("complete")
        real_fsync(root)
    def remove(path):  # OUT is the new directory; the old one is about to be deleted
        say("swapped")
        real_remove(path)
    writer._Output.write, engine._fsync_tree, engine._remove = write, fsync, remove
    formats()
    say("started")
    while go != "-" and not Path(go).exists():
        time.sleep(0.01)
    sys.exit(main(["convert", *sys.argv[3:]]))
""")


def slow_convert(*args: str, pauses: dict[str, float], go: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, json.dumps(pauses), str(go or "-"),
                             *map(str, args)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(proc: subprocess.Popen, marker: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == marker:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"child ended before {marker!r}: {proc.stderr.read()[-2000:]}")
    raise AssertionError(f"no {marker!r} within {timeout}s")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    proc.stderr.close()


def leftovers(out: Path) -> list[str]:
    """What is beside OUT: temporary directories, and the lock file (a killed holder cannot remove it; the kernel
    has released the lock itself)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def temporaries(out: Path) -> list[str]:
    return [n for n in leftovers(out) if not n.endswith(".lock")]


def digest(out: Path) -> str:
    return sha256_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two published tiny Qwen2 checkpoints with different weights, and what each converts to."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for seed in (0, 1):
        tiny_qwen2(root / f"hf{seed}", seed=seed, tie=False)
        ref = zoo.convert(root / f"hf{seed}", root / f"ref{seed}", progress=False)
        out[seed] = (root / f"hf{seed}", digest(ref))
    return out


# -------------------------------------------------------------------------------------------- SIGKILL


@pytest.mark.parametrize("moment,after", [
    ("started", "previous"),  # before anything is written
    ("writing", "previous"),  # in the middle of the shard
    ("complete", "previous"),  # every file written, not yet in place
    ("swapped", "new"),  # in place; the old directory not yet removed
])
def test_conversion_killed_at_any_moment_leaves_the_previous_or_the_new_checkpoint_and_reruns(
        sources, tmp_path, moment, after):
    (old_src, old_digest), (new_src, new_digest) = sources[0], sources[1]
    out = tmp_path / "native"
    zoo.convert(old_src, out, progress=False)
    proc = slow_convert(new_src, out, "--overwrite", pauses={moment: 60.0})
    wait_for(proc, moment)
    kill(proc)
    assert digest(out) == {"previous": old_digest, "new": new_digest}[after]
    zoo.load(out)  # complete: every file there and matching its sha256
    assert all(f"-{proc.pid}-" in n for n in temporaries(out))  # only the dead process's temporary directory
    zoo.convert(new_src, out, overwrite=True, progress=False)  # the rerun works, and clears the dead one's temp
    assert digest(out) == new_digest and leftovers(out) == []


def test_first_conversion_killed_mid_write_leaves_no_output_and_reruns(sources, tmp_path):
    src, expected = sources[0]
    out = tmp_path / "native"
    proc = slow_convert(src, out, pauses={"writing": 60.0})
    wait_for(proc, "writing")
    kill(proc)
    assert not out.exists() and len(temporaries(out)) == 1  # the dead process's temporary directory
    assert subprocess.run([sys.executable, "-m", "zoo", "convert", str(src), str(out)], cwd=ROOT, env=ENV,
                          capture_output=True).returncode == 0
    assert digest(out) == expected and leftovers(out) == []


# ---------------------------------------------------------------------------------------------- disk full


def test_full_disk_names_the_file_and_leaves_the_previous_checkpoint(sources, tmp_path, monkeypatch, capsys):
    import zoo.weights.writer as writer

    from zoo.cli import main

    (old_src, old_digest), (new_src, _) = sources[0], sources[1]
    out = tmp_path / "native"
    zoo.convert(old_src, out, progress=False)

    class FullDisk:
        """A file on a disk with 1000 bytes free."""

        def __init__(self, f):
            self.f, self.left = f, 1000

        def write(self, data):
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.left -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(writer, "open", lambda *a, **k: FullDisk(open(*a, **k)), raising=False)
    with pytest.raises(OSError) as e:
        zoo.convert(new_src, out, overwrite=True, progress=False)
    assert e.value.errno == errno.ENOSPC
    assert f"{out}: failed writing model.safetensors (No space left on device" in str(e.value)
    assert digest(out) == old_digest and leftovers(out) == []

    assert main(["convert", str(new_src), str(tmp_path / "fresh")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (and the progress bar)
    assert len(errors) == 1 and errors[0].startswith("zoo convert: error:")
    assert "No space left on device" in errors[0] and "model.safetensors" in errors[0]
    err = errors[0]
    assert "Traceback" not in err and not (tmp_path / "fresh").exists() and leftovers(tmp_path / "fresh") == []


def test_file_size_limit_of_the_kernel_is_a_one_line_error_and_nothing_is_left(sources, tmp_path):
    """Not simulated: the kernel refuses writes past RLIMIT_FSIZE (EFBIG), as a disk quota would."""
    import resource

    src, _ = sources[0]
    out = tmp_path / "native"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # the shard is ~400 kB

    r = subprocess.run([sys.executable, "-m", "zoo", "convert", str(src), str(out)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("zoo convert: error:") and "model.safetensors" in line and "File too large" in line
    assert "Traceback" not in r.stderr and not out.exists() and leftovers(out) == []


# ---------------------------------------------------------------------------------------- two at a time


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_processes_converting_into_one_directory_take_turns(sources, tmp_path, overwrite):
    (src_a, digest_a), (src_b, digest_b) = sources[0], sources[1]
    out = tmp_path / "native"
    flag = ["--overwrite"] if overwrite else []
    go = tmp_path / "go"
    first = slow_convert(src_a, out, *flag, pauses={"writing": 1.5})
    second = slow_convert(src_b, out, *flag, pauses={}, go=go)
    wait_for(second, "started")
    wait_for(first, "writing")  # the first holds OUT's lock for 1.5 s from here
    go.touch()
    _, err_first = first.communicate(timeout=120)
    _, err_second = second.communicate(timeout=120)
    assert first.returncode == 0, err_first
    assert "another process is writing it; waiting" in err_second
    if overwrite:  # the second replaced the first's complete result in turn
        assert second.returncode == 0 and digest(out) == digest_b
    else:  # the second found OUT written meanwhile and refused it
        assert second.returncode == 2 and "already exists" in err_second.strip().splitlines()[-1]
        assert digest(out) == digest_a
    zoo.load(out)
    assert leftovers(out) == []


VERIFY = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    go = Path(sys.argv[1])
    import zoo
    while not go.exists():
        time.sleep(0.01)
    for d in sys.argv[2:]:
        zoo.load(d)
""")


def test_processes_verifying_at_once_keep_every_record_and_the_file_valid(sources, tmp_path):
    src, _ = sources[0]
    shared = zoo.convert(src, tmp_path / "shared", progress=False, max_shard_bytes=20_000)
    own = [zoo.convert(src, tmp_path / f"own{i}", progress=False, max_shard_bytes=20_000) for i in range(3)]
    shards = sorted(shared.glob("*.safetensors")) + sorted(f for d in own for f in d.glob("*.safetensors"))
    assert len(shards) > 60
    home = tmp_path / "zoo_home"
    env = {**ENV, "ZOO_HOME": str(home)}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", VERIFY, str(go), str(d), str(shared)], cwd=ROOT, env=env,
                              stderr=subprocess.PIPE, text=True) for d in own]
    time.sleep(1.0)
    go.touch()  # all at once
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    records = json.loads((home / "verified.json").read_text())  # valid JSON ...
    assert {str(f.resolve()) for f in shards} <= set(records)  # ... and nobody's records lost
    assert [p.name for p in home.iterdir()] == ["verified.json"]  # no lock or temporary file left


# ------------------------------------------------------------------------------------ a server that dies


class DyingProxy:
    """A TCP relay on 127.0.0.1 to the Hub test server that, once armed, cuts the response to a GET of
    `victim` after `cut_after` bytes, then refuses every connection (the server is dead) until revive().
    Loopback only; it stops itself after `lifetime` seconds."""

    def __init__(self, upstream_port: int, victim: str, cut_after: int = 5000, lifetime: float = 120.0):
        self.upstream, self.victim, self.cut_after = upstream_port, victim.encode(), cut_after
        self.armed, self.dead, self.cuts = True, False, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()
        timer = threading.Timer(lifetime, self.stop)
        timer.daemon = True
        timer.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.dead:
                client.close()  # the server is down
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream))
        self._conns += [client, upstream]
        doomed = threading.Event()  # set when the current request is the one to cut

        def requests():
            while (data := _recv(client)):
                if self.armed and b"GET " in data and self.victim in data:
                    doomed.set()
                upstream.sendall(data)
            _close(upstream)

        threading.Thread(target=requests, daemon=True).start()
        sent = 0
        while (data := _recv(upstream)):
            if doomed.is_set():
                if sent + len(data) >= self.cut_after:
                    client.sendall(data[: self.cut_after - sent])
                    self.armed, self.dead, self.cuts = False, True, self.cuts + 1
                    for c in self._conns:
                        _close(c)
                    return
                sent += len(data)
            try:
                client.sendall(data)
            except OSError:
                break
        _close(client)

    def revive(self) -> None:
        self.dead = False

    def stop(self) -> None:
        self._stop.set()
        _close(self.listener)
        for c in self._conns:
            _close(c)


def _recv(s: socket.socket) -> bytes:
    try:
        return s.recv(65536)
    except OSError:
        return b""


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


@pytest.mark.parametrize("local", [False, True])
def test_pull_cut_off_mid_download_leaves_nothing_trusted_and_the_next_pull_completes(
        hub_env, sources, tmp_path, monkeypatch, local):
    from huggingface_hub import try_to_load_from_cache
    from zoo.weights.format import INDEX_FILE, CheckpointError

    from zoo.hub import pull, push

    src, expected = sources[0]
    native = zoo.convert(src, tmp_path / "native", progress=False)
    files = {p.path_in_repo: p.source for p in push(native, "acme/plan", dry_run=True)}
    repo = f"acme/cut-{int(local)}"
    commit = hub_env.repo(repo).commit(files)
    proxy = DyingProxy(int(hub_env.url.rsplit(":", 1)[1]), victim="model.safetensors")
    monkeypatch.setenv("HF_ENDPOINT", proxy.url)
    local_dir = tmp_path / "pulled" if local else None
    try:
        with pytest.raises((ConnectionError, FileNotFoundError, OSError)) as e:
            pull(repo, local_dir=local_dir)
        assert proxy.cuts == 1 and repo in str(e.value)
        # nothing a later load would trust: the shard is not where a load looks, and nothing verifies
        cache = Path(os.environ["HF_HUB_CACHE"])
        snapshot = local_dir or cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
        shard = snapshot / "model.safetensors"
        assert not shard.exists() or sha256_file(shard) != expected
        if not local:
            assert not isinstance(try_to_load_from_cache(repo, "model.safetensors", cache_dir=cache,
                                                         revision=commit), str)
        if (snapshot / INDEX_FILE).exists():
            with pytest.raises(CheckpointError) as bad:
                zoo.load(snapshot)
            # the refusal names what is missing: the cut shard, or a file the interrupted pull never fetched
            # (files download in parallel, so which one a load meets first varies)
            missing = [f for f in files if f in str(bad.value) and (f == "model.safetensors"
                                                                   or not (snapshot / f).exists())]
            assert missing, str(bad.value)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises((FileNotFoundError, ConnectionError, ValueError)):
            pull(repo, local_dir=local_dir)  # offline: nothing complete to serve
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")

        proxy.revive()  # the server is back: the next pull completes and verifies
        path = pull(repo, local_dir=local_dir)
    finally:
        proxy.stop()
    assert digest(path) == expected
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(zoo.load(path)(ids), zoo.load(native)(ids))
