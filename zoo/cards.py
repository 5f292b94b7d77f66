"""Model cards: a template per family in model_cards/, metadata built and validated by huggingface_hub.

Every conversion writes one (README.md in the native directory); `zoo info` prints it; `zoo push` uploads it.
Templates see the facts of `card_facts` (name, description, family, task, dtype, repo, revision, layout, path,
command, license, license_link, paper, params, load_ref, extra) plus `card_data`, the YAML front matter.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from zoo.family import get_family
from zoo.registry import get_entry, is_registered
from zoo.weights.format import CARD_FILE, NativeConfig

# License identifiers the Hub accepts in card metadata (https://huggingface.co/docs/hub/repositories-licenses);
# anything else is written as `license: other` with license_name / license_link, as the Hub asks.
HF_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openrail++
osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1 llama3.2
llama3.3 llama4 gemma unknown other
""".split())

# Hub pipeline tags zoo's tasks can map to; a task outside this set is only a tag, never an invalid pipeline_tag.
HF_PIPELINE_TAGS = frozenset("""
text-generation image-classification video-classification image-segmentation mask-generation object-detection
depth-estimation image-feature-extraction feature-extraction text-to-3d image-to-3d image-to-text
image-text-to-text text-to-image fill-mask text-classification token-classification zero-shot-image-classification
automatic-speech-recognition audio-classification
""".split())


class CardError(ValueError):
    """A model card whose metadata the Hub would reject; the message names the field."""


def _license_link(repo: str, lic: str) -> str:
    """Where a license the Hub has no id for can be read: the publisher's LICENSE file, or their repo page."""
    if not repo or lic in HF_LICENSES - {"other"}:
        return ""
    return f"https://huggingface.co/{repo}" + ("" if lic == "other" else "/blob/main/LICENSE")


def card_facts(native: NativeConfig) -> dict[str, Any]:
    """What the card says, from the registry entry when the checkpoint is a registered model."""
    src = dict(native.source)
    entry = get_entry(native.name) if native.name and is_registered(native.name) else None
    if entry is not None and entry.source.host == "hf":
        src.setdefault("repo", entry.source.repo)
        src.setdefault("revision", entry.source.revision)
    repo = src.get("repo", "")
    lic = (entry.license if entry else src.get("license")) or "unknown"
    return {
        "name": native.name,
        "family": native.family,
        "task": native.task,
        "description": entry.description if entry else src.get("description", ""),
        "license": lic,
        "license_link": (entry.extra if entry else src).get("license_url") or _license_link(repo, lic),
        "paper": entry.paper if entry else src.get("paper", ""),
        "params": entry.params if entry else src.get("params"),
        "repo": repo,
        "revision": src.get("revision", ""),
        "layout": src.get("layout", ""),
        "path": src.get("path", ""),
        "dtype": native.dtype,
        "load_ref": native.name if entry is not None else f"path/to/{native.name or 'checkpoint'}",
        "extra": dict(native.extra),  # the converter's facts (preprocessing, labels, training data) for templates
    }


def count_stored_params(directory: str | Path) -> int | None:
    """Elements of every tensor in a native directory's shards, read from the safetensors headers alone."""
    from zoo.weights.reader import read_safetensors_header

    total = 0
    shards = sorted(Path(directory).glob("*.safetensors"))
    for shard in shards:
        for key, meta in read_safetensors_header(shard).items():
            if key != "__metadata__":
                n = 1
                for d in meta["shape"]:
                    n *= d
                total += n
    return total if shards else None


def card_data(facts: dict[str, Any], family_task: str) -> ModelCardData:
    lic = facts["license"]
    task = facts["task"] or family_task
    other = lic not in HF_LICENSES
    return ModelCardData(
        license="other" if other else lic,
        license_name=lic.lower().replace(" ", "-") if other and lic != "other" else None,
        license_link=facts["license_link"] or None,
        library_name="zoo",
        pipeline_tag=task if task in HF_PIPELINE_TAGS else None,
        base_model=facts["repo"] or None,
        tags=["zoo", facts["family"], *([] if task in HF_PIPELINE_TAGS or not task else [task])],
        model_params=facts["params"],
    )


def validate_card(card: ModelCard | str) -> ModelCardData:
    """Check a card's front matter the way the Hub would, offline: a Hub license id (license_name / license_link
    only with 'other'), zoo as library, a known pipeline tag, base_model a repo id, string tags, a parameter count."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    card = card if isinstance(card, ModelCard) else ModelCard(card, ignore_metadata_errors=False)
    data = card.data
    if data.license not in HF_LICENSES:
        raise CardError(f"license {data.license!r} is not a Hub license id; use 'other' with license_name")
    if data.license != "other" and (getattr(data, "license_name", None) or getattr(data, "license_link", None)):
        raise CardError(f"license_name / license_link go with license 'other', not {data.license!r}")
    if data.library_name != "zoo":
        raise CardError(f"library_name is {data.library_name!r}, expected 'zoo'")
    if data.pipeline_tag is not None and data.pipeline_tag not in HF_PIPELINE_TAGS:
        raise CardError(f"pipeline_tag {data.pipeline_tag!r} is not a Hub pipeline tag")
    for base in [data.base_model] if isinstance(data.base_model, str) else (data.base_model or []):
        try:
            validate_repo_id(base)
        except HFValidationError as e:
            raise CardError(f"base_model {base!r}: {e}") from None
    if not data.tags or not all(isinstance(t, str) for t in data.tags) or "zoo" not in data.tags:
        raise CardError(f"tags must be a list of strings including 'zoo', got {data.tags!r}")
    params = getattr(data, "model_params", None)
    if not isinstance(params, int) or params <= 0:
        raise CardError(f"model_params must be a positive parameter count, got {params!r}")
    ModelCardData(**data.to_dict())  # round-trips through huggingface_hub's own parser
    return data


def render_card(native: NativeConfig, command: str = "", params: int | None = None,
                directory: str | Path | None = None) -> ModelCard:
    """The card of a native checkpoint; params default to the registry's count, else the stored tensors'."""
    family = get_family(native.family)
    facts = card_facts(native)
    if params is not None:
        facts["params"] = params
    elif facts["params"] is None and directory is not None:
        facts["params"] = count_stored_params(directory)
    template = files("zoo.model_cards").joinpath(family.card_template or "default.md").read_text()
    card = ModelCard.from_template(card_data(facts, family.task), template_str=template, command=command, **facts)
    validate_card(str(card))
    return card


def write_card(directory: str | Path, native: NativeConfig, command: str = "", params: int | None = None) -> Path:
    path = Path(directory) / CARD_FILE
    path.write_text(str(render_card(native, command, params, directory)))
    return path

