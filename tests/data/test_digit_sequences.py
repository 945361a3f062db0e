import numpy as np

from rnnkit.data import load_digit_sequences


def test_digits_as_row_sequences():
    images, labels = load_digit_sequences()
    assert images.shape == (1797, 8, 8)
    assert images.dtype == np.float32
    assert labels.shape == (1797,)
    assert labels.dtype == np.int64
    assert images.min() == 0.0 and images.max() == 1.0
    np.testing.assert_array_equal(labels[:10], np.arange(10))
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # first image (a zero), first row is 0,0,5,13,9,1,0,0 out of 16
    np.testing.assert_allclose(images[0, 0], np.array([0, 0, 5, 13, 9, 1, 0, 0]) / 16)
