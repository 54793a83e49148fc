"""Federated fine-tuning methods. Importing this package registers every method."""

from fedtune.methods import fed_alora, fedex_lora, flexlora, flora, frozen_factor, full_weight, hafl, hetlora, lora_sharing  # noqa: F401
from fedtune.methods.base import ClientUpload, FederatedMethod, RoleSharingMethod, data_weights
from fedtune.methods.registry import METHODS, build_method, method_class, register

__all__ = [
    "METHODS",
    "ClientUpload",
    "FederatedMethod",
    "RoleSharingMethod",
    "build_method",
    "data_weights",
    "method_class",
    "register",
]
