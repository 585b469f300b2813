"""The config as the commented example YAML and as the Markdown reference (``make docs``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from daemon.config.sections import SECTIONS, Config


def field_docs() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every field, in declaration order."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((section, f.name, default, f.metadata["doc"]))
    return rows


def render_yaml(cfg: Config | None = None, *, with_docs: bool = True, mask_secrets: bool = True) -> str:
    """Render a config as YAML; with docs it is the commented example file."""
    import json

    cfg = cfg or Config()
    values = cfg.to_dict(mask_secrets=mask_secrets)
    lines = []
    if with_docs:
        lines += ["# lorad configuration. Every key is optional; shown are the defaults.",
                  "# Override any key with an environment variable LORAD_<SECTION>__<KEY>, e.g. LORAD_TRAIN__LORA_R=8.",
                  "# Generated from daemon/config/ by `lorad config show --defaults`; a test keeps them equal.", ""]
    for section, cls in SECTIONS.items():
        if with_docs:
            lines.append(f"# {(cls.__doc__ or '').strip().splitlines()[0]}")
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            if with_docs:
                doc = f.metadata["doc"]
                choices = f.metadata.get("choices")
                if choices:
                    doc += f" [{' | '.join(choices)}]"
                lines.append(f"  # {doc}")
            # JSON scalars are valid YAML and keep strings quoted unambiguously.
            lines.append(f"  {f.name}: {json.dumps(values[section][f.name], ensure_ascii=False)}")
        lines.append("")
    return "\n".join(lines)


def render_markdown() -> str:
    """The README's configuration reference: one table per section."""
    import json

    out = []
    for section, cls in SECTIONS.items():
        out.append(f"**`{section}`** — {(cls.__doc__ or '').strip().splitlines()[0]}\n")
        out.append("| key | default | meaning |")
        out.append("|---|---|---|")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            doc = f.metadata["doc"]
            if f.metadata.get("choices"):
                doc += " (" + " \\| ".join(f"`{c}`" for c in f.metadata["choices"]) + ")"
            out.append(f"| `{f.name}` | `{json.dumps(default, ensure_ascii=False)}` | {doc} |")
        out.append("")
    return "\n".join(out)
