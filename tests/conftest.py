"""Shared test set-up: one torch thread (2 threads on 2 cores made steps ~20x slower),
quiet Flower/Ray, no telemetry."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import torch  # noqa: E402

torch.set_num_threads(1)
