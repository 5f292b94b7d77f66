"""The reliability figure: run the malformed-input corpus (zoo.testing.corpus) and count what happened.

    python benchmarks/reliability.py            # everything, with a local Hub server (olah) if installed
    python benchmarks/reliability.py --no-hub   # without the server cases
    python benchmarks/reliability.py -v         # also list every case that was not refused cleanly

Cases tried, refused with a named error, refused without naming the cause, crashed (an exception the CLI would
print as a traceback), accepted (no error at all), and left partial output. The goal: everything refused, by
name; nothing crashed, accepted or partial. Runs offline, on CPU, in about a minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-hub", action="store_true", help="skip the cases that need a local Hub server (olah)")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every case not refused cleanly")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="zoo-reliability-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the tests run: nothing reaches the network
    os.environ["ZOO_HOME"] = str(work / "zoo_home")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT))  # the corpus's seeds build their checkpoints with the test suite's fixtures

    from zoo.testing.corpus import by_entry, failures, run_corpus, summary

    hub = None
    if not args.no_hub:
        try:
            import olah  # noqa: F401

            from zoo.testing.olah_server import OlahServer

            hub = OlahServer(work / "olah")
            hub.start()
            _point_at(hub)
        except ImportError:
            print("olah is not installed: the Hub server cases are skipped", file=sys.stderr)
    start = time.perf_counter()
    try:
        results = run_corpus(work / "corpus", hub)
    finally:
        if hub is not None:
            hub.stop()
    elapsed = time.perf_counter() - start

    total = summary(results)
    rows = [("entry point", "tried", "refused", "unnamed", "crashed", "accepted", "partial")]
    rows += [(k, *map(str, (v["tried"], v["refused"], v["unnamed"], v["crashed"], v["accepted"], v["partial"])))
             for k, v in by_entry(results).items()]
    rows.append(("all", *map(str, (total["tried"], total["refused"], total["unnamed"], total["crashed"],
                                   total["accepted"], total["partial"]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0 or n == len(rows) - 2:
            print("  ".join("-" * w for w in widths))
    print(f"\n{total['tried']} cases in {elapsed:.0f} s: {total['refused']} refused with a named error, "
          f"{total['crashed']} crashed with a traceback, {total['partial']} left partial output "
          f"({total['unnamed']} refused without naming the cause, {total['accepted']} accepted)")
    bad = failures(results)
    if bad and args.verbose:
        print("\nnot refused cleanly:")
        for line in bad:
            print("  " + line)
    return 0 if not bad else 1


def _point_at(hub) -> None:
    import huggingface_hub.constants

    os.environ.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
                      HF_HUB_CACHE=str(hub.root / "hf_cache"))
    os.environ.pop("HF_TOKEN", None)
    huggingface_hub.constants.HF_HUB_OFFLINE = False
    huggingface_hub.constants.HF_TOKEN_PATH = str(hub.root / "no_saved_token")


if __name__ == "__main__":
    sys.exit(main())
