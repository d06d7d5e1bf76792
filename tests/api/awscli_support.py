"""The AWS CLI as a client of the appliance's EC2 API in the tests: the ``aws`` installed next to this
Python, signing with the test key, reading nothing of the machine's own AWS configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY

AWS = Path(sys.executable).with_name("aws")


def aws_env(**extra: str) -> dict[str, str]:
    """The environment of an ``aws`` run: the test key and region, no configuration file, no
    credentials file and no profile of the user running the tests; ``extra`` adds variables."""
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=TEST_SECRET_KEY,
        AWS_DEFAULT_REGION=REGION,
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        **extra,
    )
    env.pop("AWS_PROFILE", None)
    return env


def aws_ec2(
    endpoint: str, *args: str, check: bool = False, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """``aws ec2 ARGS`` against ``endpoint`` with JSON output (stdout and stderr captured as text);
    ``check``: a non-zero exit raises :class:`subprocess.CalledProcessError`."""
    return subprocess.run(
        [str(AWS), "ec2", "--endpoint-url", endpoint, "--output", "json", *args],
        env=aws_env(),
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )
