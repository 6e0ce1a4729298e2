"""int8 export: how each layer's quantization error is measured (the export itself: tests/realtime)."""

import numpy as np
import pandas as pd

from maskwatch.export import INT8_MAX_ERROR_STEPS, int8_error_steps


def test_int8_error_is_counted_in_quantization_steps():
    # As TensorFlow's layer_statistics_dump writes it: one row per quantized tensor, its scale and squared error.
    statistics = pd.DataFrame({"tensor_name": ["conv", "head", "softmax"], "scale": [0.1, 0.01, 0.004],
                               "mean_squared_error": [0.03 ** 2, 0.17 ** 2, 0.0012 ** 2],
                               "num_elements": [10, 3, 3]})
    steps = int8_error_steps(statistics)
    assert list(steps.index) == ["conv", "head", "softmax"]
    np.testing.assert_allclose(steps.to_numpy(), [0.3, 17.0, 0.3])
    # Plain rounding (about 0.29 steps) stays int8; only the head that misses by 17 is a candidate for float.
    assert steps.index[steps > INT8_MAX_ERROR_STEPS].tolist() == ["head"]
