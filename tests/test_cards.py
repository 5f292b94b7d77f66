"""Model cards: every conversion writes one whose metadata huggingface_hub parses and the Hub would accept."""

from importlib.resources import files

import pytest
from huggingface_hub import ModelCard
from zoo.weights.format import NativeConfig

import zoo
from tests.helpers import tiny_qwen2
from zoo.cards import HF_LICENSES, CardError, render_card, validate_card
from zoo.cli import main as cli
from zoo.family import families
from zoo.registry import get_entry, list_models


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    ref = tiny_qwen2(root / "hf")
    out = zoo.convert(root / "hf", root / "native", progress=False, name="tiny-card",
                      source={"repo": "acme/Tiny-Source", "revision": "0123abc", "license": "apache-2.0"},
                      command="zoo convert ./hf ./native --name tiny-card")
    return out, sum(p.numel() for p in ref.parameters())


def test_conversion_writes_a_valid_card_with_provenance_parity_use_and_license(converted):
    directory, n_params = converted
    card = ModelCard.load(directory / "README.md")
    data = validate_card(card)
    assert data.license == "apache-2.0" and data.library_name == "zoo"
    assert data.pipeline_tag == "text-generation" and data.base_model == "acme/Tiny-Source"
    assert data.tags == ["zoo", "qwen2"]
    assert data.model_params == n_params  # tied embeddings: stored tensors == the model's parameters
    body = card.text
    assert "Converted from the published checkpoint [`acme/Tiny-Source`]" in body and "`0123abc`" in body
    assert "zoo convert ./hf ./native --name tiny-card" in body
    assert "1e-4 max abs error" in body and "greedy tokens identical" in body
    assert "Intended use:" in body
    assert "## License\n\napache-2.0" in body


def test_zoo_info_shows_the_card(converted, capsys):
    directory, _ = converted
    assert cli(["info", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "library_name: zoo" in out and "## Parity with the reference implementation" in out


def test_every_family_has_its_card_template():
    for family in families().values():
        assert files("zoo.model_cards").joinpath(family.card_template or "default.md").is_file(), family.name


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_gets_a_valid_card(name):
    entry = get_entry(name)
    native = NativeConfig(family=entry.family, config=entry.config, name=name, task=entry.task, dtype="bfloat16",
                          source={"layout": entry.source.layout})
    card = render_card(native, command=f"zoo convert SRC {name}")
    data = validate_card(str(card))
    assert data.model_params == entry.params
    if entry.source.host == "hf":
        assert data.base_model == entry.source.repo
    if entry.license in HF_LICENSES:
        assert data.license == entry.license
    else:  # e.g. tongyi-qianwen: the Hub wants `other` plus the license's name and a link to its text
        assert data.license == "other" and data.license_name == entry.license
        # the license text the entry names (GLM-130B's is on GitHub), else the publisher's LICENSE file on the Hub
        assert data.license_link == (entry.extra.get("license_url")
                                     or f"https://huggingface.co/{entry.source.repo}/blob/main/LICENSE")
    if entry.license == "other" and entry.source.host == "hf":  # not yet identified: point at the publisher
        assert data.license_link == f"https://huggingface.co/{entry.source.repo}"
    assert f"zoo convert SRC {name}" in card.text


@pytest.mark.parametrize("field,value,match", [
    ("license", "tongyi-qianwen", "not a Hub license id"),
    ("license_name", "my-license", "go with license 'other'"),
    ("library_name", "transformers", "expected 'zoo'"),
    ("pipeline_tag", "text-wizardry", "not a Hub pipeline tag"),
    ("base_model", "not a repo", "base_model"),
    ("model_params", None, "positive parameter count"),
    ("tags", None, "tags must be"),
])
def test_card_validation_names_the_bad_field(converted, field, value, match):
    card = ModelCard.load(converted[0] / "README.md")
    setattr(card.data, field, value)
    with pytest.raises(CardError, match=match):
        validate_card(str(card))


def test_an_unpublished_checkpoint_without_license_info_says_unknown(tmp_path):
    tiny_qwen2(tmp_path / "hf")
    out = zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    data = validate_card((out / "README.md").read_text())
    assert data.license == "unknown" and data.base_model is None
    assert 'zoo.load("path/to/native")' in (out / "README.md").read_text()


def test_token_is_never_written_into_card_or_config(tmp_path, monkeypatch):
    secret = "hf_cardSECRETtoken42"
    monkeypatch.setenv("HF_TOKEN", secret)
    tiny_qwen2(tmp_path / "hf")
    out = zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    for f in out.iterdir():
        assert secret.encode() not in f.read_bytes(), f
