import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))
if not torch.cuda.is_available():  # Triton kernels run under its interpreter, whichever test imports triton first
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _zoo_home(tmp_path_factory, monkeypatch):
    """Keep every test's converted-model cache out of the user's home."""
    monkeypatch.setenv("ZOO_HOME", str(tmp_path_factory.mktemp("zoo_home")))


@pytest.fixture(scope="session", autouse=True)
def _kernels_cache(tmp_path_factory):
    """One build of the C++ CPU kernels per instruction set per test run (architectures/kernels/cpu_ext.py), shared
    by every test and the subprocesses they start, unless ZOO_KERNELS_CACHE already names a cache to reuse."""
    if not os.environ.get("ZOO_KERNELS_CACHE"):
        os.environ["ZOO_KERNELS_CACHE"] = str(tmp_path_factory.mktemp("zoo_kernels"))
    yield


@pytest.fixture(scope="session")
def olah(tmp_path_factory):
    """A real Hub-compatible HTTP server (olah, offline) serving git repos; see zoo/testing/olah_server.py."""
    try:
        import olah as _olah  # noqa: F401
    except ImportError:
        pytest.skip("olah is not installed (pip install olah): the Hub tests need a real Hub-compatible server")
    from zoo.testing.olah_server import OlahServer

    server = OlahServer(tmp_path_factory.mktemp("olah"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(olah, tmp_path, monkeypatch):
    """Point huggingface_hub (through zoo.hub, which reads the environment at call time) at the olah server,
    with a fresh cache. huggingface_hub fixed its offline flag at import from HF_HUB_OFFLINE=1 above, so that
    setting is switched off the same way the environment would have, for this test only."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", olah.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # and no saved login: the tests send no real token anywhere
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_saved_token"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return olah
