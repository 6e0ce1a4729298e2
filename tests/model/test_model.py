"""Model behaviour: shapes, which layers train in each phase, batch norm in phase 2, overfitting one batch."""

import keras
import numpy as np
import pytest

from maskwatch.model import MaskDetectionModel, compile_model, unfreeze_top_layers
from maskwatch.preprocessing import read_image


@pytest.fixture()
def built():
    return MaskDetectionModel().build_model(fine_tune=False)


def real_batch(prepared, n=8):
    frame = prepared.all_faces.groupby("label").head(n // 3 + 1).head(n)
    images = np.stack([read_image(p) for p in frame.crop_path]).astype("float32")
    labels = keras.utils.to_categorical(frame.label.map(
        {"with_mask": 0, "without_mask": 1, "mask_weared_incorrect": 2}), 3)
    return images, labels


def test_architecture_and_output(built):
    model, base = built
    assert model.input_shape == (None, 160, 160, 3) and model.output_shape == (None, 3)
    assert base.name.startswith("mobilenetv2") and base in model.layers
    head = [layer.__class__.__name__ for layer in model.layers[model.layers.index(base) + 1:]]
    assert head == ["GlobalAveragePooling2D", "Dense", "BatchNormalization", "Dropout", "Dense"]
    assert model.layers[-1].units == 3 and model.get_layer("dense").units == 512
    assert model.get_layer("dropout").rate == 0.5
    probabilities = model(np.random.default_rng(0).uniform(0, 255, (2, 160, 160, 3)).astype("float32"))
    assert np.allclose(probabilities.numpy().sum(axis=1), 1.0, atol=1e-5)


def test_pixel_scaling_is_inside_the_model(built):
    model, _ = built
    scale = model.get_layer("scale_pixels")
    out = scale(np.array([[[[0.0, 127.5, 255.0]]]], dtype="float32")).numpy().ravel()
    assert np.allclose(out, [-1.0, 0.0, 1.0])


def test_phase1_trains_only_the_head(built):
    model, base = built
    assert not base.trainable and not base.trainable_weights
    names = {w.path.split("/")[0] for w in model.trainable_weights}
    assert names == {"dense", "head_bn", "probabilities"}


def test_phase2_trains_last_30_base_layers_less_batchnorm_and_the_head(built):
    model, base = built
    unfreeze_top_layers(base, 30, "frozen")
    expected = {layer.name for layer in base.layers[-30:]
                if not isinstance(layer, keras.layers.BatchNormalization)}
    trainable = {layer.name for layer in base.layers if layer.trainable}
    assert trainable == expected
    assert all(not layer.trainable for layer in base.layers[:-30])
    assert all(model.get_layer(n).trainable for n in ("dense", "head_bn", "probabilities"))
    unfreeze_top_layers(base, 30, "train")
    assert {layer.name for layer in base.layers if layer.trainable} == {layer.name for layer in base.layers[-30:]}


def _moving_stats(base):
    return [w.numpy().copy() for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)
            for w in (layer.moving_mean, layer.moving_variance)]


@pytest.mark.parametrize("mode, should_change", [("frozen", False), ("train", True)])
def test_phase2_step_and_base_batchnorm_statistics(built, small_prepared, mode, should_change):
    model, base = built
    unfreeze_top_layers(base, 30, mode)
    compile_model(model, 1e-5)
    before = _moving_stats(base)
    kernel_before = base.get_layer("Conv_1").kernel.numpy().copy()
    images, labels = real_batch(small_prepared)
    model.fit(images, labels, epochs=1, batch_size=8, verbose=0)
    changed = [not np.array_equal(a, b) for a, b in zip(before, _moving_stats(base))]
    assert any(changed) is should_change
    assert not np.array_equal(kernel_before, base.get_layer("Conv_1").kernel.numpy())  # the block did train


def test_overfits_one_batch(built, small_prepared):
    model, _ = built
    compile_model(model, 1e-3)
    images, labels = real_batch(small_prepared, n=8)
    keras.utils.set_random_seed(0)
    history = model.fit(images, labels, epochs=40, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < 0.1
    assert history.history["accuracy"][-1] == 1.0
