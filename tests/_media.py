"""Real photos and a short video of them, for the frame and predict tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VIDEO_FRAMES = 12


def photos() -> list[np.ndarray]:
    """Real RGB photos bundled with scikit-image."""
    import skimage.data as skdata

    return [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]


def write_video(path: Path, frames: int = VIDEO_FRAMES, size: tuple[int, int] = (160, 120),
                fourcc: str = "mp4v") -> None:
    """A short video cycling through the photos (each shown for 4 frames)."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, size)
    assert writer.isOpened()
    for i in range(frames):
        rgb = cv2.resize(photos()[(i // 4) % 3], size, interpolation=cv2.INTER_AREA)
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()

