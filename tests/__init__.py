"""MaaS test suite."""
