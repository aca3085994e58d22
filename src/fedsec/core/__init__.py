"""Flower-free building blocks shared by the apps, the attacks and the defenses: the flat
parameter layout (params) and the local training loops (training)."""
