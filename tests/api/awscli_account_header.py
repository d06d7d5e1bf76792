"""An AWS CLI (v1) plugin with which a cloud's front end names the account it acts for.

The AWS CLI has no option for an extra request header, but it loads the plugins its configuration
file lists, and botocore signs every header a request has when it is signed. This plugin adds
``X-Imaging-Account: $IMAGING_ACCOUNT`` to every EC2 request before it is signed, so the header is
in ``SignedHeaders`` and the appliance honours it for a key with ``role: frontend``::

    # ~/.aws/config (or the file AWS_CONFIG_FILE names); the module must be importable (PYTHONPATH)
    [plugins]
    imaging_account = tests.api.awscli_account_header

    IMAGING_ACCOUNT=acct-a aws ec2 describe-import-snapshot-tasks --endpoint-url ...

Without ``IMAGING_ACCOUNT`` it adds nothing. ``tests/api/test_tenancy.py`` runs the AWS CLI with it.
"""

from __future__ import annotations

import os
from typing import Any

from botocore.awsrequest import AWSRequest
from botocore.hooks import BaseEventHooks

ENV = "IMAGING_ACCOUNT"
HEADER = "X-Imaging-Account"


def add_account_header(request: AWSRequest, **kwargs: Any) -> None:
    """``before-sign`` handler: name the account in a header the signature will cover."""
    account = os.environ.get(ENV)
    if account:
        request.headers[HEADER] = account


def awscli_initialize(cli: BaseEventHooks) -> None:
    """The AWS CLI's plugin entry point."""
    cli.register("before-sign.ec2", add_account_header)
