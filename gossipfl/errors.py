"""Typed errors. Every message names the thing that is wrong so an operator can act on it.

The CLI turns any ``GossipflError`` into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations


class GossipflError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = 1


class ModelError(GossipflError):
    """A model file is unreadable, not ONNX, or not a model gossipfl can train."""


class UnsupportedOpError(ModelError):
    """The model holds an operator the training-graph builder cannot differentiate."""

    def __init__(self, op_type: str, node_name: str, why: str = "no gradient rule") -> None:
        self.op_type = op_type
        self.node_name = node_name
        super().__init__(f"cannot train this model: operator {op_type} (node {node_name!r}): {why}")


class DataError(GossipflError):
    """Local data is missing, malformed, or does not fit the model."""


class ConfigError(GossipflError):
    """A configuration file or value is wrong; the message names the key."""


class CodecError(GossipflError):
    """A coded model delta is malformed, corrupt, or does not fit the expected model."""


class ProtocolError(GossipflError):
    """Bytes or a message that break the gossipfl protocol: a malformed frame, or a message out of place."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the conversation: a message the exchange does not allow at this point (h11's name)."""


class BadMessage(ProtocolError, ValueError):
    """A header that does not parse, or a field out of range. Also raised when a message is built with bad
    fields locally (hence ValueError too): an invalid message cannot be sent or received."""


class FrameTooLarge(RemoteProtocolError):
    """A length field exceeds the configured limits; refused before the bytes are read."""


class UnsupportedVersion(RemoteProtocolError):
    """The peer speaks a framing version this build does not."""


class UnknownMessageType(RemoteProtocolError):
    """The type byte names no message of this protocol version."""


class BadPayload(RemoteProtocolError):
    """The payload of a delta-carrying message is not an acceptable codec payload."""


class TruncatedFrame(RemoteProtocolError):
    """The stream ended in the middle of a frame."""


class BufferFull(RemoteProtocolError):
    """More bytes were fed than the decoder may hold; the caller must drain messages between feeds."""


class LocalProtocolError(ProtocolError):
    """We tried to send a message the exchange does not allow at this point: a bug in this node, not the peer."""


class Refusal(GossipflError):
    """An exchange refused by one side, for a reason that is also a metric label (``refused.<reason>``)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class RefusedByUs(Refusal):
    """This node refuses the peer or what it sent: admission, an outlier model, a bad payload."""


class RefusedByPeer(Refusal):
    """The peer refused us: its Error message (reason ``peer-<code>``) or, on a dial, its TLS layer."""


class LinkBroken(GossipflError):
    """The connection broke in the middle of an exchange both ends had accepted: a peer that stopped or
    crashed, a route that went away. Counted apart from refusals, so ``refused.*`` means what it says."""

    reason = "link"


class AggregationError(GossipflError):
    """A gateway round's client updates cannot be aggregated: none, mismatched, non-finite, or bad counts."""


class IdentityError(GossipflError):
    """A certificate, key or node id is missing, malformed, untrusted, or not the one expected."""


class ServiceError(GossipflError):
    """Installing or removing the systemd service failed; the message names the file or command at fault."""


class ControlError(GossipflError):
    """A control-socket request failed: refused, malformed, or answered with an error by the daemon."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code


class DaemonNotRunning(ControlError):
    """Nothing answers on the control socket: the daemon is stopped, or another socket path is meant."""

    exit_code = 3

    def __init__(self, message: str) -> None:
        super().__init__(message, "not_running")


class ControlForbidden(ControlError):
    """The caller may not use the control socket, or may not change anything through it."""

    exit_code = 4

    def __init__(self, message: str) -> None:
        super().__init__(message, "forbidden")
