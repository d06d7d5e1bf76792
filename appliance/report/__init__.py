"""Reporting to the controlling cloud (``controller:`` in the configuration).

- ``mode: push``: signed, versioned JSON messages (heartbeats, task events) through a durable
  SQLite outbox to ``POST <url>/v1/reports`` (:mod:`.push`, wire format in :mod:`.messages`);
- ``mode: pull``: the Eucalyptus imaging-worker protocol, ``GetInstanceImportTask`` /
  ``PutInstanceImportTaskStatus`` at ``<url>/services/Imaging`` (:mod:`.pull`);
- ``mode: off``: nothing.

The worker starts the reporter in its own process (:func:`.reporter.start_reporter`) and stops it
on shutdown. :mod:`.receiver` verifies reports and is a reference controller for labs and tests.
"""
