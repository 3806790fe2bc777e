"""Runs seen: metrics, curves, plots, trackers."""
