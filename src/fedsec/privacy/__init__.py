"""Privacy defenses: record-level DP-SGD (Opacus), hospital-level central DP (Flower's DP
strategy wrappers), secure aggregation (Flower's SecAgg+), update compression.

Each module is imported on its own by the apps that need it (no import-time side effects,
nothing heavy imported here): ``fedsec.privacy.dp_sgd``, ``fedsec.privacy.central_dp``,
``fedsec.privacy.secagg``, ``fedsec.privacy.compression``.
"""
