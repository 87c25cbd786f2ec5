"""docs/settings.md, the reference of every setting, generated from Pulumi.yaml's config: block.

    python -m infra.tools.settings_doc > docs/settings.md

`settings_markdown` is pure: the schema in, the Markdown out. The accepted values come from the
vocabularies `parse_settings` checks against, so the page says what the parser accepts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from enum import StrEnum

from infra.core.settings import (
    ACME_SERVERS,
    DROPLET_MEMORY_MB,
    MESSAGE_MB_RANGE,
    MIN_MEMORY_MB,
    REGIONS,
    SES_REGIONS,
    VOLUME_GB_RANGE,
    DmarcPolicy,
    Image,
    MtaStsMode,
    Relay,
    SettingSpec,
    SpamFilter,
    load_schema,
)

COMMAND = "python -m infra.tools.settings_doc > docs/settings.md"


def _values(values: Iterable[str]) -> str:
    return ", ".join(f"`{v}`" for v in values)


def _members(enum: type[StrEnum]) -> str:
    return _values(m.value for m in enum)


def _range(low_high: tuple[int, int]) -> str:
    return f"{low_high[0]} to {low_high[1]}"


# What parse_settings accepts for the settings with a closed set of values or a range.
ACCEPTED: Mapping[str, str] = {
    "region": _values(sorted(REGIONS)),
    "dropletSize": _values(size for size, mb in DROPLET_MEMORY_MB.items() if mb >= MIN_MEMORY_MB),
    "image": _members(Image),
    "volumeSizeGb": _range(VOLUME_GB_RANGE),
    "relay": _members(Relay),
    "sesRegion": _values(sorted(SES_REGIONS)) + " (checked with relay `ses`)",
    "spamFilter": _members(SpamFilter),
    "dmarcPolicy": _members(DmarcPolicy),
    "mtaStsMode": _members(MtaStsMode),
    "acmeServer": _values(ACME_SERVERS) + ", or an `https://` ACME directory URL",
    "messageSizeLimitMb": _range(MESSAGE_MB_RANGE),
}


def _type(spec: SettingSpec) -> str:
    # The parser takes every array as a list of strings (Pulumi.yaml's `items`, which load_schema drops).
    return "list of strings" if spec.type == "array" else spec.type


def _escape(text: str) -> str:
    """Prose as Markdown shows it: `<domain>` is text, not an HTML tag; `*` and `_` are not emphasis."""
    for char in "\\<>*_`":
        text = text.replace(char, "\\" + char)
    return text


def _default(spec: SettingSpec) -> str:
    if spec.required:
        return "none (required)"
    if isinstance(spec.default, str) and spec.default:
        return f"`{spec.default}`"
    return f"`{json.dumps(spec.default)}`"  # "", [], false, 10: as a stack file writes them


def settings_markdown(schema: Mapping[str, SettingSpec]) -> str:
    """The settings reference: an index table, then a section per setting, in Pulumi.yaml's order."""
    lines = [
        "# Settings",
        "",
        f"Generated from Pulumi.yaml, do not edit: after changing Pulumi.yaml, run `{COMMAND}`.",
        "",
        "Every setting of mailroom, as Pulumi.yaml's `config:` block declares it. A stack file",
        "(`Pulumi.<stack>.yaml`) holds only what differs from the defaults; a setting without a default",
        "must be set in every stack. A secret setting must be set with `pulumi config set --secret`;",
        "the program refuses it in plain text.",
        "",
        "| Setting | Type | Default |",
        "| --- | --- | --- |",
    ]
    lines += [f"| [`{name}`](#{name.lower()}) | {_type(spec)} | {_default(spec)} |" for name, spec in schema.items()]
    for name, spec in schema.items():
        lines += [
            "",
            f"## {name}",
            "",
            _escape(spec.description),
            "",
            f"- Type: {_type(spec)}",
            f"- Default: {_default(spec)}",
        ]
        if name in ACCEPTED:
            lines.append(f"- Accepted: {ACCEPTED[name]}")
        if spec.secret:
            lines.append("- Secret: set it with `pulumi config set --secret`; refused in plain text")
    return "\n".join(lines) + "\n"


def main() -> None:
    print(settings_markdown(load_schema()), end="")


if __name__ == "__main__":
    main()
