"""Plain-PyTorch reference of every op: the oracle of the tests and the "torch" backend.

Depends on torch alone. Written for clarity, not speed; computes in the inputs' dtype unless stated.
"""
from __future__ import annotations

import torch
