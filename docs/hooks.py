"""MkDocs hook: the reference pages generated from the code, never written by hand.

A page holding one of the markers below gets it replaced at build time:

- ``<!-- api -->``: a ``::: sgn_lab.<name>`` block (rendered by mkdocstrings from the
  docstrings) for every name in ``sgn_lab.__all__``;
- ``<!-- cli -->``: each command's ``--help`` text, from the click commands of ``sgn-lab``;
- ``<!-- config -->``: every key of the run configuration, from its pydantic schema: section,
  key, type, default and description.
"""

from __future__ import annotations

import typing


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- api -->" in markdown:
        markdown = markdown.replace("<!-- api -->", api_reference())
    if "<!-- cli -->" in markdown:
        markdown = markdown.replace("<!-- cli -->", cli_reference())
    if "<!-- config -->" in markdown:
        markdown = markdown.replace("<!-- config -->", config_reference())
    return markdown


def api_reference() -> str:
    import sgn_lab

    return "\n\n".join(f"::: sgn_lab.{name}" for name in sorted(sgn_lab.__all__))


def cli_reference() -> str:
    import click
    import typer

    from sgn_lab.cli.app import app

    group = typer.main.get_command(app)
    parts = []
    with click.Context(group, info_name="sgn-lab", terminal_width=100) as root:
        parts.append(f"```text\n{group.get_help(root)}\n```")
        for name in group.list_commands(root):
            command = group.get_command(root, name)
            with click.Context(command, info_name=name, parent=root,
                               terminal_width=100) as context:
                parts.append(f"## sgn-lab {name}\n\n```text\n{command.get_help(context)}\n```")
    return "\n\n".join(parts)


def config_reference() -> str:
    from sgn_lab.run.config import SECTIONS

    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for section, model in SECTIONS.items():
        for key, field in model.model_fields.items():
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = repr(field.default_factory())
            else:
                default = repr(field.default)
            text = (field.description or "").replace("|", "\\|").replace("\n", " ")
            rows.append(f"| `{section}.{key}` | `{_type(field.annotation)}` | `{default}` | "
                        f"{text} |")
    return "\n".join(rows)


def _type(annotation) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return (text or str(annotation).replace("typing.", "")).replace("|", "\\|")
