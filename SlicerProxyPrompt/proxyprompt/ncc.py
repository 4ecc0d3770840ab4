"""Normalised cross-correlation (NCC) of a template at every translation over an image, n-D, by FFT: the engine's
one NCC search (3D structure location in `registration`, 2D slice alignment in `generators.support_memory`).

NCC at a shift = sum((f - mean f)(t - mean t)) / sqrt(sum (f - mean f)^2 * sum (t - mean t)^2) over the template's
voxels (all of them, or those of its mask) and the image voxels under them. `NccImage.search` computes it in one of
two forms:

* rectangular template, positions where it lies wholly inside the image (`mask=None`): one FFT correlation with the
  centred template (circular at the image's size: exact for positions that fit), window sums of the image from
  cumulative-sum tables; windows with less contrast than `contrast_floor` x the image's variance score -1;
* masked template, every shift with some overlap (`mask` given; the image is zero outside): the sums over the image
  under the mask are FFT correlations (FFT size padded to 2-3-5 factors), the template's own sums over the
  overlapping part are box sums; shifts overlapping less than `min_overlap` of the template's mask score -1,
  shifts without contrast 0.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """NCC of two equally shaped arrays (e.g. the voxels of a mask in two images); 0 when either is flat."""
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def fast_size(n: int) -> int:
    """Smallest size >= n whose prime factors are 2, 3 and 5 (fast FFT)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _box_sums(values: np.ndarray, fixed_shape, out_shape) -> np.ndarray:
    """For every shift u, the sum of `values` (template-sized, flipped as in the FFT) over the part
    of the template that overlaps the fixed image: a box sum, separable along the axes (no FFT)."""
    result = values
    for axis in range(values.ndim):
        t, f = values.shape[axis], fixed_shape[axis]
        u = np.arange(out_shape[axis])
        # flipped template index y overlaps fixed index u - y, valid when 0 <= u - y < f
        lo = np.clip(u - f + 1, 0, t)
        hi = np.clip(u + 1, 0, t)
        padded_shape = list(result.shape)
        padded_shape[axis] = 1
        cumulative = np.concatenate([np.zeros(padded_shape), np.cumsum(result, axis=axis)], axis=axis)
        result = np.take(cumulative, hi, axis=axis) - np.take(cumulative, lo, axis=axis)
    return result


class NccTemplate:
    """A rectangular template prepared for searches over several images: its centred values, its norm and the
    conjugate FFT of the centred values per image shape (cached), so searching the same template over many
    equally shaped images (one per target slice) transforms it once. Bit-identical to passing the array."""

    def __init__(self, template: np.ndarray) -> None:
        values = np.asarray(template, dtype=np.float64)
        self.shape = values.shape
        self.size = values.size
        self.centred = values - values.mean()
        self.norm = float(np.sqrt((self.centred ** 2).sum()))
        self._spectra = {}

    def conj_spectrum(self, shape) -> np.ndarray:
        shape = tuple(shape)
        if shape not in self._spectra:
            axes = tuple(range(len(shape)))
            self._spectra[shape] = np.conj(np.fft.rfftn(self.centred, s=shape, axes=axes))
        return self._spectra[shape]


class NccImage:
    """An image prepared for NCC template searches: its FFTs (cached per size) and cumulative-sum tables.

    `fft_dtype`: float64, or float32 for large 3D searches (about twice as fast; intensities in [0, 1], the NCC
    arithmetic on the correlations stays in double)."""

    def __init__(self, image: np.ndarray, fft_dtype=np.float64) -> None:
        self.image = np.asarray(image, dtype=np.float64)
        self.fft_dtype = fft_dtype
        self.variance = float(self.image.var())
        self._ffts = {}
        self._tables = None

    def _fft(self, size=None):
        """FFT of the image at its own size (None: the rectangular form, double precision), or (FFT of the image,
        FFT of its square) zero-padded to `size` in `fft_dtype` (the masked form)."""
        if size not in self._ffts:
            axes = tuple(range(self.image.ndim))
            if size is None:
                self._ffts[size] = np.fft.rfftn(self.image, axes=axes)
            else:
                image = self.image.astype(self.fft_dtype)
                self._ffts[size] = (np.fft.rfftn(image, size, axes=axes), np.fft.rfftn(image * image, size, axes=axes))
        return self._ffts[size]

    def _window_sums(self, shape):
        """(sum, sum of squares) of the image over every window of `shape` that fits (inclusion-exclusion over the
        cumulative-sum tables)."""
        if self._tables is None:
            padded = np.pad(self.image, [(1, 0)] * self.image.ndim)
            tables = []
            for table in (padded, padded ** 2):
                for axis in range(self.image.ndim):
                    table = table.cumsum(axis)
                tables.append(table)
            self._tables = tables
        sums = []
        for table in self._tables:
            total = None
            # corners of the window, the last axis varying slowest
            for bits in itertools.product((1, 0), repeat=self.image.ndim):
                index = tuple(slice(n, None) if bit else slice(None, -n)
                              for n, bit in zip(shape, reversed(bits)))
                sign = (-1) ** (self.image.ndim - sum(bits))
                part = table[index]
                total = part if total is None else (total + part if sign > 0 else total - part)
            sums.append(total)
        return sums

    def search(self, template, mask: Optional[np.ndarray] = None, min_overlap: float = 0.0,
               contrast_floor: float = 0.0) -> np.ndarray:
        """NCC of `template` at every translation (see the module docstring).

        mask None: [image - template + 1] map, index u = the template's first voxel on image voxel u; -1 where the
        window's variance is at most `contrast_floor` x the image's variance, and everywhere when the template or
        the image is flat. Mask given (binary, template-sized): [image + template - 1] map, index u <-> template
        voxel x on image voxel x + u - (template shape - 1)."""
        if mask is None:
            prepared = template if isinstance(template, NccTemplate) else NccTemplate(template)
            return self._rectangular(prepared, contrast_floor)
        if isinstance(template, NccTemplate):
            raise ValueError("a masked search takes the template array, not an NccTemplate")
        return self._masked(template, mask, min_overlap)

    def _rectangular(self, template: NccTemplate, contrast_floor: float) -> np.ndarray:
        shape = self.image.shape
        valid = tuple(f - t + 1 for f, t in zip(shape, template.shape))
        norm = template.norm
        if norm < 1e-9 or min(valid) < 1 or self.variance < 1e-12:  # no contrast: nothing matches
            return np.full(tuple(max(v, 0) for v in valid), -1.0)
        axes = tuple(range(len(shape)))
        image_hat = self._fft()
        correlation = np.fft.irfftn(image_hat * template.conj_spectrum(shape), s=shape,
                                    axes=axes)[tuple(slice(0, v) for v in valid)]
        count = template.size
        sum1, sum2 = self._window_sums(template.shape)
        variance = np.maximum(sum2 - sum1 ** 2 / count, 0.0)
        floor = contrast_floor * self.variance * count
        return np.where(variance > floor, correlation / (np.sqrt(np.maximum(variance, floor)) * norm), -1.0)

    def _masked(self, template: np.ndarray, mask: np.ndarray, min_overlap: float) -> np.ndarray:
        fixed_shape = self.image.shape
        axes = tuple(range(len(fixed_shape)))
        shape = tuple(f + t - 1 for f, t in zip(fixed_shape, template.shape))
        fast = tuple(fast_size(s) for s in shape)
        f_hat, ff_hat = self._fft(fast)
        flip = (slice(None, None, -1),) * len(fixed_shape)
        w = mask[flip].astype(np.float64)
        t = template[flip].astype(np.float64) * w
        w_hat = np.fft.rfftn(w.astype(self.fft_dtype), fast, axes=axes)
        wt_hat = np.fft.rfftn(t.astype(self.fft_dtype), fast, axes=axes)

        def correlate(a_hat, b_hat):
            out = np.fft.irfftn(a_hat * b_hat, fast, axes=axes)
            return out[tuple(slice(0, n) for n in shape)].astype(np.float64)

        s_f = correlate(f_hat, w_hat)
        s_ff = correlate(ff_hat, w_hat)
        s_ft = correlate(f_hat, wt_hat)
        count = _box_sums(w, fixed_shape, shape)
        s_t = _box_sums(t, fixed_shape, shape)
        s_tt = _box_sums(t * t, fixed_shape, shape)  # w is binary: (w t)^2 = w t^2
        total = w.sum()
        safe = np.maximum(count, 1.0)
        numerator = s_ft - s_f * s_t / safe
        variance = np.maximum(s_ff - s_f * s_f / safe, 0) * np.maximum(s_tt - s_t * s_t / safe, 0)
        ncc = np.where(variance > 1e-8 * total * total, numerator / np.sqrt(np.maximum(variance, 1e-30)), 0.0)
        # a template taller than the image cannot fit: require a fraction of the best achievable overlap
        ncc[count < min_overlap * min(total, count.max()) - 0.5] = -1.0
        return ncc
