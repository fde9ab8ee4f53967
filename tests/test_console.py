"""The web console (/console) in a real headless browser: the system's Chromium, driven
by Playwright, against real servers running the default model. Set
DEEPSERVE_SCREENSHOTS=docs/figures to refresh the README's screenshots."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from server_utils import ServerProcess

ADMIN = "console-admin-" + "y" * 20
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed "
                                "(make test installs Debian's chromium)")


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("console")
    s = ServerProcess("--ledger", str(d / "ledger.db"), "--admin-key", ADMIN, "--no-warmup",
                      "--max-num-seqs", "8", log_dir=d)
    yield s
    s.stop()


def shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("DEEPSERVE_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def open_console(browser, url: str, key: str | None):
    page = browser.new_page(viewport={"width": 1280, "height": 760})
    page.goto(f"{url}/console")  # redirected to /console/
    page.wait_for_function("document.getElementById('who').textContent !== 'checking…'")
    if key:
        page.evaluate("document.getElementById('who').textContent = 'checking…'")
        page.fill("#api-key", key)
        page.click("#key-form button")
        page.wait_for_function("document.getElementById('who').textContent !== 'checking…'")
    return page


def chat(page, text: str) -> tuple[str, str]:
    """Send a message; its answer must be seen mid-stream, then finished. Every change to
    the page is watched (a MutationObserver), not sampled: a short answer from a fast
    server can start and finish between two animation frames of a busy browser."""
    before = page.locator(".msg.assistant").count()
    page.evaluate("""n => {
        window.midStream = false;
        new MutationObserver(() => {
            const m = document.querySelectorAll('.msg.assistant')[n];
            const t = m && m.querySelector('.text'), s = m && m.querySelector('.stats');
            if (t && s && t.textContent.length > 0 && s.textContent === '')
                window.midStream = true;
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""", before)
    page.fill("#pg-max-tokens", "48")
    page.fill("#pg-input", text)
    page.click("#pg-send")
    answer = page.locator(".msg.assistant").nth(before)
    page.wait_for_function("""n => { const m = document.querySelectorAll('.msg.assistant')[n];
        return m && m.querySelector('.stats').textContent.includes('cost'); }""", arg=before,
                           timeout=60000)
    # streamed: some text was on the page while the answer's figures were not yet
    assert page.evaluate("window.midStream"), answer.text_content()
    return answer.locator(".text").text_content(), answer.locator(".stats").text_content()


def test_admin_chats_creates_and_revokes_a_key_and_a_tenant_sees_its_usage(
        browser, server, tmp_path):
    out = shots(tmp_path)
    page = open_console(browser, server.url, ADMIN)
    assert page.text_content("#who").startswith("admin")
    text, stats = chat(page, "Write one sentence about the sea.")
    assert text.strip()
    for figure in ("TTFT", "tokens/s", "cached", "cost"):
        assert figure in stats, stats
    page.screenshot(path=str(out / "console-playground.png"))

    page.click("nav button[data-tab=keys]")
    page.fill("#key-create input[name=id]", "browser-tenant")
    page.fill("#key-create input[name=team]", "web")
    page.fill("#key-create input[name=budget]", "2")
    page.click("#key-create button[type=submit]")
    page.wait_for_selector("#new-secret")
    secret = page.text_content("#new-secret")
    assert secret.startswith("sk-ds-")
    row = page.locator("tr[data-key=browser-tenant]")
    row.wait_for()
    assert "active" in row.text_content() and "web" in row.text_content()
    page.screenshot(path=str(out / "console-keys.png"))

    # the new key, in a second browser tab: a tenant's view (no admin pages), its usage
    tenant = open_console(browser, server.url, secret)
    assert "browser-tenant" in tenant.text_content("#who")
    assert tenant.locator("nav button[data-tab=keys]").is_hidden()
    chat(tenant, "Hello!")
    tenant.click("nav button[data-tab=usage]")
    tenant.wait_for_function("document.querySelectorAll('#usage-table tbody tr').length > 0")
    assert "remaining budget" in tenant.text_content("#usage-summary")
    cells = tenant.locator("#usage-table tbody tr").last.locator("td").all_text_contents()
    assert cells[1] == "1"  # its own one request, not the admin's
    tenant.screenshot(path=str(out / "console-usage.png"))

    # back as admin: spend per key, the margin report, live stats; then revoke the key
    for tab, shown in (
            ("spend", "document.querySelector('#spend-table').textContent"
                      ".includes('browser-tenant')"),
            ("report", "document.querySelectorAll('#report-cards .card').length > 3"),
            ("live", "document.querySelector('#live-cards').textContent"
                     ".includes('KV cache')")):
        page.click(f"nav button[data-tab={tab}]")
        page.wait_for_function(shown)
        page.screenshot(path=str(out / f"console-{tab}.png"))
    assert "margin" in page.text_content("#report-cards")
    page.click("nav button[data-tab=keys]")
    row = page.locator("tr[data-key=browser-tenant]")
    row.get_by_role("button", name="Revoke").click()
    page.wait_for_function("document.querySelector('tr[data-key=browser-tenant]')"
                           ".textContent.includes('revoked')")
    r = httpx.post(f"{server.url}/v1/completions", timeout=30, json={
        "prompt": "Hi", "max_tokens": 1}, headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert page.text_content("#error") == ""


def test_with_keys_off_the_console_is_a_playground(browser, tmp_path):
    local = ServerProcess("--no-warmup", "--max-num-seqs", "4", log_dir=tmp_path)
    try:
        page = open_console(browser, local.url, None)
        assert "local mode" in page.text_content("#who")
        for tab in ("usage", "keys", "spend", "report", "live"):
            assert page.locator(f"nav button[data-tab={tab}]").is_hidden()
        page.uncheck("#pg-stream")
        page.fill("#pg-input", "Hi")
        page.click("#pg-send")
        page.wait_for_function("document.querySelector('.msg.assistant .stats')"
                               ".textContent.includes('output tokens')", timeout=60000)
        assert page.locator(".msg.assistant .text").text_content().strip()
    finally:
        local.stop()
