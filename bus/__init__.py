"""callerid.bus: the ZeroMQ mesh between node agents and its wire protocol."""

from callerid.bus.protocol import (
    MAX_MESSAGE_SIZE,
    PROTOCOL_VERSION,
    CallerIdQuery,
    CallerIdReply,
    Endpoint,
    ErrorCode,
    LocalProtocolError,
    Message,
    Ping,
    Pong,
    ProtocolError,
    UnsupportedVersion,
    decode,
    encode,
)

__all__ = [
    "MAX_MESSAGE_SIZE",
    "PROTOCOL_VERSION",
    "CallerIdQuery",
    "CallerIdReply",
    "Endpoint",
    "ErrorCode",
    "LocalProtocolError",
    "Message",
    "Ping",
    "Pong",
    "ProtocolError",
    "UnsupportedVersion",
    "decode",
    "encode",
]
