"""The malformed-input corpus (zoo/testing/corpus.py): every case, at every entry point, is refused with an error that
names what is wrong; nothing crashes, nothing is accepted, nothing is left half-written.

benchmarks/reliability.py runs the same corpus and prints the figure recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from zoo.testing.corpus import Case, failures, run_case, run_corpus, summary

ENTRIES = ["convert", "load", "export", "pull", "predict", "generate", "call", "cli"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The whole corpus, run once; with a local Hub server (olah) for the server cases when it is installed."""
    root = tmp_path_factory.mktemp("corpus")
    try:
        import olah  # noqa: F401
    except ImportError:
        return run_corpus(root / "work")
    import huggingface_hub.constants

    from zoo.testing.olah_server import OlahServer

    server = OlahServer(root / "olah")
    server.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_ENDPOINT", server.url)
            mp.setenv("HF_HUB_CACHE", str(root / "hf_cache"))
            mp.setenv("HF_HUB_OFFLINE", "0")
            mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
            mp.delenv("HF_TOKEN", raising=False)
            mp.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(root / "no_saved_token"))
            mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
            return run_corpus(root / "work", server)
    finally:
        server.stop()


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_case_is_refused_by_name_with_nothing_crashed_accepted_or_left_partial(results, entry):
    mine = [r for r in results if r.case.entry.split(":")[0] == entry]
    assert len(mine) >= 10, f"only {len(mine)} cases for {entry}"
    bad = failures(mine)
    assert not bad, f"{len(bad)} of {len(mine)} {entry} cases not refused cleanly:\n" + "\n".join(bad[:40])


def test_every_published_format_gets_generic_cases_and_seeded_ones_get_mutations(results):
    from zoo.conversion import formats

    from zoo.testing.corpus_seeds import SEEDS

    counts: dict[str, int] = {}
    for r in results:
        if r.case.entry.startswith("convert:"):
            counts[r.case.entry.removeprefix("convert:")] = counts.get(r.case.entry.removeprefix("convert:"), 0) + 1
    for name in formats():
        assert counts.get(name, 0) >= 9, f"format {name}: {counts.get(name, 0)} cases"
        if name in SEEDS:  # its own files, mutated: truncated, junk, missing/extra/misshapen tensors, configs ...
            mutations = [r for r in results if r.case.entry == f"convert:{name}" and " forced as " not in r.case.name]
            assert len(mutations) >= 15, f"format {name}: only {len(mutations)} mutation cases"
    figure = summary(results)
    assert figure["tried"] > 800 and figure["refused"] == figure["tried"] and figure["partial"] == 0


def test_the_runner_tells_refused_from_unnamed_crashed_accepted_and_partial(tmp_path):
    """The corpus is only as good as its judge: each outcome is recognised."""
    def raises(e):
        def run():
            raise e
        return run

    out = tmp_path / "out"
    assert run_case(Case("t", "named", raises(ValueError("x=1: bad")), (ValueError,), r"x=1")).outcome == "refused"
    assert run_case(Case("t", "unnamed", raises(ValueError("bad")), (ValueError,), r"x=1")).outcome == "unnamed"
    assert run_case(Case("t", "crash", raises(IndexError("index out of range")), (ValueError,))).outcome == "crashed"
    assert run_case(Case("t", "accepted", lambda: 1, (ValueError,))).outcome == "accepted"
    (tmp_path / ".out.partial-h-1-x").mkdir()
    assert run_case(Case("t", "partial", raises(ValueError("x=1")), (ValueError,), r"x=1", (out,))).partial
    cli_ok = Case("t", "cli", lambda: (2, "zoo x: error: x=1 is bad\n"), (), r"x=1", cli=True)
    cli_two_lines = Case("t", "cli", lambda: (2, "zoo: error: x=1\nzoo: error: y\n"), (), r"x=1", cli=True)
    cli_trace = Case("t", "cli", lambda: (1, "Traceback (most recent call last):\n  ...\n"), (), r"x", cli=True)
    assert [run_case(c).outcome for c in (cli_ok, cli_two_lines, cli_trace)] == ["refused", "unnamed", "crashed"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run_case(Case("t", "torch", lambda: torch.zeros(2)[5], (ValueError,))).outcome == "crashed"
