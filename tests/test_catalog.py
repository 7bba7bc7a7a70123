"""The model registry file: validation, resolution of names, versions, aliases and splits."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from common.catalog import (
    Catalog,
    CatalogError,
    CatalogSource,
    ModelSpec,
    UnknownModel,
    parse_catalog,
)
from common.settings import DEFAULT_MODEL_NAME, Settings

REGISTRY = """
models:
  - {name: chat, version: "1", source: /ckpt/chat-v1}
  - {name: chat, version: "2", source: /ckpt/chat-v2, max_new_tokens: 64}
  - {name: code, version: "7", source: org/code-model, pool: big}
aliases:
  default: chat
  stable: chat@1
traffic:
  chat: {"1": 90, "2": 10}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_names_versions_aliases_and_pools_resolve(tmp_path: Path) -> None:
    catalog = parse_catalog(write(tmp_path, REGISTRY))
    assert catalog.resolve("chat@2").key == "chat@2"
    assert catalog.resolve("stable").key == "chat@1"
    assert catalog.resolve("code").pool == "big"
    assert catalog.pools() == {"default", "big"}
    assert catalog.default_version("chat").key == "chat@2"  # the last listed
    assert catalog.resolve(None).name == "chat"  # the `default` alias


def test_unknown_names_list_what_is_served(tmp_path: Path) -> None:
    catalog = parse_catalog(write(tmp_path, REGISTRY))
    for name in ("gpt-17", "chat@3"):
        with pytest.raises(UnknownModel, match="served models: chat, code, chat@1, chat@2"):
            catalog.resolve(name)


def test_traffic_split_is_honoured_over_many_requests(tmp_path: Path) -> None:
    catalog = parse_catalog(write(tmp_path, REGISTRY))
    rng = random.Random(7)
    counts = Counter(catalog.resolve("chat", rng).version for _ in range(10_000))
    assert 0.08 < counts["2"] / 10_000 < 0.12
    without = Catalog.build(list(catalog.specs.values()))
    assert {without.resolve("chat").key for _ in range(50)} == {"chat@2"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: [{name: a, source: /x}, {name: a, source: /y}]", "a@1 is listed twice"),
        ("models: [{name: a, sauce: /x}]", "models.0.sauce: Extra inputs are not permitted"),
        ("models: [{name: 'a b'}]", "models.0.name: String should match pattern"),
        ("models: [{name: a}]\naliases: {b: nope}", "alias 'b' points to 'nope'"),
        ("models: [{name: a}]\naliases: {a: a}", "alias 'a' would hide the model"),
        ("models: [{name: a}]\ntraffic: {a: {'2': 1}}", "names versions ['2'] it does not have"),
        ("models: [{name: a}]\ntraffic: {a: {'1': 0}}", "positive sum"),
        ("models: [{name: a, sha256: {w.bin: abc}}]", "sha256 of 'w.bin' must be 64 hex digits"),
        ("models: []", "models: List should have at least 1 item"),
        ("models: [", "is not valid YAML"),
    ],
)
def test_invalid_registries_say_where_and_why(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(CatalogError, match="GENQ_MODELS_FILE") as info:
        parse_catalog(write(tmp_path, text))
    assert message in str(info.value)


def test_source_rereads_on_a_new_revision_and_keeps_the_last_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, "models: [{name: a}]")
    source = CatalogSource(Settings(models_file=path))
    assert list(source.get(revision=0).specs) == ["a@1"]
    path.write_text("models: [{name: a}, {name: a, version: '2'}]")
    assert list(source.get(revision=0).specs) == ["a@1"]  # an edit waits for a reload
    assert list(source.get(revision=1).specs) == ["a@1", "a@2"]
    path.write_text("models: [{name: a, bogus: 1}]")
    assert list(source.get(revision=2).specs) == ["a@1", "a@2"]


def test_without_a_file_the_default_model_is_served_under_its_alias() -> None:
    catalog = CatalogSource(Settings()).get()
    (spec,) = catalog.specs.values()
    assert spec == ModelSpec(name=DEFAULT_MODEL_NAME, preload=True)
    assert catalog.resolve("default").key == f"{DEFAULT_MODEL_NAME}@1"
