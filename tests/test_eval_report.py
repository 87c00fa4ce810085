"""``editrl.cluster.eval_report``: the page's tables, media and plots, parsed and in a headless browser."""
import functools
import http.server
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from editrl.cluster.eval_report import CATEGORY_PLOT, DIMENSION_PLOT, MediaFile, PromptMedia, write_report
from editrl.cluster.eval_stats import EvalSample, build_results

CHROMIUM = Path("/usr/bin/chromium")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# poster colour per (prompt, clip): pure saturated blocks the browser test looks for in the screenshot
POSTERS = {
    ("p1", "source"): (0, 0, 255), ("p1", "base"): (255, 0, 0), ("p1", "lora"): (0, 255, 0),
    ("p2", "source"): (255, 255, 0), ("p2", "base"): (255, 0, 255), ("p2", "lora"): (0, 255, 255),
}
# rewards per (arm, prompt): (seed 0, seed 1) -> mean over seeds
#   base p1 (colour): (1, 3) -> 2   p2 (style): (5, 7) -> 6   all: mean 4, SEM |2 - 6| / 2 = 2
#   lora p1 (colour): (4, 6) -> 5   p2 (style): (6, 8) -> 7   all: mean 6, SEM |5 - 7| / 2 = 1
# lora - base per prompt: 3, 1 -> mean 2, SE std(3, 1) / sqrt(2) = sqrt(2) / sqrt(2) = 1; 2 wins -> p = 2 * 0.5**2 = 0.5
REWARDS = {("base", "p1"): (1.0, 3.0), ("base", "p2"): (5.0, 7.0), ("lora", "p1"): (4.0, 6.0), ("lora", "p2"): (6.0, 8.0)}
CATEGORY = {"p1": "colour", "p2": "style"}
INSTRUCTION = {"p1": "make it <b>red</b> & bright", "p2": "paint it like a watercolour"}


def eval_samples(two_configs: bool = False) -> list[EvalSample]:
    samples = [EvalSample(arm, prompt, CATEGORY[prompt], seed, reward, {"fidelity": reward / 2})
               for (arm, prompt), rewards in REWARDS.items() for seed, reward in enumerate(rewards)]
    if two_configs:  # a second config that ranks the same outputs the same way (squares)
        samples += [EvalSample(s.arm, s.prompt_id, s.edit_category, s.seed, s.reward**2, {}, "strict") for s in samples]
    return samples


def write_mp4(path: Path, colour_offset: int) -> None:
    """Five 64x64 frames of distinct flat colours, H.264 yuv420p."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(5):
            frame = np.zeros((64, 64, 3), dtype=np.uint8)
            frame[..., (i + colour_offset) % 3] = 50 * (i + 1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_media(directory: Path) -> list[PromptMedia]:
    (directory / "media").mkdir(parents=True)
    files = {}
    for i, ((prompt, clip), colour) in enumerate(POSTERS.items()):
        write_mp4(directory / "media" / f"{prompt}_{clip}.mp4", i)
        Image.new("RGB", (64, 64), colour).save(directory / "media" / f"{prompt}_{clip}.png")
        files[prompt, clip] = MediaFile(f"media/{prompt}_{clip}.mp4", f"media/{prompt}_{clip}.png")
    return [PromptMedia(p, INSTRUCTION[p], files[p, "source"], {"base": files[p, "base"], "lora": files[p, "lora"]})
            for p in ("p1", "p2")]


class ReportParser(HTMLParser):
    """Tables (class -> list of tables, each a list of rows of cell texts), videos, images and text."""

    def __init__(self):
        super().__init__()
        self.tables, self.videos, self.images, self.text, self._cell = {}, [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.setdefault(attrs.get("class"), []).append([])
            self._table = self.tables[attrs.get("class")][-1]
        elif tag == "tr":
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "video":
            self.videos.append(attrs)
        elif tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture
def report(tmp_path) -> Path:
    return write_report(tmp_path, build_results(eval_samples(), arms=["base", "lora"]), write_media(tmp_path))


def test_report_tables_hold_the_numbers(report):
    page = parse(report)
    ((header, base, lora),) = page.tables["category-reward"]
    assert header == ["arm", "colour", "style", "all"]
    # one prompt per category: the SEM is undefined
    assert base == ["base", "2.000 ± n/a", "6.000 ± n/a", "4.000 ± 2.000"]
    assert lora == ["lora", "5.000 ± n/a", "7.000 ± n/a", "6.000 ± 1.000"]
    ((header, *rows),) = page.tables["dimensions"]
    assert header == ["arm / category", "fidelity"]
    assert ["base / all", "2.000 ± 1.000"] in rows  # fidelity = reward / 2
    ((header, *rows),) = page.tables["paired"]
    assert ["lora − base", "default", "reward", "2.000 ± 1.000", "2", "2 / 0 / 0", "0.500"] in rows
    assert all(r[0] == "lora − base" for r in rows)  # the mirror pair base − lora is not repeated
    assert "agreement" not in page.tables  # one reward config


def test_report_videos_and_captions(report):
    page = parse(report)
    assert len(page.videos) == 6
    for video in page.videos:
        assert (report.parent / video["src"]).is_file() and video["src"].endswith(".mp4")
        assert (report.parent / video["poster"]).is_file() and video["poster"].endswith(".png")
        assert {"controls", "muted", "loop", "playsinline"} <= video.keys()
    text = " ".join(page.text)
    assert "reward 2.000 (mean of 2 seeds)" in text and "reward 7.000 (mean of 2 seeds)" in text
    assert "make it <b>red</b> & bright" in text  # escaped, so it reads back as text
    assert "<b>red</b>" not in report.read_text() and "make it &lt;b&gt;red&lt;/b&gt; &amp; bright" in report.read_text()


def test_report_plots_are_valid_pngs(report):
    page = parse(report)
    assert {img["src"] for img in page.images} == {CATEGORY_PLOT, DIMENSION_PLOT}
    for name in (CATEGORY_PLOT, DIMENSION_PLOT):
        path = report.parent / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.size[0] > 100 and len(set(image.convert("RGB").getdata())) > 10
    assert "http://" not in report.read_text() and "https://" not in report.read_text()
    assert "<script" not in report.read_text()


def test_report_with_two_configs_shows_agreement(tmp_path):
    results = build_results(eval_samples(two_configs=True), arms=["base", "lora"], n_boot=200)
    page = parse(write_report(tmp_path, results, write_media(tmp_path)))
    assert len(page.tables["category-reward"]) == 2
    strict = page.tables["category-reward"][1]
    # strict = reward squared: base p1 (1 + 9) / 2 = 5, p2 (25 + 49) / 2 = 37 -> mean 21, SEM |5 - 37| / 2 = 16
    assert strict[1] == ["base", "5.000 ± n/a", "37.000 ± n/a", "21.000 ± 16.000"]
    ((header, row),) = page.tables["agreement"]
    assert row[:3] == ["default vs strict", "reward", "1.000"] and row[4] == "8"
    assert "default: reward 2.000 (mean of 2 seeds); strict: reward 5.000 (mean of 2 seeds)" in " ".join(page.text)


def test_report_refuses_missing_media(tmp_path):
    media = [PromptMedia("p1", "x", MediaFile("media/none.mp4", "media/none.png"))]
    with pytest.raises(FileNotFoundError, match="none.mp4"):
        write_report(tmp_path, build_results(eval_samples()), media)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def chromium(url: str, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *flags, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def near(pixels: np.ndarray, colour, tolerance: int = 12) -> np.ndarray:
    """Mask of the pixels within ``tolerance`` of ``colour`` in every channel."""
    return np.all(np.abs(pixels.astype(int) - np.array(colour)) <= tolerance, axis=-1)


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path_factory):
    from editrl.cluster.eval_report import HEADER_BACKGROUND

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(report.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/report.html"
        work = tmp_path_factory.mktemp("chromium")
        shot = work / "shot.png"
        chromium(url, work / "profile", f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars")
        dom = chromium(url, work / "profile-dom", "--dump-dom").stdout
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

    assert shot.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, plots and posters, not a blank page
    # every poster is drawn: a block of its pure colour, scaled into the 192x192 video box
    for (prompt, clip), colour in POSTERS.items():
        assert near(pixels, colour, tolerance=3).sum() > 100 * 100, f"poster of {prompt}/{clip} {colour} not on screen"
    # the tables are drawn: header cells in their background colour, with dark text in those rows
    header = tuple(int(HEADER_BACKGROUND[i:i + 2], 16) for i in (1, 3, 5))
    rows = np.flatnonzero(near(pixels, header, tolerance=2).sum(axis=1) > 50)
    assert rows.size > 0, "no table header on screen"
    assert (pixels[rows].max(axis=-1) < 80).sum() > 100, "table headers show no text"

    page = ReportParser()
    page.feed(dom)
    ((header_row, base, lora),) = page.tables["category-reward"]
    assert base[-1] == "4.000 ± 2.000" and lora[-1] == "6.000 ± 1.000"
    assert len(page.videos) == 6 and all(v["src"].endswith(".mp4") and v["poster"].endswith(".png") for v in page.videos)
