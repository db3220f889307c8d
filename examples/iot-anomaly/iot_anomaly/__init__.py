"""iot-anomaly: fault classification on windows of machine-sensor records (a fedstream project).

Each device trains on its own sensor log; only clipped, quantized, encrypted model updates leave
it. :mod:`iot_anomaly.model` is the model, :mod:`iot_anomaly.data` writes a synthetic fleet's
logs to try the project without real devices.
"""
