"""The docs point at things that exist: every relative link (and its #heading), every repository path they name."""
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
