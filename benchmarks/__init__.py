"""Measurement: latency, memory, leakage, quality, reports; testbed/ holds the digits world."""
