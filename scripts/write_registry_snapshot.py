"""Regenerate zoo/data/registry.json, the registry snapshot `zoo list` / `zoo info` read without importing torch.

Run it after changing a registry entry or any module of architectures/ (the snapshot records their fingerprint
and is not used while it differs): python scripts/write_registry_snapshot.py
It also stores what each setup an entry declares (extra["setups"]) needs per GPU (zoo.memory_plan).
"""

from zoo.memory_plan import snapshot_setups
from zoo.registry import write_snapshot

if __name__ == "__main__":
    print(f"wrote {write_snapshot(sections={'setups': snapshot_setups()})}")
