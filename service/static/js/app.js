// camp-search web UI: text -> photos, photo -> captions, a detail view that draws why a hit
// matched, an ingest page and a health badge. Plain ES modules; no build step, no network
// request outside this origin.

import * as api from "./api.js";
import { $, clear, el, formatScore, plural, show } from "./dom.js";
import { isExplanation, renderExplanation } from "./explain.js";

/** How often the health badge asks /readyz, in milliseconds. */
const HEALTH_POLL_MS = 15000;

const statusLine = $("status");

function announce(message) {
  statusLine.textContent = message;
}

function showError(box, error) {
  const message = error instanceof api.ApiError ? error.describe() : String(error?.message ?? error);
  box.textContent = message;
  show(box, true);
  announce(""); // the alert itself is announced (role="alert")
}

function hideError(box) {
  box.textContent = "";
  show(box, false);
}

function setBusy(form, busy) {
  form.setAttribute("aria-busy", String(busy));
  for (const button of form.querySelectorAll("button[type=submit]")) {
    if (busy) button.dataset.wasDisabled = String(button.disabled);
    button.disabled = busy || button.dataset.wasDisabled === "true";
    if (!busy) delete button.dataset.wasDisabled;
  }
}

function showTimings(node, timings) {
  if (!timings) return show(node, false);
  const stages = ["encode", "shortlist", "features", "rerank"]
    .filter((stage) => typeof timings[stage] === "number" && timings[stage] > 0)
    .map((stage) => `${stage} ${timings[stage].toFixed(1)}`);
  node.textContent = `${timings.total?.toFixed(1) ?? "?"} ms (${stages.join(", ") || "no stages"})`;
  show(node, true);
}

function numberField(input) {
  const value = input.value.trim();
  return value === "" ? null : Number(value);
}

function searchOptions(prefix) {
  const options = {
    limit: numberField($(`${prefix}-limit`)) ?? 10,
    candidates: numberField($(`${prefix}-candidates`)) ?? 100,
    rerank: $(`${prefix}-rerank`).checked,
    explain: $(`${prefix}-explain`).checked,
  };
  const cutoff = cutoffValue(prefix);
  if (cutoff !== null) options.min_score = cutoff;
  return options;
}

// --- scores: a match probability when the model is calibrated --------------------------------

/** What the scores of the last answer mean: "match_probability" or "raw" (see /v1/info). */
let scoreKind = "match_probability";

/** The cut-off slider's value, or null when it is at 0 ("off": every candidate is shown). */
function cutoffValue(prefix) {
  const slider = document.getElementById(`${prefix}-min-score`);
  const value = slider ? Number(slider.value) : 0;
  return value > 0 ? value : null;
}

function showCutoff(prefix) {
  const value = cutoffValue(prefix);
  const label = value === null ? "off" : scoreKind === "raw" ? `≥ ${value.toFixed(2)}` : `≥ ${Math.round(value * 100)}%`;
  $(`${prefix}-min-score-value`).textContent = label;
}

for (const prefix of ["text", "photo"]) {
  $(`${prefix}-min-score`).addEventListener("input", () => showCutoff(prefix));
}

/** A hit's score as people read it: "87% match" for a probability, else the raw number. */
function formatHitScore(score, kind = scoreKind) {
  if (kind !== "match_probability" || typeof score !== "number") return formatScore(score);
  const percent = score * 100;
  return `${percent < 1 ? percent.toFixed(1) : Math.round(percent)}% match`;
}

/** The empty-result text: the API's "no good match" message when the cut-off removed all. */
function emptyText(response, fallback) {
  return response.no_match && response.message ? `${response.message}. Lower the match cut-off to see weaker matches.` : fallback;
}

// --- tabs ---------------------------------------------------------------------------------

const tabs = [...document.querySelectorAll('[role="tab"]')];

function activateTab(tab, focus = true) {
  for (const other of tabs) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    show($(other.getAttribute("aria-controls")), selected);
  }
  announce("");
  if (focus) tab.focus();
  history.replaceState(null, "", `#${tab.id.replace("tab-", "")}`);
}

for (const [i, tab] of tabs.entries()) {
  tab.addEventListener("click", () => activateTab(tab));
  tab.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (step) {
      event.preventDefault();
      activateTab(tabs[(i + step + tabs.length) % tabs.length]);
    } else if (event.key === "Home" || event.key === "End") {
      event.preventDefault();
      activateTab(event.key === "Home" ? tabs[0] : tabs[tabs.length - 1]);
    }
  });
}

// --- detail view --------------------------------------------------------------------------

const detail = $("detail");
const explainParts = {
  image: $("detail-image"),
  canvas: $("explain-heat"),
  layer: $("explain-boxes"),
  words: $("explain-words"),
  table: $("explain-table").tBodies[0],
  legend: $("explain-legend"),
};
let detailOpener = null;

function scoreRows(hit) {
  const rows = [
    [scoreKind === "match_probability" ? "Match probability" : "Score", formatHitScore(hit.score)],
    ["Raw score", formatScore(hit.raw_score)],
    ["Shortlist score", formatScore(hit.shortlist_score)],
    ["Shortlist rank", Number.isInteger(hit.shortlist_rank) ? String(hit.shortlist_rank + 1) : "–"],
  ];
  if (isExplanation(hit.explanation)) rows.push(["CAMP score", formatScore(hit.explanation.camp_score)]);
  return rows.flatMap(([term, value]) => [el("dt", { text: term }), el("dd", { text: value })]);
}

/**
 * Open the detail view: `imageSrc` is the photo, `hit` the search hit (with `explanation` when
 * the search asked for one), `captions` the texts listed beside it, `wordsTitle` what the
 * explanation's words are (the query, or the caption).
 */
function openDetail({ title, imageSrc, imageAlt, hit, captions, wordsTitle, opener }) {
  detailOpener = opener ?? document.activeElement;
  $("detail-title").textContent = title;
  const image = explainParts.image;
  image.alt = imageAlt;
  image.src = imageSrc;
  clear($("detail-scores")).append(...scoreRows(hit));
  clear($("detail-captions")).append(...captions.map((text) => el("li", { text })));
  show($("detail-captions-block"), captions.length > 0);
  $("explain-words-title").textContent = wordsTitle;

  const explained = isExplanation(hit.explanation);
  show($("explain-words-block"), explained);
  show(explainParts.canvas, explained);
  show(explainParts.layer, explained);
  const missing = $("explain-missing");
  show(missing, !explained);
  missing.textContent = explained
    ? ""
    : "No explanation for this hit: tick “Explain matches” in the options and search again.";
  clear(explainParts.legend);
  if (explained) renderExplanation(hit.explanation, explainParts);

  detail.showModal();
  $("detail-close").focus();
}

function closeDetail() {
  if (detail.open) detail.close();
}

detail.addEventListener("close", () => {
  detailOpener?.focus?.();
  detailOpener = null;
});
$("detail-close").addEventListener("click", closeDetail);
detail.addEventListener("click", (event) => {
  if (event.target === detail) closeDetail(); // a click on the backdrop
});

// --- text -> images -----------------------------------------------------------------------

const textForm = $("text-form");
const textQuery = $("text-query");
const imageResults = $("image-results");
let lastTextQuery = "";

function imageCard(hit, rank, query) {
  const src = api.imageUrl(hit);
  const caption = hit.captions?.[0] ?? "";
  const button = el(
    "button",
    {
      type: "button",
      class: "card-button",
      "aria-label": `Result ${rank}: score ${formatHitScore(hit.score)}${caption ? `, ${caption}` : ""}. Show why it matched.`,
    },
    el("img", { src, alt: caption || `Photo ${hit.id}`, loading: "lazy", decoding: "async" }),
    el(
      "span",
      { class: "card-meta" },
      el("span", { class: "rank", text: `#${rank}` }),
      el("span", { class: "score", text: formatHitScore(hit.score) }),
    ),
    caption ? el("span", { class: "card-caption", text: caption }) : null,
  );
  button.addEventListener("click", () =>
    openDetail({
      title: `Why photo ${hit.id} matches “${query}”`,
      imageSrc: src,
      imageAlt: caption || `Photo ${hit.id}`,
      hit,
      captions: hit.captions ?? [],
      wordsTitle: "Query words",
      opener: button,
    }),
  );
  return el("li", { class: "card", "data-image-id": hit.id }, button);
}

async function runTextSearch() {
  const text = textQuery.value.trim();
  const errorBox = $("text-error");
  hideError(errorBox);
  if (!text) {
    showError(errorBox, new Error("Type what the photo should show first."));
    textQuery.focus();
    return;
  }
  lastTextQuery = text;
  setBusy(textForm, true);
  imageResults.setAttribute("aria-busy", "true");
  announce("Searching…");
  try {
    const response = await api.searchImages({ text, ...searchOptions("text") });
    scoreKind = response.score_kind ?? scoreKind;
    const hits = response.results ?? [];
    clear(imageResults).append(...hits.map((hit, i) => imageCard(hit, i + 1, lastTextQuery)));
    showTimings($("text-timings"), response.timings_ms);
    const empty = $("text-empty");
    clear(empty).append(
      el("p", {
        text: hits.length
          ? ""
          : emptyText(response, "No photo matched. Try other words, lower the match cut-off, or add photos first."),
      }),
    );
    show(empty, hits.length === 0);
    announce(hits.length ? `${plural(hits.length, "photo")} found for “${text}”.` : "No photo matched.");
  } catch (error) {
    clear(imageResults);
    show($("text-empty"), false);
    show($("text-timings"), false);
    showError(errorBox, error);
  } finally {
    setBusy(textForm, false);
    imageResults.setAttribute("aria-busy", "false");
  }
}

textForm.addEventListener("submit", (event) => {
  event.preventDefault();
  runTextSearch();
});

// --- photo -> captions --------------------------------------------------------------------

const photoForm = $("photo-form");
const photoInput = $("photo-file");
const photoPreview = $("photo-preview");
const dropZone = $("drop-zone");
const captionResults = $("caption-results");
let chosenPhoto = null;
let chosenPhotoUrl = null;

function choosePhoto(file) {
  if (!file) return;
  chosenPhoto = file;
  if (chosenPhotoUrl) URL.revokeObjectURL(chosenPhotoUrl);
  chosenPhotoUrl = URL.createObjectURL(file);
  photoPreview.src = chosenPhotoUrl;
  photoPreview.alt = `Chosen photo: ${file.name || "pasted image"}`;
  show(photoPreview, true);
  $("photo-search").disabled = false;
  runPhotoSearch();
}

photoPreview.addEventListener("error", () => show(photoPreview, false)); // not an image
photoInput.addEventListener("change", () => choosePhoto(photoInput.files?.[0]));
for (const type of ["dragenter", "dragover"]) {
  dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  dropZone.addEventListener(type, () => dropZone.classList.remove("dragging"));
}
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  const file = [...(event.dataTransfer?.files ?? [])].find((f) => f.type.startsWith("image/"));
  if (file) choosePhoto(file);
  else showError($("photo-error"), new Error("Drop an image file (JPEG, PNG, WebP…)."));
});
document.addEventListener("paste", (event) => {
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLTextAreaElement) return;
  const file = [...(event.clipboardData?.files ?? [])].find((f) => f.type.startsWith("image/"));
  if (!file) return;
  event.preventDefault();
  activateTab($("tab-photo"), false);
  choosePhoto(file);
});

function captionItem(hit, rank) {
  const explained = isExplanation(hit.explanation);
  const button = explained
    ? el("button", { type: "button", class: "link-button", text: "Why?" })
    : null;
  button?.addEventListener("click", () =>
    openDetail({
      title: `Why “${hit.text}” describes your photo`,
      imageSrc: chosenPhotoUrl,
      imageAlt: "Your photo",
      hit,
      captions: [],
      wordsTitle: "Caption words",
      opener: button,
    }),
  );
  return el(
    "li",
    { class: "caption-hit", "data-caption-id": hit.id },
    el("span", { class: "rank", text: `#${rank}` }),
    el("span", { class: "caption-text", text: hit.text }),
    el("span", { class: "score", text: formatHitScore(hit.score) }),
    button,
  );
}

async function runPhotoSearch() {
  const errorBox = $("photo-error");
  hideError(errorBox);
  if (!chosenPhoto) {
    showError(errorBox, new Error("Choose a photo first."));
    return;
  }
  setBusy(photoForm, true);
  captionResults.setAttribute("aria-busy", "true");
  announce("Finding captions…");
  try {
    const response = await api.searchCaptions(chosenPhoto, searchOptions("photo"));
    scoreKind = response.score_kind ?? scoreKind;
    const hits = response.results ?? [];
    clear(captionResults).append(...hits.map((hit, i) => captionItem(hit, i + 1)));
    showTimings($("photo-timings"), response.timings_ms);
    const empty = $("photo-empty");
    clear(empty).append(el("p", { text: hits.length ? "" : emptyText(response, "No caption matched this photo.") }));
    show(empty, hits.length === 0);
    announce(hits.length ? `${plural(hits.length, "caption")} found.` : "No caption matched.");
  } catch (error) {
    clear(captionResults);
    show($("photo-empty"), false);
    show($("photo-timings"), false);
    showError(errorBox, error);
  } finally {
    setBusy(photoForm, false);
    captionResults.setAttribute("aria-busy", "false");
  }
}

photoForm.addEventListener("submit", (event) => {
  event.preventDefault();
  runPhotoSearch();
});

// --- ingest -------------------------------------------------------------------------------

const ingestForm = $("ingest-form");
const ingestFiles = $("ingest-files");
const ingestItems = $("ingest-items");
const ingestLog = $("ingest-log");
const apiKeyInput = $("api-key");

apiKeyInput.value = api.loadApiKey();
apiKeyInput.addEventListener("change", () => api.saveApiKey(apiKeyInput.value.trim()));

ingestFiles.addEventListener("change", () => {
  const files = [...(ingestFiles.files ?? [])];
  clear(ingestItems).append(
    ...files.map((file, i) => {
      const id = `ingest-captions-${i}`;
      return el(
        "li",
        { class: "ingest-item" },
        el("img", { src: URL.createObjectURL(file), alt: "", class: "thumb" }),
        el(
          "div",
          { class: "field" },
          el("label", { for: id, text: `Captions for ${file.name}, one per line` }),
          el("textarea", { id, rows: 3, "data-file-index": i }),
        ),
      );
    }),
  );
  $("ingest-submit").disabled = files.length === 0;
});

ingestForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const files = [...(ingestFiles.files ?? [])];
  const errorBox = $("ingest-error");
  hideError(errorBox);
  if (files.length === 0) return showError(errorBox, new Error("Choose one or more photos."));
  const apiKey = apiKeyInput.value.trim();
  api.saveApiKey(apiKey);
  setBusy(ingestForm, true);
  let added = 0;
  let failed = 0;
  for (const [i, file] of files.entries()) {
    announce(`Adding ${i + 1} of ${files.length}: ${file.name}…`);
    const captions = (ingestItems.querySelector(`[data-file-index="${i}"]`)?.value ?? "")
      .split("\n")
      .map((line) => line.trim())
      .filter(Boolean);
    try {
      const { created, image } = await api.addImage(file, captions, apiKey);
      added += 1;
      const what = created ? "added" : "already there";
      const stored = plural(image.captions?.length ?? 0, "caption");
      // A photo stored before keeps its captions and gains the new ones: say how many.
      const gained = created ? "" : `, ${image.captions_added ?? 0} new`;
      ingestLog.append(
        el("li", { class: "ok", text: `${file.name}: ${what} as photo ${image.id} (${stored}${gained})` }),
      );
    } catch (error) {
      failed += 1;
      const reason = error instanceof api.ApiError ? error.describe() : String(error);
      ingestLog.append(el("li", { class: "failed", text: `${file.name}: ${reason}` }));
      if (error instanceof api.ApiError && (error.status === 401 || error.status === 403)) {
        showError(errorBox, error);
        break;
      }
    }
  }
  setBusy(ingestForm, false);
  announce(`${plural(added, "photo")} stored, ${failed} refused.`);
  refreshInfo();
});

// --- health and corpus info ---------------------------------------------------------------

const healthBadge = $("health");
const HEALTH_TEXT = { ready: "Ready", degraded: "Degraded", down: "Starting", offline: "Offline" };

async function refreshHealth() {
  const { state, body } = await api.readiness();
  healthBadge.dataset.state = state;
  $("health-text").textContent = HEALTH_TEXT[state] ?? state;
  const problems = (body?.components ?? []).filter((c) => !c.ok).map((c) => `${c.name}: ${c.detail}`);
  healthBadge.title = problems.length ? problems.join("\n") : `Service ${HEALTH_TEXT[state] ?? state}`;
}

/** `plural` for a count the API may not have sent ("? photos"). */
function counted(count, noun) {
  return typeof count === "number" ? plural(count, noun) : `? ${noun}s`;
}

async function refreshInfo() {
  const about = await api.info();
  if (!about) return;
  scoreKind = about.scores?.kind ?? scoreKind;
  for (const prefix of ["text", "photo"]) {
    showCutoff(prefix);
    $(`${prefix}-min-score`).title = about.scores?.detail ?? "";
  }
  $("corpus-info").textContent =
    `${counted(about.corpus?.images, "photo")}, ${counted(about.corpus?.captions, "caption")} · ` +
    `model ${about.model_version ?? "?"} · ${about.extractor ?? "?"} regions · ${about.device ?? "?"}`;
}

// --- start --------------------------------------------------------------------------------

const initialTab = document.getElementById(`tab-${location.hash.slice(1)}`);
if (initialTab) activateTab(initialTab, false);
refreshHealth();
setInterval(refreshHealth, HEALTH_POLL_MS);
refreshInfo();
document.body.dataset.ready = "true";
