"""Real shortlists for precision and device checks of the reranker.

The shipped default model and the real grid extractor on coco-mini photos: each caption's
shortlist is its pooled top-K over the photos (text -> images), each photo's is its pooled
top-K over all their captions (image -> captions), exactly the jobs the service builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from service_support import coco_photos

from model.retrieval import RetrievalModel
from model.vision.extractors.grid import GridExtractor
from service.search.rerank import PairReranker, RerankJob

PHOTOS = 20
TEXT_SHORTLIST = 12  # images per caption query
IMAGE_SHORTLIST = 20  # captions per photo query
# Fused scores of the shipped model span about -5..25; bf16 moves them by at most ~0.015.
BF16_MAX_SCORE_DIFF = 0.05
# Two candidates may swap places in bf16 only when their fp32 scores are closer than this.
BF16_ORDER_TOLERANCE = 0.05


@dataclass
class CocoShortlists:
    """Region features (float16, as stored) and caption texts of real photos."""

    regions: np.ndarray  # [N, 49, 1280]
    captions: list[str]  # 5 per photo, photo-major
    first_captions: list[str]


def coco_shortlists(shared_dir: Path, count: int = PHOTOS, device: str = "cpu") -> CocoShortlists:
    photos = coco_photos(shared_dir, count)
    extractor = GridExtractor(device=device)
    features = extractor.extract([Image.open(path).convert("RGB") for path, _ in photos])
    return CocoShortlists(
        regions=np.stack([f.features for f in features]).astype(np.float16),
        captions=[caption for _, captions in photos for caption in captions],
        first_captions=[captions[0] for _, captions in photos],
    )


def rerank_jobs(model: RetrievalModel, data: CocoShortlists) -> list[RerankJob]:
    """Both directions' jobs, per-item tensors on the model's device (as the LRUs hold them)."""
    images = model.precompute_images(data.regions)
    image_items = [images.select([i]) for i in range(len(images))]
    pooled_images = model.pooled_images(data.regions)
    queries = model.encode_texts(data.first_captions)
    all_captions = model.encode_texts(data.captions)
    caption_items = [all_captions.precompute.select([i]) for i in range(len(data.captions))]
    jobs = []
    for row, similarities in enumerate(queries.pooled @ pooled_images.T):
        top = np.argsort(-similarities)[:TEXT_SHORTLIST]
        jobs.append(
            RerankJob(
                images=tuple(image_items[i] for i in top),
                captions=(queries.precompute.select([row]),),
                shortlist_scores=similarities[top].astype(np.float32),
            )
        )
    for row, similarities in enumerate(pooled_images @ all_captions.pooled.T):
        top = np.argsort(-similarities)[:IMAGE_SHORTLIST]
        jobs.append(
            RerankJob(
                images=(image_items[row],),
                captions=tuple(caption_items[i] for i in top),
                shortlist_scores=similarities[top].astype(np.float32),
            )
        )
    return jobs


def rerank(model: RetrievalModel, data: CocoShortlists) -> list[np.ndarray]:
    return PairReranker(model)(rerank_jobs(model, data))


def order_violations(
    reference: list[np.ndarray], other: list[np.ndarray], tolerance: float
) -> list[tuple[int, float]]:
    """(job, fp32 gap) of every candidate pair that `other` orders against `reference` although
    their reference scores differ by at least `tolerance`."""
    found = []
    for job, (ref, got) in enumerate(zip(reference, other, strict=True)):
        gaps = ref[:, None] - ref[None, :]
        swapped = (gaps >= tolerance) & (got[:, None] < got[None, :])
        found += [(job, float(gap)) for gap in gaps[swapped]]
    return found


def max_abs_diff(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    return max(float(np.abs(a - b).max()) for a, b in zip(reference, other, strict=True))
