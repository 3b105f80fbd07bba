"""The real API (small seeded model, small grid extractor) as a killable process.

Run by tests/test_faults.py, then SIGKILLed mid-ingest and started again on the same data dir:
    python tests/fault_server.py PORT            (settings from CAMPSEARCH_* variables)
The model is rebuilt identically on every start (same seed, same vocabulary), so a restarted
server opens the corpus its predecessor wrote.
"""

from __future__ import annotations

import sys

import uvicorn
from service_support import coco_photos, small_extractor, tiny_model
from shared_paths import SHARED_DIR

from service.api.app import create_app
from service.runtime.settings import Settings

VOCABULARY_PHOTOS = 239  # as the tiny_retrieval_model fixture


def main() -> None:
    port = int(sys.argv[1])
    words = [c for _, captions in coco_photos(SHARED_DIR, VOCABULARY_PHOTOS) for c in captions]
    app = create_app(Settings(), model=tiny_model(words), extractor=small_extractor())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
