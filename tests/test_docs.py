"""The docs point at things that exist: every relative link (and its #heading), every repository path they name; and
so do the code's comments and docstrings."""
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = sorted([REPO / "README.md", REPO / "slurm" / "README.md", *(REPO / "docs").glob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")
# a repository path in prose, commands or code blocks (tools/x.py, configs/y.yaml ...); not a link's ../ path
PATH = re.compile(r"(?<![\w/.$-])((?:tools|configs|slurm|docs|tests|tokenformer_mp)/[\w./-]*\w)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in md.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_paths_exist(md):
    text, bad = md.read_text(), []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            bad.append(f"link {target}: no {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"link {target}: no heading #{anchor} in {dest.name}")
    for path in PATH.findall(text):
        if not (REPO / path).exists():
            bad.append(f"path {path}: not in the repository")
    assert not bad, f"{md.relative_to(REPO)}:\n  " + "\n  ".join(bad)


CODE = sorted(p for d in ("tokenformer_mp", "tools", "tests", "slurm") for p in (REPO / d).rglob("*")
              if p.suffix in (".py", ".sh", ".sbatch") and "__pycache__" not in p.parts)
# "docs/x.md" and "the README" style pointers in comments and docstrings; ../shared and run outputs are not ours
COMMENT_PATH = re.compile(r"(?<![\w/.$-])((?:tools|configs|slurm|docs|tokenformer_mp)/[\w./-]*\w)")


def _comments(path: Path) -> str:
    """What a reader follows: comments (# ...) and triple-quoted blocks (docstrings); paths a program builds are plain
    strings and not read."""
    text = path.read_text()
    return "\n".join(re.findall(r"#.*", text) + re.findall(r'"""(.*?)"""', text, re.S))


def test_paths_named_in_code_comments_exist():
    bad = [f"{p.relative_to(REPO)}: {path}" for p in CODE for path in COMMENT_PATH.findall(_comments(p))
           if not (REPO / path).exists() and not any(c in path for c in "*{")
           and len(Path(path).stem) > 1]  # tools/x.py, docs/X.md: placeholders in a description
    assert not bad, "comments name paths that are not in the repository:\n  " + "\n  ".join(bad)
