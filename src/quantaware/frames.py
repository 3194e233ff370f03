"""Frames in and out: photos, video files and cameras as RGB frames (OpenCV for
video, Pillow for image files), and annotated frames written to a video, a folder
of numbered images or a window, each file atomically.

Example:
    >>> import numpy as np
    >>> annotate(np.zeros((60, 80, 3), np.uint8), ["cat 0.91"]).shape
    (60, 80, 3)
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from quantaware._files import new_file_mode, write_bytes
from quantaware.image_folder import IMAGE_EXTENSIONS, ImageFolder

__all__ = ["CAMERA_FPS", "SLIDESHOW_FPS", "VIDEO_EXTENSIONS", "VIDEO_WRITERS", "Frame",
           "FrameSource", "FrameSourceError", "FrameWriter", "Window", "annotate"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# Containers OpenCV's FFmpeg backend commonly reads (any other it opens works too).
VIDEO_EXTENSIONS = (".avi", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm", ".wmv")
# Containers annotated videos are written to, with the codec (FourCC) each gets.
VIDEO_WRITERS = {".avi": "MJPG", ".mkv": "mp4v", ".mov": "mp4v", ".mp4": "mp4v"}
# Frame rates for saved videos when the source has none: a camera that does not
# report one, and image folders (shown as a slideshow).
CAMERA_FPS = 25.0
SLIDESHOW_FPS = 1.0


class FrameSourceError(ValueError):
    """Frames that cannot be read: unsupported or unreadable files, a camera that
    does not open, a source without frames. The message names it and the fix."""


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(
            "video, cameras and annotated frames need OpenCV: pip install "
            "opencv-python-headless (or pip install 'quantaware[video]')") from exc
    return cv2


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class Frame:
    """One decoded frame: RGB ``uint8`` pixels ``(H, W, 3)`` and how long decoding took."""

    index: int
    name: str
    rgb: np.ndarray
    decode_seconds: float


def _read_image(path: Path) -> np.ndarray:
    from quantaware.image_folder import rgb8

    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise ImportError("reading images needs Pillow: pip install pillow") from exc
    try:
        with Image.open(path) as image:
            return rgb8(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError,
                SyntaxError) as exc:  # Pillow: SyntaxError for a broken PNG chunk
        raise FrameSourceError(f"cannot read image {str(path)!r}: {exc}. Replace or remove the "
                          "file.") from exc


class FrameSource:
    """The frames of a folder of images, an image file, a video file or a camera.

    ``source`` is a folder (every image below it, sorted, as
    :class:`~quantaware.image_folder.ImageFolder` finds them), an image file, a
    video file in any container OpenCV reads, or a camera index (an ``int`` or a
    string of digits that is not an existing path). Iterating yields
    :class:`Frame` s, at most ``max_frames``. Use it as a context manager to
    release a video or camera.

    Raises:
        FileNotFoundError: the path does not exist.
        FrameSourceError: unsupported files in the folder, a file OpenCV cannot open,
            a camera that does not open.

    Example:
        >>> import os, tempfile, numpy as np
        >>> from PIL import Image
        >>> root = tempfile.mkdtemp()
        >>> for name in ("a.png", "b.jpg"):
        ...     Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(os.path.join(root, name))
        >>> with FrameSource(root, max_frames=1) as frames:
        ...     [(f.name, f.rgb.shape) for f in frames], frames.kind
        ([('a.png', (8, 12, 3))], 'images')
    """

    def __init__(self, source: PathLike | int, max_frames: int | None = None) -> None:
        if max_frames is not None and (isinstance(max_frames, bool) or max_frames < 1):
            raise ValueError(f"max_frames must be a positive integer or None, got {max_frames!r}")
        self.max_frames = max_frames
        self._images: list[Path] = []
        self._capture: Any = None
        self.fps = SLIDESHOW_FPS
        if isinstance(source, int) or (str(source).isdigit() and not Path(source).exists()):
            self._open_camera(int(source))
            return
        path = Path(source)
        self.description = str(path)
        if not path.exists():
            raise FileNotFoundError(
                f"source {str(path)!r} does not exist: give a folder of images, an image or "
                "video file, or a camera index (0 for the first camera)")
        if path.is_dir():
            self.kind = "images"
            self._root = path
            self._images = [p for p, _ in ImageFolder(path, labeled=False).samples]
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            self.kind = "images"
            self._root = path.parent
            self._images = [path]
        else:
            self._open_video(path)

    def _open_camera(self, index: int) -> None:
        cv2 = _cv2()
        self.kind, self.description = "camera", f"camera {index}"
        capture = cv2.VideoCapture(index)
        if not capture.isOpened():
            capture.release()
            raise FrameSourceError(
                f"cannot open camera {index}: OpenCV found no camera with that index, or it is "
                "in use by another program. Check the index (0 is the first camera) or give a "
                "video file or image folder instead.")
        self._capture = capture
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps > 0 else CAMERA_FPS

    def _open_video(self, path: Path) -> None:
        cv2 = _cv2()
        self.kind = "video"
        capture = cv2.VideoCapture(str(path))
        if not capture.isOpened():
            capture.release()
            known = path.suffix.lower() in VIDEO_EXTENSIONS
            raise FrameSourceError(
                f"cannot read {str(path)!r} as a video: OpenCV {cv2.__version__} could not open "
                + ("it (corrupt, truncated or an unsupported codec). Re-encode it, e.g. "
                   "`ffmpeg -i IN -c:v libx264 OUT.mp4`." if known else
                   f"files of type {path.suffix or '(no extension)'!r}. Give images "
                   f"({', '.join(IMAGE_EXTENSIONS)}), a folder of them, or a video "
                   f"({', '.join(VIDEO_EXTENSIONS)})."))
        self._capture = capture
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps > 0 else CAMERA_FPS

    @property
    def total(self) -> int | None:
        """The number of frames to expect (approximate for videos), None if unknown."""
        if self._images:
            count: int | None = len(self._images)
        elif self.kind == "video":
            reported = int(self._capture.get(_cv2().CAP_PROP_FRAME_COUNT))
            count = reported if reported > 0 else None
        else:
            count = None
        if count is None:
            return self.max_frames
        return count if self.max_frames is None else min(count, self.max_frames)

    def __iter__(self) -> Iterator[Frame]:
        if self._images:
            for index, path in enumerate(self._images[:self.max_frames]):
                start = time.perf_counter()
                rgb = _read_image(path)
                name = str(path.relative_to(self._root))
                yield Frame(index, name, rgb, time.perf_counter() - start)
            return
        cv2 = _cv2()
        index = 0
        while self.max_frames is None or index < self.max_frames:
            start = time.perf_counter()
            ok, bgr = self._capture.read()
            if not ok:
                if index == 0:
                    raise FrameSourceError(
                        f"{self.description!r} opened but no frame could be decoded from it; "
                        "check the file plays, or re-encode it (e.g. to H.264 .mp4)")
                return
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            yield Frame(index, f"frame {index}", rgb, time.perf_counter() - start)
            index += 1

    def close(self) -> None:
        """Release the video or camera (a no-op for images)."""
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- output


def annotate(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """The frame as a BGR image (OpenCV's order) with ``lines`` drawn at its top left.

    The text is scaled to the frame and drawn on a darkened band for contrast.

    Example:
        >>> import numpy as np
        >>> frame = np.full((120, 160, 3), 200, np.uint8)
        >>> out = annotate(frame, ["0.91 tabby", "0.05 tiger cat"])
        >>> out.shape, bool((out[:10, :40] != 200).any()), bool((out[-10:] == 200).all())
        ((120, 160, 3), True, True)
    """
    cv2 = _cv2()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if not lines:
        return bgr
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.3, min(bgr.shape[:2]) / 600)
    thickness = max(1, round(scale * 1.5))
    sizes = [cv2.getTextSize(line, font, scale, thickness) for line in lines]
    line_height = max(h + base for (_, h), base in sizes) + 4
    band = bgr[:line_height * len(lines) + 4, :max(w for (w, _), _ in sizes) + 8]
    band[:] = band // 3
    for i, line in enumerate(lines):
        cv2.putText(bgr, line, (4, (i + 1) * line_height - 2), font, scale, (255, 255, 255),
                    thickness, cv2.LINE_AA)
    return bgr


class FrameWriter:
    """Annotated BGR frames to a video file or to numbered JPEGs in a folder.

    ``out`` ending in one of :data:`VIDEO_WRITERS` is a video (its frame size is the
    first frame's; later frames are letterboxed to it), anything else a folder of
    ``frame_000000.jpg``, ... Each file is written under a temporary name and
    renamed when complete; a video is only renamed into place when the writer
    closes without an error.

    Example:
        >>> import os, tempfile, numpy as np
        >>> out = os.path.join(tempfile.mkdtemp(), "frames")
        >>> with FrameWriter(out) as writer:
        ...     writer.write(np.zeros((8, 8, 3), np.uint8))
        >>> sorted(os.listdir(out))
        ['frame_000000.jpg']
    """

    def __init__(self, out: PathLike, fps: float = CAMERA_FPS) -> None:
        self.path = Path(out)
        self.fps = fps
        self.count = 0
        self.codec = VIDEO_WRITERS.get(self.path.suffix.lower())
        media = set(IMAGE_EXTENSIONS) | set(VIDEO_EXTENSIONS)
        if self.codec is None and self.path.suffix.lower() in media:
            raise ValueError(
                f"cannot save to {str(self.path)!r}: give a folder (frames are written as "
                f"JPEG files into it) or a video file ending in {', '.join(VIDEO_WRITERS)}")
        self._folder = self.path.parent if self.codec else self.path
        if self._folder.exists() and not self._folder.is_dir():
            raise FileExistsError(f"cannot save to {str(self.path)!r}: {str(self._folder)!r} "
                                  "is a file, not a folder; choose another output path")
        self._video: Any = None
        self._tmp: str | None = None
        self._size: tuple[int, int] | None = None

    def write(self, bgr: np.ndarray) -> None:
        """Append one frame."""
        cv2 = _cv2()
        self._folder.mkdir(parents=True, exist_ok=True)
        if self.codec is None:
            ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
            if not ok:
                raise RuntimeError(f"OpenCV could not encode frame {self.count} as JPEG")
            write_bytes(self.path / f"frame_{self.count:06d}.jpg", data.tobytes())
        else:
            if self._video is None:
                self._open_video(bgr.shape[1], bgr.shape[0])
            self._video.write(_letterbox(bgr, self._size))
        self.count += 1

    def _open_video(self, width: int, height: int) -> None:
        cv2 = _cv2()
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=self.path.suffix,
                                         dir=self.path.parent)
        os.close(fd)
        self._size = (width, height)
        self._video = cv2.VideoWriter(self._tmp, cv2.VideoWriter_fourcc(*self.codec),
                                      self.fps, self._size)
        if not self._video.isOpened():
            self.close(success=False)
            raise RuntimeError(
                f"OpenCV {cv2.__version__} cannot write {self.codec} video to "
                f"{str(self.path)!r}; save to a folder of frames instead, or use "
                f"{', '.join(VIDEO_WRITERS)}")

    def close(self, success: bool = True) -> None:
        """Finish the video (renamed into place only if ``success`` and frames were
        written); for a folder, remove the frames numbered past this run's last one,
        left by an earlier, longer run (they would read as this run's)."""
        if self.codec is None and success and self._folder.is_dir():
            for stale in self._folder.glob("frame_*.jpg"):
                number = stale.stem.removeprefix("frame_")
                if number.isdigit() and int(number) >= self.count:
                    stale.unlink(missing_ok=True)
        if self._video is not None:
            self._video.release()
            self._video = None
        if self._tmp is not None:
            if success and self.count:
                os.chmod(self._tmp, new_file_mode())
                os.replace(self._tmp, self.path)
            elif os.path.exists(self._tmp):
                os.unlink(self._tmp)
            self._tmp = None

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(success=exc_type is None)


def _letterbox(bgr: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None or (bgr.shape[1], bgr.shape[0]) == size:
        return bgr
    cv2 = _cv2()
    width, height = size
    scale = min(width / bgr.shape[1], height / bgr.shape[0])
    w, h = max(1, round(bgr.shape[1] * scale)), max(1, round(bgr.shape[0] * scale))
    canvas = np.zeros((height, width, 3), np.uint8)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[top:top + h, left:left + w] = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA)
    return canvas


class Window:
    """Frames shown in an OpenCV window; ``show`` returns False once q or Esc is pressed."""

    NAME = "quantaware predict"

    def __init__(self) -> None:
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                     or os.environ.get("WAYLAND_DISPLAY")):
            raise RuntimeError("showing frames needs a display, and neither DISPLAY nor "
                               "WAYLAND_DISPLAY is set; save the frames instead (--save OUT)")
        self._cv2 = _cv2()
        self._open = False

    def show(self, bgr: np.ndarray) -> bool:
        try:
            self._cv2.imshow(self.NAME, bgr)
        except self._cv2.error as exc:
            raise RuntimeError(
                f"OpenCV cannot open a window ({exc}); the headless build has no GUI: pip "
                "install opencv-python instead, or save the frames (--save OUT)") from exc
        self._open = True
        return self._cv2.waitKey(1) & 0xFF not in (ord("q"), 27)

    def close(self) -> None:
        if self._open:
            self._cv2.destroyWindow(self.NAME)
            self._open = False
