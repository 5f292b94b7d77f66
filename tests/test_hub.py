"""Hub pull and push over real HTTP: olah (a self-hosted Hub mirror) serves git repos of converted checkpoints.

Nothing in huggingface_hub is mocked: zoo.hub talks to the server at HF_ENDPOINT exactly as it would to the Hub.
"""

import json
import os
import shutil
import socket
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from zoo.weights.format import INDEX_FILE, CheckpointError
from zoo.weights.reader import sha256_file

import zoo
from tests.helpers import hf_greedy, max_abs_diff, tiny_qwen2
from zoo.cli import main as cli
from zoo.hub import native_patterns, pull, push

IDS = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(3))  # no pad/bos/eos ids


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two converted tiny Qwen2 checkpoints (different weights), as if converted on another machine."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for seed in (0, 1):
        tiny_qwen2(root / f"hf{seed}", seed=seed)
        out[seed] = zoo.convert(root / f"hf{seed}", root / f"native{seed}", progress=False, name=f"tiny-{seed}")
    return out


def planned_files(directory: Path) -> dict[str, Path | bytes]:
    """What `zoo push` would upload, read from its dry-run plan: the test server gets exactly those files."""
    return {p.path_in_repo: p.source for p in push(directory, "acme/plan", dry_run=True)}


@pytest.fixture(scope="module")
def history(olah, checkpoints):
    """acme/tiny-qwen2: commit 1 = seed 0 (tag v1, branch dev), commit 2 = seed 1 on main; plus a file that is
    not part of the native format, which a pull must not download."""
    repo = olah.repo("acme/tiny-qwen2")
    extra = {"original/pytorch_model.bin": b"not a native file"}
    first = repo.commit({**planned_files(checkpoints[0]), **extra}, "seed 0")
    repo.tag("v1", first)
    repo.branch("dev", first)
    second = repo.commit({**planned_files(checkpoints[1]), **extra}, "seed 1")
    return {"first": first, "second": second}


def test_pull_by_branch_downloads_only_native_files_and_loads_identical_outputs(hub_env, history, checkpoints):
    main = zoo.load("hf://acme/tiny-qwen2")
    assert main.directory.name == history["second"]
    assert torch.equal(outputs(main), outputs(zoo.load(checkpoints[1])))

    dev = zoo.load("hf://acme/tiny-qwen2@dev")
    assert dev.directory.name == history["first"]
    assert torch.equal(outputs(dev), outputs(zoo.load(checkpoints[0])))
    assert not torch.equal(outputs(dev), outputs(main))
    assert sorted(p.name for p in dev.directory.iterdir()) == sorted(p.name for p in checkpoints[0].iterdir())
    assert not (dev.directory / "original").exists()  # allow patterns: only what the native format needs


def test_pull_by_commit_hash_and_tag_gets_that_commit(hub_env, history, checkpoints):
    by_hash = pull(f"acme/tiny-qwen2@{history['first']}")
    assert by_hash.name == history["first"]
    expected = outputs(zoo.load(checkpoints[0]))
    assert torch.equal(outputs(zoo.load(by_hash)), expected)
    assert torch.equal(outputs(zoo.load("hf://acme/tiny-qwen2", revision="v1")), expected)


def test_cli_pull_into_local_dir(hub_env, history, checkpoints, tmp_path, capsys):
    target = tmp_path / "pulled"
    assert cli(["pull", "acme/tiny-qwen2@v1", "--local-dir", str(target)]) == 0
    assert Path(capsys.readouterr().out.strip()) == target
    native = {p.name for p in checkpoints[0].iterdir()}
    assert {p.name for p in target.iterdir() if not p.name.startswith(".")} == native
    assert torch.equal(outputs(zoo.load(target)), outputs(zoo.load(checkpoints[0])))


def test_pull_of_missing_repo_or_revision_is_a_clear_error(hub_env, history, capsys):
    with pytest.raises(FileNotFoundError, match=r"hf://acme/does-not-exist@main: repository or revision not found"):
        pull("acme/does-not-exist")
    with pytest.raises(FileNotFoundError, match=r"acme/tiny-qwen2@no-such-branch: repository or revision not found"):
        pull("acme/tiny-qwen2@no-such-branch")
    assert cli(["pull", "acme/does-not-exist"]) == 2
    assert "repository or revision not found" in capsys.readouterr().err


def test_unreachable_server_is_a_clear_error(hub_env, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(FileNotFoundError, match=r"hf://acme/tiny-qwen2@main: not in the local .* could not be reached"):
        pull("acme/tiny-qwen2")
    assert cli(["pull", "acme/tiny-qwen2"]) == 2 and "could not be reached" in capsys.readouterr().err


def test_revision_given_twice_must_agree():
    with pytest.raises(ValueError, match="revision given twice"):
        pull("acme/x@v1", revision="v2")


def test_file_whose_bytes_differ_from_index_is_refused_and_removed_from_cache(hub_env, checkpoints):
    from huggingface_hub import try_to_load_from_cache

    files = planned_files(checkpoints[0])
    shard = bytearray(Path(files["model.safetensors"]).read_bytes())
    shard[-1] ^= 0xFF  # same size, same header, one weight byte changed
    commit = hub_env.repo("acme/tampered").commit({**files, "model.safetensors": bytes(shard)})
    cache = Path(os.environ["HF_HUB_CACHE"])
    for _ in range(2):  # the second pull downloads again (nothing was kept as valid) and refuses again
        with pytest.raises(CheckpointError, match=r"hf://acme/tampered@main: model.safetensors does not match"):
            zoo.load("hf://acme/tampered")
        snapshot = cache / "models--acme--tampered" / "snapshots" / commit
        assert (snapshot / INDEX_FILE).is_file()  # the rest of the download is there ...
        assert not (snapshot / "model.safetensors").exists()  # ... the bad file is not
        cached = try_to_load_from_cache("acme/tampered", "model.safetensors", cache_dir=cache, revision=commit)
        assert not isinstance(cached, str)
        blobs = list((cache / "models--acme--tampered" / "blobs").iterdir())
        assert not any(b.read_bytes() == bytes(shard) for b in blobs)


def test_bad_file_pulled_into_local_dir_is_removed_with_its_download_record(hub_env, checkpoints, tmp_path):
    files = planned_files(checkpoints[0])
    shard = bytearray(Path(files["model.safetensors"]).read_bytes())
    shard[-1] ^= 0xFF
    hub_env.repo("acme/tampered-local").commit({**files, "model.safetensors": bytes(shard)})
    target = tmp_path / "pulled"
    with pytest.raises(CheckpointError, match="model.safetensors does not match"):
        pull("acme/tampered-local", local_dir=target)
    assert (target / "config.json").is_file() and not (target / "model.safetensors").exists()
    assert not list(target.rglob("model.safetensors.metadata"))  # huggingface_hub will not call it complete


def test_a_repo_in_a_published_layout_is_refused_before_its_weights_download(hub_env, tmp_path):
    tiny_qwen2(tmp_path / "hf")
    commit = hub_env.repo("acme/not-native").commit({p.name: p for p in (tmp_path / "hf").iterdir()})
    with pytest.raises(CheckpointError, match=r"hf://acme/not-native@main is not a zoo checkpoint"):
        pull("acme/not-native")
    snapshot = Path(os.environ["HF_HUB_CACHE"]) / "models--acme--not-native" / "snapshots" / commit
    assert [p.name for p in snapshot.iterdir()] == ["config.json"]


def test_index_paths_cannot_escape_the_model_directory(hub_env, checkpoints):
    files = planned_files(checkpoints[0])
    index = json.loads(Path(files[INDEX_FILE]).read_text())
    index["weight_map"] = {k: "../../../../outside.safetensors" for k in index["weight_map"]}
    index["metadata"]["sha256"] = {"../../../../outside.safetensors": "0" * 64}
    hub_env.repo("acme/escape").commit({**files, INDEX_FILE: json.dumps(index).encode()})
    with pytest.raises(CheckpointError, match="escapes the model directory"):
        pull("acme/escape")


def test_offline_mode_serves_the_verified_cache_and_nothing_else(hub_env, history, checkpoints, monkeypatch):
    online = pull("acme/tiny-qwen2@dev")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert pull("acme/tiny-qwen2@dev") == online
    assert torch.equal(outputs(zoo.load("hf://acme/tiny-qwen2@dev")), outputs(zoo.load(checkpoints[0])))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache .* HF_HUB_OFFLINE is set"):
        pull("acme/tiny-qwen2@v1")  # never pulled by that name


def test_registry_name_published_on_the_hub_converts_on_first_use(hub_env, tmp_path, capsys, monkeypatch):
    from zoo.conversion.base import formats

    from zoo.loading import zoo_home
    from zoo.registry import _ENTRIES, Source, get_entry

    ref = tiny_qwen2(tmp_path / "published", seed=4)
    (tmp_path / "published" / "pytorch_model.bin").write_bytes(b"a pickle the converter must not fetch")
    commit = hub_env.repo("testorg/Tiny-Qwen2-Published").commit(
        {p.name: p for p in (tmp_path / "published").iterdir()})
    fields, _ = formats()["hf-qwen2"].native_config(tmp_path / "published")
    base = get_entry("qwen2-0.5b")  # a real entry, pointed at the test server's repo
    entry = replace(base, name="qwen2-hubtest-tiny", config=fields, params=sum(p.numel() for p in ref.parameters()),
                    source=Source(repo="testorg/Tiny-Qwen2-Published", layout="hf-qwen2", revision="main"))
    monkeypatch.setitem(_ENTRIES, entry.name, entry)  # registered for this test only

    model = zoo.load("qwen2-hubtest-tiny", dtype=torch.float32)
    err = capsys.readouterr().err
    assert "qwen2-hubtest-tiny: first use; downloading about" in err and "testorg/Tiny-Qwen2-Published@main" in err
    assert err.index("downloading about") < err.index("Fetching")  # the size, before the download starts
    assert "Writing model shards" in err  # the conversion's progress bar
    with torch.no_grad():
        assert max_abs_diff(model(IDS), ref(IDS).logits) < 1e-4
    assert model.generate(IDS[:1, :8], max_new_tokens=16)[0] == hf_greedy(ref, IDS[:1, :8], 16)

    local = zoo_home() / "models" / "qwen2-hubtest-tiny"
    assert model.directory == local
    snapshot = Path(os.environ["HF_HUB_CACHE"]) / "models--testorg--Tiny-Qwen2-Published" / "snapshots" / commit
    assert not (snapshot / "pytorch_model.bin").exists()
    card = (local / "README.md").read_text()
    assert "base_model: testorg/Tiny-Qwen2-Published" in card and f"at revision `{commit}`" in card
    assert f"hf download testorg/Tiny-Qwen2-Published --revision {commit}" in card

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # second use: no network at all
    assert torch.equal(zoo.load("qwen2-hubtest-tiny", dtype=torch.float32)(IDS), model(IDS))
    assert cli(["info", "qwen2-hubtest-tiny"]) == 0
    assert "## Parity with the reference implementation" in capsys.readouterr().out


def test_registry_entry_naming_its_files_downloads_only_those(hub_env, tmp_path, monkeypatch):
    from zoo.conversion.base import formats

    from zoo.registry import _ENTRIES, Source, get_entry

    ref = tiny_qwen2(tmp_path / "published", seed=5)
    tiny_qwen2(tmp_path / "other", seed=6)  # a second model in the same repo, as OpenGVLab/VideoMAE2 has
    files = {p.name: p for p in (tmp_path / "published").iterdir()}
    files["other/model.safetensors"] = tmp_path / "other" / "model.safetensors"
    commit = hub_env.repo("testorg/Two-Models").commit(files)
    fields, _ = formats()["hf-qwen2"].native_config(tmp_path / "published")
    entry = replace(get_entry("qwen2-0.5b"), name="qwen2-hubtest-files", config=fields,
                    source=Source(repo="testorg/Two-Models", layout="hf-qwen2", files=("model.safetensors",)))
    monkeypatch.setitem(_ENTRIES, entry.name, entry)

    model = zoo.load("qwen2-hubtest-files", dtype=torch.float32)
    snapshot = Path(os.environ["HF_HUB_CACHE"]) / "models--testorg--Two-Models" / "snapshots" / commit
    assert (snapshot / "model.safetensors").is_file() and not (snapshot / "other").exists()
    with torch.no_grad():
        assert max_abs_diff(model(IDS), ref(IDS).logits) < 1e-4


# ------------------------------------------------------------------------------------------------ push


def _closed_port() -> int:
    from zoo.testing.olah_server import free_port

    return free_port()  # bound and released: nothing listens there, so any request would fail


def test_push_dry_run_prints_path_size_sha256_and_sends_nothing(checkpoints, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_TOKEN", "hf_envSECRETtoken0000")
    argv = ["push", str(checkpoints[0]), "me/tiny-qwen2", "--revision", "exp", "--private", "--dry-run",
            "--token", "hf_argSECRETtoken1111"]
    assert cli(argv) == 0
    out, err = capsys.readouterr()
    lines = [line.split() for line in out.splitlines() if line.startswith("  add ")]
    files = sorted(p for p in checkpoints[0].iterdir())
    assert [line[1] for line in lines] == [p.name for p in files]
    assert [int(line[2]) for line in lines] == [p.stat().st_size for p in files]
    assert [line[4] for line in lines] == [f"sha256:{sha256_file(p)}" for p in files]
    assert "me/tiny-qwen2@exp" in out and "(private)" in out
    assert "SECRET" not in out + err

    model = zoo.load(checkpoints[0])
    plan = model.push_to_hub("me/tiny-qwen2", dry_run=True)
    index = json.loads((checkpoints[0] / INDEX_FILE).read_text())
    assert {p.path_in_repo: p.sha256 for p in plan}["model.safetensors"] == index["metadata"]["sha256"][
        "model.safetensors"]


def test_push_to_an_unreachable_server_or_offline_is_a_clear_error_without_the_token(checkpoints, monkeypatch,
                                                                                      capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    argv = ["push", str(checkpoints[0]), "me/tiny-qwen2", "--revision", "exp", "--token", "hf_pushSECRET000"]
    assert cli(argv) == 2
    out, err = capsys.readouterr()
    assert "hf://me/tiny-qwen2@exp: cannot reach http://127.0.0.1:" in err and "SECRET" not in out + err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE is set, so nothing can be pushed"):
        push(checkpoints[0], "me/tiny-qwen2", token="hf_pushSECRET000")


def test_push_refuses_a_damaged_checkpoint_before_any_request(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    bad = shutil.copytree(checkpoints[0], tmp_path / "bad")
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        push(bad, "me/tiny-qwen2")


def test_push_of_a_directory_without_card_uploads_a_rendered_card(checkpoints, tmp_path):
    plain = shutil.copytree(checkpoints[0], tmp_path / "nocard")
    (plain / "README.md").unlink()
    plan = push(plain, "me/tiny-qwen2", dry_run=True)
    card = {p.path_in_repo: p.source for p in plan}["README.md"]
    assert isinstance(card, bytes) and b"library_name: zoo" in card
    assert not (plain / "README.md").exists()  # the directory (maybe a read-only cache) is not written


@pytest.mark.parametrize("bad", ["acme/../x", "-acme/x", "a/b/c", "acme/x y", "acme/x@..", "acme/x@a..b",
                                 "acme/x@-rf", "acme/x@my branch", "acme/x@v1.lock", "acme/x@a@{1}", ""])
def test_invalid_repo_id_or_revision_is_refused_before_any_request(bad, monkeypatch, tmp_path, checkpoints):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # a request would be ConnectionError
    with pytest.raises(ValueError, match="not a valid"):
        pull(bad)
    repo, _, rev = bad.partition("@")
    with pytest.raises(ValueError, match="not a valid"):
        push(checkpoints[0], repo, revision=rev or None) if rev else push(checkpoints[0], bad)


def test_push_to_a_commit_hash_is_refused(checkpoints):
    with pytest.raises(ValueError, match="branch name, not a commit hash"):
        push(checkpoints[0], "me/x", revision="a" * 40)


def test_download_patterns_are_the_native_files_only():
    patterns = native_patterns()
    assert {"config.json", INDEX_FILE, "*.safetensors", "README.md", "tokenizer.json"} <= set(patterns)
    assert not any(p.endswith((".bin", ".pt", ".pth", ".pkl", "*")) and p != "*.safetensors" for p in patterns)


def test_token_is_never_printed_or_written(hub_env, history, tmp_path, capsys, caplog):
    secret = "hf_zooSECRET" + uuid.uuid4().hex
    path = pull("acme/tiny-qwen2@dev", token=secret, local_dir=tmp_path / "pulled")
    pull("acme/tiny-qwen2", token=secret)
    out, err = capsys.readouterr()
    assert secret not in out + err + caplog.text
    for root in (path, Path(os.environ["HF_HUB_CACHE"])):
        for f in root.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f


# ----------------------------------------------------------------------------------- live (real Hub)


def _network() -> bool:
    if not os.environ.get("HF_TOKEN"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _network(), reason="live push needs HF_TOKEN and network access to huggingface.co")
def test_live_push_then_pull_by_commit_round_trips(checkpoints, monkeypatch, tmp_path):
    import huggingface_hub.constants
    from huggingface_hub import HfApi

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    api = HfApi()
    repo_id = f"{api.whoami()['name']}/zoo-test-{uuid.uuid4().hex[:8]}"
    try:
        info = push(checkpoints[0], repo_id, private=True, message="zoo live test")
        back = pull(f"{repo_id}@{info.oid}")
        assert torch.equal(outputs(zoo.load(back)), outputs(zoo.load(checkpoints[0])))
    finally:
        api.delete_repo(repo_id, missing_ok=True)
