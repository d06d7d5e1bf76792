"""Imaging Appliance toolkit: safe disk-image inspection, conversion and declarative workflows.

This package has no HTTP code; the API in :mod:`api` wraps it.
"""

__version__ = "0.1.0"
