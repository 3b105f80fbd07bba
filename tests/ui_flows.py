"""Browser steps shared by tests/test_ui_browser.py (UI served by the API) and
tests/test_nginx.py (the same UI through nginx): each step drives the page like a person,
checks what a person would see, and saves a screenshot under tests/artifacts/."""

from __future__ import annotations

from pathlib import Path

import httpx
from ui_stack import IngestedPhoto

# Waits for UI changes that follow one API call (the reranker on CPU takes well under 1 s).
UI_TIMEOUT_MS = 20_000
NOT_AN_IMAGE = b"this is plain text, not a photo\n" * 4

# Collects Content-Security-Policy violations on the page (registered before any script runs).
CSP_WATCH = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) =>
  window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


def open_ui(browser, base_url: str, *, width: int = 1280, height: int = 900):
    """A fresh page on the UI, with console errors and CSP violations recorded."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.problems = []
    page.on("pageerror", lambda error: page.problems.append(f"page error: {error}"))
    page.add_init_script(CSP_WATCH)
    page.goto(f"{base_url}/")
    page.wait_for_selector("body[data-ready='true']", timeout=UI_TIMEOUT_MS)
    return page


def csp_violations(page) -> list[str]:
    return page.evaluate("window.__cspViolations")


def text_search(page, query: str, *, limit: int) -> list[int]:
    """Type `query`, press Enter, wait for the grid; returns the shown image ids, best first."""
    page.click("#tab-text")
    page.click("#text-form summary")
    page.fill("#text-limit", str(limit))
    page.fill("#text-query", query)
    page.press("#text-query", "Enter")
    page.wait_for_selector("#image-results li img", timeout=UI_TIMEOUT_MS)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#image-results img')]"
        ".every((img) => img.complete && img.naturalWidth > 0)",
        timeout=UI_TIMEOUT_MS,
    )
    return [
        int(i)
        for i in page.eval_on_selector_all(
            "#image-results li", "cards => cards.map(c => c.dataset.imageId)"
        )
    ]


def set_range(page, selector: str, value: str) -> None:
    """Move a range input (a slider) to `value` as a user's drag would: value, then `input`."""
    page.eval_on_selector(
        selector,
        "(slider, value) => { slider.value = value; "
        "slider.dispatchEvent(new Event('input', { bubbles: true })); }",
        value,
    )


def check_text_search(page, api_url: str, photo: IngestedPhoto, shots: Path) -> None:
    """A held-out caption finds its photo: the grid shows the API's ranking and the photo loads."""
    query = photo.held_out_caption
    shown = text_search(page, query, limit=12)
    expected = httpx.post(
        f"{api_url}/v1/search/images", json={"text": query, "limit": 12, "explain": True}
    ).json()
    assert shown == [hit["id"] for hit in expected["results"]]
    assert photo.image_id in shown[:3], f"photo {photo.image_id} not in the top 3: {shown}"
    card = page.locator(f"#image-results li[data-image-id='{photo.image_id}'] img")
    assert card.evaluate("img => img.naturalWidth") > 0
    assert "photos found" in page.inner_text("#status")
    page.screenshot(path=str(shots / "text_search.png"), full_page=True)


def check_explanation(page, photo: IngestedPhoto, shots: Path) -> None:
    """The detail view draws region boxes and a heat map, and lists the query's words."""
    opener = page.locator(f"#image-results li[data-image-id='{photo.image_id}'] button")
    opener.click()
    page.wait_for_selector("#detail[open] #explain-boxes g.region rect", timeout=UI_TIMEOUT_MS)
    page.wait_for_function("() => document.getElementById('detail-image').complete")
    boxes = page.locator("#explain-boxes g.region")
    assert boxes.count() == 3
    assert page.locator("#explain-boxes rect").count() == 6  # outline + number tag each
    for i in range(3):
        width = float(boxes.nth(i).locator("rect").first.get_attribute("width"))
        assert width > 0
    heat_before = canvas_alpha(page)
    assert heat_before > 0, "the heat map canvas is empty"
    words = page.locator("#explain-words button").all_inner_texts()
    assert words[0] == "All words"
    assert "horses" in [w.lower() for w in words]
    assert page.locator("#explain-table tbody tr").count() == len(words) - 1
    page.screenshot(path=str(shots / "explanation.png"))

    page.locator("#explain-words button", has_text="horses").click()
    assert (
        page.locator("#explain-words button", has_text="horses").get_attribute("aria-pressed")
        == "true"
    )
    assert "horses" in page.inner_text("#explain-legend")
    assert canvas_alpha(page) != heat_before, "choosing a word did not redraw the heat map"
    page.screenshot(path=str(shots / "explanation_word.png"))

    page.keyboard.press("Escape")
    page.wait_for_function("() => !document.getElementById('detail').open")
    assert opener.evaluate("button => document.activeElement === button")


def canvas_alpha(page) -> int:
    """Sum of the alpha channel of the heat map canvas: 0 means nothing was drawn."""
    return page.eval_on_selector(
        "#explain-heat",
        """canvas => canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height)
             .data.filter((_, i) => i % 4 === 3).reduce((a, b) => a + b, 0)""",
    )


def check_photo_search(page, api_url: str, photo: IngestedPhoto, shots: Path) -> None:
    """Uploading a photo lists captions, best first, and the best one describes that photo."""
    page.click("#tab-photo")
    page.set_input_files("#photo-file", str(photo.path))
    page.wait_for_selector("#caption-results li", timeout=UI_TIMEOUT_MS)
    shown = page.locator("#caption-results .caption-text").all_inner_texts()
    expected = httpx.post(
        f"{api_url}/v1/search/captions",
        files={"file": (photo.path.name, photo.path.read_bytes(), "image/jpeg")},
        data={"limit": "10"},
    ).json()["results"]
    assert shown == [hit["text"] for hit in expected]
    assert expected[0]["image_id"] == photo.image_id
    assert shown[0] in photo.captions
    assert page.locator("#photo-preview").is_visible()
    page.screenshot(path=str(shots / "photo_search.png"), full_page=True)


def check_bad_upload(page, shots: Path) -> None:
    """A file that is not an image shows the API's reason in an alert, and no results."""
    page.click("#tab-photo")
    page.set_input_files(
        "#photo-file", {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": NOT_AN_IMAGE}
    )
    alert = page.locator("#photo-error[role='alert']")
    alert.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
    assert "Unsupported media type" in alert.inner_text()
    assert page.locator("#caption-results li").count() == 0
    page.screenshot(path=str(shots / "bad_upload.png"))
