"""The epochlink host library: drive a NIC from a training node (see :mod:`.node`)."""

from .node import (ConnectionLost, EpochRefused, EpochStatus, EpochlinkError, ErrorResponse, FenceMode, LinkState,
                   Node, NodeInfo, PortStatus, ProtocolError, Role, Timeout, Versions)

__all__ = ["Node", "NodeInfo", "EpochStatus", "Versions", "PortStatus", "Role", "LinkState",
           "FenceMode", "ConnectionLost", "EpochlinkError", "ProtocolError", "ErrorResponse", "EpochRefused",
           "Timeout"]
