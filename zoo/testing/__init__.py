"""Test machinery shipped with the package, shared by tests/ and benchmarks/: the malformed-input corpus
(`corpus`, its seed checkpoints `corpus_seeds`), a local Hub server (`olah_server`) and native checkpoints of
random weights (`native`). `import zoo` never imports it."""
