"""The data folder's temporary files when several instances share one folder.

An instance removes its own leftovers (a crash, SIGKILL during an export) at start-up and on every
sweep; another instance's only once untouched for a long time, so a running export elsewhere is
never cut short. Owners refresh the files of their running exports on every sweep.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import typing
import urllib.error
import urllib.request

import pytest

from proxy.export.data_folder import STALE_AFTER_SECONDS, TEMPORARY_FILE_NAME, DataFolder
from proxy.testing import ProxyProcess, produce, unique_topics, wait_until

HOUR = 3600.0


def started(path: str, instance_id: str, interval: float = 60.0) -> DataFolder:
    """A DataFolder after its start-up clean-up (the periodic sweep is stopped again at once)."""
    folder = DataFolder(path, retention_seconds=HOUR, max_bytes=1024 ** 3)

    async def start_up() -> None:
        folder.start(interval, instance_id)
        folder.stop()

    asyncio.run(start_up())
    return folder


def leftover(path: str, instance: str | None, age: float = 0.0) -> str:
    """A temporary file as an export of `instance` (None: a version without instance tags) leaves it."""
    tag = "" if instance is None else instance.replace(":", "%3A") + "-"
    name = f".tmp-{tag}{os.urandom(16).hex()}.csv.part"
    full = os.path.join(path, name)
    with open(full, "w") as handle:
        handle.write("offer_id,price\n1,")
    stamp = time.time() - age
    os.utime(full, (stamp, stamp))
    return name


def test_temporary_names_say_which_instance_writes_them(tmp_path):
    folder = started(str(tmp_path), "web-1:8001")

    name = os.path.basename(folder.new_temporary_path())

    match = TEMPORARY_FILE_NAME.fullmatch(name)
    assert match and match["instance"] == "web-1%3A8001"


def test_start_up_removes_this_instances_leftovers_but_not_a_running_export_of_another(tmp_path):
    path = str(tmp_path)
    writer = started(path, "web-1:8001")
    leftover(path, "web-2:8001")
    leftover(path, "web-2:8001", age=HOUR)
    export = writer.new_export_file("buyOffer")
    with export as output:
        output.write("offer_id,price\n")
        output.flush()
        other_running = os.path.basename(export.temporary_path)

        started(path, "web-2:8001")

        assert other_running in os.listdir(path), "removed another instance's running export"
        assert os.listdir(path) == [other_running], "this instance's leftovers are still there"
        output.write("1,35.0\n")
    assert os.listdir(path) == [export.name]
    with open(os.path.join(path, export.name)) as handle:
        assert handle.read() == "offer_id,price\n1,35.0\n"


def test_start_up_removes_untagged_leftovers_of_the_previous_version(tmp_path):
    old_version = leftover(str(tmp_path), None)

    started(str(tmp_path), "web-1:8001")

    assert not os.path.exists(tmp_path / old_version)


def test_sweeps_remove_stale_files_of_other_instances_and_keep_fresh_ones(tmp_path):
    path = str(tmp_path)
    folder = started(path, "web-1:8001")
    crashed = leftover(path, "web-9:8003", age=STALE_AFTER_SECONDS + 60)
    crashed_old_version = leftover(path, None, age=STALE_AFTER_SECONDS + 60)
    maybe_running = leftover(path, "web-2:8001", age=STALE_AFTER_SECONDS - 60)
    untagged_maybe_running = leftover(path, None, age=STALE_AFTER_SECONDS - 60)
    mine = leftover(path, "web-1:8001")

    removed = folder.sweep()

    assert sorted(removed) == sorted([crashed, crashed_old_version, mine])
    assert sorted(os.listdir(path)) == sorted([maybe_running, untagged_maybe_running])


def test_a_quiet_running_export_is_kept_alive_by_its_owners_sweeps(tmp_path):
    # An export that filters out most rows may not write for minutes; its owner's sweeps touch it.
    path = str(tmp_path)
    owner, other = started(path, "web-1:8001"), started(path, "web-2:8001")
    export = owner.new_export_file("buyOffer")
    with export:
        long_ago = time.time() - STALE_AFTER_SECONDS - 60
        os.utime(export.temporary_path, (long_ago, long_ago))

        owner.sweep()
        other.sweep()

        assert os.path.exists(export.temporary_path), "the other instance removed a running export"
    assert os.path.exists(tmp_path / export.name)


def test_instances_sweeping_the_same_folder_at_once_remove_each_file_once(tmp_path):
    path = str(tmp_path)
    folders = [started(path, f"web-{n}:8001") for n in range(4)]
    stale = {leftover(path, "web-9:8001", age=2 * STALE_AFTER_SECONDS) for _ in range(300)}
    removed: list[list[str]] = []
    failures: list[BaseException] = []
    barrier = threading.Barrier(len(folders))

    def sweep(folder: DataFolder) -> None:
        barrier.wait()
        try:
            removed.append(folder.sweep_temporary_files())
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=sweep, args=(folder,)) for folder in folders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert failures == []
    removed_by_any = sorted(name for names in removed for name in names)
    assert removed_by_any == sorted(stale), "a file was removed twice or not at all"
    assert os.listdir(path) == []


# ---- real proxy processes sharing one folder -------------------------------------------------


def temporary_files(path: typing.Any, instance: str) -> list[str]:
    return [name for name in os.listdir(path) if name.startswith(f".tmp-{instance}-")]


class ExportRequest(threading.Thread):
    """GET /export/data/<topic> in the background; .answer is (status, body) when done."""

    def __init__(self, proxy: ProxyProcess, topic: str):
        super().__init__(daemon=True)
        self.url = f"{proxy.base}/export/data/{topic}"
        self.answer: tuple[int, typing.Any] | None = None

    def run(self) -> None:
        request = urllib.request.Request(self.url, headers={"Authorization": "Token t0k"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                self.answer = (response.status, json.loads(response.read()))
        except urllib.error.HTTPError as error:
            self.answer = (error.code, error.read().decode())
        except OSError as error:
            self.answer = (0, str(error))


@pytest.mark.timeout(120)
def test_instances_sharing_a_folder_keep_each_others_exports_and_sweep_crash_leftovers(broker, start_proxy, tmp_path):
    (topic,) = unique_topics("shared")
    broker.create_topics([topic])
    produce(broker.bootstrap_servers, topic, [b'{"merchant_id":"m","n":%d}' % n for n in range(50_000)])
    shared = tmp_path / "shared-data"
    config = {"topics": [topic], "data_dir": str(shared),
              "export": {"topics": {topic: {"policy": "public"}}, "sweep_interval": 0.2}}
    first = start_proxy(broker.bootstrap_servers, dict(config, instance_id="first"))

    # Another instance starts while the first is in the middle of an export.
    export = ExportRequest(first, topic)
    export.start()
    wait_until(lambda: temporary_files(shared, "first"), 30, interval=0.002, message="the export's temporary file")
    first.process.send_signal(signal.SIGSTOP)  # holds the export mid-file while the other starts
    try:
        # The port opens only after the start-up clean-up: it has run once this returns.
        second = start_proxy(broker.bootstrap_servers, dict(config, instance_id="second"), wait_healthy=False)
        assert temporary_files(shared, "first"), "the starting instance removed a running export's file"
    finally:
        first.process.send_signal(signal.SIGCONT)
    export.join(60)
    status, body = export.answer
    assert status == 200, body
    assert second.get("/" + body["url"])[0] == 200, "the other instance cannot serve the file"

    # SIGKILL mid-export leaves the file behind. The other instance cannot tell it from a running
    # export, so it keeps it, while a long-untouched file of a crashed instance goes.
    doomed = ExportRequest(first, topic)
    doomed.start()
    wait_until(lambda: temporary_files(shared, "first"), 30, interval=0.002, message="the second export's file")
    first.process.kill()
    first.process.wait(10)
    (killed_export,) = temporary_files(shared, "first")
    crashed = leftover(str(shared), "long-gone", age=2 * STALE_AFTER_SECONDS)
    wait_until(lambda: not os.path.exists(shared / crashed), 10, message="a sweep to remove the stale file")
    assert os.path.exists(shared / killed_export)

    # The killed instance comes back under its name and cleans up after itself before serving.
    start_proxy(broker.bootstrap_servers, dict(config, instance_id="first"), wait_healthy=False)
    assert not os.path.exists(shared / killed_export)
    doomed.join(10)
