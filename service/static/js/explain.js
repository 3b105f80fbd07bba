// Draws why a pair matched (the API's `explanation`): a heat map of the reranker's attention
// over the photo on a canvas, the strongest regions as numbered boxes in an SVG overlay, and a
// table of which region each word attended to most.
//
// Explanation shape (service/api/schemas.py): words [L], boxes [R][4] normalised (x0, y0, x1, y1),
// image_size [w, h], word_region [L][R] (rows sum to 1), region_pooling [R], word_pooling [L],
// camp_score.

import { clear, el, svg } from "./dom.js";

/** Cells per side of the heat map grid before it is smoothed up to the photo's size. */
const HEAT_GRID = 64;
/** Numbered boxes drawn for the strongest regions of the current selection. */
const TOP_REGIONS = 3;
/** Blur radius of the heat map = the canvas's longer side / this. */
const HEAT_BLUR_DIVISOR = 60;
/** Heat map opacity at the hottest cell (0..1). */
const HEAT_MAX_ALPHA = 0.62;
/** The canvas is drawn at most this many pixels on its longer side. */
const CANVAS_MAX_SIDE = 800;
/** Relative spread below which a heat map counts as flat (no region stands out). */
const FLAT_TOLERANCE = 1e-3;
/** Tokens the text encoder adds around a sentence; they are not words a person typed. */
const MARKER_TOKENS = new Set(["<start>", "<end>", "<pad>", "<unk>", "[cls]", "[sep]"]);

const PUNCTUATION = /^[\p{P}\p{S}]+$/u;

/** True when `value` has the fields this module draws from. */
export function isExplanation(value) {
  return Boolean(
    value &&
      Array.isArray(value.boxes) &&
      Array.isArray(value.words) &&
      Array.isArray(value.word_region) &&
      Array.isArray(value.region_pooling),
  );
}

/** Words worth showing: index into the explanation's rows, skipping encoder markers. */
export function displayWords(explanation) {
  return explanation.words
    .map((word, index) => ({ word: String(word), index }))
    .filter(
      ({ word, index }) =>
        !MARKER_TOKENS.has(word.toLowerCase()) &&
        !PUNCTUATION.test(word) &&
        explanation.word_region[index],
    );
}

/** Where a normalised box sits, in words a person can find on the photo ("top left", ...). */
export function describeBox([x0, y0, x1, y1]) {
  const cx = (x0 + x1) / 2;
  const cy = (y0 + y1) / 2;
  const row = cy < 1 / 3 ? "top" : cy < 2 / 3 ? "middle" : "bottom";
  const col = cx < 1 / 3 ? "left" : cx < 2 / 3 ? "centre" : "right";
  if (x1 - x0 > 0.8 && y1 - y0 > 0.8) return "whole photo";
  return row === "middle" && col === "centre" ? "centre" : `${row} ${col}`;
}

/** Indices of the `count` largest weights, largest first. */
export function topIndices(weights, count) {
  return weights
    .map((weight, index) => ({ weight, index }))
    .sort((a, b) => b.weight - a.weight)
    .slice(0, count)
    .map(({ index }) => index);
}

/**
 * Accumulate region weights onto a gridSize² grid (each cell gets the sum of the weights of the
 * boxes that contain its centre), then stretch to 0..1 between the coolest and the hottest
 * cell. A flat map (every region weighted alike) comes back all zeros: nothing stands out.
 */
export function heatGrid(boxes, weights, gridSize = HEAT_GRID) {
  const grid = new Float32Array(gridSize * gridSize);
  // Cells whose centre (i + 0.5) / gridSize lies in [start, end): tiling boxes cover each cell once.
  const first = (start) => Math.max(0, Math.ceil(start * gridSize - 0.5));
  const last = (end) => Math.min(gridSize, Math.ceil(end * gridSize - 0.5));
  boxes.forEach(([x0, y0, x1, y1], r) => {
    const weight = weights[r] ?? 0;
    if (!(weight > 0)) return;
    for (let row = first(y0); row < last(y1); row += 1) {
      for (let col = first(x0); col < last(x1); col += 1) grid[row * gridSize + col] += weight;
    }
  });
  let min = Infinity;
  let max = -Infinity;
  for (const value of grid) {
    min = Math.min(min, value);
    max = Math.max(max, value);
  }
  const range = max - min;
  if (!(range > FLAT_TOLERANCE * Math.max(max, 1e-12))) return grid.fill(0);
  for (let i = 0; i < grid.length; i += 1) grid[i] = (grid[i] - min) / range;
  return grid;
}

/** A perceptual-ish "inferno"-like ramp: 0 -> transparent dark purple, 1 -> opaque yellow. */
function heatColour(t) {
  const stops = [
    [0.0, [20, 11, 52]],
    [0.35, [132, 32, 107]],
    [0.65, [229, 92, 48]],
    [1.0, [252, 230, 80]],
  ];
  for (let i = 1; i < stops.length; i += 1) {
    const [t1, c1] = stops[i];
    const [t0, c0] = stops[i - 1];
    if (t <= t1) {
      const f = (t - t0) / (t1 - t0);
      return c0.map((c, k) => Math.round(c + f * (c1[k] - c)));
    }
  }
  return stops[stops.length - 1][1];
}

function drawHeat(canvas, boxes, weights, width, height) {
  const scale = Math.min(1, CANVAS_MAX_SIDE / Math.max(width, height));
  canvas.width = Math.max(1, Math.round(width * scale));
  canvas.height = Math.max(1, Math.round(height * scale));
  const grid = heatGrid(boxes, weights);
  const cells = document.createElement("canvas");
  cells.width = HEAT_GRID;
  cells.height = HEAT_GRID;
  const cellContext = cells.getContext("2d");
  const pixels = cellContext.createImageData(HEAT_GRID, HEAT_GRID);
  grid.forEach((value, i) => {
    const [r, g, b] = heatColour(value);
    pixels.data.set([r, g, b, Math.round(255 * HEAT_MAX_ALPHA * value)], i * 4);
  });
  cellContext.putImageData(pixels, 0, 0);
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  // Soften the cell edges: regions are where the model looked, not pixel-exact masks.
  context.filter = `blur(${Math.round(Math.max(canvas.width, canvas.height) / HEAT_BLUR_DIVISOR)}px)`;
  context.drawImage(cells, 0, 0, canvas.width, canvas.height);
  context.filter = "none";
}

function drawBoxes(layer, boxes, weights, width, height) {
  clear(layer);
  layer.setAttribute("viewBox", `0 0 ${width} ${height}`);
  layer.setAttribute("preserveAspectRatio", "none");
  const fontSize = Math.max(12, Math.round(Math.min(width, height) / 18));
  topIndices(weights, TOP_REGIONS).forEach((r, rank) => {
    const [x0, y0, x1, y1] = boxes[r];
    const group = svg("g", { class: `region region-${rank + 1}`, "data-region": r });
    group.append(
      svg("rect", {
        x: x0 * width,
        y: y0 * height,
        width: Math.max(1, (x1 - x0) * width),
        height: Math.max(1, (y1 - y0) * height),
        rx: 3,
        "vector-effect": "non-scaling-stroke",
      }),
      svg("rect", {
        class: "region-tag",
        x: x0 * width,
        y: y0 * height,
        width: fontSize * 1.4,
        height: fontSize * 1.4,
      }),
      svg("text", {
        x: x0 * width + fontSize * 0.7,
        y: y0 * height + fontSize * 1.05,
        "font-size": fontSize,
        "text-anchor": "middle",
        text: rank + 1,
      }),
    );
    layer.append(group);
  });
}

function percent(value) {
  return `${(100 * value).toFixed(1)}%`;
}

/**
 * Render `explanation` into the detail view. `parts` holds the elements: image, canvas, layer
 * (svg), words (chip container), table (tbody), legend. The image must already be loading.
 */
export function renderExplanation(explanation, parts) {
  const [width, height] = explanation.image_size ?? [
    parts.image.naturalWidth || 1,
    parts.image.naturalHeight || 1,
  ];
  const boxes = explanation.boxes;
  const words = displayWords(explanation);
  let selected = null; // null: the pooled view over all words

  const select = (index) => {
    selected = index;
    const weights = index === null ? explanation.region_pooling : explanation.word_region[index];
    drawHeat(parts.canvas, boxes, weights, width, height);
    drawBoxes(parts.layer, boxes, weights, width, height);
    for (const chip of parts.words.querySelectorAll("button")) {
      const chipIndex = chip.dataset.index === "all" ? null : Number(chip.dataset.index);
      chip.setAttribute("aria-pressed", String(chipIndex === selected));
    }
    const label = index === null ? "all words (CAMP's region pooling)" : `“${explanation.words[index]}”`;
    parts.legend.textContent =
      `Heat: attention of ${label} over ${boxes.length} regions; ` +
      `numbered boxes: the ${Math.min(TOP_REGIONS, boxes.length)} strongest.`;
  };

  clear(parts.words);
  parts.words.append(
    el("button", { type: "button", class: "chip", "data-index": "all", onclick: () => select(null) }, "All words"),
    ...words.map(({ word, index }) =>
      el("button", { type: "button", class: "chip", "data-index": index, onclick: () => select(index) }, word),
    ),
  );

  clear(parts.table);
  const byImportance = [...words].sort(
    (a, b) => (explanation.word_pooling?.[b.index] ?? 0) - (explanation.word_pooling?.[a.index] ?? 0),
  );
  for (const { word, index } of byImportance) {
    const row = explanation.word_region[index];
    const [best] = topIndices(row, 1);
    parts.table.append(
      el(
        "tr",
        { tabindex: -1, onmouseenter: () => select(index), onclick: () => select(index) },
        el("th", { scope: "row", text: word }),
        el("td", { text: best === undefined ? "–" : describeBox(boxes[best]) }),
        el("td", { text: best === undefined ? "–" : percent(row[best]) }),
      ),
    );
  }
  select(null);
}
