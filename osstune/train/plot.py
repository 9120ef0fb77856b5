"""The loss-curve PNG: drawn with matplotlib when it is installed (`osstune[logging]`), otherwise
with the small rasterizer below (lines, axes, tick labels in a 3x5 pixel font), so a run always
leaves a picture of its loss."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

# 3x5 glyphs, rows top to bottom, 3 bits each (MSB = left column).
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
    " ": (0, 0, 0, 0, 0), "a": (0, 7, 1, 7, 7), "e": (7, 5, 7, 4, 7), "i": (2, 0, 2, 2, 2),
    "l": (4, 4, 4, 4, 7), "n": (0, 6, 5, 5, 5), "o": (0, 7, 5, 5, 7), "p": (7, 5, 7, 4, 4),
    "r": (0, 7, 4, 4, 4), "s": (7, 4, 7, 1, 7), "t": (4, 7, 4, 4, 7), "v": (0, 5, 5, 5, 2),
}
BLUE, ORANGE, GREY, BLACK = (31, 119, 180), (255, 127, 14), (200, 200, 200), (40, 40, 40)


class _Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def dot(self, x: int, y: int, c: tuple[int, int, int], size: int = 1) -> None:
        for dx in range(size):
            for dy in range(size):
                xx, yy = x + dx, y + dy
                if 0 <= xx < self.w and 0 <= yy < self.h:
                    i = (yy * self.w + xx) * 3
                    self.px[i : i + 3] = bytes(c)

    def line(self, x0: int, y0: int, x1: int, y1: int, c: tuple[int, int, int], width: int = 2) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for k in range(n + 1):
            self.dot(round(x0 + (x1 - x0) * k / n), round(y0 + (y1 - y0) * k / n), c, width)

    def text(self, x: int, y: int, s: str, c: tuple[int, int, int] = BLACK, scale: int = 2) -> None:
        for ch in s.lower():
            for row, bits in enumerate(_FONT.get(ch, _FONT[" "])):
                for col in range(3):
                    if bits >> (2 - col) & 1:
                        self.dot(x + col * scale, y + row * scale, c, scale)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3 : (y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def plot_loss(path: Path, train: list[tuple[int, float]], eval_: list[tuple[int, float]] = ()) -> None:
    """Write train (blue line) and eval (orange dots) loss against step."""
    if not train and not eval_:
        return
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        _plot_raster(path, train, eval_)
        return
    _plot_matplotlib(path, train, eval_)


def _plot_matplotlib(path: Path, train, eval_) -> None:
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], color="tab:blue", lw=1.5, label="train loss")
    if eval_:
        ax.plot([s for s, _ in eval_], [v for _, v in eval_], "o-", color="tab:orange", ms=5, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean cross-entropy per trained token)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def _plot_raster(path: Path, train, eval_, w: int = 640, h: int = 400) -> None:
    cv = _Canvas(w, h)
    left, right, top, bottom = 70, w - 20, 30, h - 40
    points = list(train) + list(eval_)
    if not points:
        return
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def to_px(step: float, loss: float) -> tuple[int, int]:
        return (
            round(left + (step - x0) / (x1 - x0) * (right - left)),
            round(bottom - (loss - y0) / (y1 - y0) * (bottom - top)),
        )

    for k in range(5):  # horizontal grid with loss labels
        y = bottom - k * (bottom - top) // 4
        cv.line(left, y, right, y, GREY, 1)
        cv.text(4, y - 5, _fmt(y0 + (y1 - y0) * k / 4))
    cv.line(left, top, left, bottom, BLACK, 1)
    cv.line(left, bottom, right, bottom, BLACK, 1)
    cv.text(left, bottom + 10, _fmt(x0))
    cv.text(right - 4 * 2 * len(_fmt(x1)), bottom + 10, _fmt(x1))
    cv.text((left + right) // 2 - 16, bottom + 20, "step")
    for a, b in zip(train, train[1:]):
        cv.line(*to_px(*a), *to_px(*b), BLUE)
    for p in eval_:
        x, y = to_px(*p)
        cv.dot(x - 3, y - 3, ORANGE, 7)
    cv.text(left + 10, 8, "train loss", BLUE)
    if eval_:
        cv.text(left + 120, 8, "eval loss", ORANGE)
    path.write_bytes(cv.png())
