"""What RabbitMQ holds for a test vhost: per-queue message counts and dead letters."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import urllib.parse
from typing import Iterator


def vhost_of(broker_url: str) -> str:
    path = urllib.parse.urlparse(broker_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def queue_counts(broker_url: str) -> dict[str, tuple[int, int]]:
    """{queue: (ready, unacknowledged)} for every queue of the URL's vhost (rabbitmqctl).

    Unacknowledged messages are delivered to a consumer and not yet acked: a message a worker
    is still processing (or has prefetched) counts there until it is done with it.
    """
    ctl = shutil.which("rabbitmqctl")
    assert ctl is not None, "rabbitmqctl not found"
    out = subprocess.run([ctl, "list_queues", "-p", vhost_of(broker_url), "name", "messages_ready",
                          "messages_unacknowledged", "--no-table-headers", "-q"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            counts[parts[0]] = (int(parts[1]), int(parts[2]))
    return counts


def queues_drained(broker_url: str, *queues: str) -> bool:
    """True when none of ``queues`` (and their delay queues, ``<queue>.DQ``) holds a message,
    ready or unacknowledged: nothing is waiting to run or running."""
    counts = queue_counts(broker_url)
    if not all(queue in counts for queue in queues):  # not declared (or not listed): nothing to conclude
        return False
    names = [q for queue in queues for q in (queue, f"{queue}.DQ")]
    return all(counts.get(name, (0, 0)) == (0, 0) for name in names)


def dead_letters(broker_url: str, queue: str) -> int:
    """Messages in ``queue``'s dead-letter queue (``<queue>.XQ``)."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        return conn.channel().queue_declare(f"{queue}.XQ", passive=True).method.message_count
    finally:
        conn.close()


@contextlib.contextmanager
def broker_outage(broker_url: str) -> Iterator[None]:
    """RabbitMQ is gone for this vhost (and only it): its connections are closed and new ones
    refused until the block ends."""
    ctl = shutil.which("rabbitmqctl")
    assert ctl is not None, "rabbitmqctl not found"
    vhost = vhost_of(broker_url)
    subprocess.run([ctl, "clear_permissions", "-p", vhost, "guest"], check=True, capture_output=True, timeout=60)
    subprocess.run([ctl, "close_all_connections", "--vhost", vhost, "--limit", "1000", "fault test: broker outage"],
                   check=True, capture_output=True, timeout=60)
    try:
        yield
    finally:
        subprocess.run([ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True,
                       capture_output=True, timeout=60)


@contextlib.contextmanager
def broker_restart() -> Iterator[None]:
    """RabbitMQ itself stops (every connection drops, nothing is accepted) and starts again when
    the block ends; durable queues and persistent messages survive it."""
    ctl = shutil.which("rabbitmqctl")
    assert ctl is not None, "rabbitmqctl not found"
    subprocess.run([ctl, "stop_app"], check=True, capture_output=True, timeout=120)
    try:
        yield
    finally:
        subprocess.run([ctl, "start_app"], check=True, capture_output=True, timeout=120)
        subprocess.run([ctl, "await_startup"], check=True, capture_output=True, timeout=120)
