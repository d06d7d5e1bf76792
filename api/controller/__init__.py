"""The controller's HTTP layer: its Falcon app (:mod:`.app`), gunicorn (:mod:`.server`) and the
``imaging controller`` commands (:mod:`.cli`). The lifecycle itself is :mod:`appliance.controller`."""
