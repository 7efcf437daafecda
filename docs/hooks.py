"""MkDocs hook: the reference pages generated from the code, never written by hand.

A page holding one of the markers below gets it replaced at build time:

- ``<!-- api -->``: a ``::: sgn_lab.<name>`` block (rendered by mkdocstrings from the
  docstrings) for every name in ``sgn_lab.__all__``;
- ``<!-- cli -->``: each command's ``--help`` text, from the click commands of ``sgn-lab``;
- ``<!-- config -->``: every key of the run configuration, from its pydantic schema: section,
  key, type, default and description;
- ``<!-- errors -->``: every message the library raises to a user (the exceptions the command
  line turns into one ``error:`` line) and every warning it gives, read from the source by
  ``ast``, grouped by the package that raises it.
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- api -->" in markdown:
        markdown = markdown.replace("<!-- api -->", api_reference())
    if "<!-- cli -->" in markdown:
        markdown = markdown.replace("<!-- cli -->", cli_reference())
    if "<!-- config -->" in markdown:
        markdown = markdown.replace("<!-- config -->", config_reference())
    if "<!-- errors -->" in markdown:
        markdown = markdown.replace("<!-- errors -->", error_index())
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


AREAS = {  # the first folder under sgn_lab/ (or a module's name) -> its heading
    "cli": "The command line", "run": "Runs, run directories and the probe",
    "data": "Data and tasks", "models": "Models", "user.py": "Models and tasks of your own",
    "grads": "Per-sample gradients and the Gram path", "stats": "Statistics",
    "optim": "Optimizers", "distributed": "Several processes", "integrations": "Trainer callbacks",
    "plots": "Plots", "figures": "Paper figures", "sweeps": "Sweeps (sgn-lab scaling)",
    "theory": "Closed forms", "checks.py": "Argument checks (every function)",
}


def error_index() -> str:
    """Every user-facing message, as written in the source ({...}: a value filled in)."""
    paths = sorted([*ROOT.glob("sgn_lab/**/*.py"), *ROOT.glob("cli/*.py")])
    trees = {path: ast.parse(path.read_text()) for path in paths}
    errors = _user_errors(trees.values())
    found: dict[str, set[str]] = {}
    for path, tree in trees.items():
        parts = path.relative_to(ROOT).parts
        area = AREAS.get(parts[0] if parts[0] == "cli" else parts[1], "Other")
        constants = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                     for target in node.targets if isinstance(target, ast.Name)}
        for message in _messages(tree, constants, errors):
            found.setdefault(area, set()).add(message)
    order = [*dict.fromkeys(AREAS.values()), "Other"]
    sections = []
    for area in sorted(found, key=order.index):
        lines = "\n".join(sorted(found[area], key=str.lower))
        sections.append(f"### {area}\n\n```text\n{lines}\n```")
    return "\n\n".join(sections)


def _user_errors(trees) -> set[str]:
    """The names of the exceptions `sgn-lab` prints as one `error:` line: its INPUT_ERRORS
    and every class of ours derived from one of them (RunDirError, SampleMixingError, ...)."""
    from sgn_lab.cli.app import INPUT_ERRORS

    bases = {node.name: {ast.unparse(base).rsplit(".", 1)[-1] for base in node.bases}
             for tree in trees for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    names = {error.__name__ for error in INPUT_ERRORS}
    while more := {name for name, of in bases.items() if of & names} - names:
        names |= more
    return names


def _messages(tree: ast.AST, constants: dict[str, ast.expr], errors: set[str]):
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            func = node.exc.func
            if getattr(func, "id", getattr(func, "attr", None)) in errors:
                text = _text(node.exc.args[0], constants)
                if text:  # None: a message raised again (another rank's, pydantic's own)
                    yield text
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "warnings.warn":
            text = _text(node.args[0], constants)
            if text:
                yield f"warning: {text}"


def _text(node: ast.expr, constants: dict[str, ast.expr]) -> str | None:
    """The message a string expression builds: literal parts as written, values as {name}."""
    text = _raw(node, constants)
    return None if text is None else " ".join(text.split())


def _raw(node: ast.expr, constants: dict[str, ast.expr]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{" + _short(v.value) + "}"
                       for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _raw(node.left, constants), _raw(node.right, constants)
        return left + right if left is not None and right is not None else None
    if isinstance(node, ast.IfExp):
        body, orelse = _raw(node.body, constants), _raw(node.orelse, constants)
        return f"{body or ''} | {orelse or ''}" if body or orelse else None
    if isinstance(node, ast.Name) and node.id in constants:
        return _raw(constants[node.id], constants)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
            node.func.attr == "format":  # CONSTANT.format(name=...): the template
        return _raw(node.func.value, constants)
    return None


def _short(expr: ast.expr) -> str:
    text = ast.unparse(expr)
    return text if len(text) <= 24 else "…"
