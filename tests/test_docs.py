"""The repository carries its own documentation: every link in its Markdown
files resolves inside the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/API.md", "bench/README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("name", DOCS)
def test_every_relative_link_resolves_inside_the_repository(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    links = [link for link in LINK.findall(text) if not re.match(r"[a-z]+:", link)]
    for link in links:
        path = link.split("#", 1)[0]
        target = ((ROOT / name).parent / path).resolve() if path else ROOT / name
        assert target.is_relative_to(ROOT), f"{name} points outside the repository: {link}"
        assert target.exists(), f"{name} links to a missing file: {link}"
    assert "../shared" not in text


def test_the_api_reference_has_every_route():
    import eventstore
    text = (ROOT / "docs/API.md").read_text(encoding="utf-8")
    for method, pattern, _, _ in eventstore.ROUTES:
        path = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: "{" + {
            "event_id": "eventId", "program_id": "ProgramId", "member_id": "ProgramMemberId", "event_type": "EventType"}[m.group(1)] + "}",
            pattern).replace("\\.", ".")
        assert f"{method} {path}" in text, f"docs/API.md does not describe {method} {path}"
