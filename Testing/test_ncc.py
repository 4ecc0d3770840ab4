"""The one NCC search (`proxyprompt.ncc`): both forms against a direct computation, 2D and 3D."""

import numpy as np

import pytest

from proxyprompt.ncc import NccImage, NccTemplate, ncc


def _direct(image, template, mask, corner):
    """NCC with the template's first voxel on image voxel `corner` (may lie outside: zero there)."""
    shape = np.array(image.shape)
    padded = np.pad(image, [(t, t) for t in template.shape])
    start = np.array(corner) + np.array(template.shape)
    window = padded[tuple(slice(s, s + t) for s, t in zip(start, template.shape))]
    inside = np.ones(template.shape, bool)
    for axis, (c, t) in enumerate(zip(corner, template.shape)):
        idx = c + np.arange(t)
        keep = (idx >= 0) & (idx < shape[axis])
        inside &= np.expand_dims(keep, tuple(a for a in range(template.ndim) if a != axis))
    use = (mask > 0) & inside
    return ncc(window[use], template[use])


def test_rectangular_form_matches_direct_ncc_2d():
    rng = np.random.default_rng(3)
    image = rng.random((23, 19))
    template = image[5:12, 4:9] + 0.1 * rng.random((7, 5))
    out = NccImage(image).search(template)
    assert out.shape == (17, 15)
    for corner in [(0, 0), (5, 4), (16, 14), (3, 11)]:
        assert abs(out[corner] - _direct(image, template, np.ones_like(template), corner)) < 1e-9
    assert np.unravel_index(np.argmax(out), out.shape) == (5, 4)
    assert (NccImage(image).search(np.ones((3, 3))) == -1).all()  # a flat template matches nothing
    assert NccImage(image).search(rng.random((30, 3))).size == 0  # does not fit


def test_prepared_template_is_bit_identical_over_several_images():
    """A template prepared once (its FFT per image shape cached) gives exactly the array's result on every image
    it is searched over, and its transform is taken once per shape."""
    rng = np.random.default_rng(5)
    images = [rng.random((23, 19)) for _ in range(3)] + [rng.random((20, 16))]
    template = images[0][5:12, 4:9] + 0.1 * rng.random((7, 5))
    prepared = NccTemplate(template)
    for image in images:
        search = NccImage(image)
        assert np.array_equal(search.search(prepared, contrast_floor=0.05), search.search(template, contrast_floor=0.05))
    assert sorted(prepared._spectra) == [(20, 16), (23, 19)]
    with pytest.raises(ValueError):
        NccImage(images[0]).search(prepared, np.ones((7, 5)))


def test_masked_form_matches_direct_ncc_3d_with_partial_overlap():
    rng = np.random.default_rng(4)
    image = rng.random((6, 14, 12))
    template = rng.random((3, 5, 4))
    mask = (rng.random(template.shape) > 0.3).astype(float)
    for dtype, tolerance in ((np.float64, 1e-9), (np.float32, 1e-3)):  # single-precision FFTs
        out = NccImage(image, fft_dtype=dtype).search(template, mask, min_overlap=0.0)
        assert out.shape == (8, 18, 15)
        for u in [(2, 4, 3), (3, 10, 8), (0, 2, 1), (7, 17, 14)]:  # inside, inside, partial, partial
            corner = tuple(a - (t - 1) for a, t in zip(u, template.shape))
            assert abs(out[u] - _direct(image, template, mask, corner)) < tolerance, (dtype, u)
    strict = NccImage(image).search(template, mask, min_overlap=0.9)
    assert strict[0, 0, 0] == -1.0 and strict[3, 10, 8] > -1.0  # a corner overlap is too small
