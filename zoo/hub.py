"""The Hugging Face Hub: pull (verified against the index) and push (one commit, card included).

Everything goes through huggingface_hub's public API and its cache. The environment is read at call time
(HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN), so a process can point at a mirror after import.
Names are checked before any request; tokens are passed to huggingface_hub and never printed or written.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo.weights.format import CARD_FILE, CONFIG_FILE, INDEX_FILE, CheckpointError, read_config
from zoo.weights.reader import safe_child, sha256_file

# A full commit hash, or a git ref name the Hub accepts (branch, tag, refs/pr/N, refs/convert/...).
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/+-]{0,254}")
# The published layouts' weight files, by Source.file_format; configs and tokenizers come with "*.json" etc.
_WEIGHT_PATTERNS = {"safetensors": ["*.safetensors"], "pytorch": ["*.bin", "*.pt", "*.pth"], "bin": ["*.bin"],
                    "pt": ["*.pt", "*.pth"], "pth": ["*.pth", "*.pt"]}
_SOURCE_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken"]


# ----------------------------------------------------------------------------------------------- names


def parse_spec(spec: str, revision: str | None = None) -> tuple[str, str]:
    """ "org/name" or "org/name@REV" (+ an optional separate revision) -> (repo_id, revision), both checked."""
    repo_id, at, rev = str(spec).removeprefix("hf://").partition("@")
    if at and not rev:
        raise ValueError(f"{spec!r}: '' is not a valid revision: name a branch, tag or commit after '@' (or drop it)")
    if at and revision is not None and revision != rev:
        raise ValueError(f"{spec!r}: revision given twice ({rev!r} in the name and {revision!r})")
    rev = (rev if at else revision) or "main"
    validate_repo_id(repo_id)
    validate_revision(rev)
    return repo_id, rev


def validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hf_validate

    try:
        hf_validate(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a valid Hub repository id ('org/name'): {_plain(str(e), repo_id)}") \
            from None
    if not repo_id:
        raise ValueError("empty Hub repository id; expected 'org/name'")


def _plain(message: str, repo_id: str) -> str:
    """huggingface_hub's validation message without what does not apply here: its hint about its own `repo_type`
    argument (zoo has none: models only), and the id it repeats."""
    if repo_id.count("/") > 1:
        return "one '/' between the owner and the name, no more"
    return message.replace(f": '{repo_id}'.", "").replace(f" '{repo_id}'.", "").strip()


def validate_revision(revision: str) -> None:
    """A branch, tag or 40-hex commit hash, by git's ref-name rules (no '..', spaces, leading '-', '@{', ...)."""
    bad = (not isinstance(revision, str) or not _REF.fullmatch(revision) or ".." in revision
           or "//" in revision or revision.endswith(("/", ".", ".lock")) or "/." in revision
           or "@{" in revision)
    if bad:
        raise ValueError(f"{revision!r} is not a valid revision (a branch or tag name, or a 40-hex commit hash)")


# ----------------------------------------------------------------------------------------- environment


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def endpoint() -> str:
    """HF_ENDPOINT as it is now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    return _truthy(env) if env is not None else constants.HF_HUB_OFFLINE


def resolve_token(token: str | None = None) -> str | None:
    """The argument, else HF_TOKEN, else huggingface_hub's saved login. Never printed."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _hub_error(e: Exception, what: str) -> Exception:
    """huggingface_hub's exceptions -> errors that name the repo and revision (and no credentials)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = endpoint()
    if isinstance(e, GatedRepoError):
        return PermissionError(f"{what}: gated repository on {where}; accept its terms and pass a token")
    if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)):
        return FileNotFoundError(f"{what}: repository or revision not found on {where} "
                                 "(or it is private and no valid token was given)")
    if isinstance(e, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if offline() else f"{where} could not be reached"
        return FileNotFoundError(f"{what}: not in the local Hugging Face cache ({cache_dir()}) and {why}")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return PermissionError(f"{what}: {where} refused the request (HTTP {status}); check the token")
        return ConnectionError(f"{what}: {where} answered HTTP {status}")
    return ConnectionError(f"{what}: cannot reach {where} ({type(e).__name__})")


def _network_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub raises when the server says no or cannot be reached (its HTTP client varies)."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    errors: list[type[Exception]] = [HfHubHTTPError, EntryNotFoundError, ConnectionError, TimeoutError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except ImportError:
            pass
    return tuple(errors)


# ---------------------------------------------------------------------------------------------- pull


def native_patterns() -> list[str]:
    """Exactly the files a native directory holds: config, index, shards, card, and what converters copy."""
    from zoo.conversion.base import formats

    extra = sorted({f for fmt in formats().values() for f in fmt.copy_files})
    return [CONFIG_FILE, INDEX_FILE, "*.safetensors", CARD_FILE, *extra]


def _download(repo_id: str, revision: str, patterns: list[str], local_dir: Path | None, token: str | None) -> Path:
    from huggingface_hub import snapshot_download

    what = f"hf://{repo_id}@{revision}"
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir(),
                                 local_dir=local_dir, endpoint=endpoint(), token=resolve_token(token) or False,
                                 local_files_only=offline(), library_name="zoo")
    except _network_errors() as e:
        raise _hub_error(e, what) from None
    return Path(path)


def discard(path: Path) -> None:
    """Remove a downloaded file so huggingface_hub will not serve it again: the cache blob behind a snapshot
    link, the link itself, and (for --local-dir downloads) huggingface_hub's metadata that marks it complete."""
    if path.is_symlink():  # cache layout: snapshots/<commit>/<name> -> ../../blobs/<etag>
        path.resolve().unlink(missing_ok=True)
        path.unlink()
        return
    path.unlink(missing_ok=True)
    for parent in path.parents:  # local_dir layout: local_dir/.cache/huggingface/download/<name>.metadata
        meta = parent / ".cache" / "huggingface" / "download" / f"{path.relative_to(parent).as_posix()}.metadata"
        if meta.is_file():
            meta.unlink()
            return


def verify_snapshot(directory: Path, what: str) -> None:
    """Every file the index names is inside the directory and has the index's sha256; a bad one is discarded."""
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise CheckpointError(f"{what}: no {INDEX_FILE}; not a zoo checkpoint (convert it with `zoo convert`)")
    try:
        index = json.loads(index_path.read_text())
        hashes: dict[str, str] = index["metadata"]["sha256"]
        listed = set(index["weight_map"].values())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{what}: malformed {INDEX_FILE} ({e})") from None
    read_config(directory)  # a zoo config of a schema this zoo can read
    for fname in sorted(listed | set(hashes)):
        path = safe_child(directory, fname)  # raises if the index points outside the model directory
        if fname not in hashes:
            raise CheckpointError(f"{what}: {INDEX_FILE} lists {fname} without a sha256")
        if not path.is_file():
            raise CheckpointError(f"{what}: {fname} is listed in {INDEX_FILE} but was not downloaded")
        actual = sha256_file(path)
        if actual != hashes[fname]:
            discard(path)
            raise CheckpointError(f"{what}: {fname} does not match {INDEX_FILE} (sha256 {actual[:12]}…, index says "
                                  f"{hashes[fname][:12]}…); the download was removed")


def pull(spec: str, revision: str | None = None, local_dir: str | Path | None = None,
         token: str | None = None) -> Path:
    """Download a native checkpoint ("org/name" or "org/name@REV") and verify it; returns its directory.

    Only the native files are fetched, through huggingface_hub's cache (or into local_dir).
    """
    repo_id, rev = parse_spec(spec, revision)
    what = f"hf://{repo_id}@{rev}"
    commit = rev
    if not offline():  # look before fetching gigabytes: a zoo config and index, pinned to one commit
        head = _download(repo_id, rev, [CONFIG_FILE, INDEX_FILE], None, token)
        try:
            read_config(head)
        except CheckpointError as e:
            raise CheckpointError(f"{what} is not a zoo checkpoint ({e}); a published model is loaded by its "
                                  "registry name, or downloaded and converted with `zoo convert`") from None
        commit = head.name if _COMMIT.fullmatch(head.name) else rev
    path = _download(repo_id, commit, native_patterns(), Path(local_dir) if local_dir else None, token)
    verify_snapshot(path, what)
    return path


# --------------------------------------------------------------------------------- registry on the Hub


def fetch_and_convert(entry: Any, local_dir: Path) -> Path:
    """First use of a registry name published on the Hub: download its source files and convert them."""
    from zoo.conversion import convert
    from zoo.weights.locks import ProcessLock

    src = entry.source
    validate_repo_id(src.repo)
    validate_revision(src.revision)
    local_dir = Path(local_dir)
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    with ProcessLock(local_dir.with_name(f".{local_dir.name}.first-use.lock")):  # two processes: one converts
        if local_dir.is_dir():
            return local_dir
        from zoo.registry import disk_bytes, download_bytes, human_bytes

        _say(f"{entry.name}: first use; downloading about {human_bytes(download_bytes(entry))} "
             f"({src.repo}@{src.revision} from {endpoint()}) and converting it into {local_dir} (about "
             f"{human_bytes(disk_bytes(entry))} more). The download stays in the Hub cache beside the converted copy, "
             f"about twice the disk: `hf cache rm model/{src.repo}` frees it.")
        weights = list(src.files) or _WEIGHT_PATTERNS.get(src.file_format, [f"*.{src.file_format}"])
        patterns = _SOURCE_PATTERNS + weights
        snapshot = _download(src.repo, src.revision, patterns, None, None)
        commit = snapshot.name if _COMMIT.fullmatch(snapshot.name) else src.revision
        command = (f"hf download {src.repo} --revision {commit} --local-dir SRC && "
                   f"zoo convert SRC {local_dir} --format {src.layout} --name {entry.name}")
        convert(snapshot, local_dir, format=src.layout, name=entry.name, progress=True, command=command,
                source={"repo": src.repo, "revision": commit, "license": entry.license})
    return local_dir


# ---------------------------------------------------------------------------------------------- push


@dataclass(frozen=True)
class PlannedFile:
    path_in_repo: str
    source: Path | bytes  # a file of the directory, or generated content (a card the directory lacks)
    size: int
    sha256: str

    def __str__(self) -> str:
        return f"{self.path_in_repo}  {self.size} bytes  sha256:{self.sha256}"


def plan_upload(directory: str | Path) -> list[PlannedFile]:
    """Every file of a native directory (hidden ones skipped), checked against the index, plus a card if the
    directory has none (it is rendered, not written into the directory, which may be a read-only cache)."""
    import hashlib

    from zoo.cards import render_card

    directory = Path(directory)
    native = read_config(directory)
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise CheckpointError(f"{index_path}: not found; push a directory written by `zoo convert`")
    hashes = json.loads(index_path.read_text()).get("metadata", {}).get("sha256", {})
    plan = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        digest = sha256_file(path)
        name = rel.as_posix()
        if name in hashes and hashes[name] != digest:
            raise CheckpointError(f"{path}: sha256 does not match {INDEX_FILE}; refusing to push a damaged file")
        plan.append(PlannedFile(name, path, path.stat().st_size, digest))
    missing = sorted(set(hashes) - {p.path_in_repo for p in plan})
    if missing:
        raise CheckpointError(f"{directory}: {missing[0]} is listed in {INDEX_FILE} but missing")
    if not any(p.path_in_repo == CARD_FILE for p in plan):
        card = str(render_card(native, directory=directory)).encode()
        plan.append(PlannedFile(CARD_FILE, card, len(card), hashlib.sha256(card).hexdigest()))
    return plan


def push(directory: str | Path, repo_id: str, revision: str | None = None, private: bool = False,
         message: str | None = None, token: str | None = None, dry_run: bool = False) -> Any:
    """Upload a native directory to the Hub in one commit (creating the repo and branch if needed).

    dry_run: print the planned operations (path, size, sha256) and return them; nothing is sent.
    """
    validate_repo_id(repo_id)
    if revision is not None:
        validate_revision(revision)
        if _COMMIT.fullmatch(revision):
            raise ValueError(f"{revision!r}: push to a branch name, not a commit hash")
    directory = Path(directory)
    plan = plan_upload(directory)
    branch = revision or "main"
    total = sum(p.size for p in plan)
    if dry_run:
        print(f"would commit {len(plan)} files ({total} bytes) to {repo_id}@{branch} on {endpoint()}"
              f"{' (private)' if private else ''}:")
        for p in plan:
            print(f"  add {p}")
        return plan

    from huggingface_hub import CommitOperationAdd, HfApi

    what = f"hf://{repo_id}@{branch}"
    if offline():
        raise ConnectionError(f"{what}: HF_HUB_OFFLINE is set, so nothing can be pushed (--dry-run shows the plan)")
    api = HfApi(endpoint=endpoint(), token=resolve_token(token), library_name="zoo")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        ops = [CommitOperationAdd(p.path_in_repo, p.source if isinstance(p.source, bytes) else str(p.source))
               for p in plan]
        message = message or f"Upload {read_config(directory).name} (zoo native format)"
        info = api.create_commit(repo_id, ops, commit_message=message, revision=revision, repo_type="model")
    except _network_errors() as e:
        raise _hub_error(e, what) from None
    _say(f"pushed {len(plan)} files ({total} bytes) to {what}: {info.commit_url}")
    return info
