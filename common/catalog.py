"""The model catalog: which models exist, in which versions, served by which pool. The docs
and the API call it the model registry, and its file the registry file.

It comes from the YAML file named by GENQ_MODELS_FILE, the models file (read by the gateway and
the workers alike, re-read on reloads), or, without one, from a built-in entry for GENQ_MODEL.
Aliases and traffic splits changed at run time through the admin API live in Redis and override
the file's (see `common.routing`).

A model is addressed as `name@version`, as `name` (its traffic split, else its last listed
version), or through an alias.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "default"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
POOL_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


class CatalogError(ValueError):
    """The models file or a routing change is invalid; the message says where and why."""


class UnknownModel(LookupError):
    pass


class EngineSpec(BaseModel):
    """Per-model engine limits; unset ones come from the worker's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(None, ge=1)
    max_batch_tokens: int | None = Field(None, ge=1)
    max_prefill_tokens: int | None = Field(None, ge=1)


class ModelSpec(BaseModel):
    """One version of one model, as the models file lists it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field("1", pattern=NAME_PATTERN)
    source: str | None = Field(
        None, description="Checkpoint directory, GGUF file or hub id; unset: the default model."
    )
    sha256: dict[str, str] = Field(
        default_factory=dict,
        description="Expected SHA-256 of weight files, by path relative to the checkpoint "
        "directory (for a GGUF source: its file name). A mismatch refuses the load.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    device: Literal["auto", "cpu", "cuda"] | None = None
    compile: bool | None = None
    pool: str = Field("default", pattern=POOL_PATTERN)
    preload: bool = Field(False, description="Load when a worker of the pool starts.")
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1, description="Upper bound of max_new_tokens.")
    default_max_new_tokens: int | None = Field(None, ge=1)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    tool_call_parser: Literal["hermes"] | None = Field(
        "hermes",
        description="How the OpenAI chat route reads tool calls out of an answer with "
        '`tool_choice: "auto"`: "hermes" (`<tool_call>{json}</tool_call>`: Hermes, Qwen, '
        "SmolLM2); null: it does not, and such answers are text.",
    )

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        for path, digest in self.sha256.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ValueError(f"sha256 of {path!r} must be 64 hex digits")
        if (
            self.max_new_tokens is not None
            and self.default_max_new_tokens is not None
            and self.default_max_new_tokens > self.max_new_tokens
        ):
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens")
        return self


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)
    aliases: dict[str, str] = Field(default_factory=dict)
    traffic: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Per model name: weight of each version."
    )


@dataclass(frozen=True)
class Catalog:
    specs: dict[str, ModelSpec]  # by key, in file order
    aliases: dict[str, str] = field(default_factory=dict)
    traffic: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        specs: list[ModelSpec],
        aliases: dict[str, str] | None = None,
        traffic: dict[str, dict[str, int]] | None = None,
    ) -> Catalog:
        by_key: dict[str, ModelSpec] = {}
        for spec in specs:
            if spec.key in by_key:
                raise CatalogError(f"model {spec.key} is listed twice")
            by_key[spec.key] = spec
        catalog = cls(by_key)
        for alias, target in (aliases or {}).items():
            catalog.check_alias(alias, target)
        for name, weights in (traffic or {}).items():
            catalog.check_traffic(name, weights)
        return cls(by_key, dict(aliases or {}), dict(traffic or {}))

    def names(self) -> list[str]:
        return list(dict.fromkeys(spec.name for spec in self.specs.values()))

    def versions(self, name: str) -> list[ModelSpec]:
        return [spec for spec in self.specs.values() if spec.name == name]

    def pools(self) -> set[str]:
        return {spec.pool for spec in self.specs.values()}

    def served(self) -> str:
        """Every way to name a model, for error messages."""
        return ", ".join([*self.names(), *self.specs, *self.aliases])

    def check_alias(self, alias: str, target: str) -> None:
        if not _matches_name(alias):
            raise CatalogError(f"alias {alias!r} is not a valid name")
        if alias in self.names() or alias in self.specs:
            raise CatalogError(f"alias {alias!r} would hide the model of that name")
        if target not in self.specs and not self.versions(target):
            raise CatalogError(
                f"alias {alias!r} points to {target!r}, which is not a model; models: "
                f"{', '.join([*self.names(), *self.specs])}"
            )

    def check_traffic(self, name: str, weights: dict[str, int]) -> None:
        versions = {spec.version for spec in self.versions(name)}
        if not versions:
            raise CatalogError(f"traffic split for {name!r}, which is not a model name")
        unknown = sorted(set(weights) - versions)
        if unknown:
            raise CatalogError(
                f"traffic split for {name!r} names versions {unknown} it does not have; "
                f"versions: {sorted(versions)}"
            )
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise CatalogError(f"traffic weights for {name!r} must be >= 0 with a positive sum")

    def default_version(self, name: str) -> ModelSpec:
        """What `name` serves without a traffic split: its last listed version."""
        return self.versions(name)[-1]

    def resolve(self, requested: str | None, rng: random.Random | None = None) -> ModelSpec:
        """The version that serves a request for `requested` (unset: the `default` alias)."""
        target = requested or DEFAULT_ALIAS
        if target == DEFAULT_ALIAS and target not in self.aliases and len(self.names()) == 1:
            target = self.names()[0]
        target = self.aliases.get(target, target)
        if target in self.specs:
            return self.specs[target]
        if not self.versions(target):
            raise UnknownModel(f"model {requested!r} is not served; served models: {self.served()}")
        weights = self.traffic.get(target)
        if not weights:
            return self.default_version(target)
        chosen = (rng or random).choices(list(weights), weights=list(weights.values()))[0]
        return self.specs[f"{target}@{chosen}"]


def _matches_name(value: str) -> bool:
    return re.fullmatch(NAME_PATTERN, value) is not None


def builtin_catalog(settings: Settings) -> Catalog:
    """Without a models file: GENQ_MODEL (or the default model), preloaded, alias `default`."""
    spec = ModelSpec(
        name=settings.served_model_name, source=settings.model, pool=settings.pool, preload=True
    )
    return Catalog.build([spec], aliases={DEFAULT_ALIAS: spec.name})


def parse_catalog(path: Path) -> Catalog:
    """The catalog a models file lists; CatalogError says where and why it is invalid."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise CatalogError(f"GENQ_MODELS_FILE {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise CatalogError(f"GENQ_MODELS_FILE {path} is not valid YAML: {e}") from e
    try:
        parsed = ModelsFile.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'file'}: {err['msg']}" for err in e.errors()
        )
        raise CatalogError(f"GENQ_MODELS_FILE {path}: {problems}") from e
    try:
        return Catalog.build(parsed.models, parsed.aliases, parsed.traffic)
    except CatalogError as e:
        raise CatalogError(f"GENQ_MODELS_FILE {path}: {e}") from e


class CatalogSource:
    """The current catalog. The models file is read at start and re-read when the catalog
    revision in Redis moves on (each reload through the admin API bumps it), so an edit takes
    effect in every gateway and worker at the same moment, when the operator says so.

    A file that turns invalid is reported and the last good catalog stays in force, so an
    editing mistake never takes serving down; an invalid file at start-up is an error.
    """

    def __init__(self, settings: Settings) -> None:
        self.path = settings.models_file
        self._revision: int | None = None
        self._catalog = builtin_catalog(settings) if self.path is None else parse_catalog(self.path)

    def get(self, *, revision: int | None = None, force: bool = False) -> Catalog:
        if self.path is None:
            return self._catalog
        if force or (revision is not None and revision != self._revision):
            try:
                fresh = parse_catalog(self.path)
                if fresh != self._catalog:
                    logger.info("model registry changed: %s", ", ".join(fresh.specs))
                self._catalog = fresh
            except CatalogError as e:
                logger.error("%s; keeping the previous registry", e)
            if revision is not None:
                self._revision = revision
        return self._catalog
