"""The broker configuration both sides share (shared/queue.py), against the suite's real Redis."""

from __future__ import annotations

import kombu

from shared.config import Settings
from shared.queue import make_celery


def test_a_lost_connection_holding_messages_does_not_raise_and_loses_none(settings: Settings, store):
    # What Celery does when Redis goes away under a worker that holds a message: the transport is
    # torn down, then the channel closes and tries to put the message back. kombu raised
    # AttributeError there, which Celery calls an unrecoverable error: the whole worker exited.
    app = make_celery(settings)
    queue = kombu.Queue("restore-on-loss", routing_key="restore-on-loss")
    with app.connection_for_write() as conn:
        with conn.Producer() as producer:
            producer.publish({"job": "j1"}, routing_key="restore-on-loss", declare=[queue], serializer="json")
    conn = app.connection_for_read()
    try:
        channel = conn.channel()
        message = queue(channel).get(no_ack=False)
        assert message is not None and message.payload == {"job": "j1"}
        unacked = store.r.hlen("unacked")
        assert unacked >= 1
        conn.transport.client = None  # as kombu.Connection._do_close_transport leaves it
        channel.close()  # raised AttributeError before shared.queue's QoS
        # Not put back now, but still held in Redis: the visibility timeout returns it.
        assert store.r.hlen("unacked") == unacked
        assert any("restore-on-loss" in m for m in store.r.hvals("unacked"))
    finally:
        store.r.delete("restore-on-loss")
        for tag, raw in store.r.hgetall("unacked").items():
            if "restore-on-loss" in raw:
                store.r.hdel("unacked", tag)
                store.r.zrem("unacked_index", tag)
