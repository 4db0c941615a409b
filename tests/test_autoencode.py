"""`python -m emu2_jax.autoencode` on a freshly initialised tiny decoder-stage checkpoint."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import decoder
from emu2_jax import autoencode
from tests import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A decoder-stage workdir whose latest checkpoint (step 1) holds the tiny model's initial state."""
    return cli.write_initial_checkpoint(tmp_path_factory.mktemp("decoder_run"), decoder.get_config("tiny"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "in.png"
    pixels = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def test_command_writes_png_of_decoder_size(workdir, image, tmp_path):
    out = tmp_path / "out" / "recon.png"
    result = subprocess.run(
        [sys.executable, "-m", "emu2_jax.autoencode", f"--checkpoint={workdir}", f"--image={image}",
         f"--out={out}", "--steps=3", "--guidance=3.0", "--seed=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Wrote" in result.stderr and "(32x32)" in result.stderr
    decoded = np.asarray(Image.open(out))
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8
    assert decoded.std() > 0  # a picture, not a constant fill


def test_missing_checkpoint_is_a_clear_error(tmp_path, image):
    with pytest.raises(SystemExit, match="no such file"):
        autoencode.autoencode(str(tmp_path / "nowhere"), image, str(tmp_path / "o.png"))
    with pytest.raises(SystemExit, match="no training checkpoint"):
        autoencode.autoencode(str(tmp_path), image, str(tmp_path / "o.png"))


def test_unreadable_image_is_a_clear_error(workdir, tmp_path):
    with pytest.raises(SystemExit, match="cannot read it"):
        autoencode.autoencode(str(workdir), str(tmp_path / "missing.png"), str(tmp_path / "o.png"))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="not a readable image"):
        autoencode.autoencode(str(workdir), str(garbage), str(tmp_path / "o.png"))


@pytest.mark.parametrize("argument, expected", [
    ("--steps=0", "--steps=0: must be >= 1"),
    ("--out={tmp_path}", "--out={tmp_path}: is a directory; name the PNG file to write"),
])
def test_bad_arguments_are_refused_before_loading(tmp_path, image, argument, expected):
    # The checkpoint does not exist either: the arguments are checked before anything is read.
    command = [sys.executable, "-m", "emu2_jax.autoencode", f"--checkpoint={tmp_path / 'nowhere'}",
               f"--image={image}", f"--out={tmp_path / 'o.png'}", argument.format(tmp_path=tmp_path)]
    result = cli.run(command)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [expected.format(tmp_path=tmp_path)], result.stderr[-3000:]
