"""The recipe's model: MobileNetV2 (ImageNet, frozen, inference mode) + a small classification head."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from maskwatch.config import CLASS_NAMES

# The file keras.applications.MobileNetV2(include_top=False, weights="imagenet") loads at any input size, from
# KERAS_HOME/models/ or downloaded there (Keras' own names; the classifier and the trained detector both use it).
IMAGENET_NO_TOP_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
                       "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")


class WeightsUnavailableError(RuntimeError):
    """The ImageNet weights are neither in KERAS_HOME nor downloadable (an offline machine)."""


def fetch_imagenet_weights(origin: str = IMAGENET_NO_TOP_URL) -> Path:
    """The ImageNet weights, fetched by Keras' own downloader into its cache unless already there. Jobs call it
    before any work: offline, a missing file was a traceback from deep inside training, with the MLflow run
    already recorded as FAILED."""
    import keras

    name = origin.rsplit("/", 1)[1]
    try:
        return Path(keras.utils.get_file(name, origin, cache_subdir="models"))
    except Exception as error:  # Keras re-raises any download failure as a bare Exception
        home = os.environ.get("KERAS_HOME") or "~/.keras"
        raise WeightsUnavailableError(
            f"cannot get MobileNetV2's ImageNet weights ({name}) into {home}/models: {error}. On a machine "
            f"without internet, copy that file into {home}/models/ or set KERAS_HOME to a folder whose models/ "
            "holds it (README, 'Offline use')") from error


@dataclass
class MaskDetectionModel:
    """Builds the functional model; pixel scaling to [-1, 1] is inside it so serving cannot drift."""

    image_size: int = 160
    num_classes: int = len(CLASS_NAMES)
    dense_units: int = 512
    dropout: float = 0.5
    weights: str | None = "imagenet"

    def build_model(self, fine_tune: bool = False, fine_tune_last_layers: int = 30,
                    phase2_batchnorm: str = "frozen"):
        """Return (model, base_model). fine_tune=True applies the phase-2 trainable pattern."""
        import keras

        inputs = keras.Input(shape=(self.image_size, self.image_size, 3), name="image")
        # MobileNetV2 expects [-1, 1]; the model takes raw 0..255 RGB pixels.
        scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_pixels")(inputs)
        # No input_shape: the base is fully convolutional and Keras loads the 224 ImageNet weights (the one
        # file it ships for include_top=False at any size), so image_size is free (e.g. 160 for small faces).
        with warnings.catch_warnings():  # "weights for (224, 224) will be loaded": exactly what is wanted
            warnings.filterwarnings("ignore", message=".*will be loaded as the default")
            base_model = keras.applications.MobileNetV2(include_top=False, weights=self.weights)
        base_model.trainable = False
        features = base_model(scaled, training=False)
        pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
        hidden = keras.layers.Dense(self.dense_units, activation="relu", name="dense")(pooled)
        hidden = keras.layers.BatchNormalization(name="head_bn")(hidden)
        hidden = keras.layers.Dropout(self.dropout, name="dropout")(hidden)
        outputs = keras.layers.Dense(self.num_classes, activation="softmax", name="probabilities")(hidden)
        model = keras.Model(inputs, outputs, name="maskwatch_mobilenetv2")
        if fine_tune:
            unfreeze_top_layers(base_model, fine_tune_last_layers, phase2_batchnorm)
        return model, base_model


def unfreeze_top_layers(base_model, last_layers: int, batchnorm: str = "frozen") -> None:
    """Phase 2: the base trains except all but its last `last_layers` layers.

    batchnorm="frozen" keeps the unfrozen block's BatchNormalization layers non-trainable: with Keras 3 a
    trainable BatchNormalization layer runs in training mode inside fit() even under training=False, which
    would replace ImageNet statistics with noisy small-batch ones.
    """
    import keras

    if batchnorm not in ("frozen", "train"):
        raise ValueError(f"phase2_batchnorm must be 'frozen' or 'train', not {batchnorm!r}")
    base_model.trainable = True
    cutoff = len(base_model.layers) - last_layers
    for index, layer in enumerate(base_model.layers):
        trainable = index >= cutoff
        if trainable and batchnorm == "frozen" and isinstance(layer, keras.layers.BatchNormalization):
            trainable = False
        layer.trainable = trainable


def freeze_base(base_model) -> None:
    base_model.trainable = False


def compile_model(model, learning_rate: float) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy", keras.metrics.F1Score(average="macro", name="macro_f1")],
    )


def trainable_layer_names(model) -> list[str]:
    names = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:  # nested base model
            names.extend(f"{layer.name}/{inner.name}" for inner in layer.layers if inner.trainable and inner.weights)
        elif layer.trainable and layer.weights:
            names.append(layer.name)
    return names
