"""Write the config reference (every section and field of ovr_train/config.py, its default and its docstring) as
markdown, from the dataclasses' attribute docstrings, so the README's reference cannot drift from the code.

    python tools/config_reference.py              # print the markdown
    python tools/config_reference.py --readme README.md   # replace the README's config-reference section
    python tools/config_reference.py --check README.md    # exit 1 when the README's section is out of date
"""

import argparse
import ast
import dataclasses
import itertools
import re
import sys
from pathlib import Path

from ovr_train import config as C

START, END = "<!-- config:start -->", "<!-- config:end -->"


def _field_docs(cls) -> dict:
    """{field name: docstring} from the string literal that follows each annotated field in the class body."""
    tree = ast.parse(Path(C.__file__).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    docs, body = {}, node.body
    for prev, cur in itertools.pairwise(body):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) and isinstance(cur, ast.Expr)
                and isinstance(cur.value, ast.Constant) and isinstance(cur.value.value, str)):
            docs[prev.target.id] = " ".join(cur.value.value.split())
    return docs


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return f"`{value!r}`".replace("|", "\\|")


def sections() -> list:
    """[(section name, dataclass)] of `Config`, in order."""
    out = []
    for section in dataclasses.fields(C.Config):
        cls = section.type if isinstance(section.type, type) else getattr(C, str(section.type))
        if dataclasses.is_dataclass(cls):
            out.append((section.name, cls))
    return out


def undocumented() -> list:
    """`section.field` names that have no docstring."""
    return [f"{name}.{f.name}" for name, cls in sections() for f in dataclasses.fields(cls)
            if f.name not in _field_docs(cls)]


def reference() -> str:
    """Markdown: one table per section of `Config` (the `--section.field=value` names)."""
    out = []
    for name, cls in sections():
        docs = _field_docs(cls)
        out += [f"**`{name}`** ({cls.__name__}): {' '.join((cls.__doc__ or '').split())}", "",
                "| flag | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            meaning = docs.get(f.name, "").replace("|", "\\|")
            out.append(f"| `--{name}.{f.name}` | {_default(f)} | {meaning} |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", help="rewrite this README's config-reference section")
    p.add_argument("--check", help="exit 1 if this README's config-reference section differs from the code")
    a = p.parse_args(argv)
    table = reference()
    block = f"{START}\n{table}{END}"
    path = a.readme or a.check
    if path is None:
        sys.stdout.write(table)
        return 0
    text = Path(path).read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} section")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL)
    if a.check:
        if new != text:
            print(f"{path}: config reference is out of date; run python tools/config_reference.py --readme {path}")
            return 1
        return 0
    Path(path).write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
