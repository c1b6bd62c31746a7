"""The console (docs/API.md §12): static files served with a strict policy, and
the page itself in a real browser (Debian's chromium, driven by Selenium through
Debian's chromedriver; nothing is downloaded): signing in, the live tail, an
event's JSON, the type chart, markup in the data shown as text and never run,
no request elsewhere, the key in no URL.

    python tests/test_console.py docs/console.png    # the README's picture, anew
    pngquant --force --output docs/console.png docs/console.png   # and small (Debian's pngquant)
"""

import base64
import json
import re
import sqlite3
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest
import webtest

from helpers import THREADED_HOST, require_tool  # first: it puts the project on sys.path

import eventstore  # noqa: E402
from server import ROOT, Server, event_body  # noqa: E402

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
FILES = {"/console": "index.html", "/console/console.js": "console.js", "/console/console.css": "console.css",
         "/console/icon.svg": "icon.svg"}


# --- the files ------------------------------------------------------------------------------

@pytest.fixture
def anonymous(tmp_path):
    app = eventstore.make_app(tmp_path / "console.db")
    yield webtest.TestApp(app, extra_environ=THREADED_HOST)
    app.close()


@pytest.mark.parametrize("path", FILES)
def test_the_console_files_need_no_credentials_and_carry_the_policy(anonymous, path):
    response = anonymous.get(path + "?cache-buster=1")
    assert response.body == (ROOT / "console" / FILES[path]).read_bytes()
    assert response.headers["Content-Security-Policy"] == CSP
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    expected = {"html": "text/html", "js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
    assert response.content_type == expected[FILES[path].rsplit(".", 1)[1]]


@pytest.mark.parametrize("path", ["/console/", "/console/..", "/console/nothing.js", "/console/../eventstore.py",
                                  "/console/index.html/x", "/console/%2e%2e%2fserve.py"])
def test_nothing_else_is_served_from_there(anonymous, path):
    assert anonymous.get(path, status=404).json["status"] == 404


def test_the_page_has_no_inline_script_or_style_and_names_no_other_site():
    page = (ROOT / "console" / "index.html").read_text(encoding="utf-8")
    assert re.findall(r"<script\b[^>]*>", page) == ['<script src="console/console.js" defer>']
    assert "<style" not in page and not re.search(r"\sstyle\s*=", page) and not re.search(r"\son\w+\s*=", page)
    for text in [page, *(path.read_text(encoding="utf-8") for path in (ROOT / "console").glob("*.[jc]s*"))]:
        assert not re.search(r"https?:|//[a-z]|@import|url\(", text.replace("http://www.w3.org/2000/svg", ""))


def test_the_script_puts_no_markup_from_data_in_the_page_and_keeps_the_key_in_the_tab():
    script = (ROOT / "console" / "console.js").read_text(encoding="utf-8")
    for never in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function(",
                  "localStorage", "document.cookie", "setAttribute(\"style"):
        assert never not in script, never
    assert "sessionStorage" in script and "credentials: \"omit\"" in script


# --- in a real browser ------------------------------------------------------------------------

def start_browser(profile):
    """Debian's chromium, headless, through its chromedriver (or skip, or fail in CI)."""
    chromium, chromedriver = require_tool("chromium"), require_tool("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        import os
        if os.environ.get("EVENTSTORE_REQUIRE_TOOLS"):
            pytest.fail("selenium is not installed (requirements-dev.txt)")
        pytest.skip("selenium is not installed (requirements-dev.txt)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860",
                     f"--user-data-dir={profile}", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-default-apps"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)


def wait(driver, seconds, condition, what):
    """A bounded wait for ``condition(driver)`` (a value, or false to go on waiting);
    an element the page has just drawn anew (the lists are redrawn as they refresh)
    is looked for again."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.05,
                             ignored_exceptions=[StaleElementReferenceException]).until(condition)
    except TimeoutException:
        pytest.fail(f"not within {seconds} s: {what}")


def css(selector):
    from selenium.webdriver.common.by import By

    def find(driver):
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        return found[0] if found and found[0].is_displayed() else None
    return find


BROWSER_PAGES = ("chrome:", "chrome-untrusted:", "about:", "devtools:")  # the browser's own, not the network


def requested_urls(driver):
    """Every URL requested since the last call (the performance log), and the
    document each was requested for, but the browser's own pages (its new tab)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            document = message["params"].get("documentURL", "")
            if not document.startswith(BROWSER_PAGES):
                urls += [message["params"]["request"]["url"], document]
    return urls


MARKUP_MEMBER = '<img src=x onerror="window.__marked=1;alert(1)">'
MARKUP_DATA = {"html": '<img src=x onerror="window.__marked=2;alert(2)">',
               "script": "<script>window.__marked=3;alert(3)</script>", "note": "a & b < c"}


@pytest.fixture
def served(tmp_path):
    server = Server(tmp_path / "browser.db").register("FOO")
    server.register("BAR")
    yield server
    server.stop()


def sign_in(driver, base, user, key):
    from selenium.webdriver.common.by import By
    driver.get(f"{base}/console")
    wait(driver, 10, css("#user-id"), "the sign-in form")
    driver.find_element(By.ID, "user-id").send_keys(user)
    driver.find_element(By.ID, "api-key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()


def test_the_console_in_a_real_browser(served, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    base, key = f"http://127.0.0.1:{served.port}", served.admin_key
    admin = {"user": "admin", "key": key}
    assert served.request("PUT", "/events/BAR-early", event_body("BAR", EventType="Enrolled"), **admin)[0] == 200
    assert served.request("PUT", "/subscriptions/nightly", {"Filter": {"ProgramId": ["FOO"]}}, **admin)[0] == 201
    hooked = {"Filter": {"ProgramId": ["FOO"]}, "Webhook": {"Url": "http://127.0.0.1:9/nobody-listens"}}
    assert served.request("PUT", "/subscriptions/hooked", hooked, **admin)[0] == 201
    profile = tmp_path / "profile"
    driver = start_browser(profile)
    try:
        # Wrong key: refused, nothing kept.
        sign_in(driver, base, "admin", "esk_" + "x" * 43)
        wait(driver, 10, lambda d: "Wrong user id or key" in d.find_element(By.ID, "sign-in-error").text,
             "the refusal")
        assert driver.execute_script("return sessionStorage.length") == 0
        sign_in(driver, base, "admin", key)
        wait(driver, 10, css('#programs tr[data-program="FOO"]'), "the programs")
        assert [row.text.split()[0] for row in driver.find_elements(By.CSS_SELECTOR, "#programs tbody tr")] == [
            "BAR", "FOO"]
        wait(driver, 10, css('#health dd[data-field="status"].ok'), "health ok")
        wait(driver, 10, lambda d: d.find_element(By.ID, "tail-status").get_attribute("data-state") == "live",
             "the live tail following")

        # A published event shows in the live tail (a long poll), and opens to its JSON.
        assert served.request("PUT", "/events/FOO-live-1", event_body("FOO"), **admin)[0] == 200
        item = wait(driver, 2, css('#tail li[data-event-id="FOO-live-1"]'), "the new event in the live tail")
        item.find_element(By.TAG_NAME, "summary").click()
        shown = wait(driver, 5, lambda d: item.find_element(By.TAG_NAME, "pre").is_displayed() and
                     item.find_element(By.TAG_NAME, "pre").text, "its JSON")
        assert json.loads(shown) == served.request("GET", "/events/FOO-live-1", **admin)[2]
        assert not driver.find_elements(By.CSS_SELECTOR, '#tail li[data-event-id="BAR-early"]')  # from now on

        # The type chart has its bar, as long as its count says (read at once: the chart is redrawn).
        bars = wait(driver, 10, lambda d: d.execute_script("""
            const row = document.querySelector('.type[data-type="CourseCompleted"] .bar-row[data-program="FOO"]');
            const other = document.querySelector('.type[data-type="Enrolled"] .bar-row[data-program="BAR"]');
            return row && other && [row.querySelector('.bar-count').textContent,
                row.querySelector('.bar').getBoundingClientRect().width,
                other.querySelector('.bar').getBoundingClientRect().width];"""), "the type chart's bars")
        assert bars[0] == "1" and bars[1] > 0 and bars[2] > 0

        # Markup in the data is shown as its characters and runs nothing.
        marked = event_body("FOO", ProgramMemberId=MARKUP_MEMBER, EventData=MARKUP_DATA)
        assert served.request("PUT", "/events/FOO-marked", marked, **admin)[0] == 200
        item = wait(driver, 5, css('#tail li[data-event-id="FOO-marked"]'), "the marked event in the live tail")
        assert MARKUP_MEMBER in item.find_element(By.TAG_NAME, "summary").text
        item.find_element(By.TAG_NAME, "summary").click()
        shown = wait(driver, 5, lambda d: item.find_element(By.TAG_NAME, "pre").text, "its JSON")
        assert json.loads(shown)["EventData"] == MARKUP_DATA and json.loads(shown)["ProgramMemberId"] == MARKUP_MEMBER
        time.sleep(0.3)  # what an image's error handler would have run by now
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text
        assert driver.execute_script("return window.__marked === undefined")
        assert driver.find_elements(By.CSS_SELECTOR, "main img, main script") == []

        # The subscription's lag: FOO's two events wait for it.
        def row(name, ready):
            """The cells of a subscription's row once ``ready(cells)``, read at once (the table is redrawn)."""
            return lambda d: (lambda cells: cells if cells and ready(cells) else None)(d.execute_script(
                "const row = document.querySelector(`#subscriptions tr[data-subscription='${arguments[0]}']`);"
                "return row && [...row.cells].map(cell => cell.textContent);", name))
        lag = wait(driver, 10, row("nightly", lambda cells: cells[3] == "2"), "the subscription's lag")
        assert lag[:3] == ["nightly", "admin", "0"] and lag[5] == "read by its consumer"
        hook = wait(driver, 20, row("hooked", lambda cells: cells[6]), "the webhook's last delivery error")
        assert hook[5] == "Active"

        # A filter: the tail starts again with only that program.
        driver.find_element(By.ID, "filter-program").send_keys("BAR")
        Select(driver.find_element(By.ID, "filter-from")).select_by_value("0")
        driver.find_element(By.CSS_SELECTOR, "#tail-filters button").click()
        wait(driver, 5, css('#tail li[data-event-id="BAR-early"]'), "BAR's event, from the beginning")
        assert not driver.find_elements(By.CSS_SELECTOR, '#tail li[data-event-id="FOO-live-1"]')

        driver.save_screenshot(str(tmp_path / "console.png"))

        # The tab keeps the key across a reload, in sessionStorage only; signing out forgets it.
        driver.refresh()
        wait(driver, 10, css('#programs tr[data-program="FOO"]'), "signed in after a reload")
        assert key in driver.execute_script("return sessionStorage.getItem('eventstore-console')")
        assert driver.execute_script("return localStorage.length") == 0
        driver.find_element(By.ID, "sign-out").click()
        wait(driver, 5, css("#sign-in-form"), "the sign-in form again")
        assert driver.execute_script("return sessionStorage.length") == 0
        assert not driver.find_elements(By.CSS_SELECTOR, "#tail li")

        urls = requested_urls(driver)
        assert urls and all(url.startswith(base + "/") for url in urls), [u for u in urls if not u.startswith(base)]
        token = base64.b64encode(f"admin:{key}".encode()).decode()
        assert not [url for url in urls if key in url or key in urllib.parse.unquote(url) or token in url]
        assert key not in driver.current_url
    finally:
        driver.quit()
    history = profile / "Default" / "History"
    if history.exists():  # the browser's own record of every URL visited
        conn = sqlite3.connect(history)
        visited = [row[0] for row in conn.execute("SELECT url FROM urls")]
        conn.close()
        assert visited and not [url for url in visited if key in urllib.parse.unquote(url)]


def screenshot(path):
    """The README's picture: the console over a registry with some events."""
    with tempfile.TemporaryDirectory() as folder:
        server = Server(Path(folder) / "picture.db").register("FOO")
        admin = {"user": "admin", "key": server.admin_key}
        try:
            for program in ("BAR", "LMS"):
                server.register(program)
            for name, programs in (("badge-mailer", ["LMS"]), ("warehouse", []), ("credits-sync", ["BAR"])):
                server.request("PUT", f"/subscriptions/{name}", {"Filter": {"ProgramId": programs}}, **admin)
            kinds = [("FOO", "CourseCompleted", 14), ("FOO", "CourseStarted", 23), ("BAR", "CourseCompleted", 6),
                     ("LMS", "BadgeEarned", 9), ("BAR", "CreditEarned", 4)]
            for program, kind, count in kinds:
                for n in range(count):
                    body = event_body(program, EventType=kind, ProgramMemberId=f"learner{n}@example.com",
                                      EventData={"course": f"CPR-{100 + n}", "score": 60 + n})
                    server.request("PUT", f"/events/{program}-{kind}-{n}", body, **admin)
            server.request("POST", "/subscriptions/credits-sync/ack", {"Through": 40}, **admin)
            driver = start_browser(Path(folder) / "profile")
            try:
                from selenium.webdriver.common.by import By
                from selenium.webdriver.support.ui import Select
                sign_in(driver, f"http://127.0.0.1:{server.port}", "admin", server.admin_key)
                wait(driver, 10, css('#programs tr[data-program="FOO"]'), "the programs")
                Select(driver.find_element(By.ID, "filter-from")).select_by_value("0")
                driver.find_element(By.CSS_SELECTOR, "#tail-filters button").click()
                item = wait(driver, 10, css('#tail li[data-event-id="BAR-CreditEarned-3"]'), "the tail")
                item.find_element(By.TAG_NAME, "summary").click()
                wait(driver, 10, css('.type[data-type="BadgeEarned"]'), "the chart")
                wait(driver, 10, css('#subscriptions tr[data-subscription="warehouse"]'), "the subscriptions")
                driver.set_window_size(1200, 1400)
                time.sleep(0.5)
                driver.save_screenshot(str(path))
            finally:
                driver.quit()
        finally:
            server.stop()


if __name__ == "__main__":
    screenshot(sys.argv[1])
