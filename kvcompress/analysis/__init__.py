"""Offline analysis: calibration statistics, rank schedules, and the analyze pass that fills a recipe."""
