"""docs/settings.md: generated from Pulumi.yaml, up to date with it, and naming every setting."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

import pytest
import yaml

from infra.core.facts import PROJECT_DIR, PROJECT_FILE
from infra.core.settings import SettingSpec, load_schema
from infra.tools.settings_doc import ACCEPTED, COMMAND, settings_markdown

DOC = PROJECT_DIR / "docs" / "settings.md"


def assert_up_to_date(doc: str, schema: Mapping[str, SettingSpec]) -> None:
    assert doc == settings_markdown(schema), (
        f"docs/settings.md is out of date with Pulumi.yaml; regenerate it: {COMMAND}"
    )


def assert_names_every_setting(doc: str, names: Iterable[str]) -> None:
    missing = [name for name in names if f"\n## {name}\n" not in doc]
    assert not missing, f"docs/settings.md has no section for {missing}; regenerate it: {COMMAND}"


def test_the_doc_is_what_the_generator_makes_of_pulumi_yaml() -> None:
    assert_up_to_date(DOC.read_text(), load_schema())


def test_the_doc_names_every_setting_of_pulumi_yaml() -> None:
    names = yaml.safe_load(PROJECT_FILE.read_text())["config"]
    assert len(names) >= 30
    assert_names_every_setting(DOC.read_text(), names)


def test_accepted_values_are_for_settings_that_exist() -> None:
    assert set(ACCEPTED) <= set(load_schema())


def test_the_checks_catch_a_changed_or_an_added_setting() -> None:
    schema = load_schema()
    doc = settings_markdown(schema)
    edited = dict(schema, relay=dataclasses.replace(schema["relay"], description="How mail leaves."))
    with pytest.raises(AssertionError, match=re.escape(f"regenerate it: {COMMAND}")):
        assert_up_to_date(doc, edited)
    added = dict(schema, newSetting=SettingSpec("newSetting", "string", "A setting added to Pulumi.yaml."))
    with pytest.raises(AssertionError, match=re.escape("no section for ['newSetting']")):
        assert_names_every_setting(doc, added)
