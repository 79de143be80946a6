"""An in-process Flower Grid: the real ServerApp and ClientApp code, with messages passed through
their protobuf encoding but no SuperLink, so protocol tests run in seconds."""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


def wire(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


class InProcessGrid(Grid):
    """nodes: node id -> a callable (message, context) -> Message (a ClientApp or a fake)."""

    def __init__(self, nodes: dict, partitions: int | None = None):
        # What Flower's runtimes set before a ServerApp creates messages.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
        self.apps = dict(nodes)
        n = partitions or len(nodes)
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": n},
                state=RecordDict(),
                run_config={},
            )
            for i, nid in enumerate(nodes)
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.apps)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            incoming = Message(
                wire(msg.content),
                dst_node_id=node,
                message_type=msg.metadata.message_type,
                group_id=msg.metadata.group_id,
            )
            try:
                reply = self.apps[node](incoming, self.contexts[node])
                reply = Message(wire(reply.content), reply_to=incoming)
            except Exception as e:  # what a SuperNode reports for a ClientApp that raised
                reply = Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=incoming)
            self.replies.append(reply)
            out.append(reply)
        return out
