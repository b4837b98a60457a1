"""Hostile images: a file's header, not its size, says what decoding costs. A 629-byte JPEG that declares
20000x20000 cost 2.4 GB in cv2.imdecode before anything could refuse it; now `limits.max_image_pixels` is
checked against the header first and the refusal is one line."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamer.config import load_settings
from streamer.engine import FaceEngine, load_image
from streamer.errors import ConfigError, InputError
from streamer.imaging import declared_size, decode_image, read_image

REPO = Path(__file__).resolve().parents[1]
SETTING = "limits.max_image_pixels (STREAMER_LIMITS__MAX_IMAGE_PIXELS)"


def _scene(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.dstack([x * 3 % 256, y * 5 % 256, (x + y) % 256]).astype(np.uint8)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose frame header (SOF0) is rewritten to declare `width` x `height`: what an
    attacker sends. libjpeg decodes it to the declared size (grey past the real data)."""
    ok, buffer = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 30])
    data = bytearray(buffer.tobytes())
    sof = data.find(b"\xff\xc0")
    assert ok and sof > 0 and struct.unpack(">HH", data[sof + 5 : sof + 9]) == (16, 16)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png_declaring(width: int, height: int) -> bytes:
    """A real 16x16 PNG whose IHDR declares `width` x `height`, its CRC fixed so decoders accept it."""
    ok, buffer = cv2.imencode(".png", np.full((16, 16, 3), 128, np.uint8))
    data = bytearray(buffer.tobytes())
    ihdr = data.find(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


# -- the header is read without decoding, for every format OpenCV and Pillow share ----------------------------


@pytest.mark.parametrize(
    "suffix", [".jpg", ".png", ".bmp", ".webp", ".tiff", ".gif", ".ppm", ".pgm", ".jp2", ".avif", ".sr"]
)
def test_declared_size_matches_the_decoded_image(suffix):
    image = _scene(45, 70)  # JPEG 2000's default 6 resolution levels need 32 pixels a side
    ok, buffer = cv2.imencode(suffix, image[:, :, 0] if suffix == ".pgm" else image)
    assert ok
    data = buffer.tobytes()
    assert declared_size(data) == (70 * 45, "70x45 (0.0 megapixels)")
    decoded = decode_image(data, max_pixels=70 * 45, name=f"x{suffix}")
    assert decoded.shape == (45, 70, 3) and decoded.dtype == np.uint8
    with pytest.raises(InputError, match=rf"x\{suffix}: image is 70x45 .*over the limit"):
        decode_image(data, max_pixels=70 * 45 - 1, name=f"x{suffix}")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "not an image"),
        (b"hello, this is text\n" * 10, "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "not an image"),  # a JPEG start and nothing after
    ],
)
def test_non_images_are_refused_in_words(data, words):
    with pytest.raises(InputError, match=f"^a.bin: {words}"):
        decode_image(data, max_pixels=10**6, name="a.bin")


# -- the fault: a small file, a huge declared size ---------------------------------------------------------------


def test_crafted_header_decodes_to_its_declared_size_so_it_must_be_checked_first(tmp_path):
    """The crafted file is no toy: OpenCV really allocates and fills what the header declares (shown at
    2000x1500, 9 MB, instead of 2.4 GB), and load_image used to hand it on."""
    data = jpeg_declaring(2000, 1500)
    assert len(data) < 1000
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (1500, 2000, 3)
    path = tmp_path / "small.jpg"
    path.write_bytes(data)
    assert load_image(path).shape == (1500, 2000, 3)  # 3 MP: under the default cap
    with pytest.raises(InputError) as caught:
        load_image(path, max_pixels=1_000_000)
    message = str(caught.value)
    assert message.startswith(f"{path}: image is 2000x1500 (3.0 megapixels), over the limit of 1 megapixels")
    assert SETTING in message and "\n" not in message


@pytest.mark.parametrize("craft", [jpeg_declaring, png_declaring])
@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (10000, 10000), (65535, 65535)])
def test_huge_declared_sizes_are_refused_without_a_pillow_warning(tmp_path, craft, width, height):
    path = tmp_path / "bomb.img"
    path.write_bytes(craft(width, height))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError) as refused:
            read_image(path, max_pixels=40_000_000)
    assert not caught  # Pillow's DecompressionBombWarning (over 89 MP) stays off the user's terminal
    message = str(refused.value)
    assert SETTING in message and "over the limit of 40 megapixels" in message and "\n" not in message
    # Up to Pillow's own refusal (179 MP) the message gives the size; beyond it, the bound.
    assert f"{width}x{height}" in message if width * height < 178_956_970 else "more than 179 megapixels" in message


# The child reports its own peak (VmHWM, which exec resets): the rusage of a child forked from a pytest
# process that has grown to a gigabyte would report the parent's pages, not what `streamer` itself used.
_MEASURED = """
import atexit, sys
def _peak():
    with open("/proc/self/status") as status, open(sys.argv.pop(1), "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(_peak)
from streamer.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _run_measured(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, int]:
    """Exit code, stderr and peak RSS (kB) of one `streamer` process, as the process itself saw it."""
    err_path = cwd / "stderr.txt"
    peak_path = cwd / "peak.txt"
    with open(err_path, "wb") as err:
        proc = subprocess.run([sys.executable, "-c", _MEASURED, str(peak_path), *args], env=env, cwd=cwd,
                              stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    return proc.returncode, err_path.read_text(errors="replace"), int(peak_path.read_text())


@pytest.mark.usefixtures("model_dir")
def test_streamer_detect_refuses_the_bomb_in_one_line_and_bounded_memory(tmp_path):
    """Through the real entry point: before, `streamer detect` on this 629-byte file peaked at 2.4 GB and
    printed "0 face(s)" (or a traceback under a memory limit)."""
    (tmp_path / "bomb.jpg").write_bytes(jpeg_declaring(20000, 20000))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
    env["STREAMER_MODEL_DIR"] = os.environ.get("STREAMER_MODEL_DIR", str(REPO.parent / "shared" / "models"))
    code, err, peak_kb = _run_measured(["detect", "bomb.jpg"], env, tmp_path)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("streamer: error: bomb.jpg: image is ") and SETTING in lines[0]
    assert peak_kb < 700_000, f"peak RSS {peak_kb} kB"  # the models load first; the decode alone was 1.2 GB


def test_the_limit_is_a_setting_the_engine_honours(tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), _scene(300, 400))
    for key in [k for k in os.environ if k.startswith("STREAMER_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("STREAMER_LIMITS__MAX_IMAGE_PIXELS", "100000")
    settings = load_settings()
    assert settings.limits.max_image_pixels == 100_000
    # analyze() decodes before it loads a model, so the refusal costs no model load.
    with pytest.raises(InputError, match=r"photo.png: image is 400x300 \(0.1 megapixels\), over the limit of 0.1 "):
        FaceEngine(settings).analyze(path)
    monkeypatch.setenv("STREAMER_LIMITS__MAX_IMAGE_PIXELS", "120000")
    assert load_image(path, load_settings().limits.max_image_pixels).shape == (300, 400, 3)


@pytest.mark.parametrize("value", ["0", "1000000000", "-5", "lots"])
def test_the_limit_itself_is_bounded(monkeypatch, value):
    monkeypatch.setenv("STREAMER_LIMITS__MAX_IMAGE_PIXELS", value)
    with pytest.raises(ConfigError, match=r"setting limits\.max_image_pixels \(STREAMER_LIMITS__MAX_IMAGE_PIXELS\)"):
        load_settings()
