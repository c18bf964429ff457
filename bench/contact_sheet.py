"""A labelled contact sheet of the geometric engine's mouth states on the built-in avatar.

    python -m bench.contact_sheet [--out docs/contact_sheet.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

from websocket_service.avatars.model import BaseFrame
from websocket_service.avatars.store import AvatarStore
from websocket_service.config import Settings
from websocket_service.engines.geometric import GeometricEngine
from websocket_service.engines.geometric.fields import MouthPose
from websocket_service.engines.geometric.geometry import CX, CY

ROOT = Path(__file__).resolve().parent.parent
STATES = [("closed", MouthPose(0.0, 0.0)), ("half open", MouthPose(0.5, 0.0)),
          ("open", MouthPose(1.0, 0.0)), ("rounded (oo)", MouthPose(0.8, -1.0)),
          ("spread (ee)", MouthPose(0.7, 1.0))]
CELL = 240  # px of the avatar around the mouth per cell
SCALE = 1.25


def sheet(avatars_dir: Path) -> np.ndarray:
    engine = GeometricEngine(Settings())
    avatar = AvatarStore(avatars_dir, 512, 512, 25, engine.prepare_avatar).ensure_builtin("default")
    base = BaseFrame("idle", 0, avatar.clips["idle"].frames[0])
    g = engine.geometry(avatar, base)
    x0 = int(g[CX]) - CELL // 2
    y0 = int(g[CY]) - int(CELL * 0.55)
    cells = []
    for label, pose in STATES:
        image = engine.render(avatar, base, pose)[y0:y0 + CELL, x0:x0 + CELL]
        image = cv2.resize(image, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_CUBIC)
        bar = np.full((34, image.shape[1], 3), 250, np.uint8)
        text = f"{label}  o={pose.opening:.1f} s={pose.shape:+.1f}"
        cv2.putText(bar, text, (8, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (20, 20, 20), 1,
                    cv2.LINE_AA)
        cells.append(np.vstack([image, bar]))
    gap = np.full((cells[0].shape[0], 6, 3), 255, np.uint8)
    row = [c for cell in cells for c in (cell, gap)][:-1]
    return np.hstack(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "contact_sheet.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        image = sheet(Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]})")


if __name__ == "__main__":
    main()
