"""Sweep reports and the W&B dashboard: tables, paired statistics, figures."""
