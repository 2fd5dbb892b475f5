"""What a model load leaves for the garbage collector: load a bundle, release it (its
native runner closed and freed, the model dropped), and count the objects a full
``gc.collect()`` then finds unreachable (reference cycles, which only a collection
frees; a reload's light collection freezes what is alive instead, so until the next
full one they stay: service.lifecycle), by type.

Builds a DIN bundle in a temporary folder (or loads ``--models-dir``/``--name``), loads
it once to warm up, then ``--loads`` more times.

Usage: .venv/bin/python scripts/reload_garbage.py [--loads 3] [--models-dir DIR --name NAME]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_and_release(settings: object) -> None:
    from service.model import load_model

    model = load_model(settings)  # type: ignore[arg-type]
    if model.native is not None:
        model.native.close()
        deadline = time.monotonic() + 10
        while not model.native.released and time.monotonic() < deadline:
            time.sleep(0.01)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", type=int, default=3)
    ap.add_argument("--models-dir", type=Path)
    ap.add_argument("--name", default="bench-din")
    args = ap.parse_args()

    from service.settings import Settings

    print(f"command: {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory(prefix="reload-garbage-") as tmp:
        models = args.models_dir
        if models is None:
            from training.bench_service import make_bundle

            make_bundle("din", Path(tmp), 50)
            models = Path(tmp)
        settings = Settings(models_dir=str(models), model_name=args.name)
        load_and_release(settings)  # warm: the libraries, caches
        gc.collect()
        for k in range(args.loads):
            load_and_release(settings)
            gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collection finds, to name it
            found = gc.collect()
            kinds = Counter(type(o).__name__ for o in gc.garbage).most_common(6)
            gc.set_debug(0)
            gc.garbage.clear()
            gc.collect()  # and now free it
            print(f"load {k + 1}: {found} objects unreachable after its release {kinds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
