"""Checks that run the engine end to end and compare against what is committed.

* :mod:`checks.regress` — the regression matrix (every task × model × method cell against its golden);
* :mod:`checks.device_matrix` — every family × method under :func:`checks.devicecheck.strict_devices`;
* :mod:`checks.devicecheck` — a dispatch mode that refuses operands on mixed devices.
"""
