"""SGLang frontend programs with real video input: ``sgl.video`` sent as a video file through ``video_data``.

SGLang 0.5.23's HTTP frontend backend (``sgl.RuntimeEndpoint``) sends at most one image, and ``sgl.video(path,
num_frames)`` reaches the server as that image: a string of concatenated JPEG frames which the Qwen-VL
processors cannot decode, behind the chat template's *image* placeholder. :class:`MediaEndpoint` sends every
``sgl.image`` as ``image_data`` and every ``sgl.video`` as the video file itself (``video_data``, a ``data:``
URL, so a remote server works too), and puts the model's video placeholder where the program added the video.
The server then samples frames with its own video settings (SGLang's ``--mm-process-config``), as it does for
``video_data`` and OpenAI ``video_url`` requests; ``num_frames`` only affects the frames the stock frontend
extracts (with OpenCV) and this backend does not send.
"""

from __future__ import annotations

import base64
import mimetypes

import sglang as sgl

from .runtime.media import QWEN_VL_VIDEO


class MediaEndpoint(sgl.RuntimeEndpoint):
    """``sgl.RuntimeEndpoint`` that sends all images of a program and its videos as video files.

    Args (beyond ``RuntimeEndpoint``'s):
        video_token: the text that stands for one video in the model's prompt format (default: Qwen-VL's).
    """

    def __init__(self, *args, video_token: str = QWEN_VL_VIDEO, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.video_token = video_token

    def _add_images(self, s, data: dict) -> None:
        if not s.images_:
            return
        # The interpreter records sgl.image and sgl.video alike in ``images_``, a video's data prefixed "video:".
        is_video = [encoded.startswith("video:") for _, encoded in s.images_]
        images = [encoded for (_, encoded), v in zip(s.images_, is_video) if not v]
        videos = [video_data_url(path) for (path, _), v in zip(s.images_, is_video) if v]
        if images:
            data["image_data"] = images
        if videos:
            data["video_data"] = videos
            texts = data["text"]
            rewritten = [self._place_videos(t, is_video) for t in (texts if isinstance(texts, list) else [texts])]
            data["text"] = rewritten if isinstance(texts, list) else rewritten[0]

    def _place_videos(self, text: str, is_video: list[bool]) -> str:
        """Replace the image placeholder the interpreter wrote for each video with the video placeholder."""
        image_token = self.chat_template.image_token
        parts = text.split(image_token)
        if len(parts) != len(is_video) + 1:
            raise ValueError(f"the prompt holds {len(parts) - 1} media placeholders {image_token!r} for "
                             f"{len(is_video)} sgl.image/sgl.video items; cannot tell which one is a video")
        out = [parts[0]]
        for v, part in zip(is_video, parts[1:]):
            out += [self.video_token if v else image_token, part]
        return "".join(out)


def video_data_url(path: str) -> str:
    """A video file as a ``data:`` URL (what ``video_data`` and OpenAI ``video_url`` parts accept)."""
    mime = mimetypes.guess_type(path)[0] or "video/mp4"
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode()
