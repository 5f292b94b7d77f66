"""A real Hub-compatible server for the tests: olah (a self-hosted Hugging Face mirror) in offline mode.

olah serves git repositories found at MIRRORS/models/<org>/<name> (non-bare work trees; files are read from the
git objects of the requested commit, so plain blobs work and no git-lfs is needed) under the Hub's URL layout:
/api/models/<org>/<name>/revision/<rev>, /<org>/<name>/resolve/<rev>/<file>, .../refs, .../tree/<rev>/...
Branches, tags and full commit hashes all resolve through git. In offline mode it never contacts huggingface.co,
and an unknown repository or revision is answered 401 with X-Error-Code: RepoNotFound, as the Hub does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

_GIT_ENV = {"GIT_AUTHOR_NAME": "zoo-tests", "GIT_AUTHOR_EMAIL": "tests@zoo.invalid",
            "GIT_COMMITTER_NAME": "zoo-tests", "GIT_COMMITTER_EMAIL": "tests@zoo.invalid",
            "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GitRepo:
    """A git work tree under olah's mirrors path; each commit replaces the tree with the given files."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True)
        self.git("init", "-q", "-b", "main")

    def git(self, *args: str) -> str:
        out = subprocess.run(["git", "-c", "commit.gpgsign=false", *args], cwd=self.path, check=True,
                             capture_output=True, text=True, env={**os.environ, **_GIT_ENV})
        return out.stdout.strip()

    def commit(self, files: dict[str, bytes | Path], message: str = "upload", branch: str = "main") -> str:
        """Commit exactly these files (path in repo -> bytes or a file to copy) on `branch`; returns the hash."""
        if branch != self.git("symbolic-ref", "--short", "HEAD"):
            self.git("checkout", "-q", "-B", branch)
        for old in self.git("ls-files").splitlines():
            (self.path / old).unlink()
        for name, data in files.items():
            dst = self.path / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data if isinstance(data, bytes) else Path(data).read_bytes())
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")

    def branch(self, name: str, at: str) -> None:
        self.git("branch", "-f", name, at)

    def tag(self, name: str, at: str) -> None:
        self.git("tag", "-f", name, at)


class OlahServer:
    """`python -m olah.server` on 127.0.0.1:<free port>, offline, serving git repos from `root/mirrors`."""

    def __init__(self, root: Path):
        self.root = root
        self.mirrors = root / "mirrors"
        self.mirrors.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "olah.out"
        self.proc: subprocess.Popen | None = None

    def repo(self, repo_id: str) -> GitRepo:
        return GitRepo(self.mirrors / "models" / repo_id)

    def start(self, timeout: float = 60.0) -> None:
        config = self.root / "olah.toml"
        config.write_text(f"""[basic]
host = "127.0.0.1"
port = {self.port}
repos-path = "{self.root / 'cache'}"
mirrors-path = ["{self.mirrors}"]

[accessibility]
offline = true
""")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "olah.server", "--config", str(config), "--log-path", str(self.root / "logs")],
                cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"olah exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:  # any HTTP answer (a 401 for this unknown repo) means it is serving
                urllib.request.urlopen(f"{self.url}/api/models/zoo-probe/none/revision/main", timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"olah did not answer on {self.url} within {timeout:.0f}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
