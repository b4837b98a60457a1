"""Errors a user can cause. The CLI turns these into one line on stderr and a non-zero exit."""

from __future__ import annotations


class StreamerError(Exception):
    """Base for every error that is the user's to fix (bad input, bad setting, missing model)."""

    exit_code = 2


class ConfigError(StreamerError):
    """A setting has a bad value; the message names the setting."""


class ModelError(StreamerError):
    """A model file is missing, corrupt, of the wrong kind, or not allowed by its licence settings."""


class InputError(StreamerError):
    """An input file is missing, unreadable or not an image/video."""


class NoFaceError(InputError):
    """An image that must contain a face contains none."""


class GalleryError(StreamerError):
    """The gallery file cannot be opened, written, or does not hold what was asked for."""


class SourceError(StreamerError):
    """A video source cannot be opened (and is not a live source that we keep retrying)."""
