"""A small 1-D convolutional fault classifier for windows of sensor records (Flax NNX).

Input: a batch of windows ``(B, T, C)`` (T records of C sensors, float32; T = 32, C = 6 in this
project). Output: logits ``(B, num_classes)``.

    conv1d(k=5, C -> channels) -> relu -> conv1d(k=5, channels -> channels) -> relu
    -> mean over time -> linear(channels -> num_classes)

With the defaults (6 sensors, 16 channels, 4 classes) it has 1,860 parameters, so an update is a
few KB on the wire and one device's training round takes milliseconds.

Example:
    >>> from flax import nnx
    >>> import numpy as np
    >>> model = make_model(rngs=nnx.Rngs(0))
    >>> model(np.zeros((2, 32, 6), np.float32)).shape
    (2, 4)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

NUM_SENSORS = 6


class ConvClassifier(nnx.Module):
    """Two ``same``-padded 1-D convolutions, global average pooling over time, a linear head."""

    def __init__(
        self,
        num_sensors: int,
        num_classes: int,
        *,
        channels: int = 16,
        kernel: int = 5,
        rngs: nnx.Rngs,
    ):
        self.conv1 = nnx.Conv(num_sensors, channels, kernel_size=(kernel,), rngs=rngs)
        self.conv2 = nnx.Conv(channels, channels, kernel_size=(kernel,), rngs=rngs)
        self.head = nnx.Linear(channels, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv1(x))        # (B, T, channels)
        x = nnx.relu(self.conv2(x))        # (B, T, channels)
        x = jnp.mean(x, axis=1)            # (B, channels): where in the window does not matter
        return self.head(x)                # (B, num_classes)


def make_model(*, rngs: nnx.Rngs, num_classes: int = 4, channels: int = 16) -> nnx.Module:
    """The project's model factory (``[tool.fedstream] model = "iot_anomaly.model:make_model"``).

    fedstream calls it as ``make_model(rngs=nnx.Rngs(seed), **model_options)``.
    """
    return ConvClassifier(NUM_SENSORS, num_classes, channels=channels, rngs=rngs)
