"""The ceiling: bare FastAPI returning a constant ~1 KB document under the service's uvicorn
options. Every benchmark figure is also given as a ratio to this app's GET rate."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server import SERVER_OPTIONS

DOCUMENT = {
    "id": "01M8DRM5YHTJDT3EERCK50Z03Q",
    "title": "Constant document",
    "content": "x" * 800,
    "tags": ["bench", "ceiling"],
    "metadata": {"n": 1},
    "created_at": "2026-11-27T05:46:04.625547Z",
    "updated_at": "2026-11-27T05:46:04.625547Z",
    "version": 1,
}

app = FastAPI()


@app.get("/v1/documents/{document_id}")
async def read_document(document_id: str) -> dict[str, object]:
    return DOCUMENT


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(os.environ["PORT"]),
        **SERVER_OPTIONS,
    )
