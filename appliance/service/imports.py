"""Import tasks: the appliance side of VM Import (ImportVolume, ImportInstance, ImportImage, ImportSnapshot).

:class:`ImportService` turns validated import requests into tasks in the store, each run by the
worker through the shipped workflow of its kind (``appliance/workflows/<kind>.yaml``). It owns the
rules that do not depend on the wire protocol: task id forms, the active-task limit, size sanity,
URL safety (checked when the request arrives, again on every fetch), idempotency tokens,
server-side encryption (what a request may ask of the configured image target) and
cancellation. The HTTP layer (``api/ec2``) only parses, calls this and renders.

The active-task limit and the client tokens are enforced by the store when it creates the task
(:meth:`~appliance.store.Store.create_task`): the API's worker processes each run a service, and
only the store sees all of their requests at once.

Tenancy: every task belongs to the account that created it (:class:`Caller`); a caller describes
and cancels only the tasks of the accounts it sees, and to it any other task does not exist (the
same ``TaskNotFound`` as an unknown id). Every look-up is a query of the store by id and account,
so any appliance sharing the store answers for tasks another one created.

The names of import tasks (kinds, id forms, :class:`~.importtasks.DiskContainer`,
:class:`~.importtasks.Caller`, …) are :mod:`.importtasks`'s and the views of a task's result
(:func:`~.importviews.outcome`, :func:`~.importviews.image_disks`, the guest, boot and encryption
reports) :mod:`.importviews`'s: import them from there.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from ..config import Config
from ..store import Store, Task, TaskState
from ..targets.encryption import Encryption
from ..workflow.engine import Engine
from . import bootparams, expected
from .diskstatus import from_ova, may_open_ova, running_disks, several_disks
from .importchecks import ImportChecks
from .importtasks import (
    CONTAINER_FORMATS,
    ID_PREFIX,
    IMAGE_CONTAINER_FORMATS,
    IMPORT_IMAGE,
    IMPORT_INSTANCE,
    IMPORT_SNAPSHOT,
    IMPORT_VOLUME,
    NO_ACCOUNT,
    TASK_ID_PATTERNS,
    DiskContainer,
    DiskImage,
    new_task_id,
)
from .taskservice import TaskService


class ImportService(TaskService, ImportChecks):
    """Creates, lists and cancels import tasks: a :class:`TaskService` (store, engine, submission under
    the active-task limit, get/list/cancel by kind and account) in the import tasks' words, with the
    request checks of :class:`ImportChecks`. Thread-safe as far as the store is."""

    id_patterns = TASK_ID_PATTERNS
    id_prefixes = ID_PREFIX

    def __init__(self, config: Config, store: Store | None = None, *, engine: Engine | None = None) -> None:
        ImportChecks.__init__(self, config)
        TaskService.__init__(self, config, store, engine=engine)

    def new_task_id(self, kind: str) -> str:
        """A fresh id of the form EC2 clients expect for ``kind`` (8 lower-case alphanumerics for the
        conversion tasks: :func:`.importtasks.new_task_id`)."""
        return new_task_id(kind)

    def _submit(
        self, kind: str, params: dict[str, Any], *, client_token: str | None = None, account: str = NO_ACCOUNT
    ) -> Task:
        """Create the task (:meth:`TaskService.submit_task`)."""
        # Absent optional members are left out so the workflow's declared defaults apply.
        params = {k: v for k, v in params.items() if v is not None}
        return self.submit_task(
            kind, params, task_id=self.new_task_id(kind), account=account, client_token=client_token
        )

    # -- creating -------------------------------------------------------------------------------

    def import_volume(
        self,
        image: DiskImage,
        *,
        availability_zone: str | None,
        description: str | None,
        account: str = NO_ACCOUNT,
        signed_manifest: bool = False,
        volume_id: str | None = None,
        expected_sha256: str | None = None,
    ) -> Task:
        """ImportVolume: a disk uploaded as manifest parts, written as RAW onto a new volume of
        ``account``. Pull mode passes ``signed_manifest`` (the URL is a Eucalyptus download manifest,
        verified against the cloud certificate) and the ``volume_id`` the cloud created for it.
        ``expected_sha256`` (beyond AWS, :mod:`appliance.service.expected`): the upload's sha256."""
        params = self._disk_image(image) | {
            "availability_zone": availability_zone,
            "description": description,
            "signed_manifest": signed_manifest or None,
            "volume_id": volume_id,
            "expected_sha256": _expected(expected_sha256),
        }
        return self._submit(IMPORT_VOLUME, params, account=account)

    def import_instance(
        self,
        image: DiskImage,
        *,
        platform: str,
        architecture: str | None,
        instance_type: str | None,
        description: str | None,
        launch: dict[str, Any],
        kernel_id: str | None = None,
        ramdisk_id: str | None = None,
        virtualization_type: str | None = None,
        account: str = NO_ACCOUNT,
        expected_sha256: str | None = None,
    ) -> Task:
        """ImportInstance (single volume, like AWS): the volume import plus the launch description,
        for ``account``; ``expected_sha256`` as for :meth:`import_volume`.

        ``kernel_id``/``ramdisk_id``/``virtualization_type`` (beyond AWS, see
        :mod:`appliance.service.bootparams`) are validated and recorded for the controller.
        """
        boot = bootparams.check(kernel_id, ramdisk_id, virtualization_type)
        params = self._disk_image(image) | {
            "availability_zone": (launch.get("Placement") or {}).get("AvailabilityZone"),
            "description": description,
            "volume_description": image.description,
            "platform": platform,
            "architecture": architecture,
            "instance_type": instance_type,
            "launch": launch,
            "expected_sha256": _expected(expected_sha256),
        }
        params |= boot.to_dict()
        return self._submit(IMPORT_INSTANCE, params, account=account)

    def import_image(
        self,
        containers: Sequence[DiskContainer],
        *,
        architecture: str | None = None,
        platform: str | None = None,
        boot_mode: str | None = None,
        license_type: str | None = None,
        hypervisor: str | None = None,
        description: str | None = None,
        client_token: str | None = None,
        tags: Iterable[dict[str, str]] = (),
        kernel_id: str | None = None,
        ramdisk_id: str | None = None,
        virtualization_type: str | None = None,
        encryption: Encryption | None = None,
        account: str = NO_ACCOUNT,
        expected_sha256: str | None = None,
    ) -> Task:
        """ImportImage: the first disk is the boot disk (the image's root volume), the others its
        data disks, each fetched, inspected, converted and stored the same way (at most
        :data:`MAX_IMAGE_DISKS`). An OVA carries its own disks, so it is the only container.
        ``expected_sha256`` (beyond AWS, :mod:`appliance.service.expected`): the first disk's; each
        container may give its own (:attr:`DiskContainer.expected_sha256`), the first's agreeing with
        ``expected_sha256`` when both are given (``InvalidParameterCombination``).

        ``kernel_id``/``ramdisk_id``/``virtualization_type`` (beyond AWS, see
        :mod:`appliance.service.bootparams`) are validated and recorded for the controller. A
        ``client_token`` makes the request idempotent for ``account`` (the API caller); the same
        token with different parameters is ``IdempotentParameterMismatch``. ``encryption`` (from
        :meth:`encryption`) is applied by the image target when it stores the disk.
        """
        self.check_image_disks(containers)
        boot = bootparams.check(kernel_id, ramdisk_id, virtualization_type, boot_mode=boot_mode)
        disks = [
            self._container(c, IMAGE_CONTAINER_FORMATS, account, f"DiskContainer.{n}")
            for n, c in enumerate(containers, 1)
        ]
        first = expected.first_disk(_expected(expected_sha256), disks[0].get("expected_sha256"))
        if first:
            disks[0]["expected_sha256"] = first
        params = boot.to_dict() | {
            "disk_containers": disks,
            "architecture": architecture,
            "platform": platform,
            "boot_mode": boot_mode,
            "license_type": license_type,
            "hypervisor": hypervisor,
            "description": description,
            "client_token": client_token,
            "tags": list(tags),
            **self._check_encryption(encryption),
        }
        return self._submit(IMPORT_IMAGE, params, client_token=client_token, account=account)

    def import_snapshot(
        self,
        container: DiskContainer,
        *,
        description: str | None = None,
        client_token: str | None = None,
        tags: Iterable[dict[str, str]] = (),
        encryption: Encryption | None = None,
        account: str = NO_ACCOUNT,
        expected_sha256: str | None = None,
    ) -> Task:
        """ImportSnapshot: one disk converted to RAW and stored by the image target; ``client_token``,
        ``account``, ``encryption`` and ``expected_sha256`` as for :meth:`import_image`."""
        disk = self._container(container, CONTAINER_FORMATS, account)
        digest = expected.first_disk(_expected(expected_sha256), disk.get("expected_sha256"), "DiskContainer")
        if digest:
            disk["expected_sha256"] = digest
        params = {
            "disk_container": disk,
            "description": description,
            "client_token": client_token,
            "tags": list(tags),
            **self._check_encryption(encryption),
        }
        return self._submit(IMPORT_SNAPSHOT, params, client_token=client_token, account=account)

    # -- reading and cancelling -----------------------------------------------------------------

    def disk_status(self, task: Task) -> list[dict[str, Any]] | None:
        """Each disk's own status while an ImportImage of several disks (or of an OVA) is pending or
        running (:func:`.diskstatus.running_disks`, read from its step records); None for any other
        task, and once the task is finished (its disks then show what it stored, or its end)."""
        if task.state not in (TaskState.PENDING, TaskState.RUNNING):
            return None
        if several_disks(task):
            return running_disks(task, self.store.step_results(task.id))
        if may_open_ova(task):  # one disk, unless its only DiskContainer opened as an OVA
            disks = running_disks(task, self.store.step_results(task.id))
            return disks if from_ova(task, disks) else None
        return None

    def get(self, task_id: str, kinds: Collection[str], accounts: Collection[str] | None = None) -> Task:
        """The task ``task_id`` if it is one of ``kinds`` and (``accounts`` given) belongs to one of
        ``accounts`` (:attr:`Caller.sees`); ``InvalidTaskId`` for a malformed id, ``TaskNotFound``,
        in the same words, for an unknown task and for one of another account."""
        return self.get_task(task_id, kinds, accounts)

    def list(
        self, kinds: Collection[str], ids: Sequence[str] = (), accounts: Collection[str] | None = None
    ) -> list[Task]:
        """Tasks of ``kinds`` (of ``accounts``, when given), newest first; with ``ids``, exactly
        those (each must exist, as :meth:`get` says)."""
        return self.list_tasks(kinds, ids, accounts)

    def cancel(
        self,
        task_id: str,
        kinds: Collection[str],
        reason: str | None = None,
        accounts: Collection[str] | None = None,
    ) -> Task:
        """Cancel an active task (its run stops, undoes what it did, and ends ``cancelled``); the task
        is found as :meth:`get` finds it."""
        return self.cancel_task(task_id, kinds, accounts, reason)


def _expected(value: str | None) -> str | None:
    """An expected sha256 checked (lower-case hex), or None."""
    return expected.check_sha256(value, expected.MEMBER) if value else None
