"""The one place that opens "a gallery": an SQLite file by path, or a shared PostgreSQL one by URL.

Everything that takes `--gallery` or the `gallery` settings (engine, matcher, CLI) opens it here, so a
postgresql:// URL works wherever a file does. Both classes have the same methods, semantics and errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from streamer.errors import GalleryError
from streamer.match.gallery_pg import is_url, redact

if TYPE_CHECKING:
    from streamer.match.gallery import Gallery
    from streamer.match.gallery_pg import PgGallery

AnyGallery = Union["Gallery", "PgGallery"]

__all__ = ["AnyGallery", "describe", "is_url", "location", "open_gallery"]


def location(where: Any) -> Any:
    """A gallery location from a path, a URL (str or SecretStr) or the `gallery` settings section
    (its url, else its path); None when there is none."""
    if where is None:
        return None
    if hasattr(where, "url") and hasattr(where, "path"):  # GallerySettings
        return where.url if where.url is not None else where.path
    return where


def _text(where: Any) -> Any:
    return where.get_secret_value() if hasattr(where, "get_secret_value") else where


def describe(where: Any) -> str:
    """How messages name the gallery: the path, or the URL without its password."""
    where = _text(location(where))
    return redact(where) if is_url(where) else str(where)


def open_gallery(where: Any, *, create: bool = False, readonly: bool = False) -> AnyGallery:
    """`Gallery(path)` or `PgGallery(url)` with the same create/readonly meaning; `where` as for `location`."""
    where = location(where)
    if where is None:
        raise GalleryError("no gallery given: pass --gallery PATH or URL, or set gallery.path or gallery.url")
    text = _text(where)
    if is_url(text):
        from streamer.match.gallery_pg import PgGallery

        return PgGallery(text, create=create, readonly=readonly)
    from streamer.match.gallery import Gallery

    return Gallery(Path(text), create=create, readonly=readonly)
