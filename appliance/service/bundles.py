"""Bundle tasks and CreateImage: the appliance side of BundleInstance, DescribeBundleTasks,
CancelBundleTask and CreateImage.

:class:`BundleService` turns a validated BundleInstance into a task of kind :data:`BUNDLE_INSTANCE` in
the same store as the imports and exports, run by the same worker through the shipped workflow
``bundle-instance.yaml``: the instance's root volume, resolved when the request arrives
(:mod:`appliance.service.resolver`: a point-in-time copy attached here), written by ``bundle.write`` as
an EC2 image bundle under the upload policy's bucket and the request's prefix, with the policy's
canned ACL. Tenancy, the active-task limit and cancellation work as for exports; a cancelled or failed
run deletes the parts it uploaded (the step's clean-up).

The upload policy (``Storage.S3.UploadPolicy``, ``UploadPolicySignature``, ``AWSAccessKeyId``) is
checked before anything is queued (:func:`appliance.targets.upload_policy.check_upload_policy`): the
signature with the secret of ``AWSAccessKeyId`` — a key of this appliance's API (``api.credentials``)
acting for the caller's account, or the object store's own key (``sources.s3.access_key``) — then the
document: not expired, the bucket named exactly, the prefix granted, one canned ACL. Anything else is
``UploadPolicyInvalid.*`` and nothing is queued.

CreateImage runs while the request waits (snapshots and RegisterImage through the controlling cloud's
EC2 API, :mod:`appliance.targets.ec2_images`): it needs the ``ec2`` volume target.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any

from ..errors import UsageError
from ..sources.s3names import check_bucket, check_key
from ..store import Task
from ..targets.ec2 import Ec2VolumeTarget
from ..targets.ec2_images import CreatedImage, create_image_from_instance, tags_by_resource
from ..targets.upload_policy import UploadPolicy, UploadPolicyInvalid, check_upload_policy
from .importtasks import NO_ACCOUNT
from .resolving import ResolvingService

BUNDLE_INSTANCE = "bundle-instance"
KINDS = (BUNDLE_INSTANCE,)
#: AWS's form: ``bun-`` and 8 or 17 hex digits
TASK_ID_PATTERN = re.compile(r"^bun-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
#: RegisterImage/CreateImage's name rule: 3 to 128 of these characters
IMAGE_NAME = re.compile(r"^[A-Za-z0-9()\[\] ./\-'@_]{3,128}$")
MAX_DESCRIPTION = 255
#: ``ec2-bundle-read`` (what euca2ools and the AWS CLI put in the policy) is EC2's name, not a canned ACL S3
#: knows: the objects get S3's ``aws-exec-read`` (the owner, and EC2 may read), which is what it grants
S3_ACL = {"ec2-bundle-read": "aws-exec-read"}
#: the longest bundle prefix (bundle.write's schema)
MAX_PREFIX = 100


class BundleService(ResolvingService):
    """Creates, lists and cancels bundle tasks; creates images. Shares the import service's store and
    engine."""

    noun = "bundle task"
    id_patterns = {BUNDLE_INSTANCE: TASK_ID_PATTERN}
    id_prefixes = {BUNDLE_INSTANCE: "bun-"}

    def not_found(self, task_id: str) -> str:
        return f"The bundle task ID '{task_id}' does not exist"

    # -- the upload policy ----------------------------------------------------------------------

    def _policy_secret(self, access_key: str, account: str) -> str:
        """The secret the policy must be signed with (module docstring); a key this appliance does not
        know, or another account's, cannot have signed it."""
        secret = self.config.api.credentials.get(access_key)
        principal = self.config.api.principals.get(access_key)
        key_account = principal.account if principal is not None else access_key
        if secret is not None and account in (key_account, NO_ACCOUNT):
            return secret
        s3 = self.config.sources.s3 or {}
        if s3.get("access_key") and s3.get("access_key") == access_key and s3.get("secret_key"):
            return str(s3["secret_key"])
        raise UploadPolicyInvalid(
            "Signature",
            "the upload policy's AWSAccessKeyId is not a key of this account: "
            "its signature cannot be verified",
        )

    def check_policy(
        self, bucket: str, prefix: str, access_key: str, policy: str, signature: str, account: str
    ) -> UploadPolicy:
        """The verified upload policy of a BundleInstance, or ``UploadPolicyInvalid.*``."""
        secret = self._policy_secret(access_key, account)
        return check_upload_policy(policy, signature, secret, bucket=bucket, prefix=prefix)

    # -- creating -------------------------------------------------------------------------------

    def bundle_instance(
        self,
        instance_id: str,
        *,
        bucket: str,
        prefix: str,
        access_key: str,
        upload_policy: str,
        upload_policy_signature: str,
        account: str = NO_ACCOUNT,
        sees: Collection[str] | None = None,
        dry_run: bool = False,
    ) -> Task | None:
        """BundleInstance: the instance's root volume as a bundle ``bucket``/``prefix``…; None for a dry
        run that would have succeeded."""
        check_bucket(bucket, "Storage.S3.Bucket")
        if not prefix or len(prefix) > MAX_PREFIX or "/" in prefix:
            raise UsageError(
                f"Storage.S3.Prefix must be 1 to {MAX_PREFIX} characters without '/' "
                "(the beginning of the bundle's file names)"
            )
        check_key(f"{prefix}.manifest.xml", "Storage.S3.Prefix")
        policy = self.check_policy(
            bucket, prefix, access_key, upload_policy, upload_policy_signature, account
        )
        source = self.resolver.instance(instance_id, sees)
        if dry_run:
            return None
        params = {
            "instance_id": instance_id,
            "s3_bucket": bucket,
            "s3_prefix": prefix,
            "aws_access_key_id": access_key,
            "upload_policy": upload_policy,
            "acl": S3_ACL.get(policy.acl, policy.acl),
            "user": account if account and account != NO_ACCOUNT else "000000000000",
            "source": source,
        }
        return self.submit_task(
            BUNDLE_INSTANCE, params, task_id=self.new_task_id(BUNDLE_INSTANCE), account=account
        )

    # -- reading and cancelling -----------------------------------------------------------------

    def get(self, task_id: str, accounts: Collection[str] | None = None) -> Task:
        """The bundle task ``task_id`` (of one of ``accounts``, when given); ``InvalidTaskId`` for a
        malformed id, ``TaskNotFound`` for an unknown one or another account's."""
        return self.get_task(task_id, KINDS, accounts)

    def list(self, ids: Sequence[str] = (), accounts: Collection[str] | None = None) -> list[Task]:
        """Bundle tasks (newest first); with ``ids``, exactly those."""
        return self.list_tasks(KINDS, ids, accounts)

    def cancel(self, task_id: str, accounts: Collection[str] | None = None) -> Task:
        """CancelBundleTask: the run stops and the parts it uploaded are deleted; a finished task is
        ``IncorrectState``."""
        return self.cancel_task(task_id, KINDS, accounts)

    # -- CreateImage ----------------------------------------------------------------------------

    def create_image(
        self,
        instance_id: str,
        name: str,
        *,
        description: str | None = None,
        block_device_mappings: Sequence[dict[str, Any]] | None = None,
        no_reboot: bool = False,
        tag_specifications: Sequence[dict[str, Any]] | None = None,
        sees: Collection[str] | None = None,
        dry_run: bool = False,
    ) -> CreatedImage | None:
        """CreateImage of the controlling cloud's EBS-backed instance; None for a dry run."""
        if not IMAGE_NAME.match(name or ""):
            raise UsageError(
                "Name must be 3 to 128 letters, digits, parentheses, square brackets, spaces, periods, "
                "slashes, dashes, single quotes, at-signs or underscores"
            )
        if description is not None and len(description) > MAX_DESCRIPTION:
            raise UsageError(f"Description is longer than {MAX_DESCRIPTION} characters")
        tags_by_resource(list(tag_specifications or ()))  # refused before anything is done
        self.resolver.instance(instance_id, sees)  # InvalidInstanceID.* for what this caller cannot see
        if dry_run:
            return None
        settings = self.config.targets.get("volume") or {}
        client = Ec2VolumeTarget.from_settings(settings).client
        return create_image_from_instance(
            client,
            instance_id,
            name,
            description=description,
            block_device_mappings=list(block_device_mappings or ()),
            no_reboot=no_reboot,
            tag_specifications=list(tag_specifications or ()),
        )
