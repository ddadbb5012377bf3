"""Every `docs/<page>.md#<anchor>` the code and the docs cite exists (a section can be cut by an
edit elsewhere; code comments cite docs/, so a dead anchor is a dead citation)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def anchors(page: Path) -> set[str]:
    text = page.read_text()
    ids = set(re.findall(r'<a id="([^"]+)"', text))
    for head in re.findall(r"^#+ (.+)$", text, re.M):            # GitHub's heading slugs
        ids.add(re.sub(r"[^\w\- ]", "", head.strip().lower()).replace(" ", "-"))
    return ids


def test_every_cited_docs_anchor_exists():
    cited = []
    files = [*ROOT.glob("cedm/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("docs/**/*.md"), ROOT / "README.md",
             *ROOT.glob("argo/*.yaml"), *ROOT.glob("k8s/**/*.yaml")]
    for f in files:
        for page, anchor in re.findall(r"(?:docs/)?((?:[\w-]+/)*[\w-]+\.md)#([\w-]+)", f.read_text()):
            base = f.parent if f.suffix == ".md" and not page.startswith("docs/") else ROOT / "docs"
            target = (base / page) if (base / page).exists() else ROOT / "docs" / page
            cited.append((f.relative_to(ROOT), page, anchor, target))
    assert len(cited) > 30
    missing = [(str(f), page, a) for f, page, a, t in cited if not t.exists() or a not in anchors(t)]
    assert not missing, missing
