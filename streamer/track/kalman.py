"""Constant-velocity Kalman filter over face boxes, batched over all tracks of a stream.

State (8,): cx, cy, aspect (w/h), h and their velocities; measurement (4,): cx, cy, aspect, h.
Noise is scaled by the box height as in ByteTrack/DeepSORT, so a big close face and a small far one
move by comparable fractions of themselves. Every function takes stacked arrays (M, 8) / (M, 8, 8):
one numpy call per frame for all tracks instead of a Python loop per track.
"""

from __future__ import annotations

import numpy as np

# ByteTrack's weights: position noise 1/20 of the height, velocity noise 1/160 of the height per frame.
_STD_POSITION = 1.0 / 20
_STD_VELOCITY = 1.0 / 160

_NDIM = 4
_MOTION = np.eye(2 * _NDIM)
_MOTION[:_NDIM, _NDIM:] = np.eye(_NDIM)  # x' = x + v (dt = one frame)
_UPDATE = np.eye(_NDIM, 2 * _NDIM)  # measurement = position part of the state


def xyxy_to_xyah(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w = boxes[:, 2] - boxes[:, 0]
    h = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-6)
    # Columns written into one array rather than np.stack-ed: these run several times a frame on a handful of
    # boxes, where each numpy call's fixed cost is what they cost.
    out = np.empty((len(boxes), 4))
    out[:, 0] = boxes[:, 0] + w / 2
    out[:, 1] = boxes[:, 1] + h / 2
    out[:, 2] = w / h
    out[:, 3] = h
    return out


def xyah_to_xyxy(xyah: np.ndarray) -> np.ndarray:
    xyah = np.asarray(xyah, dtype=np.float64).reshape(-1, 4)
    # A long-lost track can predict a shrinking height; keep boxes valid for IoU.
    h = np.maximum(xyah[:, 3], 1.0)
    w = xyah[:, 2] * h
    cx, cy = xyah[:, 0], xyah[:, 1]
    out = np.empty((len(xyah), 4))
    out[:, 0] = cx - w / 2
    out[:, 1] = cy - h / 2
    out[:, 2] = cx + w / 2
    out[:, 3] = cy + h / 2
    return out


def initiate(measurements: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """New tracks from (M, 4) xyah measurements: zero velocity, wide uncertainty on it."""
    measurements = np.asarray(measurements, dtype=np.float64).reshape(-1, _NDIM)
    m = len(measurements)
    mean = np.concatenate([measurements, np.zeros((m, _NDIM))], axis=1)
    h = measurements[:, 3]
    std = np.stack(
        [
            2 * _STD_POSITION * h,
            2 * _STD_POSITION * h,
            np.full(m, 1e-2),
            2 * _STD_POSITION * h,
            10 * _STD_VELOCITY * h,
            10 * _STD_VELOCITY * h,
            np.full(m, 1e-5),
            10 * _STD_VELOCITY * h,
        ],
        axis=1,
    )
    cov = np.zeros((m, 2 * _NDIM, 2 * _NDIM))
    idx = np.arange(2 * _NDIM)
    cov[:, idx, idx] = std**2
    return mean, cov


# Noise standard deviations per state component, as height x _SCALE + _FIXED: x, y and h (and their velocities)
# scale with the box height, the aspect ratio's noise (and its velocity's) is fixed.
_PROCESS_SCALE = np.array([_STD_POSITION, _STD_POSITION, 0.0, _STD_POSITION,
                           _STD_VELOCITY, _STD_VELOCITY, 0.0, _STD_VELOCITY])
_PROCESS_FIXED = np.array([0.0, 0.0, 1e-2, 0.0, 0.0, 0.0, 1e-5, 0.0])
_MEASUREMENT_SCALE = np.array([_STD_POSITION, _STD_POSITION, 0.0, _STD_POSITION])
_MEASUREMENT_FIXED = np.array([0.0, 0.0, 1e-1, 0.0])
_DIAGONAL = np.arange(2 * _NDIM)


def predict(mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One frame ahead for every track at once.

    The motion matrix F = [[I, I], [0, I]] is applied as the additions it stands for (x' = x + v, and
    F P F^T as two block additions): the same sums matmul forms with F's ones and zeros, without the
    (M, 8, 8) products.
    """
    m = len(mean)
    if m == 0:
        return mean, cov
    std = mean[:, 3:4] * _PROCESS_SCALE + _PROCESS_FIXED
    new_mean = mean.copy()
    new_mean[:, :_NDIM] += mean[:, _NDIM:]
    rows = cov.copy()  # F P: position rows gain the velocity rows
    rows[:, :_NDIM, :] += cov[:, _NDIM:, :]
    new_cov = rows.copy()  # (F P) F^T: position columns gain the velocity columns
    new_cov[:, :, :_NDIM] += rows[:, :, _NDIM:]
    new_cov[:, _DIAGONAL, _DIAGONAL] += std**2
    return new_mean, new_cov


def update(mean: np.ndarray, cov: np.ndarray, measurements: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correct (M,) tracks with their matched (M, 4) xyah measurements."""
    m = len(mean)
    if m == 0:
        return mean, cov
    std = mean[:, 3:4] * _MEASUREMENT_SCALE + _MEASUREMENT_FIXED
    projected_mean = mean[:, :_NDIM]
    hp = cov[:, :_NDIM, :]  # H P (M, 4, 8): H only selects the position rows
    s = hp[:, :, :_NDIM].copy()  # H P H^T (M, 4, 4)
    s[:, _DIAGONAL[:_NDIM], _DIAGONAL[:_NDIM]] += std**2
    # K^T = S^-1 H P (S is symmetric); batched solve instead of an explicit inverse.
    gain_t = np.linalg.solve(s, hp)  # (M, 4, 8)
    innovation = np.asarray(measurements, dtype=np.float64) - projected_mean
    new_mean = mean + np.einsum("mi,mij->mj", innovation, gain_t)
    # P - K S K^T  ==  P - (P H^T) S^-1 (H P)
    new_cov = cov - np.swapaxes(hp, 1, 2) @ gain_t
    return new_mean, new_cov
