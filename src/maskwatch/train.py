"""Training: the recipe's two phases (or one), callbacks, one combined history, curves."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from maskwatch.config import Settings
from maskwatch.model import MaskDetectionModel, compile_model, unfreeze_top_layers



@dataclass
class TrainingHistory:
    """Keras-like `.history` over all phases; `phases[i]` names the phase of epoch i."""

    history: dict[str, list[float]] = field(default_factory=dict)
    phases: list[str] = field(default_factory=list)

    def extend(self, phase: str, keras_history: dict[str, list[float]], epoch_seconds: list[float]) -> None:
        n_epochs = len(next(iter(keras_history.values()), []))
        # In Keras' order, not a set's: a set of names iterates in a different order in every process, and so did
        # history.csv's columns.
        for key in [*self.history, *(key for key in keras_history if key not in self.history)]:
            past = self.history.setdefault(key, [math.nan] * len(self.phases))
            past.extend(float(v) for v in keras_history.get(key, [math.nan] * n_epochs))
        seconds = self.history.setdefault("epoch_seconds", [math.nan] * len(self.phases))
        seconds[len(self.phases):] = epoch_seconds[:n_epochs]
        self.phases.extend([phase] * n_epochs)

    @property
    def phase_boundaries(self) -> list[int]:
        """Epoch indices where a new phase starts (after the first)."""
        return [i for i in range(1, len(self.phases)) if self.phases[i] != self.phases[i - 1]]

    def seconds_per_epoch(self) -> dict[str, float]:
        return seconds_per_epoch(self.to_frame())

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.history)
        frame.insert(0, "phase", self.phases)
        frame.insert(0, "epoch", range(1, len(self.phases) + 1))
        return frame


def seconds_per_epoch(history_frame: pd.DataFrame) -> dict[str, float]:
    """Mean seconds per epoch of each phase, from a history frame (`TrainingHistory.to_frame`, history.csv)."""
    if "epoch_seconds" not in history_frame:
        return {}
    return history_frame.groupby("phase", sort=False)["epoch_seconds"].mean().to_dict()


def set_seeds(seed: int, deterministic: bool = False) -> None:
    import keras

    keras.utils.set_random_seed(seed)  # python, numpy and backend seeds
    if deterministic:
        # Seeds alone fix what is drawn, not the order TensorFlow's kernels sum floats in: without this two runs of
        # one seed differed from the first epoch's loss (1.36 and 1.69). Process-wide and cannot be undone; it
        # also covers the tf.data input pipeline under the JAX backend, not XLA's own kernels.
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def _keras_callback_base():
    import keras

    return keras.callbacks.Callback


def make_progress_callback(phase: str, total_epochs: int, stream=sys.stderr):
    """Phase, epoch, metrics and ETA on one line per epoch; records epoch durations."""

    class EpochProgress(_keras_callback_base()):
        def __init__(self):
            super().__init__()
            self.epoch_seconds: list[float] = []
            self._started = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_seconds.append(time.perf_counter() - self._started)
            done = len(self.epoch_seconds)
            eta = np.mean(self.epoch_seconds) * (total_epochs - done)
            shown = " ".join(f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()) if k != "learning_rate")
            print(f"[{phase}] epoch {done}/{total_epochs} {self.epoch_seconds[-1]:.0f}s "
                  f"ETA {eta / 60:.1f} min | {shown}", file=stream, flush=True)

    return EpochProgress()


def _monitor_mode(monitor: str) -> str:
    return "max" if any(word in monitor for word in ("f1", "acc", "auc", "recall", "precision")) else "min"


def _phase_callbacks(settings: Settings, checkpoint):
    import keras

    train, mode = settings.train, _monitor_mode(settings.train.monitor)
    callbacks = [checkpoint]
    if train.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=train.monitor, mode=mode, patience=train.early_stopping_patience, restore_best_weights=True))
    if train.reduce_lr_patience:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor=train.monitor, mode=mode, factor=0.3, patience=train.reduce_lr_patience, min_lr=1e-7))
    return callbacks


PhaseCallbacks = Callable[[str, int], list]  # (phase name, epoch offset) -> extra callbacks


def _run_phase(model, name, epochs, learning_rate, train_data, val_data, settings, checkpoint, history,
               class_weight, extra_callbacks: PhaseCallbacks | None):
    if epochs <= 0:
        return
    compile_model(model, learning_rate)  # recompile: trainable flags changed
    progress = make_progress_callback(name, epochs)
    callbacks = _phase_callbacks(settings, checkpoint) + [progress]
    if extra_callbacks:
        callbacks += extra_callbacks(name, len(history.phases))
    result = model.fit(train_data, validation_data=val_data, epochs=epochs, class_weight=class_weight,
                       callbacks=callbacks, shuffle=False, verbose=0)  # tf.data shuffles itself
    history.extend(name, result.history, progress.epoch_seconds)


def _checkpoint(model_path: Path, settings: Settings):
    import keras

    model_path.parent.mkdir(parents=True, exist_ok=True)
    # One instance for all phases: its `best` carries over, so the file holds the best epoch overall.
    return keras.callbacks.ModelCheckpoint(str(model_path), monitor=settings.train.monitor,
                                           mode=_monitor_mode(settings.train.monitor), save_best_only=True)


def _load_best(model_path: Path, fallback):
    import keras

    return keras.models.load_model(model_path) if model_path.is_file() else fallback


def two_phase_training(train_data, val_data, model_path, settings: Settings | None = None, class_weight=None,
                       extra_callbacks: PhaseCallbacks | None = None):
    """Phase 1: base frozen, Adam 1e-3. Phase 2: last N base layers unfrozen, Adam 1e-5. -> (history, model)."""
    settings = settings or Settings()
    train = settings.train
    set_seeds(train.seed, train.deterministic)
    model_path = Path(model_path)
    model, base_model = _builder(settings).build_model(fine_tune=False)
    checkpoint, history = _checkpoint(model_path, settings), TrainingHistory()
    _run_phase(model, "phase1", train.phase1_epochs, train.phase1_learning_rate, train_data, val_data, settings,
               checkpoint, history, class_weight, extra_callbacks)
    unfreeze_top_layers(base_model, train.fine_tune_last_layers, train.phase2_batchnorm)
    _run_phase(model, "phase2", train.phase2_epochs, train.phase2_learning_rate, train_data, val_data, settings,
               checkpoint, history, class_weight, extra_callbacks)
    return history, _load_best(model_path, model)


def single_phase_training(train_data, val_data, model_path, settings: Settings | None = None, class_weight=None,
                          extra_callbacks: PhaseCallbacks | None = None):
    settings = settings or Settings()
    set_seeds(settings.train.seed, settings.train.deterministic)
    model_path = Path(model_path)
    model, _ = _builder(settings).build_model(fine_tune=False)
    history = TrainingHistory()
    _run_phase(model, "single", settings.train.single_phase_epochs, settings.train.single_phase_learning_rate,
               train_data, val_data, settings, _checkpoint(model_path, settings), history, class_weight,
               extra_callbacks)
    return history, _load_best(model_path, model)


def _builder(settings: Settings) -> MaskDetectionModel:
    return MaskDetectionModel(image_size=settings.data.image_size, dense_units=settings.train.dense_units,
                              dropout=settings.train.dropout)


def build_datasets(train_df: pd.DataFrame, val_df: pd.DataFrame, settings: Settings):
    """tf.data pipelines and class weights, with the configured imbalance handling."""
    from maskwatch.data import class_weights, make_dataset, oversample

    train = settings.train
    weights = None
    if train.imbalance == "class_weight":
        weights = class_weights(train_df, train.class_weight_power)
    elif train.imbalance == "oversample":
        train_df = oversample(train_df, train.class_weight_power, train.seed)
    train_data = make_dataset(train_df, train.batch_size, training=True, augment=settings.augment,
                              seed=train.seed, cache=train.cache_in_memory)
    val_data = make_dataset(val_df, train.batch_size, training=False, cache=train.cache_in_memory)
    return train_data, val_data, weights


def train_model(train_df: pd.DataFrame, val_df: pd.DataFrame, use_two_phase: bool = True,
                phase1_epochs: int | None = None, phase2_epochs: int | None = None, epochs: int | None = None,
                settings: Settings | None = None, model_path: str | Path | None = None,
                extra_callbacks: PhaseCallbacks | None = None):
    """Train from crop DataFrames -> (history, model). Epoch arguments override the settings."""
    settings = (settings or Settings()).model_copy(deep=True)
    settings.train.two_phase = use_two_phase
    if phase1_epochs is not None:
        settings.train.phase1_epochs = phase1_epochs
    if phase2_epochs is not None:
        settings.train.phase2_epochs = phase2_epochs
    if epochs is not None:
        settings.train.single_phase_epochs = epochs
    model_path = Path(model_path or settings.work_dir / "checkpoints" / "best.keras")
    train_data, val_data, weights = build_datasets(train_df, val_df, settings)
    run = two_phase_training if use_two_phase else single_phase_training
    return run(train_data, val_data, model_path, settings, class_weight=weights, extra_callbacks=extra_callbacks)


def plot_history(history: TrainingHistory, path: Path) -> Path:
    """Loss, accuracy and macro-F1 over all epochs, phase boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history.phases) + 1)
    panels = [name for name in ("loss", "accuracy", "macro_f1") if name in history.history]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, name in zip(np.atleast_1d(axes), panels):
        ax.plot(epochs, history.history[name], marker=".", label=f"train {name}")
        if f"val_{name}" in history.history:
            ax.plot(epochs, history.history[f"val_{name}"], marker=".", label=f"val {name}")
        for boundary in history.phase_boundaries:
            ax.axvline(boundary + 0.5, color="gray", linestyle="--")
            ax.text(boundary + 0.6, ax.get_ylim()[1], f" {history.phases[boundary]}", va="top", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

