"""The web UI in real headless Chromium against the real API (`camp-search serve`, shipped
default model, coco-mini photos ingested over HTTP). Screenshots: tests/artifacts/ui/."""

from __future__ import annotations

import httpx
import pytest
import ui_flows
from ui_stack import API_KEY, ARTIFACTS_DIR

pytestmark = pytest.mark.browser

HORSES = 4  # coco-mini photo 5: "A group of horses standing on top of a lush green hillside."
XSS_CAPTION = '<img src="x" onerror="window.__xss = 1"><b>bold</b> horses & "quotes"'


@pytest.fixture(scope="module")
def shots():
    folder = ARTIFACTS_DIR / "ui"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(chromium, ui_stack_api):
    server, _ = ui_stack_api
    page = ui_flows.open_ui(chromium, server.url)
    yield page
    assert page.problems == []
    assert ui_flows.csp_violations(page) == []
    page.close()


def test_text_search_shows_the_matching_photo(page, ui_stack_api, shots):
    server, photos = ui_stack_api
    ui_flows.check_text_search(page, server.url, photos[HORSES], shots)
    assert page.locator("#text-empty").is_hidden()
    assert "ms (" in page.inner_text("#text-timings")


def test_explanation_overlay_draws_and_escape_closes_it(page, ui_stack_api, shots):
    _, photos = ui_stack_api
    ui_flows.text_search(page, photos[HORSES].held_out_caption, limit=12)
    ui_flows.check_explanation(page, photos[HORSES], shots)


def test_match_cutoff_filters_on_the_probability_and_says_no_good_match(page, ui_stack_api, shots):
    server, photos = ui_stack_api
    query = photos[HORSES].held_out_caption
    ui_flows.text_search(page, query, limit=12)
    shown = page.eval_on_selector_all("#image-results .score", "s => s.map(n => n.textContent)")
    assert shown and all(text.endswith("% match") for text in shown), shown
    assert page.inner_text("#text-min-score-value") == "off"
    for cutoff in ("0.5", "0.95"):
        ui_flows.set_range(page, "#text-min-score", cutoff)
        assert page.inner_text("#text-min-score-value") == f"≥ {round(float(cutoff) * 100)}%"
        expected = httpx.post(
            f"{server.url}/v1/search/images",
            json={"text": query, "limit": 12, "explain": True, "min_score": float(cutoff)},
        ).json()
        with page.expect_response(lambda r: "/v1/search/images" in r.url) as answer:
            page.press("#text-query", "Enter")
        assert answer.value.request.post_data_json["min_score"] == float(cutoff)
        page.wait_for_function(
            "() => document.getElementById('text-form').getAttribute('aria-busy') === 'false'"
        )
        ids = page.eval_on_selector_all("#image-results li", "c => c.map(x => +x.dataset.imageId)")
        assert ids == [hit["id"] for hit in expected["results"]]
        assert all(hit["score"] >= float(cutoff) for hit in expected["results"])
        if not ids:  # nothing good enough: the page says so instead of showing wrong photos
            assert expected["no_match"] is True
            assert "no good match" in page.inner_text("#text-empty")
    page.screenshot(path=str(shots / "match_cutoff.png"), full_page=True)


def test_photo_upload_shows_its_captions(page, ui_stack_api, shots):
    server, photos = ui_stack_api
    ui_flows.check_photo_search(page, server.url, photos[HORSES], shots)


def test_bad_upload_shows_an_error(page, shots):
    ui_flows.check_bad_upload(page, shots)


def test_empty_query_is_refused_without_a_request(page, shots):
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.press("#text-query", "Enter")
    alert = page.locator("#text-error")
    assert alert.is_visible()
    assert "Type what the photo should show" in alert.inner_text()
    assert not [url for url in requests if "/v1/search" in url]
    # An over-long query reaches the API, whose 422 names the field.
    page.fill("#text-query", "horses " * 400)
    page.press("#text-query", "Enter")
    page.wait_for_function(
        "() => document.getElementById('text-error').textContent.includes('text')"
    )
    assert "422" in alert.inner_text() or "body.text" in alert.inner_text()
    page.screenshot(path=str(shots / "query_error.png"))


def test_api_text_is_shown_as_text_never_as_markup(page, ui_stack_api, shots):
    server, photos = ui_stack_api
    target = photos[HORSES + 1]
    added = httpx.post(
        f"{server.url}/v1/captions",
        json={"text": XSS_CAPTION, "image_id": target.image_id},
        headers={"X-API-Key": API_KEY},
    )
    assert added.status_code == 201, added.text
    try:
        page.click("#tab-photo")
        page.click("#photo-form summary")
        page.fill("#photo-limit", "100")
        page.set_input_files("#photo-file", str(target.path))
        page.wait_for_selector("#caption-results li")
        texts = page.locator("#caption-results .caption-text").all_inner_texts()
        assert XSS_CAPTION in texts
        assert page.locator("#caption-results img, #caption-results b").count() == 0
        assert page.evaluate("window.__xss") is None
    finally:
        httpx.delete(
            f"{server.url}/v1/captions/{added.json()['id']}", headers={"X-API-Key": API_KEY}
        )


def test_ingest_page_needs_the_key_and_stores_the_photo(page, ui_stack_api, shared_dir, shots):
    server, photos = ui_stack_api
    new_photo = sorted((shared_dir / "data" / "coco-mini" / "images").glob("*.jpg"))[-1]
    assert new_photo not in {p.path for p in photos}
    page.click("#tab-ingest")

    page.fill("#api-key", "wrong-key-0123456789abcdef")
    page.set_input_files("#ingest-files", str(new_photo))
    page.fill("#ingest-captions-0", "a photo added from the browser\nsecond caption")
    page.click("#ingest-submit")
    refused = page.locator("#ingest-error")
    refused.wait_for(state="visible")
    assert "401" in refused.inner_text() or "key" in refused.inner_text().lower()

    page.fill("#api-key", API_KEY)
    page.click("#ingest-submit")
    page.wait_for_selector("#ingest-log li.ok")
    line = page.inner_text("#ingest-log li.ok")
    assert "added as photo" in line and "(2 captions)" in line
    image_id = int(line.split("added as photo ")[1].split()[0])
    stored = httpx.get(f"{server.url}/v1/images/{image_id}").json()
    assert [c["text"] for c in stored["captions"]] == [
        "a photo added from the browser",
        "second caption",
    ]
    assert page.evaluate("sessionStorage.getItem('camp-search.api-key')") == API_KEY
    page.screenshot(path=str(shots / "ingest.png"), full_page=True)
    httpx.delete(f"{server.url}/v1/images/{image_id}", headers={"X-API-Key": API_KEY})


def test_keyboard_only_search_on_a_narrow_screen(chromium, ui_stack_api, shots):
    server, photos = ui_stack_api
    page = ui_flows.open_ui(chromium, server.url, width=390, height=844)
    try:
        # Tab order: skip link, then the tabs, then the query box.
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "skip-link"
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "tab-text"
        page.keyboard.press("ArrowRight")
        assert page.evaluate("document.activeElement.id") == "tab-photo"
        assert page.locator("#panel-photo").is_visible()
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "text-query"
        page.keyboard.type(photos[HORSES].held_out_caption)
        page.keyboard.press("Enter")
        page.wait_for_selector("#image-results li img")
        # Two photos per row, nothing wider than the screen.
        lefts = page.eval_on_selector_all(
            "#image-results li", "cards => cards.map(c => c.getBoundingClientRect().left)"
        )
        assert len(set(lefts)) == 2
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert page.inner_text("#health-text") == "Ready"
        page.screenshot(path=str(shots / "narrow.png"), full_page=True)
    finally:
        page.close()


PHONE = {"width": 360, "height": 740}


def test_phone_tab_bar_fits_and_counts_read_right(chromium, ui_stack_api, shots):
    """At a phone's width the three tabs fit without scrolling; counts of one say "1 photo" and
    "1 caption"; re-adding a stored photo with a new caption says it was added."""
    server, photos = ui_stack_api
    page = ui_flows.open_ui(chromium, server.url, **PHONE)
    added_caption_ids: list[int] = []
    try:
        bar = page.eval_on_selector(
            ".tabs", "bar => ({scroll: bar.scrollWidth, client: bar.clientWidth})"
        )
        assert bar["scroll"] <= bar["client"], bar
        for tab in ("#tab-text", "#tab-photo", "#tab-ingest"):
            box = page.locator(tab).bounding_box()
            assert box is not None and page.locator(tab).is_visible()
            assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (tab, box)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        page.screenshot(path=str(shots / "phone_tabs.png"))

        ui_flows.text_search(page, photos[HORSES].held_out_caption, limit=1)
        status = page.inner_text("#status")
        assert status.startswith("1 photo found for"), status

        page.click("#tab-photo")
        page.click("#photo-form summary")
        page.fill("#photo-limit", "1")
        page.set_input_files("#photo-file", str(photos[HORSES].path))
        page.wait_for_selector("#caption-results li")
        page.wait_for_function(
            "() => document.querySelector('#status').textContent.includes('found')"
        )
        assert page.inner_text("#status") == "1 caption found."
        assert page.locator("#caption-results li").count() == 1

        photo = photos[HORSES]
        page.click("#tab-ingest")
        page.fill("#api-key", API_KEY)
        page.set_input_files("#ingest-files", str(photo.path))
        page.fill("#ingest-captions-0", f"{photo.captions[0]}\na caption added from a phone")
        page.click("#ingest-submit")
        page.wait_for_selector("#ingest-log li.ok")
        line = page.inner_text("#ingest-log li.ok")
        stored = httpx.get(f"{server.url}/v1/images/{photo.image_id}").json()["captions"]
        added_caption_ids = [c["id"] for c in stored if c["text"] == "a caption added from a phone"]
        assert len(added_caption_ids) == 1
        assert f"already there as photo {photo.image_id}" in line
        assert f"({len(stored)} captions, 1 new)" in line, line
        assert page.inner_text("#status") == "1 photo stored, 0 refused."
        info = page.inner_text("#corpus-info")
        assert " photos, " in info and " captions · " in info
        page.screenshot(path=str(shots / "phone_ingest.png"), full_page=True)
        assert page.problems == [] and ui_flows.csp_violations(page) == []
    finally:
        for caption_id in added_caption_ids:
            httpx.delete(f"{server.url}/v1/captions/{caption_id}", headers={"X-API-Key": API_KEY})
        page.close()
