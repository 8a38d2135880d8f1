"""Avatar stills: made once, then served from the cache; only stills made count against api.stills_per_min."""

from __future__ import annotations

import subprocess

import imageio_ffmpeg
import pytest

from latentsync.config import uploaded_avatar_video
from latentsync.serving.avatars.catalogue import AvatarError
from latentsync.serving.avatars.stills import StillCache
from tests.datafiles import media_file

AVATAR = "av-0123456789ab"


@pytest.fixture
def cache_dir(tmp_path):
    video = uploaded_avatar_video(tmp_path, AVATAR)
    video.parent.mkdir(parents=True)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(media_file("video/nanmote002.mp4"))]
    subprocess.run([*cmd, "-t", "2", "-an", "-c", "copy", str(video)], check=True)
    return tmp_path


def test_only_a_still_that_is_made_asks_the_rate_limit(cache_dir):
    stills = StillCache(cache_dir)
    asked = []

    def refuse() -> bool:
        asked.append(1)
        return False

    with pytest.raises(AvatarError) as err:  # not in the cache: refused before any decoding
        stills.still(AVATAR, (64, 64), "contain", "#000000", may_render=refuse)
    assert err.value.code == "rate_limited" and len(asked) == 1
    jpeg = stills.still(AVATAR, (64, 64), "contain", "#000000", may_render=lambda: True)
    assert jpeg[:2] == b"\xff\xd8"
    assert stills.still(AVATAR, (64, 64), "contain", "#000000", may_render=refuse) == jpeg  # from the cache
    assert len(asked) == 1
