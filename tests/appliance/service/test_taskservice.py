"""The one base of the task services (appliance.service.taskservice) as the import, copy, export and
bundle services use it over one real task store: each finds, lists and cancels only its own kinds' tasks
of the accounts a caller sees, in its own words; nothing is run (the tasks are created in the store
directly)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.errors import ImagingError, IncorrectState, InvalidTaskId, TaskNotFound
from appliance.service.bundles import BUNDLE_INSTANCE, BundleService
from appliance.service.copies import CopyService
from appliance.service.exports import EXPORT_IMAGE, EXPORT_INSTANCE, ExportService
from appliance.service.imports import ImportService
from appliance.service.importtasks import (
    CONVERSION_KINDS,
    IMPORT_IMAGE,
    IMPORT_INSTANCE,
    IMPORT_SNAPSHOT,
    IMPORT_VOLUME,
    KINDS,
)
from appliance.service.resolver import COPY_IMAGE
from appliance.service.taskservice import TaskService
from appliance.store import Store, TaskState
from tests import stores

EXPORT_I = "export-i-0123456789abcdef0"
EXPORT_AMI = "export-ami-0123456789abcdef0"
BUNDLE = "bun-0123456789abcdef0"
COPY = "copy-0123456789abcdef0"
IMPORT_VOL = "import-vol-ab12cd34"
IMPORT_AMI = "import-ami-0123456789abcdef0"


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return stores.config({"state_dir": str(tmp_path / "state")}, base_dir=tmp_path)


@pytest.fixture
def store(cfg: Config) -> Iterator[Store]:
    store = Store(cfg.store)
    store.create_task(EXPORT_INSTANCE, task_id=EXPORT_I, client_account="111111111111")
    store.create_task(EXPORT_IMAGE, task_id=EXPORT_AMI, client_account="111111111111")
    store.create_task(BUNDLE_INSTANCE, task_id=BUNDLE, client_account="222222222222")
    # an id of the copy form whose task is of another kind: not a copy task
    store.create_task(EXPORT_IMAGE, task_id=COPY, client_account="111111111111")
    store.create_task(IMPORT_VOLUME, task_id=IMPORT_VOL, client_account="111111111111")
    store.create_task(IMPORT_IMAGE, task_id=IMPORT_AMI, client_account="222222222222")
    yield store
    store.close()


Services = tuple[ExportService, BundleService, CopyService]


@pytest.fixture
def services(cfg: Config, store: Store) -> Services:
    return ExportService(cfg, store), BundleService(cfg, store), CopyService(cfg, store)


def refused(call: object) -> ImagingError:
    with pytest.raises(ImagingError) as exc:
        call()  # type: ignore[operator]
    return exc.value


@pytest.fixture
def imports(cfg: Config, store: Store) -> ImportService:
    return ImportService(cfg, store)


def test_every_service_is_the_one_base_over_the_store_it_was_given(
    services: Services, imports: ImportService, store: Store
) -> None:
    for service in (*services, imports):
        assert isinstance(service, TaskService)
        assert service.store is store
    # a service built beside the import service shares its store and engine, and the other way round
    exports = ExportService(imports.config, imports.store, engine=imports.engine)
    assert exports.engine is imports.engine
    beside = ImportService(imports.config, imports.store, engine=exports.engine)
    assert beside.engine is imports.engine


def test_import_tasks_get_the_id_forms_ec2_clients_know(imports: ImportService) -> None:
    for kind in CONVERSION_KINDS:  # 8 lower-case alphanumerics, as the conversion tasks' ids
        assert re.fullmatch(r"import-(?:vol|i)-[a-z0-9]{8}", imports.new_task_id(kind))
        assert imports.kind_of(imports.new_task_id(kind)) == kind
    assert re.fullmatch(r"import-ami-[0-9a-f]{17}", imports.new_task_id(IMPORT_IMAGE))
    assert re.fullmatch(r"import-snap-[0-9a-f]{17}", imports.new_task_id(IMPORT_SNAPSHOT))


def test_the_import_service_finds_lists_and_cancels_its_kinds_in_its_own_words(
    imports: ImportService, store: Store
) -> None:
    assert imports.get(IMPORT_VOL, CONVERSION_KINDS, {"111111111111"}).id == IMPORT_VOL
    # another account's task, and an unknown one: the same TaskNotFound in the same words
    other = refused(lambda: imports.get(IMPORT_VOL, CONVERSION_KINDS, {"222222222222"}))
    unknown = refused(lambda: imports.get("import-vol-zz99zz99", CONVERSION_KINDS))
    assert isinstance(other, TaskNotFound) and isinstance(unknown, TaskNotFound)
    assert other.message == f"the task {IMPORT_VOL!r} does not exist"
    assert unknown.message == "the task 'import-vol-zz99zz99' does not exist"
    malformed = refused(lambda: imports.get(IMPORT_AMI, CONVERSION_KINDS))
    assert isinstance(malformed, InvalidTaskId)
    assert malformed.message == f"the task id {IMPORT_AMI!r} is malformed; expected import-vol-…, import-i-…"
    assert isinstance(refused(lambda: imports.get(EXPORT_I, KINDS)), InvalidTaskId)
    # lists: of the caller's accounts; with ids, exactly those, each once
    assert [t.id for t in imports.list(KINDS, accounts={"222222222222"})] == [IMPORT_AMI]
    assert [t.id for t in imports.list(KINDS, [IMPORT_AMI, IMPORT_VOL, IMPORT_AMI])] == [
        IMPORT_AMI,
        IMPORT_VOL,
    ]
    assert imports.list([IMPORT_INSTANCE]) == []
    # a cancel: of the caller's accounts only, with its reason, once
    assert isinstance(
        refused(lambda: imports.cancel(IMPORT_VOL, CONVERSION_KINDS, None, {"2"})), TaskNotFound
    )
    assert imports.cancel(IMPORT_VOL, CONVERSION_KINDS, "no longer needed").state is TaskState.CANCELLED
    assert store.get_task(IMPORT_VOL).cancel_reason == "no longer needed"
    again = refused(lambda: imports.cancel(IMPORT_VOL, CONVERSION_KINDS))
    assert isinstance(again, IncorrectState)
    assert again.message == f"the task {IMPORT_VOL} is cancelled and can no longer be cancelled"


def test_a_task_is_found_by_its_service_for_the_accounts_that_see_it_and_by_no_other(
    services: Services,
) -> None:
    exports, bundles, copies = services
    assert exports.get(EXPORT_I, [EXPORT_INSTANCE], {"111111111111"}).id == EXPORT_I
    assert bundles.get(BUNDLE, {"222222222222"}).id == BUNDLE
    # another account's task does not exist for the caller, in the same words as an unknown one
    other = refused(lambda: exports.get(EXPORT_I, [EXPORT_INSTANCE], {"222222222222"}))
    unknown = refused(lambda: exports.get("export-i-00000000000000000", [EXPORT_INSTANCE]))
    assert isinstance(other, TaskNotFound) and isinstance(unknown, TaskNotFound)
    assert other.message == f"The export task ID '{EXPORT_I}' does not exist"
    assert unknown.message == "The export task ID 'export-i-00000000000000000' does not exist"
    assert refused(lambda: bundles.get(BUNDLE, {"111111111111"})).message == (
        f"The bundle task ID '{BUNDLE}' does not exist"
    )
    # an id of the service's form whose task is of another kind is not one of its tasks
    assert refused(lambda: copies.get(COPY)).message == f"no copy task {COPY!r}"


def test_an_id_not_of_the_kinds_asked_for_is_malformed_in_each_services_words(services: Services) -> None:
    exports, bundles, copies = services
    wrong_kind = refused(lambda: exports.get(EXPORT_AMI, [EXPORT_INSTANCE]))
    assert isinstance(wrong_kind, InvalidTaskId)
    assert wrong_kind.message == f"the export task id {EXPORT_AMI!r} is malformed; expected export-i-…"
    both = refused(lambda: exports.get("export-x", [EXPORT_INSTANCE, EXPORT_IMAGE]))
    assert both.message == "the export task id 'export-x' is malformed; expected export-i-…, export-ami-…"
    assert refused(lambda: bundles.get(EXPORT_I)).message == (
        f"the bundle task id {EXPORT_I!r} is malformed; expected bun-…"
    )
    assert refused(lambda: copies.cancel("copy-1")).message == (
        "the copy task id 'copy-1' is malformed; expected copy-…"
    )


def test_a_list_holds_the_services_kinds_of_the_callers_accounts_or_exactly_the_ids_asked_for(
    services: Services,
) -> None:
    exports, bundles, _ = services
    assert [t.id for t in exports.list([EXPORT_INSTANCE], accounts={"111111111111"})] == [EXPORT_I]
    assert exports.list([EXPORT_INSTANCE], accounts={"222222222222"}) == []
    assert [t.id for t in bundles.list()] == [BUNDLE]
    # ids: each once, in the order asked; an unknown one fails the whole list
    asked = exports.list([EXPORT_INSTANCE, EXPORT_IMAGE], [EXPORT_AMI, EXPORT_I, EXPORT_AMI])
    assert [t.id for t in asked] == [EXPORT_AMI, EXPORT_I]
    with pytest.raises(TaskNotFound):
        bundles.list(["bun-00000000000000000"])


def test_a_cancel_is_requested_once_and_a_task_that_is_over_is_incorrect_state(
    services: Services, store: Store
) -> None:
    exports, bundles, copies = services
    assert bundles.cancel(BUNDLE).state is TaskState.CANCELLED  # pending: cancelled at once
    assert store.get_task(BUNDLE).cancel_reason == "Cancelled by user"
    again = refused(lambda: bundles.cancel(BUNDLE))
    assert isinstance(again, IncorrectState)
    assert again.message == f"the bundle task {BUNDLE} is cancelled and can no longer be cancelled"
    # another account cannot cancel (its task does not exist for it), nor another service
    assert isinstance(refused(lambda: exports.cancel(EXPORT_I, {"222222222222"})), TaskNotFound)
    assert isinstance(refused(lambda: copies.cancel(COPY)), TaskNotFound)
    assert store.get_task(EXPORT_I).state is TaskState.PENDING
    assert store.get_task(COPY).state is TaskState.PENDING
    assert store.list_tasks(kind=[COPY_IMAGE]) == []
