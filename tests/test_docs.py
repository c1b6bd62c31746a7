"""The repository carries its own documentation: every link in its Markdown
files resolves inside the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/API.md", "docs/DESIGN.md", "bench/README.md"]
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


def test_code_and_schema_cite_only_documents_in_the_repository():
    """The design notes the code points to live in docs/ (the study that chose
    PostgreSQL's feed ordering was once cited from outside the repository)."""
    sources = [*ROOT.glob("*.py"), *ROOT.glob("*.sql"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py")]
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for name in re.findall(r"\b([\w./-]+\.md)\b", text):
            assert (ROOT / name).exists(), f"{path.name} cites {name}, which is not in the repository"


def test_the_readme_reads_in_ten_minutes():
    """The README is the way in, not the reference (docs/API.md is): it stays short
    as features come (subscriptions, webhooks, schemas, metrics each get a few lines)."""
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) < 300


def test_the_api_reference_has_every_route():
    import eventstore
    text = (ROOT / "docs/API.md").read_text(encoding="utf-8")
    for method, pattern, *_ in eventstore.ROUTES:
        path = eventstore.route_template(pattern)
        assert f"{method} {path}" in text, f"docs/API.md does not describe {method} {path}"


def test_the_readme_curl_session_works_as_pasted_on_another_port_and_database(tmp_path):
    """The README's session, as a reader runs it against `make run PORT=... DB=...`:
    the key pasted into its first line, the port and database into its second."""
    import subprocess
    from helpers import require_tool
    from server import Server
    require_tool("curl")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = re.search(r"## A session with curl\n.*?```sh\n(.*?)```", text, re.S).group(1).splitlines()
    assert lines[0].startswith("ADMIN_KEY='esk_...'") and lines[1].startswith("PORT=8080 DB=")
    server = Server(tmp_path / "other.db")
    try:
        script = [f"ADMIN_KEY='{server.admin_key}'", f"PORT={server.port} DB={server.db_path}", *lines[2:]]
        result = subprocess.run(["bash", "-e", "-c", "\n".join(script)], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
    finally:
        server.stop()
    assert result.returncode == 0 and result.stderr == "", result.stderr
    out = result.stdout
    assert "HTTP/1.1 200 OK" in out and re.search(r'(?im)^etag: "1"\r?$', out)  # the PUT
    assert out.count('"EventId":"FOO-ABC123"') == 3  # read back, in the feed, in the subscription's page
    assert '"Description":"A learner completed a course."' in out and '{"ProgramId":"FOO","Events":1}' in out
    assert '"Name":"lms","Owner":"course-platform"' in out and '"HasMore":false,"Through":1}' in out
    assert '"Position":1,"Head":1,"Behind":0,' in out  # acknowledged
    assert not any("Traceback" in line or '" 500 ' in line for line in server.log)


def test_the_api_reference_s_health_example_has_the_schema_version_of_the_code():
    import eventstore_storage
    text = (ROOT / "docs/API.md").read_text(encoding="utf-8")
    assert f'"schemaVersion": {eventstore_storage.SCHEMA_VERSION},' in text

