"""The portal in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright, against a whole
local cluster of real processes (miaas.cluster.LocalCluster) and the real broker.

Each test is a story a person lives through in the portal. The tests save screenshots of the main pages into
docs/screenshots/, which the README shows.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from miaas.cluster import LocalCluster
from miaas.package import pack_model

try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
except ImportError:  # the dev extras install it; in CI a skip is a failure
    pytest.skip("Playwright is not installed: pip install -e '.[dev]'", allow_module_level=True)

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOTS = ROOT / "docs" / "screenshots"
SETOSA = [5.1, 3.5, 1.4, 0.2]
DEPLOY_TIMEOUT_MS = 300_000  # the first deployment builds the example's virtualenv from PyPI


@pytest.fixture(scope="module")
def cluster(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    state = tmp_path_factory.mktemp("browser-cluster")
    ports = {name: 0 for name in ("broker", "service-registry", "model-registry", "controller", "frontend")}
    c = LocalCluster(state_dir=state, bootstrap=broker, ports=ports, agents=[{"AGENT_EXTRA_LOAD_PERCENT": "40"}, {}])
    c.start(timeout=120)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_model(ROOT / "examples" / "iris", tmp_path_factory.mktemp("pkg") / "iris.zip")


@pytest.fixture
def context(chromium: Browser, cluster: LocalCluster) -> Iterator[BrowserContext]:
    ctx = chromium.new_context(base_url=cluster.url("frontend"), viewport={"width": 1280, "height": 860},
                               color_scheme="dark")
    ctx.set_default_timeout(20_000)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def shot(page: Page, name: str) -> None:
    """Save a screenshot of the page for the README."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def log_in(page: Page, username: str, password: str) -> None:
    page.goto("/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("button", name="Log out")).to_be_visible()


def upload(page: Page, name: str, package: Path) -> None:
    page.goto("/upload")
    page.get_by_label("Model name").fill(name)
    page.get_by_label("Model package (.zip)").set_input_files(str(package))
    page.get_by_role("button", name="Upload and validate").click()


def uploaded(page: Page, name: str, package: Path, version: int = 1) -> None:
    """Given: the package uploaded as `name`; the browser is on the model's page."""
    upload(page, name, package)
    expect(page.get_by_role("status").first).to_contain_text(f"Uploaded {name} version {version}")


def rezip(package: Path, target: Path, drop: str | None = None, add: dict[str, bytes] | None = None) -> Path:
    out = io.BytesIO()
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename != drop:
                dst.writestr(item, src.read(item))
        for name, data in (add or {}).items():
            dst.writestr(name, data)
    target.write_bytes(out.getvalue())
    return target


def csrf_post(page: Page, path: str, form: dict[str, str]) -> int:
    """POST a form from inside the page, with the page's CSRF token, as a script on the page could; its status."""
    status = page.evaluate(
        """async ([path, form]) => {
            const body = new URLSearchParams(form);
            body.set("csrf_token", document.querySelector("input[name=csrf_token]").value);
            const r = await fetch(path, {method: "POST", body, redirect: "manual"});
            return r.status;
        }""",
        [path, form],
    )
    return int(status)


# ---------------------------------------------------------------------------------------------------- stories


def test_sign_in_and_see_the_models(page: Page, cluster: LocalCluster) -> None:
    # given a visitor who is not logged in
    page.goto("/models")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    shot(page, "login")
    # when the admin logs in, then the models page opens
    log_in(page, "admin", cluster.admin_password)
    expect(page.get_by_role("heading", name="Models")).to_be_visible()


def test_a_wrong_password_is_refused(page: Page) -> None:
    page.goto("/login")
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill("not the password at all")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("Wrong username or password.")


def test_a_refused_package_is_shown_by_the_file_it_concerns(page: Page, cluster: LocalCluster, package: Path,
                                                             tmp_path: Path) -> None:
    log_in(page, "admin", cluster.admin_password)
    # when a package without requirements.txt is uploaded
    upload(page, "broken", rezip(package, tmp_path / "broken.zip", drop="requirements.txt"))
    # then the refusal is listed under that file, without leaving the page
    problems = page.locator("[data-problems]")
    expect(problems).to_be_visible()
    entry = problems.locator("li", has=page.locator("code", has_text="requirements.txt"))
    expect(entry).to_contain_text("missing required file: requirements.txt")
    expect(page).to_have_url(re.compile(r"/upload$"))
    shot(page, "upload-refused")


def test_upload_shows_a_real_progress_bar(page: Page, context: BrowserContext, cluster: LocalCluster,
                                          package: Path, tmp_path: Path) -> None:
    # given a 6 MiB package and a slow link (1.5 MiB/s up)
    big = rezip(package, tmp_path / "big.zip", add={"extra/padding.bin": os.urandom(6 << 20)})
    seen: list[str] = []
    context.expose_binding("reportProgress", lambda _source, text: seen.append(text))
    page.add_init_script("""
        document.addEventListener("DOMContentLoaded", () => {
            const out = document.querySelector("[data-progress-text]");
            if (out) new MutationObserver(() => window.reportProgress(out.textContent))
                .observe(out, {childList: true, characterData: true, subtree: true});
        });""")
    log_in(page, "admin", cluster.admin_password)
    cdp = context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                   "uploadThroughput": 1.5 * 1024 * 1024})
    # when it is uploaded
    page.goto("/upload")
    page.get_by_label("Model name").fill("iris-big")
    page.get_by_label("Model package (.zip)").set_input_files(str(big))
    page.get_by_role("button", name="Upload and validate").click()
    bar = page.get_by_role("progressbar", name="Upload progress")
    expect(bar).to_be_visible()
    page.wait_for_function("() => { const p = document.querySelector('progress');"
                           " return p.value > 0.3 * p.max && p.value < 0.9 * p.max; }", timeout=30_000)
    shot(page, "upload-progress")
    # then the bar counted the bytes sent of the total, and the model page opened
    expect(page.get_by_role("status").first).to_contain_text("Uploaded iris-big version 1", timeout=60_000)
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                   "uploadThroughput": -1})
    counts = [t for t in seen if " sent (" in t]
    assert len(counts) >= 3, seen
    assert any(re.search(r"MiB of 6\.\d MiB sent \((\d|[1-8]\d)%\)", t) for t in counts), counts
    assert counts[-1].endswith("sent (100%)"), counts


def test_files_viewer_and_editor_make_a_new_version(page: Page, cluster: LocalCluster, package: Path) -> None:
    log_in(page, "admin", cluster.admin_password)
    uploaded(page, "iris-edit", package)
    # when the files of version 1 are opened, then the tree and a highlighted app.py show
    page.get_by_role("link", name="Files of version 1").click()
    tree = page.get_by_role("navigation", name="Files")
    expect(tree.get_by_role("link", name="meta.json")).to_be_visible()
    tree.get_by_role("link", name="app.py").click()
    expect(page.locator(".hl .kn").first).to_have_text(re.compile("from|import"))
    shot(page, "files")

    # when app.py is broken in the editor, then the registry's refusal shows next to it and no version is made
    page.get_by_role("link", name="Edit", exact=True).click()
    app_py = page.get_by_label("Contents of app.py")
    app_py.fill(app_py.input_value() + "\ndef broken(:\n")
    page.get_by_role("button", name="Save as a new version").click()
    expect(page.get_by_role("alert").first).to_contain_text("Version 1 is unchanged")
    expect(page.locator("#problems-1")).to_contain_text("app.py")
    shot(page, "edit-refused")

    # when meta.json gets a new description instead, then it is saved as version 2
    page.get_by_label("Contents of app.py").fill(app_py.input_value().replace("\ndef broken(:\n", ""))
    meta = page.get_by_label("Contents of meta.json")
    changed = json.loads(meta.input_value())
    changed["description"] = "Edited in the browser"
    meta.fill(json.dumps(changed, indent=2))
    page.get_by_role("button", name="Save as a new version").click()
    expect(page.get_by_role("status").first).to_contain_text("Saved meta.json as version 2 of iris-edit")
    expect(page.get_by_role("cell", name="Edited in the browser")).to_be_visible()
    # and version 1 is untouched
    page.get_by_role("link", name="Files of version 1").click()
    page.get_by_role("navigation", name="Files").get_by_role("link", name="meta.json").click()
    expect(page.locator(".source")).not_to_contain_text("Edited in the browser")
    expect(page.locator(".source")).to_contain_text("softmax regression")


def test_deploy_turns_running_live_then_predict_and_stop(page: Page, cluster: LocalCluster, package: Path) -> None:
    log_in(page, "admin", cluster.admin_password)
    uploaded(page, "iris-web", package)
    # given an alias that names version 1
    page.get_by_label("Alias").fill("production")
    page.get_by_role("button", name="Set the alias").click()
    expect(page.get_by_role("status").first).to_contain_text("production now points at version 1")
    shot(page, "model")
    # when the alias is deployed
    page.get_by_role("button", name="Deploy alias production").click()
    expect(page.get_by_role("status").first).to_contain_text("Deploying iris-web version 1")
    page.evaluate("window.__samePage = true")
    # then the status turns running on this page, without a reload, and the URL becomes a link
    status = page.locator("section.facts [data-field=status]")
    expect(status).to_have_text("running", timeout=DEPLOY_TIMEOUT_MS)
    assert page.evaluate("window.__samePage === true"), "the page reloaded instead of updating live"
    link = page.locator("section.facts [data-field=url] a")
    expect(link).to_have_attribute("href", re.compile(r"^http://127\.0\.0\.1:\d+$"))
    # and the placement explains why: both agents were candidates, the loaded agent-1 lost to agent-2
    why = page.get_by_role("table", name="Candidates of the placement")
    expect(why.get_by_role("row", name=re.compile("agent-2.*chosen"))).to_be_visible()
    expect(why.get_by_role("row", name=re.compile("agent-1"))).to_be_visible()
    # and the logs follow what the agent writes
    expect(page.locator("[data-logs]")).to_contain_text(re.compile(r"\S"), timeout=30_000)
    shot(page, "deployment")

    # when the URL is opened, the model answers, and predicts
    url = link.get_attribute("href")
    assert url
    health = page.context.new_page()
    health.goto(f"{url}/health")
    expect(health.locator("body")).to_contain_text("iris-softmax")
    health.close()
    answer = page.request.post(f"{url}/predict", data={"features": SETOSA})
    assert answer.ok and answer.json()["predictions"] == ["setosa"]

    # when it is stopped, the status turns stopped and the URL stops answering
    page.get_by_role("button", name=re.compile("Stop deployment")).click()
    expect(page.locator("section.facts [data-field=status]")).to_have_text("stopped", timeout=60_000)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=5)
    page.goto("/deployments")
    shot(page, "deployments")


def test_agents_show_capacity_state_and_live_load(page: Page, cluster: LocalCluster) -> None:
    log_in(page, "admin", cluster.admin_password)
    page.goto("/agents")
    expect(page.get_by_role("link", name="agent-1")).to_be_visible()
    expect(page.get_by_role("link", name="agent-2")).to_be_visible()
    # the load lines fill in as metrics arrive (every 2 s here), without a reload
    expect(page.locator("svg.spark polyline").first).to_be_attached(timeout=30_000)
    shot(page, "agents")
    page.get_by_role("link", name="agent-1").click()
    expect(page.get_by_role("img", name=re.compile("CPU and memory: CPU \\d+%"))).to_be_visible()
    expect(page.locator("svg.chart polyline.line-cpu")).to_be_attached(timeout=30_000)
    shot(page, "agent")


def test_the_bus_page_reads_the_broker(page: Page, cluster: LocalCluster) -> None:
    log_in(page, "admin", cluster.admin_password)
    page.goto("/bus")
    topics = page.get_by_role("table", name="Topics")
    for topic in ("deployment-events", "system-metrics", "model-events"):
        expect(topics.get_by_role("cell", name=topic, exact=True)).to_be_visible()
    shot(page, "bus")


def test_an_invited_viewer_may_look_but_not_deploy(page: Page, chromium: Browser, cluster: LocalCluster,
                                                   package: Path) -> None:
    # given a model, and an invitation for a viewer made by the admin
    log_in(page, "admin", cluster.admin_password)
    uploaded(page, "iris-view", package)
    model_path = re.sub(r"^https?://[^/]+", "", page.url)
    page.goto("/users")
    page.get_by_label("Role", exact=True).select_option("viewer")
    page.get_by_role("button", name="Create an invitation link").click()
    link = page.locator("#invitation-link").inner_text()
    shot(page, "users")
    # when the invited person signs up
    guest_ctx = chromium.new_context(base_url=cluster.url("frontend"))
    try:
        guest = guest_ctx.new_page()
        guest.goto(link)
        expect(guest.get_by_text("You are invited")).to_be_visible()
        guest.get_by_label("Username").fill("vera")
        guest.get_by_label("Password", exact=True).fill("a viewer's long password")
        guest.get_by_label("Password again").fill("a viewer's long password")
        guest.get_by_role("button", name="Create the account").click()
        expect(guest.get_by_role("status").first).to_contain_text("Your role is viewer")
        # then she sees the model but no Deploy button, and a deploy she forges is refused
        guest.goto(model_path)
        expect(guest.get_by_role("heading", name="iris-view")).to_be_visible()
        expect(guest.get_by_role("button", name=re.compile("^Deploy"))).to_have_count(0)
        assert csrf_post(guest, f"{model_path}/deploy", {"version": "1"}) == 403
        # and the invitation cannot be used twice
        guest.goto(link)
        expect(guest.get_by_role("heading", name="Not Found")).to_be_visible()
    finally:
        guest_ctx.close()


def test_a_form_without_its_csrf_token_is_refused(page: Page, cluster: LocalCluster) -> None:
    log_in(page, "admin", cluster.admin_password)
    page.goto("/deployments")
    page.goto("/users")
    page.locator("form[action='/users/invitations'] input[name=csrf_token]").evaluate("el => el.remove()")
    page.get_by_role("button", name="Create an invitation link").click()
    expect(page.get_by_role("heading", name="Request refused")).to_be_visible()
    expect(page.get_by_text("CSRF token missing or invalid")).to_be_visible()
