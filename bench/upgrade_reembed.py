"""Upgrading keeps users' data (issue 17), with the real models, in one run.

A data dir is filled through the real service by an older checkpoint (`--old-checkpoint`, e.g.
default-v2 from git history, or model/weights/camp.pt), then served by the shipped model (or
`--new-checkpoint`): when the new model's extractor differs, the photos are re-extracted from
the stored files first; the pooled vectors it lacks are re-embedded in the background, then the
rerank tensors rebuilt. Two ways
compared: the re-embedded vectors against a fresh ingest of the same photos with the new model
(max |difference|), and the time of the upgrade's rebuilds against that fresh ingest. Every
photo must be found again by one of its captions.

    git show ecda361^:model/weights/default.pt > /tmp/default-v2.pt
    SHARED_DIR=/work/shared python -m bench.upgrade_reembed --old-checkpoint /tmp/default-v2.pt
    # another extractor (a Lite2 model over a Lite0 data dir): the photos are re-extracted
    SHARED_DIR=/work/shared python -m bench.upgrade_reembed \
        --old-checkpoint model/weights/default.pt --new-checkpoint runs/imram-lite2-cpu/best.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The test helpers drive the real service (upload through the API, load the app).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from service_support import (
    coco_photos,
    make_settings,
    running_client,
    upload_coco_photos,
)

from service.api.app import create_app
from service.search.tensor_rebuild import PooledRebuild, RegionRebuild, TensorRebuild

CAPTIONS_EACH = 5


def _vectors(runtime, image_ids: list[int], client) -> tuple[dict, dict]:
    """Stored pooled vectors keyed by content ({sha256: v}, {caption text: v})."""
    corpus = runtime.corpus
    images = {
        corpus.get_image(i).sha256: v for i, v in corpus.get_pooled("images", image_ids).items()
    }
    caption_ids = [
        c["id"] for i in image_ids for c in client.get(f"/v1/images/{i}").json()["captions"]
    ]
    captions = {
        corpus.get_caption(i).text: v for i, v in corpus.get_pooled("captions", caption_ids).items()
    }
    return images, captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-checkpoint", type=Path, required=True)
    parser.add_argument(
        "--new-checkpoint", type=Path, default=None, help="default: the shipped model"
    )
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    shared = Path(os.environ.get("SHARED_DIR", "/work/shared"))
    photos = coco_photos(shared, args.photos)
    with tempfile.TemporaryDirectory() as scratch:
        upgraded_dir, fresh_dir = Path(scratch) / "upgraded", Path(scratch) / "fresh"
        app = create_app(make_settings(upgraded_dir, checkpoint=args.old_checkpoint))
        with running_client(app) as client:
            old_version = app.state.service.runtime.model.version
            old_extractor = app.state.service.runtime.extractor.version
            ids = upload_coco_photos(client, shared, args.photos, CAPTIONS_EACH)

        # The rebuilds are held at start and run here, so they are timed alone.
        starts = {kind: kind.start for kind in (RegionRebuild, PooledRebuild, TensorRebuild)}
        for kind in starts:
            kind.start = lambda self: None  # type: ignore[method-assign]
        new = {} if args.new_checkpoint is None else {"checkpoint": args.new_checkpoint}
        app = create_app(make_settings(upgraded_dir, **new))
        with running_client(app) as client:
            runtime = app.state.service.runtime
            new_version = runtime.model.version
            extractors = (old_extractor, runtime.extractor.version)
            started = time.perf_counter()
            runtime.region_rebuild.run()
            region_s = time.perf_counter() - started
            re_extracted = runtime.region_rebuild.built["images"]
            runtime.pooled_rebuild.run()
            pooled_s = time.perf_counter() - started - region_s
            runtime.rebuild.run()
            both_s = time.perf_counter() - started
            for kind, start in starts.items():
                kind.start = start  # type: ignore[method-assign]
            ready = {
                c["name"]: c["detail"]
                for c in client.get("/readyz").json()["components"]
                if c["name"] in ("region_features", "pooled_vectors", "rerank_tensors")
            }
            found_first = 0
            for image_id, (_, captions) in zip(ids, photos, strict=True):
                hits = client.post(
                    "/v1/search/images", json={"text": captions[0], "limit": args.photos}
                ).json()["results"]
                if sorted(hit["id"] for hit in hits) != sorted(ids):
                    raise SystemExit(f"not every photo is searchable: {hits}")
                found_first += hits[0]["id"] == image_id
            upgraded = _vectors(runtime, ids, client)

        app = create_app(make_settings(fresh_dir, **new))
        with running_client(app) as client:
            started = time.perf_counter()
            fresh_ids = upload_coco_photos(client, shared, args.photos, CAPTIONS_EACH)
            ingest_s = time.perf_counter() - started
            fresh = _vectors(app.state.service.runtime, fresh_ids, client)

    differences = [
        max(float(np.abs(rebuilt[key] - made[key]).max()) for key in made)
        for rebuilt, made in zip(upgraded, fresh, strict=True)
    ]
    result = {
        "old_version": old_version,
        "new_version": new_version,
        "extractors": {"old": extractors[0], "new": extractors[1]},
        "photos_re_extracted": re_extracted,
        "photos": args.photos,
        "captions": args.photos * CAPTIONS_EACH,
        "readyz": ready,
        "region_rebuild_s": round(region_s, 2),
        "pooled_rebuild_s": round(pooled_s, 2),
        "all_rebuilds_s": round(both_s, 2),
        "fresh_ingest_s": round(ingest_s, 2),
        "rebuilds_over_fresh_ingest": round(both_s / ingest_s, 3),
        "max_abs_difference_images": differences[0],
        "max_abs_difference_captions": differences[1],
        "top1_by_first_caption": f"{found_first}/{args.photos}",
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
