"""The built book in a real browser: every page, at a desktop (1280 px) and a phone (390 px) width.

Serves ``_build/book/_build/html`` on 127.0.0.1 and drives headless Chromium (Debian's ``chromium`` and
``chromium-driver``) over every page, checking what a reader would hit:

* every ``<img>`` of the book loaded (``naturalWidth > 0``);
* nothing wider than the viewport: the page does not scroll sideways
  (``document.documentElement.scrollWidth <= clientWidth``) and no element is wider than the viewport unless it
  sits in a box that scrolls sideways (the issue's place for a wide table); lines of code in ``<pre>`` may scroll
  in their box. A failure
  names the outermost offending elements (tag, id, class, width, right edge, the section they are in);
* no JavaScript console error (level SEVERE), except failed requests to the known external hosts listed in
  ``OFFLINE_HOSTS`` (the browser is kept offline, see below);
* every internal link resolves to a built page, and its ``#anchor`` to an id on that page;
* every Colab link opens ``notebooks/NN_*.ipynb`` of the repository, a file in its git index;
* the landing page lists and counts exactly the papers' claims of the committed ``results/cpu/*/verdicts.json`` (one
  ``data-claim="<chapter>:<claim_id>"`` table row per claim, a repeated contrast once, no control as a finding);
* every figure of every chapter has a numbered caption and alt text, at twice the pixel density it is shown with;
* at 1280 px every table shows its first and last columns (none hidden behind a sideways scroll);
* no page speaks of how the book was made ("issue", "session");
* the library reference shows none of torch's inherited docstrings.

The browser never reaches another host: ``--host-resolver-rules`` makes every name but 127.0.0.1 unresolvable,
so the test behaves the same with and without internet and external links are only counted, never fetched.

A screenshot per page and width goes to ``_build/screenshots/``, and the counts (pages, images, links) to
``_build/screenshots/summary.json``.

Without Chromium or the built book the tests are skipped, saying how to get them; ``VMOE_REQUIRE_BROWSER=1``
(set by ``make test``, which builds the book first) turns those skips into failures.
"""

from __future__ import annotations

import functools
import http.server
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "book" / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
WIDTHS = {"desktop": (1280, 900), "phone": (390, 844)}
REQUIRE = os.environ.get("VMOE_REQUIRE_BROWSER") == "1"

# Hosts whose requests are expected to fail in the offline browser, and why each is allowed to.
# A console error is forgiven only when it is a failed network request (``net::ERR_...``) to one of these
# hosts; a JavaScript exception, a failed request to our own server or to any other host fails the test.
OFFLINE_HOSTS = {
    # The "Open in Colab" badge image at the top of each chapter notebook (its link is checked apart).
    "colab.research.google.com": "Colab badge image",
    # CDNs Jupyter Book v1 / sphinx-book-theme load scripts from when a page needs them
    # (MathJax for math, Thebe and require.js for live code); none of our own code lives there.
    "cdn.jsdelivr.net": "MathJax / Thebe CDN",
    "cdnjs.cloudflare.com": "require.js CDN",
    "unpkg.com": "Thebe / widgets CDN",
}

# First sentences of torch.nn.Module docstrings that leak into the reference when autodoc inherits docstrings.
TORCH_DOCSTRING_LEAKS = (
    "Should be overridden by all subclasses",
    "Define the computation performed at every call",
    "Return the extra representation of the module",
    "Initialize internal Module state",
)

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
    # Offline by construction: every host but the local server fails to resolve, at once.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)
INSTALL_HINT = ("install it with `apt-get install chromium chromium-driver` (Debian), or run "
                "scripts/setup_env.sh as root, which does; `pip install selenium` (the `test` extra)")


def _unavailable(message: str):
    """Skip, or fail under VMOE_REQUIRE_BROWSER=1 (CI, where the book and the browser must be there)."""
    if REQUIRE:
        pytest.fail(f"{message} (VMOE_REQUIRE_BROWSER=1 turns this skip into a failure)")
    pytest.skip(message)


def _pages() -> list[str]:
    """Every built page, as a path relative to the HTML root (the theme's ``_static`` templates excluded)."""
    return sorted(p.relative_to(HTML).as_posix() for p in HTML.rglob("*.html")
                  if not p.relative_to(HTML).parts[0].startswith("_"))


@pytest.fixture(scope="module")
def built_book() -> Path:
    if not (HTML / "index.html").exists():
        _unavailable(f"the book is not built ({HTML / 'index.html'} is missing): run "
                     "`python scripts/build_book.py` (or `make book`) first")
    return HTML


# --------------------------------------------------------------------------------------------- the browser


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture(scope="module")
def server(built_book):
    """The built HTML on 127.0.0.1, a free port, in a thread."""
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def _find_chromium() -> tuple[str | None, str | None]:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    return browser, shutil.which("chromedriver")


@pytest.fixture(scope="module")
def driver(built_book):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable(f"selenium is not installed: {INSTALL_HINT}")
    browser, chromedriver = _find_chromium()
    if browser is None or chromedriver is None:
        _unavailable(f"headless Chromium not found (browser: {browser}, chromedriver: {chromedriver}): {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="vmoe-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit chromedriver path: Selenium Manager would otherwise try to download one.
    drv = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


# What the page reports about itself, in one round trip after it has loaded.
_INSPECT_JS = r"""
const done = arguments[arguments.length - 1];
const deadline = Date.now() + 5000;
for (const img of document.images) img.loading = "eager";
function inspect() {
  const imgs = Array.from(document.images);
  if (imgs.some(i => !i.complete) && Date.now() < deadline) { setTimeout(inspect, 50); return; }
  const doc = document.documentElement;
  const vw = doc.clientWidth;
  const clips = el => {  // an ancestor that scrolls or clips overflow contains the element
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      if (["auto", "scroll", "hidden", "clip"].includes(getComputedStyle(a).overflowX)) return true;
    }
    return false;
  };
  const scrolls = el => {  // inside a box that scrolls sideways: the issue's place for a wide table
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      if (["auto", "scroll"].includes(getComputedStyle(a).overflowX)) return true;
    }
    return false;
  };
  const block = el => {  // an inline element is reported by the block it sits in
    while (el.parentElement && el.parentElement !== document.body && getComputedStyle(el).display.startsWith("inline"))
      el = el.parentElement;
    return el;
  };
  // Wider than the viewport outside a box that scrolls sideways (a wide table belongs in such a box),
  // or sticking out past its right edge so that the page itself scrolls. Lines of code inside <pre>
  // scroll in their own box by design and are not counted; a <pre> itself is.
  const found = new Map();
  for (const el of document.body.querySelectorAll("*")) {
    if (el.tagName !== "PRE" && el.closest("pre")) continue;
    const r = el.getBoundingClientRect();
    if (r.width === 0) continue;
    const style = getComputedStyle(el);
    if (style.position === "fixed" || style.visibility === "hidden") continue;
    if (r.width > vw + 0.5 && !scrolls(el)) found.set(el, {why: "wider than the viewport", right: r.right});
    else if (r.right > vw + 0.5 && !clips(el)) {
      const b = block(el), seen = found.get(b);
      if (!seen) found.set(b, {why: b === el ? "sticks out on the right" : "its text sticks out on the right", right: r.right});
      else seen.right = Math.max(seen.right, r.right);
    }
  }
  const offenders = [];
  for (const [el, {why, right}] of found) {
    let outer = false;
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) if (found.has(a)) { outer = true; break; }
    if (outer) continue;  // report the outermost element only
    const r = el.getBoundingClientRect(), section = el.closest("section[id], dl[id], dt[id]");
    offenders.push({why, tag: el.tagName.toLowerCase(), id: el.id, cls: el.className && String(el.className),
                    width: Math.round(Math.max(r.width, el.scrollWidth)), right: Math.round(right),
                    section: section ? section.id : "", text: (el.innerText || "").trim().slice(0, 60)});
  }
  done({
    url: location.href, title: document.title,
    viewport: vw, scrollWidth: doc.scrollWidth, offenders: offenders.slice(0, 25), offenderCount: offenders.length,
    images: imgs.map(i => ({src: i.currentSrc || i.src, natural: i.naturalWidth, complete: i.complete})),
    links: Array.from(document.querySelectorAll("a[href]"), a => ({href: a.href, raw: a.getAttribute("href")})),
    claims: Array.from(document.querySelectorAll("[data-claim]"),
                       e => ({claim: e.getAttribute("data-claim"), tag: e.tagName.toLowerCase(),
                              also: e.getAttribute("data-also") || ""})),
    counts: (document.querySelector(".vmoe-counts") || {innerText: ""}).innerText,
    figures: Array.from(document.querySelectorAll("article img"), i => {
      const fig = i.closest("figure"), cap = fig ? fig.querySelector("figcaption") : null;
      return {src: i.currentSrc || i.src, alt: i.getAttribute("alt") || "", natural: i.naturalWidth,
              shown: Math.round(i.getBoundingClientRect().width), caption: cap ? cap.innerText.trim() : null};
    }),
    tables: Array.from(document.querySelectorAll("article table"), t => {
      let box = t.parentElement;
      while (box && box !== document.body && !["auto", "scroll", "hidden"].includes(getComputedStyle(box).overflowX))
        box = box.parentElement;
      const view = box && box !== document.body ? box.getBoundingClientRect() : {left: 0, right: vw};
      let left = Infinity, right = -Infinity;
      for (const row of t.rows) {
        if (!row.cells.length) continue;
        left = Math.min(left, row.cells[0].getBoundingClientRect().left);
        right = Math.max(right, row.cells[row.cells.length - 1].getBoundingClientRect().right);
      }
      const head = t.rows.length ? Array.from(t.rows[0].cells, c => c.innerText.trim()).join(" | ") : "";
      return {left: Math.round(left), right: Math.round(right), viewLeft: Math.round(Math.max(view.left, 0)),
              viewRight: Math.round(Math.min(view.right, vw)), head: head.slice(0, 80),
              section: (t.closest("section[id]") || {id: ""}).id};
    }),
    article: (document.querySelector("article") || document.body).innerText,
    text: document.body.innerText,
  });
}
if (document.readyState === "complete") inspect(); else addEventListener("load", inspect);
"""


@pytest.fixture(scope="module")
def crawl(driver, server, built_book):
    """Visit every page at both widths once; the tests below read what was seen."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("*.png"):
        old.unlink()
    driver.set_script_timeout(15)
    started = time.time()
    seen: dict[tuple[str, str], dict] = {}
    for width_name, (width, height) in WIDTHS.items():
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        for page in _pages():
            driver.get_log("browser")  # drop what an earlier page left
            driver.get(server + page)
            info = driver.execute_async_script(_INSPECT_JS)
            info["console"] = driver.get_log("browser")
            shot = SCREENSHOTS / f"{page.removesuffix('.html').replace('/', '__')}@{width}.png"
            driver.save_screenshot(str(shot))
            seen[page, width_name] = info
    crawl_seconds = time.time() - started
    yield seen
    # Counts for the closing note, written once every check below has read the crawl.
    images = {(p, i["src"]) for (p, _), info in seen.items() for i in info["images"]}
    links = {(p, l["href"]) for (p, _), info in seen.items() for l in info["links"]}
    summary = {
        "pages": len(_pages()), "widths": {k: v[0] for k, v in WIDTHS.items()},
        "page_loads": len(seen), "images": len(images),
        "images_local": sum(1 for _, s in images if _is_local(s, server)),
        "links": len(links), "links_internal": sum(1 for _, h in links if _is_local(h, server)),
        "links_external_not_fetched": sum(1 for _, h in links if h.startswith("http") and not _is_local(h, server)),
        "crawl_seconds": round(crawl_seconds, 1), "screenshots": len(list(SCREENSHOTS.glob("*.png"))),
        "overflow": {f"{p}@{WIDTHS[w][0]}": info["offenders"] for (p, w), info in seen.items() if info["offenders"]},
    }
    (SCREENSHOTS / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\nbook browser check:", json.dumps({k: v for k, v in summary.items() if k != "overflow"}))


def _is_local(url: str, server: str) -> bool:
    return url.startswith(server)


def _ids_of(path: Path) -> set[str]:
    """Every id (and legacy ``<a name>``) of a built page."""

    class Ids(HTMLParser):
        def __init__(self):
            super().__init__()
            self.ids: set[str] = set()

        def handle_starttag(self, tag, attrs):
            for key, value in attrs:
                if key == "id" or (tag == "a" and key == "name"):
                    self.ids.add(value)

    parser = Ids()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.ids


def _where(page: str, width_name: str) -> str:
    return f"{page} @{WIDTHS[width_name][0]}px"


# --------------------------------------------------------------------------------------------- the checks


def test_every_image_loads(crawl, server):
    broken = [f"{_where(p, w)}: {img['src']}" for (p, w), info in crawl.items() for img in info["images"]
              if _is_local(img["src"], server) and not img["natural"] > 0]
    assert not broken, "images that did not load (naturalWidth 0):\n  " + "\n  ".join(broken)


def test_nothing_wider_than_the_viewport(crawl):
    lines = []
    for (page, width_name), info in crawl.items():
        if info["scrollWidth"] <= info["viewport"] and not info["offenders"]:
            continue
        lines.append(f"{_where(page, width_name)}: page scrollWidth {info['scrollWidth']}, viewport {info['viewport']}, "
                     f"{info['offenderCount']} element(s) too wide" + (" (first 25)" if info["offenderCount"] > 25 else ""))
        for o in info["offenders"]:
            label = o["tag"] + (f"#{o['id']}" if o["id"] else "") + (f".{o['cls'].replace(' ', '.')}" if o["cls"] else "")
            where = f" in #{o['section']}" if o["section"] and o["section"] != o["id"] else ""
            lines.append(f"    {label}{where}: {o['why']}, width {o['width']}px, right edge {o['right']}px  ({o['text']!r})")
    assert not lines, "elements wider than the viewport:\n" + "\n".join(lines)


def _forgiven(entry: dict, server: str) -> bool:
    """A failed request (``net::ERR_...``) to one of OFFLINE_HOSTS, or the browser's own favicon probe.

    Chromium asks every site for ``/favicon.ico`` by itself when a page declares no icon (the book declares
    none), and logs the 404 as an error; no page of ours made that request. Nothing else is forgiven.
    """
    message = entry.get("message", "")
    if message.startswith(f"{server}favicon.ico - Failed to load resource: the server responded with a status of 404"):
        return True
    match = re.match(r"(https?://[^\s]+) - Failed to load resource: net::ERR_", message)
    return bool(match) and urlsplit(match.group(1)).hostname in OFFLINE_HOSTS


def test_no_console_errors(crawl, server):
    errors = [f"{_where(p, w)}: {e['message']}" for (p, w), info in crawl.items()
              for e in info["console"] if e.get("level") == "SEVERE" and not _forgiven(e, server)]
    assert not errors, "JavaScript console errors:\n  " + "\n  ".join(errors)


def test_internal_links_resolve(crawl, server, built_book):
    ids: dict[Path, set[str]] = {}
    broken = set()
    for (page, width_name), info in crawl.items():
        for link in info["links"]:
            href = link["href"]
            if not _is_local(href, server):
                continue  # external (never fetched), mailto:, javascript:
            url, fragment = urldefrag(href)
            rel = unquote(urlsplit(url).path).lstrip("/")
            target = built_book / rel
            if rel == "" or rel.endswith("/") or target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.add(f"{page}: {link['raw']} -> {rel or '/'} does not exist")
                continue
            if fragment and target.suffix == ".html":
                if target not in ids:
                    ids[target] = _ids_of(target)
                if unquote(fragment) not in ids[target]:
                    broken.add(f"{page}: {link['raw']} -> no id {fragment!r} on {target.relative_to(built_book)}")
    assert not broken, "internal links that do not resolve:\n  " + "\n  ".join(sorted(broken))


def _git_files(pattern: str) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "--", pattern], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot list the git index ({err}); these checks need a git checkout")
    return out.stdout.split()


def test_colab_links_open_committed_notebooks(crawl):
    committed = set(_git_files("notebooks/*.ipynb"))
    bad, found = set(), {}
    for (page, _), info in crawl.items():
        for link in info["links"]:
            parts = urlsplit(link["href"])
            if parts.hostname != "colab.research.google.com" or parts.path.startswith("/assets/"):
                continue
            match = re.search(r"/(notebooks/\d\d_[^/]+\.ipynb)$", parts.path)
            if not match or match.group(1) not in committed:
                bad.add(f"{page}: {link['href']}")
            found.setdefault(page, set()).add(link["href"])
    chapters = [p for p in _pages() if re.match(r"notebooks/\d\d_", p)]
    without = [p for p in chapters if p not in found]
    assert chapters, "no chapter page in the built book"
    assert not without, f"chapter pages without a Colab link: {without}"
    assert not bad, "Colab links that do not open a notebook of the git index:\n  " + "\n  ".join(sorted(bad))


def _papers_claims_of_record() -> list:
    """The papers' claims (:func:`vmoe_lib.book.findings`) of the committed ``results/cpu/*/verdicts.json``."""
    from vmoe_lib.book import findings, scoreboard

    files = _git_files("results/cpu/*/verdicts.json")
    assert files, "no committed results/cpu/*/verdicts.json"
    return findings(scoreboard("cpu", root=ROOT / "results"))


def test_landing_counts_equal_the_papers_claims_of_record(crawl):
    """The landing page lists each claim of the papers once (one table row each, a repeated contrast as one row),
    no positive control as a finding, and counts exactly those claims by verdict."""
    from collections import Counter

    items = _papers_claims_of_record()
    expected = [f.row.key for f in items]
    counts = Counter(f.row.verdict for f in items)
    for width_name in WIDTHS:
        info = crawl["book/intro.html", width_name]
        rows = info["claims"]
        problems = []
        if [r["claim"] for r in rows] != expected:
            problems.append(f"rows {[r['claim'] for r in rows]} are not the papers' claims of record {expected}")
        if any(r["tag"] != "tr" for r in rows):
            problems.append("data-claim on elements that are not table rows")
        wanted = f"{len(items)} claims of the papers: " + " ".join(
            f"{counts.get(v, 0)} {v}" for v in ("reproduced", "not reproduced", "inconclusive", "not testable"))
        if " ".join(info["counts"].split()) != wanted:
            problems.append(f"counts read {info['counts']!r}, not {wanted!r}")
        also = {key for f in items for key in (x.key for x in f.also)}
        if also != {k for r in rows for k in r["also"].split()}:
            problems.append("the repeated contrasts are not listed in the rows of the claims they repeat")
        assert not problems, f"book/intro.html @{WIDTHS[width_name][0]}px: " + "; ".join(problems)


def _chapter_pages() -> list[str]:
    return [p for p in _pages() if re.match(r"notebooks/\d\d_", p)] + ["book/intro.html"]


def test_every_figure_has_a_numbered_caption_and_alt_text(crawl):
    """Every figure of every chapter (and of the landing page): a numbered caption under it and alt text that says
    what it shows (not a file name)."""
    bad = []
    for page in _chapter_pages():
        for fig in crawl[page, "desktop"]["figures"]:
            name = fig["src"].rsplit("/", 1)[-1]
            if not (fig["caption"] or "").startswith("Fig. "):
                bad.append(f"{page}: {name}: no numbered caption (found {fig['caption']!r})")
            if len(fig["alt"]) < 20 or re.search(r"\.(png|svg|jpg)\b|_build|/", fig["alt"]):
                bad.append(f"{page}: {name}: alt text {fig['alt']!r} does not say what the figure shows")
    assert not bad, "\n".join(bad)


def test_figures_are_drawn_at_twice_the_pixel_density(crawl):
    """Sharp on HiDPI screens: every figure's image has at least 1.9 times the pixels it is shown with at 1280 px."""
    soft = [f"{page}: {fig['src'].rsplit('/', 1)[-1]}: {fig['natural']} px shown at {fig['shown']} px"
            for page in _chapter_pages() for fig in crawl[page, "desktop"]["figures"]
            if fig["shown"] > 0 and fig["natural"] < 1.9 * fig["shown"]]
    assert not soft, "figures below 2x pixel density:\n  " + "\n  ".join(soft)


def test_tables_show_their_first_and_last_columns_at_desktop_width(crawl):
    """At 1280 px a reader sees every table whole: no first or last column hidden behind a sideways scroll."""
    hidden = [f"{page} #{t['section']}: table [{t['head']}] spans {t['left']}-{t['right']} px, visible "
              f"{t['viewLeft']}-{t['viewRight']} px"
              for (page, width), info in crawl.items() if width == "desktop" for t in info["tables"]
              if t["right"] > t["viewRight"] + 1 or t["left"] < t["viewLeft"] - 1]
    assert not hidden, "tables with a column out of view at 1280 px:\n  " + "\n  ".join(hidden)


# Words about how the book was made, not about what it found ("the issue that asked for this chapter").
PROCESS_WORDS = re.compile(r"\b(issues?|sessions?)\b", re.I)


def test_pages_speak_of_the_project_not_of_how_it_was_made(crawl):
    found = []
    for (page, width), info in crawl.items():
        if width != "desktop":
            continue
        for match in PROCESS_WORDS.finditer(info["article"]):
            found.append(f"{page}: ...{info['article'][max(0, match.start() - 60):match.end() + 40]!r}...")
    assert not found, "page text about how the book was made:\n  " + "\n  ".join(found)


def test_library_shows_no_inherited_torch_docstrings(built_book):
    """``autodoc_inherit_docstrings: False``: a method without a docstring of ours shows none, not torch's."""
    pages = sorted((built_book / "book" / "library").glob("*.html"))
    assert len(pages) > 20, "the library reference has one page per public module"
    leaks = []
    for page in pages:
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8")))
        leaks += [f"{page.name}: {phrase}" for phrase in TORCH_DOCSTRING_LEAKS if phrase in text]
    assert not leaks, f"the library reference shows torch's docstrings: {leaks}"


# What a rendered page must never show: a Python warning in a cell's output, the build machine's paths,
# progress-bar residue, or papermill's raw injected-parameters cell.
OUTPUT_RESIDUE = {
    "a Python warning": re.compile(r"\b\w*Warning: "),
    "a local path": re.compile(r"(?<![\w.])/(?:work|root|home|tmp)/[\w.-]+/"),
    "progress-bar residue": re.compile(r"\d+it/s\]|\d+%\|"),
    "papermill's parameters cell": re.compile(r"injected-parameters|# Parameters\b"),
}


def test_rendered_pages_show_no_warnings_paths_or_residue(built_book):
    """Chapters are rendered clean: the checks the issue lists, on the text of every built page."""
    problems = []
    for page in _pages():
        text = (built_book / page).read_text(encoding="utf-8")
        text = re.sub(r"<script\b.*?</script>|<style\b.*?</style>", " ", text, flags=re.S)
        text = html.unescape(re.sub(r"<[^>]+>", "", text))
        for what, pattern in OUTPUT_RESIDUE.items():
            match = pattern.search(text)
            if match:
                problems.append(f"{page}: {what}: ...{text[max(0, match.start() - 60):match.end() + 40]!r}...")
    assert not problems, "\n".join(problems)
