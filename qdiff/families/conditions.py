"""Where the conditions of data-free distillation come from: a prompt file, a folder of images.

Data-free distillation still needs *conditions*: a prompt file (one prompt per line)
stands in for a dataset, and image-to-video families take their first frames from a
folder. A condition id is a line of the prompt file (or a class id).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from qdiff.config import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_prompts(path: str | Path) -> list[str]:
    """The non-empty lines of a prompt file (a line starting with '#' is a comment).

    Args:
        path: The prompt file.

    Returns:
        The prompts, stripped, in file order.

    Raises:
        ConfigError: `path` is not a file, or it holds no prompts.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"model.prompts='{path}' is not a file. Give a text file with one "
                          f"prompt per line, for example configs/prompts/coco-captions-sample.txt.")
    prompts = [line.strip() for line in file.read_text().splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise ConfigError(f"model.prompts='{path}' holds no prompts; write one prompt per line.")
    return prompts


def read_images(path: str | Path) -> list[Image.Image]:
    """The images of a folder (PNG, JPEG, WebP), in name order, as RGB.

    Args:
        path: The folder of images.

    Returns:
        The images.

    Raises:
        ConfigError: `path` is not a folder, holds no image files, or an image cannot be read.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"model.images='{path}' is not a folder. Give a folder of first "
                          f"frames ({', '.join(IMAGE_SUFFIXES)}).")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"model.images='{path}' holds no {'/'.join(IMAGE_SUFFIXES)} files.")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        except OSError as error:
            raise ConfigError(f"{file}: not a readable image ({error}); replace or remove it.") from None
    return images
