"""Model cards: a template per family in model_cards/, metadata built and validated by huggingface_hub."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from zoo.family import get_family
from zoo.registry import get_entry, is_registered
from zoo.weights.format import CARD_FILE, NativeConfig

HF_LICENSES = {"apache-2.0", "mit", "cc-by-4.0", "cc-by-nc-4.0", "llama2", "other", "openrail", "bsd-3-clause"}


def card_facts(native: NativeConfig) -> dict[str, Any]:
    """What the card says, from the registry entry when the checkpoint is a registered model."""
    src = dict(native.source)
    entry = get_entry(native.name) if native.name and is_registered(native.name) else None
    if entry is not None:
        src.setdefault("repo", entry.source.repo if entry.source.host == "hf" else "")
        src.setdefault("revision", entry.source.revision)
    return {
        "name": native.name,
        "family": native.family,
        "task": native.task,
        "description": entry.description if entry else src.get("description", ""),
        "license": (entry.license if entry else src.get("license")) or "other",
        "paper": entry.paper if entry else src.get("paper", ""),
        "params": entry.params if entry else src.get("params"),
        "repo": src.get("repo", ""),
        "revision": src.get("revision", ""),
        "layout": src.get("layout", ""),
        "path": src.get("path", ""),
        "dtype": native.dtype,
    }


def render_card(native: NativeConfig, command: str = "", params: int | None = None) -> ModelCard:
    family = get_family(native.family)
    facts = card_facts(native)
    if params is not None:
        facts["params"] = params
    lic = facts["license"]
    data = ModelCardData(
        license=lic if lic in HF_LICENSES else "other",
        license_name=None if lic in HF_LICENSES else lic,
        library_name="zoo",
        pipeline_tag=native.task or family.task,
        base_model=facts["repo"] or None,
        tags=["zoo", native.family],
        model_params=facts["params"],
    )
    template = files("zoo.model_cards").joinpath(family.card_template or "default.md").read_text()
    card = ModelCard.from_template(data, template_str=template, command=command, **facts)
    ModelCardData(**card.data.to_dict())  # round-trip: raises if the metadata is malformed
    return card


def write_card(directory: str | Path, native: NativeConfig, command: str = "", params: int | None = None) -> Path:
    path = Path(directory) / CARD_FILE
    path.write_text(str(render_card(native, command, params)))
    return path
