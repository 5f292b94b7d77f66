"""Regenerate zoo/data/registry.json, the registry snapshot `zoo list` / `zoo info` read without importing torch.

Run it after changing a registry entry or any module of architectures/ (the snapshot records their fingerprint
and is not used while it differs): python scripts/write_registry_snapshot.py
"""

from zoo.registry import write_snapshot

if __name__ == "__main__":
    print(f"wrote {write_snapshot()}")
