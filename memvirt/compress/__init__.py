"""Adaptive memory compression: track each VM's working set and keep only it resident."""
