"""The controller side of the rendezvous: a registry of appliances and their lifecycle.

:mod:`.store` holds the controller's own SQLite database (every SQL statement of the controller);
:mod:`.lifecycle` the rules: pre-registration with validated configurations, the signed
configuration answer, status updates and pushed reports, removal (also of stale appliances) and
dynamic assignment. No HTTP here: ``api/controller/`` serves it (``imaging controller serve``).
"""
